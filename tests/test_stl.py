"""STL, sticking the landing (Roeder, Wu & Duvenaud 2017): unbiased for the ELBO's gradient
against the closed form, zero variance at the exact posterior, per plate element, with
hierarchical guides, and refused where it would be biased."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from tests import models

X = jnp.array([1.5, -0.4, 0.3, 2.2, -1.1])


model = models.normal_plate_model
guide_with = models.normal_plate_guide


def exact_grad(m, s, x):
    """d ELBO / d(m, log s) for q = N(m, s^2), p(z) = N(0, 1), p(x | z) = N(z, 1), per point:
    ELBO_n = -(m^2 + s^2)/2 - ((x - m)^2 + s^2)/2 + log s + const."""
    return {"m": -m + (x - m), "s": 1.0 - 2.0 * s**2}


def grads(estimator, params, n_keys, objective=None):
    objective = objective or sg.ELBO()
    g = jax.jit(jax.vmap(lambda k: jax.grad(objective.loss, argnums=1)(
        k, params, model, guide_with(estimator), X)))
    return g(jax.random.split(jax.random.key(0), n_keys))


def test_stl_is_unbiased_per_plate_element():
    m, s = jnp.array([0.3, -0.2, 0.0, 1.0, -0.5]), jnp.array([0.5, 1.2, 0.8, 0.6, 1.0])
    params = {"m": m, "s": jnp.log(s)}
    exact = exact_grad(m, s, X)
    g = grads(sg.STL(), params, 4000)
    for name in ("m", "s"):
        est = -g[name]  # the loss is -ELBO
        mean, se = est.mean(0), est.std(0) / np.sqrt(est.shape[0])
        np.testing.assert_array_less(np.abs(mean - exact[name]), 5 * se + 1e-6)
        # the test can fail: a sign error would put these elements many SEs away
        assert np.sum(np.abs(2 * exact[name]) > 5 * se) >= 3


def test_stl_has_zero_variance_at_the_exact_posterior_where_pathwise_does_not():
    m, s = X / 2, jnp.full(X.shape, jnp.sqrt(0.5))  # the exact posterior N(x/2, 1/2)
    params = {"m": m, "s": jnp.log(s)}
    stl, pathwise = grads(sg.STL(), params, 200), grads(sg.Pathwise(), params, 200)
    for name in ("m", "s"):
        assert float(jnp.abs(stl[name]).max()) < 1e-5
        assert float(pathwise[name].std(0).min()) > 0.1


def test_stl_in_a_hierarchical_guide_matches_pathwise_in_mean():
    """Only the site's own density is detached: a child whose location depends on its parent
    keeps the path through the parent's value. Paired against Pathwise (unbiased, tested
    against exact gradients elsewhere) on the same keys: the difference has mean zero."""
    def model2():
        a = sg.sample("a", dist.Normal(0.0, 1.0))
        b = sg.sample("b", dist.Normal(a, 1.0))
        sg.sample("y", dist.Normal(b, 0.5), obs=1.3)

    def guide2(estimator):
        def guide():
            a = sg.sample("a", dist.Normal(sg.param("ma", 0.1), 0.9), estimator=estimator)
            sg.sample("b", dist.Normal(sg.param("w", 0.5) * a + sg.param("mb", 0.2), 0.6),
                      estimator=estimator)
        return guide

    params = {"ma": jnp.array(0.1), "w": jnp.array(0.5), "mb": jnp.array(0.2)}
    keys = jax.random.split(jax.random.key(1), 20000)

    def g(est):
        return jax.vmap(lambda k: jax.grad(sg.ELBO().loss, argnums=1)(k, params, model2,
                                                                       guide2(est)))(keys)

    stl, pathwise = g(sg.STL()), g(sg.Pathwise())
    for name in params:
        diff = stl[name] - pathwise[name]
        se = diff.std() / np.sqrt(diff.shape[0])
        assert abs(float(diff.mean())) < 5 * float(se) + 1e-6
        assert float(diff.std()) > 0  # the two estimators do differ sample by sample


def test_stl_is_refused_where_it_would_be_biased():
    params = {"m": jnp.zeros(5), "s": jnp.zeros(5)}
    with pytest.raises(sg.SiteError, match="'z' uses STL, which drops the score"):
        sg.IWAE(num_particles=4).loss(0, params, model, guide_with(sg.STL()), X)
    with pytest.raises(sg.SiteError, match="'z' uses STL"):
        sg.RWS(num_particles=4).loss(0, params, model, guide_with(sg.STL()), X)

    def bernoulli_guide():
        sg.sample("c", dist.Bernoulli(logits=sg.param("l", 0.0)), estimator=sg.STL())

    def bernoulli_model():
        sg.sample("c", dist.Bernoulli(logits=0.0))

    with pytest.raises(sg.SiteError, match="'c' uses STL, but BernoulliLogits cannot be"):
        sg.ELBO().loss(0, {"l": jnp.zeros(())}, bernoulli_model, bernoulli_guide)


def test_stl_can_be_assigned_from_outside_the_guide():
    guide = sg.handlers.assign_estimators(guide_with(None), {"z": sg.STL()})
    params = {"m": X / 2, "s": jnp.log(jnp.full(X.shape, jnp.sqrt(0.5)))}
    g = jax.grad(sg.ELBO().loss, argnums=1)(jax.random.key(3), params, model, guide, X)
    assert float(jnp.abs(g["m"]).max()) < 1e-5
