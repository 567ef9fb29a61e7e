"""Estimators for Categorical sites that spread the particles over distinct classes: the
unordered set estimator (Kool, van Hoof & Welling, ICLR 2020) and sum-and-sample (Liu et al.,
ICML 2019; Kool et al. 2020, Appendix), :class:`SumAndSample`.

The ``K`` particles of the site are ``K`` samples *without replacement*, per plate element:
the logits are perturbed by Gumbel noise shared by all particles (Gumbel-top-``k``) and
particle ``k`` takes the ``k``-th largest, so the particles form a set ``S`` of ``K`` distinct
classes. With ``p`` the site's probabilities and ``f`` its learning signal (the costs
downstream of the site, credited element by element through plates), the estimates are

    E[f]      ~  sum_{s in S} p(s) R(S, s) f(s),
    grad E[f] ~  sum_{s in S} p(s) R(S, s) grad log p(s) [f(s) - B(S, s)],
    R(S, s)   =  p^{D \\ s}(S \\ s) / p(S),
    B(S, s)   =  sum_{s' in S} p(s') R^{D \\ s}(S, s') f(s'),
    R^{D \\ s}(S, s') = p^{D \\ {s, s'}}(S \\ {s, s'}) / p^{D \\ s}(S \\ s)  (s' != s),
    R^{D \\ s}(S, s)  = 1,

(Kool et al. 2020, eqs. 4-11) where ``p(S)`` is the probability of drawing the unordered set
``S`` without replacement and ``p^{D \\ A}(S \\ A)`` that of drawing ``S \\ A`` from the
distribution renormalised without the classes ``A``. The weights ``p(s) R(S, s)`` sum to 1;
at ``K`` = the number of classes they are ``p(s)`` and both estimates are exact.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as nd

from scgjax.errors import SiteError
from scgjax.estimators.base import (
    PARTICLE_AXIS,
    Estimator,
    ScoreContext,
    require_particles,
    zero_value,
)

__all__ = ["SumAndSample", "UnorderedSet", "categorical_logits", "set_weights"]

#: the largest ``K`` whose set probabilities are computed (exactly, over the ``K!`` orderings)
MAX_EXACT_K = 6

_WRAPPERS = (nd.ExpandedDistribution, nd.MaskedDistribution)
_CATEGORICAL = (nd.CategoricalLogits, nd.CategoricalProbs)


def categorical_logits(fn: Any) -> tuple[jax.Array, jax.Array | None] | None:
    """``(logits, mask)`` of a Categorical inside ``.expand`` / ``.mask`` wrappers (logits
    normalised, ``mask`` over the batch shape or ``None``), or ``None`` for anything else.

    Example:
        >>> from scgjax import dist
        >>> logits, mask = categorical_logits(dist.Categorical(probs=jnp.ones(4) / 4).expand([2]))
        >>> logits.shape, mask
        ((4,), None)
    """
    if isinstance(fn, _CATEGORICAL):
        return jax.nn.log_softmax(fn.logits, axis=-1), None
    if not isinstance(fn, _WRAPPERS):
        return None
    inner = categorical_logits(fn.base_dist)
    if inner is None:
        return None
    logits, mask = inner
    if isinstance(fn, nd.MaskedDistribution) and fn._mask is not True:
        own = jnp.asarray(fn._mask, bool)
        mask = own if mask is None else jnp.logical_and(mask, own)
    return logits, mask


def _particle_index() -> jax.Array | None:
    try:
        return jax.lax.axis_index(PARTICLE_AXIS)
    except NameError:
        return None


def _gather_keys(rng_key: jax.Array) -> tuple[jax.Array, Any]:
    typed = jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(rng_key) if typed else rng_key
    gathered = jax.lax.all_gather(data, PARTICLE_AXIS)
    first = gathered[0]
    if typed:
        first = jax.random.wrap_key_data(first, impl=jax.random.key_impl(rng_key))
    return first, gathered.shape[0]


def set_weights(logp: jax.Array, logp_rest: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The unordered set estimator's weights and baseline coefficients.

    ``logp`` holds ``log p(s_k)`` of the ``K`` distinct classes of the set on its last axis,
    ``logp_rest`` the log-probability of all the other classes. Returns ``w`` (``...``, K),
    ``w_k = p(s_k) R(S, s_k)``, and ``m`` (``...``, K, K), ``m_kj = p(s_j) R^{D \\ s_k}(S, s_j)``
    (so that ``B(S, s_k) = sum_j m_kj f(s_j)``), computed exactly by summing over the ``K!``
    orderings of the set (``K <= MAX_EXACT_K``).

    Example:
        >>> w, m = set_weights(jnp.log(jnp.array([0.5, 0.3, 0.2])), jnp.array(-jnp.inf))
        >>> [round(float(x), 6) for x in w]  # the whole support: w = p
        [0.5, 0.3, 0.2]
    """
    k = logp.shape[-1]
    perms = np.array(list(itertools.permutations(range(k))))  # (P, K)
    lp = logp[..., perms]  # (..., P, K)
    suffix = jax.lax.cumlogsumexp(lp, axis=lp.ndim - 1, reverse=True)
    remaining = jnp.logaddexp(logp_rest[..., None, None], suffix)  # mass left before step i
    t = lp - remaining  # log p(sigma_i) / (1 - sum_{j<i} p(sigma_j))
    log_set = jax.nn.logsumexp(t.sum(-1), axis=-1)  # log p(S)
    tail1 = t[..., 1:].sum(-1)  # (..., P)
    tail2 = t[..., 2:].sum(-1)
    first = perms[:, 0][:, None] == np.arange(k)  # (P, K)
    pair = first[:, :, None] & (perms[:, 1][:, None] == np.arange(k))[:, None, :]  # (P, K, K)
    log_p1 = jax.nn.logsumexp(jnp.where(first, tail1[..., None], -jnp.inf), axis=-2)
    log_p2 = jax.nn.logsumexp(jnp.where(pair, tail2[..., None, None], -jnp.inf), axis=-3)
    w = jnp.exp(logp + log_p1 - log_set[..., None])
    log_r = log_p2 - log_p1[..., :, None]
    eye = np.eye(k, dtype=bool)
    m = jnp.exp(logp[..., None, :] + jnp.where(eye, 0.0, log_r))
    return w, m


