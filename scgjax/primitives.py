"""The effect system: messages, the handler stack, and the modelling primitives.

A program is a plain Python function that calls :func:`sample`, :func:`param`,
:func:`factor`, :func:`deterministic` and :func:`module`, possibly inside :class:`plate`
contexts. Each call builds a *message* (a ``dict``) and sends it through the stack of active
handlers (:mod:`scgjax.handlers`), innermost first; the handlers may read or rewrite it (give
it a value, a key, a scale, ...); then the default behaviour fills in whatever is still missing,
and the handlers see the finished message in reverse order (``postprocess_message``). This is
the design of Pyro's minipyro and NumPyro's ``primitives.py``; the stack is a module-level
list that each handler pushes on ``__enter__`` and pops on ``__exit__``, so handlers carry no
state from one call to the next and can be used freely under ``jit``, ``vmap`` and ``grad``.

Example:
    >>> import jax
    >>> import scgjax as sg
    >>> from scgjax import dist
    >>> def model():
    ...     with sg.plate("data", 3):
    ...         return sg.sample("z", dist.Normal(0.0, 1.0))
    >>> tr = sg.handlers.trace(sg.handlers.seed(model, jax.random.key(0))).get_trace()
    >>> tr["z"]["value"].shape, [f.name for f in tr["z"]["cond_indep_stack"]]
    ((3,), ['data'])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from numpyro.distributions import constraints
from numpyro.distributions.distribution import Distribution

from scgjax import dist as _dist
from scgjax.errors import SiteError

Message = dict[str, Any]

_HANDLER_STACK: list[Messenger] = []


class CondIndepFrame(NamedTuple):
    """One enclosing plate of a site: its name, batch dimension and (subsampled) size.

    ``size`` is the number of elements the site carries along ``dim`` (the subsample size when
    the plate subsamples); ``full_size`` is the size of the whole population. ``time`` marks the
    time axis of an ``sg.scan`` loop (its elements are steps, which the loop's carry may link),
    not a plate of conditionally independent elements.
    """

    name: str
    dim: int
    size: int
    full_size: int
    time: bool = False


class Messenger:
    """Base class of effect handlers.

    A handler either wraps a function (``handler(fn)(*args)``) or is used as a context manager
    (``with handler: ...``). Subclasses override :meth:`process_message` (called before the
    default behaviour, innermost handler first) and/or :meth:`postprocess_message` (called after
    it, outermost handler first... in reverse order of processing). Per-call state must be set
    up in :meth:`__enter__` so that one handler object can be reused across ``jit`` calls.
    """

    #: handlers that carry per-call state across sites (a trace, a running key) must see every
    #: site at the JAX trace level they were entered at (see :func:`apply_stack`)
    keeps_state: bool = False
    #: how the handler treats the sites of an ``sg.scan`` loop (:mod:`scgjax.control_flow`):
    #: ``"step"``: it acts inside the loop's body, on each step's message (the handler that
    #: :meth:`for_step` returns); ``"stacked"``: it sees each site once, after the loop, stacked
    #: over the steps (a leading time axis). ``None``: ``sg.scan`` refuses to run under it.
    scan_role: str | None = None

    def __init__(self, fn: Callable | None = None):
        self.fn = fn

    def __enter__(self) -> Messenger:
        self._trace_state = jex_core.get_opaque_trace_state(convention="scgjax")
        _HANDLER_STACK.append(self)
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if _HANDLER_STACK and _HANDLER_STACK[-1] is self:
            _HANDLER_STACK.pop()
        elif self in _HANDLER_STACK:  # an exception unwound past inner handlers
            del _HANDLER_STACK[_HANDLER_STACK.index(self) :]

    def process_message(self, msg: Message) -> None:
        """Inspect or rewrite ``msg`` before its default behaviour runs."""

    def postprocess_message(self, msg: Message) -> None:
        """Inspect ``msg`` once its value is known."""

    def for_step(self, step: Any) -> Messenger | None:
        """The handler to install in an ``sg.scan`` body for one step (``scan_role="step"``):
        ``self`` for a stateless handler, or a copy that shares its bookkeeping (both are pushed
        as they are), a fresh handler with ``keeps_state`` (entered inside the body), or
        ``None`` for none. ``step`` is a
        :class:`scgjax.control_flow.ScanStep` (the loop's name, length, step index and key)."""
        return self

    def __call__(self, *args, **kwargs):
        if self.fn is None:
            raise TypeError(f"{type(self).__name__} was built without a function to wrap")
        with self:
            return self.fn(*args, **kwargs)


def apply_stack(msg: Message) -> Message:
    """Send ``msg`` through the active handlers and fill in its default value.

    Handlers are visited innermost first; a handler that sets ``msg["stop"]`` hides the message
    from the handlers outside it (that is how :func:`scgjax.handlers.block` works).
    """
    _check_trace_level(msg)
    _visit(_HANDLER_STACK, msg, _default_value)
    return msg


def _default_value(msg: Message) -> None:
    """Fill in what no handler gave the message, and check a sample site's value."""
    if msg["value"] is None:
        msg["value"] = _DEFAULTS[msg["type"]](msg)
    if msg["type"] == "sample":
        _check_plate_broadcast(msg)
        if (msg["is_observed"] or msg.get("substituted")) and not msg.get("is_factor"):
            _check_observed_value(msg)
        _check_sample_value(msg)


def _visit(stack: list[Messenger], msg: Message,
           between: Callable[[Message], None] | None = None) -> None:
    """``process_message`` innermost first (up to a handler that sets ``stop``), then
    ``between(msg)``, then ``postprocess_message`` of the handlers visited."""
    visited = 0
    for handler in reversed(stack):
        visited += 1
        handler.process_message(msg)
        if msg.get("stop"):
            break
    if between is not None:
        between(msg)
    for handler in stack[len(stack) - visited:]:
        handler.postprocess_message(msg)


def apply_stack_stacked(msg: Message) -> Message:
    """Send a site that ``sg.scan`` has stacked over its steps (its value already set) through
    the active handlers that see stacked sites (``scan_role == "stacked"``), as
    :func:`apply_stack` would."""
    _visit([h for h in _HANDLER_STACK if h.scan_role == "stacked"], msg)
    return msg


def _check_trace_level(msg: Message) -> None:
    """A site inside ``lax.scan``/``vmap``/``jit``/``cond`` *within* the program would hand
    inner-trace values to handlers outside it (numpyro #1685: silently wrong or a leaked
    tracer); raise a clear error instead."""
    if not any(h.keeps_state for h in _HANDLER_STACK):
        return
    here = jex_core.get_opaque_trace_state(convention="scgjax")
    if any(h.keeps_state and h._trace_state != here for h in _HANDLER_STACK):
        raise SiteError(
            msg["name"],
            "is inside a JAX transformation (lax.scan, lax.cond, vmap, jit, ...) that the "
            "program itself applies; scgjax's handlers cannot see through it. Write the loop "
            "with sg.scan (the same signature as lax.scan; credit follows the loop's data "
            "flow), in Python, or use sg.plate",
        )


def check_estimator(name: str, estimator: Any) -> None:
    """Raise a :class:`SiteError` naming the site unless ``estimator`` is ``None`` or an
    estimator *instance* (a class, a string, a baseline are common slips).

    The effect layer knows estimators only by their protocol: an object with ``sample`` and
    ``surrogate_term`` methods (``sg.Estimator`` and its subclasses).

    Example:
        >>> import scgjax as sg
        >>> check_estimator("z", sg.RLOO())
        >>> check_estimator("z", sg.RLOO)
        Traceback (most recent call last):
        ...
        scgjax.errors.SiteError: site 'z' was given the class RLOO ...; did you mean sg.RLOO()?
    """
    if estimator is None or (not isinstance(estimator, type) and _is_estimator(estimator)):
        return
    if isinstance(estimator, type):
        hint = (f"did you mean sg.{estimator.__name__}()?" if _is_estimator(estimator)
                else "pass an estimator instance such as sg.RLOO() or sg.ScoreFunction()")
        raise SiteError(name, f"was given the class {estimator.__name__} as its estimator; "
                        f"{hint}")
    if hasattr(estimator, "init_state") and (hasattr(estimator, "baseline_for")
                                            or callable(estimator)):
        raise SiteError(name, f"was given the baseline {estimator!r} as its estimator; a "
                        "baseline goes inside a score-function estimator: "
                        "estimator=sg.ScoreFunction(baseline=...)")
    raise SiteError(name, f"needs an scgjax estimator (an instance of sg.Estimator such as "
                    f"sg.Pathwise(), sg.ScoreFunction() or sg.RLOO()), got "
                    f"{type(estimator).__name__} {estimator!r}")




def _is_estimator(obj: Any) -> bool:
    return callable(getattr(obj, "sample", None)) and callable(getattr(obj, "surrogate_term",
                                                                       None))


def _default_sample(msg: Message):
    key = msg["kwargs"].get("rng_key")
    if key is None:
        raise SiteError(
            msg["name"],
            "needs a PRNG key to draw a value: run the program under "
            "sg.handlers.seed(fn, rng_key), or inside an objective / sg.SVI",
        )
    return msg["fn"](rng_key=key)


def _default_param(msg: Message):
    init_value = msg["args"][0]
    if callable(init_value):
        key = msg["kwargs"].get("rng_key")
        if key is None:
            raise SiteError(
                msg["name"],
                "has a callable initialiser and needs a PRNG key: run the program under "
                "sg.handlers.seed, or use sg.init_params",
            )
        return init_value(key)
    return init_value


def _default_plate(msg: Message):
    size, subsample_size = msg["args"]
    if subsample_size is None or subsample_size == size:
        return jnp.arange(size)
    key = msg["kwargs"].get("rng_key")
    if key is None:
        raise SiteError(
            msg["name"], "subsamples and needs a PRNG key: run it under sg.handlers.seed"
        )
    return jax.random.permutation(key, size)[:subsample_size]


_DEFAULTS: dict[str, Callable[[Message], Any]] = {
    "scan": lambda msg: None,
    "sample": _default_sample,
    "param": _default_param,
    "plate": _default_plate,
    "deterministic": lambda msg: msg["args"][0],
}


def _check_sample_value(msg: Message) -> None:
    """A value (sampled, observed or replayed) must fit the site's distribution exactly."""
    fn = msg["fn"]
    expected = tuple(fn.batch_shape) + tuple(fn.event_shape)
    shape = tuple(jnp.shape(msg["value"]))
    if msg.get("is_factor"):
        return
    event_ndim = len(fn.event_shape)
    fits = len(shape) <= len(expected)
    if fits:
        try:
            fits = np.broadcast_shapes(shape, expected) == expected
        except ValueError:
            fits = False
    if fits and event_ndim:
        fits = shape[len(shape) - event_ndim :] == tuple(fn.event_shape)
    if not fits:
        what = "observed value" if msg["is_observed"] else "value"
        raise SiteError(
            msg["name"],
            f"has an {what} of shape {shape}, which does not fit its distribution "
            f"{type(fn).__name__} with batch shape {tuple(fn.batch_shape)} and event shape "
            f"{tuple(fn.event_shape)} (plates included)",
        )


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a numpy array when it is a concrete value (not a tracer), else ``None``."""
    if isinstance(x, jax.core.Tracer) or any(
            isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x)):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None  # spread over processes: no process sees it whole (checked in the step)
    try:
        return np.asarray(x)
    except (TypeError, ValueError):
        return None


def describe_bad(bad: np.ndarray) -> str:
    """How many elements of a boolean array are set, and the index of the first (for errors).

    Example:
        >>> describe_bad(np.array([False, True, True]))
        '2 of 3 elements, the first at index (1,)'
    """
    index = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else ()
    return f"{int(bad.sum())} of {bad.size} elements, the first at index {index}"


def _kept_elements(msg: Message, shape: tuple[int, ...]) -> np.ndarray | None:
    """Where the site's elements count (``False`` where masked by ``sg.handlers.mask`` or a
    ``MaskedDistribution``), broadcast to ``shape``; ``None`` when not known concretely."""
    keep = np.ones(shape, bool)
    masks = [msg.get("mask")]
    masks += [d._mask for d in _dist.wrapper_chain(msg["fn"])
              if isinstance(d, _dist.MaskedDistribution)]
    for m in masks:
        if m is None or m is True:
            continue
        m = _concrete(m)
        if m is None:
            return None
        try:
            keep = keep & np.broadcast_to(m.astype(bool), shape)
        except ValueError:
            return None
    return keep


def _check_observed_value(msg: Message) -> None:
    """An observed (or substituted) value that is concrete (data, not a tracer) must be finite
    and lie in the support of the site's distribution; float labels of an integer-valued
    distribution (``Categorical``, ``Poisson``, ...) are cast to ints when they are whole numbers.

    Masked elements are not checked (padding may hold anything). numpyro only checks supports
    with ``validate_args=True``, and scgjax's own ``log_prob`` overrides would otherwise give an
    observed 2 under a Bernoulli a finite log-density.
    """
    fn, name = msg["fn"], msg["name"]
    what = "observed" if msg["is_observed"] else "substituted"
    value = _concrete(msg["value"])
    support = fn.support
    integral = support.is_discrete and not isinstance(support, type(constraints.boolean))
    if value is None:
        if (integral and msg["is_observed"]
                and jnp.issubdtype(jnp.result_type(msg["value"]), jnp.floating)):
            msg["value"] = jnp.asarray(msg["value"]).astype(jnp.int32)
        return
    if value.dtype == object or not np.issubdtype(value.dtype, np.number) and value.dtype != bool:
        raise SiteError(name, f"has an {what} value of dtype {value.dtype}; expected numbers "
                        f"for its {type(fn).__name__} distribution")
    keep = _kept_elements(msg, value.shape)
    if np.issubdtype(value.dtype, np.inexact):
        bad = ~np.isfinite(value)
        if keep is not None:
            bad = bad & keep
        if bad.any():
            raise SiteError(
                name, f"has non-finite {what} values (NaN or inf): {describe_bad(bad)}. Remove "
                "or impute them, or mask them out with sg.handlers.mask",
            )
    if integral and np.issubdtype(value.dtype, np.floating):
        fractional = value != np.round(value)
        if keep is not None:
            fractional = fractional & keep
        if fractional.any():
            raise SiteError(
                name, f"has {what} values that are not whole numbers ({describe_bad(fractional)}),"
                f" but {type(fn).__name__} takes integer values",
            )
        value = value.astype(np.int32)
        msg["value"] = jnp.asarray(value)
    try:
        with jax.ensure_compile_time_eval():  # concrete even while a jitted step is traced
            inside = support(value)
    except Exception:  # a support that cannot be evaluated here: numpyro validates it
        return
    inside = _concrete(inside)
    if inside is None:
        return
    bad = ~inside.astype(bool)
    if keep is not None and keep.ndim > bad.ndim:  # event constraints reduce event dims
        keep = keep.any(axis=tuple(range(bad.ndim, keep.ndim)))
    if keep is not None and keep.shape == bad.shape:
        bad = bad & keep
    if bad.any():
        raise SiteError(
            name, f"has {what} values outside the support {support} of its "
            f"{type(fn).__name__} distribution: {describe_bad(bad)} of its batch shape",
        )


def _check_plate_broadcast(msg: Message) -> None:
    """A batch dimension that no plate declares must not be silently multiplied by a plate.

    The plates of a site expand its distribution to their sizes (see :class:`plate`). When a
    plate has to *broadcast* one of its dimensions (size 1, or missing, in the distribution's
    own batch shape) while the batch shape has a dimension of size > 1 that no plate declares
    to the left of all the site's plates, the site becomes a grid (``Bernoulli(p).expand_by([5])``
    with ``p.shape == (1,)`` inside a plate of 5 draws 5 x 5 values): an error naming the site.
    Undeclared dimensions to the left of the plates whose own dimensions are already full, and
    undeclared dimensions to the right of a plate's (free in Pyro's ``check_site_shape`` too:
    a global latent of another plate, broadcast over the data), stay one block per plate element,
    the documented semantics of dependencies no plate declares.
    """
    frames = msg["cond_indep_stack"]
    if not frames:
        return
    own = msg.get("unplated_batch_shape", tuple(msg["fn"].batch_shape))
    leftmost = min(f.dim for f in frames)
    undeclared = [d for d in range(-len(own), leftmost) if own[d] > 1]
    broadcast = [f for f in frames if f.size > 1 and (-f.dim > len(own) or own[f.dim] == 1)]
    if not undeclared or not broadcast:
        return
    d = undeclared[0]
    raise SiteError(
        msg["name"],
        f"has batch shape {own} whose dim {d} (size {own[d]}) is declared by no plate, and "
        f"the plate '{broadcast[0].name}' broadcasts its dim {broadcast[0].dim} against it: the "
        f"site would become a grid of shape {tuple(msg['fn'].batch_shape)}. Declare that dim "
        "with sg.plate, move it into the event with .to_event(), or remove it",
    )


def new_message(kind: str, name: str, *, fn: Any = None, args: tuple = (),
                kwargs: dict | None = None, value: Any = None, **fields: Any) -> Message:
    """A fresh message of type ``kind`` with every field handlers may read or write."""
    return {
        "type": kind,
        "name": name,
        "fn": fn,
        "args": args,
        "kwargs": {} if kwargs is None else kwargs,
        "value": value,
        "scale": None,
        "mask": None,
        "cond_indep_stack": [],
        "stop": False,
        **fields,
    }


def _check_name(primitive: str, name: Any) -> None:
    """A site's name must be a string (the first argument of every primitive)."""
    if not isinstance(name, str):
        raise TypeError(f"sg.{primitive} takes the site's name (a str) as its first argument, "
                        f"got {type(name).__name__} {name!r}")


