"""Objectives: surrogate losses whose gradients are the estimators."""

from scgjax.objectives.base import Objective
from scgjax.objectives.elbo import ELBO
from scgjax.objectives.expectation import Expectation
from scgjax.objectives.program import graph

__all__ = ["ELBO", "Expectation", "Objective", "graph"]
