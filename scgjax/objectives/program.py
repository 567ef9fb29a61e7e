"""Running a program for an objective: the objective's handler, the runs, the particle arrays.

An objective runs its program(s) twice per trace: once to find the structure (the graph layer,
:func:`scgjax.tracegraph.build`, with the sampled values marked) and once for real, inside the
particle ``vmap``. Both go through :func:`run`, where :class:`estimate` resolves each sampled
site's estimator and draws its value. :func:`particle_arrays` turns one particle's traces into
per-element arrays in the canonical plate layout (:mod:`scgjax.layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from scgjax import handlers, stepped_prng
from scgjax.dist import joint_support
from scgjax.errors import SiteError
from scgjax.estimators import Enumerate, default_estimator
from scgjax.estimators.base import magic_box
from scgjax.layout import SiteLayout
from scgjax.objectives.checks import (
    check_enumerated_batch,
    check_estimators_used,
    check_guided,
    check_num_particles,
    check_params_used,
    is_delta,
)
from scgjax.objectives.marginal import marginalise, wants_enumeration
from scgjax.params import init_params
from scgjax.primitives import Message, Messenger, check_estimator
from scgjax.scg import SCG
from scgjax.tracegraph import (
    GUIDED,
    SINGLE,
    Structure,
    build,
    is_marginalised,
    mark_sources,
    sampling_role,
    site_cost,
    site_log_prob,
)

__all__ = ["GUIDED", "SINGLE", "Structure", "analyse", "estimate", "graph", "own_cost_shift",
           "particle_arrays", "run", "sampling_role", "site_log_prob"]


class estimate(Messenger):
    """The objective's handler: resolve each sampled site's estimator (its own, or the
    objective's default), let it transform the distribution and draw the value (or, for an
    enumerated site, set it to the configuration's support value); optionally add a
    zero-valued ``probe`` to the value, the input through which objectives differentiate costs
    with respect to it.
    """

    scan_role = "step"  # each step of an sg.scan loop draws its sites' values

    def __init__(self, fn: Callable | None = None, num_particles: int = 1,
                 probes: dict | None = None, enum_index: dict | None = None,
                 default: Callable = default_estimator):
        super().__init__(fn)
        self.num_particles = num_particles
        self.default = default
        self.probes = probes or {}
        self.enum_index = enum_index or {}
        self._step: Any = None

    def for_step(self, step: Any) -> estimate:
        return handlers.at_step(self, step)

    def process_message(self, msg: Message) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        est = msg.get("estimator")
        if est is None and wants_enumeration(msg):
            est = Enumerate()  # infer={"enumerate": "parallel"} on a sampled site
        if est is None:
            est = self.default(msg["fn"], self.num_particles)
            check_estimator(msg["name"], est)  # an objective's own default_estimator
        est.validate(msg["name"], msg["fn"], self.num_particles)
        if not est.reparameterised and is_delta(msg["fn"]):
            raise SiteError(
                msg["name"], f"is a Delta (a point mass) with {type(est).__name__}, which "
                "differentiates its log-density, constant at the point: the gradient would be "
                "0. Use estimator=sg.Pathwise() (the value carries the gradient)",
            )
        if est.enumerates:
            check_enumerated_batch(msg)
        fn = msg["fn"] = est.transform_fn(msg["fn"])
        msg["estimator"] = est
        if msg["value"] is not None:
            return  # substituted, replayed or conditioned inside the program
        if msg["name"] in self.enum_index:
            support = joint_support(fn, self.enum_index[msg["name"]])
            msg["value"] = jnp.broadcast_to(support, (*fn.batch_shape, *fn.event_shape))
        elif msg["kwargs"].get("rng_key") is not None:  # else: the default's missing-key error
            msg["value"] = est.sample(msg["kwargs"]["rng_key"], fn)
        else:
            return
        msg["in_support"] = True  # drawn from fn: its log_prob needs no support check

    def postprocess_message(self, msg: Message) -> None:
        if msg["type"] == "sample" and msg["name"] in self.probes:
            probe = self.probes[msg["name"]]
            if self._step is not None:
                probe = self._step.slice(msg["name"], probe)
            msg["value"] = msg["value"] + probe
        if self._step is not None and msg.get("estimator") is not None and not msg["is_observed"]:
            # in an sg.scan loop the estimator collects each step's arrays (stacked with the
            # site; its key and its inputs only exist inside the loop's body)
            collected = msg["estimator"].collect(msg)
            if collected is not None:
                msg["collected"] = collected


class transform_like(Messenger):
    """Give the model's sites the distribution transform of the guide's estimator for the same
    name (a relaxation must score the relaxed value under a relaxed model density too)."""

    scan_role = "step"

    def __init__(self, fn: Callable | None = None, guide_trace: dict | None = None):
        super().__init__(fn)
        self.guide_trace = guide_trace or {}

    def process_message(self, msg: Message) -> None:
        other = self.guide_trace.get(msg["name"])
        if msg["type"] == "sample" and other is not None and other.get("estimator"):
            msg["fn"] = other["estimator"].transform_fn(msg["fn"])


def run(kind: str, rng_key: jax.Array, params: dict, programs: tuple, args: tuple,
        kwargs: dict, num_particles: int, probes: dict | None = None,
        enum_index: dict | None = None, default: Callable = default_estimator,
        mark: bool = False) -> dict[str, dict]:
    """Run the program(s) once; return the traces by role (``guide``/``model`` or
    ``program``). ``probes`` are added to the sampled values and ``enum_index`` picks the
    support value of enumerated sites; ``default(fn, K)`` chooses the estimator of sites that
    name none (see :class:`estimate`); ``mark`` marks the sampled values as named sources for
    the graph layer (:class:`scgjax.tracegraph.mark_sources`)."""

    plate_sizes: dict[str, tuple] = {}

    def sampled_trace(fn, key, role):
        fn = handlers.substitute_unconstrained(fn, params)
        tracer = handlers.trace(handlers.seed(handlers.same_plate_sizes(fn, plate_sizes, role),
                                              key))
        if not mark:
            return tracer.get_trace(*args, **kwargs)
        with mark_sources():
            return tracer.get_trace(*args, **kwargs)

    with estimate(num_particles=num_particles, probes=probes, enum_index=enum_index,
                  default=default):
        if kind == SINGLE:
            return {"program": sampled_trace(programs[0], rng_key, "program")}
        model, guide = programs
        guide_tr = sampled_trace(guide, rng_key, "guide")
    # The model's key only matters for sites the guide does not replay (rare); derived
    # lazily so that XLA drops it when unused.
    key_model = stepped_prng.fold_in(rng_key, 1)
    # replay inside seed: the replayed sites need no key of their own; the sites summed out
    # take the configuration's value
    model_fn = marginalise(handlers.substitute_unconstrained(model, params), guide_tr,
                           enum_index)
    model_fn = handlers.replay(transform_like(model_fn, guide_tr), guide_tr)
    model_fn = handlers.seed(handlers.same_plate_sizes(model_fn, plate_sizes, "model"),
                             key_model)
    if mark:  # the summed-out sites are choices of the model: sources of the data flow
        with mark_sources(only=is_marginalised):
            model_tr = handlers.trace(model_fn).get_trace(*args, **kwargs)
    else:
        model_tr = handlers.trace(model_fn).get_trace(*args, **kwargs)
    check_guided(model_tr, guide_tr)
    return {"guide": guide_tr, "model": model_tr}


def analyse(kind: str, rng_key: jax.Array, params: dict, programs: tuple, args: tuple,
            kwargs: dict, num_particles: int, default: Callable = default_estimator
            ) -> Structure:
    """The programs' :class:`~scgjax.tracegraph.Structure`, from one traced run (nothing is
    computed; see :func:`scgjax.tracegraph.build`).

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

    def run_marked() -> dict[str, dict]:
        traces = run(kind, rng_key, params, programs, args, kwargs, num_particles,
                     default=default, mark=True)
        check_params_used(params, traces)
        check_estimators_used(kind, traces)
        return traces

    return build(kind, run_marked, num_particles)


