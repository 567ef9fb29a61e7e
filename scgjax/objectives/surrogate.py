"""The surrogate objective with per-element credit assignment (Schulman et al. 2015; DiCE).

Given, for each of ``K`` particles, ``log q(w)`` of every score node and the value of every
cost, all as arrays with one axis per plate of the program (size 1 where a site is not in the
plate), the surrogate is

    S = (1/K) sum_k [ sum_c sum_elements box(Lambda_c) * c ]  +  sum_w term_w,
    Lambda_c = sum_{w upstream of c} log q(w) summed over the plates it is not credited along,

with ``box(t) = exp(t - stop_grad(t))`` (value 1). Its value is the plain objective estimate;
its gradient credits the score of element ``w[n]`` only with the costs downstream of it that
share ``n`` (costs outside a plate are credited to every element); and because every cost is
multiplied by the box of exactly its upstream log-densities, derivatives of any order are
unbiased (Foerster et al. 2018). ``term_w`` is the estimator's extra term (a baseline, a control
variate), built from ``Q_w``: the same costs, reduced to ``w``'s elements, gradient stopped.
For a sampled guide site, one more zero-valued term, ``sum (box(log q(w)) - 1) * s_w``
(:func:`scgjax.objectives.program.own_cost_shift`), cancels the direct derivative of its own cost
``-s_w log q(w)``, a zero-mean term that would otherwise shift every baseline by ``s_w`` nats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.estimators.base import ScoreContext, magic_box
from scgjax.layout import reduce_to
from scgjax.scg import SCG
from scgjax.tracegraph import Structure


def dice_surrogate(structure: Structure, logq: dict[str, jax.Array],
                   costs: dict[str, jax.Array], extras: dict[str, dict],
                   signal_grads: dict[str, jax.Array], params: dict, state: dict[str, Any],
                   signals: dict[str, jax.Array] | None = None,
                   signal_at: dict[str, Callable] | None = None
                   ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """Return ``(surrogate, objective estimate, new estimator state)``; the estimate is the
    surrogate's value before the estimators' zero-valued terms, averaged over particles.

    ``logq`` and ``costs`` hold arrays of shape ``(K, *plates)``; ``extras`` each signal
    node's values and collected arrays; ``signal_grads`` ``dQ/dw`` for the nodes that asked;
    ``state`` the estimator state of each node (missing entries start from
    ``estimator.init_state()``). ``signals``, if given, receives each node's ``Q_w``;
    ``signal_at`` holds ``Q_w`` as a function of ``w``'s values for the nodes whose estimator
    asked for it (:mod:`scgjax.objectives.rerun`).
    """
    scg = structure.scg
    k = structure.num_particles
    contexts = {}
    for w in logq:
        node = scg.nodes[w]
        signal = learning_signal(scg, w, costs, logq[w])
        if signals is not None:
            signals[w] = jax.lax.stop_gradient(signal)
        layout = node.layout(structure.plate_order)
        prefix = f"{w}$"
        contexts[w] = ScoreContext(
            name=w,
            log_prob=logq[w],
            learning_signal=jax.lax.stop_gradient(signal),
            state=state.get(w, node.estimator.init_state()),
            num_particles=k,
            value=extras[w]["value"],
            collected=extras[w]["collected"],
            signal_grad=signal_grads.get(w),
            signal_at=(signal_at or {}).get(w),
            params={n[len(prefix):]: v for n, v in params.items() if n.startswith(prefix)},
            to_value_layout=layout.to_value,
            from_value_layout=layout.from_value,
        )
    weighing = [w for w in contexts if scg.nodes[w].estimator.weights_particles]
    check_particle_weights(scg, weighing)
    weights = {w: jax.lax.stop_gradient(scg.nodes[w].estimator.particle_weights(contexts[w]))
               for w in weighing}
    # Costs of the same shape with the same upstream nodes share one box: sum them first.
    groups: dict[tuple, jax.Array] = {}
    for cid, cost in costs.items():
        upstream = tuple((w, keep) for w, keep in scg.boxes[cid] if w in logq)
        key = (upstream, cost.shape)
        groups[key] = cost if key not in groups else groups[key] + cost
    parts = []
    for (upstream, _), cost in groups.items():
        weighted = [w for w, _ in upstream if w in weights]
        if weighted:  # E f estimated by sum_k omega_k f_k, not the particles' mean
            cost = cost * (k * weights[weighted[0]])
        if upstream:
            lam = sum(reduce_to(logq[w], keep) for w, keep in upstream)
            cost = magic_box(lam) * cost
        parts.append(cost.sum())
    total = sum(parts) if parts else jnp.zeros(())
    surrogate = total / k if k > 1 else total
    new_state = dict(state)
    for w, ctx in contexts.items():
        term, new_state[w] = scg.nodes[w].estimator.surrogate_term(ctx)
        surrogate = surrogate + term
        if "own_cost_shift" in extras[w]:  # see program.own_cost_shift
            shift = extras[w]["own_cost_shift"]  # (K, *plates): its own cost is weighed too
            surrogate = surrogate + (shift * (k * weights[w]) if w in weights else shift).sum() / k
    return surrogate, jax.lax.stop_gradient(total / k if k > 1 else total), new_state


def learning_signal(scg: SCG, w: str, costs: dict[str, jax.Array], log_q: jax.Array
                    ) -> jax.Array:
    """``Q_w``: the costs credited to node ``w``, reduced to its elements (:func:`reduce_to`
    with the credit table's ``keep``), in the shape of its ``log_q`` (``(K, *plates)``)."""
    signal = jnp.zeros_like(log_q)
    for cid, keep in scg.credit[w]:
        signal = signal + reduce_to(costs[cid], keep)
    return signal


def check_particle_weights(scg: SCG, weighing: list[str]) -> None:
    """Raise a :class:`SiteError` where weighing the costs downstream of the sites
    ``weighing`` (their estimators' ``weights_particles``) per particle would be biased: a
    cost outside one of the site's plates (its elements' weights do not factor), a cost
    below two such sites, a site in an ``sg.scan`` loop, or another site credited with the
    same costs (below it, or beside it) whose estimator's term assumes the particles' plain
    mean (see ``Estimator.zero_mean_term``)."""
    for w in weighing:
        node = scg.nodes[w]
        name = type(node.estimator).__name__
        if any(scg.plates[p].time for p in node.plates):
            raise SiteError(w, f"uses {name}, which weighs its particles; inside an sg.scan "
                            "loop the costs of later steps cannot be weighed per step: use "
                            "RLOO() there")
        for cid in scg.credited_costs(w):
            cost = scg.costs[cid]
            outside = [p for p in node.plates if p not in scg.shared_plates(w, cid)]
            if outside:
                raise SiteError(w, f"uses {name}, which weighs its particles per element of "
                                f"the plate '{outside[0]}', but the cost '{cost.site}' "
                                "downstream of it is outside that plate (it depends on all "
                                "its elements at once, whose weights do not factor): use "
                                "RLOO()")
            others = [v for v in scg.upstream(cid) if v != w and v in weighing]
            if others:
                raise SiteError(w, f"uses {name}, which weighs its particles, and so does "
                                f"'{others[0]}', upstream of the same cost '{cost.site}': "
                                "only one such site may be upstream of a cost")
        mine = set(scg.credited_costs(w))
        for v in scg.nodes:
            est = scg.nodes[v].estimator
            if v == w or not mine & set(scg.credited_costs(v)):
                continue
            if est.enumerates or (est.uses_signal and not est.zero_mean_term):
                raise SiteError(v, f"uses {type(est).__name__}, whose costs are also "
                                f"downstream of the site '{w}': its {name} weighs the "
                                f"particles unequally, and {type(est).__name__} averages "
                                "its particles equally: use RLOO(), ScoreFunction() or a "
                                "reparameterised estimator here")
