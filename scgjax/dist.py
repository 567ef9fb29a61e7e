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

import contextlib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as _nd
from jax.scipy.special import gammaln, logsumexp
from numpyro.distributions import *  # noqa: F403
from numpyro.distributions import constraints, transforms  # noqa: F401
from numpyro.distributions.util import validate_sample


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


_CHECK_TRACED: list[bool] = [False]


@contextlib.contextmanager
def check_traced_values():
    """Within it, the ``log_prob`` overrides of this module check traced values against the
    support too (``-inf`` outside it), as numpyro's own classes do: used for *observed* values,
    which may be new data in every step of a jitted loop."""
    _CHECK_TRACED.append(True)
    try:
        yield
    finally:
        _CHECK_TRACED.pop()


def validate_concrete_sample(log_prob_fn: Any) -> Any:
    """numpyro's ``validate_sample`` for a ``log_prob`` override, applied to concrete values
    (and to traced ones inside :func:`check_traced_values`).

    With validation on (numpyro's default), a value outside the support gets ``-inf`` and
    numpyro's warning, as from numpyro's own classes. A traced *sampled* value (inside a jitted
    step) is not checked, so the step does no extra work for it: sampled values lie in the
    support by construction. Observed values are checked in the step too
    (:func:`scgjax.tracegraph.site_log_prob` uses :func:`check_traced_values`).
    """
    validated = validate_sample(log_prob_fn)

    @functools.wraps(log_prob_fn)
    def log_prob(self, value):
        if isinstance(value, jax.core.Tracer) and not _CHECK_TRACED[-1]:
            return log_prob_fn(self, value)
        return validated(self, value)

    return log_prob


def wrapper_chain(fn: Any) -> list[Any]:
    """``fn`` and every distribution it wraps (``base_dist`` of ``.to_event``, ``.expand``,
    ``.mask``, transformed distributions), outermost first: the one walk over wrappers.

    Example:
        >>> [type(d).__name__ for d in wrapper_chain(Normal(0.0, 1.0).expand([3]).to_event(1))]
        ['Independent', 'ExpandedDistribution', 'Normal']
    """
    chain = [fn]
    while hasattr(chain[-1], "base_dist"):
        chain.append(chain[-1].base_dist)
    return chain


def innermost(fn: Any) -> Any:
    """The distribution at the bottom of ``fn``'s wrappers (see :func:`wrapper_chain`)."""
    return wrapper_chain(fn)[-1]


def log_prob_in_support(fn: Any, value: Any) -> Any:
    """``fn.log_prob(value)`` without numpyro's support check, for a ``value`` known to lie in
    ``fn``'s support (drawn from ``fn``, or from a distribution with the very same support).

    numpyro validates by default: every ``log_prob`` becomes ``where(support(value), lp,
    -inf)``, which for values that lie in the support by construction only adds work to the
    jitted step (about half the CPU time of a small step on XLA:CPU). The flag is switched off
    on ``fn`` and the distributions it wraps for the call, and restored.
    """
    chain = [(d, d._validate_args) for d in wrapper_chain(fn) if hasattr(d, "_validate_args")]
    try:
        for d, _ in chain:
            d._validate_args = False
        return fn.log_prob(value)
    finally:
        for d, flag in chain:
            d._validate_args = flag


class BernoulliLogits(_nd.BernoulliLogits):
    """Bernoulli with logits ``l``: ``log p(y) = l y - softplus(l)`` (right gradient at 0).

    ``softplus`` is taken of the logits before they are broadcast against the value, so a
    prior's logits shared over a batch are transformed once.
    """

    @validate_concrete_sample  # numpyro's support check: -inf off {0, 1}
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
        return BernoulliLogits(fn.logits, validate_args=fn._validate_args)
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


