"""Measure-valued derivatives: unbiased against exact gradients (enumeration, closed forms)
for Bernoulli (a logit exactly 0, an event block, a cost outside the plate, K = 1 and 3, the
ELBO with the site's own cost), Categorical (5 classes, a plate), Poisson and Normal sites,
and the errors."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from tests import models
from tests.stats import assert_unbiased, grad_samples

NUM_SAMPLES = 2000


def _check(objective, program_args, params, exact, num_samples=NUM_SAMPLES):
    loss = lambda k, p: objective.loss(k, p, *program_args)  # noqa: E731
    assert_unbiased(grad_samples(loss, params, num_samples), exact)


# --- Bernoulli: an event block of three, a nonlinear cost, a logit exactly 0 ----------------

W = jnp.array([1.0, -2.0, 0.5])


def bernoulli_block():
    eta = sg.param("eta", jnp.array([0.0, 1.0, -1.5]))
    z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=sg.MeasureValued())
    sg.factor("f", jnp.sin(z @ W) + 2.0 * z[0] * z[1])


def bernoulli_block_exact(p):
    z = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=3)))
    log_q = models.bern_logp(z, p["eta"]).sum(-1)
    return jnp.sum(jnp.exp(log_q) * (jnp.sin(z @ W) + 2.0 * z[:, 0] * z[:, 1]))


@pytest.mark.parametrize("k", [1, 3])
def test_bernoulli_event_block_unbiased(k):
    params = sg.init_params(0, bernoulli_block)
    _check(sg.Expectation(num_particles=k), (bernoulli_block,), params,
           jax.grad(bernoulli_block_exact)(params))


def test_bernoulli_elbo_in_plate_with_its_own_cost():
    """The plated 2-bit block of tests/models.py: the site's own cost -log q(z) is among the
    costs at the flipped values."""
    guide = functools.partial(models.block_guide, estimator=sg.MeasureValued())
    x = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-1.0, 0.8, 0.1]])
    y = jnp.array([[1.0, -0.5, 0.3], [-1.2, 0.4, 2.0], [0.2, 0.1, -0.3]])
    params = sg.init_params(0, models.block_model, guide, x, y)
    _check(sg.ELBO(num_particles=2), (models.block_model, guide, x, y), params,
           jax.grad(models.block_exact)(params, x, y))


# --- Categorical: 5 classes in a plate, a Normal below it (so the estimate is random) --------

LOGITS = jnp.array([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, -0.5, 0.2, 0.0, -2.0]])
CENTRES = jnp.array([-2.0, -1.0, 0.0, 1.5, 3.0])


def categorical_program():
    logits = sg.param("logits", LOGITS)
    with sg.plate("n", 2):
        c = sg.sample("c", dist.Categorical(logits=logits), estimator=sg.MeasureValued())
        x = sg.sample("x", dist.Normal(CENTRES[c], 1.0))
        sg.factor("f", jnp.sin(x) + 0.3 * c)


def categorical_exact(p):
    probs = jax.nn.softmax(p["logits"], axis=-1)  # (2, 5)
    expected = jnp.sin(CENTRES) * jnp.exp(-0.5) + 0.3 * jnp.arange(5.0)  # E f given c
    return jnp.sum(probs * expected)


def test_categorical_five_classes_unbiased():
    params = sg.init_params(0, categorical_program)
    _check(sg.Expectation(), (categorical_program,), params,
           jax.grad(categorical_exact)(params))


# --- Poisson and Normal ----------------------------------------------------------------------


def poisson_program():
    rate = sg.param("rate", jnp.array([0.7, 2.5]), constraint=dist.constraints.positive)
    with sg.plate("n", 2):
        n = sg.sample("count", dist.Poisson(rate), estimator=sg.MeasureValued())
        sg.factor("f", jnp.sin(n) + 0.1 * (n - 2.0) ** 2)


def poisson_exact(p):
    rate = jnp.exp(p["rate"])  # the unconstrained param is log rate
    n = jnp.arange(60.0)
    log_pmf = n[:, None] * jnp.log(rate) - rate - jax.scipy.special.gammaln(n + 1)[:, None]
    return jnp.sum(jnp.exp(log_pmf) * (jnp.sin(n) + 0.1 * (n - 2.0) ** 2)[:, None])


def test_poisson_unbiased():
    params = sg.init_params(0, poisson_program)
    _check(sg.Expectation(), (poisson_program,), params, jax.grad(poisson_exact)(params))


def normal_program():
    mu = sg.param("mu", jnp.array([0.3, -1.0]))
    sigma = sg.param("sigma", jnp.array([0.8, 1.5]), constraint=dist.constraints.positive)
    x = sg.sample("x", dist.Normal(mu, sigma).to_event(1), estimator=sg.MeasureValued())
    sg.factor("f", jnp.sin(x[0]) * jnp.cos(x[1]) + x[0] ** 2)


def normal_exact(p):
    mu, sigma = p["mu"], jnp.exp(p["sigma"])
    damp = jnp.exp(-0.5 * sigma ** 2)
    return (jnp.sin(mu[0]) * damp[0] * jnp.cos(mu[1]) * damp[1]
            + mu[0] ** 2 + sigma[0] ** 2)


def test_normal_unbiased_both_parameters():
    params = sg.init_params(0, normal_program)
    _check(sg.Expectation(num_particles=2), (normal_program,), params,
           jax.grad(normal_exact)(params))


def test_categorical_is_exact_without_other_randomness():
    """With no other random choice the Categorical's measure-valued derivative sums over
    every class: the exact gradient, whatever the key."""

    def program():
        logits = sg.param("logits", LOGITS)
        with sg.plate("n", 2):
            c = sg.sample("c", dist.Categorical(logits=logits), estimator=sg.MeasureValued())
            sg.factor("f", jnp.sin(CENTRES[c]) + 0.3 * c)

    params = sg.init_params(0, program)
    exact = jax.grad(lambda p: jnp.sum(jax.nn.softmax(p["logits"], -1)
                                       * (jnp.sin(CENTRES) + 0.3 * jnp.arange(5.0))))(params)
    for seed in range(3):
        g = jax.grad(sg.Expectation().loss, argnums=1)(jax.random.key(seed), params, program)
        np.testing.assert_allclose(-g["logits"], exact["logits"], atol=1e-5)


def test_chunked_runs_give_the_same_gradient():
    def program(estimator):
        eta = sg.param("eta", jnp.array([0.0, 1.0, -1.5]))
        z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=estimator)
        sg.factor("f", jnp.sin(z @ W) + 2.0 * z[0] * z[1])

    params = sg.init_params(0, bernoulli_block)
    grads = [jax.grad(sg.Expectation(num_particles=2).loss, argnums=1)(
        jax.random.key(3), params, functools.partial(program, est))["eta"]
        for est in (sg.MeasureValued(), sg.MeasureValued(chunk=2))]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)


# --- errors ----------------------------------------------------------------------------------


def _grad(objective, *program_args):
    params = sg.init_params(0, *program_args)
    return jax.grad(objective.loss, argnums=1)(jax.random.key(0), params, *program_args)


def plate_with_a_cost_outside():
    """A cost outside the plate (it depends on every element at once): each element's value is
    changed in a run of its own."""
    eta = sg.param("eta", jnp.array([0.0, 1.0, -1.5]))
    with sg.plate("n", 3):
        z = sg.sample("z", dist.Bernoulli(logits=eta), estimator=sg.MeasureValued())
        sg.factor("own", 0.5 * z * jnp.arange(3.0))
    sg.factor("f", jnp.sin(z @ W) + 2.0 * z[0] * z[1])


def plate_with_a_cost_outside_exact(p):
    z = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=3)))
    log_q = models.bern_logp(z, p["eta"]).sum(-1)
    f = jnp.sin(z @ W) + 2.0 * z[:, 0] * z[:, 1] + 0.5 * z @ jnp.arange(3.0)
    return jnp.sum(jnp.exp(log_q) * f)


def test_cost_outside_the_plate_unbiased():
    params = sg.init_params(0, plate_with_a_cost_outside)
    _check(sg.Expectation(num_particles=2), (plate_with_a_cost_outside,), params,
           jax.grad(plate_with_a_cost_outside_exact)(params))


def test_refuses_a_site_in_a_scan_loop():
    def program():
        eta = sg.param("eta", 0.0)

        def step(carry, _):
            z = sg.sample("z", dist.Bernoulli(logits=eta), estimator=sg.MeasureValued())
            sg.factor("f", (z - carry) ** 2)
            return z, None

        sg.scan(step, jnp.int32(0), length=3)

    with pytest.raises(sg.SiteError, match="'z'.*sg.scan"):
        _grad(sg.Expectation(), program)


def test_refuses_other_distributions_and_iwae():
    def gamma():
        sg.sample("g", dist.Gamma(sg.param("a", 2.0, constraint=dist.constraints.positive),
                                  1.0), estimator=sg.MeasureValued())

    with pytest.raises(sg.SiteError, match="'g'.*Gamma"):
        _grad(sg.Expectation(), gamma)

    def model():
        z = sg.sample("z", dist.Bernoulli(logits=0.0))
        sg.sample("x", dist.Normal(z, 1.0), obs=0.5)

    def guide():
        sg.sample("z", dist.Bernoulli(logits=sg.param("e", 0.0)), estimator=sg.MeasureValued())

    with pytest.raises(sg.SiteError, match="'z'.*MeasureValued"):
        _grad(sg.IWAE(num_particles=2), model, guide)


def test_explain_nonfinite_reruns_the_program_too():
    """``sg.diagnostics.explain_nonfinite`` takes the estimators' terms site by site: the
    measure-valued term needs ``signal_at`` there as well."""

    def program():
        eta = sg.param("eta", jnp.zeros(3))
        with sg.plate("n", 3):
            z = sg.sample("z", dist.Bernoulli(logits=eta), estimator=sg.MeasureValued())
            sg.factor("f", -(z - 0.45) ** 2)

    found = sg.diagnostics.explain_nonfinite(sg.Expectation(), sg.init_params(0, program), 0,
                                             program)
    assert "every quantity is finite" in str(found)
