"""Gradient estimators, one module each, and the default choice per site."""

from __future__ import annotations

from typing import Any

from scgjax.baselines import MovingAverage
from scgjax.estimators.base import Estimator, ScoreContext, magic_box
from scgjax.estimators.dcv import DCV
from scgjax.estimators.detached import Detached
from scgjax.estimators.disarm import ARM, DisARM
from scgjax.estimators.dreg import DReG
from scgjax.estimators.enumerate import Enumerate
from scgjax.estimators.measure_valued import MeasureValued
from scgjax.estimators.pathwise import Pathwise
from scgjax.estimators.relax import REBAR, RELAX
from scgjax.estimators.relaxation import GumbelSoftmax, StraightThrough
from scgjax.estimators.rloo import RLOO
from scgjax.estimators.rodeo import RODEO
from scgjax.estimators.score_function import ScoreFunction
from scgjax.estimators.stl import STL
from scgjax.estimators.unordered_set import SumAndSample, UnorderedSet
from scgjax.estimators.vimco import VIMCO

__all__ = [
    "ARM", "DCV", "DReG", "Detached", "DisARM", "Enumerate", "Estimator", "GumbelSoftmax",
    "MeasureValued", "Pathwise", "REBAR", "RELAX", "RLOO", "RODEO", "STL", "ScoreContext",
    "ScoreFunction", "StraightThrough", "SumAndSample", "UnorderedSet", "VIMCO",
    "default_estimator",
    "magic_box",
]


def default_estimator(fn: Any, num_particles: int) -> Estimator:
    """Pathwise for reparameterisable distributions; otherwise RLOO when ``K >= 2``, else the
    score function with a moving-average baseline (DESIGN §3).

    Example:
        >>> from scgjax import dist
        >>> default_estimator(dist.Bernoulli(logits=0.0), 1)
        ScoreFunction(baseline=MovingAverage(decay=0.9))
    """
    if fn.has_rsample:
        return Pathwise()
    if num_particles >= 2:
        return RLOO()
    return ScoreFunction(MovingAverage(0.9))
