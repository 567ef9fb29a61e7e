"""The evidence lower bound (Jordan et al. 1999; Kingma & Welling 2014; Ranganath et al. 2014)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from scgjax.objectives import program
from scgjax.objectives.base import Objective


class ELBO(Objective):
    """``ELBO = E_q[log p(x, z) - log q(z)]``, estimated with ``K`` particles.

    The guide samples the latents (each with its site's estimator), the model scores them.
    Costs are the model's log-densities (latents, observations, factors) and minus the
    guide's; each score-estimated guide site is credited only with the costs downstream of it,
    element by element through plates. ``loss(rng_key, params, model, guide, *args,
    **kwargs)`` is ``-ELBO`` in value, and its gradient is an unbiased estimate of ``-grad ELBO``
    (all orders, DiCE). Discrete guide sites default to RLOO (``K >= 2``) or the score
    function with a moving-average baseline: never a silently wrong gradient.

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> model = lambda: sg.sample("x", dist.Normal(sg.sample("z", dist.Normal(0., 1.)), 1.),
        ...                           obs=1.0)
        >>> guide = lambda: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
        >>> params = sg.init_params(0, model, guide)
        >>> grads = jax.grad(sg.ELBO(num_particles=8).loss, argnums=1)(
        ...     jax.random.key(0), params, model, guide)
        >>> sorted(grads)
        ['m']
    """

    kind = program.GUIDED

    def loss(self, rng_key: Any, params: dict, model: Callable, guide: Callable, *args: Any,
             **kwargs: Any) -> jax.Array:
        """``-ELBO`` estimate; ``jax.grad`` of it estimates ``-grad ELBO``."""
        return super().loss(rng_key, params, model, guide, *args, **kwargs)