def _not_a_distribution(name: str, fn: Any) -> SiteError:
    what = getattr(fn, "__name__", None)
    if isinstance(fn, type) or (callable(fn) and what):
        return SiteError(name, f"was given {what} itself instead of a distribution; call it "
                         f"with its parameters, e.g. dist.{what}(...)")
    return SiteError(name, f"expects a distribution (e.g. dist.Normal(0.0, 1.0)), got "
                     f"{type(fn).__name__}")


def sample(
    name: str,
    fn: Distribution,
    obs: Any = None,
    *,
    estimator: Any = None,
    infer: dict | None = None,
) -> jax.Array:
    """A random choice: draw from ``fn`` (or score ``obs``) and return the value.

    Args:
        name: the site's name, unique within a program.
        fn: a ``numpyro.distributions`` distribution (``scgjax.dist``).
        obs: observed data; the site is then a cost node ``log fn(obs)`` instead of a latent.
        estimator: how objectives estimate the gradient through this site (e.g.
            ``sg.Pathwise()``, ``sg.ScoreFunction()``, ``sg.RLOO()``); ``None`` picks the default
            (pathwise for reparameterisable distributions, score function otherwise). It must
            be an :class:`~scgjax.Estimator` instance (the class ``sg.RLOO`` is an error); on
            an observed site, objectives ignore it and warn.
        infer: NumPyro's per-site inference options, a dict. ``{"enumerate": "parallel"}`` on
            a discrete latent site of a *model* that the guide does not sample sums it out
            exactly (``log sum_z p(x, z, ...)``, per plate element); in a single program
            (``sg.Expectation``) it enumerates the site (``sg.Enumerate()``). Other keys are
            ignored with a warning.

    Example:
        >>> import jax, scgjax as sg
        >>> from scgjax import dist
        >>> sg.handlers.seed(lambda: sg.sample("x", dist.Normal(0.0, 1.0)), 0)().shape
        ()
    """
    _check_name("sample", name)
    if not isinstance(fn, Distribution):
        raise _not_a_distribution(name, fn)
    check_estimator(name, estimator)
    infer = _check_infer(name, infer)
    fn = _dist.fix_known_bugs(fn)
    msg = new_message("sample", name, fn=fn, kwargs={"rng_key": None}, value=obs,
                      is_observed=obs is not None, estimator=estimator, infer=infer)
    return apply_stack(msg)["value"]


