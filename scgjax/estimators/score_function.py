"""The score-function estimator, REINFORCE (Williams 1992), with an optional baseline."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from scgjax.estimators.base import Estimator, ScoreContext


@dataclasses.dataclass(frozen=True)
class ScoreFunction(Estimator):
    """``grad E f(w) = E[grad log q(w) (Q_w - b)]`` with ``Q_w`` the costs downstream of ``w``.

    Unbiased for any baseline ``b`` that does not depend on ``w`` (Schulman et al. 2015,
    Thm. 1); works for any distribution, discrete or continuous (the sample's pathwise
    gradient is stopped). ``baseline`` is ``None`` or an object of :mod:`scgjax.baselines`
    (e.g. ``MovingAverage(decay)``, ``Constant(value)``, ``Neural(module, inputs)``), whose
    state lives in the objective's state pytree. The baseline's optional hooks ``collect``,
    ``init_params``, ``baseline_for(ctx)`` and ``training_term(ctx)`` are forwarded to it.

    Example:
        >>> import scgjax as sg
        >>> sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9))
        ScoreFunction(baseline=MovingAverage(decay=0.9))
    """

    baseline: Any = None

    def collect(self, msg: dict) -> Any:
        hook = getattr(self.baseline, "collect", None)
        return None if hook is None else hook(msg)

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict:
        hook = getattr(self.baseline, "init_params", None)
        return {} if hook is None else hook(rng_key, msg)

    def init_state(self) -> Any:
        return {} if self.baseline is None else self.baseline.init_state()

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array | None, Any]:
        if self.baseline is None:
            return None, ctx.state
        hook = getattr(self.baseline, "baseline_for", None)
        if hook is not None:
            return hook(ctx)
        return self.baseline(ctx.learning_signal, ctx.state)

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        term, state = super().surrogate_term(ctx)
        hook = getattr(self.baseline, "training_term", None)
        return (term if hook is None else term + hook(ctx)), state
