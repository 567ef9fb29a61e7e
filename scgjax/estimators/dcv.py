"""Double control variates, DCV (Titsias & Shi, AISTATS 2022) for Bernoulli sites."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator, ScoreContext, require_particles, zero_value
from scgjax.estimators.bernoulli import logits_and_keep, require_bernoulli


@dataclasses.dataclass(frozen=True)
class DCV(Estimator):
    """Double control variates for Bernoulli sites (Titsias & Shi, AISTATS 2022).

    For a site with logits ``eta``, ``theta = sigmoid(eta)``, ``K`` particles ``z_k``, learning
    signal ``f_k`` (the costs downstream of the site, per plate element) and its gradient
    ``g_k = df/dz`` at ``z_k`` (the cost as a function of a real-valued ``z``)::

        gbar_{-k} = mean_{j != k} g_j
        h_k       = f_k + alpha * <gbar_{-k}, z_k - theta>
        grad_eta  = (1/K) sum_k (h_k - mean_{j != k} h_j) (z_k - theta)
                    - alpha * mean_k(g_k) * theta (1 - theta)

    The inner product runs over the dimensions ``f`` is one number for (event dimensions and
    batch dimensions no plate declares), separately for every plate element. The first control
    variate is the leave-one-out baseline of RLOO, the second a first-order Taylor expansion of
    ``f`` around ``theta`` built from the *other* particles' gradients; its expectation,
    ``alpha * E[g] theta (1 - theta)``, is subtracted in closed form, so the estimator is
    unbiased for every ``alpha`` (``z_k``'s elements are independent given ``eta``, and
    ``gbar_{-k}`` does not depend on ``z_k``). When the logits differ between particles (they
    depend on upstream latents), ``theta`` is each particle's own and the correction term is
    ``(1/K) sum_k alpha * gbar_{-k} theta_k (1 - theta_k)``, which reduces to the one above.

    ``alpha`` is a trainable estimator parameter, ``params["<site>$alpha"]`` (create params
    with ``sg.init_params``; it starts at ``alpha_init``). In the same step it is trained to
    minimise ``mean(grad_eta^2)`` over the site's elements (the variance, as the mean does not
    depend on ``alpha``), through a zero-valued term: ``alpha`` gets no gradient from the
    objective and the program's parameters none from the variance term.

    The site's ``log q`` does not enter the DiCE box (``score = False``): this term supplies
    the whole score part of the gradient through the logits (which must be differentiable
    functions of the parameters; higher-order derivatives through it are not provided).
    Values are sampled as floats, so the objective can differentiate costs with respect to
    them. Masked elements (``sg.handlers.mask``, ``.mask(...)``) get no score gradient.

    Requirements: a Bernoulli site (``dist.Bernoulli(logits=...)`` or ``probs=``, possibly
    inside ``.to_event``, ``.expand`` or ``.mask``) and ``num_particles >= 2``; otherwise an
    error naming the site.

    Reference: M. K. Titsias and J. Shi, "Double Control Variates for Gradient Estimation in
    Discrete Latent Variable Models", AISTATS 2022; the authors' code is
    github.com/thjashin/double-cv (``src/networks.py``, grad_type ``"double_cv"``).

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> from scgjax.estimators.dcv import DCV
        >>> def program():
        ...     eta = sg.param("eta", jnp.zeros(3))
        ...     z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=DCV(0.5))
        ...     sg.factor("f", -jnp.sum((z - 0.4) ** 2))
        >>> params = sg.init_params(0, program)
        >>> sorted(params), float(params["z$alpha"])
        (['eta', 'z$alpha'], 0.5)
        >>> grads = jax.grad(sg.Expectation(num_particles=4).loss, argnums=1)(
        ...     jax.random.key(0), params, program)
        >>> grads["eta"].shape, grads["z$alpha"].shape
        ((3,), ())
    """

    alpha_init: float = 0.0

    score = False
    needs_signal_grad = True

    @property
    def uses_signal(self) -> bool:
        return True

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        require_bernoulli(self, name, fn)
        require_particles(self, name, num_particles, 2)

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        # Float values: the objective differentiates the costs with respect to them.
        return jax.lax.stop_gradient(fn.sample(rng_key).astype(jnp.result_type(float)))

    def collect(self, msg: dict) -> dict:
        return logits_and_keep(msg)

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict:
        return {"alpha": jnp.asarray(self.alpha_init, jnp.float32)}

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        alpha = (ctx.params or {}).get("alpha")
        if alpha is None:
            raise SiteError(
                ctx.name,
                f"uses DCV, but params has no '{ctx.name}$alpha' (its control-variate weight); "
                "create params with sg.init_params(rng_key, model, guide, ...)",
            )
        stop = jax.lax.stop_gradient
        k = ctx.num_particles
        eta = ctx.collected["logits"]  # (K, *value_shape), differentiable in the parameters
        theta = jax.nn.sigmoid(stop(eta))
        dz = ctx.value.astype(theta.dtype) - theta
        var = theta * (1.0 - theta)
        keep = ctx.collected["keep"].astype(theta.dtype)
        dz, var = dz * keep, var * keep
        f = stop(ctx.to_value_layout(ctx.learning_signal))  # size 1 along the block dims
        g = stop(ctx.signal_grad).astype(theta.dtype)
        block = tuple(a for a in range(1, dz.ndim) if f.shape[a] == 1)

        def loo(x: jax.Array) -> jax.Array:  # mean over the other particles
            return (x.sum(axis=0, keepdims=True) - x) / (k - 1)

        gbar = loo(g)
        c = jnp.sum(gbar * dz, axis=block, keepdims=True)  # <gbar_{-k}, z_k - theta>
        rloo = (f - loo(f)) * dz / k  # per-particle coefficients of eta_k
        cv = ((c - loo(c)) * dz - gbar * var) / k
        main = jnp.sum(eta * stop(rloo + stop(alpha) * cv))
        grad = jnp.sum(stop(rloo) + alpha * stop(cv), axis=0)  # the estimate, per element
        variance = jnp.mean(grad**2)
        return zero_value(main) - zero_value(variance), ctx.state
