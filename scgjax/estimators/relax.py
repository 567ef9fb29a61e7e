"""REBAR (Tucker et al., NeurIPS 2017) and RELAX (Grathwohl et al., ICLR 2018) for Bernoulli
sites: unbiased score-function estimators with a control variate on a continuous relaxation,
whose parameters are trained in the same step to minimise the estimator's variance.

For a Bernoulli element with logits ``eta``, ``theta = sigmoid(eta)``, logistic noise
``z = eta + logit(u)``, ``u ~ U(0, 1)``, value ``b = H(z) = 1[z > 0]`` and the *conditional*
relaxation ``z~ ~ p(z | b)`` (reparameterised given ``b``), any control variate ``c`` that is a
continuous function of ``z`` gives the unbiased estimate of ``d/d eta E[f(b)]``

    g = [f(b) - beta - nu c(z~)] d log p(b)/d eta + nu d c(z)/d eta - nu d c(z~)/d eta

(``beta`` a baseline that does not depend on this particle). ``z~`` is drawn as Tucker et al.
(appendix): ``z~ = softplus(logit(v) - log sigmoid(-eta))`` if ``b = 1`` and
``z~ = -softplus(logit(v) - log sigmoid(eta))`` if ``b = 0``, ``v ~ U(0, 1)``. Here ``z`` is
drawn *given* the value ``b`` the same way (with ``eta`` held fixed, then shifted by ``eta``
with ``u`` fixed), which is the same joint law as drawing ``u`` first.

How ``f`` enters: ``f`` is the site's learning signal (the costs downstream of the site,
credited per plate element). The objectives evaluate the costs at the drawn value only (plus
their derivative ``df/db`` there, the probe of ``needs_signal_grad``), not at relaxed values,
so :class:`REBAR` uses a *first-order* relaxation of ``f`` (see its docstring) and
:class:`RELAX` a learned network. Both are exact (unbiased) estimators; only the control
variate differs from the papers' ``f(sigma_lambda(z))`` in REBAR.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from scgjax.baselines import site_to_signal_layout
from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator, ScoreContext, require_particles, zero_value
from scgjax.estimators.bernoulli import logits_and_keep, require_bernoulli

__all__ = ["REBAR", "RELAX", "conditional_logistic"]


def _logit(v: jax.Array) -> jax.Array:
    return jnp.log(v) - jnp.log1p(-v)


def conditional_logistic(eta: jax.Array, b: jax.Array, v: jax.Array) -> jax.Array:
    """A draw of ``z = eta + Logistic(0, 1)`` conditioned on ``H(z) = b``, from ``v ~ U(0, 1)``,
    reparameterised in ``eta`` given ``b`` (Tucker et al. 2017, appendix), in a stable form.

    Example:
        >>> import jax.numpy as jnp
        >>> z = conditional_logistic(jnp.zeros(2), jnp.array([0.0, 1.0]), jnp.array([0.5, 0.5]))
        >>> [round(float(x), 4) for x in z]  # -log 3 and log 3: the medians of z | b at eta = 0
        [-1.0986, 1.0986]
    """
    lv = _logit(v)
    one = jax.nn.softplus(lv - jax.nn.log_sigmoid(-eta))
    zero = -jax.nn.softplus(lv - jax.nn.log_sigmoid(eta))
    return jnp.where(b > 0.5, one, zero)


class _Relaxed(Estimator):
    """What REBAR and RELAX share: the noise, the relaxed samples, the estimate per element and
    the same-step variance training. Subclasses define :meth:`relaxed_cv` (``c`` per plate
    element, in the value layout with size 1 along the block dims) and :meth:`cv_scale`."""

    score = False
    _min_particles = 1

    @property
    def uses_signal(self) -> bool:
        return True

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        require_bernoulli(self, name, fn)
        require_particles(self, name, num_particles, self._min_particles)

    def bound_refusal(self) -> str:
        return (f"uses {type(self).__name__}, which a multi-sample bound (sg.IWAE) does not "
                "support (its learning signal is defined per particle); use VIMCO(), "
                "ScoreFunction() without a baseline, or Pathwise()")

    def collect(self, msg: dict) -> dict:
        out = logits_and_keep(msg)
        key = msg["kwargs"].get("rng_key")
        if key is None:
            raise SiteError(msg["name"], f"uses {type(self).__name__}, which needs the site's "
                            "random key to draw its relaxations; the value must be drawn by "
                            "the estimator (not substituted or conditioned)")
        shape = jnp.shape(msg["value"])
        tiny = jnp.finfo(jnp.float32).tiny
        out["u"] = jax.random.uniform(jax.random.fold_in(key, 1), shape, minval=tiny)
        out["v"] = jax.random.uniform(jax.random.fold_in(key, 2), shape, minval=tiny)
        out["batch_shape"] = jnp.zeros((*msg["fn"].batch_shape, 0))
        return out

    def relaxed_cv(self, ctx: ScoreContext, z: jax.Array, theta: jax.Array,
                   params: dict) -> jax.Array:
        """``c(z)`` per plate element, in the value layout (size 1 along the block dims)."""
        raise NotImplementedError

    def cv_scale(self, params: dict) -> jax.Array:
        return jnp.ones(())

    def baseline(self, f: jax.Array) -> jax.Array:
        """Leave-one-out mean of the other particles' signals (0 for one particle)."""
        k = f.shape[0]
        if k == 1:
            return jnp.zeros_like(f)
        return (f.sum(axis=0, keepdims=True) - f) / (k - 1)

    def _params(self, ctx: ScoreContext) -> dict:
        params = ctx.params or {}
        missing = [n for n in self.init_param_names() if n not in params]
        if missing:
            raise SiteError(
                ctx.name,
                f"uses {type(self).__name__}, but params has no "
                f"{', '.join(repr(f'{ctx.name}${n}') for n in missing)}; create params with "
                "sg.init_params(rng_key, model, guide, ...)",
            )
        return params

    def init_param_names(self) -> tuple[str, ...]:
        return ()

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        stop = jax.lax.stop_gradient
        params = self._params(ctx)
        k = ctx.num_particles
        eta = ctx.collected["logits"]  # (K, *value_shape), differentiable in the parameters
        e0 = stop(eta).astype(jnp.result_type(float))
        theta = jax.nn.sigmoid(e0)
        b = stop(ctx.value).astype(e0.dtype)
        keep = ctx.collected["keep"].astype(e0.dtype)
        f = stop(ctx.to_value_layout(ctx.learning_signal)).astype(e0.dtype)
        z0 = conditional_logistic(e0, b, stop(ctx.collected["u"]))  # z | b, u held fixed below
        v = stop(ctx.collected["v"])

        def relaxed(e):  # sum_elements (c(z) - c(z~)) and c(z~), as functions of the logits
            z = z0 + (e - e0)
            zt = conditional_logistic(e, b, v)
            c_z = self.relaxed_cv(ctx, z, theta, params)
            c_zt = self.relaxed_cv(ctx, zt, theta, params)
            return jnp.sum(c_z - c_zt), c_zt

        dc, c_zt = jax.grad(relaxed, has_aux=True)(e0)  # per element: d(c(z) - c(z~))/d eta
        nu = self.cv_scale(params)
        coef = f - self.baseline(f) - nu * c_zt
        g = keep * (coef * (b - theta) + nu * dc) / k  # per particle; the estimate is the sum
        main = jnp.sum(eta * stop(g))
        variance = jnp.mean(jnp.sum(g, axis=0) ** 2)  # E[g^2] = Var + mean^2, mean fixed
        return zero_value(main) - zero_value(variance), ctx.state


