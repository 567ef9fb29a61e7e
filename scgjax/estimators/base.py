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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.primitives import check_estimator

__all__ = ["Estimator", "ScoreContext", "check_estimator", "magic_box", "require_particles",
           "zero_value"]

PARTICLE_AXIS = "particle"


def magic_box(x: jax.Array) -> jax.Array:
    """DiCE's magic box: ``exp(x - stop_grad(x))``, value 1, derivative ``box(x) * dx``.

    Example:
        >>> float(magic_box(jnp.array(3.0))), float(jax.grad(magic_box)(3.0))
        (1.0, 1.0)
    """
    return jnp.exp(x - jax.lax.stop_gradient(x))


def _identity(x: jax.Array) -> jax.Array:
    return x


@dataclasses.dataclass(frozen=True)
class ScoreContext:
    """What a site's estimator sees when it builds its surrogate term.

    Arrays carry a leading particle axis ``K``. Per-element arrays (``log_prob``,
    ``learning_signal``) have one axis per plate of the program (the canonical layout);
    ``to_value_layout`` maps them to the layout of the site's values and
    ``from_value_layout`` back (:class:`scgjax.layout.SiteLayout`).

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
        signal_at: ``Q_w`` as a function of the site's values, ``(K, *value_shape) -> (K,
            *plates)``: the program run again with the site's value replaced (the same keys,
            the program's parameters gradient-stopped; differentiable in the values), when the
            estimator sets ``needs_signal_at`` (:mod:`scgjax.objectives.rerun`).
        params: this estimator's trainable parameters (see :meth:`Estimator.init_params`).
        to_value_layout: maps a ``(K, *plates)`` array to one that broadcasts against ``value``
            (:meth:`scgjax.layout.SiteLayout.to_value`; the identity by default).
        from_value_layout: its inverse (:meth:`scgjax.layout.SiteLayout.from_value`).
    """

    name: str
    log_prob: jax.Array
    learning_signal: jax.Array
    state: Any
    num_particles: int
    value: jax.Array | None = None
    collected: Any = None
    signal_grad: jax.Array | None = None
    signal_at: Callable[[jax.Array], jax.Array] | None = None
    params: Any = None
    to_value_layout: Callable[[jax.Array], jax.Array] = _identity
    from_value_layout: Callable[[jax.Array], jax.Array] = _identity


class Estimator:
    """Base class of gradient estimators, chosen per site (``sg.sample(..., estimator=...)``).

    Capabilities (class attributes that objectives read; they never test an estimator's
    class, so a new estimator is one module that sets these):

        reparameterised: the sampled value carries a pathwise gradient.
        score: the site's log-density enters the DiCE box of its downstream costs.
        uses_signal: :meth:`surrogate_term` is called for the site (default: ``score``).
        needs_signal_grad: the context carries ``dQ/dw`` at the sample (for Taylor control
            variates).
        needs_signal_at: the context carries ``signal_at``, ``Q_w`` at other values of the
            site (each call runs the program once more; for measure-valued derivatives and
            REBAR's relaxed control variate). Only for objectives with a per-particle learning
            signal, and not in an ``sg.scan`` loop. ``signal_at.coupled`` marks the plates
            along which a credited cost depends on all elements at once; such plates are
            refused unless the estimator sets ``runs_coupled_elements`` (it changes their
            elements one at a time).
        differentiates_signal_at: the estimator differentiates ``signal_at`` at real values
            of the site (a relaxation): every cost that depends on the site must depend on it
            differentiably, which the objective checks (an error naming the site and cost).
        enumerates: the site is summed over its support instead of sampled (every element set
            to each support value in turn, weighted by its probability).
        bound_signal: how the site's score is weighted under a multi-sample bound
            (``sg.IWAE``), whose learning signal is the bound itself, shared by the particles:
            ``"plain"`` (no baseline), ``"leave_one_out"`` (VIMCO's per-particle baselines
            from the bound's log-weights), or ``None``: not supported, and
            :meth:`bound_refusal` says why. Reparameterised sites without a signal need none.
        importance_weighted: the site is sampled without any gradient path (its value and its
            score both detached), so objectives that train the guide by importance weights
            alone (``sg.RWS``, ``sg.WakeSleep``) may use it.
        couples_particles: :meth:`sample` uses the particle axis (a collective over
            ``"particle"``), so the particles cannot run in separate blocks.
        stops_own_density: the site's own cost ``-log q(w)`` is taken at gradient-stopped
            distribution parameters (its value keeps its path), as in STL and DReG.
        needs_bound: only a multi-sample bound (``sg.IWAE``) can use the site's estimator;
            other objectives refuse it, naming the site.
        weights_particles: the particles of the site are not drawn independently (e.g.
            without replacement), and :meth:`particle_weights` gives each particle's weight in
            the estimate of an expectation, per element: the surrogate weighs every cost
            downstream of the site by it instead of ``1 / K``.
        zero_mean_term: :meth:`surrogate_term`'s derivatives have mean zero given the
            particles' values (a baseline), so it stays unbiased when the costs are weighted
            per particle; the default term is. Only such estimators (or ones without a
            learning signal) may serve a site below one that ``weights_particles``.
    """

    reparameterised: bool = False
    score: bool = True
    needs_signal_grad: bool = False
    needs_signal_at: bool = False
    runs_coupled_elements: bool = False
    differentiates_signal_at: bool = False
    enumerates: bool = False
    bound_signal: str | None = None
    importance_weighted: bool = False
    couples_particles: bool = False
    stops_own_density: bool = False
    needs_bound: bool = False
    weights_particles: bool = False

    @property
    def zero_mean_term(self) -> bool:
        return type(self).surrogate_term is Estimator.surrogate_term

    def bound_refusal(self) -> str:
        """Why this estimator cannot serve a multi-sample bound (when ``bound_signal`` is
        ``None``), and what to use instead."""
        return (f"uses {type(self).__name__}, which a multi-sample bound does not support (its "
                "signal is defined per particle); use VIMCO(), ScoreFunction() without a "
                "baseline, or Pathwise()")

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

    def particle_weights(self, ctx: ScoreContext) -> jax.Array:
        """Each particle's weight in the estimate ``sum_k omega_k f(w_k)`` of ``E f(w)``, per
        element, in the layout of ``ctx.log_prob`` (``(K, *plates)``; summing to 1 over the
        particles, gradient stopped), for an estimator that sets ``weights_particles``."""
        raise NotImplementedError(f"{type(self).__name__} does not weigh its particles")

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


def require_particles(estimator: Estimator, name: str, num_particles: int, minimum: int) -> None:
    """Raise a :class:`SiteError` naming the site if fewer than ``minimum`` particles."""
    if num_particles < minimum:
        raise SiteError(
            name,
            f"uses {type(estimator).__name__}, which needs num_particles >= {minimum} "
            f"(the objective has {num_particles})",
        )
