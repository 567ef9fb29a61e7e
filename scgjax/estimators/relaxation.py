"""Continuous relaxations of discrete sites: Gumbel-softmax / Concrete (Maddison, Mnih & Teh,
ICLR 2017; Jang, Gu & Poole, ICLR 2017) and its straight-through form.

A relaxed site draws, instead of a discrete value, a point of the simplex that is
differentiable in the logits ``alpha``:

    y = softmax((alpha + g) / tau),    g_i ~ Gumbel(0, 1) i.i.d.     (categorical, ``n`` classes)
    y = sigmoid((alpha + l) / tau),    l ~ Logistic(0, 1)            (Bernoulli, "binary Concrete")

and the gradient flows through ``y`` (pathwise). As ``tau -> 0``, ``y`` tends to the one-hot
``argmax_i (alpha_i + g_i)``, an exact draw of the discrete distribution (the Gumbel-max trick).

This module also provides the distributions the relaxations need: :class:`OneHotCategorical`
(a categorical whose values are one-hot vectors, so that a model written for it accepts a
relaxed value too) and :class:`RelaxedOneHotCategorical` (the Concrete distribution; numpyro
has ``RelaxedBernoulliLogits`` for the binary case but no categorical one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as nd

from scgjax import dist as _dist
from scgjax.dist import OneHotCategorical, RelaxedOneHotCategorical
from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator
from scgjax.estimators.bernoulli import WRAPPERS

__all__ = ["GumbelSoftmax", "OneHotCategorical", "RelaxedOneHotCategorical",
           "StraightThrough"]


class _StraightThroughDistribution(nd.Distribution):
    """Draws a hard value with the gradient of a relaxed one; scores it with the discrete
    log-mass. ``relaxed`` gives the sample, ``discrete`` (values in the same one-hot layout)
    the density; ``hard`` maps a relaxed value to the discrete one."""

    pytree_data_fields = ("relaxed", "discrete")
    has_rsample = True

    def __init__(self, relaxed: nd.Distribution, discrete: nd.Distribution, *,
                 validate_args: Any = None):
        self.relaxed, self.discrete = relaxed, discrete
        super().__init__(relaxed.batch_shape, relaxed.event_shape, validate_args=validate_args)

    @property
    def support(self) -> Any:
        return self.discrete.support

    def _hard(self, y: jax.Array) -> jax.Array:
        if self.event_shape:  # one-hot argmax
            return jax.nn.one_hot(jnp.argmax(y, axis=-1), y.shape[-1], dtype=y.dtype)
        return (y > 0.5).astype(y.dtype)  # sigmoid((alpha + l) / tau) > 1/2 iff alpha + l > 0

    def rsample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        y = self.relaxed.rsample(key, sample_shape)
        # Forward exactly the hard value (y - stop_grad(y) is exactly 0), backward d y.
        return self._hard(jax.lax.stop_gradient(y)) + (y - jax.lax.stop_gradient(y))

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        return self.rsample(key, sample_shape)

    def log_prob(self, value: jax.Array) -> jax.Array:
        return self.discrete.log_prob(value)


_BERNOULLI = (nd.BernoulliLogits, nd.BernoulliProbs)
_CATEGORICAL = (nd.CategoricalLogits, nd.CategoricalProbs, OneHotCategorical)
_RELAXED = (nd.RelaxedBernoulliLogits, RelaxedOneHotCategorical, _StraightThroughDistribution)


def _base(fn: Any) -> Any:
    while isinstance(fn, WRAPPERS):
        fn = fn.base_dist
    return fn


def _rewrap(fn: Any, transform: Any) -> Any:
    """Apply ``transform`` to the innermost distribution of ``fn`` and re-apply the
    ``.to_event`` / ``.expand`` / ``.mask`` wrappers around it."""
    if isinstance(fn, nd.Independent):
        return _rewrap(fn.base_dist, transform).to_event(fn.reinterpreted_batch_ndims)
    if isinstance(fn, nd.ExpandedDistribution):
        return _rewrap(fn.base_dist, transform).expand(fn.batch_shape)
    if isinstance(fn, nd.MaskedDistribution):
        return _rewrap(fn.base_dist, transform).mask(fn._mask)
    return transform(fn)


@dataclasses.dataclass(frozen=True)
class GumbelSoftmax(Estimator):
    """The Gumbel-softmax / Concrete relaxation (Maddison et al. 2017; Jang et al. 2017):
    pathwise gradients through a relaxed sample. **Biased** for the discrete objective.

    The site (and the model's site of the same name) uses the relaxed distribution with the
    same logits ``alpha`` and temperature ``tau``: a Bernoulli becomes numpyro's
    ``RelaxedBernoulliLogits(tau, alpha)`` (values in (0, 1)); a ``Categorical`` or
    :class:`OneHotCategorical` becomes :class:`RelaxedOneHotCategorical` (values on the
    simplex, event shape ``(n,)``: for a ``Categorical`` site the value is then a vector, not
    an index, so the model must accept a one-hot / relaxed value; write such sites with
    :class:`OneHotCategorical`). The costs see the relaxed value, with log-densities under the
    relaxed distributions (the "relaxed ELBO" of Maddison et al. §3.2, one temperature for
    guide and model). ``.to_event``, ``.expand`` and ``.mask`` wrappers are kept.

    What it estimates: the exact gradient of the *relaxed* objective ``E_{y ~
    Concrete(alpha, tau)}[f(y)]`` (unbiased for that), not of the discrete
    ``E_{z ~ Cat(alpha)}[f(z)]``: the bias vanishes as ``tau -> 0`` for costs continuous on
    the simplex, while the variance grows (roughly like ``1 / tau``). The loss value is the
    relaxed objective too. The costs must be differentiable functions of a real-valued
    value (no ``astype(int)``, no indexing with it).

    ``straight_through=True`` (:class:`StraightThrough`, Jang et al. 2017 §2.2, "ST
    Gumbel-softmax"): the value is the hard sample ``z = onehot(argmax(y))`` (``1[y > 1/2]``
    for a Bernoulli), an exact draw of the discrete distribution, with the gradient of the
    relaxed ``y`` (``z + y - stop_grad(y)``); the costs use ``z`` with the *discrete*
    log-masses, so the loss value is an unbiased estimate of the discrete objective. Its
    gradient ``df/dz|_z dy/dalpha`` is biased even as ``tau -> 0`` (it is a heuristic).

    Requirements: a Bernoulli (logits or probs), ``Categorical`` or :class:`OneHotCategorical`
    site (an error naming the site otherwise); ``temperature > 0``. Adds no score term.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> from scgjax.estimators.relaxation import GumbelSoftmax
        >>> def program():
        ...     z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0)),
        ...                   estimator=GumbelSoftmax(0.5))
        ...     sg.factor("f", (z - 0.3) ** 2)
        >>> params = sg.init_params(0, program)
        >>> g = jax.grad(sg.Expectation(num_particles=8).loss, argnums=1)(
        ...     jax.random.key(0), params, program)
        >>> bool(jnp.isfinite(g["l"]))
        True
    """

    temperature: float
    straight_through: bool = False

    reparameterised = True
    score = False

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, int | float) and not t > 0:
            raise ValueError(f"{type(self).__name__} needs temperature > 0, got {t!r}")

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        if not isinstance(_base(fn), _BERNOULLI + _CATEGORICAL + _RELAXED):
            raise SiteError(
                name,
                f"uses {type(self).__name__}, which relaxes Bernoulli and categorical "
                f"distributions (Bernoulli, Categorical, OneHotCategorical), not "
                f"{type(_base(fn)).__name__}",
            )

    def transform_fn(self, fn: Any) -> Any:
        """The relaxed (or straight-through) distribution with ``fn``'s logits; other
        distributions (e.g. a model's own density on (0, 1)) are left as they are."""
        if not isinstance(_base(fn), _BERNOULLI + _CATEGORICAL):
            return fn
        return _rewrap(fn, self._relax)

    def _relax(self, fn: Any) -> nd.Distribution:
        tau = self.temperature
        if isinstance(fn, _BERNOULLI):
            relaxed = nd.RelaxedBernoulliLogits(tau, fn.logits)
            discrete = _dist.BernoulliLogits(fn.logits)
        else:
            relaxed = RelaxedOneHotCategorical(tau, fn.logits)
            discrete = OneHotCategorical(fn.logits)
        if self.straight_through:
            return _StraightThroughDistribution(relaxed, discrete)
        return relaxed


@dataclasses.dataclass(frozen=True)
class StraightThrough(GumbelSoftmax):
    """Straight-through Gumbel-softmax: ``GumbelSoftmax(temperature, straight_through=True)``
    (see :class:`GumbelSoftmax`). **Biased**: hard values and discrete log-masses forward,
    the relaxed sample's gradient backward (Jang et al. 2017; Bengio et al. 2013).

    Example:
        >>> from scgjax import dist
        >>> from scgjax.estimators.relaxation import StraightThrough
        >>> fn = StraightThrough(1.0).transform_fn(dist.Bernoulli(logits=jnp.zeros(4)))
        >>> sorted(set(fn.rsample(jax.random.key(1)).tolist())) in ([0.0], [1.0], [0.0, 1.0])
        True
    """

    temperature: float = 1.0
    straight_through: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.straight_through:
            raise ValueError("StraightThrough is GumbelSoftmax(straight_through=True); use "
                             "GumbelSoftmax(temperature) for the plain relaxation")