class _OneHot(constraints.Constraint):
    """One-hot vectors (a discrete support with one event dimension)."""

    is_discrete = True
    event_dim = 1

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.all((x == 0) | (x == 1), axis=-1) & (jnp.sum(x, axis=-1) == 1)

    def feasible_like(self, prototype: jax.Array) -> jax.Array:
        return jax.nn.one_hot(jnp.zeros(jnp.shape(prototype)[:-1], int),
                              jnp.shape(prototype)[-1], dtype=prototype.dtype)

    def tree_flatten(self):
        return (), ((), {})


one_hot = _OneHot()


def _logits_of(logits: Any, probs: Any) -> jax.Array:
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of `logits` or `probs`")
    if logits is None:
        return jnp.log(jnp.asarray(probs))
    return jnp.asarray(logits)


class OneHotCategorical(_nd.Distribution):
    """A categorical distribution over ``n`` classes whose values are one-hot vectors.

    ``log p(y) = sum_i y_i log_softmax(alpha)_i``; event shape ``(n,)``. A model written for
    it (``y @ means``, ``y @ log_probs``, ...) also accepts the relaxed values of
    :class:`GumbelSoftmax`, which is why relaxed categorical sites are best written with it.
    Not reparameterisable (its default estimator is a score-function one).

    Example:
        >>> d = OneHotCategorical(logits=jnp.log(jnp.array([0.2, 0.3, 0.5])))
        >>> d.sample(jax.random.key(0)).shape, round(float(d.log_prob(jnp.array([0., 0., 1.]))), 4)
        ((3,), -0.6931)
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = one_hot
    pytree_data_fields = ("logits",)
    has_enumerate_support = True

    def __init__(self, logits: Any = None, probs: Any = None, *, validate_args: Any = None):
        self.logits = _logits_of(logits, probs)
        super().__init__(jnp.shape(self.logits)[:-1], jnp.shape(self.logits)[-1:],
                         validate_args=validate_args)

    @property
    def probs(self) -> jax.Array:
        return jax.nn.softmax(self.logits, axis=-1)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        shape = tuple(sample_shape) + tuple(self.batch_shape)
        index = jax.random.categorical(key, self.logits, shape=shape)
        return jax.nn.one_hot(index, self.event_shape[0], dtype=jnp.result_type(float))

    @validate_concrete_sample
    def log_prob(self, value: jax.Array) -> jax.Array:
        return jnp.sum(value * jax.nn.log_softmax(self.logits, axis=-1), axis=-1)

    def enumerate_support(self, expand: bool = True) -> jax.Array:
        n = self.event_shape[0]
        values = jnp.eye(n).reshape((n,) + (1,) * len(self.batch_shape) + (n,))
        if expand:
            values = jnp.broadcast_to(values, (n,) + tuple(self.batch_shape) + (n,))
        return values

    @property
    def mean(self) -> jax.Array:
        return self.probs


class RelaxedOneHotCategorical(_nd.Distribution):
    """The Concrete (Gumbel-softmax) distribution on the simplex (Maddison et al. 2017, Def. 1;
    Jang et al. 2017).

    ``y = softmax((alpha + g) / tau)`` with ``g_i ~ Gumbel(0, 1)``; density w.r.t. Lebesgue
    measure on the first ``n - 1`` coordinates

        p(y) = (n - 1)! tau^(n-1) prod_k [ exp(alpha_k) y_k^(-tau-1)
                                            / sum_i exp(alpha_i) y_i^(-tau) ],

    evaluated in log space; ``y_k`` is clipped at the smallest normal float before its log
    (at low temperatures coordinates underflow to 0). Reparameterisable; event shape ``(n,)``.

    Example:
        >>> d = RelaxedOneHotCategorical(0.5, logits=jnp.zeros(3))
        >>> y = d.rsample(jax.random.key(0))
        >>> y.shape, bool(jnp.isclose(y.sum(), 1.0))
        ((3,), True)
    """

    arg_constraints = {"temperature": constraints.positive, "logits": constraints.real_vector}
    support = constraints.simplex
    has_rsample = True
    reparametrized_params = ["temperature", "logits"]
    pytree_data_fields = ("temperature", "logits")

    def __init__(self, temperature: Any, logits: Any = None, probs: Any = None, *,
                 validate_args: Any = None):
        self.logits = _logits_of(logits, probs)
        self.temperature = jnp.asarray(temperature, dtype=jnp.result_type(self.logits, float))
        batch = jax.lax.broadcast_shapes(jnp.shape(self.temperature),
                                         jnp.shape(self.logits)[:-1])
        super().__init__(batch, jnp.shape(self.logits)[-1:], validate_args=validate_args)

    def _tau(self) -> jax.Array:
        return jnp.expand_dims(self.temperature, -1)

    def rsample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        shape = tuple(sample_shape) + tuple(self.batch_shape) + tuple(self.event_shape)
        g = jax.random.gumbel(key, shape, dtype=jnp.result_type(self.logits, float))
        return jax.nn.softmax((self.logits + g) / self._tau(), axis=-1)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        return self.rsample(key, sample_shape)

    @validate_concrete_sample
    def log_prob(self, value: jax.Array) -> jax.Array:
        n = self.event_shape[0]
        tau = self._tau()
        log_y = jnp.log(jnp.clip(value, jnp.finfo(jnp.result_type(value, float)).tiny))
        return (gammaln(n) + (n - 1) * jnp.log(self.temperature)
                + jnp.sum(self.logits - (tau + 1.0) * log_y, axis=-1)
                - n * logsumexp(self.logits - tau * log_y, axis=-1))


class StackedSteps(_nd.Distribution):
    """The distribution of a site of an ``sg.scan`` loop: the step's distribution at each of
    the ``T`` steps, stacked.

    ``steps`` is the step's distribution with every parameter stacked on a leading axis of size
    ``T`` (as ``lax.scan`` stacks a body's outputs; its ``batch_shape`` is still one step's).
    The batch shape is ``(T, *steps.batch_shape)``; :meth:`log_prob` and :meth:`sample` map the
    step's over the steps (``vmap``), so each parameter keeps its alignment, whatever its own
    shape (a scalar scale beside a batched location, a covariance shared by a plate).

    Example:
        >>> import jax
        >>> steps = jax.vmap(lambda m: Normal(m, 1.0))(jnp.arange(3.0))  # one per step
        >>> d = StackedSteps(steps)
        >>> d.batch_shape, [round(float(x), 3) for x in d.log_prob(jnp.arange(3.0))]
        ((3,), [-0.919, -0.919, -0.919])
    """

    pytree_data_fields = ("steps",)

    def __init__(self, steps: _nd.Distribution, *, validate_args: Any = None):
        self.steps = steps
        length = int(jnp.shape(jax.tree.leaves(steps)[0])[0])
        super().__init__((length, *steps.batch_shape), steps.event_shape,
                         validate_args=validate_args)

    @property
    def base_dist(self) -> _nd.Distribution:
        """The step's distribution (parameters stacked): what :func:`wrapper_chain` walks."""
        return self.steps

    @property
    def support(self) -> Any:
        return self.steps.support

    @property
    def has_rsample(self) -> bool:
        return self.steps.has_rsample

    @property
    def has_enumerate_support(self) -> bool:
        return self.steps.has_enumerate_support

    def enumerate_support(self, expand: bool = True) -> Any:
        """The step's support values, with a size-1 time axis (every step's support is the
        same: a finite support does not depend on the parameters' values)."""
        values = self.steps.enumerate_support(expand=False)
        values = values.reshape((values.shape[0], 1, *values.shape[1:]))
        if expand:
            values = jnp.broadcast_to(values, (values.shape[0], *self.batch_shape,
                                               *self.event_shape))
        return values

    def _map(self, method: Any, per_step: Any) -> Any:
        leaves, treedef = jax.tree.flatten(self.steps)
        validate = self._validate_args

        def one(step_leaves, x):
            step = jax.tree.unflatten(treedef, step_leaves)
            step._validate_args = validate  # log_prob_in_support switches it off here
            return method(step, x)
        return jax.vmap(one)(leaves, per_step)

    def log_prob(self, value: Any) -> Any:
        return self._map(lambda step, v: step.log_prob(v), value)

    def rsample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> Any:
        keys = jax.random.split(key, self.batch_shape[0])
        out = self._map(lambda step, k: step.rsample(k, sample_shape), keys)
        return jnp.moveaxis(out, 0, len(sample_shape))

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> Any:
        keys = jax.random.split(key, self.batch_shape[0])
        out = self._map(lambda step, k: step.sample(k, sample_shape), keys)
        return jnp.moveaxis(out, 0, len(sample_shape))


