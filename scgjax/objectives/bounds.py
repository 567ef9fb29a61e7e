"""The multi-sample bound's log-weights, per element of the plates it factorises along.

Shared by the objectives built on importance weights: ``sg.IWAE`` (the bound and its score
terms) and ``sg.RWS``/``sg.WakeSleep`` (its self-normalised weights). With ``K`` guide particles
and ``log w_k = log p(x, z_k) - log q(z_k | x)``,

    L_hat = ratio * sum_n [logsumexp_k lw_{k,n} - log K] + mean_k C_k,

where ``lw_{k,n}`` sums the costs that depend on a stochastic node onto element ``n`` of the
bound's plates (:func:`bound_plates`), divided by the sub-sampling ratio ``N / B`` of those
plates, and ``C`` the costs that depend on none (Burda, Grosse & Salakhutdinov 2016).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.layout import reduce_to
from scgjax.scg import SCG

__all__ = ["bound_layout", "bound_plates", "importance_log_weights", "role_sums"]


def bound_plates(scg: SCG) -> tuple[str, ...]:
    """The plates along which the bound factorises: those of every stochastic node and of
    every cost that depends on one (canonical order). The log-weights are kept per element of
    these plates and the bound is the sum over elements of per-element ``K``-sample bounds."""
    keep = set(scg.plates)
    for node in scg.nodes.values():
        keep &= set(node.plates)
    for cid, cost in scg.costs.items():
        if scg.upstream(cid):
            keep &= set(cost.plates)
    return tuple(p for p in scg.plates if p in keep)


def bound_layout(scg: SCG) -> tuple[tuple[bool, ...], float]:
    """The canonical-axis mask of :func:`bound_plates` and the product of their sub-sampling
    ratios ``N / B`` (applied outside the logsumexp)."""
    shared = bound_plates(scg)
    ratio = math.prod(scg.plates[p].full_size / scg.plates[p].size for p in shared)
    return scg.plate_mask(shared), ratio


def importance_log_weights(evaluation: Any, alpha: float = 0.0
                           ) -> tuple[jax.Array, jax.Array, jax.Array, float]:
    """``(log_w, per_element, bound, ratio)`` of the particles in ``evaluation``.

    ``log_w`` (``(K, *plates)``, size 1 off the bound's plates) sums the costs that depend on
    a stochastic node, unscaled by sub-sampling; ``per_element`` is
    ``logsumexp_k log_w - log K`` (with ``alpha``, the Rényi bound's
    ``(logsumexp_k (1 - alpha) log_w - log K) / (1 - alpha)``);
    ``bound = ratio * sum(per_element) + mean_k(constant costs)``.
    """
    scg = evaluation.structure.scg
    k = evaluation.structure.num_particles
    keep, ratio = bound_layout(scg)
    shape = (k, *(p.size if kept else 1 for p, kept in zip(scg.plates.values(), keep,
                                                               strict=True)))
    log_w = jnp.zeros(shape)
    constant = jnp.zeros(())
    for cid, cost in evaluation.costs.items():
        if scg.upstream(cid):
            log_w = log_w + reduce_to(cost, keep)
        else:
            constant = constant + cost.reshape(k, -1).sum(axis=1).mean()
    log_w = log_w / ratio
    if alpha == 0.0:
        per_element = jax.nn.logsumexp(log_w, axis=0) - math.log(k)
    else:
        per_element = (jax.nn.logsumexp((1.0 - alpha) * log_w, axis=0) - math.log(k)) / (
            1.0 - alpha)
    return log_w, per_element, ratio * per_element.sum() + constant, ratio


def role_sums(evaluation: Any, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The model's and the guide's costs that depend on a latent, per particle and element of
    the bound's plates, divided by the sub-sampling ratio like the log-weights."""
    keep, ratio = bound_layout(evaluation.structure.scg)
    scg = evaluation.structure.scg
    model = jnp.zeros(shape)
    guide = jnp.zeros(shape)
    for cid, cost in evaluation.costs.items():
        if not scg.upstream(cid):
            continue
        part = reduce_to(cost, keep) / ratio
        if scg.costs[cid].role == "guide":
            guide = guide + part
        else:
            model = model + part
    return model, guide
