"""Higher derivatives: the expected Hessian of the surrogate is the exact Hessian (DiCE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from tests.models import bern_logp
from tests.stats import assert_unbiased


def cost(a, b, t):
    return (a + 2 * b - 1.0) ** 2 * t[0] + t[1] * b - 0.5 * a * b


def program(estimator=None):
    t = sg.param("t", jnp.array([0.3, -0.2, 0.5]))
    a = sg.sample("a", dist.Bernoulli(logits=t[0]), estimator=estimator)
    b = sg.sample("b", dist.Bernoulli(logits=t[1] + t[2] * a), estimator=estimator)
    sg.factor("f", cost(a, b, t))


def exact_objective(t):
    total = 0.0
    for a in (0.0, 1.0):
        for b in (0.0, 1.0):
            logp = bern_logp(a, t[0]) + bern_logp(b, t[1] + t[2] * a)
            total = total + jnp.exp(logp) * cost(a, b, t)
    return total


@pytest.mark.parametrize("estimator, k", [(sg.ScoreFunction(), 1), (sg.RLOO(), 2)],
                         ids=["score", "rloo"])
def test_expected_hessian_is_exact(estimator, k):
    t0 = jnp.array([0.3, -0.2, 0.5])
    exact = jax.hessian(exact_objective)(t0)

    def hessian(key):
        loss = lambda t: -sg.Expectation(num_particles=k).loss(key, {"t": t}, program,
                                                               estimator)
        return jax.hessian(loss)(t0)

    keys = jax.random.split(jax.random.key(0), 40000)
    samples = jax.jit(jax.vmap(hessian))(keys)
    assert_unbiased({"H": samples}, {"H": exact})
    # the first-order surrogate of Schulman et al. alone would miss the score cross terms
    assert np.abs(np.asarray(exact)).max() > 0.1