#: the ``infer`` keys scgjax acts on, and their allowed values
_INFER_KEYS = {"enumerate": ("parallel", None)}


def _check_infer(name: str, infer: Any) -> dict:
    """``infer`` as a dict; a :class:`SiteError` naming the site for a bad value, a warning
    for a key scgjax ignores (NumPyro's other options)."""
    if infer is None:
        return {}
    if not isinstance(infer, dict):
        raise SiteError(name, f"has infer={infer!r}; infer is a dict of inference options, "
                        "e.g. infer={'enumerate': 'parallel'}")
    for key, value in infer.items():
        if key not in _INFER_KEYS:
            warnings.warn(f"site '{name}': infer key {key!r} is ignored by scgjax (it acts "
                          f"on {sorted(_INFER_KEYS)})", UserWarning, stacklevel=3)
        elif value not in _INFER_KEYS[key]:
            raise SiteError(name, f"has infer={{{key!r}: {value!r}}}; scgjax supports "
                            f"{key!r} in {_INFER_KEYS[key]} (parallel enumeration)")
    return dict(infer)


def param(
    name: str,
    init_value: Any = None,
    constraint: constraints.Constraint | None = constraints.real,
) -> Any:
    """A trainable parameter; returns its (constrained) value.

    Params are stored *unconstrained*: ``sg.init_params`` returns
    ``biject_to(constraint).inv(init_value)`` and objectives map stored values back through
    ``biject_to(constraint)``. ``init_value`` may be an array, a pytree (e.g. flax parameters,
    with the ``real`` constraint), or a callable ``rng_key -> value``. ``constraint`` is a
    numpyro constraint (``None`` means ``constraints.real``); anything else, such as the string
    ``"positive"``, or a constraint without a bijection from the reals, is a
    :class:`~scgjax.errors.SiteError` naming the param.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax.dist import constraints
        >>> float(sg.handlers.seed(lambda: sg.param("s", 2.0, constraints.positive), 0)())
        2.0
    """
    _check_name("param", name)
    constraint = _check_constraint(name, constraint)
    init_value = _as_float_init(name, init_value)
    msg = new_message("param", name, args=(init_value,),
                      kwargs={"rng_key": None, "constraint": constraint})
    value = apply_stack(msg)["value"]
    if value is None:
        raise SiteError(name, "is a param without a value: give sg.param an init_value (an "
                        "array, or a function rng_key -> array), or give it a value in params")
    return value


