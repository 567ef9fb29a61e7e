"""Reweighted wake-sleep (Bornschein & Bengio 2015; Le, Kosiorek, Siddharth, Teh & Wood 2019)
and wake-sleep (Hinton, Dayan, Frey & Neal 1995)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scgjax import handlers
from scgjax.errors import SiteError
from scgjax.estimators.base import zero_value
from scgjax.estimators.detached import Detached
from scgjax.objectives import program
from scgjax.objectives.base import Evaluation, Objective
from scgjax.objectives.bounds import (
    check_doubly_reparameterised,
    doubly_reparameterised_term,
    importance_log_weights,
    role_sums,
)
from scgjax.objectives.sleep import SleepArgs, sleep_guide_log_density


class RWS(Objective):
    """Reweighted wake-sleep: wake-θ and wake-φ with ``K`` guide particles, and optionally
    sleep-φ (Bornschein & Bengio, ICLR 2015; Le, Kosiorek, Siddharth, Teh & Wood, UAI 2019).

    With ``z_k ~ q_φ(z | x)`` (no gradient through the sampling), log-weights
    ``log w_k = log p_θ(x, z_k) − log q_φ(z_k | x)`` and self-normalised weights
    ``ŵ_k = w_k / Σ_j w_j`` (per plate element, as for ``sg.IWAE``):

        wake-θ:  Σ_k ŵ_k ∇_θ log p_θ(x, z_k)    (the IWAE gradient for the model),
        wake-φ:  Σ_k ŵ_k ∇_φ log q_φ(z_k | x)   (a self-normalised estimate of the gradient
                                                 of −KL(p_θ(z | x) ‖ q_φ)),
        sleep-φ: ∇_φ log q_φ(z' | x')  at a dream (z', x') ~ p_θ  (an unbiased estimate of
                                                 the gradient of −E_{p_θ(x)} KL(p_θ(z|x) ‖ q_φ)),

    all ascended by following minus the loss's gradient; the guide follows
    ``(1 − sleep_phi) · wake-φ + sleep_phi · sleep-φ`` (Le et al.'s "wake-wake" at 0, "wake-sleep"
    at 1, their mixture in between). The surrogate is
    ``Σ_k stop(ŵ_k) (log p_θ(x, z_k) + (1 − sleep_phi) log q_φ(z_k | x)) + sleep_phi ·
    log q_φ(z' | x')``, whose ``θ``-gradient is wake-θ and whose ``φ``-gradient is the guide's
    update because the model and the guide have disjoint parameters (a param or module that
    both use is an error naming it: it would receive the sum of two different updates; see
    :func:`scgjax.param_labels` to give them different optax optimisers). Its *value* is the
    ``K``-sample bound ``log (1/K) Σ_k w_k`` (loss curves read like IWAE's).

    No score-function term is involved: discrete latents need nothing special; every guide
    site is ``Detached``, and a site that asks for another estimator is an error naming it,
    except ``sg.DReG()`` on a reparameterised site, whose wake-φ term then goes through its
    value, ``Σ_k (ŵ_k − ŵ_k²) ∂log w_k/∂z_k ∂z_k/∂φ`` (the same mean, lower variance; Tucker,
    Lawson, Gu & Maddison 2019).

    The dream runs the model on the same arguments with its observed sites sampled (no
    gradient through it); the guide then needs the dreamt data as its arguments. By default
    the model's one observed site replaces the first argument (``obs=x`` for data ``x``);
    otherwise pass ``sleep_args(observations, *args) -> guide_args``, with ``observations``
    the dreamt value of each observed site. A model with factors cannot be dreamt.

    Args:
        num_particles: ``K``, the guide particles of the wake phases.
        sleep_phi: the weight of sleep-φ in the guide's update, in ``[0, 1]``.
        sleep_args: the guide's arguments for a dream (see above).
        particle_chunk: run the particles in blocks of this size (see ``sg.ELBO``).

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
    multi_sample_bound = True

    def __init__(self, num_particles: int = 1, sleep_phi: float = 0.0,
                 sleep_args: SleepArgs | None = None, particle_chunk: int | None = None):
        super().__init__(num_particles, particle_chunk)
        if not 0.0 <= sleep_phi <= 1.0:
            raise ValueError(f"sleep_phi must be in [0, 1], got {sleep_phi!r}")
        if sleep_args is not None and not callable(sleep_args):
            raise TypeError(f"sleep_args must be callable, got {type(sleep_args).__name__}")
        self.sleep_phi = float(sleep_phi)
        self.sleep_args = sleep_args

    def __repr__(self) -> str:
        chunk = "" if self.particle_chunk is None else f", particle_chunk={self.particle_chunk}"
        return f"{type(self).__name__}(num_particles={self.num_particles}, " \
               f"sleep_phi={self.sleep_phi}{chunk})"

    def default_estimator(self, fn: Any, num_particles: int) -> Any:
        """Every guide site is sampled without a gradient path."""
        return Detached()

    def loss_with_state(self, rng_key: Any, params: dict, state: dict | None, *fns_and_args,
                        **kwargs) -> tuple[jax.Array, tuple[dict, dict]]:
        """``(loss, (state, metrics))``: the wake phases on the guide's particles, plus the
        sleep phase on a dream when ``sleep_phi > 0`` (metric ``sleep_log_q``)."""
        evaluation = self.evaluate(rng_key, params, *fns_and_args, **kwargs)
        loss, (new_state, metrics) = self.assemble(evaluation, params, state or {})
        if self.sleep_phi > 0.0:
            model, guide = self._programs(fns_and_args[:2])
            key = jax.random.fold_in(handlers.as_prng_key(rng_key), 0x51EE9)
            log_q = sleep_guide_log_density(model, guide, key, params, fns_and_args[2:], kwargs,
                                            self.sleep_args, type(self).__name__)
            loss = loss - self.sleep_phi * zero_value(log_q)
            metrics = {**metrics, "sleep_log_q": jax.lax.stop_gradient(log_q)}
        return loss, (new_state, metrics)

    def assemble(self, evaluation: Evaluation, params: dict, state: dict
                 ) -> tuple[jax.Array, tuple[dict, dict]]:
        """``(-bound + zero-valued wake terms, (state, metrics))``."""
        structure = evaluation.structure
        name = type(self).__name__
        dreg = [site for site, node in structure.scg.nodes.items()
                if node.estimator.bound_signal == "doubly_reparameterised"]
        for site in dreg:
            check_doubly_reparameterised(structure.scg, site)
        for site, node in structure.scg.nodes.items():
            if not node.estimator.importance_weighted and site not in dreg:
                raise SiteError(
                    site, f"uses {type(node.estimator).__name__}, but {name} does not "
                    "differentiate through samples (its gradients are importance-weighted); "
                    "remove estimator= from the guide site",
                )
        if structure.shared_params:
            raise SiteError(
                structure.shared_params[0], f"is a param of both the model and the guide; "
                f"{name} updates the model by wake-θ and the guide by another objective, so a "
                "shared param would follow the sum of two unrelated gradients: give each "
                "program its own params",
            )
        log_w, per_element, bound, ratio = importance_log_weights(evaluation)
        weights = jax.lax.stop_gradient(jax.nn.softmax(log_w, axis=0))
        model_part, guide_part = role_sums(evaluation, log_w.shape)
        wake_phi = 1.0 - self.sleep_phi
        wake = ratio * jnp.sum(weights * (model_part - wake_phi * guide_part))
        for site in dreg:  # wake-phi through the value: sum_k (w^_k - w^_k^2) dlog w_k/dz_k dz_k
            wake = wake + doubly_reparameterised_term(evaluation, site,
                                                      wake_phi * (weights - weights**2))
        surrogate = jax.lax.stop_gradient(bound) + zero_value(wake)
        return -surrogate, (dict(state), {"objective": jax.lax.stop_gradient(bound)})

    def loss(self, rng_key: Any, params: dict, model: Callable, guide: Callable, *args: Any,
             **kwargs: Any) -> jax.Array:
        """Minus the ``K``-sample bound in value; its gradient is minus the updates above."""
        return super().loss(rng_key, params, model, guide, *args, **kwargs)


class WakeSleep(RWS):
    """Wake-sleep (Hinton, Dayan, Frey & Neal, Science 1995): wake-θ on one guide sample,
    sleep-φ on one dream.

        wake-θ:  ∇_θ log p_θ(x, z),      z ~ q_φ(z | x)  (no gradient through the sample),
        sleep-φ: ∇_φ log q_φ(z' | x'),   (z', x') ~ p_θ  (the model run with its data sampled).

    ``RWS(num_particles=1, sleep_phi=1)``: the same conventions for the dream (``sleep_args``)
    and the same check that the model and the guide share no param. The loss's value is minus
    the one-sample ELBO estimate ``log p_θ(x, z) − log q_φ(z | x)``; the model's update
    ascends a lower bound of ``log p_θ(x)`` but the guide's does not descend the ELBO's KL:
    sleep-φ fits ``q`` to the model's own posterior averaged over dreams, so the pair is not
    the gradient of one objective (Bornschein & Bengio 2015).

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def model(x):
        ...     with sg.plate("data", x.shape[0]):
        ...         z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...         sg.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     with sg.plate("data", x.shape[0]):
        ...         sg.sample("z", dist.Normal(sg.param("c", 0.0) * x, 0.7))
        >>> x = jnp.zeros(3)
        >>> params = sg.init_params(0, model, guide, x)
        >>> g = jax.grad(WakeSleep().loss, argnums=1)(jax.random.key(0), params, model, guide, x)
        >>> sorted(g)
        ['c']
    """

    def __init__(self, sleep_args: SleepArgs | None = None):
        super().__init__(num_particles=1, sleep_phi=1.0, sleep_args=sleep_args)

    def __repr__(self) -> str:
        return "WakeSleep()"
