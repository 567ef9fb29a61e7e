"""Reweighted wake-sleep (Bornschein & Bengio 2015; Le, Kosiorek, Siddharth, Teh & Wood 2019)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.estimators.base import zero_value
from scgjax.estimators.detached import Detached
from scgjax.objectives import program
from scgjax.objectives.base import Evaluation, Objective
from scgjax.objectives.iwae import bound_layout, importance_log_weights
from scgjax.objectives.surrogate import reduce_to


class RWS(Objective):
    """Reweighted wake-sleep: the wake-θ and wake-φ updates, with ``K`` guide particles.

    With ``z_k ~ q_φ(z | x)`` (no gradient through the sampling), log-weights
    ``log w_k = log p_θ(x, z_k) − log q_φ(z_k | x)`` and self-normalised weights
    ``ŵ_k = w_k / Σ_j w_j`` (per plate element, as for ``sg.IWAE``):

        wake-θ:  Σ_k ŵ_k ∇_θ log p_θ(x, z_k)    (the IWAE gradient for the model),
        wake-φ:  Σ_k ŵ_k ∇_φ log q_φ(z_k | x)   (a self-normalised estimate of the gradient
                                                 of −KL(p_θ(z | x) ‖ q_φ)),

    both ascended by following minus the loss's gradient. The surrogate is
    ``Σ_k stop(ŵ_k) (log p_θ(x, z_k) + log q_φ(z_k | x))``, whose ``θ``-gradient is wake-θ and
    whose ``φ``-gradient is wake-φ as long as the model does not use the guide's parameters
    and vice versa (shared parameters would receive both). Its *value* is the ``K``-sample
    bound ``log (1/K) Σ_k w_k`` (so loss curves read like IWAE's). No score-function term is
    involved: discrete latents need nothing special; every guide site is ``Detached``, and a
    site that asks for another estimator is an error naming it. The sleep-φ phase (fitting
    ``q`` on samples from the model) is not included.

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def model(x):
        ...     z = sg.sample("z", dist.Bernoulli(logits=0.0))
        ...     sg.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)
        >>> def guide(x):
        ...     sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0)))
        >>> params = sg.init_params(0, model, guide, 1.5)
        >>> g = jax.grad(RWS(num_particles=100).loss, argnums=1)(
        ...     jax.random.key(0), params, model, guide, 1.5)
        >>> bool(g["l"] < 0)  # the posterior prefers z = 1: the logit goes up
        True
    """

    kind = program.GUIDED

    def default_estimator(self, fn: Any, num_particles: int) -> Any:
        """Every guide site is sampled without a gradient path."""
        return Detached()

    def assemble(self, evaluation: Evaluation, params: dict, state: dict
                 ) -> tuple[jax.Array, tuple[dict, dict]]:
        """``(-bound + zero-valued wake terms, (state, metrics))``."""
        scg = evaluation.structure.scg
        for name, node in scg.nodes.items():
            if not isinstance(node.estimator, Detached):
                raise SiteError(
                    name, f"uses {type(node.estimator).__name__}, but RWS does not "
                    "differentiate through samples (its gradients are importance-weighted); "
                    "remove estimator= from the guide site",
                )
        log_w, per_element, bound, ratio = importance_log_weights(evaluation)
        weights = jax.lax.stop_gradient(jax.nn.softmax(log_w, axis=0))
        model_part, guide_part = _role_sums(evaluation, log_w.shape)
        wake = ratio * jnp.sum(weights * (model_part - guide_part))
        surrogate = jax.lax.stop_gradient(bound) + zero_value(wake)
        return -surrogate, (dict(state), {"objective": jax.lax.stop_gradient(bound)})

    def loss(self, rng_key, params, model, guide, *args, **kwargs):
        """Minus the ``K``-sample bound in value; its gradient is minus wake-θ and wake-φ."""
        return super().loss(rng_key, params, model, guide, *args, **kwargs)


def _role_sums(evaluation: Evaluation, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The model's and the guide's costs that depend on a latent, per particle and element of
    the bound's plates, divided by the sub-sampling ratio like the log-weights."""
    keep, ratio = bound_layout(evaluation.structure.scg)
    scg = evaluation.structure.scg
    model = jnp.zeros(shape)
    guide = jnp.zeros(shape)
    for cid, cost in evaluation.costs.items():
        if not scg.upstream(cid):
            continue
        part = reduce_to(cost, keep) / ratio
        if scg.costs[cid].role == "guide":
            guide = guide + part
        else:
            model = model + part
    return model, guide