def _as_float_init(name: str, init_value: Any) -> Any:
    """Python ints and (nested) lists of numbers as float arrays: a param is trained by
    gradients, so an int ``0`` or a list ``[0., 1.]`` (which JAX cannot add to a tracer) would
    fail deep inside the step. Arrays, pytrees and callables are kept as they are."""
    if isinstance(init_value, (bool, np.bool_)):
        raise SiteError(name, f"is a param initialised to the bool {init_value!r}; params are "
                        "real-valued (use 0.0 or 1.0)")
    numbers = isinstance(init_value, (int, np.integer)) or (
        isinstance(init_value, list)
        and all(isinstance(x, (int, float)) for x in jax.tree.leaves(init_value)))
    if numbers:  # a list of arrays stays a pytree
        return jnp.asarray(init_value, dtype=jnp.result_type(float))
    return init_value


def _check_constraint(name: str, constraint: Any) -> constraints.Constraint:
    """``constraint`` as a numpyro constraint with a bijection from the reals (``None`` is
    ``constraints.real``); a :class:`SiteError` naming the param otherwise."""
    if constraint is None:
        return constraints.real
    if not isinstance(constraint, constraints.Constraint):
        hint = "constraints.positive"
        if isinstance(constraint, str):
            known = getattr(constraints, constraint, None)
            if isinstance(known, constraints.Constraint):
                hint = f"constraints.{constraint}"
        elif isinstance(constraint, type):
            hint = "an instance such as constraints.positive"
        raise SiteError(name, f"is a param whose constraint must be a numpyro constraint (from "
                        f"scgjax.dist import constraints), got {type(constraint).__name__} "
                        f"{constraint!r}; did you mean {hint}?")
    if constraint is not constraints.real:
        try:
            _dist.biject_to(constraint)
        except NotImplementedError:
            raise SiteError(name, f"is a param with constraint {constraint}, which has no "
                            "bijection from the reals, so it cannot be trained") from None
    return constraint