@dataclasses.dataclass(frozen=True)
class REBAR(_Relaxed):
    """REBAR (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein, NeurIPS 2017) for Bernoulli
    sites, with a first-order relaxation of the learning signal.

    Per particle ``k`` and element (notation of the module docstring)::

        g_k = [f_k - mean_{j != k} f_j - nu c_k(z~_k)] (b_k - theta_k)
              + nu d c_k(z_k)/d eta - nu d c_k(z~_k)/d eta,
        c_k(z) = < gbar_{-k}, sigmoid(z / lambda) - theta_k >,
        gbar_{-k} = mean_{j != k} df/db (b_j),

    averaged over the ``K`` particles; the inner product runs over the dimensions ``f`` is one
    number for (event dimensions), separately for every plate element. The paper's control
    variate is ``c(z) = f(sigmoid(z / lambda))``, the downstream costs evaluated at the relaxed
    value; the objectives here evaluate the costs at the drawn values only, so ``f`` is
    relaxed to first order around the *other* particles' values (their gradients
    ``df/db``, as in :class:`~scgjax.estimators.DCV`), which keeps ``c_k`` a continuous function
    of ``z_k`` that does not depend on particle ``k``'s draw: the estimate is exactly unbiased
    for every ``nu`` and ``lambda`` (the REBAR identity holds for any such ``c``); only the
    variance reduction is that of a linear relaxation. ``nu = 0`` is RLOO; as ``lambda -> 0``
    it tends to DCV's Taylor control variate.

    Trainable estimator parameters, created by ``sg.init_params``: ``params["<site>$eta"]``
    (``nu``, starting at ``eta_init``) and ``params["<site>$log_temperature"]``
    (``log lambda``, starting at ``log(temperature_init)``). In the same step they are trained
    to minimise ``mean(g^2)`` over the site's elements (the single-sample variance gradient
    ``d E[g^2] = 2 E[g dg]`` of the papers) through a zero-valued term: they get no gradient
    from the objective and the program's parameters none from the variance term.

    The site's ``log q`` does not enter the DiCE box (``score = False``): this term supplies the
    whole score part of the gradient through the logits (first derivatives only). Values are
    sampled as floats (the objective differentiates the costs with respect to them). Masked
    elements get no score gradient.

    Requirements: a Bernoulli site and ``num_particles >= 2``; not for ``sg.IWAE``; errors
    naming the site otherwise.

    Reference: G. Tucker, A. Mnih, C. J. Maddison, D. Lawson and J. Sohl-Dickstein, "REBAR:
    Low-variance, unbiased gradient estimates for discrete latent variable models", NeurIPS
    2017 (code: github.com/google-research/google-research, ``rebar``).

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def program():
        ...     eta = sg.param("eta", jnp.zeros(3))
        ...     z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=sg.REBAR())
        ...     sg.factor("f", -jnp.sum((z - 0.45) ** 2))
        >>> params = sg.init_params(0, program)
        >>> sorted(params)
        ['eta', 'z$eta', 'z$log_temperature']
        >>> grads = jax.grad(sg.Expectation(num_particles=2).loss, argnums=1)(
        ...     jax.random.key(0), params, program)
        >>> grads["eta"].shape, grads["z$eta"].shape
        ((3,), ())
    """

    temperature_init: float = 0.5
    eta_init: float = 1.0

    needs_signal_grad = True
    _min_particles = 2

    def __post_init__(self):
        if not self.temperature_init > 0:
            raise ValueError(f"REBAR temperature_init must be > 0, got {self.temperature_init}")

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        # Float values: the objective differentiates the costs with respect to them.
        return jax.lax.stop_gradient(fn.sample(rng_key).astype(jnp.result_type(float)))

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict:
        return {"eta": jnp.asarray(self.eta_init, jnp.float32),
                "log_temperature": jnp.asarray(math.log(self.temperature_init), jnp.float32)}

    def init_param_names(self) -> tuple[str, ...]:
        return ("eta", "log_temperature")

    def cv_scale(self, params: dict) -> jax.Array:
        return params["eta"]

    def relaxed_cv(self, ctx, z, theta, params):
        stop = jax.lax.stop_gradient
        k = ctx.num_particles
        g = stop(ctx.signal_grad).astype(z.dtype)
        gbar = (g.sum(axis=0, keepdims=True) - g) / (k - 1)
        f_shape = jax.eval_shape(ctx.to_value_layout, ctx.learning_signal).shape
        block = tuple(a for a in range(1, z.ndim) if f_shape[a] == 1 and z.shape[a] != 1)
        s = jax.nn.sigmoid(z / jnp.exp(params["log_temperature"]))
        return jnp.sum(gbar * (s - theta), axis=block, keepdims=True)


