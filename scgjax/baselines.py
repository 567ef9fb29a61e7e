"""Baselines for score-function estimators: ``b_w`` in ``grad log q(w) (Q_w - b_w)``.

:class:`~scgjax.estimators.ScoreFunction` estimates ``grad E[f]`` by
``E[grad log q(w) (Q_w - b_w)]``, with ``Q_w`` the costs downstream of ``w``. The estimate is
unbiased for any baseline ``b_w`` that does not depend on ``w`` (nor on anything downstream of
it), since ``E[grad log q(w)] = 0``; a good ``b_w`` (close to ``E[Q_w]``) lowers the variance
(Williams 1992; Mnih & Gregor 2014). A baseline may use the current learning signal to update
its state, never to form ``b_w``.

The protocol is the class :class:`Baseline`. A baseline is a small frozen object whose state is
an explicit pytree threaded through the objective (never an attribute). Subclasses override
:meth:`Baseline.baseline_for`, the one way a baseline produces its value, and any of the other
methods whose default does not fit:

- ``init_state() -> state``: the initial state of one site (default ``{}``).
- ``collect(msg) -> arrays | None``: arrays to keep from the site's message in every particle
  (e.g. the inputs of a network); they come back stacked over particles as ``ctx.collected``
  (default ``None``).
- ``init_params(rng_key, msg) -> dict``: trainable parameters, stored by ``sg.init_params`` as
  ``params["<site>$<key>"]`` and passed back as ``ctx.params`` (default ``{}``).
- ``baseline_for(ctx) -> (b, new_state)``: ``b`` broadcastable to ``ctx.log_prob`` (one value
  per particle and plate element, ``(K, *plates)``, or a scalar), from the site's
  :class:`~scgjax.estimators.base.ScoreContext` (``ctx.learning_signal``, ``ctx.state``,
  ``ctx.collected``, ``ctx.params``).
- ``training_term(ctx) -> scalar``: a term of value 0 added to the surrogate (which is
  *maximised*), whose gradient trains the baseline's parameters and nothing else (default 0).

Example, a user-defined baseline (the previous step's mean learning signal):

    >>> import dataclasses, jax.numpy as jnp, scgjax as sg
    >>> from scgjax import dist
    >>> @dataclasses.dataclass(frozen=True)
    ... class PreviousMean(sg.baselines.Baseline):
    ...     def init_state(self):
    ...         return {"mean": jnp.zeros(())}
    ...     def baseline_for(self, ctx):
    ...         return ctx.state["mean"], {"mean": jnp.mean(ctx.learning_signal)}
    >>> def model():
    ...     sg.sample("z", dist.Bernoulli(probs=0.3))
    >>> def guide():
    ...     p = sg.param("p", 0.5)
    ...     sg.sample("z", dist.Bernoulli(probs=p), estimator=sg.ScoreFunction(PreviousMean()))
    >>> params, elbo = sg.init_params(0, model, guide), sg.ELBO()
    >>> state = elbo.init_state(0, params, model, guide)
    >>> loss, (state, _) = elbo.loss_with_state(1, params, state, model, guide)
    >>> bool(jnp.isclose(state["z"]["mean"], -loss))  # one particle: Q_z is the ELBO estimate
    True

An object that is not a :class:`Baseline` but has ``init_state()`` and
``__call__(learning_signal, state) -> (b, new_state)`` is also accepted:
``ScoreFunction(baseline=...)`` wraps it in :class:`FromCallable`.

Baselines given per element of a site (:class:`Constant` with an array, :class:`Neural`) use
the site's batch layout: one value per element of the site's ``batch_shape`` (without the event
dims), e.g. ``(N,)`` for a site inside ``plate("data", N)`` and ``()`` for a site in no plate;
batch dims that no plate declares must have size 1 (or be absent), since the learning signal
has one value per plate element.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from scgjax.estimators.base import ScoreContext

__all__ = ["Baseline", "Constant", "FromCallable", "MovingAverage", "Neural",
           "site_to_signal_layout"]


class Baseline:
    """The baseline protocol (see the module docstring): override :meth:`baseline_for`.

    Every method but :meth:`baseline_for` has a default that does nothing: no state, nothing
    collected, no parameters, no training term.
    """

    def init_state(self) -> Any:
        """This baseline's initial state for one site (a pytree; ``{}`` when stateless)."""
        return {}

    def collect(self, msg: dict) -> Any:
        """Arrays to keep from the site's message in each particle (``ctx.collected``)."""
        return None

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict[str, Any]:
        """Trainable parameters for the site of ``msg`` (``ctx.params``; ``{}`` if none)."""
        return {}

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        """``(b, new_state)``: ``b`` broadcastable to ``ctx.log_prob``, not depending on ``w``."""
        raise NotImplementedError(
            f"{type(self).__name__} subclasses sg.baselines.Baseline but does not define "
            "baseline_for(ctx) -> (b, new_state) (use ctx.learning_signal and ctx.state)")

    def training_term(self, ctx: ScoreContext) -> jax.Array | float:
        """A term of value 0 added to the (maximised) surrogate that trains this baseline's
        parameters only (default: 0)."""
        return 0.0


