"""Antithetic estimators for Bernoulli sites: DisARM (Dong, Mnih & Tucker, NeurIPS 2020) and
ARM (Yin & Zhou, ICLR 2019).

Both pair the ``K`` particles: particle ``k`` and particle ``k + K/2`` (``K`` even) share one
uniform per element, ``u`` in the first and ``1 - u`` in the second, so that with logits
``alpha``

    b = 1[u < sigmoid(alpha)],      b~ = 1[1 - u < sigmoid(alpha)]

(the convention of Dong et al. 2020). Each particle alone is an exact ``Bernoulli(sigmoid(alpha))``
draw; the pair is antithetic (at ``alpha = 0`` the two values are always complementary). The
estimators use the learning signal ``f`` (the costs downstream of the site, credited element
by element through plates) of both particles of a pair; they add no score term to the DiCE
surrogate (``score = False``), only a zero-valued term whose gradient is the estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.estimators.base import (
    PARTICLE_AXIS,
    Estimator,
    ScoreContext,
    require_particles,
    zero_value,
)
from scgjax.estimators.bernoulli import bernoulli_parts, logits_and_keep, require_bernoulli

__all__ = ["ARM", "DisARM"]

def _particle_index() -> jax.Array | None:
    """The particle's index inside the objective's particle ``vmap``, ``None`` outside it."""
    try:
        return jax.lax.axis_index(PARTICLE_AXIS)
    except NameError:
        return None


def antithetic_uniform(rng_key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A uniform array of ``shape``: ``u`` in particle ``k < K/2`` and ``1 - u`` in particle
    ``k + K/2``, with ``u`` drawn from the key of particle ``k``.

    Inside the particle ``vmap`` (axis ``"particle"``) the keys of all particles are gathered
    (``all_gather``, vectorised) and each particle reads the one of the first particle of its
    pair. Outside it (abstract tracing, ``sg.init_params``, a plain seeded run) it is an
    ordinary uniform draw from ``rng_key``.

    Example:
        >>> keys = jax.random.split(jax.random.key(0), 4)
        >>> u = jax.vmap(lambda k: antithetic_uniform(k, (3,)), axis_name="particle")(keys)
        >>> bool(jnp.allclose(u[:2] + u[2:], 1.0))
        True
    """
    index = _particle_index()
    if index is None:
        return jax.random.uniform(rng_key, shape)
    typed = jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(rng_key) if typed else rng_key
    gathered = jax.lax.all_gather(data, PARTICLE_AXIS)  # (K, *key shape): keys, not draws
    half = max(gathered.shape[0] // 2, 1)
    first = gathered[index % half]
    if typed:
        first = jax.random.wrap_key_data(first, impl=jax.random.key_impl(rng_key))
    u = jax.random.uniform(first, shape)
    return jnp.where(index < half, u, 1.0 - u)


@dataclasses.dataclass(frozen=True)
class _Antithetic(Estimator):
    """What ARM and DisARM share: validation, coupled sampling, the collected logits."""

    score = False
    couples_particles = True
    _needs_uniform = False  # ARM: collect each particle's uniform
    _couples_logits = True  # DisARM: valid only where the pair shares its logits

    @property
    def uses_signal(self) -> bool:
        return True

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        kind = type(self).__name__
        require_bernoulli(self, name, fn)
        require_particles(self, name, num_particles, 2)
        if num_particles % 2:
            raise SiteError(
                name,
                f"uses {kind}, which pairs particle k with particle k + K/2 and needs an even "
                f"num_particles (the objective has {num_particles})",
            )

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        logits, _ = bernoulli_parts(fn)
        shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
        u = antithetic_uniform(rng_key, shape)
        b = u < jax.nn.sigmoid(jnp.broadcast_to(jax.lax.stop_gradient(logits), shape))
        return b.astype(jnp.result_type(b, int))  # numpyro's Bernoulli dtype

    def collect(self, msg: dict) -> dict:
        out = logits_and_keep(msg)
        if self._needs_uniform:
            out["u"] = antithetic_uniform(msg["kwargs"]["rng_key"], jnp.shape(msg["value"]))
        return out

    def coefficients(self, f: jax.Array, b: jax.Array, partner_b: jax.Array,
                     alpha: jax.Array, collected: dict) -> jax.Array:
        """The per-particle coefficient ``c_k`` of the gradient w.r.t. ``alpha_k``."""
        raise NotImplementedError

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        k = ctx.num_particles
        half = k // 2
        alpha = ctx.collected["logits"]
        a = jax.lax.stop_gradient(alpha)
        b = ctx.value.astype(a.dtype)
        f = ctx.to_value_layout(ctx.learning_signal)

        def partner(x: jax.Array) -> jax.Array:  # particle k <-> k + K/2
            return jnp.concatenate([x[half:], x[:half]], axis=0)

        coef = self.coefficients(f, b, partner(b), a, ctx.collected)
        if self._couples_logits:
            coef = jnp.where(a == partner(a), coef, self._fallback(f, b, a, partner))
        coef = jnp.where(ctx.collected["keep"], coef, 0.0)
        coef = jax.lax.stop_gradient(coef)
        return zero_value(jnp.sum(alpha * coef)) / k, ctx.state

    def _fallback(self, f: jax.Array, b: jax.Array, a: jax.Array, partner: Any) -> jax.Array:
        # Where the two particles of a pair have different logits (logits computed from
        # values that differ between them, e.g. a site below a sampled one), the pair is
        # not antithetic for this site: use the score function with a leave-pair-out
        # baseline there, which stays unbiased.
        k = f.shape[0]
        others = f.sum(0, keepdims=True) - f - partner(f)
        baseline = others / (k - 2) if k > 2 else jnp.zeros_like(f)
        return (b - jax.nn.sigmoid(a)) * (f - baseline)


@dataclasses.dataclass(frozen=True)
class DisARM(_Antithetic):
    """DisARM (Dong, Mnih & Tucker, NeurIPS 2020): ARM Rao-Blackwellised over ``u``.

    For a pair with values ``b, b~`` (see the module docstring) and learning signals
    ``f(b), f(b~)`` (one number per plate element for the whole event block), the gradient
    w.r.t. the logits ``alpha``, element by element, is

        g_alpha = 1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|alpha|),

    averaged over the ``K/2`` pairs. It is computed per particle as
    ``(1/K) sum_k f_k (-1)^{b_partner} 1[b_k != b_partner] sigmoid(|alpha_k|)`` times
    ``d alpha_k``, which equals the pair formula when both particles' logits share their
    derivative, and stays unbiased otherwise. Unbiased; for a factorised multivariate
    Bernoulli (``.to_event``) each dimension uses the whole block's ``f`` (Dong et al. §3).

    Requirements: a Bernoulli site (logits or probs; ``.to_event``, ``.expand`` and ``.mask``
    wrappers are fine), an even ``num_particles >= 2`` (errors naming the site otherwise).
    The pair is antithetic where the two particles have the same logits (logits computed
    from parameters and data, as in a guide's first layer); where they differ (a site whose
    distribution depends on another sampled site) the pair cannot be coupled for this site
    and the estimator falls back, per element, to the score function with a leave-pair-out
    baseline (``K >= 4``; none at ``K = 2``): still unbiased, without DisARM's variance
    reduction. The surrogate term is first-order: its higher derivatives are not estimates.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> from scgjax.estimators.disarm import DisARM
        >>> def program():
        ...     z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0)), estimator=DisARM())
        ...     sg.factor("f", 2.0 * z)
        >>> params = sg.init_params(0, program)
        >>> g = jax.grad(sg.Expectation(num_particles=2).loss, argnums=1)(
        ...     jax.random.key(0), params, program)
        >>> float(-g["l"])  # sigmoid'(0) (f(1) - f(0)) = 0.5, exactly, at logits 0
        0.5
    """

    def coefficients(self, f, b, partner_b, alpha, collected):
        differ = b != partner_b
        sign = 1.0 - 2.0 * partner_b  # (-1)^{b~}
        return jnp.where(differ, f * sign * jax.nn.sigmoid(jnp.abs(alpha)), 0.0)


@dataclasses.dataclass(frozen=True)
class ARM(_Antithetic):
    """ARM, the augment-REINFORCE-merge estimator (Yin & Zhou, ICLR 2019).

    With the pair's uniform ``u`` (``b = 1[u < sigmoid(alpha)]``, ``b~ = 1[u > sigmoid(-alpha)]``,
    the value of the partner particle, which draws ``1 - u``), the gradient w.r.t. the logits
    is

        g_alpha = (f(b~) - f(b)) (u - 1/2),

    averaged over the ``K/2`` pairs; per particle, ``(1/K) sum_k f_k (1 - 2 u_k) d alpha_k``
    (each particle's term is itself unbiased; the pair makes a constant ``f`` cancel).
    Unbiased, with higher variance than :class:`DisARM` (which integrates ``u`` out given the
    pair's values). Requirements as for :class:`DisARM`; ``u`` is recomputed from the site's
    key, so the site's value must be the one the estimator drew (not substituted).

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> from scgjax.estimators.disarm import ARM
        >>> ARM().validate("z", dist.Bernoulli(logits=0.0), 2)
    """

    _needs_uniform = True
    _couples_logits = False  # each particle's term is unbiased on its own

    def coefficients(self, f, b, partner_b, alpha, collected):
        u = jax.lax.stop_gradient(collected["u"])
        return f * (1.0 - 2.0 * u)
