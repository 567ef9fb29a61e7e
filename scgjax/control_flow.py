"""Loops whose body samples: :func:`scan`, one compiled ``lax.scan`` that handlers see through.

``scan(f, init, xs)`` runs ``f(carry, x) -> (carry, y)`` as ``jax.lax.scan`` does, and ``f`` may
call :func:`~scgjax.primitives.sample`, :func:`~scgjax.primitives.param`,
:func:`~scgjax.primitives.factor`, :func:`~scgjax.primitives.deterministic` and open plates
(NumPyro's ``numpyro.contrib.control_flow.scan``). The body is traced once, so trace time, compile
time and program size do not grow with the number of steps.

How the handlers see a loop: each active handler says how it treats a loop's sites
(``Messenger.scan_role``). Handlers that decide values (``seed``, ``substitute``,
``condition``, ``replay``, the objectives' own) act *inside* the body, on each step's message:
``seed`` gives every step a fresh key; a value given to ``substitute``/``condition``/``replay``
for a site of the loop has a leading axis with one entry per step, read at the current step.
Handlers that only record or weigh sites (``trace``, ``scale``, ``mask``) see each site once
after the loop, *stacked* over the steps: one site of the program whose batch shape has a
leading time axis, declared by a frame ``CondIndepFrame(name, dim, T, T, time=True)`` in its
``cond_indep_stack``. Unlike a plate's, the elements of a time axis are not independent: the
carry links the steps, and the graph layer reads from the body's data flow which later steps
each step's choice reaches (:func:`scgjax.provenance.source_lags`).

Example:
    >>> import jax, jax.numpy as jnp, scgjax as sg
    >>> from scgjax import dist
    >>> def walk(n):
    ...     def step(position, _):
    ...         move = sg.sample("move", dist.Normal(0.0, 1.0))
    ...         return position + move, position
    ...     return sg.scan(step, 0.0, length=n)
    >>> tr = sg.handlers.trace(sg.handlers.seed(walk, 0)).get_trace(5)
    >>> tr["move"]["value"].shape, [(f.name, f.time) for f in tr["move"]["cond_indep_stack"]]
    ((5,), [('time', True)])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.extend import core as jex_core

from scgjax import primitives, provenance, stepped_prng
from scgjax.dist import StackedSteps
from scgjax.errors import SiteError
from scgjax.primitives import CondIndepFrame, Message, Messenger
from scgjax.stepped_prng import step_keys

__all__ = ["ScanStep", "Transition", "hoisted_scan", "scan", "split_step"]

#: what a handler may ask of a loop, in the ``kwargs`` of its ``"scan"`` message: the loop's
#: PRNG key (``seed``); a :class:`Transition`; a function of each sample site's step message
#: whose value is stacked as the site's ``step_log_prob``; a ``runner(body, init, steps, xs,
#: sites)`` that runs the loop instead of ``lax.scan`` (``body(carry, (step_in, x))`` is the
#: step with the handlers installed, ``steps`` its per-step inputs, ``sites`` the step's
#: messages once the body has been traced) and returns what ``lax.scan(body, ...)`` would
_LOOP_REQUESTS = {"rng_key": None, "transition": None, "step_log_prob": None, "runner": None}

#: message fields that may hold arrays computed in the body: stacked over the steps
#: (``collected``: what a handler inside the body kept of each step, e.g. an objective's)
_STACKED_FIELDS = ("value", "fn", "scale", "mask", "collected")


class ScanStep(NamedTuple):
    """What a handler installed in an :func:`scan` body knows of the current step.

    Attributes:
        name: the loop's name (its time axis).
        length: the number of steps ``T``.
        index: the step's index ``t`` (traced; ``0 .. T-1`` also when the loop runs in reverse).
        rng_key: the step's PRNG key, or ``None`` when no ``seed`` handler gave the loop one.
        site_keys: the step's keys, one per site that asks for one: stepped keys
            (:mod:`scgjax.stepped_prng`, one stream per site across the steps, made before the
            loop with no hash per step), or ``None``: then split from ``rng_key``.
        requests: how many keys the step's sites have asked for (a counter shared by the
            handlers of the step).
        choice: when the loop runs at a :class:`Transition`, the joint value index that the
            step's enumerated sites take (``None`` otherwise).
    """

    name: str
    length: int
    index: jax.Array
    rng_key: jax.Array | None
    site_keys: jax.Array | None = None
    requests: list | None = None
    choice: jax.Array | None = None

    def next_key(self) -> jax.Array | None:
        """The next of :attr:`site_keys`, or ``None`` when there is none left."""
        self.requests.append(None)
        i = len(self.requests) - 1
        if self.site_keys is None or i >= self.site_keys.shape[0]:
            return None
        return self.site_keys[i]

    def slice(self, site: str, value: Any) -> Any:
        """``value[t]`` for a value given for every step of the loop (each leaf has a leading
        axis of size ``length``); a :class:`~scgjax.errors.SiteError` naming ``site`` else."""
        for leaf in jax.tree.leaves(value):
            shape = jnp.shape(leaf)
            if not shape or shape[0] != self.length:
                raise SiteError(site, f"is inside sg.scan '{self.name}' of length {self.length}: "
                                f"a value given for it needs one entry per step, a leading axis "
                                f"of size {self.length}; got shape {shape}")
        return jax.tree.map(
            lambda v: jax.lax.dynamic_index_in_dim(jnp.asarray(v), self.index, keepdims=False),
            value)


class Transition(NamedTuple):
    """A handler's request to run a loop at one pair of consecutive values of the sites it
    enumerates (set on the loop's ``"scan"`` message, ``msg["kwargs"]["transition"]``).

    Every step ``t`` runs with the sites at the joint value ``cur`` (:attr:`ScanStep.choice`;
    the handler sets them), from the carry that step ``t - 1`` passes on at the value ``prev``
    (step 0 from the initial carry). Run at every pair, step ``t``'s costs give the table
    ``C_t[prev, cur]`` of the forward algorithm. Unless the carry a step passes on depends on
    the carry it gets (beyond the enumerated values: a counter, a running sum), no step waits
    for another: the carry is computed once per (value, step) and the steps run as one ``vmap``,
    with no sequential loop (otherwise a ``lax.scan`` runs each step twice, at ``cur`` and at
    ``prev``). The final carry is the one the last step passes on at ``prev``.

    Attributes:
        count: the number of joint values.
        prev: the joint value index at the previous step.
        cur: the joint value index at every step.
    """

    count: int
    prev: jax.Array
    cur: jax.Array


class _collect_steps(Messenger):
    """The outermost handler of a loop's body: keeps each step's messages (read once the step
    has run, so with every handler's changes)."""

    def __init__(self, loop: str):
        super().__init__()
        self.loop = loop
        self.messages: dict[str, Message] = {}

    def postprocess_message(self, msg: Message) -> None:
        name = msg["name"]
        if msg["type"] == "plate":
            size, subsample = msg["args"]
            if subsample not in (None, size):
                raise SiteError(name, f"is a sub-sampling plate inside sg.scan '{self.loop}'; "
                                "a loop's plates must keep all their elements (open the "
                                "sub-sampling plate outside the loop)")
            return
        if msg["type"] not in ("sample", "deterministic", "param"):
            return
        previous = self.messages.get(name)
        if previous is not None and not (previous["type"] == msg["type"] == "param"):
            raise SiteError(name, f"appears twice in one step of sg.scan '{self.loop}'; site "
                            "names must be unique")
        self.messages.setdefault(name, msg)


def scan(f: Callable, init: Any, xs: Any = None, length: int | None = None,
         reverse: bool = False, *, name: str = "time") -> tuple[Any, Any]:
    """``jax.lax.scan(f, init, xs, length, reverse)`` whose body may sample (NumPyro's
    ``contrib.control_flow.scan``).

    Every site of ``f`` becomes one site of the program with a leading time axis of ``T =
    length`` steps (``name`` names the axis; two loops of one program need different names,
    and the model and the guide use the same name for the same loop). Traces, ``sg.graph`` and
    the handlers see the stacked sites; values given to ``substitute``/``condition`` for them have
    shape ``(T, ...)``. Objectives credit each step's choice with the costs its value can reach:
    the same step's through the body, later steps' through the carry (rewards-to-go when all
    flows into the carry), read from the body's data flow. ``sg.scan`` may run inside plates (a
    batch of episodes) and its body may open plates (without sub-sampling); loops do not nest.

    Args:
        f: ``f(carry, x) -> (carry, y)``.
        init: the initial carry (a pytree).
        xs: the per-step inputs (a pytree of arrays with a leading axis of size ``T``), or
            ``None``.
        length: ``T``, needed when ``xs`` is ``None``.
        reverse: run from the last step to the first (the sites' time axes keep their order).
        name: the name of the loop's time axis.

    Returns:
        ``(final carry, stacked ys)``.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def episode():
        ...     def step(total, _):
        ...         a = sg.sample("a", dist.Bernoulli(logits=total))
        ...         sg.factor("reward", a * 1.0)
        ...         return total + a, a
        ...     return sg.scan(step, 0.0, length=4)
        >>> g = sg.graph(episode)
        >>> sorted(g.time_lags["a", "reward"]), sorted(g.time_credit("a", "reward", "time"))
        ([0], [0, 1])
    """
    if not isinstance(name, str):
        raise TypeError(f"sg.scan's name must be a str, got {name!r}")
    if not callable(f):
        raise TypeError(f"sg.scan takes the body f(carry, x) -> (carry, y) first, got "
                        f"{type(f).__name__}")
    if any(isinstance(h, _collect_steps) for h in primitives._HANDLER_STACK):
        raise SiteError(name, "is an sg.scan inside the body of another sg.scan; nested loops "
                        "are not supported: write the inner loop in Python, or as a plate")
    length = _length(name, xs, length)
    outer = list(primitives._HANDLER_STACK)
    for h in outer:
        if h.scan_role not in ("step", "stacked"):
            raise SiteError(name, f"is an sg.scan run under the handler {type(h).__name__}, "
                            "which does not say how it treats a loop's sites: set its "
                            "scan_role ('step' or 'stacked') and, for 'step', for_step")
    loop_msg = primitives.new_message("scan", name, args=(length,), kwargs=dict(_LOOP_REQUESTS))
    requests = primitives.apply_stack(loop_msg)["kwargs"]
    key, transition, step_log_prob = (requests["rng_key"], requests["transition"],
                                      requests["step_log_prob"])
    static: dict[str, Message] = {}
    counted: list = []

    def body(carry, inputs):
        step_in, x = inputs
        step = ScanStep(name, length, step_in["index"], step_in.get("key"),
                        step_in.get("site_keys"), counted, step_in.get("choice"))
        counted.clear()
        collector = _collect_steps(name)
        saved = list(primitives._HANDLER_STACK)
        primitives._HANDLER_STACK.clear()
        try:
            collector.__enter__()
            for h in outer:
                if h.scan_role != "step":
                    continue
                inner = h.for_step(step)
                if inner is not None and inner.keeps_state:
                    inner.__enter__()  # fresh per-call state, at the body's trace level
                elif inner is not None:
                    primitives._HANDLER_STACK.append(inner)  # shares the outer bookkeeping
            out = f(carry, x)
        finally:
            primitives._HANDLER_STACK[:] = saved
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"the body of sg.scan '{name}' must return (carry, y), got "
                            f"{type(out).__name__}")
        static.clear()
        arrays = {}
        for site, msg in collector.messages.items():
            static[site] = msg
            arrays[site] = {k: msg[k] for k in _STACKED_FIELDS if _is_array_field(msg, k)}
            if step_log_prob is not None and msg["type"] == "sample":
                arrays[site]["step_log_prob"] = step_log_prob(msg)
        return out[0], (out[1], arrays)

    steps: dict[str, Any] = {"index": jnp.arange(length)}
    if key is not None:
        # Count the keys a step asks for (one abstract run of the body), then give each site
        # a stepped key per step (one stream per site across the steps, stepped_prng): the
        # body hashes no key, and the draws of all steps, hoisted out of the loop, cost what
        # one draw of the whole (T, ...) array from one key does.
        steps["key"] = stepped_prng.split(key, length)
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)),
                           (steps, xs))
        jax.eval_shape(body, init, one)
        n = len(counted)
        if n:
            steps["site_keys"] = step_keys(stepped_prng.fold_in(key, 1), length, (n,))
    if requests["runner"] is not None:
        final, (ys, arrays) = requests["runner"](body, init, steps, xs, static)
    elif transition is None:
        final, (ys, arrays) = hoisted_scan(body, init, (steps, xs), length, reverse)
    else:
        final, (ys, arrays) = _transition_steps(name, body, init, steps, xs, transition, reverse)
    for site, msg in static.items():
        primitives.apply_stack_stacked(_stacked_message(name, length, msg, arrays[site]))
    return final, ys