@dataclasses.dataclass(frozen=True)
class FromCallable(Baseline):
    """Adapts a duck-typed baseline with ``init_state()`` and ``__call__(learning_signal,
    state) -> (b, new_state)`` to :class:`Baseline` (``ScoreFunction`` does this itself).

    Example:
        >>> import jax.numpy as jnp
        >>> class Half:
        ...     def init_state(self):
        ...         return {}
        ...     def __call__(self, signal, state):
        ...         return 0.5 * jnp.ones(()), state
        >>> import scgjax as sg
        >>> sg.ScoreFunction(baseline=Half()).baseline  # doctest: +ELLIPSIS
        FromCallable(wrapped=<...Half object at ...>)
    """

    wrapped: Any

    def init_state(self) -> Any:
        return self.wrapped.init_state()

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        return self.wrapped(ctx.learning_signal, ctx.state)


@dataclasses.dataclass(frozen=True)
class MovingAverage(Baseline):
    """Exponential moving average of the learning signal, per site, one scalar.

    ``m_t = decay * m_{t-1} + (1 - decay) * mean(Q_t)`` and ``b_t = m_{t-1} / (1 - decay^(t-1))``
    (bias-corrected as in Adam, so the first steps are not pulled towards 0; ``b_1 = 0``). The
    mean is over particles and plate elements. Unbiased: ``b_t`` only uses earlier steps.

    Example:
        >>> import jax.numpy as jnp
        >>> ma = MovingAverage(decay=0.5)
        >>> b, s = ma(jnp.array([2.0]), ma.init_state())
        >>> float(b), float(ma(jnp.array([4.0]), s)[0])
        (0.0, 2.0)
    """

    decay: float = 0.9

    def __post_init__(self):
        _check_decay("MovingAverage", self.decay)

    def init_state(self) -> dict[str, jax.Array]:
        return {"mean": jnp.zeros(()), "steps": jnp.zeros((), jnp.int32)}

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        return self(ctx.learning_signal, ctx.state)

    def __call__(self, learning_signal: jax.Array, state: dict) -> tuple[jax.Array, Any]:
        """``(b_t, new_state)`` from this step's learning signal and the state."""
        steps = state["steps"]
        correction = 1.0 - self.decay ** steps.astype(jnp.float32)
        b = jnp.where(steps > 0, state["mean"] / jnp.where(steps > 0, correction, 1.0), 0.0)
        mean = self.decay * state["mean"] + (1.0 - self.decay) * jnp.mean(learning_signal)
        return b, {"mean": jax.lax.stop_gradient(mean), "steps": steps + 1}