def _numeric(name: str, what: str, value: Any, allow_int: bool) -> jax.Array:
    """``value`` as a real (float, or int with ``allow_int``) JAX array; a :class:`SiteError`
    naming the site for anything else (a string, ``None``, a dict, a complex or bool array)."""
    try:
        bad = value is None or isinstance(value, (str, bytes, dict))
        array = None if bad else jnp.asarray(value)
    except (TypeError, ValueError):
        array = None
    if array is None:
        raise SiteError(name, f"is {what} and needs a real-valued array, got "
                        f"{type(value).__name__} {value!r:.80}")
    dtype = array.dtype
    if jnp.issubdtype(dtype, jnp.bool_):
        raise SiteError(name, f"is {what} with a boolean value, which is ambiguous: for a hard "
                        "constraint write jnp.where(cond, 0.0, -jnp.inf), for a reward or count "
                        "cond.astype(float)")
    if not (jnp.issubdtype(dtype, jnp.floating)
            or (allow_int and jnp.issubdtype(dtype, jnp.integer))):
        raise SiteError(name, f"is {what} and needs a real-valued array, got dtype {dtype}")
    return array


def factor(name: str, log_factor: Any) -> None:
    """Add ``log_factor`` (an array; one element per plate element) to the objective.

    A factor is a cost node: objectives maximise the expected sum of factors and log-densities.
    Inside plates, ``log_factor`` must have the plates' batch shape (or broadcast to it). It
    must be real (float or int); a boolean, complex or non-numeric value is a
    :class:`~scgjax.errors.SiteError` (a boolean could mean a hard constraint or a 0/1 reward:
    write ``jnp.where(cond, 0.0, -jnp.inf)`` or ``cond.astype(float)``).

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> tr = sg.handlers.trace(lambda: sg.factor("bonus", jnp.array(1.5))).get_trace()
        >>> float(tr["bonus"]["fn"].log_prob(tr["bonus"]["value"]))
        1.5
    """
    _check_name("factor", name)
    log_factor = _numeric(name, "a factor", log_factor, allow_int=True)
    if not jnp.issubdtype(log_factor.dtype, jnp.floating):
        log_factor = log_factor.astype(jnp.result_type(float))
    msg = new_message("sample", name, fn=_dist.Unit(log_factor), kwargs={"rng_key": None},
                      value=jnp.zeros(jnp.shape(log_factor) + (0,)), is_observed=True,
                      is_factor=True, estimator=None)
    apply_stack(msg)


