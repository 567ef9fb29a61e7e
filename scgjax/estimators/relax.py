"""REBAR (Tucker et al., NeurIPS 2017) for Bernoulli and one-hot categorical sites and RELAX
(Grathwohl et al., ICLR 2018) for Bernoulli and categorical sites: unbiased score-function
estimators with a control variate on a continuous relaxation, whose parameters are trained in
the same step to minimise the estimator's variance.

For a discrete element ``b = H(z)`` of a continuous, reparameterisable ``z ~ p(z | eta)`` and
the *conditional* relaxation ``z~ ~ p(z | b, eta)`` (reparameterised given ``b``), any control
variate ``c`` that is a continuous function of ``z`` gives the unbiased estimate of
``d/d eta E[f(b)]``

    g = [f(b) - beta - nu c(z~)] d log p(b)/d eta + nu d c(z)/d eta - nu d c(z~)/d eta

(``beta`` a baseline that does not depend on this particle; the derivatives of ``c`` are
through the reparameterised noise).

- Bernoulli, logits ``eta``, ``theta = sigmoid(eta)``: logistic noise ``z = eta + logit(u)``,
  ``u ~ U(0, 1)``, ``b = 1[z > 0]``; ``z~`` as Tucker et al. (appendix):
  ``z~ = softplus(logit(v) - log sigmoid(-eta))`` if ``b = 1`` and
  ``z~ = -softplus(logit(v) - log sigmoid(eta))`` if ``b = 0``, ``v ~ U(0, 1)``.
- Categorical, ``C`` classes, normalised log-probabilities ``eta = log theta`` (the logits
  through ``log_softmax``): Gumbel noise ``z_i = eta_i - log(-log u_i)``, ``b = argmax z``;
  ``z~`` as Grathwohl et al. (appendix B): ``z~_b = -log(-log v_b)`` (the maximum of the
  ``z_i`` is a standard Gumbel, independent of ``eta`` and ``b``) and, for ``i != b``, the
  Gumbel with location ``eta_i`` truncated below it,
  ``z~_i = -log(-log(v_i) / theta_i - log v_b)`` (:func:`conditional_gumbel`), ``v`` uniform
  on ``[0, 1]^C``. ``d log p(b)/d eta = onehot(b) - theta``. The authors' RL code
  (github.com/wgrathwohl/BackpropThroughTheVoidRL, ``baselines/a2c/policies.py``,
  ``make_samples``) draws ``z~_b = eta_b - log(-log v_b)`` instead, marked "slightly biased"
  there; the paper's ``z~_b`` above is the exact one.

Here ``z`` is drawn *given* the value ``b`` the same way as ``z~`` (with ``eta`` held fixed,
then moved with ``eta`` at fixed noise ``z - eta``), which is the same joint law as drawing the
noise first and ``b = H(z)``: the site's value is drawn by its distribution as usual.

How ``f`` enters: ``f`` is the site's learning signal (the costs downstream of the site,
credited per plate element). :class:`REBAR` evaluates it at the relaxed value
``sigmoid(z / lambda)`` by running the program again (``ctx.signal_at``, the paper's control
variate; or, with ``relaxation="first_order"``, relaxes ``f`` to first order from ``df/db`` at
the other particles' draws, with no extra run), and :class:`RELAX` uses a learned network.
Both are exact (unbiased) estimators for any control variate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as nd

from scgjax.baselines import site_to_signal_layout
from scgjax.dist import OneHotCategorical
from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator, ScoreContext, require_particles, zero_value
from scgjax.estimators.bernoulli import bernoulli_parts, logits_and_keep, unwrap
from scgjax.estimators.unordered_set import categorical_logits

__all__ = ["REBAR", "RELAX", "conditional_gumbel", "conditional_logistic"]


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


def conditional_gumbel(logp: jax.Array, b: jax.Array, v: jax.Array) -> jax.Array:
    """A draw of ``z = logp + Gumbel(0, 1)`` (one Gumbel per class, last axis) conditioned on
    ``argmax z = b``, from ``v ~ U(0, 1)`` of the same shape, reparameterised in ``logp`` given
    ``b`` (Grathwohl et al. 2018, appendix B; Tucker et al. 2017, appendix). ``logp`` must be
    normalised (``logsumexp(logp) = 0``): the maximum ``z_b`` is then a standard Gumbel whatever
    ``logp`` and ``b`` are, and every other coordinate a Gumbel with location ``logp_i``
    truncated below it::

        z_b = -log(-log v_b),    z_i = -log(-log(v_i) / p_i - log v_b)   (i != b),

    computed as ``-logaddexp(log(-log v_i) - logp_i, log(-log v_b))``.

    Example:
        >>> import jax.numpy as jnp
        >>> logp = jnp.log(jnp.array([0.5, 0.25, 0.25]))
        >>> z = conditional_gumbel(logp, jnp.array(1), jnp.full(3, 0.5))
        >>> int(jnp.argmax(z)), round(float(z[1]), 4)  # z_b: the Gumbel median -log(log 2)
        (1, 0.3665)
    """
    e = jnp.log(-jnp.log(v))  # (..., C)
    at_b = jax.nn.one_hot(b, logp.shape[-1], dtype=bool)
    e_b = jnp.sum(jnp.where(at_b, e, 0.0), axis=-1, keepdims=True)
    return jnp.where(at_b, -e_b, -jnp.logaddexp(e - logp, e_b))


def _is_categorical(fn: Any) -> bool:
    return categorical_logits(fn) is not None


def _one_hot_parts(fn: Any) -> tuple[jax.Array, jax.Array | None] | None:
    """``(normalised logits, mask)`` of a :class:`~scgjax.dist.OneHotCategorical` inside
    ``.to_event`` / ``.expand`` / ``.mask`` wrappers, both broadcastable against its values
    (the classes last, see :func:`~scgjax.estimators.bernoulli.unwrap`), or ``None``."""
    inner, mask = unwrap(fn)
    if not isinstance(inner, OneHotCategorical):
        return None
    return jax.nn.log_softmax(inner.logits, axis=-1), mask


def _categorical_under_event(fn: Any) -> bool:
    """A Categorical wrapped by ``.to_event`` (possibly with ``.expand``/``.mask`` too)."""
    event = False
    while hasattr(fn, "base_dist"):
        event = event or isinstance(fn, nd.Independent)
        fn = fn.base_dist
    return event and isinstance(fn, (nd.CategoricalLogits, nd.CategoricalProbs))


class _Relaxed(Estimator):
    """What REBAR and RELAX share: the noise, the relaxed samples (logistic for a Bernoulli,
    Gumbel for a Categorical: ``logits`` then has the classes last, one axis more than the
    value), the estimate per element and the same-step variance training. Subclasses define
    :meth:`relaxed_cv` (``c`` per plate element, in the value layout with size 1 along the
    block dims) and :meth:`cv_scale`."""

    score = False
    _min_particles = 1

    @property
    def uses_signal(self) -> bool:
        return True

    #: whether the estimator also serves Categorical sites (RELAX; REBAR's relaxation puts a
    #: real value in place of a Bernoulli's bit)
    _categorical = False

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        kind = type(self).__name__
        if _categorical_under_event(fn):
            raise SiteError(name, f"uses {kind}, which does not support a Categorical under "
                            ".to_event (one control-variate value per block of classes is not "
                            "provided); declare the independent dims with sg.plate instead")
        if _is_categorical(fn):
            if not self._categorical:
                raise SiteError(name, f"uses {kind}, but its distribution is "
                                f"{type(fn).__name__}, whose costs take a class index, where "
                                f"{kind}'s relaxation puts a point of the simplex: write the "
                                "site with dist.OneHotCategorical (one-hot values, which "
                                "x @ table and log_prob accept relaxed), or use "
                                "sg.RELAX(control_variate), sg.RLOO() or sg.MeasureValued()")
        elif _one_hot_parts(fn) is None and bernoulli_parts(fn) is None:
            raise SiteError(name, f"uses {kind}, but its distribution is {type(fn).__name__}; "
                            f"{kind} needs a Bernoulli, a OneHotCategorical"
                            f"{' or a Categorical' if self._categorical else ''} site "
                            "(dist.Bernoulli / dist.OneHotCategorical / dist.Categorical "
                            "with logits=... or probs=..., possibly with .expand / .mask; "
                            "all but a Categorical also with .to_event)")
        require_particles(self, name, num_particles, self._min_particles)

    def bound_refusal(self) -> str:
        return (f"uses {type(self).__name__}, which a multi-sample bound (sg.IWAE) does not "
                "support (its learning signal is defined per particle); use VIMCO(), "
                "ScoreFunction() without a baseline, or Pathwise()")

    def collect(self, msg: dict) -> dict:
        one_hot = _one_hot_parts(msg["fn"])
        if one_hot is not None:  # the classes last in the value itself
            out = {**logits_and_keep(msg, one_hot), "one_hot": jnp.zeros((0,))}
        elif _is_categorical(msg["fn"]):
            out = _categorical_parts(msg)
        else:
            out = logits_and_keep(msg)
        key = msg["kwargs"].get("rng_key")
        if key is None:
            raise SiteError(msg["name"], f"uses {type(self).__name__}, which needs the site's "
                            "random key to draw its relaxations; the value must be drawn by "
                            "the estimator (not substituted or conditioned)")
        shape = jnp.shape(out["logits"])  # the value's, with the classes last for a Categorical
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

    #: subtract from ``c_k(z~_k)`` the mean of the other particles' ``c_j(z~_j)`` (a baseline
    #: of particle ``k``'s score, independent of its draw): for a control variate that carries
    #: the costs' own level, which the leave-one-out baseline removes from ``f_k``
    centres_control_variate: bool = False

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
        eta = ctx.collected["logits"]  # differentiable in the parameters
        e0 = stop(eta).astype(jnp.result_type(float))
        b = stop(ctx.value)
        keep = ctx.collected["keep"].astype(e0.dtype)
        f = stop(ctx.to_value_layout(ctx.learning_signal)).astype(e0.dtype)
        u, v = stop(ctx.collected["u"]), stop(ctx.collected["v"])
        one_hot = "one_hot" in ctx.collected  # (K, *batch, C) values and log-probabilities
        if one_hot or eta.ndim == b.ndim + 1:  # or a Categorical's (K, *batch) indices
            theta = jnp.exp(e0)
            index = jnp.argmax(b, axis=-1) if one_hot else b
            score = (b.astype(e0.dtype) if one_hot
                     else jax.nn.one_hot(b, e0.shape[-1], dtype=e0.dtype)) - theta
            z0 = conditional_gumbel(e0, index, u)  # z | b, the Gumbel noise z0 - e0 held fixed

            def relax_z(e):
                lp = jax.nn.log_softmax(e, axis=-1)
                return z0 + (lp - e0), conditional_gumbel(lp, index, v)
        else:  # Bernoulli: (K, *value_shape) logits
            b = b.astype(e0.dtype)
            theta = jax.nn.sigmoid(e0)
            score = b - theta
            z0 = conditional_logistic(e0, b, u)  # z | b, u held fixed below

            def relax_z(e):
                return z0 + (e - e0), conditional_logistic(e, b, v)

        def relaxed(e):  # sum_elements (c(z) - c(z~)) and c(z~), as functions of the logits
            z, zt = relax_z(e)
            c_z = self.relaxed_cv(ctx, z, theta, params)
            c_zt = self.relaxed_cv(ctx, zt, theta, params)
            return jnp.sum(c_z - c_zt), c_zt

        dc, c_zt = jax.grad(relaxed, has_aux=True)(e0)  # per element: d(c(z) - c(z~))/d eta
        nu = self.cv_scale(params)
        if self.centres_control_variate:  # the other particles' c(z~) too: still unbiased
            c_zt = c_zt - self.baseline(c_zt)
        coef = f - self.baseline(f) - nu * c_zt
        if score.ndim > coef.ndim:  # the class axis
            coef, keep = coef[..., None], keep[..., None]
        g = keep * (coef * score + nu * dc) / k  # per particle; the estimate is the sum
        main = jnp.sum(eta * stop(g))
        variance = jnp.mean(jnp.sum(g, axis=0) ** 2)  # E[g^2] = Var + mean^2, mean fixed
        return zero_value(main) - zero_value(variance), ctx.state


def _categorical_parts(msg: dict) -> dict[str, jax.Array]:
    """A Categorical site's normalised logits ``(*value_shape, C)`` and its ``keep`` mask
    ``(*value_shape)`` (False where masked by ``.mask`` or ``sg.handlers.mask``)."""
    logits, mask = categorical_logits(msg["fn"])
    shape = jnp.shape(msg["value"])
    keep = jnp.ones(shape, bool) if mask is None else jnp.broadcast_to(mask, shape)
    if msg.get("mask") is not None:  # sg.handlers.mask: over the batch shape
        keep = jnp.logical_and(keep, jnp.broadcast_to(msg["mask"], shape))
    return {"logits": jnp.broadcast_to(logits, (*shape, logits.shape[-1])), "keep": keep}


@dataclasses.dataclass(frozen=True)
class REBAR(_Relaxed):
    """REBAR (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein, NeurIPS 2017) for Bernoulli
    and one-hot categorical sites (:class:`~scgjax.dist.OneHotCategorical`).

    Per particle ``k`` and element (notation of the module docstring)::

        g_k = [f_k - mean_{j != k} f_j - nu c_k(z~_k)] (b_k - theta_k)
              + nu d c_k(z_k)/d eta - nu d c_k(z~_k)/d eta,

    averaged over the ``K`` particles (no leave-one-out baseline at ``K = 1``). The control
    variate ``c_k`` depends on ``relaxation``:

    - ``"exact"`` (the default, the paper's): ``c_k(z) = f_k(sigmoid(z / lambda))``, the costs
      downstream of the site evaluated with its value replaced by the relaxed one (the program
      run again, twice per step, at ``z`` and ``z~``, its other draws held and its parameters
      fixed; :mod:`scgjax.objectives.rerun`). The costs must accept a real value in ``[0, 1]``
      in place of the bit (a Bernoulli's ``log_prob`` does; an index does not: refused, naming
      the cost), be per element of the site's plates, and the site not be in an ``sg.scan``
      loop. ``c_k(z~_k)`` carries the costs' level (an ELBO's -150 nats), which the
      leave-one-out baseline removes from ``f_k``; so at ``K >= 2`` the score's coefficient is
      ``f_k - mean_{j != k} f_j - nu (c_k(z~_k) - mean_{j != k} c_j(z~_j))`` (the other
      particles' term is independent of particle ``k``'s draw: a baseline, unbiased).
    - ``"first_order"``: ``c_k(z) = < gbar_{-k}, sigmoid(z / lambda) - theta_k >`` with
      ``gbar_{-k} = mean_{j != k} df/db (b_j)``, ``f`` relaxed to first order around the
      *other* particles' values (their gradients ``df/db``, as in
      :class:`~scgjax.estimators.DCV`): no extra run of the program, but only the variance
      reduction of a linear relaxation; ``K >= 2``. ``nu = 0`` is RLOO; as ``lambda -> 0`` it
      tends to DCV's Taylor control variate.

    Either way the estimate is exactly unbiased for every ``nu`` and ``lambda`` (the REBAR
    identity holds for any continuous ``c`` that does not depend on particle ``k``'s draw);
    the inner product and ``f`` run over the dimensions ``f`` is one number for (event
    dimensions), separately for every plate element.

    Trainable estimator parameters, created by ``sg.init_params``: ``params["<site>$eta"]``
    (``nu``, starting at ``eta_init``) and ``params["<site>$log_temperature"]``
    (``log lambda``, starting at ``log(temperature_init)``). In the same step they are trained
    to minimise ``mean(g^2)`` over the site's elements (the single-sample variance gradient
    ``d E[g^2] = 2 E[g dg]`` of the papers) through a zero-valued term: they get no gradient
    from the objective and the program's parameters none from the variance term.

    The site's ``log q`` does not enter the DiCE box (``score = False``): this term supplies the
    whole score part of the gradient through the logits (first derivatives only). Values are
    sampled as floats (the objective evaluates or differentiates the costs at real values).
    Masked elements get no score gradient.

    For a one-hot categorical site (the paper's appendix) the relaxed value is the point of
    the simplex ``softmax(z / lambda)`` of the Gumbel vector ``z``, in place of the one-hot
    ``b = onehot(argmax z)``, and ``b - theta`` is the score; the costs must accept it (a
    model written with ``b @ table`` or a ``log_prob`` linear in ``b`` does). A
    ``dist.Categorical`` site, whose costs take a class index, is refused (write it with
    ``dist.OneHotCategorical``, or use :class:`RELAX`).

    Requirements: a Bernoulli or a OneHotCategorical site (``.to_event``, ``.expand`` and
    ``.mask`` are fine; ``K >= 2`` for ``"first_order"``); not for ``sg.IWAE``; errors naming
    the site otherwise.

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
    relaxation: str = "exact"

    def __post_init__(self):
        if not self.temperature_init > 0:
            raise ValueError(f"REBAR temperature_init must be > 0, got {self.temperature_init}")
        if self.relaxation not in ("exact", "first_order"):
            raise ValueError(f"REBAR relaxation must be 'exact' or 'first_order', got "
                             f"{self.relaxation!r}")

    @property
    def needs_signal_grad(self) -> bool:
        return self.relaxation == "first_order"

    @property
    def needs_signal_at(self) -> bool:
        return self.relaxation == "exact"

    @property
    def differentiates_signal_at(self) -> bool:
        return self.relaxation == "exact"

    @property
    def centres_control_variate(self) -> bool:
        return self.relaxation == "exact"

    @property
    def _min_particles(self) -> int:
        return 2 if self.relaxation == "first_order" else 1

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
        temperature = jnp.exp(params["log_temperature"])
        s = (jax.nn.softmax(z / temperature, axis=-1) if "one_hot" in ctx.collected
             else jax.nn.sigmoid(z / temperature))
        if self.relaxation == "exact":  # f at the relaxed value: the program run again
            return ctx.to_value_layout(ctx.signal_at(s)).astype(z.dtype)
        stop = jax.lax.stop_gradient
        k = ctx.num_particles
        g = stop(ctx.signal_grad).astype(z.dtype)
        gbar = (g.sum(axis=0, keepdims=True) - g) / (k - 1)
        f_shape = jax.eval_shape(ctx.to_value_layout, ctx.learning_signal).shape
        block = tuple(a for a in range(1, z.ndim) if f_shape[a] == 1 and z.shape[a] != 1)
        return jnp.sum(gbar * (s - theta), axis=block, keepdims=True)


@dataclasses.dataclass(frozen=True, eq=False)
class RELAX(_Relaxed):
    """RELAX (Grathwohl, Choi, Wu, Roeder & Duvenaud, ICLR 2018) for Bernoulli and Categorical
    sites: REBAR's estimator with a learned control variate ``c_phi``, a flax network.

    Per particle ``k`` and element (notation of the module docstring)::

        g_k = [f_k - mean_{j != k} f_j - c_phi(z~_k)] d log p(b_k)/d eta
              + d c_phi(z_k)/d eta - d c_phi(z~_k)/d eta,

    ``d log p(b)/d eta = b - theta`` for a Bernoulli (``eta`` the logits) and
    ``onehot(b) - theta`` for a Categorical (``eta = log_softmax(logits)``, so the gradient
    reaches the logits through ``log_softmax``), averaged over the ``K`` particles (no
    leave-one-out baseline at ``K = 1``). Unbiased for every ``phi``.

    ``control_variate`` is a flax linen module applied to one particle's relaxed sample ``z``,
    and to ``inputs`` when given (``module(z, inputs)``; e.g. the data ``x``, which must not
    depend on the site's value; gradient stopped). The relaxed sample is the continuous variable
    whose ``H`` is the value, real-valued:

    - Bernoulli: the logistic variable ``eta + logit(u)``, in the layout of the site's value,
      ``(*batch_shape, *event_shape)``;
    - Categorical: the Gumbel vector ``log_softmax(logits) - log(-log u)``, ``(*batch_shape,
      C)`` (the classes last; ``b = argmax z``). The authors' code feeds its network
      ``softmax(z / lambda)`` with a learned temperature ``lambda`` (``log lambda`` from 0);
      a module that wants that does it itself (see the example), since ``z`` determines it.

    It returns one value per plate element in the site's batch layout (``(N,)`` or ``(N, 1)``
    for a site in ``plate("data", N)``; ``()`` or ``(1,)`` in no plate), and must not mix plate
    elements (each element's ``c`` a function of its own ``z``).

    ``sg.init_params`` creates ``phi`` as ``params["<site>$control_variate"]``
    (``module.init(key, z[, inputs])["params"]``). In the same step ``phi`` is trained to
    minimise ``mean(g^2)`` over the site's elements (the single-sample variance gradient
    ``d E[g^2] = 2 E[g dg]``), through a zero-valued term: ``phi`` gets no gradient from the
    objective and the program's parameters none from the variance term. (The paper's variant
    that adds REBAR's ``f(sigma_lambda(z))`` term to ``c_phi`` is not provided.)

    The site's ``log q`` does not enter the DiCE box (``score = False``): this term supplies the
    whole score part of the gradient through the logits (first derivatives only). Masked
    elements get no score gradient.

    Requirements: a Bernoulli or a OneHotCategorical site (``.to_event``, ``.expand`` and
    ``.mask`` are fine) or a Categorical site (``logits`` or ``probs``; ``.expand`` and
    ``.mask``, not ``.to_event``: use a plate); not for ``sg.IWAE``; errors naming the site
    otherwise. The control variate sees a one-hot site's Gumbel vector as it sees a
    Categorical's.

    Reference: W. Grathwohl, D. Choi, Y. Wu, G. Roeder and D. Duvenaud, "Backpropagation
    through the Void: Optimizing control variates for black-box gradient estimation", ICLR
    2018 (code: github.com/duvenaud/relax; the categorical case:
    github.com/wgrathwohl/BackpropThroughTheVoidRL).

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

        A Categorical site in a plate, the control variate on ``softmax(z / lambda)``:

        >>> class SoftmaxCV(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, z):  # z: (4, 5) -> (4,), one value per plate element
        ...         log_t = self.param("log_temperature", nn.initializers.zeros, ())
        ...         h = jax.nn.softmax(z / jnp.exp(log_t), axis=-1)
        ...         return nn.Dense(1)(nn.tanh(nn.Dense(8)(h)))[..., 0]
        >>> def categorical():
        ...     logits = sg.param("logits", jnp.zeros((4, 5)))
        ...     with sg.plate("n", 4):
        ...         c = sg.sample("c", dist.Categorical(logits=logits),
        ...                       estimator=sg.RELAX(SoftmaxCV()))
        ...     sg.factor("f", -jnp.sum((c / 4 - 0.45) ** 2))
        >>> params = sg.init_params(0, categorical)
        >>> grads = jax.grad(sg.Expectation(num_particles=2).loss, argnums=1)(
        ...     jax.random.key(0), params, categorical)
        >>> grads["logits"].shape, sorted(grads["c$control_variate"])
        ((4, 5), ['Dense_0', 'Dense_1', 'log_temperature'])
    """

    control_variate: Any
    inputs: Any = dataclasses.field(default=None, repr=False)

    _categorical = True

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
        shape = jnp.shape(msg["value"])
        if _is_categorical(msg["fn"]):  # the relaxed sample has the classes last
            shape = (*shape, categorical_logits(msg["fn"])[0].shape[-1])
        z = jnp.zeros(shape, jnp.float32)
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
