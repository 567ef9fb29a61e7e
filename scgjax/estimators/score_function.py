"""The score-function estimator, REINFORCE (Williams 1992), with an optional baseline."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scgjax.baselines import Baseline, Constant, FromCallable
from scgjax.estimators.base import Estimator, ScoreContext

#: the methods of :class:`~scgjax.baselines.Baseline` beyond ``init_state`` and ``__call__``:
#: an object that has one of them but is not a ``Baseline`` would have it ignored
_PROTOCOL_METHODS = ("baseline_for", "collect", "init_params", "training_term")


def check_baseline(baseline: Any) -> Baseline | None:
    """``baseline`` if it is ``None`` or a :class:`~scgjax.baselines.Baseline`;
    ``FromCallable(baseline)`` for a duck-typed baseline (``init_state()`` and
    ``__call__(learning_signal, state)``); ``Constant(baseline)`` for a real number or numeric
    array; otherwise a ``TypeError`` that says what was given and what to write instead.

    Example:
        >>> check_baseline(2.0)
        Constant(value=2.0)
        >>> from scgjax.baselines import MovingAverage
        >>> check_baseline(MovingAverage)
        Traceback (most recent call last):
        ...
        TypeError: ScoreFunction(baseline=...) got the class MovingAverage; did you mean ...
    """
    if baseline is None or isinstance(baseline, Baseline):
        return baseline
    if isinstance(baseline, type):
        raise TypeError(f"ScoreFunction(baseline=...) got the class {baseline.__name__}; did "
                        f"you mean {baseline.__name__}()?")
    if isinstance(baseline, Estimator):
        raise TypeError(f"ScoreFunction(baseline=...) got the estimator {baseline!r}; a "
                        "baseline is e.g. sg.baselines.MovingAverage(0.9) or a number")
    if hasattr(baseline, "init_state"):
        hooks = [m for m in _PROTOCOL_METHODS if hasattr(baseline, m)]
        if hooks:
            raise TypeError(
                f"ScoreFunction(baseline=...) got {type(baseline).__name__} {baseline!r}, "
                f"which defines {', '.join(hooks)} but does not subclass "
                "sg.baselines.Baseline; subclass it so that these methods are used")
        if callable(baseline):
            return FromCallable(baseline)
    if not isinstance(baseline, (bool, np.bool_, str, bytes)):
        try:
            dtype = jnp.result_type(baseline)
        except TypeError:
            dtype = None
        if dtype is not None and (jnp.issubdtype(dtype, jnp.integer)
                                  or jnp.issubdtype(dtype, jnp.floating)):
            return Constant(baseline)
    raise TypeError(
        f"ScoreFunction(baseline=...) needs None, a number (a constant baseline) or a baseline "
        f"of sg.baselines (e.g. MovingAverage(0.9), Constant(b), Neural(net, inputs=x), or a "
        f"subclass of sg.baselines.Baseline), got {type(baseline).__name__} {baseline!r}")


@dataclasses.dataclass(frozen=True)
class ScoreFunction(Estimator):
    """``grad E f(w) = E[grad log q(w) (Q_w - b)]`` with ``Q_w`` the costs downstream of ``w``.

    Unbiased for any baseline ``b`` that does not depend on ``w`` (Schulman et al. 2015,
    Thm. 1); works for any distribution, discrete or continuous (the sample's pathwise
    gradient is stopped). ``baseline`` is ``None`` or an object of :mod:`scgjax.baselines`
    (e.g. ``MovingAverage(decay)``, ``Constant(value)``, ``Neural(module, inputs)``, or a
    subclass of :class:`~scgjax.baselines.Baseline`), whose state lives in the objective's
    state pytree. This estimator's ``collect``, ``init_params``, ``init_state``,
    ``baseline_for(ctx)`` and its surrogate's training term are the baseline's.

    A number or a numeric array ``b`` is taken as ``Constant(b)``; anything else that is not a
    baseline (a baseline *class*, a string, ...) is a ``TypeError``.

    Example:
        >>> import scgjax as sg
        >>> sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9))
        ScoreFunction(baseline=MovingAverage(decay=0.9))
        >>> sg.ScoreFunction(baseline=-3.0)
        ScoreFunction(baseline=Constant(value=-3.0))
    """

    baseline: Baseline | None = None

    def __post_init__(self):
        baseline = check_baseline(self.baseline)
        if baseline is not self.baseline:
            object.__setattr__(self, "baseline", baseline)

    @property
    def bound_signal(self) -> str | None:  # type: ignore[override]
        """Under a multi-sample bound: the plain score (no baseline) only."""
        return "plain" if self.baseline is None else None

    def collect(self, msg: dict) -> Any:
        return None if self.baseline is None else self.baseline.collect(msg)

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict:
        return {} if self.baseline is None else self.baseline.init_params(rng_key, msg)

    def init_state(self) -> Any:
        return {} if self.baseline is None else self.baseline.init_state()

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array | None, Any]:
        if self.baseline is None:
            return None, ctx.state
        return self.baseline.baseline_for(ctx)

    @property
    def zero_mean_term(self) -> bool:
        """The baseline's term (and its zero-valued training term) has mean zero."""
        return True

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        term, state = super().surrogate_term(ctx)
        if self.baseline is None:
            return term, state
        return term + self.baseline.training_term(ctx), state
