"""Unbiasedness of the surrogate's gradient against exact gradients by enumeration."""

from __future__ import annotations

import functools

import jax
import pytest

import scgjax as sg
from tests import models
from tests.stats import assert_unbiased, grad_samples


def elbo_samples(objective, params, model, guide, *args, num_samples=4000, seed=0):
    loss = lambda key, p: objective.loss(key, p, model, guide, *args)
    return grad_samples(loss, params, num_samples, seed)


@pytest.mark.parametrize(
    "estimator, k",
    [(None, 1), (sg.ScoreFunction(), 1), (sg.RLOO(), 2), (sg.RLOO(), 3), (sg.RLOO(), 5)],
    ids=["default", "score", "rloo2", "rloo3", "rloo5"],
)
def test_plate_mixture(estimator, k):
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=estimator)
    params = sg.init_params(0, models.mixture_model, guide, x)
    exact = jax.grad(models.mixture_exact)(params, x)
    samples = elbo_samples(sg.ELBO(num_particles=k), params, models.mixture_model, guide, x)
    assert_unbiased(samples, exact)


@pytest.mark.parametrize("estimator, k", [(None, 1), (sg.RLOO(), 2), (sg.RLOO(), 5)],
                         ids=["default", "rloo2", "rloo5"])
def test_sigmoid_belief_network(estimator, k):
    params = models.sbn_init()
    x = models.SBN_X
    exact = jax.grad(models.sbn_exact)(params, x)
    guide = functools.partial(models.sbn_guide, estimator=estimator)
    samples = elbo_samples(sg.ELBO(num_particles=k), params, models.sbn_model, guide, x,
                           num_samples=6000 // k)
    assert_unbiased(samples, exact)


def test_sigmoid_belief_network_value_is_the_elbo_estimate():
    params = models.sbn_init()
    x = models.SBN_X
    keys = jax.random.split(jax.random.key(1), 4000)
    values = jax.jit(jax.vmap(lambda k: -sg.ELBO().loss(k, params, models.sbn_model,
                                                        models.sbn_guide, x)))(keys)
    assert_unbiased({"elbo": values}, {"elbo": models.sbn_exact(params, x)}, min_power=0.0)


def test_global_discrete_with_local_reparameterised():
    x = models.GL_X
    params = sg.init_params(0, models.global_local_model, models.global_local_guide, x)
    exact = jax.grad(models.global_local_exact)(params, x)
    samples = elbo_samples(sg.ELBO(), params, models.global_local_model,
                           models.global_local_guide, x)
    assert_unbiased(samples, exact)


@pytest.mark.parametrize("per_step", [True, False], ids=["per-step", "whole-return"])
def test_sequential_program(per_step):
    fn = functools.partial(models.episode, per_step, sg.ScoreFunction())
    params = sg.init_params(0, fn)
    exact = jax.grad(models.episode_exact)(params)
    loss = lambda key, p: sg.Expectation().loss(key, p, fn)
    assert_unbiased(grad_samples(loss, params, 6000), exact)