def deterministic(name: str, value: Any) -> Any:
    """Record a deterministic function of other sites in the trace, and return it.

    ``value`` is an array (or a pytree of arrays); a string, ``None`` or another object is a
    :class:`~scgjax.errors.SiteError` naming the site.

    Example:
        >>> import scgjax as sg
        >>> sg.handlers.trace(lambda: sg.deterministic("d", 3.0)).get_trace()["d"]["value"]
        3.0
    """
    _check_name("deterministic", name)
    leaves = jax.tree.leaves(value)
    for leaf in leaves:
        ok = isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex))
        if ok and isinstance(getattr(leaf, "dtype", None), np.dtype):
            ok = leaf.dtype.kind not in "OUSV"  # not object, string or raw bytes
        if not ok:
            raise SiteError(name, f"is a deterministic site and needs an array (or a pytree of "
                            f"arrays), got {type(leaf).__name__} {leaf!r:.80}")
    if not leaves:
        raise SiteError(name, f"is a deterministic site and needs an array, got {value!r:.80}")
    msg = new_message("deterministic", name, args=(value,))
    return apply_stack(msg)["value"]


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class plate(Messenger):
    """Declare ``size`` conditionally independent copies along batch dimension ``dim``.

    Sites inside the context get the plate's batch dimension (distributions are broadcast to
    it); objectives assign credit element by element along it. With ``subsample_size`` the plate
    draws that many indices at random (returned by ``__enter__``), and the log-densities of the
    sites inside are scaled by ``size / subsample_size`` so that the objective stays unbiased.

    Example:
        >>> import jax, scgjax as sg
        >>> from scgjax import dist
        >>> def model():
        ...     with sg.plate("data", 100, subsample_size=10) as idx:
        ...         return idx, sg.sample("z", dist.Normal(0.0, 1.0))
        >>> idx, z = sg.handlers.seed(model, 0)()
        >>> idx.shape, z.shape
        ((10,), (10,))
    """

    scan_role = "step"  # a plate around sg.scan shapes each step's sites

    def __init__(self, name: str, size: int, dim: int | None = None,
                 subsample_size: int | None = None):
        super().__init__()
        if not isinstance(name, str):
            raise TypeError(f"a plate's name must be a str, got {name!r}; write "
                            "sg.plate(name, size)")
        if not _is_int(size) or size < 1:
            raise SiteError(name, f"is a plate and needs a positive int size, got {size!r}")
        if subsample_size is not None and (not _is_int(subsample_size)
                                           or not 1 <= subsample_size <= size):
            raise SiteError(
                name, f"has subsample_size {subsample_size!r}, which is not an int in "
                f"[1, {size}]",
            )
        if dim is not None and (not _is_int(dim) or dim >= 0):
            raise SiteError(name, f"is a plate and needs a negative int dim, got {dim!r}")
        self.name = name
        self.size = int(size)
        self.subsample_size = None if subsample_size is None else int(subsample_size)
        self.dim = dim
        self._frame: CondIndepFrame | None = None

    def __enter__(self) -> jax.Array:
        used = {h._frame.dim for h in _HANDLER_STACK if isinstance(h, plate) and h._frame}
        names = {h.name for h in _HANDLER_STACK if isinstance(h, plate) and h._frame}
        if self.name in names:
            raise SiteError(self.name, "is a plate nested inside a plate of the same name")
        if self.dim is None:
            dim = -1
            while dim in used:
                dim -= 1
        elif self.dim in used:
            raise SiteError(self.name, f"asks for dim {self.dim}, taken by an enclosing plate")
        else:
            dim = self.dim
        msg = new_message("plate", self.name, args=(self.size, self.subsample_size),
                          kwargs={"rng_key": None})
        indices = apply_stack(msg)["value"]
        n = int(jnp.shape(indices)[0])
        self._frame = CondIndepFrame(self.name, dim, n, self.size)
        super().__enter__()
        return indices

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        self._frame = None

    def process_message(self, msg: Message) -> None:
        if msg["type"] not in ("sample", "deterministic") or self._frame is None:
            return
        frame = self._frame
        msg["cond_indep_stack"] = [*msg["cond_indep_stack"], frame]
        if frame.size != frame.full_size:
            ratio = frame.full_size / frame.size
            msg["scale"] = ratio if msg["scale"] is None else msg["scale"] * ratio
        if msg["type"] != "sample":
            return
        fn = msg["fn"]
        batch = tuple(fn.batch_shape)
        ndim = max(len(batch), -frame.dim)
        batch = (1,) * (ndim - len(batch)) + batch
        here = batch[frame.dim]
        if here not in (1, frame.size):
            raise SiteError(
                msg["name"],
                f"has batch shape {tuple(fn.batch_shape)} whose dim {frame.dim} is {here}, but "
                f"the enclosing plate '{frame.name}' has size {frame.size}",
            )
        if here != frame.size or len(batch) != len(fn.batch_shape):
            msg.setdefault("unplated_batch_shape", tuple(fn.batch_shape))
            new_batch = list(batch)
            new_batch[frame.dim] = frame.size
            msg["fn"] = fn.expand(tuple(new_batch))


