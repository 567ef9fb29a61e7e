"""Distributions: ``numpyro.distributions`` re-exported, with known gradient bugs fixed.

Everything in ``numpyro.distributions`` is available here under the same name
(``from scgjax import dist; dist.Normal(0., 1.)``). One class is replaced:

- :class:`BernoulliLogits`: numpyro's ``log_prob`` is ``-(max(l, 0) + log1p(exp(-|l|)) - l y)``,
  whose derivative at exactly ``l == 0`` is ``y`` instead of ``y - 1/2`` (``max`` and ``abs``
  both have zero derivative at 0 there). Zero-initialised logits hit it, and every
  score-function gradient built on it is then wrong. Ours is ``l y - softplus(l)``, whose
  derivative ``y - sigmoid(l)`` is right everywhere. :func:`sample` swaps numpyro's class for
  ours, also inside ``Independent``, ``ExpandedDistribution`` and ``MaskedDistribution``, so
  models written with ``numpyro.distributions`` directly are fixed too.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from scgjax import dist
    >>> float(jax.grad(lambda l: dist.Bernoulli(logits=l).log_prob(1.0))(0.0))
    0.5
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as _nd
from numpyro.distributions import *  # noqa: F403
from numpyro.distributions import constraints, transforms  # noqa: F401


@jax.custom_jvp
def softplus(x: jax.Array) -> jax.Array:
    """``log(1 + exp(x))``, stable, with derivative ``sigmoid(x)`` everywhere (also at 0).

    The custom derivative is about twice as cheap as differentiating ``jax.nn.softplus``
    (a ``logaddexp``), and itself differentiable, so higher derivatives stay exact.
    """
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return softplus(x), t * jax.nn.sigmoid(x)


class BernoulliLogits(_nd.BernoulliLogits):
    """Bernoulli with logits ``l``: ``log p(y) = l y - softplus(l)`` (right gradient at 0).

    ``softplus`` is taken of the logits before they are broadcast against the value, so a
    prior's logits shared over a batch are transformed once.
    """

    def log_prob(self, value):
        return value * self.logits - softplus(self.logits)


def Bernoulli(probs=None, logits=None, *, validate_args=None):  # noqa: N802
    """Bernoulli from ``probs`` or ``logits`` (the logits form uses :class:`BernoulliLogits`)."""
    if probs is not None:
        return _nd.BernoulliProbs(probs, validate_args=validate_args)
    if logits is not None:
        return BernoulliLogits(logits, validate_args=validate_args)
    raise ValueError("Bernoulli needs one of `probs` or `logits`")


def fix_known_bugs(fn: _nd.Distribution) -> _nd.Distribution:
    """Return ``fn`` with numpyro's ``BernoulliLogits`` replaced by ours, wrappers kept."""
    if type(fn) is _nd.BernoulliLogits:
        return BernoulliLogits(fn.logits)
    if type(fn) is _nd.Independent:
        base = fix_known_bugs(fn.base_dist)
        return fn if base is fn.base_dist else base.to_event(fn.reinterpreted_batch_ndims)
    if type(fn) is _nd.ExpandedDistribution:
        base = fix_known_bugs(fn.base_dist)
        return fn if base is fn.base_dist else base.expand(fn.batch_shape)
    if type(fn) is _nd.MaskedDistribution:
        base = fix_known_bugs(fn.base_dist)
        return fn if base is fn.base_dist else base.mask(fn._mask)
    return fn
