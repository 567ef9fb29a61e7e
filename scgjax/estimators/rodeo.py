"""RODEO: discrete Stein-operator control variates (Shi, Zhou, Hwang, Titsias & Mackey,
NeurIPS 2022) for Bernoulli sites."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator, ScoreContext, require_particles, zero_value
from scgjax.estimators.bernoulli import logits_and_keep, require_bernoulli

__all__ = ["RODEO"]

_PARAMS = ("alpha", "beta", "control_variate")
_SLOPE = 0.3  # the leaky ReLU of the authors' control network


def _others(x: jax.Array) -> jax.Array:
    """``(K - 1, K, ...)``: entry ``[m, k]`` is ``x[(k + m + 1) % K]``, the other particles of
    ``k`` (every ``j != k`` once)."""
    k = x.shape[0]
    return jnp.stack([jnp.roll(x, -(m + 1), axis=0) for m in range(k - 1)])


def _network(phi: dict, lin: jax.Array, signal: jax.Array) -> jax.Array:
    """The authors' control network ``h(lin, f)``: one hidden leaky-ReLU layer, two outputs
    (``[..., 0]`` for the baseline side, ``[..., 1]`` for the score side)."""
    hidden = lin[..., None] * phi["w_lin"] + signal[..., None] * phi["w_signal"] + phi["b_hidden"]
    hidden = jnp.where(hidden > 0, hidden, _SLOPE * hidden)
    return hidden @ phi["w_out"] + phi["b_out"]


@dataclasses.dataclass(frozen=True)
class RODEO(Estimator):
    """RODEO, discrete Stein-operator control variates for Bernoulli sites (Shi, Zhou, Hwang,
    Titsias & Mackey, NeurIPS 2022).

    For a site with logits ``eta``, ``theta = sigmoid(eta)``, ``K`` particles ``x_k`` (each a
    block of ``D`` binary coordinates per plate element), learning signal ``f_k`` (the costs
    downstream of the site, per plate element) and its gradient ``g_k = df/dx`` at ``x_k`` (the
    cost as a function of a real-valued ``x``), let ``x^(d)`` be ``x`` with coordinate ``d``
    flipped and ``w_d(x) = q(x^(d)_d) = |x_d - theta_d|`` the probability of the flipped value.
    The Gibbs Stein operator (resample one coordinate, chosen uniformly, from its conditional)

        (A h)(x) = (1/D) sum_d w_d(x) [h(x^(d)) - h(x)]

    has ``E_q[(A h)(x)] = 0`` for every function ``h``. The estimate of ``d E[f] / d eta`` is

        grad_eta = (1/K) sum_k ( [f_k - mean_{j != k} (f_j + alpha (A h_0^{-j})(x_j))]
                                 (x_k - theta)  +  beta (A H^{-k})(x_k) ),
        h^{-k}(y) = mean_{j != k} NN_phi(<g_j, y - x_j>, f_j)         (two outputs h_0, h_1),
        H^{-k}(y) = h_1^{-k}(y) (y - theta),

    where ``NN_phi`` is a small network (input: the first-order Taylor expansion of ``f``
    around another particle, without its constant, and that particle's ``f``; one hidden
    leaky-ReLU layer of ``hidden`` units). ``h^{-k}`` depends on the other particles only, so
    ``(A H^{-k})(x_k)`` has mean 0 given them, and ``(A h_0^{-j})(x_j)`` has mean 0 given every
    particle but ``j`` (``x_k`` among them): the estimator is unbiased for every ``alpha``,
    ``beta`` and ``phi``. At ``alpha = beta = 0`` it is RLOO. The sums over ``d`` and the inner
    products run over the dimensions ``f`` is one number for (event dimensions and batch
    dimensions no plate declares), separately for every plate element; when the logits differ
    between particles (they depend on upstream latents) ``theta`` is each particle's own.

    This is the authors' estimator ``discrete_stein_output_avg`` (their choice for ``K > 2``),
    which at ``K = 2`` is their ``discrete_stein_avg``. The network sees the raw signal, as
    theirs does.

    Trainable estimator parameters, created by ``sg.init_params``: ``params["<site>$alpha"]``,
    ``params["<site>$beta"]`` (starting at ``alpha_init``, ``beta_init``; the authors start at
    0) and ``params["<site>$control_variate"]`` (the network's weights, Glorot-uniform as in
    Keras, biases 0). In the same step they are trained to minimise ``mean(grad_eta^2)`` over
    the site's elements (the variance, as the mean does not depend on them), through a
    zero-valued term: they get no gradient from the objective and the program's parameters
    none from the variance term. ``sg.param_labels`` labels them ``"guide"``. With both
    ``alpha`` and ``beta`` at 0 the network gets no gradient until one of them moves.

    The site's ``log q`` does not enter the DiCE box (``score = False``): this term supplies
    the whole score part of the gradient through the logits (first derivatives only). Values
    are sampled as floats, so the objective can differentiate costs with respect to them.
    Masked elements (``.mask``, ``sg.handlers.mask``) get no score gradient and are never
    flipped. Cost: the network runs ``K (K - 1) (D + 1)`` times per plate element (its hidden
    layer holds ``K (K - 1)`` times the site's values times ``hidden`` numbers), with no extra
    evaluation of the costs.

    Requirements: a Bernoulli site (``dist.Bernoulli(logits=...)`` or ``probs=``, possibly
    inside ``.to_event``, ``.expand`` or ``.mask``; the paper's code covers no Categorical)
    and ``num_particles >= 2``; ``sg.ELBO`` or ``sg.Expectation``, not ``sg.IWAE``; errors
    naming the site otherwise.

    Reference: J. Shi, Y. Zhou, J. Hwang, M. K. Titsias and L. Mackey, "Gradient Estimation
    with Discrete Stein Operators", NeurIPS 2022; the authors' code is
    github.com/thjashin/rodeo (``networks.py``, ``DiscreteVAE.get_grad_estimation``).

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def program():
        ...     eta = sg.param("eta", jnp.zeros(3))
        ...     z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=sg.RODEO())
        ...     sg.factor("f", -jnp.sum((z - 0.4) ** 2))
        >>> params = sg.init_params(0, program)
        >>> sorted(params)
        ['eta', 'z$alpha', 'z$beta', 'z$control_variate']
        >>> grads = jax.grad(sg.Expectation(num_particles=3).loss, argnums=1)(
        ...     jax.random.key(0), params, program)
        >>> grads["eta"].shape, grads["z$alpha"].shape, grads["z$control_variate"]["w_out"].shape
        ((3,), (), (100, 2))
    """

    alpha_init: float = 0.0
    beta_init: float = 0.0
    hidden: int = 100

    score = False
    needs_signal_grad = True

    def __post_init__(self) -> None:
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"RODEO hidden must be a positive int (the control network's "
                             f"width), got {self.hidden!r}")
        for name in ("alpha_init", "beta_init"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                raise ValueError(f"RODEO {name} must be a finite number, got {value!r}")

    @property
    def uses_signal(self) -> bool:
        return True

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        require_bernoulli(self, name, fn)
        require_particles(self, name, num_particles, 2)

    def bound_refusal(self) -> str:
        return ("uses RODEO, which a multi-sample bound (sg.IWAE) does not support (its "
                "learning signal and Stein control variates are defined per particle); use "
                "VIMCO(), ScoreFunction() without a baseline, or Pathwise()")

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        # Float values: the objective differentiates the costs with respect to them.
        return jax.lax.stop_gradient(fn.sample(rng_key).astype(jnp.result_type(float)))

    def collect(self, msg: dict) -> dict:
        return logits_and_keep(msg)

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict:
        keys = jax.random.split(rng_key, 3)
        n = self.hidden
        wide = math.sqrt(6.0 / (1 + n))  # Keras' Glorot-uniform limits: Dense(n) on one input
        out = math.sqrt(6.0 / (n + 2))  # and Dense(2) on n
        phi = {
            "w_lin": jax.random.uniform(keys[0], (n,), jnp.float32, -wide, wide),
            "w_signal": jax.random.uniform(keys[1], (n,), jnp.float32, -wide, wide),
            "b_hidden": jnp.zeros((n,), jnp.float32),
            "w_out": jax.random.uniform(keys[2], (n, 2), jnp.float32, -out, out),
            "b_out": jnp.zeros((2,), jnp.float32),
        }
        return {"alpha": jnp.asarray(self.alpha_init, jnp.float32),
                "beta": jnp.asarray(self.beta_init, jnp.float32),
                "control_variate": phi}

    def _params(self, ctx: ScoreContext) -> dict:
        params = ctx.params or {}
        missing = [n for n in _PARAMS if n not in params]
        if missing:
            raise SiteError(
                ctx.name,
                "uses RODEO, but params has no "
                f"{', '.join(repr(f'{ctx.name}${n}') for n in missing)} (its control-variate "
                "parameters); create params with sg.init_params(rng_key, model, guide, ...)",
            )
        return params

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        params = self._params(ctx)
        stop = jax.lax.stop_gradient
        k = ctx.num_particles
        eta = ctx.collected["logits"]  # (K, *value_shape), differentiable in the parameters
        dtype = jnp.result_type(float)
        theta = jax.nn.sigmoid(stop(eta).astype(dtype))
        x = stop(ctx.value).astype(dtype)
        keep = ctx.collected["keep"].astype(dtype)
        dz = (x - theta) * keep  # the score d log q(x) / d eta
        flip = (1.0 - 2.0 * x) * keep  # x^(d)_d - x_d
        w = jnp.where(x > 0.5, 1.0 - theta, theta) * keep  # q(x^(d)_d): never flip masked ones
        f = stop(ctx.to_value_layout(ctx.learning_signal)).astype(dtype)  # size 1 on the block
        g = stop(ctx.signal_grad).astype(dtype)
        block = tuple(a for a in range(1, x.ndim) if f.shape[a] == 1)
        size = math.prod(x.shape[a] for a in block)

        def dot(u: jax.Array, v: jax.Array) -> jax.Array:  # (K-1, K, ...): over the block
            return jnp.sum(u * v, axis=tuple(a + 1 for a in block), keepdims=True)

        # For particle k and every other particle j ([m, k] along the first two axes):
        # <g_j, x_k - x_j> and, flipping coordinate d of x_k, <g_j, x_k^(d) - x_j>.
        g_o, x_o, f_o = _others(g), _others(x), _others(f)
        lin_x = dot(g_o, x[None] - x_o)  # (K-1, K, ...) with the block dims of size 1
        lin_flip = lin_x + g_o * flip[None]  # (K-1, K, *value_shape)
        phi = params["control_variate"]
        h_x = jnp.mean(_network(phi, lin_x, f_o), axis=0)  # h^{-k}(x_k): (K, ..., 2)
        h_flip = jnp.mean(_network(phi, lin_flip, f_o), axis=0)  # h^{-k}(x_k^(d))
        diff = h_flip - h_x
        # (A h_0^{-k})(x_k), one number per plate element, and (A H^{-k})(x_k) per coordinate:
        # (1/D) sum_d w_d [h_1(x^(d)) (x^(d) - theta) - h_1(x) (x - theta)]
        a_h0 = jnp.sum(w * diff[..., 0], axis=block, keepdims=True) / size
        a_h1 = (dz * jnp.sum(w * diff[..., 1], axis=block, keepdims=True)
                + w * h_flip[..., 1] * flip) / size

        def loo(v: jax.Array) -> jax.Array:  # mean over the other particles
            return (v.sum(axis=0, keepdims=True) - v) / (k - 1)

        alpha, beta = params["alpha"], params["beta"]
        rloo = (f - loo(f)) * dz / k  # per-particle coefficients of eta_k
        cv_baseline = -loo(a_h0) * dz / k
        cv_stein = a_h1 / k
        main = jnp.sum(eta * stop(rloo + stop(alpha) * cv_baseline + stop(beta) * cv_stein))
        grad = jnp.sum(rloo + alpha * cv_baseline + beta * cv_stein, axis=0)  # per element
        variance = jnp.mean(grad**2)
        return zero_value(main) - zero_value(variance), ctx.state
