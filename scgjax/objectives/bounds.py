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

from scgjax.errors import SiteError
from scgjax.estimators.base import zero_value
from scgjax.layout import reduce_to
from scgjax.scg import SCG

__all__ = ["bound_layout", "bound_plates", "check_doubly_reparameterised",
           "doubly_reparameterised_term", "importance_log_weights", "role_sums"]


def bound_plates(scg: SCG) -> tuple[str, ...]:
    """The plates along which the bound factorises: those of every stochastic node and of
    every cost that depends on one (canonical order). The log-weights are kept per element of
    these plates and the bound is the sum over elements of per-element ``K``-sample bounds.
    A loop's time axis is never one: its steps are summed inside each element's log-weight."""
    keep = {p for p, plate in scg.plates.items() if not plate.time}
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


def check_doubly_reparameterised(scg: SCG, name: str) -> None:
    """A DReG site reaches the guide's parameters through its own value only: a
    reparameterised site downstream of it would lose its path back to it (an error naming
    both)."""
    for child in scg.descendants(name):
        if scg.nodes[child].estimator.reparameterised:
            raise SiteError(name, f"uses DReG, but its value feeds the distribution of the "
                            f"reparameterised site '{child}', whose path back to it DReG does "
                            "not follow: use Pathwise() for one of them")


def doubly_reparameterised_term(evaluation: Any, name: str, coefficient: jax.Array
                                ) -> jax.Array:
    """``sum_k c_k (d log w_k / d z_k) z_k`` with only ``z_k``'s path differentiable (value 0):
    the doubly reparameterised gradient of site ``name`` (Tucker et al. 2019) for per-particle
    coefficients ``c`` (``(K, *plates)``, gradient stopped): ``w^_k^2`` for IWAE,
    ``w^_k - w^_k^2`` for RWS's wake-phi.

    ``d log w_k / d z_k`` is the probe derivative of the site's downstream costs
    (``evaluation.signal_grads``), which carry the sub-sampling scale, the factor the bound
    applies; ``z_k``'s differentiable path is the value the estimator collected."""
    structure = evaluation.structure
    node = structure.scg.nodes[name]
    c = node.layout(structure.plate_order).to_value(jax.lax.stop_gradient(coefficient))
    path = evaluation.extras[name]["collected"]
    return jnp.sum(jax.lax.stop_gradient(c * evaluation.signal_grads[name]) * zero_value(path))
