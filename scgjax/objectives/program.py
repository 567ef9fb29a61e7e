"""Running a program for an objective, and reading its stochastic computation graph.

Two shapes of program are supported, and every objective is built on one of them:

- **guided** (``ELBO``, ...): the guide samples the latent sites, the model is replayed at the
  guide's values. Stochastic nodes are the guide's latent sites; costs are every model site's
  log-density (latent, observed, factors) and minus every guide site's log-density.
- **single** (``Expectation``): one program samples its latents; costs are its observed sites
  and factors (the objective is ``E[sum of factors and observed log-densities]``).

:func:`analyse` finds the graph *without running anything*: one abstract pass
(``jax.eval_shape``) records the sites, and one pass traced to a jaxpr with the latent values as
inputs gives the data flow from every latent to every log-density (:mod:`scgjax.provenance`).
Both happen while the objective is being traced, so a jitted step does none of this work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import biject_to

from scgjax import handlers
from scgjax.errors import SiteError
from scgjax.estimators import default_estimator
from scgjax.estimators.base import check_estimator, magic_box
from scgjax.params import init_params, split_static
from scgjax.primitives import Message, Messenger
from scgjax.provenance import dependencies
from scgjax.scg import SCG, CostNode, Plate, node_from_message, to_canonical

GUIDED = "guided"
SINGLE = "single"


class estimate(Messenger):
    """Resolve each sampled site's estimator (its own, or the default), let it transform the
    distribution and draw the value; optionally add a zero-valued ``probe`` to the value, the
    input through which objectives differentiate costs with respect to it. Internal to
    objectives.
    """

    def __init__(self, fn: Callable | None = None, num_particles: int = 1,
                 probes: dict | None = None, enum_index: dict | None = None,
                 default: Callable = default_estimator):
        super().__init__(fn)
        self.num_particles = num_particles
        self.default = default
        self.probes = probes or {}
        self.enum_index = enum_index or {}

    def process_message(self, msg: Message) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        est = msg.get("estimator")
        if est is None:
            est = self.default(msg["fn"], self.num_particles)
            check_estimator(msg["name"], est)  # an objective's own default_estimator
        est.validate(msg["name"], msg["fn"], self.num_particles)
        if not est.reparameterised and _is_delta(msg["fn"]):
            raise SiteError(
                msg["name"], f"is a Delta (a point mass) with {type(est).__name__}, which "
                "differentiates its log-density, constant at the point: the gradient would be "
                "0. Use estimator=sg.Pathwise() (the value carries the gradient)",
            )
        if getattr(est, "enumerates", False):
            _check_enumerated_batch(msg)
        msg["fn"] = est.transform_fn(msg["fn"])
        msg["estimator"] = est
        msg["estimator_active"] = True
        if msg["name"] in self.enum_index and msg["value"] is None:
            fn = msg["fn"]
            support = fn.enumerate_support(expand=False)[self.enum_index[msg["name"]]]
            msg["value"] = jnp.broadcast_to(support, fn.batch_shape)

    def postprocess_message(self, msg: Message) -> None:
        if msg["type"] == "sample" and msg["name"] in self.probes:
            msg["value"] = msg["value"] + self.probes[msg["name"]]


def _is_delta(fn: Any) -> bool:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__ == "Delta"


def _check_enumerated_batch(msg: Message) -> None:
    """Enumeration sets every element of a site to one support value per configuration, which
    is exact only along plates (element ``n`` of a cost depends on element ``n`` alone): a batch
    dimension of size > 1 that no plate declares would be enumerated jointly as if all its
    elements were equal, a wrong number. Refuse it, naming the site."""
    batch = tuple(msg["fn"].batch_shape)
    dims = {f.dim for f in msg["cond_indep_stack"]}
    free = [d for d in range(-len(batch), 0) if d not in dims and batch[d] > 1]
    if free:
        raise SiteError(
            msg["name"], f"uses Enumerate, but its batch shape {batch} has dim {free[0]} (size "
            f"{batch[free[0]]}) that no plate declares; enumeration is exact per plate element "
            "only: declare that dim with sg.plate",
        )


class transform_like(Messenger):
    """Give the model's sites the distribution transform of the guide's estimator for the same
    name (a relaxation must score the relaxed value under a relaxed model density too)."""

    def __init__(self, fn: Callable | None = None, guide_trace: dict | None = None):
        super().__init__(fn)
        self.guide_trace = guide_trace or {}

    def process_message(self, msg: Message) -> None:
        other = self.guide_trace.get(msg["name"])
        if msg["type"] == "sample" and other is not None and other.get("estimator"):
            msg["fn"] = other["estimator"].transform_fn(msg["fn"])


def run(kind: str, rng_key: jax.Array, params: dict, programs: tuple, args: tuple,
        kwargs: dict, num_particles: int, values: dict | None = None,
        probes: dict | None = None, enum_index: dict | None = None,
        default: Callable = default_estimator) -> dict[str, dict]:
    """Run the program(s) once; return the traces by role (``guide``/``model`` or
    ``program``). ``values`` substitutes the sampled latents (for the data-flow pass);
    ``probes`` are added to the sampled values and ``enum_index`` picks the support value of
    enumerated sites; ``default(fn, K)`` chooses the estimator of sites that name none (see
    :class:`estimate`)."""

    plate_sizes: dict[str, tuple] = {}

    def prepare(fn, key, role):
        fn = handlers.substitute_unconstrained(fn, params)
        if values is not None:
            fn = handlers.substitute(fn, values)
        return handlers.seed(handlers.same_plate_sizes(fn, plate_sizes, role), key)

    if kind == SINGLE:
        (fn,) = programs
        with estimate(num_particles=num_particles, probes=probes, enum_index=enum_index,
                      default=default):
            tr = handlers.trace(prepare(fn, rng_key, "program")).get_trace(*args, **kwargs)
        return {"program": tr}
    model, guide = programs
    # The model's key only matters for sites the guide does not replay (rare); derived
    # lazily so that XLA drops it when unused.
    key_guide, key_model = rng_key, jax.random.fold_in(rng_key, 1)
    with estimate(num_particles=num_particles, probes=probes, enum_index=enum_index,
                      default=default):
        guide_tr = handlers.trace(prepare(guide, key_guide, "guide")).get_trace(*args,
                                                                              **kwargs)
    model_fn = handlers.replay(transform_like(prepare(model, key_model, "model"), guide_tr),
                               guide_tr)
    model_tr = handlers.trace(model_fn).get_trace(*args, **kwargs)
    _check_guided(model_tr, guide_tr)
    return {"guide": guide_tr, "model": model_tr}


def _is_latent(msg: Message) -> bool:
    return msg["type"] == "sample" and not msg["is_observed"]


def _check_guided(model_tr: dict, guide_tr: dict) -> None:
    for name, msg in guide_tr.items():
        if msg["type"] != "sample":
            continue
        if msg["is_observed"]:
            raise SiteError(name, "is observed in the guide; observe data in the model only")
        other = model_tr.get(name)
        if other is None or other["type"] != "sample":
            raise SiteError(name, "is sampled by the guide, but the model has no such site")
        if other["is_observed"]:
            raise SiteError(name, "is sampled by the guide, but the model observes it")
        check_supports(name, msg["fn"], other["fn"])
    for name, msg in model_tr.items():
        if _is_latent(msg) and name not in guide_tr:
            raise SiteError(
                name, "is a latent site of the model that the guide does not sample; add it "
                "to the guide (or observe it in the model)"
            )


_UNCONSTRAINED_PROBES = (-7.0, -1.5, -0.3, 0.0, 0.4, 2.0, 6.0)
_MAX_ENUMERATED = 4096
_INTEGER_PROBES = (0, 1, 2, 3, 5, 10, 100)


def check_supports(name: str, guide_fn: Any, model_fn: Any) -> None:
    """The guide's values of site ``name`` must lie in the model site's support.

    A discrete model site with a continuous guide site, or a continuous model site whose
    support does not contain the guide's (a positive model site, a real-valued guide), gives a
    finite or infinite number in numpyro and Pyro and never an error; here it is a
    :class:`~scgjax.errors.SiteError`. The check is on the distributions, once per trace: points
    of the guide's support (``biject_to(support)`` of a few unconstrained values, or every value
    of a finite support) must satisfy the model's support, wherever that can be decided
    without the program's values (supports with traced bounds are not checked).
    """
    g, m = guide_fn.support, model_fn.support
    if m.is_discrete and not g.is_discrete:
        raise SiteError(
            name, f"is discrete in the model ({type(model_fn).__name__}, support {m}) but "
            f"continuous in the guide ({type(guide_fn).__name__}, support {g}); give the guide a "
            "distribution on the model's support (or relax both with sg.GumbelSoftmax)",
        )
    with jax.ensure_compile_time_eval():  # concrete even while a jitted step is traced
        points = _support_points(guide_fn)
        if points is None:
            return
        try:
            inside = m(points)
        except Exception:  # e.g. event shapes that do not match: the value check reports those
            return
    if isinstance(inside, jax.core.Tracer):
        return
    if not np.all(np.asarray(inside)):
        raise SiteError(
            name, f"has support {g} in the guide ({type(guide_fn).__name__}), which is not "
            f"contained in the model's support {m} ({type(model_fn).__name__}): the guide would "
            "propose values the model cannot score. Use a guide distribution on the model's "
            "support (for a positive site, e.g. LogNormal or a TransformedDistribution)",
        )


def _support_points(fn: Any) -> jax.Array | None:
    """A few points of ``fn``'s support (values of ``fn``'s event shape), or ``None``."""
    support = fn.support
    event = tuple(fn.event_shape)
    try:
        if support.is_discrete:
            if not getattr(fn, "has_enumerate_support", False):
                # e.g. a Poisson, or a Bernoulli inside .to_event: the probe integers that lie
                # in the guide's own support
                probes = jnp.broadcast_to(
                    jnp.asarray(_INTEGER_PROBES).reshape((-1,) + (1,) * len(event)),
                    (len(_INTEGER_PROBES), *event))
                inside = np.asarray(support(probes)).reshape(len(_INTEGER_PROBES), -1).all(1)
                return probes[inside] if inside.any() else None
            values = fn.enumerate_support(expand=False)
            if isinstance(values, jax.core.Tracer) or values.size > _MAX_ENUMERATED:
                return None
            return values
        transform = biject_to(support)
        shape = transform.inverse_shape(event)
        points = jnp.stack([transform(jnp.full(shape, u)) for u in _UNCONSTRAINED_PROBES])
    except Exception:  # supports with traced parameters, or no bijection: not checked
        return None
    return None if isinstance(points, jax.core.Tracer) else points


def sampling_role(kind: str) -> str:
    return "program" if kind == SINGLE else "guide"


def cost_sites(kind: str, traces: dict) -> list[tuple[str, str, str, float]]:
    """``(cost id, role, site name, sign)`` for every cost of the traces, in program order."""
    out = []
    if kind == SINGLE:
        for name, msg in traces["program"].items():
            if msg["type"] == "sample" and msg["is_observed"]:
                cid = name if msg.get("is_factor") else f"log p({name})"
                out.append((cid, "program", name, 1.0))
        return out
    for name, msg in traces["model"].items():
        if msg["type"] == "sample":
            cid = name if msg.get("is_factor") else f"log p({name})"
            out.append((cid, "model", name, 1.0))
    for name, msg in traces["guide"].items():
        if msg["type"] == "sample":
            out.append((f"-log q({name})", "guide", name, -1.0))
    return out


def site_log_prob(msg: Message) -> jax.Array:
    """``log fn(value)`` of a sample site with its mask applied (0 where masked)."""
    lp = msg["fn"].log_prob(msg["value"])
    lp = jnp.broadcast_to(lp, tuple(msg["fn"].batch_shape))
    if msg.get("mask") is not None:
        lp = jnp.where(msg["mask"], lp, 0.0)
    return lp


@dataclasses.dataclass(frozen=True)
class Structure:
    """Everything static an objective needs: the graph and where each array comes from."""

    kind: str
    scg: SCG
    costs: tuple[tuple[str, str, str, float], ...]
    num_particles: int
    #: the ``sg.param``/``sg.module`` names that both the model and the guide use
    shared_params: tuple[str, ...] = ()

    @property
    def plate_order(self) -> tuple[str, ...]:
        return tuple(self.scg.plates)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def analyse(kind: str, rng_key: jax.Array, params: dict, programs: tuple, args: tuple,
            kwargs: dict, num_particles: int, default: Callable = default_estimator
            ) -> Structure:
    """Trace the program abstractly and build its SCG (see the module docstring).

    This is also where the program's inputs are checked, once per trace: ``params`` must hold
    every param the programs declare (an error naming the closest key otherwise, from
    :class:`~scgjax.handlers.substitute_unconstrained`) and a key that is no param of them is
    warned about; an ``estimator=`` that the objective ignores (on an observed site, or on a
    model's latent site when the guide samples it) is warned about too.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict from param names to unconstrained values (as "
                        f"sg.init_params returns), got {type(params).__name__}")
    num_particles = check_num_particles(num_particles)
    for fn in programs:
        if not callable(fn):
            raise TypeError(f"the model and guide must be functions, got "
                            f"{type(fn).__name__} {fn!r:.60}")
    dyn, rebuild = split_static((params, args, kwargs))
    dyn_abstract = [_abstract(x) for x in dyn]
    key_abstract = _abstract(rng_key)
    found: dict[str, Any] = {}

    def meta_pass(key, arrays):
        p, a, kw = rebuild(arrays)
        traces = run(kind, key, p, programs, a, kw, num_particles, default=default)
        role = sampling_role(kind)
        sampled = {n: m for n, m in traces[role].items() if _is_latent(m)}
        found["nodes"] = {n: node_from_message(m, role) for n, m in sampled.items()}
        found["values"] = {n: _abstract(m["value"]) for n, m in sampled.items()}
        found["costs"] = cost_sites(kind, traces)
        found["plates"] = _plates(traces)
        found["shared_params"] = _shared_params(traces)
        _check_params_used(params, traces)
        _check_estimators_used(kind, traces)
        found["cost_plates"] = {
            cid: tuple(f.name for f in traces[r][s]["cond_indep_stack"])
            for cid, r, s, _ in found["costs"]
        }
        return None

    jax.eval_shape(meta_pass, key_abstract, dyn_abstract)
    nodes, costs = found["nodes"], found["costs"]
    names = list(nodes)

    def flow_pass(values, key, arrays):
        p, a, kw = rebuild(arrays)
        traces = run(kind, key, p, programs, a, kw, num_particles, values=values,
                     default=default)
        role = sampling_role(kind)
        outs = [site_log_prob(traces[role][n]) for n in names]
        outs += [site_log_prob(traces[r][s]) for _, r, s, _ in costs]
        return outs

    values = {n: found["values"][n] for n in names}
    deps = dependencies(flow_pass, values, key_abstract, dyn_abstract)
    # Inputs are flattened in the order of the `values` dict's sorted keys (pytree order).
    index_to_name = dict(enumerate(sorted(names)))
    as_names = [frozenset(index_to_name[i] for i in d if i in index_to_name) for d in deps]
    parents = {n: as_names[i] - {n} for i, n in enumerate(names)}
    cost_inputs = {cid: as_names[len(names) + i] for i, (cid, *_) in enumerate(costs)}
    cost_nodes = {
        cid: CostNode(cid, site, role, _cost_kind(cid, role, site), sign,
                      found["cost_plates"][cid])
        for cid, role, site, sign in costs
    }
    scg = SCG(nodes=nodes, costs=cost_nodes, plates=found["plates"], parents=parents,
              cost_inputs=cost_inputs)
    return Structure(kind=kind, scg=scg, costs=tuple(costs), num_particles=num_particles,
                     shared_params=found["shared_params"])