#: the most joint values of one site's event that enumeration lists (``joint_support``)
MAX_JOINT_SUPPORT = 2**16


def joint_support_size(fn: Any) -> int | None:
    """The number of values of one event of ``fn`` when it is finite and can be listed: the
    support of a discrete distribution (``enumerate_support``), or the product of a
    ``.to_event`` wrapper's element supports (``2^D`` for ``Bernoulli(logits).to_event(1)``
    with ``D`` bits); ``None`` otherwise.

    Example:
        >>> joint_support_size(Bernoulli(logits=jnp.zeros(10)).to_event(1))
        1024
    """
    if isinstance(fn, StackedSteps):
        fn = fn.steps
    if isinstance(fn, _nd.Independent):
        base = fn.base_dist
        if getattr(base, "has_enumerate_support", False) and base.event_shape == ():
            events = int(math.prod(fn.event_shape))
            return int(base.enumerate_support(expand=False).shape[0]) ** events
        return None
    if getattr(fn, "has_enumerate_support", False):
        return int(fn.enumerate_support(expand=False).shape[0])
    return None


def joint_support(fn: Any, index: Any) -> jax.Array:
    """Value number ``index`` (``0 <= index < joint_support_size(fn)``, may be traced) of one
    event of ``fn``, shaped ``event_shape`` (with size-1 batch axes for a distribution's own
    ``enumerate_support``). For a ``.to_event`` wrapper, the elements' values are the digits of
    ``index`` in base ``m`` (``m`` values per element), the last element fastest.

    Example:
        >>> d = Bernoulli(logits=jnp.zeros(3)).to_event(1)
        >>> joint_support(d, 6).tolist()   # 6 = 110 in binary
        [1, 1, 0]
    """
    if not isinstance(fn, _nd.Independent):
        return fn.enumerate_support(expand=False)[index]
    base = fn.base_dist
    values = base.enumerate_support(expand=False).reshape(-1)
    m, events = values.shape[0], int(math.prod(fn.event_shape))
    powers = m ** jnp.arange(events - 1, -1, -1)
    digits = (index // powers) % m
    return values[digits].reshape(fn.event_shape)


def joint_support_values(fn: Any, index: jax.Array) -> jax.Array:
    """The values number ``index`` (an integer array, one per element) of one event of ``fn``
    (see :func:`joint_support`), shaped ``(*index.shape, *event_shape)``.

    Example:
        >>> d = Bernoulli(logits=jnp.zeros(2)).to_event(1)
        >>> joint_support_values(d, jnp.array([0, 3])).tolist()
        [[0, 0], [1, 1]]
    """
    index = jnp.asarray(index)
    if isinstance(fn, _nd.Independent):
        values = fn.base_dist.enumerate_support(expand=False).reshape(-1)
        m, events = values.shape[0], int(math.prod(fn.event_shape))
        powers = m ** jnp.arange(events - 1, -1, -1)
        digits = (index[..., None] // powers) % m
        return values[digits].reshape((*index.shape, *fn.event_shape))
    values = fn.enumerate_support(expand=False)
    return values.reshape((values.shape[0], *fn.event_shape))[index]