def hoisted_scan(f: Callable, init: Any, xs: Any, length: int, reverse: bool = False
                 ) -> tuple[Any, Any]:
    """``jax.lax.scan(f, init, xs, length, reverse)``, with the work of each step that depends
    on its ``x`` only (not on the carry) done for all steps at once before the loop.

    ``f`` is traced once to a jaxpr and split by data dependence
    (``partial_eval_jaxpr_nounits``, the carry unknown): the part computed from ``x`` and
    constants alone runs as one ``vmap`` over the steps (a step's random draws from its
    pre-split key, the transforms of its data), and the loop runs the rest on its outputs. The
    values are the same; on the CPU a loop of many small steps runs several times faster (a
    random draw inside a loop body is a small loop of its own). Falls back to ``lax.scan``
    where the split does not apply (effects, primitives partial evaluation does not know).

    Example:
        >>> def step(total, key):
        ...     draw = jax.random.normal(key, (3,))
        ...     return total + draw.sum(), draw
        >>> keys = jax.random.split(jax.random.key(0), 5)
        >>> a, b = jax.lax.scan(step, 0.0, keys), hoisted_scan(step, 0.0, keys, 5)
        >>> bool(jnp.allclose(a[0], b[0])), bool((a[1] == b[1]).all())
        (True, True)
    """
    try:
        return _hoisted(f, init, xs, length, reverse)
    except Exception:  # noqa: BLE001 -- any failure of the split: the plain loop
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse)