def check_num_particles(num_particles: Any) -> int:
    """``num_particles`` as a Python int: it must be an integer (a Python or numpy int, not a
    bool or a float) of at least 1; a ``TypeError`` or ``ValueError`` that says so otherwise.

    Example:
        >>> import numpy as np
        >>> check_num_particles(np.int64(4))
        4
    """
    if isinstance(num_particles, (bool, np.bool_)) or not isinstance(
            num_particles, (int, np.integer)):
        raise TypeError(f"num_particles must be an int >= 1, got {type(num_particles).__name__} "
                        f"{num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be an int >= 1, got {num_particles!r}")
    return int(num_particles)


def _check_params_used(params: Mapping, traces: dict) -> None:
    """Warn about each key of ``params`` that no program declares: not an ``sg.param`` /
    ``sg.module`` site, nor ``"<site>$<key>"`` of a sample site's estimator (a missing param
    is already an error, raised by ``substitute_unconstrained``)."""
    declared = {n for tr in traces.values() for n, m in tr.items() if m["type"] == "param"}
    samples = {n for tr in traces.values() for n, m in tr.items() if m["type"] == "sample"}
    for key in params:
        if key in declared:
            continue
        if isinstance(key, str) and "$" in key and key.split("$", 1)[0] in samples:
            continue
        close = handlers.closest_name(key, sorted(declared))
        handlers.warn_user(
            f"site '{key}' is a key of params but no param of the program"
            + (f" (did you mean '{close}'?)" if close else "")
            + ": it is ignored and gets no gradient")


