"""The expected cost of a single stochastic program (a general SCG; policy gradients)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from scgjax.objectives import program
from scgjax.objectives.base import Objective


class Expectation(Objective):
    """``E_p[sum of factors and observed log-densities]`` of one program, to be maximised.

    The program's latent sites are the stochastic nodes; its ``sg.factor`` terms and observed
    sites are the costs. Each score-estimated site is credited with the costs its value flows
    into (e.g. rewards-to-go in an episode, derived from data flow). ``loss(rng_key, params,
    fn, *args, **kwargs)`` is minus the estimate; its gradient the estimated minus gradient.

    Example:
        >>> import jax, scgjax as sg
        >>> from scgjax import dist
        >>> def episode():
        ...     a = sg.sample("a", dist.Bernoulli(logits=sg.param("theta", 0.0)))
        ...     sg.factor("reward", a)
        >>> params = sg.init_params(0, episode)
        >>> float(jax.grad(sg.Expectation(num_particles=1000).loss, argnums=1)(
        ...     jax.random.key(0), params, episode)["theta"])  # exact: -0.25
        -0.25...
    """

    kind = program.SINGLE

    def loss(self, rng_key: Any, params: dict, fn: Callable, *args: Any, **kwargs: Any
             ) -> jax.Array:
        """Minus the expected cost estimate; its gradient estimates minus the gradient."""
        return super().loss(rng_key, params, fn, *args, **kwargs)