def _hoisted(f: Callable, init: Any, xs: Any, length: int, reverse: bool) -> tuple[Any, Any]:
    residuals, step = split_step(f, init, xs)
    return jax.lax.scan(step, jax.tree.map(jnp.asarray, init), residuals, length=length,
                        reverse=reverse)


def split_step(f: Callable, init: Any, xs: Any) -> tuple[list, Callable]:
    """``f(carry, x)`` split by data dependence into the work of every step that depends on
    its ``x`` only, done now for all steps at once (one ``vmap`` over the leading axis of
    ``xs``), and the rest: returns ``(residuals, step)`` with ``step(carry, r) == f(carry, x)``
    for ``r`` the residuals' slice of the step (what the input-only work computes from
    constants alone, the same at every step, is not among them: ``step`` holds it as a
    constant of the loop). A ``ValueError`` where there is nothing to
    split off (no inputs, effects, a program traced for its graph, no input-only work); any
    other exception where partial evaluation does not apply. :func:`hoisted_scan` is
    ``lax.scan`` of ``step`` over the residuals."""
    from jax._src.interpreters import partial_eval as pe  # the split of a jaxpr

    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)),
                       xs)
    init = jax.tree.map(jnp.asarray, init)
    closed, out_shape = jax.make_jaxpr(f, return_shape=True)(init, one)
    carry = jax.tree.leaves(init)
    inputs = jax.tree.leaves(xs)
    effects = [e for e in closed.effects if type(e).__name__ != "NamedAxisEffect"]
    if not inputs or effects or _marks_sources(closed.jaxpr):
        # (a program traced for its graph marks its sampled values: the provenance analysis
        # reads them inside the loop, where they must stay)
        raise ValueError("nothing to hoist")
    known, unknown, _, residuals = pe.partial_eval_jaxpr_nounits(
        closed, [True] * len(carry) + [False] * len(inputs), instantiate=True)
    if not residuals:
        raise ValueError("nothing to hoist")
    hoisted = _each_step(known, inputs)[-len(residuals):]
    # a residual computed from constants alone (a parameter's transform: the same at every
    # step) enters the loop once, as a constant of its body, not sliced from a (T, ...) array
    varies = [bool(d) for d in provenance.dependencies(
        jex_core.jaxpr_as_fun(known), *jax.tree.leaves(one))][-len(residuals):]
    fixed = [None if v else h[0] for h, v in zip(hoisted, varies, strict=True)]
    if not any(varies):
        raise ValueError("nothing to hoist")
    n = len(carry)
    carry_tree, ys_tree = jax.tree.structure(out_shape[0]), jax.tree.structure(out_shape[1])
    dtypes = [jnp.result_type(c) for c in carry]

    def step(c, r):
        per_step = iter(r)
        full = [next(per_step) if f is None else f for f in fixed]
        out = jex_core.jaxpr_as_fun(unknown)(*full, *jax.tree.leaves(c))
        new = [o.astype(d) for o, d in zip(out[:n], dtypes, strict=True)]
        return jax.tree.unflatten(carry_tree, new), jax.tree.unflatten(ys_tree, list(out[n:]))

    return [h for h, v in zip(hoisted, varies, strict=True) if v], step