def _check_estimators_used(kind: str, traces: dict) -> None:
    """Warn about each ``estimator=`` that the objective ignores: on an observed site (it is a
    cost, not a random choice), or on a latent site of the model of a guided objective (the
    guide's site is the random choice; its estimator is used)."""
    for role, tr in traces.items():
        for name, msg in tr.items():
            if msg["type"] != "sample" or msg.get("estimator") is None:
                continue
            if msg["is_observed"] and not msg.get("is_factor"):
                handlers.warn_user(
                    f"site '{name}' is observed in the {role}, so its estimator "
                    f"{msg['estimator']!r} is ignored (estimators apply to latent sites only)")
            elif (role == "model" and kind == GUIDED
                  and msg["estimator"] != traces["guide"].get(name, {}).get("estimator")):
                handlers.warn_user(
                    f"site '{name}' has estimator {msg['estimator']!r} in the model, which is "
                    "ignored: the guide samples this site, and the guide's estimator is used "
                    "(give estimator= in the guide)")


def _shared_params(traces: dict) -> tuple[str, ...]:
    """The param sites of every trace, when there are several (model and guide)."""
    names = [{n for n, m in tr.items() if m["type"] == "param"} for tr in traces.values()]
    if len(names) < 2:
        return ()
    return tuple(sorted(set.intersection(*names)))


