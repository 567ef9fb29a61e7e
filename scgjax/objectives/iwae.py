"""The importance-weighted bound, IWAE (Burda, Grosse & Salakhutdinov, ICLR 2016).

``L_K = E[log (1/K) sum_k w_k]``, ``log w_k = log p(x, z_k) - log q(z_k | x)``, with ``z_1..z_K``
drawn independently from the guide. ``L_1`` is the ELBO, ``L_K <= L_{K+1} <= log p(x)``.
Score-estimated guide sites use the score function for the bound, optionally with VIMCO's
leave-one-out baselines (Mnih & Rezende, ICML 2016; :class:`scgjax.estimators.vimco.VIMCO`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scgjax.errors import SiteError
from scgjax.estimators.base import magic_box
from scgjax.estimators.pathwise import Pathwise
from scgjax.estimators.score_function import ScoreFunction
from scgjax.estimators.vimco import VIMCO, vimco_baselines
from scgjax.layout import reduce_to
from scgjax.objectives import program
from scgjax.objectives.base import Evaluation, Objective
from scgjax.objectives.bounds import (
    bound_layout,
    check_doubly_reparameterised,
    doubly_reparameterised_term,
    importance_log_weights,
)
from scgjax.scg import SCG


def _check_estimators(scg: SCG, alpha: float) -> None:
    for name, node in scg.nodes.items():
        est = node.estimator
        kind = type(est).__name__
        if est.enumerates:
            raise SiteError(name, f"uses {kind}; IWAE does not support enumerated sites (the "
                            "bound's log-weights are per particle): use VIMCO() or Pathwise()")
        if est.bound_signal == "doubly_reparameterised":
            if alpha != 0.0:
                raise SiteError(name, f"uses DReG, which is derived for the IWAE bound (alpha = "
                                f"0), not the Rényi bound with alpha = {alpha}: use Pathwise()")
            check_doubly_reparameterised(scg, name)
            continue
        if est.stops_own_density:
            raise SiteError(name, est.bound_refusal())
        if est.reparameterised and not est.uses_signal:
            continue  # pathwise (or a relaxation): the gradient flows through the value
        if est.bound_signal not in ("plain", "leave_one_out"):
            raise SiteError(name, est.bound_refusal())


class IWAE(Objective):
    """The importance-weighted bound ``L_K = E[log (1/K) sum_k w_k]`` (Burda et al. 2016).

    ``log w_k = log p(x, z_k) - log q(z_k | x)`` for ``K`` independent guide particles
    (``vmap``), computed with ``logsumexp``. When every stochastic node, and every cost that
    depends on one, lies in a common set of plates (e.g. the data plate of a VAE), the bound
    is computed per element of those plates (:func:`bound_plates`), i.e. it is the sum over
    data points of per-point ``K``-sample bounds:

        L_hat = sum_n [log (1/K) sum_k exp(lw_{k,n})] + mean_k sum C_k,

    with ``lw_{k,n}`` the costs that depend on a stochastic node, summed onto element ``n``
    (the nodes' own extra plates summed out), and ``C`` the costs that depend on none (a prior
    on a global parameter written as a factor, observed sites without latents), which are the
    same in every particle. ``loss(...)`` is ``-L_hat``. For plates sub-sampled to ``B`` of
    ``N`` elements, each element's bound is computed on its unscaled log-weights and scaled by
    ``N / B`` (an unbiased estimate of the full-data bound); other ``scale`` handlers multiply
    the log-weights.

    Gradient: ``grad L_hat + sum_{w score} sum_{k,n} (L_hat_n - b_{k,n}) grad log q(w_{k,n})``.
    The first part is pathwise: through the values of reparameterised sites and through every
    density's parameters (for score sites, ``-log q(z_k)``'s parameters: the ``-E[w_hat_k
    grad log q]`` term); differentiating ``logsumexp`` supplies the normalised weights
    ``w_hat_k``. The second is the score function for the bound, per plate element: ``b = 0``
    for ``ScoreFunction()`` (and ``RLOO()``, the default of discrete sites when ``K >= 2``,
    whose per-particle leave-one-out is meaningless here since the signal ``L_hat`` is shared by
    all particles); VIMCO's leave-one-out baselines for ``VIMCO()`` sites (Mnih & Rezende
    2016). Both are unbiased for ``grad L_K`` (first order; the score terms are
    ``(box(log q) - 1) * stop_grad(L_hat - b)``, value 0). Other per-particle estimators
    (baselines, DisARM, DCV, enumeration) raise a :class:`~scgjax.errors.SiteError`.

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def model():
        ...     z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...     sg.sample("x", dist.Normal(z, 1.0), obs=1.0)
        >>> guide = lambda: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
        >>> params = sg.init_params(0, model, guide)
        >>> loss = IWAE(num_particles=16).loss(jax.random.key(0), params, model, guide)
        >>> bool(jnp.isfinite(loss))
        True
    """

    kind = program.GUIDED
    multi_sample_bound = True
    #: the Rényi bound's alpha (``sg.RenyiELBO``); 0 for IWAE
    alpha: float = 0.0

    def default_estimator(self, fn: Any, num_particles: int) -> Any:
        """Pathwise where possible; otherwise VIMCO (``K >= 2``) or the plain score function."""
        if fn.has_rsample:
            return Pathwise()
        return VIMCO() if num_particles >= 2 else ScoreFunction()

    def assemble(self, evaluation: Evaluation, params: dict, state: dict
                 ) -> tuple[jax.Array, tuple[dict, dict]]:
        """``(-L_hat, (state, metrics))``: the bound with its score terms (see the class)."""
        scg = evaluation.structure.scg
        _check_estimators(scg, self.alpha)
        log_w, per_element, bound, ratio = importance_log_weights(evaluation, self.alpha)
        keep, _ = bound_layout(scg)

        surrogate = bound
        for name, node in scg.nodes.items():
            if node.estimator.bound_signal == "doubly_reparameterised":
                squared = jax.nn.softmax(log_w, axis=0) ** 2  # sum_k w^_k^2 dlog w_k/dz_k dz_k
                surrogate = surrogate + doubly_reparameterised_term(evaluation, name, squared)
        signals: dict[str, jax.Array] = {}
        for name, logq in evaluation.logq.items():
            est = scg.nodes[name].estimator
            if est.bound_signal == "leave_one_out":  # on the weights w^(1 - alpha)
                a = self.alpha
                baseline = (vimco_baselines(log_w) if a == 0.0
                            else vimco_baselines((1.0 - a) * log_w) / (1.0 - a))
            else:
                baseline = jnp.zeros_like(log_w)
            signal = jax.lax.stop_gradient(ratio * (per_element[None] - baseline))
            lq = reduce_to(logq, keep)
            surrogate = surrogate + ((magic_box(lq) - 1.0) * signal).sum()
            signals[name] = signal
        metrics: dict[str, Any] = {"objective": jax.lax.stop_gradient(bound)}
        if self.record_signals:
            metrics["learning_signals"] = signals
        return -surrogate, (dict(state), metrics)

    def loss(self, rng_key: Any, params: dict, model: Callable, guide: Callable, *args: Any,
             **kwargs: Any) -> jax.Array:
        """``-L_K`` estimate; ``jax.grad`` of it estimates ``-grad L_K``."""
        return super().loss(rng_key, params, model, guide, *args, **kwargs)


class RenyiELBO(IWAE):
    """The Rényi bound (variational Rényi, Li & Turner, NeurIPS 2016), NumPyro's name and
    signature, per plate element like ``sg.IWAE``:

        L_alpha = E[ 1/(1 - alpha) log (1/K) sum_k w_k^(1 - alpha) ],
        log w_k = log p(x, z_k) - log q(z_k | x),

    ``alpha = 0`` is IWAE's bound; ``alpha -> 1`` tends to the ELBO (``alpha = 1`` itself is an
    error: use ``sg.ELBO``); for ``0 < alpha < 1`` it lies between them. The loss is
    ``-L_hat_alpha``: reparameterised sites differentiate through it, score-estimated sites get
    ``(L_hat_alpha - b_k) grad log q(z_k)`` with ``b = 0`` (``ScoreFunction()``) or VIMCO's
    leave-one-out baselines computed on the weights ``w^(1 - alpha)`` (``VIMCO()``, the default
    of discrete sites), which do not depend on ``z_k``: unbiased for the gradient of
    ``L_alpha`` (first order). Sub-sampled plates scale each element's bound by ``N / B``.

    Example:
        >>> import jax, scgjax as sg
        >>> from scgjax import dist
        >>> def model():
        ...     z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...     sg.sample("x", dist.Normal(z, 1.0), obs=1.0)
        >>> guide = lambda: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
        >>> params = sg.init_params(0, model, guide)
        >>> key = jax.random.key(0)
        >>> iwae = sg.IWAE(num_particles=8).loss(key, params, model, guide)
        >>> bool(abs(RenyiELBO(0.0, 8).loss(key, params, model, guide) - iwae) < 1e-6)
        True
    """

    def __init__(self, alpha: float = 0.0, num_particles: int = 2,
                 particle_chunk: int | None = None):
        super().__init__(num_particles, particle_chunk)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating,
                                                              np.integer)):
            raise TypeError(f"RenyiELBO alpha must be a real number, got {alpha!r}")
        if float(alpha) == 1.0:
            raise ValueError("RenyiELBO(alpha=1) is the ELBO, where the bound's formula divides "
                             "by zero: use sg.ELBO(num_particles=K)")
        self.alpha = float(alpha)

    def __repr__(self) -> str:
        chunk = "" if self.particle_chunk is None else f", particle_chunk={self.particle_chunk}"
        return f"RenyiELBO(alpha={self.alpha}, num_particles={self.num_particles}{chunk})"
