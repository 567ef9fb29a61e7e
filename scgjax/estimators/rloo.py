"""REINFORCE leave-one-out, RLOO (Kool, van Hoof & Welling 2019)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from scgjax.estimators.base import Estimator, ScoreContext, require_particles


@dataclasses.dataclass(frozen=True)
class RLOO(Estimator):
    """Score function with the leave-one-out baseline over the ``K`` particles.

    ``b_k = (1 / (K - 1)) sum_{j != k} Q_j``, per plate element, so the gradient estimate is
    ``(1 / K) sum_k grad log q(w_k) (Q_k - b_k)``. Unbiased (``b_k`` does not depend on
    ``w_k``); needs ``K >= 2`` (an error naming the site otherwise).

    Example:
        >>> import scgjax as sg
        >>> sg.ELBO(num_particles=4)  # discrete guide sites then default to RLOO
        ELBO(num_particles=4)
    """

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        require_particles(self, name, num_particles, 2)

    def bound_refusal(self) -> str:
        return ("uses RLOO, whose baseline under IWAE would be the bound itself (every "
                "particle shares the bound as its signal): use VIMCO(), the leave-one-out "
                "baseline of the multi-sample bound")

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        q = ctx.learning_signal
        k = ctx.num_particles
        return (q.sum(axis=0, keepdims=True) - q) / (k - 1), ctx.state
