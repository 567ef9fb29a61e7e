"""Initial parameters of a program: collect every ``sg.param`` and ``sg.module``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from numpyro.distributions import biject_to, constraints

from scgjax import handlers
from scgjax.errors import SiteError

__all__ = ["init_params", "constrain_params", "param_labels", "split_static", "strong_types"]


def init_params(rng_key: Any, model: Callable, guide: Callable | None = None, *args,
                **kwargs) -> dict[str, Any]:
    """Run ``guide`` then ``model`` (replayed at the guide's latents) and return their params.

    Values are *unconstrained*: a param declared with ``constraint`` is stored as
    ``biject_to(constraint).inv(value)``; flax modules contribute their weight pytrees. Pass
    ``guide=None`` for a single program (``sg.Expectation``).

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> from scgjax.dist import constraints
        >>> def model():
        ...     s = sg.param("scale", 2.0, constraints.positive)
        ...     sg.sample("x", dist.Normal(0.0, s), obs=1.0)
        >>> params = sg.init_params(0, model)
        >>> round(float(params["scale"]), 4)  # log(2)
        0.6931
    """
    check_programs(model, guide)
    arrays, rebuild = split_static((args, kwargs))

    def build() -> Callable:
        # the params whose initial value is only known inside the jitted run (an initialiser
        # function, a value computed from the arguments): name -> constraint, checked on the
        # host once the values are back; constant initial values are checked while tracing
        traced: dict[str, Any] = {}

        @jax.jit
        def initialise(key, arrays):
            a, kw = rebuild(arrays)
            sites, traces = _param_messages(key, model, guide, None, a, kw)
            values = {}
            traced.clear()
            for n, m in sites.items():
                constraint = m["kwargs"]["constraint"]
                if _is_concrete(m["value"]):
                    check_initial_value(n, m["value"], constraint)
                else:
                    traced[n] = constraint
                    if constraint is not constraints.real:
                        values[n] = m["value"]
            out = {n: _unconstrain(m) for n, m in sites.items()}
            estimator = _estimator_params(jax.random.fold_in(key, 2), traces)
            traced.update(dict.fromkeys(estimator, None))
            out.update(estimator)
            # one flag per traced param, so that big weights are not copied to the host
            finite = {n: _all_finite(out[n]) for n in traced if n not in values}
            return out, values, finite

        def run(key, arrays):
            out, values, finite = initialise(key, arrays)
            if _is_concrete(out):
                bad = [n for n, ok in jax.device_get(finite).items() if not ok]
                _check_traced_initial_values(out, values, {n: traced[n] for n in traced
                                                           if n in values or n in bad})
            return out

        return run

    # one compiled initialiser per (model, guide, non-array arguments): SVI.init, graph() and
    # repeated calls do not trace and compile the programs again
    initialise = cached_build(("init_params", model, guide, rebuild.signature), build)
    return strong_types(initialise(handlers.as_prng_key(rng_key), arrays))


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (a scalar, traceable)."""
    jnp = jax.numpy
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _is_concrete(tree: Any) -> bool:
    """Whether every leaf of ``tree`` holds a value (no leaf is a JAX tracer)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _first_nonfinite(a: np.ndarray) -> str:
    """``"nan at index (2,)"``: the first non-finite element of ``a`` (``"nan"`` for a
    scalar)."""
    bad = np.argwhere(~np.isfinite(a))[0]
    where = f" at index {tuple(int(i) for i in bad)}" if a.ndim else ""
    return f"{a[tuple(bad)].item()}{where}"


def _show(a: np.ndarray) -> str:
    """A short rendering of a value for an error message."""
    if a.size <= 8:
        return np.array2string(a, precision=4, separator=", ") if a.ndim else repr(a.item())
    return f"an array of shape {a.shape}"


def _nonfinite_leaf(value: Any) -> tuple[str, np.ndarray] | None:
    """``(path, leaf)`` of the first floating-point leaf of ``value`` with a NaN or inf."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
        dtype = jax.numpy.result_type(leaf)
        if not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            continue
        a = np.asarray(leaf)
        if not np.isfinite(a).all():
            return jax.tree_util.keystr(path), a
    return None


def check_initial_value(name: str, value: Any, constraint: Any) -> None:
    """Raise a :class:`~scgjax.errors.SiteError` naming param ``name`` if its (concrete,
    constrained) initial ``value`` is not finite, lies outside ``constraint``, or on its
    boundary (where the unconstrained value is infinite).

    A value outside the constraint is one that ``constraint.check`` rejects and that the
    round trip ``biject_to(constraint)(biject_to(constraint).inv(value))`` does not give back
    (so rounding, e.g. a simplex summing to ``1 + 1e-7``, is accepted).

    Example:
        >>> from numpyro.distributions import constraints
        >>> check_initial_value("s", 2.0, constraints.positive)  # fine
        >>> check_initial_value("s", -1.0, constraints.positive)
        Traceback (most recent call last):
        ...
        scgjax.errors.SiteError: site 's' is a param initialised to -1.0, outside its \
constraint Positive(lower_bound=0.0); give it an initial value inside the constraint
    """
    bad = _nonfinite_leaf(value)
    if bad is not None:
        path, a = bad
        raise SiteError(name, f"is a param whose initial value{' ' + path if path else ''} is "
                        f"not finite ({_first_nonfinite(a)}); give it a finite initial value "
                        "(if it comes from an initialiser function, check that function)")
    if constraint is constraints.real or constraint is None:
        return
    with jax.ensure_compile_time_eval():
        v = jax.numpy.asarray(value)
        try:
            inside = np.asarray(constraint.check(v))
            u = np.asarray(biject_to(constraint).inv(v))
            back = np.asarray(biject_to(constraint)(u))
        except (TypeError, ValueError, NotImplementedError):  # a value it cannot judge
            return
    v = np.asarray(v)
    finite = np.isfinite(u).all()
    if not inside.all() and not (finite and np.allclose(back, v, rtol=1e-4, atol=1e-6)):
        where = ""
        if inside.ndim and v.size > 1:
            first = tuple(int(i) for i in np.argwhere(~inside)[0])
            where = f" (element {first} fails it)"
        raise SiteError(name, f"is a param initialised to {_show(v)}, outside its constraint "
                        f"{constraint!r}{where}; give it an initial value inside the constraint")
    if not finite:
        raise SiteError(name, f"is a param initialised to {_show(v)}, on the boundary of its "
                        f"constraint {constraint!r}, where its unconstrained value is not "
                        f"finite ({_first_nonfinite(u)}); start strictly inside the constraint")


def _check_traced_initial_values(out: dict, values: dict, traced: dict) -> None:
    """The host-side checks of :func:`init_params` for the params whose initial values were
    computed inside the jitted initialiser (``values``: their constrained values, for the
    params with a constraint; the others' are their entries of ``out``)."""
    for name, constraint in traced.items():
        if name not in out:  # traced for other shapes of the arguments
            continue
        if name in values:
            check_initial_value(name, values[name], constraint)
            continue
        bad = _nonfinite_leaf(out[name])
        if bad is None:
            continue
        path, a = bad
        what = "an estimator param" if constraint is None else "a param"
        raise SiteError(name, f"is {what} whose initial value{' ' + path if path else ''} is "
                        f"not finite ({_first_nonfinite(a)}); give it a finite initial value "
                        "(if it comes from an initialiser function, check that function)")


def check_programs(model: Any, guide: Any = None) -> None:
    """``model`` (and ``guide``, unless ``None``) must be callable programs: a clear
    ``TypeError`` for data or a key passed where a program goes (a common argument-order slip)."""
    for role, fn in (("model", model), ("guide", guide)):
        if fn is None and role == "guide":
            continue
        if not callable(fn):
            raise TypeError(
                f"{role} must be a program (a Python function), got {type(fn).__name__}; "
                "the order is init_params(rng_key, model, guide, *args)"
            )


_BUILT: dict[Any, Any] = {}
_MAX_BUILT = 64


def cached_build(key: Any, build: Callable[[], Any]) -> Any:
    """``build()``, kept under ``key`` so that a later call with an equal key reuses it (e.g.
    a jitted function, which then compiles once). A key that cannot be hashed (an argument
    holding an array, say) is built every time. At most 64 are kept, the oldest dropped."""
    try:
        hash(key)
    except TypeError:
        return build()
    if key not in _BUILT:
        if len(_BUILT) >= _MAX_BUILT:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = build()
    return _BUILT[key]


def param_labels(model: Callable, guide: Callable | None = None, *args, rng_key: Any = 0,
                 **kwargs) -> dict[str, str]:
    """Who owns each param: ``"model"`` (θ), ``"guide"`` (φ) or ``"shared"``, per top-level key
    of :func:`init_params`'s dict, ready to be optax's ``param_labels``.

    A param or module used by both programs is ``"shared"``; estimator params
    (``"<site>$<key>"``: baselines, control-variate coefficients) belong to the inference
    side, ``"guide"``. Without a guide every param is ``"model"``. Nothing is computed: the
    programs are traced abstractly.

    Example: Adam with different rates for the model and the guide.

        >>> import optax, scgjax as sg
        >>> from scgjax import dist
        >>> def model(x):
        ...     z = sg.sample("z", dist.Normal(sg.param("prior_loc", 0.0), 1.0))
        ...     sg.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     sg.sample("z", dist.Normal(sg.param("q_loc", 0.0), 1.0))
        >>> labels = sg.param_labels(model, guide, 1.0)
        >>> labels
        {'q_loc': 'guide', 'prior_loc': 'model'}
        >>> tx = optax.multi_transform({"model": optax.adam(1e-3), "guide": optax.adam(1e-2)},
        ...                            labels)
    """
    arrays, rebuild = split_static((args, kwargs))
    owners: dict[str, set[str]] = {}

    def record(key, arrays):
        a, kw = rebuild(arrays)
        _, traces = _param_messages(key, model, guide, None, a, kw)
        roles = ("guide", "model") if guide is not None else ("model",)
        for role, tr in zip(roles, traces, strict=True):
            for name in _param_sites(tr):
                owners.setdefault(name, set()).add(role)
        for name in _estimator_params(key, traces):
            owners.setdefault(name, set()).add(roles[0])

    jax.eval_shape(record, handlers.as_prng_key(rng_key), arrays)
    return {name: roles.pop() if len(roles) == 1 else "shared"
            for name, roles in owners.items()}


def strong_types(tree: Any) -> Any:
    """Every leaf as a JAX array with a definite dtype (no Python scalars, no weak types), so
    that a jitted step sees the same types on its first call as on every later one."""
    return jax.tree.map(lambda v: jax.numpy.asarray(v, dtype=jax.numpy.result_type(v)), tree)


def split_static(tree: Any) -> tuple[list, Callable[[list], Any]]:
    """Split a pytree into its array leaves and a function that rebuilds it from them (the
    other leaves, such as Python ints, strings or callables, are kept as they are).

    ``rebuild.signature`` is the tree structure and the static leaves: two trees with equal
    signatures differ only in their arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

    def rebuild(arrays: list) -> Any:
        it = iter(arrays)
        return jax.tree.unflatten(treedef, [next(it) if d else x
                                            for x, d in zip(leaves, dynamic, strict=True)])

    # what identifies ``rebuild`` (a cache key; hashable when the static leaves are)
    rebuild.signature = (treedef, tuple(None if d else (x,) for x, d in
                                        zip(leaves, dynamic, strict=True)))
    return [x for x, d in zip(leaves, dynamic, strict=True) if d], rebuild


def _estimator_params(rng_key: jax.Array, traces: list[dict]) -> dict[str, Any]:
    """Trainable parameters of the estimators chosen at sample sites, as ``"<site>$<key>"``."""
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for tr in traces:
        for name, msg in tr.items():
            est = msg.get("estimator") if msg["type"] == "sample" else None
            if est is None or name in seen:
                continue
            seen.add(name)
            key = jax.random.fold_in(rng_key, len(seen))
            for k, v in est.init_params(key, msg).items():
                out[f"{name}${k}"] = v
    return out


def _param_messages(rng_key: Any, model: Callable, guide: Callable | None, params: dict | None,
                    args: tuple, kwargs: dict) -> tuple[dict[str, dict], list[dict]]:
    """Every param site of ``guide`` then ``model`` (replayed at the guide's latents), and the
    traces (guide first)."""
    key_guide, key_model = jax.random.split(handlers.as_prng_key(rng_key))

    plate_sizes: dict[str, tuple] = {}  # one plate name, one size, in the guide and the model

    def prepare(fn, key, role):
        if params is not None:
            fn = handlers.substitute_unconstrained(fn, params)
        return handlers.seed(handlers.same_plate_sizes(fn, plate_sizes, role), key)

    sites: dict[str, Any] = {}
    traces = []
    model_fn = prepare(model, key_model, "model")
    if guide is not None:
        guide_tr = handlers.trace(prepare(guide, key_guide, "guide")).get_trace(*args, **kwargs)
        sites.update(_param_sites(guide_tr))
        traces.append(guide_tr)
        model_fn = handlers.replay(model_fn, guide_tr)
    model_tr = handlers.trace(model_fn).get_trace(*args, **kwargs)
    traces.append(model_tr)
    for name, msg in _param_sites(model_tr).items():
        if name in sites:
            old = jax.tree.map(jax.numpy.shape, sites[name]["value"])
            new = jax.tree.map(jax.numpy.shape, msg["value"])
            if old != new:
                raise SiteError(name, f"is a param declared with shape {old} in the guide and "
                                f"{new} in the model")
            guide_c, model_c = (m["kwargs"]["constraint"] for m in (sites[name], msg))
            if not handlers.same_constraint(guide_c, model_c):
                raise SiteError(name, f"is a param declared with constraint {guide_c} in the "
                                f"guide and {model_c} in the model; one stored value cannot "
                                "serve both: give both declarations the same constraint")
        else:
            sites[name] = msg
    return sites, traces


def _param_sites(tr: dict) -> dict:
    return {n: m for n, m in tr.items() if m["type"] == "param"}


def _unconstrain(msg: dict) -> Any:
    constraint = msg["kwargs"]["constraint"]
    if constraint is constraints.real:
        return msg["value"]
    return biject_to(constraint).inv(msg["value"])


def constrain_params(params: dict[str, Any], model: Callable, guide: Callable | None = None,
                     *args, rng_key: Any = 0, **kwargs) -> dict[str, Any]:
    """The constrained values of ``params`` (what ``sg.param`` returns inside the program).

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax.dist import constraints
        >>> model = lambda: sg.param("s", 1.0, constraints.positive)
        >>> round(float(sg.constrain_params({"s": jnp.log(3.0)}, model)["s"]), 4)
        3.0
    """
    sites, _ = _param_messages(rng_key, model, guide, params, args, kwargs)
    return {name: msg["value"] for name, msg in sites.items()}
