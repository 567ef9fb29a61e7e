"""Rao-Blackwellisation measured: per-element and per-step credit lower the variance."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import scgjax as sg
from tests import models
from tests.stats import grad_samples


def naive_mixture_gradient(key, params, x):
    """REINFORCE that multiplies every score by the total cost (written in plain JAX)."""
    logits = params["a"] * x + params["b"]
    z = jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(jnp.float32)

    def surrogate(p):
        lq = models.bern_logp(z, p["a"] * x + p["b"])
        lp = models.bern_logp(z, p["prior_logit"]) + models.normal_logp(
            x, p["mu"][z.astype(jnp.int32)], 1.0)
        f = jnp.sum(lp - lq)
        return f + jnp.sum(lq) * jax.lax.stop_gradient(f)

    return jax.grad(surrogate)(params)


def test_plate_credit_is_100x_lower_variance_than_naive_reinforce():
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=sg.ScoreFunction())
    params = sg.init_params(0, models.mixture_model, guide, x)
    loss = lambda key, p: sg.ELBO().loss(key, p, models.mixture_model, guide, x)
    ours = grad_samples(loss, params, 4000)
    keys = jax.random.split(jax.random.key(1), 4000)
    naive = jax.jit(jax.vmap(lambda k: naive_mixture_gradient(k, params, x)))(keys)
    exact = jax.grad(models.mixture_exact)(params, x)
    for name in ("a", "b"):  # the guide's parameters: the score-function gradient
        var_ours = float(np.var(ours[name]))
        var_naive = float(np.var(naive[name]))
        assert var_naive >= 100 * var_ours, (name, var_naive, var_ours)
        # the naive estimator is unbiased too (sanity check of the comparison itself)
        se = np.sqrt(var_naive / 4000)
        assert abs(float(np.mean(naive[name])) - float(exact[name])) < 5 * se


def test_per_step_credit_is_lower_variance_than_whole_return():
    def variances(per_step):
        fn = functools.partial(models.episode, per_step, sg.ScoreFunction())
        params = sg.init_params(0, fn)
        loss = lambda key, p: sg.Expectation().loss(key, p, fn)
        return np.var(np.asarray(grad_samples(loss, params, 4000)["theta"]), axis=0)

    per_step, whole = variances(True), variances(False)
    # the first action is credited with the whole return either way (same keys, same
    # samples: the same variance); every later action only with its rewards-to-go
    np.testing.assert_allclose(per_step[0], whole[0], rtol=1e-4)
    assert np.all(per_step[1:] < whole[1:]), (per_step, whole)
    assert per_step.sum() < 0.7 * whole.sum(), (per_step.sum(), whole.sum())


def test_rloo_variance_against_plain_reinforce():
    x = models.MIX_X
    variances = {}
    for name, est in (("plain", sg.ScoreFunction()), ("rloo", sg.RLOO())):
        guide = functools.partial(models.mixture_guide, estimator=est)
        params = sg.init_params(0, models.mixture_model, guide, x)
        loss = lambda key, p, guide=guide: sg.ELBO(num_particles=2).loss(
            key, p, models.mixture_model, guide, x)
        variances[name] = grad_samples(loss, params, 4000)
    keys = jax.random.split(jax.random.key(1), 4000)
    naive = jax.jit(jax.vmap(lambda k: naive_mixture_gradient(k, params, x)))(keys)
    for name in ("a", "b"):
        rloo = float(np.var(variances["rloo"][name]))
        # the same per-element credit, without a baseline: RLOO removes most of the variance
        assert float(np.var(variances["plain"][name])) > 3 * rloo
        # plain REINFORCE, every score times the whole ELBO (two particles: variance / 2)
        assert float(np.var(naive[name])) / 2 > 10 * rloo
