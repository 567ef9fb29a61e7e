"""What the estimators for Bernoulli sites (DCV, ARM, DisARM) share: finding the logits and
the masked elements of a possibly wrapped Bernoulli site."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as nd

from scgjax.errors import SiteError

WRAPPERS = (nd.Independent, nd.ExpandedDistribution, nd.MaskedDistribution)
BERNOULLI = (nd.BernoulliLogits, nd.BernoulliProbs)


def unwrap(fn: Any) -> tuple[Any, jax.Array | None]:
    """``(innermost distribution, mask)`` of ``fn`` under ``Independent`` /
    ``ExpandedDistribution`` / ``MaskedDistribution`` wrappers; ``mask`` (``None`` when nothing
    is masked) is padded with the event dims, so that it broadcasts against the values of
    ``fn`` (right-aligned).

    Example:
        >>> import jax.numpy as jnp
        >>> from scgjax import dist
        >>> fn = dist.Normal(0.0, 1.0).expand([3]).mask(jnp.array([True, False, True]))
        >>> inner, mask = unwrap(fn.to_event(1))
        >>> type(inner).__name__, mask.tolist()
        ('Normal', [True, False, True])
    """
    mask = None
    while isinstance(fn, WRAPPERS):
        if isinstance(fn, nd.MaskedDistribution) and fn._mask is not True:
            # over the batch shape; padded with the event dims to reach the value layout
            own = jnp.asarray(fn._mask, bool)
            own = jnp.reshape(own, own.shape + (1,) * len(fn.event_shape))
            mask = own if mask is None else jnp.logical_and(mask, own)
        fn = fn.base_dist
    return fn, mask


def bernoulli_parts(fn: Any) -> tuple[jax.Array, jax.Array | None] | None:
    """``(logits, mask)`` of a Bernoulli inside ``Independent`` / ``ExpandedDistribution`` /
    ``MaskedDistribution`` wrappers, each broadcastable against the values of ``fn``
    (right-aligned; ``mask`` is ``None`` when nothing is masked, see :func:`unwrap`), or
    ``None`` if ``fn`` is not such a Bernoulli. Probabilities are turned into logits.

    Example:
        >>> import jax.numpy as jnp
        >>> from scgjax import dist
        >>> logits, mask = bernoulli_parts(dist.Bernoulli(logits=jnp.zeros(3)).to_event(1))
        >>> logits.shape, mask
        ((3,), None)
    """
    inner, mask = unwrap(fn)
    return (inner.logits, mask) if isinstance(inner, BERNOULLI) else None


def value_keep(msg: dict, mask: jax.Array | None) -> jax.Array:
    """A boolean ``keep`` in the layout of the site's value: False where masked by the
    distribution's ``mask`` (value layout, or ``None``) or by ``sg.handlers.mask``."""
    shape = jnp.shape(msg["value"])
    keep = jnp.ones(shape, bool) if mask is None else jnp.broadcast_to(mask, shape)
    if msg.get("mask") is not None:  # sg.handlers.mask: over the batch shape
        site = jnp.reshape(msg["mask"], jnp.shape(msg["mask"])
                           + (1,) * len(msg["fn"].event_shape))
        keep = jnp.logical_and(keep, site)
    return keep


def logits_and_keep(msg: dict, parts: tuple[jax.Array, jax.Array | None] | None = None
                    ) -> dict[str, jax.Array]:
    """The site's logits and a boolean ``keep`` (False where masked by ``.mask`` or
    ``sg.handlers.mask``), both in the layout of its value; ``parts`` is ``(logits, mask)``
    in that layout (default: the Bernoulli's, :func:`bernoulli_parts`)."""
    logits, mask = bernoulli_parts(msg["fn"]) if parts is None else parts
    return {"logits": jnp.broadcast_to(logits, jnp.shape(msg["value"])),
            "keep": value_keep(msg, mask)}


def require_bernoulli(estimator: Any, name: str, fn: Any) -> None:
    """A :class:`~scgjax.errors.SiteError` naming site ``name`` unless ``fn`` is a Bernoulli
    distribution (what :func:`bernoulli_parts` reads), for estimators defined for one."""
    if bernoulli_parts(fn) is None:
        kind = type(estimator).__name__
        raise SiteError(name, f"uses {kind}, but its distribution is {type(fn).__name__}; "
                        f"{kind} needs a Bernoulli site (dist.Bernoulli(logits=...) or "
                        "probs=..., possibly with .to_event / .expand / .mask); for a "
                        "Categorical use sg.RLOO() or sg.ScoreFunction()")
