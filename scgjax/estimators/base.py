"""The estimator protocol: how a site is sampled and what its score term adds.

Objectives build the DiCE surrogate (Foerster et al. 2018)

    S = sum_c box(sum_{w upstream of c} log q(w)) * c      with  box(t) = exp(t - stop_grad(t)),

element by element through plates, over the *score* nodes ``w`` (``Estimator.score``). Each
score node's estimator then adds one term, :meth:`Estimator.surrogate_term`, whose value is 0;
the default form is a baseline, ``sum (1 - box(log q(w))) * b_w`` (Mao et al. 2019), whose
derivatives of every order vanish in expectation when ``b_w`` does not depend on ``w``. An
estimator is a small frozen object; anything it learns or tracks lives in an explicit state
pytree (:meth:`init_state`) that objectives thread through, never in the object itself.

Adding an estimator is one new module that subclasses :class:`Estimator`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError

PARTICLE_AXIS = "particle"


def magic_box(x: jax.Array) -> jax.Array:
    """DiCE's magic box: ``exp(x - stop_grad(x))``, value 1, derivative ``box(x) * dx``.

    Example:
        >>> float(magic_box(jnp.array(3.0))), float(jax.grad(magic_box)(3.0))
        (1.0, 1.0)
    """
    return jnp.exp(x - jax.lax.stop_gradient(x))


@dataclasses.dataclass(frozen=True)
class ScoreContext:
    """What a score node's estimator sees when it builds its surrogate term.

    Attributes:
        name: the site's name.
        log_prob: ``log q(w)`` per particle and plate element, shape ``(K, *plates)``,
            differentiable in the parameters.
        learning_signal: ``Q_w``, the sum of the costs downstream of ``w``, credited element by
            element through plates, same shape, gradient stopped.
        state: this site's estimator state (see :meth:`Estimator.init_state`).
        num_particles: ``K``.
    """

    name: str
    log_prob: jax.Array
    learning_signal: jax.Array
    state: Any
    num_particles: int


class Estimator:
    """Base class of gradient estimators, chosen per site (``sg.sample(..., estimator=...)``).

    Class attributes:
        reparameterised: the sampled value carries a pathwise gradient.
        score: the site's log-density enters the surrogate (score-function family).
    """

    reparameterised: bool = False
    score: bool = True

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        """Raise :class:`~scgjax.errors.SiteError` if this estimator cannot serve the site."""

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        """Draw the site's value (inside the particle ``vmap``, axis name ``"particle"``)."""
        value = fn.rsample(rng_key) if self.reparameterised else fn.sample(rng_key)
        return value if self.reparameterised else jax.lax.stop_gradient(value)

    def init_state(self) -> Any:
        """This estimator's initial state for one site (a pytree; ``{}`` when stateless)."""
        return {}

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array | None, Any]:
        """A baseline ``b_w`` broadcastable to ``ctx.log_prob`` (or ``None``) and new state."""
        return None, ctx.state

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        """A scalar of value 0 added to the particle-averaged surrogate, and the new state.

        Default: ``mean_k sum (1 - box(log q)) * stop_grad(b)`` for :meth:`baseline_for`'s ``b``.
        """
        b, state = self.baseline_for(ctx)
        if b is None:
            return jnp.zeros(()), state
        b = jax.lax.stop_gradient(jnp.broadcast_to(b, ctx.log_prob.shape))
        term = (1.0 - magic_box(ctx.log_prob)) * b
        return term.sum() / ctx.num_particles, state


def require_particles(estimator: Estimator, name: str, num_particles: int, minimum: int) -> None:
    """Raise a :class:`SiteError` naming the site if fewer than ``minimum`` particles."""
    if num_particles < minimum:
        raise SiteError(
            name,
            f"uses {type(estimator).__name__}, which needs num_particles >= {minimum} "
            f"(the objective has {num_particles})",
        )