def _check_decay(who: str, decay: Any) -> None:
    """``decay`` must be a real number in ``[0, 1)`` (a ``ValueError`` or ``TypeError`` else)."""
    try:
        ok = not isinstance(decay, (bool, np.bool_, str, bytes)) and np.ndim(decay) == 0
        ok = ok and np.isreal(decay) and float(decay) == decay
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TypeError(f"{who} decay must be a float in [0, 1), got {decay!r}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"{who} decay must be in [0, 1), got {decay}")


# --- per-element baselines: from the site's batch layout to the learning signal's ----------

def _batch_marker(msg: dict) -> jax.Array:
    """A zero-size array of shape ``(*batch_shape, 0)``: carries the site's batch shape through
    the particle ``vmap`` (``ctx.collected``) at no cost."""
    return jnp.zeros((*msg["fn"].batch_shape, 0))


def site_to_signal_layout(x: jax.Array, ctx: Any, batch_ndim: int) -> jax.Array:
    """Map per-particle values in the site's batch layout to the learning signal's layout.

    ``x`` has shape ``(K, *o)`` where ``o`` broadcasts against the site's batch shape with the
    dims that no plate declares set to 1 (a trailing axis of size 1 beyond the batch dims, as
    in a network's ``(N, 1)`` output, is dropped). Returns ``(K, *plates)``, the canonical
    layout of ``ctx.learning_signal``, by ``ctx.from_value_layout`` (the inverse of
    ``ctx.to_value_layout``, :meth:`scgjax.layout.SiteLayout.from_value`).

    Raises:
        ValueError: if ``x`` does not fit the site's plate elements.
    """
    signal = ctx.learning_signal
    k = signal.shape[0]
    x = jnp.asarray(x)
    value_layout = jax.eval_shape(ctx.to_value_layout, signal).shape  # (K, *b, *1s)
    plate_shape = tuple(value_layout[1:1 + batch_ndim])
    out = tuple(x.shape[1:])
    if len(out) == batch_ndim + 1 and out[-1] == 1:
        x, out = x[..., 0], out[:-1]
    try:
        ok = len(out) <= batch_ndim and np.broadcast_shapes(out, plate_shape) == plate_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"site {ctx.name!r}: baseline of shape {out} per particle does not fit the site's "
            f"plate elements {plate_shape} (the site's batch shape, with size 1 along dims "
            "that no plate declares)")
    x = jnp.broadcast_to(x.reshape((x.shape[0], *((1,) * (batch_ndim - len(out))), *out)),
                         (k, *plate_shape)).reshape(value_layout)
    return ctx.from_value_layout(x)


def _batch_ndim(ctx: ScoreContext, who: str) -> int:
    collected = ctx.collected
    if not isinstance(collected, dict) or "batch_shape" not in collected:
        raise TypeError(
            f"site {ctx.name!r}: the {who} baseline found nothing it collected (its estimator "
            "did not call its collect(msg)); use it as sg.ScoreFunction(baseline=...)")
    return collected["batch_shape"].ndim - 2  # (K, *batch_shape, 0)