def _each_step(known: Any, inputs: list) -> list:
    """``jax.vmap(known)(*inputs)``: the jaxpr ``known`` for every step (the leading axis of
    ``inputs``), with the steps' axis major under an enclosing ``vmap`` (the particles').

    Under ``vmap`` the particles' axis would lead, ``(K, T, ...)``: a hoisted draw of one value
    per step is then a ``(K, T)`` array with the steps its minor dimension, which XLA's CPU
    loops vectorise only where ``T`` is a multiple of the vector width (at ``T = 10`` an
    inverse error function of ``(1024, 10)`` takes 5x the time of ``(10, 1024)``), and the
    loop transposes it to ``(T, K)``. Its batching rule (``custom_vmap``) maps the steps
    outside the particles instead: the work runs on ``(T, K, ...)`` arrays, the particles
    minor, and the loop's transpose cancels the one back to the particles' axis first."""
    if any(type(e).__name__ == "NamedAxisEffect" for e in known.effects):
        # (work that names the enclosing axis, e.g. its index: the rule's own vmap has no name)
        return list(jax.vmap(jex_core.jaxpr_as_fun(known))(*inputs))
    jaxpr, consts = known.jaxpr, list(known.consts)

    def run(c: list, x: list) -> list:
        return jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, c))(*x)

    @custom_vmap
    def each_step(c: list, x: list) -> list:
        return jax.vmap(lambda *step: run(c, list(step)))(*x)

    @each_step.def_vmap
    def particles_minor(size: int, batched: list, c: list, x: list) -> tuple[list, list]:
        c_batched, x_batched = batched
        flat = [*c_batched, *x_batched]
        deps = provenance.dependencies(
            run, [jax.ShapeDtypeStruct(jnp.shape(a)[int(b):], jnp.result_type(a))
                  for a, b in zip(c, c_batched, strict=True)],
            [jax.ShapeDtypeStruct(jnp.shape(a)[1 + int(b):], jnp.result_type(a))
             for a, b in zip(x, x_batched, strict=True)])
        out_batched = [any(flat[i] for i in d) for d in deps]

        def step(*s):
            return jax.vmap(lambda cc, *ss: run(cc, list(ss)),
                            in_axes=([0 if b else None for b in c_batched],
                                     *[0 if b else None for b in x_batched]),
                            out_axes=[0 if b else None for b in out_batched])(c, *s)

        out = jax.vmap(step, in_axes=tuple(1 if b else 0 for b in x_batched))(*x)
        return ([jnp.moveaxis(o, 1, 0) if b else o for o, b in zip(out, out_batched,
                                                                      strict=True)],
                out_batched)

    return list(each_step(consts, list(inputs)))


