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
    """What a site's estimator sees when it builds its surrogate term.

    Arrays carry a leading particle axis ``K``. Per-element arrays (``log_prob``,
    ``learning_signal``) have one axis per plate of the program (the canonical layout);
    ``to_value_layout`` maps them to the layout of the site's values.

    Attributes:
        name: the site's name.
        log_prob: ``log q(w)`` per particle and plate element, differentiable in the parameters.
        learning_signal: ``Q_w``, the sum of the costs downstream of ``w``, credited element by
            element through plates, gradient stopped.
        state: this site's estimator state (see :meth:`Estimator.init_state`).
        num_particles: ``K``.
        value: the sampled values, ``(K, *batch_shape, *event_shape)``, gradient stopped.
        collected: whatever :meth:`Estimator.collect` returned inside each particle, stacked.
        signal_grad: ``dQ_w / dw`` at the sampled values, same shape as ``value`` (the cost as
            a function of a real-valued ``w``), when the estimator sets ``needs_signal_grad``.
        params: this estimator's trainable parameters (see :meth:`Estimator.init_params`).
        to_value_layout: maps a ``(K, *plates)`` array to one that broadcasts against ``value``.
    """

    name: str
    log_prob: jax.Array
    learning_signal: jax.Array
    state: Any
    num_particles: int
    value: jax.Array | None = None
    collected: Any = None
    signal_grad: jax.Array | None = None
    params: Any = None
    to_value_layout: Any = None


class Estimator:
    """Base class of gradient estimators, chosen per site (``sg.sample(..., estimator=...)``).

    Class attributes:
        reparameterised: the sampled value carries a pathwise gradient.
        score: the site's log-density enters the DiCE box of its downstream costs.
        uses_signal: :meth:`surrogate_term` is called for the site (default: ``score``).
        needs_signal_grad: the context carries ``dQ/dw`` at the sample (for Taylor control
            variates).
    """

    reparameterised: bool = False
    score: bool = True
    needs_signal_grad: bool = False

    @property
    def uses_signal(self) -> bool:
        return self.score

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        """Raise :class:`~scgjax.errors.SiteError` if this estimator cannot serve the site."""

    def transform_fn(self, fn: Any) -> Any:
        """The distribution the site uses instead of ``fn``, in the guide *and* the model
        (e.g. a continuous relaxation). Default: ``fn`` itself."""
        return fn

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        """Draw the site's value (inside the particle ``vmap``, axis name ``"particle"``)."""
        value = fn.rsample(rng_key) if self.reparameterised else fn.sample(rng_key)
        return value if self.reparameterised else jax.lax.stop_gradient(value)

    def collect(self, msg: dict) -> Any:
        """Arrays to keep from the site's message in each particle (e.g. its logits), or
        ``None``; they reach :meth:`surrogate_term` as ``ctx.collected``."""
        return None

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict:
        """This estimator's trainable parameters for the site of ``msg`` (``{}`` if none).

        ``sg.init_params`` stores them as ``params["<site>$<key>"]``; objectives pass them back
        as ``ctx.params``. An estimator must arrange that its parameters get no gradient from
        the objective and the program's parameters none from its own training term.
        """
        return {}

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


def zero_value(x: jax.Array) -> jax.Array:
    """``x - stop_grad(x)``: value 0, gradient that of ``x`` (for training terms that must not
    change the loss value)."""
    return x - jax.lax.stop_gradient(x)


def check_estimator(name: str, estimator: Any) -> None:
    """Raise a :class:`SiteError` naming the site unless ``estimator`` is ``None`` or an
    :class:`Estimator` *instance* (a class, a string, a baseline are common slips).

    Example:
        >>> from scgjax.estimators.rloo import RLOO
        >>> check_estimator("z", RLOO())
        >>> check_estimator("z", RLOO)
        Traceback (most recent call last):
        ...
        scgjax.errors.SiteError: site 'z' was given the class RLOO ...; did you mean sg.RLOO()?
    """
    if estimator is None or isinstance(estimator, Estimator):
        return
    if isinstance(estimator, type):
        hint = (f"did you mean sg.{estimator.__name__}()?" if issubclass(estimator, Estimator)
                else "pass an estimator instance such as sg.RLOO() or sg.ScoreFunction()")
        raise SiteError(name, f"was given the class {estimator.__name__} as its estimator; "
                        f"{hint}")
    if hasattr(estimator, "init_state") and (hasattr(estimator, "baseline_for")
                                            or callable(estimator)):
        raise SiteError(name, f"was given the baseline {estimator!r} as its estimator; a "
                        "baseline goes inside a score-function estimator: "
                        "estimator=sg.ScoreFunction(baseline=...)")
    raise SiteError(name, f"needs an scgjax estimator (an instance of sg.Estimator such as "
                    f"sg.Pathwise(), sg.ScoreFunction() or sg.RLOO()), got "
                    f"{type(estimator).__name__} {estimator!r}")


def require_particles(estimator: Estimator, name: str, num_particles: int, minimum: int) -> None:
    """Raise a :class:`SiteError` naming the site if fewer than ``minimum`` particles."""
    if num_particles < minimum:
        raise SiteError(
            name,
            f"uses {type(estimator).__name__}, which needs num_particles >= {minimum} "
            f"(the objective has {num_particles})",
        )