def particle_arrays(structure: Structure, traces: dict) -> tuple[dict, dict, dict]:
    """Per-element arrays of one particle in the canonical plate layout: ``log q`` of every
    node whose estimator uses its learning signal (or enumerates), ``sign * scale *
    log_prob`` of every cost, and, per signal node, its value and what its estimator
    collects."""
    order = structure.plate_order
    role = sampling_role(structure.kind)
    log_probs: dict[tuple[str, str], jax.Array] = {}

    def log_prob(r: str, name: str) -> jax.Array:  # each site's density computed once
        if (r, name) not in log_probs:
            log_probs[r, name] = site_log_prob(traces[r][name])
        return log_probs[r, name]

    def canonical(x: jax.Array, msg: Message) -> jax.Array:
        return SiteLayout.of_message(msg, order).to_canonical(x)

    nodes = structure.scg.nodes
    signal_nodes = [n for n, node in nodes.items() if node.estimator.uses_signal]
    enumerated = [n for n, node in nodes.items() if node.estimator.enumerates]
    logq = {n: canonical(log_prob(role, n), traces[role][n]) for n in signal_nodes + enumerated}
    extras = {}
    for n in signal_nodes + [n for n, node in nodes.items() if node.estimator.needs_signal_grad
                             and not node.estimator.uses_signal]:
        msg = traces[role][n]
        extras[n] = {"value": jax.lax.stop_gradient(msg["value"]),
                     "collected": msg["collected"] if "collected" in msg
                     else msg["estimator"].collect(msg)}
        if structure.kind == GUIDED and not msg["estimator"].reparameterised:
            extras[n]["own_cost_shift"] = canonical(own_cost_shift(log_prob(role, n), msg), msg)
    costs = {}
    for cid, r, s, sign in structure.costs:
        msg = traces[r][s]
        if r == "guide" and s in nodes and nodes[s].estimator.stops_own_density:  # STL, DReG
            lp = site_log_prob({**msg, "fn": jax.lax.stop_gradient(msg["fn"])})
        else:
            lp = log_prob(r, s)
        costs[cid] = canonical(site_cost(msg, sign, lp), msg)
    return logq, costs, extras


def own_cost_shift(log_q: jax.Array, msg: Message) -> jax.Array:
    """``(box(log q(w)) - 1) * s`` per element (the surrogate sums it): the zero-valued term
    that removes the direct derivative of a sampled (not reparameterised) guide site's own
    cost ``-s log q(w)``.

    That derivative, ``-s grad log q(w)`` at the drawn ``w``, has mean zero and is pure noise: with
    it, every score estimator computes ``grad log q (Q - b - s)``, a baseline ``s`` nats off, and
    the gradient at the exact posterior with the exact baseline is not 0 (Pyro's and NumPyro's
    TraceGraph_ELBO drop it too). Adding ``(box(log q) - 1) * s`` cancels it at first order; as a
    DiCE baseline term with a constant baseline (Mao et al. 2019) its derivatives of every order
    have mean zero, so higher-order estimates stay unbiased. ``s`` is the site's scale
    (sub-sampling, ``sg.handlers.scale``); masked elements have ``log q = 0`` and add nothing.
    """
    scale = 1.0 if msg.get("scale") is None else jax.lax.stop_gradient(msg["scale"])
    return (magic_box(log_q) - 1.0) * scale


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