def _marks_sources(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or one inside it) marks a named source (:func:`provenance.source`)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is provenance._source_p:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _marks_sources(inner):
                    return True
    return False


def _transition_steps(name: str, body: Callable, init: Any, steps: dict, xs: Any,
                      transition: Transition, reverse: bool) -> tuple[Any, Any]:
    """The loop run at ``transition`` (see :class:`Transition`): ``(final carry, (ys,
    arrays))`` as ``lax.scan`` of ``body`` returns them."""
    if reverse:
        raise SiteError(name, "is an sg.scan with reverse=True whose sites are enumerated step "
                        "by step; the forward algorithm needs a forward loop")

    def at(choice: Any) -> Callable:
        return lambda carry, step_in, x: body(carry, ({**step_in, "choice": choice}, x))

    linked, per_step = _carry_flow(at(transition.cur), init, steps, xs)
    if linked:
        def twice(carry, inputs):  # the costs at cur, the carry passed on at prev
            step_in, x = inputs
            return (at(transition.prev)(carry, step_in, x)[0],
                    at(transition.cur)(carry, step_in, x)[1])

        return jax.lax.scan(twice, init, (steps, xs))
    # the carry each step passes on at each value: (count, T, ...)
    after = jax.vmap(lambda j: jax.vmap(lambda s, x: at(j)(init, s, x)[0])(steps, xs))(
        jnp.arange(transition.count))
    final = jax.tree.map(lambda a: a[transition.prev, -1], after)
    head = at(transition.cur)(init, *jax.tree.map(lambda a: a[0], (steps, xs)))[1]
    head = jax.tree.map(lambda a: jnp.asarray(a)[None], head)
    if jax.tree.leaves(steps)[0].shape[0] == 1:
        return final, head
    # steps 1.. from the carry at prev; a carry that is the same at every step (it depends on
    # the value only) enters unbatched, so what the step computes from it alone (a row of
    # transition probabilities) is computed once, not once per step
    leaves, treedef = jax.tree.flatten(after)
    before = [a[transition.prev, :-1] if varies else a[transition.prev, 0]
              for a, varies in zip(leaves, per_step, strict=True)]
    axes = jax.tree.unflatten(treedef, [0 if varies else None for varies in per_step])
    rest = jax.vmap(lambda c, s, x: at(transition.cur)(c, s, x)[1], in_axes=(axes, 0, 0))(
        jax.tree.unflatten(treedef, before), *jax.tree.map(lambda a: a[1:], (steps, xs)))
    return final, jax.tree.map(lambda h, r: jnp.concatenate([h, r.astype(h.dtype)]), head, rest)