class _WeighedCategorical(Estimator):
    """What :class:`UnorderedSet` and :class:`SumAndSample` share: score estimators of a
    Categorical site whose particles are not drawn independently, weighed per particle."""

    score = True
    couples_particles = True
    weights_particles = True

    def bound_refusal(self) -> str:
        return (f"uses {type(self).__name__}, whose weights estimate an expectation per "
                "element, not a multi-sample bound; use VIMCO() under IWAE, or "
                f"{type(self).__name__} under ELBO or Expectation")


def _require_categorical(estimator: Estimator, name: str, fn: Any) -> int:
    """The number of classes of a Categorical site; a :class:`SiteError` naming the site
    for any other distribution."""
    parts = categorical_logits(fn)
    if parts is None:
        raise SiteError(name, f"uses {type(estimator).__name__}, which needs a Categorical "
                        "distribution (probs or logits, possibly wrapped by .expand/.mask), "
                        f"not {type(fn).__name__}")
    return parts[0].shape[-1]


@dataclasses.dataclass(frozen=True)
class UnorderedSet(_WeighedCategorical):
    """The unordered set estimator with its built-in baseline (Kool, van Hoof & Welling,
    "Estimating gradients for discrete random variables by sampling without replacement",
    ICLR 2020), for Categorical sites, per plate element.

    The ``K`` particles are ``K`` distinct classes drawn without replacement (Gumbel-top-``k``
    with noise shared by the particles), and the gradient estimate is

        g = sum_k p(s_k) R(S, s_k) grad log p(s_k) [f(s_k) - B(S, s_k)]

    (see :mod:`scgjax.estimators.unordered_set` for ``R`` and ``B``): unbiased, and exact
    (variance 0) when ``K`` is the number of classes. Because the plain average of the
    particles is biased for ``E[f]`` without replacement, the objective weighs every cost
    downstream of the site by ``w_k = p(s_k) R(S, s_k)`` instead of ``1 / K``
    (``weights_particles``): the loss value is minus the unbiased estimate
    ``sum_k w_k f(s_k)``, and the other gradients of those costs (their direct gradients,
    e.g. with respect to the model's parameters under ``sg.ELBO``, and the estimators of the
    sites below) are weighted the same way, which keeps them unbiased.

    Set probabilities are computed exactly by summing over the ``K!`` orderings, so
    ``K <= 6`` (``MAX_EXACT_K``); the paper's numerical integration for larger ``K`` is not
    implemented.

    Requirements (errors naming the site otherwise): a Categorical site (``probs`` or
    ``logits``; ``.expand`` and ``.mask`` are fine, ``.to_event`` is not), ``2 <= K <=``
    the number of classes; not under a multi-sample bound (``sg.IWAE``). Where the particles'
    logits of an element differ (a site whose distribution depends on another sampled site),
    that element is sampled independently per particle and estimated with RLOO's
    leave-one-out baseline instead (unbiased when the parents are drawn independently per
    particle). Refused, naming the site (the weights would bias them): a cost downstream
    that is outside one of the site's plates, a cost below two such sites, a site inside an
    ``sg.scan`` loop, and, at another site whose costs are also downstream of this one
    (below it or beside it), an estimator whose term assumes the particles' plain mean
    (DisARM, DCV, RELAX, ...; RLOO, ScoreFunction and reparameterised estimators are
    fine). The surrogate term is first-order.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> def program():
        ...     z = sg.sample("z", dist.Categorical(logits=sg.param("l", jnp.zeros(3))),
        ...                   estimator=sg.UnorderedSet())
        ...     sg.factor("f", jnp.array([1.0, 2.0, 4.0])[z])
        >>> params = sg.init_params(0, program)
        >>> obj = sg.Expectation(num_particles=3)  # K = all classes: exact
        >>> round(float(-obj.loss(jax.random.key(0), params, program)), 5)  # E f = 7 / 3
        2.33333
        >>> g = jax.grad(obj.loss, argnums=1)(jax.random.key(1), params, program)
        >>> [round(float(x), 4) for x in -g["l"]]  # p_i (f_i - E f)
        [-0.4444, -0.1111, 0.5556]
    """

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        classes = _require_categorical(self, name, fn)
        require_particles(self, name, num_particles, 2)
        if num_particles > classes:
            raise SiteError(
                name,
                f"uses UnorderedSet, which samples the num_particles={num_particles} particles "
                f"without replacement from {classes} classes: needs num_particles <= {classes}",
            )
        if num_particles > MAX_EXACT_K:
            raise SiteError(
                name,
                f"uses UnorderedSet, whose set probabilities are computed over the K! orderings "
                f"for num_particles <= {MAX_EXACT_K} (the objective has {num_particles})",
            )

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        index = _particle_index()
        own = jax.lax.stop_gradient(fn.sample(rng_key))
        if index is None:
            return own
        logits, _ = categorical_logits(fn)
        shape = tuple(fn.batch_shape)
        logits = jnp.broadcast_to(jax.lax.stop_gradient(logits), (*shape, logits.shape[-1]))
        gathered = jax.lax.all_gather(logits, PARTICLE_AXIS)  # (K, *batch, C)
        key, k = _gather_keys(rng_key)
        gumbel = jax.random.gumbel(jax.random.fold_in(key, 0x5E7), logits.shape)
        _, top = jax.lax.top_k(gathered[0] + gumbel, k)  # (*batch, K), descending
        chosen = jnp.take(top, index, axis=-1)
        same = _shared(gathered)
        return jnp.where(same, chosen, own).astype(own.dtype)

    def collect(self, msg: dict) -> dict:
        logits, mask = categorical_logits(msg["fn"])
        shape = jnp.shape(msg["value"])
        keep = jnp.ones(shape, bool) if mask is None else jnp.broadcast_to(mask, shape)
        if msg.get("mask") is not None:  # sg.handlers.mask
            keep = jnp.logical_and(keep, jnp.broadcast_to(msg["mask"], shape))
        return {"logits": jnp.broadcast_to(logits, (*shape, logits.shape[-1])), "keep": keep}

    def _set(self, ctx: ScoreContext) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Per element: whether the particles are a set drawn without replacement (``ok``),
        the weights ``w`` (``..., K``) and the baseline coefficients ``m`` (``..., K, K``)."""
        k = ctx.num_particles
        a = jax.lax.stop_gradient(ctx.collected["logits"])  # (K, *batch, C)
        same = _shared(a)  # (*batch,)
        base = a[0]  # (*batch, C)
        s = jnp.moveaxis(ctx.value, 0, -1)  # (*batch, K)
        logp = jnp.take_along_axis(base, s, axis=-1)
        in_set = jnp.any(s[..., None] == jnp.arange(base.shape[-1]), axis=-2)
        logp_rest = jax.nn.logsumexp(jnp.where(in_set, -jnp.inf, base), axis=-1)
        # Where the particles' logits differ the set is not without replacement: keep the
        # weights finite there (they are not used).
        ok = same & _distinct(s)
        w, m = set_weights(jnp.where(ok[..., None], logp, -jnp.log(k) * 1.0),
                           jnp.where(ok, logp_rest, -jnp.inf))
        return ok, w, m

    def particle_weights(self, ctx: ScoreContext) -> jax.Array:
        """``p(s_k) R(S, s_k)`` per element (``1 / K`` where the particles are drawn
        independently)."""
        ok, w, _ = self._set(ctx)
        w = jnp.where(ok[..., None], w, 1.0 / ctx.num_particles)
        return ctx.from_value_layout(jnp.moveaxis(w, -1, 0))

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        k = ctx.num_particles
        value = ctx.value
        f = jnp.broadcast_to(ctx.to_value_layout(ctx.learning_signal), value.shape)
        f = jnp.moveaxis(f, 0, -1)  # (*batch, K)
        lq = jnp.take_along_axis(ctx.collected["logits"], value[..., None], axis=-1)[..., 0]
        ok, w, m = self._set(ctx)
        baseline = jnp.einsum("...kj,...j->...k", m, f)
        # the surrogate weighs the costs (f among them) by w already: only -w B is left
        us_coef = -w * baseline
        rloo = -(f.sum(-1, keepdims=True) - f) / (k - 1) / k
        coef = jnp.where(ok[..., None], us_coef, rloo)
        keep = jnp.moveaxis(ctx.collected["keep"], 0, -1)
        coef = jax.lax.stop_gradient(jnp.where(keep, coef, 0.0))
        return jnp.sum(jnp.moveaxis(coef, -1, 0) * zero_value(lq)), ctx.state


def _shared(logits: jax.Array) -> jax.Array:
    """Per element: whether all particles (axis 0) have the same logits (last axis)."""
    return jnp.all(logits == logits[:1], axis=(0, logits.ndim - 1))


def _distinct(s: jax.Array) -> jax.Array:
    """Per element: whether the ``K`` classes on the last axis are distinct."""
    eq = s[..., :, None] == s[..., None, :]
    return jnp.sum(eq, axis=(-1, -2)) == s.shape[-1]


@dataclasses.dataclass(frozen=True)
class SumAndSample(_WeighedCategorical):
    """Sum-and-sample (Liu et al., "Rao-Blackwellized stochastic gradients for discrete
    distributions", ICML 2019; Kool et al. 2020): per plate element, particles ``0 .. k-2``
    take the ``k - 1`` most probable classes ``T`` (summed exactly) and the other
    ``m = K - k + 1`` particles sample independently from the rest, ``p_R = p / (1 - p(T))``
    on the classes outside ``T``:

        E[f]      =  sum_{x in T} p(x) f(x) + (1 - p(T)) E_{p_R}[f]
        E[f]      ~  sum_{j < k-1} p(x_j) f(x_j) + (1 - p(T)) mean_{j >= k-1} f(x_j),
        grad E[f] ~  sum_{j < k-1} grad p(x_j) f(x_j) + grad(1 - p(T)) mean_R f
                     + (1 - p(T)) mean_{j in R} grad log p_R(x_j) (f(x_j) - b_j),

    with ``b_j`` the mean of the other sampled particles' ``f`` (RLOO; none when ``m = 1``).
    Unbiased for any fixed ``T``, hence here (``T`` is piecewise constant in the logits; ties,
    e.g. at logits 0, go to the lowest class index). As for :class:`UnorderedSet`, the
    objective weighs the costs downstream of the site by the particles' weights in the
    estimate above (``p(x_j)`` for the summed classes, ``(1 - p(T)) / m`` for the sampled
    ones), so the loss value is minus that estimate and the other gradients of those costs
    stay unbiased; the same fallback applies where the particles' logits differ, and the same
    refusals.

    Requirements (errors naming the site otherwise): a Categorical site (``.expand`` and
    ``.mask`` are fine), ``1 <= k <=`` the number of classes, ``num_particles >= k``;
    not under ``sg.IWAE``.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> def program():
        ...     z = sg.sample("z", dist.Categorical(probs=sg.param("p", jnp.array([0.7, 0.2, 0.1]),
        ...                   dist.constraints.simplex)), estimator=sg.SumAndSample(2))
        ...     sg.factor("f", jnp.array([1.0, 2.0, 4.0])[z])
        >>> params = sg.init_params(0, program)
        >>> obj = sg.Expectation(num_particles=3)  # class 0 summed, two samples from {1, 2}
        >>> values = [float(-obj.loss(jax.random.key(i), params, program)) for i in range(6)]
        >>> sorted({round(v, 4) for v in values})  # 0.7 f(0) + 0.3 mean(f of the samples)
        [1.3, 1.6, 1.9]
    """

    k: int = 2

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise TypeError(f"SumAndSample(k) needs an int k >= 1, got {self.k!r}")

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        classes = _require_categorical(self, name, fn)
        if self.k > classes:
            raise SiteError(name, f"uses SumAndSample(k={self.k}), which sums over k - 1 "
                            f"classes and samples from the rest: needs k <= {classes}, the "
                            "number of classes")
        require_particles(self, name, num_particles, self.k)

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        index = _particle_index()
        own = jax.lax.stop_gradient(fn.sample(rng_key))
        if index is None:
            return own
        logits, _ = categorical_logits(fn)
        logits = jnp.broadcast_to(jax.lax.stop_gradient(logits),
                                  (*fn.batch_shape, logits.shape[-1]))
        gathered = jax.lax.all_gather(logits, PARTICLE_AXIS)
        base = gathered[0]
        summed = _top_classes(base, self.k - 1)  # (*batch, k-1)
        in_top = jnp.any(summed[..., None] == jnp.arange(base.shape[-1]), axis=-2)
        rest = jax.random.categorical(rng_key, jnp.where(in_top, -jnp.inf, base))
        if self.k == 1:
            chosen = rest
        else:
            top = jnp.take(summed, jnp.minimum(index, self.k - 2), axis=-1)
            chosen = jnp.where(index < self.k - 1, top, rest)
        return jnp.where(_shared(gathered), chosen, own).astype(own.dtype)

    collect = UnorderedSet.collect

    def _parts(self, ctx: ScoreContext) -> tuple[jax.Array, ...]:
        """Per element and particle (last axis): whether the particle is one of the summed
        classes, ``p(x_j)``, ``1 - p(T)`` (stopped), and ``log(1 - p(T))`` (differentiable,
        particles first); and per element whether the particles share their logits."""
        logits = ctx.collected["logits"]  # (K, *batch, C), differentiable
        same = _shared(jax.lax.stop_gradient(logits))
        in_top = jnp.any(_top_classes(logits, self.k - 1)[..., None]
                         == jnp.arange(logits.shape[-1]), axis=-2)  # (K, *batch, C)
        log_rest = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, logits), axis=-1)  # (K, *b)
        rest_p = jnp.moveaxis(jnp.exp(jax.lax.stop_gradient(log_rest)), 0, -1)  # (*batch, K)
        lq = jnp.take_along_axis(jax.lax.stop_gradient(logits), ctx.value[..., None],
                                 axis=-1)[..., 0]
        p = jnp.exp(jnp.moveaxis(lq, 0, -1))
        is_top = np.arange(ctx.num_particles) < self.k - 1
        return same, is_top, p, rest_p, log_rest

    def particle_weights(self, ctx: ScoreContext) -> jax.Array:
        """``p(x_j)`` for the summed classes, ``(1 - p(T)) / m`` for the ``m`` sampled ones
        (``1 / K`` where the particles are drawn independently)."""
        same, is_top, p, rest_p, _ = self._parts(ctx)
        m = ctx.num_particles - self.k + 1
        w = jnp.where(same[..., None], jnp.where(is_top, p, rest_p / m), 1.0 / ctx.num_particles)
        return ctx.from_value_layout(jnp.moveaxis(w, -1, 0))

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        big_k = ctx.num_particles
        m = big_k - self.k + 1
        value = ctx.value
        f = jnp.moveaxis(jnp.broadcast_to(ctx.to_value_layout(ctx.learning_signal),
                                          value.shape), 0, -1)  # (*batch, K)
        lq = jnp.take_along_axis(ctx.collected["logits"], value[..., None], axis=-1)[..., 0]
        same, is_top, _, rest_p, log_rest = self._parts(ctx)
        f_r = jnp.where(is_top, 0.0, f)
        mean_r = f_r.sum(-1, keepdims=True) / m
        b = (f_r.sum(-1, keepdims=True) - f_r) / (m - 1) if m > 1 else jnp.zeros_like(f)
        # the surrogate weighs the costs by the particle weights already (see the class)
        coef_q = jnp.where(is_top, 0.0, -rest_p * b / m)
        coef_rest = jnp.where(is_top, 0.0, rest_p * (mean_r - (f - b)) / m)
        rloo = -(f.sum(-1, keepdims=True) - f) / (big_k - 1) / big_k if big_k > 1 else 0.0 * f
        coef_q = jnp.where(same[..., None], coef_q, rloo)
        coef_rest = jnp.where(same[..., None], coef_rest, 0.0)
        keep = jnp.moveaxis(ctx.collected["keep"], 0, -1)
        coef_q = jax.lax.stop_gradient(jnp.where(keep, coef_q, 0.0))
        coef_rest = jax.lax.stop_gradient(jnp.where(keep, coef_rest, 0.0))
        term = (jnp.sum(jnp.moveaxis(coef_q, -1, 0) * zero_value(lq))
                + jnp.sum(jnp.moveaxis(coef_rest, -1, 0) * zero_value(log_rest)))
        return term, ctx.state


def _top_classes(logits: jax.Array, n: int) -> jax.Array:
    """The ``n`` most probable classes on the last axis (ties to the lowest index)."""
    if n == 0:
        return jnp.zeros((*logits.shape[:-1], 0), jnp.int32)
    return jax.lax.top_k(jax.lax.stop_gradient(logits), n)[1]