def _cost_kind(cid: str, role: str, site: str) -> str:
    if cid == site:
        return "factor"
    return "-log q" if role == "guide" else "log p"


def _plates(traces: dict) -> dict[str, Plate]:
    plates: dict[str, Plate] = {}
    for tr in traces.values():
        for msg in tr.values():
            for f in msg.get("cond_indep_stack", ()):
                known = plates.setdefault(f.name, Plate(f.name, f.size, f.full_size))
                if known.full_size != f.full_size:
                    raise SiteError(
                        f.name, f"is a plate used with sizes {known.full_size} and "
                        f"{f.full_size}; a plate name must always have the same size",
                    )
                if known.size != f.size:
                    raise SiteError(
                        f.name, f"is a plate of size {f.full_size} subsampled to {known.size} "
                        f"and to {f.size} elements; a plate must be subsampled the same way "
                        "wherever it is used",
                    )
    return plates


def particle_arrays(structure: Structure, traces: dict) -> tuple[dict, dict, dict]:
    """Per-element arrays of one particle in the canonical plate layout: ``log q`` of every
    node whose estimator uses its learning signal, ``sign * scale * log_prob`` of every cost,
    and, per such node, its value and what its estimator collects."""
    order = structure.plate_order
    role = sampling_role(structure.kind)
    log_probs: dict[tuple[str, str], jax.Array] = {}

    def log_prob(r: str, name: str) -> jax.Array:  # each site's density computed once
        if (r, name) not in log_probs:
            log_probs[r, name] = site_log_prob(traces[r][name])
        return log_probs[r, name]

    signal_nodes = [n for n, node in structure.scg.nodes.items()
                    if node.estimator.uses_signal]
    enumerated = [n for n, node in structure.scg.nodes.items()
                  if getattr(node.estimator, "enumerates", False)]
    logq = {n: to_canonical(log_prob(role, n), traces[role][n], order)
            for n in signal_nodes + enumerated}
    extras = {}
    for n in signal_nodes:
        msg = traces[role][n]
        extras[n] = {"value": jax.lax.stop_gradient(msg["value"]),
                     "collected": msg["estimator"].collect(msg)}
        if structure.kind == GUIDED and not msg["estimator"].reparameterised:
            extras[n]["own_cost_shift"] = own_cost_shift(log_prob(role, n), msg)
    costs = {}
    for cid, r, s, sign in structure.costs:
        msg = traces[r][s]
        lp = log_prob(r, s)
        if msg.get("scale") is not None:
            lp = lp * msg["scale"]
        costs[cid] = to_canonical(sign * lp, msg, order)
    return logq, costs, extras