def _carry_flow(step: Callable, init: Any, steps: dict, xs: Any) -> tuple[bool, list[bool]]:
    """Whether the carry that ``step(carry, step_in, x)`` passes on depends on the carry it
    gets, and, per leaf of that carry, whether it depends on the step's own inputs."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)),
                       (steps, xs))
    carried = len(jax.tree.leaves(init))
    deps = provenance.dependencies(lambda c, s, x: step(c, s, x)[0], init, *one)
    linked = any(i < carried for d in deps for i in d)
    return linked, [any(i >= carried for i in d) for d in deps]


def _length(name: str, xs: Any, length: int | None) -> int:
    sizes = {int(jnp.shape(leaf)[0]) if jnp.ndim(leaf) else -1 for leaf in jax.tree.leaves(xs)}
    if -1 in sizes:
        raise SiteError(name, "is an sg.scan whose xs has a scalar leaf; every leaf of xs needs "
                        "a leading axis with one entry per step")
    if len(sizes) > 1:
        raise SiteError(name, f"is an sg.scan whose xs leaves have different leading sizes "
                        f"{sorted(sizes)}")
    if length is None:
        if not sizes:
            raise SiteError(name, "is an sg.scan with neither xs nor length: give length=T")
        return sizes.pop()
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise SiteError(name, f"is an sg.scan with length {length!r}; it must be an int >= 1")
    if sizes and sizes != {length}:
        raise SiteError(name, f"is an sg.scan with length {length} but xs of leading size "
                        f"{sizes.pop()}")
    return length


def _is_array_field(msg: Message, key: str) -> bool:
    """Whether the step's ``msg[key]`` is computed per step (arrays, a distribution), rather
    than a Python constant that every step shares."""
    value = msg.get(key)
    if value is None or isinstance(value, (bool, int, float)):
        return False
    return key in ("value", "fn", "collected") or bool(jax.tree.leaves(value))


def _stacked_message(loop: str, length: int, step_msg: Message, arrays: dict) -> Message:
    """The program's site for a site of the loop: every per-step array stacked on a leading
    time axis, the time frame added to its ``cond_indep_stack``."""
    msg = {**step_msg, **arrays, "stop": False}
    msg["kwargs"] = {**step_msg["kwargs"], "rng_key": None}
    if msg["type"] == "param":  # one value for all steps
        msg["value"] = jax.tree.map(lambda v: v[0], arrays["value"])
        return msg
    if msg["type"] == "deterministic":
        msg["args"] = ()
        step_ndim = jnp.ndim(jax.tree.leaves(msg["value"])[0]) - 1
    else:
        step_batch = tuple(step_msg["fn"].batch_shape)
        msg["fn"] = StackedSteps(arrays["fn"])
        step_ndim = len(step_batch)
        event_ndim = len(step_msg["fn"].event_shape)
        msg["value"] = _lead(msg["value"], step_ndim + event_ndim)
        for key in ("scale", "mask", "step_log_prob"):
            if key in arrays:
                msg[key] = _lead(msg[key], step_ndim)
    frame = CondIndepFrame(loop, -1 - step_ndim, length, length, time=True)
    msg["cond_indep_stack"] = [frame, *step_msg["cond_indep_stack"]]
    return msg


def _lead(x: jax.Array, ndim: int) -> jax.Array:
    """A stacked ``(T, *shape)`` array with size-1 axes after ``T`` up to ``1 + ndim`` dims, so
    that its time axis lines up with the site's (a per-step value may broadcast)."""
    missing = 1 + ndim - jnp.ndim(x)
    return x if missing <= 0 else jnp.reshape(x, (x.shape[0], *(1,) * missing, *x.shape[1:]))
