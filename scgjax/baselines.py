"""Baselines for score-function estimators: ``b_w`` in ``grad log q(w) (Q_w - b_w)``.

A baseline is a small frozen object with explicit state: ``init_state()`` and
``__call__(learning_signal, state) -> (b, new_state)``. It must not use the current sample's
learning signal to form ``b`` (that would bias the gradient); it may use it to update its state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["MovingAverage"]


@dataclasses.dataclass(frozen=True)
class MovingAverage:
    """Exponential moving average of the learning signal, per site, one scalar.

    ``m_t = decay * m_{t-1} + (1 - decay) * mean(Q_t)`` and ``b_t = m_{t-1} / (1 - decay^(t-1))``
    (bias-corrected as in Adam, so the first steps are not pulled towards 0; ``b_1 = 0``). The
    mean is over particles and plate elements. Unbiased: ``b_t`` only uses earlier steps.

    Example:
        >>> import jax.numpy as jnp
        >>> ma = MovingAverage(decay=0.5)
        >>> b, s = ma(jnp.array([2.0]), ma.init_state())
        >>> float(b), float(ma(jnp.array([4.0]), s)[0])
        (0.0, 2.0)
    """

    decay: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"MovingAverage decay must be in [0, 1), got {self.decay}")

    def init_state(self) -> dict[str, jax.Array]:
        return {"mean": jnp.zeros(()), "steps": jnp.zeros((), jnp.int32)}

    def __call__(self, learning_signal: jax.Array, state: dict) -> tuple[jax.Array, Any]:
        steps = state["steps"]
        correction = 1.0 - self.decay ** steps.astype(jnp.float32)
        b = jnp.where(steps > 0, state["mean"] / jnp.where(steps > 0, correction, 1.0), 0.0)
        mean = self.decay * state["mean"] + (1.0 - self.decay) * jnp.mean(learning_signal)
        return b, {"mean": jax.lax.stop_gradient(mean), "steps": steps + 1}