@dataclasses.dataclass(frozen=True, eq=False)
class RELAX(_Relaxed):
    """RELAX (Grathwohl, Choi, Wu, Roeder & Duvenaud, ICLR 2018) for Bernoulli sites: REBAR's
    estimator with a learned control variate ``c_phi``, a flax network.

    Per particle ``k`` and element (notation of the module docstring)::

        g_k = [f_k - mean_{j != k} f_j - c_phi(z~_k)] (b_k - theta_k)
              + d c_phi(z_k)/d eta - d c_phi(z~_k)/d eta

    averaged over the ``K`` particles (no leave-one-out baseline at ``K = 1``). Unbiased for
    every ``phi``. ``control_variate`` is a flax linen module applied to one particle's relaxed
    sample ``z`` (the logistic variable ``eta + logit(u)``, real-valued, in the layout of the
    site's value: ``(*batch_shape, *event_shape)``), and to ``inputs`` when given
    (``module(z, inputs)``; e.g. the data ``x``, which must not depend on the site's value;
    gradient stopped). It returns one value per plate element in the site's batch layout
    (``(N,)`` or ``(N, 1)`` for a site in ``plate("data", N)``; ``()`` or ``(1,)`` in no plate),
    and must not mix plate elements (each element's ``c`` a function of its own ``z``).

    ``sg.init_params`` creates ``phi`` as ``params["<site>$control_variate"]``
    (``module.init(key, z[, inputs])["params"]``). In the same step ``phi`` is trained to
    minimise ``mean(g^2)`` over the site's elements (the single-sample variance gradient
    ``d E[g^2] = 2 E[g dg]``), through a zero-valued term: ``phi`` gets no gradient from the
    objective and the program's parameters none from the variance term. (The paper's variant
    that adds REBAR's ``f(sigma_lambda(z))`` term to ``c_phi`` is not provided.)

    The site's ``log q`` does not enter the DiCE box (``score = False``): this term supplies the
    whole score part of the gradient through the logits (first derivatives only). Masked
    elements get no score gradient.

    Requirements: a Bernoulli site; not for ``sg.IWAE``; errors naming the site otherwise.

    Reference: W. Grathwohl, D. Choi, Y. Wu, G. Roeder and D. Duvenaud, "Backpropagation
    through the Void: Optimizing control variates for black-box gradient estimation", ICLR
    2018 (code: github.com/duvenaud/relax).

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> class CV(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, z):  # z: (3,) -> one value (a site in no plate)
        ...         return nn.Dense(1)(nn.tanh(nn.Dense(8)(z)))
        >>> def program():
        ...     eta = sg.param("eta", jnp.zeros(3))
        ...     z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1),
        ...                   estimator=sg.RELAX(CV()))
        ...     sg.factor("f", -jnp.sum((z - 0.45) ** 2))
        >>> params = sg.init_params(0, program)
        >>> sorted(params)
        ['eta', 'z$control_variate']
        >>> grads = jax.grad(sg.Expectation().loss, argnums=1)(jax.random.key(0), params, program)
        >>> grads["eta"].shape
        (3,)
    """

    control_variate: Any
    inputs: Any = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        module = self.control_variate
        if isinstance(module, type):
            raise TypeError(f"RELAX got the class {module.__name__} as its control variate; "
                            f"pass an instance, e.g. {module.__name__}(...)")
        if not (callable(getattr(module, "init", None))
                and callable(getattr(module, "apply", None))):
            raise TypeError("RELAX needs a flax linen module (with init and apply) as its "
                            f"control variate, got {type(module).__name__}")

    def collect(self, msg: dict) -> dict:
        out = super().collect(msg)
        if self.inputs is not None:
            out["inputs"] = jax.tree.map(jax.lax.stop_gradient, self.inputs)
        return out

    def _args(self, z: jax.Array, inputs: Any) -> tuple:
        return (z,) if self.inputs is None else (z, inputs)

    def init_params(self, rng_key: jax.Array, msg: dict) -> dict:
        z = jnp.zeros(jnp.shape(msg["value"]), jnp.float32)
        inputs = jax.tree.map(
            lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x))
            if isinstance(x, jax.core.Tracer) else jax.lax.stop_gradient(x), self.inputs)
        return {"control_variate":
                self.control_variate.init(rng_key, *self._args(z, inputs))["params"]}

    def init_param_names(self) -> tuple[str, ...]:
        return ("control_variate",)

    def relaxed_cv(self, ctx, z, theta, params):
        phi = params["control_variate"]
        inputs = ctx.collected.get("inputs")
        out = jax.vmap(lambda zk, xk: self.control_variate.apply(
            {"params": phi}, *self._args(zk, xk)))(z, inputs)
        batch_ndim = ctx.collected["batch_shape"].ndim - 2  # (K, *batch_shape, 0)
        return ctx.to_value_layout(site_to_signal_layout(out, ctx, batch_ndim))