def module(name: str, nn_module: Any, *example_inputs: Any) -> Callable:
    """Register a flax module's parameters as one param of the program; return its apply.

    Works with ``flax.linen`` modules (initialised from ``example_inputs`` with a key from
    :func:`scgjax.handlers.seed`) and ``flax.nnx`` modules (already initialised; their
    ``nnx.Param`` variables become the param). The returned callable runs the module with the
    current value of the param, so gradients of an objective reach the network's weights.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, scgjax as sg
        >>> def prog(x):
        ...     return sg.module("net", nn.Dense(2), x)(x)
        >>> sg.handlers.seed(prog, 0)(jnp.ones(3)).shape
        (2,)
    """
    from flax import errors as flax_errors
    from flax import linen, nnx

    _check_name("module", name)
    if isinstance(nn_module, type):
        raise SiteError(name, f"was given the class {nn_module.__name__}; pass a module "
                        f"instance, e.g. {nn_module.__name__}(...)")
    if isinstance(nn_module, linen.Module):
        def init(rng_key):
            try:
                variables = nn_module.init(rng_key, *example_inputs)
            except SiteError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with the site's name
                shapes = [jax.tree.map(jnp.shape, x) for x in example_inputs]
                given = (f"the example inputs of shapes {shapes}" if example_inputs else
                         "no example inputs (write sg.module(name, module, x) with an x "
                         "shaped like the module's input)")
                raise SiteError(name, f"is a linen module whose init failed with {given}: "
                                f"{type(e).__name__}: {e}") from e
            extra = sorted(set(variables) - {"params"})
            if extra:
                raise SiteError(
                    name,
                    f"is a linen module with mutable collections {extra}; only 'params' is "
                    "supported (use nnx for stateful layers)",
                )
            return variables["params"]

        weights = param(name, init)

        def apply(*args, **kwargs):
            try:
                return nn_module.apply({"params": weights}, *args, **kwargs)
            except flax_errors.FlaxError as e:
                shapes = [jax.tree.map(jnp.shape, x) for x in args]
                raise SiteError(name, f"is a linen module called with inputs of shapes "
                                f"{shapes} that do not fit its weights "
                                f"{jax.tree.map(jnp.shape, weights)} (set by its example "
                                f"inputs or by params): {type(e).__name__}: {e}") from e

        return apply
    if isinstance(nn_module, nnx.Module):
        graphdef, weights, rest = nnx.split(nn_module, nnx.Param, ...)
        weights = param(name, weights)
        return lambda *args, **kwargs: nnx.merge(graphdef, weights, rest)(*args, **kwargs)
    raise SiteError(name, f"expects a flax linen or nnx module, got {type(nn_module).__name__}")
