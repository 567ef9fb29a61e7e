"""Bernoulli and categorical sites with logits exactly 0 (numpyro's gradient trap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as nd
import pytest

import scgjax as sg
from scgjax import dist
from tests.stats import assert_unbiased, grad_samples


@pytest.mark.parametrize("make", [dist.Bernoulli, nd.Bernoulli], ids=["scgjax", "numpyro"])
def test_bernoulli_score_at_zero_logits(make):
    f = {0: 0.09, 1: 0.49}

    def program():
        z = sg.sample("z", make(logits=sg.param("l", jnp.zeros(3))).to_event(1))
        sg.factor("f", jnp.sum(jnp.where(z > 0, f[1], f[0])))

    params = sg.init_params(0, program)
    exact = {"l": jnp.full(3, 0.25 * (f[1] - f[0]))}  # sigmoid'(0) (f(1) - f(0))
    loss = lambda key, p: sg.Expectation().loss(key, p, program)
    assert_unbiased(grad_samples(loss, params, 20000), exact)


def test_bernoulli_log_prob_gradient_at_zero():
    def score(value):
        def log_q(logit):
            tr = sg.handlers.trace(sg.handlers.substitute(
                lambda: sg.sample("z", nd.Bernoulli(logits=logit)), {"z": value})).get_trace()
            return tr["z"]["fn"].log_prob(tr["z"]["value"])

        return float(jax.grad(log_q)(0.0))

    assert score(1.0) == 0.5 and score(0.0) == -0.5


def test_categorical_score_at_zero_logits():
    c = jnp.array([1.0, -2.0, 0.5])

    def program():
        z = sg.sample("z", dist.Categorical(logits=sg.param("l", jnp.zeros(3))))
        sg.factor("f", c[z])

    params = sg.init_params(0, program)
    p = jnp.full(3, 1 / 3)
    exact = {"l": p * (c - jnp.sum(p * c))}
    loss = lambda key, q: sg.Expectation().loss(key, q, program)
    assert_unbiased(grad_samples(loss, params, 20000), exact)
