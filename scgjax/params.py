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
    arrays, rebuild = split_static((args, kwargs))

    def build() -> Callable:
        @jax.jit
        def initialise(key, arrays):
            a, kw = rebuild(arrays)
            sites, traces = _param_messages(key, model, guide, None, a, kw)
            out = {n: _unconstrain(m) for n, m in sites.items()}
            out.update(_estimator_params(jax.random.fold_in(key, 2), traces))
            return out

        return initialise

    # one compiled initialiser per (model, guide, non-array arguments): SVI.init, graph() and
    # repeated calls do not trace and compile the programs again
    initialise = cached_build(("init_params", model, guide, rebuild.signature), build)
    return strong_types(initialise(handlers.as_prng_key(rng_key), arrays))


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

    def prepare(fn, key):
        if params is not None:
            fn = handlers.substitute_unconstrained(fn, params)
        return handlers.seed(fn, key)

    sites: dict[str, Any] = {}
    traces = []
    model_fn = prepare(model, key_model)
    if guide is not None:
        guide_tr = handlers.trace(prepare(guide, key_guide)).get_trace(*args, **kwargs)
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