def own_cost_shift(log_q: jax.Array, msg: Message) -> jax.Array:
    """``sum_elements (box(log q(w)) - 1) * s``: the zero-valued term that removes the direct
    derivative of a sampled (not reparameterised) guide site's own cost ``-s log q(w)``.

    That derivative, ``-s grad log q(w)`` at the drawn ``w``, has mean zero and is pure noise: with
    it, every score estimator computes ``grad log q (Q - b - s)``, a baseline ``s`` nats off, and
    the gradient at the exact posterior with the exact baseline is not 0 (Pyro's and NumPyro's
    TraceGraph_ELBO drop it too). Adding ``(box(log q) - 1) * s`` cancels it at first order; as a
    DiCE baseline term with a constant baseline (Mao et al. 2019) its derivatives of every order
    have mean zero, so higher-order estimates stay unbiased. ``s`` is the site's scale
    (sub-sampling, ``sg.handlers.scale``); masked elements have ``log q = 0`` and add nothing.
    """
    scale = 1.0 if msg.get("scale") is None else jax.lax.stop_gradient(msg["scale"])
    return jnp.sum((magic_box(log_q) - 1.0) * scale)


def graph(model: Callable, guide: Callable | None = None, *args, params: dict | None = None,
          rng_key: Any = 0, num_particles: int = 1, **kwargs) -> SCG:
    """The stochastic computation graph of ``guide`` + ``model`` (or of ``model`` alone).

    With a guide, stochastic nodes are the guide's latent sites and costs are the model's
    log-densities and minus the guide's; without one, the program's latents are the nodes and
    its factors and observed sites the costs. ``params`` defaults to ``sg.init_params``.
    Nothing runs: the graph comes from tracing. ``.to_dot()`` renders it.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> def episode():
        ...     a = sg.sample("a", dist.Bernoulli(logits=0.0))
        ...     sg.factor("r0", a * 1.0)
        ...     b = sg.sample("b", dist.Bernoulli(logits=0.0))
        ...     sg.factor("r1", a + b)
        >>> g = sg.graph(episode)
        >>> g.credited_costs("a"), g.credited_costs("b")
        (('r0', 'r1'), ('r1',))
    """
    rng_key = handlers.as_prng_key(rng_key)
    if params is None:
        params = init_params(rng_key, model, guide, *args, **kwargs)
    kind, programs = (SINGLE, (model,)) if guide is None else (GUIDED, (model, guide))
    return analyse(kind, rng_key, params, programs, args, kwargs, num_particles).scg
