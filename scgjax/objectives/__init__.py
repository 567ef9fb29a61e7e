"""Objectives: surrogate losses whose gradients are the estimators."""

from scgjax.objectives.amortised_ws import AmortisedWakeSleep
from scgjax.objectives.base import Objective
from scgjax.objectives.elbo import ELBO
from scgjax.objectives.expectation import Expectation
from scgjax.objectives.iwae import IWAE, RenyiELBO
from scgjax.objectives.program import graph
from scgjax.objectives.rws import RWS, WakeSleep
from scgjax.objectives.smc import SMC

__all__ = ["AmortisedWakeSleep", "ELBO", "Expectation", "IWAE", "Objective", "RWS", "RenyiELBO",
           "SMC", "WakeSleep", "graph"]
