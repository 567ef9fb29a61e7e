"""VIMCO: leave-one-out baselines for the multi-sample bound (Mnih & Rezende, ICML 2016).

"Variational inference for Monte Carlo objectives". For the importance-weighted bound
``L = log (1/K) sum_j w_j`` (``sg.IWAE``), the score-function gradient of a discrete guide site is

    sum_k (L - b_k) grad log q(z_k),
    b_k = log (1/K) (sum_{j != k} w_j + w~_k),   log w~_k = mean_{j != k} log w_j,

i.e. ``L`` with ``w_k`` replaced by the geometric mean of the other particles' weights. ``b_k``
does not depend on ``z_k``, so the estimate stays unbiased; all of it is per plate element and
computed in log space (:func:`vimco_baselines`, ``O(K)``, no ``K x K`` matrix).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator, ScoreContext, require_particles


def _exclusive_cumlogsumexp(x: jax.Array, reverse: bool) -> jax.Array:
    """``log sum_{j < k} exp x_j`` (``j > k`` if ``reverse``) along axis 0; ``-inf`` if empty."""
    pad = jnp.full((1, *x.shape[1:]), -jnp.inf, x.dtype)
    if reverse:
        inclusive = jax.lax.cumlogsumexp(x, axis=0, reverse=True)
        return jnp.concatenate([inclusive[1:], pad], axis=0)
    inclusive = jax.lax.cumlogsumexp(x, axis=0)
    return jnp.concatenate([pad, inclusive[:-1]], axis=0)


def vimco_baselines(log_w: jax.Array) -> jax.Array:
    """VIMCO's leave-one-out baselines ``b_k`` for log-weights ``log_w`` of shape ``(K, ...)``.

    ``b_k = log (1/K) (sum_{j != k} w_j + w~_k)`` with ``log w~_k = mean_{j != k} log w_j``,
    elementwise over the trailing axes. Stable for log-weights of any magnitude: the sum over
    ``j != k`` is a log-add of prefix and suffix ``cumlogsumexp`` (no subtraction of
    exponentials), and the leave-one-out mean is ``m + (m - log w_k) / (K - 1)`` around the
    mean ``m``. Needs ``K >= 2``.

    Example:
        >>> import jax.numpy as jnp
        >>> b = vimco_baselines(jnp.log(jnp.array([1.0, 4.0])))   # b_0 = log((4 + 4) / 2)
        >>> [round(float(v), 4) for v in jnp.exp(b)]
        [4.0, 1.0]
    """
    k = log_w.shape[0]
    if k < 2:
        raise ValueError(f"VIMCO baselines need at least 2 particles, got {k}")
    m = log_w.mean(axis=0, keepdims=True)
    geometric = m + (m - log_w) / (k - 1)
    others = jnp.logaddexp(_exclusive_cumlogsumexp(log_w, False),
                           _exclusive_cumlogsumexp(log_w, True))
    return jnp.logaddexp(others, geometric) - math.log(k)


@dataclasses.dataclass(frozen=True)
class VIMCO(Estimator):
    """The VIMCO score-function estimator for ``sg.IWAE`` (Mnih & Rezende 2016).

    Mark a discrete guide site with ``estimator=VIMCO()`` under ``IWAE(num_particles=K)``,
    ``K >= 2``: its score term is ``sum_k (L - b_k) grad log q(z_k)`` with the leave-one-out
    baselines of :func:`vimco_baselines` (per plate element). The site's value carries no
    pathwise gradient; its ``log q`` still enters the log-weights, whose gradient is the rest
    of the IWAE gradient. The baseline is defined by the multi-sample bound only: under any
    other objective (``sg.ELBO``, ...) the site raises a :class:`~scgjax.errors.SiteError`
    (use ``sg.RLOO()`` there, the per-sample analogue).

    Example:
        >>> from scgjax import dist
        >>> VIMCO().validate("z", dist.Bernoulli(logits=0.0), 4)
    """

    score = True
    bound_signal = "leave_one_out"

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        require_particles(self, name, num_particles, 2)

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        raise SiteError(
            ctx.name,
            "uses VIMCO, whose baselines are defined for the multi-sample bound only; use it "
            "with sg.IWAE (or use sg.RLOO() with sg.ELBO)",
        )