@dataclasses.dataclass(frozen=True, eq=False)
class Constant(Baseline):
    """A user-supplied baseline value ``b`` (a float, or an array in the site's batch layout).

    ``grad = E[grad log q(w) (Q_w - b)]`` is unbiased for any ``b`` that does not depend on
    ``w`` (Williams 1992; Schulman et al. 2015, Thm. 1). ``value`` may be a traced array built
    inside the program (the estimator is rebuilt in every trace); it is collected per particle
    and its gradient is stopped. An array has one value per element of the site's batch shape,
    e.g. ``(N,)`` for a site in ``plate("data", N)`` (see the module docstring).

    Example:
        >>> import scgjax as sg
        >>> sg.ScoreFunction(baseline=sg.baselines.Constant(-3.0))
        ScoreFunction(baseline=Constant(value=-3.0))
    """

    value: Any = 0.0

    def __post_init__(self):
        try:
            dtype = None if isinstance(self.value, (str, bytes)) else jnp.result_type(self.value)
        except TypeError:
            dtype = None
        if dtype is None or not (jnp.issubdtype(dtype, jnp.integer)
                                 or jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError(f"Constant baseline needs a real number or a numeric array, got "
                            f"{type(self.value).__name__} {self.value!r}")

    def collect(self, msg: dict) -> dict[str, jax.Array]:
        value = jax.lax.stop_gradient(jnp.asarray(self.value, dtype=jnp.float32))
        return {"value": value, "batch_shape": _batch_marker(msg)}

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        b = site_to_signal_layout(ctx.collected["value"], ctx, _batch_ndim(ctx, "Constant"))
        return jax.lax.stop_gradient(b), ctx.state


@dataclasses.dataclass(frozen=True, eq=False)
class Neural(Baseline):
    """NVIL's input-dependent baseline (Mnih & Gregor 2014): a flax network ``b_psi(inputs)``.

    In the guide::

        sg.sample("h1", dist.Bernoulli(logits=...).to_event(1),
                  estimator=sg.ScoreFunction(baseline=sg.baselines.Neural(net, inputs=x)))

    ``module`` is a flax linen module mapping ``inputs`` to one value per plate element of the
    site, in the site's batch layout: ``(N,)`` (or ``(N, 1)``) for a site in
    ``plate("data", N)`` with ``inputs`` of shape ``(N, ...)``, ``()`` (or ``(1,)``) for a site
    in no plate. ``inputs`` must not depend on the site's value or anything downstream of it
    (the data ``x``, or the parent sample ``h1`` for ``h2``'s baseline); they may differ per
    particle, and their gradient is stopped. ``sg.init_params`` creates the parameters as
    ``params["<site>$baseline"]`` (``module.init(key, inputs)["params"]``).

    The score term of the site uses ``Q_w - b_psi(x)`` and the surrogate gets a training term
    of value 0 whose gradient minimises ``mean((Q_w - b_psi(x))^2)`` over particles and plate
    elements in ``psi`` only: ``Q_w`` and ``x`` are gradient-stopped, and ``b_psi`` is stopped
    in the score term, so the program's parameters get no gradient from the training term and
    ``psi`` none from the objective. Unbiased for any ``psi``.

    With ``normalise=True`` (NVIL §3.3, "variance normalisation") the learning signal becomes

        l = (Q_w - b_psi(x) - c) / max(1, sqrt(v)),

    where ``c`` and ``v`` are running (exponential, ``decay``, bias-corrected as in Adam)
    estimates of the mean and variance of the residual ``Q_w - b_psi(x)`` over particles and
    plate elements, kept in the estimator state; ``b_psi`` then predicts ``Q_w - c`` and is
    trained on ``mean((Q_w - c - b_psi(x))^2) / max(1, sqrt(v))`` (NVIL's Algorithm 1; on the
    first step, before any running mean exists, ``c`` is the batch mean of ``Q_w - b_psi(x)``
    in the training term, so the network is not first fitted to the raw signal). Unlike
    Algorithm 1, ``c`` and ``v`` come from earlier steps only (they are updated after use), so
    the estimate stays unbiased *up to the factor* ``1 / max(1, sqrt(v))``: the site's score
    gradient is a scaled unbiased estimate (a per-site step-size change, which matters when a
    parameter also gets gradient from other terms). Only first derivatives are meaningful then.
    Off by default; ``decay`` is unused without it.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> x = jnp.ones((5, 3))
        >>> def guide(x):
        ...     net = nn.Dense(1)
        ...     with sg.plate("data", 5):
        ...         sg.sample("z", dist.Bernoulli(logits=x.sum(-1)), estimator=sg.ScoreFunction(
        ...             baseline=sg.baselines.Neural(net, inputs=x)))
        >>> def model(x):
        ...     with sg.plate("data", 5):
        ...         sg.sample("z", dist.Bernoulli(logits=0.0))
        >>> params = sg.init_params(0, model, guide, x)
        >>> jax.tree.map(jnp.shape, params["z$baseline"])
        {'bias': (1,), 'kernel': (3, 1)}
    """

    module: Any
    inputs: Any = dataclasses.field(default=None, repr=False)
    normalise: bool = False
    decay: float = 0.99

    def __post_init__(self):
        _check_decay("Neural", self.decay)
        if isinstance(self.module, type):
            raise TypeError(f"Neural baseline got the class {self.module.__name__} as its "
                            f"module; pass an instance, e.g. {self.module.__name__}(...)")
        if not (callable(getattr(self.module, "init", None))
                and callable(getattr(self.module, "apply", None))):
            raise TypeError("Neural baseline needs a flax linen module (with init and apply), "
                            f"got {type(self.module).__name__}")
        if self.inputs is None:
            raise TypeError("Neural baseline needs inputs (e.g. Neural(net, inputs=x))")

    def init_state(self) -> dict[str, jax.Array]:
        if not self.normalise:
            return {}
        return {"mean": jnp.zeros(()), "square": jnp.zeros(()),
                "steps": jnp.zeros((), jnp.int32)}

    def collect(self, msg: dict) -> dict[str, Any]:
        inputs = jax.tree.map(jax.lax.stop_gradient, self.inputs)
        return {"inputs": inputs, "batch_shape": _batch_marker(msg)}

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict[str, Any]:
        # Only the inputs' shapes matter to the initialiser. Inputs computed inside an
        # sg.scan body (the step's carry) are that body's tracers: zeros of their shape stand in.
        inputs = jax.tree.map(
            lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x))
            if isinstance(x, jax.core.Tracer) else jax.lax.stop_gradient(x), self.inputs)
        return {"baseline": self.module.init(rng_key, inputs)["params"]}

    def predict(self, ctx: ScoreContext) -> jax.Array:
        """``b_psi(inputs)`` per particle in the learning signal's layout ``(K, *plates)``,
        differentiable in ``psi = ctx.params["baseline"]`` only."""
        params = (ctx.params or {}).get("baseline")
        if params is None:
            raise KeyError(
                f"site {ctx.name!r}: no parameters for its Neural baseline; create params with "
                f"sg.init_params (they are stored as params['{ctx.name}$baseline'])")
        batch_ndim = _batch_ndim(ctx, "Neural")
        inputs = jax.tree.map(jax.lax.stop_gradient, ctx.collected["inputs"])
        out = jax.vmap(lambda x: self.module.apply({"params": params}, x))(inputs)
        return site_to_signal_layout(out, ctx, batch_ndim)

    def _statistics(self, state: dict) -> tuple[jax.Array, jax.Array]:
        """``(c, max(1, sqrt(v)))`` from the running moments (``(0, 1)`` before any step)."""
        steps = state["steps"]
        correction = jnp.where(steps > 0, 1.0 - self.decay ** steps.astype(jnp.float32), 1.0)
        c = state["mean"] / correction
        v = jnp.maximum(state["square"] / correction - c**2, 0.0)
        return c, jnp.maximum(1.0, jnp.sqrt(v))

    def baseline_for(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        pred = jax.lax.stop_gradient(self.predict(ctx))
        if not self.normalise:
            return pred, ctx.state
        q = ctx.learning_signal
        c, scale = self._statistics(ctx.state)
        # Q - b = (Q - b_psi - c) / scale: the normalised NVIL learning signal.
        b = q - (q - pred - c) / scale
        residual = q - pred
        d = self.decay
        new_state = {
            "mean": d * ctx.state["mean"] + (1 - d) * jnp.mean(residual),
            "square": d * ctx.state["square"] + (1 - d) * jnp.mean(residual**2),
            "steps": ctx.state["steps"] + 1,
        }
        return jax.lax.stop_gradient(b), jax.tree.map(jax.lax.stop_gradient, new_state)

    def training_term(self, ctx: ScoreContext) -> jax.Array:
        """``-zero_value(mean((target - b_psi(x))^2) / scale)``: value 0; its gradient (the
        surrogate is maximised) is minus that of the regression loss, in ``psi`` only."""
        pred = self.predict(ctx)
        target = jax.lax.stop_gradient(ctx.learning_signal)
        scale = 1.0
        if self.normalise:
            c, scale = self._statistics(ctx.state)
            # Before any step there is no running mean: centre on this batch's mean residual
            # (the training term never biases the program's gradient). Centring on 0 instead
            # would fit b_psi to the raw signal, often hundreds of nats, and that one huge
            # gradient would dominate Adam's second-moment estimate for thousands of steps.
            first = ctx.state["steps"] == 0
            c = jnp.where(first, jax.lax.stop_gradient(jnp.mean(target - pred)), c)
            target = target - c
        mse = jnp.mean((target - pred) ** 2) / jax.lax.stop_gradient(scale)
        return -(mse - jax.lax.stop_gradient(mse))
