"""Measure-valued derivatives (Pflug 1989; Mohamed, Rosca, Figurnov & Mnih, JMLR 2020, §6):
the derivative of an expectation as the difference of two expectations.

For a distribution ``q_theta`` whose derivative in one parameter ``theta_i`` decomposes as

    d q_theta(x) / d theta_i = c_i (q_i^+(x) - q_i^-(x))      (q_i^+, q_i^- distributions),

``d E_q[f] / d theta_i = c_i (E_{q_i^+}[f] - E_{q_i^-}[f])``: the costs evaluated at a draw of
each part, no score and no pathwise derivative. The parts used here (the weak derivatives):

- Bernoulli, logits ``eta``: ``d E f / d eta = sigma(eta) sigma(-eta) (f(1) - f(0))``: the costs
  at the drawn value and at the flipped one.
- Categorical, normalised log-probabilities ``eta = log_softmax(logits)``: ``d E f / d eta_j =
  theta_j (f(j) - sum_i theta_i f(i))``: the costs at every class.
- Poisson, rate ``lambda``: ``d E f / d lambda = E[f(n + 1)] - E[f(n)]``, ``n ~ Poisson(lambda)``:
  the costs at ``n + 1`` and at the drawn ``n``.
- Normal, ``(mu, sigma)``: ``d E f / d mu = E[f(mu + sigma W) - f(mu - sigma W)] / (sigma
  sqrt(2 pi))`` with ``W`` Rayleigh (Weibull of scale ``sqrt 2``, shape 2; both parts share it,
  a coupling); ``d E f / d sigma = (E[f(mu + sigma M)] - E[f(x)]) / sigma`` with ``M`` the
  double-sided Maxwell (a random sign times the norm of three standard normals) and ``x`` the
  drawn value.

``f`` is the site's learning signal ``Q_w`` (the costs downstream of it, element by element
through plates), evaluated at the parts' values by running the program again
(``ctx.signal_at``, :mod:`scgjax.objectives.rerun`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as nd

from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator, ScoreContext, zero_value
from scgjax.estimators.bernoulli import BERNOULLI, unwrap, value_keep

__all__ = ["MeasureValued"]

_CATEGORICAL = (nd.CategoricalLogits, nd.CategoricalProbs)
#: the distributions served, by their innermost numpyro class
FAMILIES = {"Bernoulli": BERNOULLI, "Categorical": _CATEGORICAL, "Poisson": (nd.Poisson,),
            "Normal": (nd.Normal,)}


def family(fn: Any) -> tuple[str | None, Any, jax.Array | None]:
    """``(family, innermost distribution, mask)`` of ``fn`` under ``.to_event`` / ``.expand`` /
    ``.mask`` wrappers (:func:`~scgjax.estimators.bernoulli.unwrap`); ``family`` is ``None``
    for a distribution that :class:`MeasureValued` does not serve.

    Example:
        >>> from scgjax import dist
        >>> family(dist.Normal(0.0, 1.0).expand([3]).to_event(1))[0]
        'Normal'
    """
    inner, mask = unwrap(fn)
    for name, classes in FAMILIES.items():
        if isinstance(inner, classes):
            return name, inner, mask
    return None, inner, mask


@dataclasses.dataclass(frozen=True)
class MeasureValued(Estimator):
    """Measure-valued derivatives (Mohamed, Rosca, Figurnov & Mnih, JMLR 2020, §6) for
    Bernoulli, Categorical, Poisson and Normal sites: the score part of the gradient as
    differences of the downstream costs at the values of the weak derivative's parts (see the
    module docstring for each distribution's parts).

    Per particle and element, with ``f`` the site's learning signal ``Q_w`` at the given values
    (the other draws of the particle held: common random numbers), e.g. for a Bernoulli with
    logits ``eta``::

        g = sigma(eta) sigma(-eta) (f(b = 1) - f(b = 0)),

    averaged over the ``K`` particles and entered as ``sum eta * stop_grad(g)`` with value 0;
    the site's ``log q`` does not enter the DiCE box (first derivatives only). Unbiased, with
    no baseline needed; the variance is that of the differences of the costs.

    Cost: every part is one more run of the program (all particles, the program's parameters
    held fixed; :mod:`scgjax.objectives.rerun`), for all plate elements at once but separately
    for each coordinate of the site's block (its event dims and the batch dims that no plate
    declares, and the plates along which a downstream cost depends on all elements at once,
    such as a likelihood outside the plate), since those share one cost: per step, for a block
    of ``D`` coordinates,

    - Bernoulli: ``D`` runs, Poisson: ``D`` runs,
    - Categorical with ``C`` classes: ``C D`` runs,
    - Normal: ``3 D`` runs,

    on top of the usual one. ``chunk``: how many of those runs to batch in one ``vmap``
    (``None``: all at once; a smaller number bounds the memory, ``jax.lax.map``).

    Requirements: the site not in an ``sg.scan`` loop; not for ``sg.IWAE``; errors naming the
    site otherwise. Values are drawn by the estimator (not substituted).

    Reference: S. Mohamed, M. Rosca, M. Figurnov and A. Mnih, "Monte Carlo gradient estimation
    in machine learning", JMLR 21(132), 2020, §6 and table 1; G. Pflug, "Sampling derivatives
    of probabilities", Computing 42, 1989.

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def program():
        ...     eta = sg.param("eta", jnp.zeros(3))
        ...     with sg.plate("n", 3):
        ...         z = sg.sample("z", dist.Bernoulli(logits=eta), estimator=sg.MeasureValued())
        ...         sg.factor("f", -(z - 0.45) ** 2)
        >>> grads = jax.grad(sg.Expectation().loss, argnums=1)(
        ...     jax.random.key(0), sg.init_params(0, program), program)
        >>> [round(float(g), 4) for g in grads["eta"]]  # -(1/4)((1-.45)^2 - .45^2), exact
        [0.025, 0.025, 0.025]
    """

    chunk: int | None = None

    score = False
    needs_signal_at = True
    runs_coupled_elements = True

    def __post_init__(self):
        if self.chunk is not None and (isinstance(self.chunk, bool)
                                       or not isinstance(self.chunk, (int, np.integer))
                                       or self.chunk < 1):
            raise TypeError(f"MeasureValued chunk must be None or an int >= 1, got "
                            f"{self.chunk!r}")

    @property
    def uses_signal(self) -> bool:
        return True

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        kind, inner, _ = family(fn)
        if kind is None:
            raise SiteError(name, f"uses MeasureValued, but its distribution is "
                            f"{type(inner).__name__}; MeasureValued serves Bernoulli, "
                            "Categorical, Poisson and Normal sites (possibly with .to_event / "
                            ".expand / .mask)")

    def bound_refusal(self) -> str:
        return ("uses MeasureValued, which a multi-sample bound (sg.IWAE) does not support "
                "(its differences of costs are defined per particle); use VIMCO(), "
                "ScoreFunction() without a baseline, or Pathwise()")

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        return jax.lax.stop_gradient(fn.sample(rng_key))

    def collect(self, msg: dict) -> dict:
        kind, inner, mask = family(msg["fn"])
        shape = jnp.shape(msg["value"])
        out: dict[str, Any] = {"keep": value_keep(msg, mask)}
        if kind == "Bernoulli":
            out["logits"] = jnp.broadcast_to(inner.logits, shape)
        elif kind == "Categorical":
            logp = jax.nn.log_softmax(inner.logits, axis=-1)
            out["logp"] = jnp.broadcast_to(logp, (*shape, logp.shape[-1]))
        elif kind == "Poisson":
            out["rate"] = jnp.broadcast_to(inner.rate, shape)
        else:  # Normal: the parts' noise, from the site's key
            key = msg["kwargs"].get("rng_key")
            if key is None:
                raise SiteError(msg["name"], "uses MeasureValued, which needs the site's random "
                                "key to draw the weak derivative's parts; the value must be "
                                "drawn by the estimator (not substituted or conditioned)")
            out["loc"] = jnp.broadcast_to(inner.loc, shape)
            out["scale"] = jnp.broadcast_to(inner.scale, shape)
            tiny = jnp.finfo(jnp.result_type(float)).tiny
            u = jax.random.uniform(jax.random.fold_in(key, 1), shape, minval=tiny)
            out["rayleigh"] = jnp.sqrt(-2.0 * jnp.log(u))
            normals = jax.random.normal(jax.random.fold_in(key, 2), (3, *shape))
            sign = jax.random.rademacher(jax.random.fold_in(key, 3), shape,
                                         dtype=normals.dtype)
            out["maxwell"] = sign * jnp.sqrt(jnp.sum(normals ** 2, axis=0))
        return out

    def signals_at(self, ctx: ScoreContext, alternatives: jax.Array) -> jax.Array:
        """``f`` at each of ``alternatives`` (``(A, K, *value_shape)``), per coordinate: entry
        ``[a, k, i]`` is the signal of ``i``'s element with coordinate ``i`` of its block set
        to ``alternatives[a, k, i]`` and the others at the drawn value; ``(A, K,
        *value_shape)``. One run per alternative and block coordinate."""
        drawn = jax.lax.stop_gradient(ctx.value)
        f_shape = jax.eval_shape(ctx.to_value_layout, ctx.learning_signal).shape
        block = {a for a in range(1, drawn.ndim) if f_shape[a] == 1 and drawn.shape[a] != 1}
        # plates along which a credited cost depends on all elements: one element at a time
        coupled = ctx.signal_at.coupled
        sizes = ctx.learning_signal.shape[1:]
        indicator = jnp.zeros((1, *(n if c else 1 for n, c in zip(sizes, coupled, strict=True))))
        coupled_shape = jax.eval_shape(ctx.to_value_layout, indicator).shape
        block = sorted(block | {a for a in range(1, drawn.ndim) if coupled_shape[a] > 1})
        sizes = [drawn.shape[a] for a in block]
        d = math.prod(sizes)
        # masks[j]: coordinate j of every block (value layout, size 1 along the other axes)
        grid = jnp.eye(d, dtype=bool).reshape(d, *sizes)
        masks = jnp.ones((d, *(1,) * drawn.ndim), bool)
        masks = masks & jnp.expand_dims(grid, [1 + a for a in range(drawn.ndim)
                                               if a not in block])
        n_alt = alternatives.shape[0]

        def run(i: jax.Array) -> jax.Array:
            a, j = i // d, i % d
            values = jnp.where(masks[j], alternatives[a], drawn)
            return ctx.to_value_layout(ctx.signal_at(values))

        index = jnp.arange(n_alt * d)
        if self.chunk is None:
            out = jax.vmap(run)(index)
        else:
            out = jax.lax.map(run, index, batch_size=self.chunk)
        out = jax.lax.stop_gradient(out).reshape(n_alt, d, *out.shape[1:])
        return jnp.sum(jnp.where(masks[None], out, 0.0), axis=1)

    def surrogate_term(self, ctx: ScoreContext) -> tuple[jax.Array, Any]:
        stop = jax.lax.stop_gradient
        c = ctx.collected
        v = stop(ctx.value)
        keep = c["keep"]
        f0 = stop(jnp.broadcast_to(ctx.to_value_layout(ctx.learning_signal), v.shape))
        if "logits" in c:  # Bernoulli
            f_alt = self.signals_at(ctx, (1 - v)[None])[0]
            delta = jnp.where(v > 0, f0 - f_alt, f_alt - f0)  # f(1) - f(0)
            eta = c["logits"]
            g = jax.nn.sigmoid(stop(eta)) * jax.nn.sigmoid(-stop(eta)) * delta
            main = jnp.sum(eta * stop(jnp.where(keep, g, 0.0)))
        elif "logp" in c:  # Categorical: every class
            logp = c["logp"]
            classes = logp.shape[-1]
            alts = jnp.broadcast_to(jnp.arange(classes, dtype=v.dtype).reshape(
                (classes,) + (1,) * v.ndim), (classes, *v.shape))
            f = jnp.moveaxis(self.signals_at(ctx, alts), 0, -1)  # (K, *value_shape, C)
            theta = jnp.exp(stop(logp))
            g = theta * (f - jnp.sum(theta * f, axis=-1, keepdims=True))
            main = jnp.sum(logp * stop(jnp.where(keep[..., None], g, 0.0)))
        elif "rate" in c:  # Poisson
            g = self.signals_at(ctx, (v + 1)[None])[0] - f0
            main = jnp.sum(c["rate"] * stop(jnp.where(keep, g, 0.0)))
        else:  # Normal
            loc, scale = c["loc"], c["scale"]
            mu, sigma = stop(loc), stop(scale)
            alts = jnp.stack([mu + sigma * c["rayleigh"], mu - sigma * c["rayleigh"],
                              mu + sigma * c["maxwell"]]).astype(v.dtype)
            f = self.signals_at(ctx, alts)
            g_loc = (f[0] - f[1]) / (sigma * math.sqrt(2.0 * math.pi))
            g_scale = (f[2] - f0) / sigma
            main = jnp.sum(loc * stop(jnp.where(keep, g_loc, 0.0))
                           + scale * stop(jnp.where(keep, g_scale, 0.0)))
        return zero_value(main / ctx.num_particles), ctx.state
