"""Enumerate: exact expectations over finite supports, alone and mixed with sampled sites."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.estimators.enumerate import Enumerate
from tests import models
from tests.stats import assert_unbiased, grad_samples


def test_enumerated_plate_mixture_is_exact():
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=Enumerate())
    params = sg.init_params(0, models.mixture_model, guide, x)
    value, grads = jax.value_and_grad(
        lambda p: -sg.ELBO().loss(jax.random.key(0), p, models.mixture_model, guide, x))(params)
    exact_value, exact_grads = jax.value_and_grad(models.mixture_exact)(params, x)
    np.testing.assert_allclose(value, exact_value, rtol=1e-5)
    for name in exact_grads:
        np.testing.assert_allclose(grads[name], exact_grads[name], rtol=1e-4, atol=1e-4)


def test_categorical_in_nested_plates_is_exact():
    costs = jnp.arange(12.0).reshape(2, 3, 2) / 5.0  # cost of value v in cell (i, j)

    def program():
        logits = sg.param("logits", jnp.zeros((2, 3, 3)).at[..., 1].set(0.5))
        with sg.plate("rows", 2, dim=-2), sg.plate("cols", 3):
            z = sg.sample("z", dist.Categorical(logits=logits), estimator=Enumerate())
            sg.factor("f", jnp.take_along_axis(
                jnp.concatenate([costs, -costs[..., :1]], -1), z[..., None], -1)[..., 0])

    def exact(p):
        probs = jax.nn.softmax(p["logits"])
        return jnp.sum(probs * jnp.concatenate([costs, -costs[..., :1]], -1))

    params = sg.init_params(0, program)
    value, grads = jax.value_and_grad(
        lambda p: -sg.Expectation().loss(jax.random.key(0), p, program))(params)
    np.testing.assert_allclose(value, exact(params), rtol=1e-5)
    np.testing.assert_allclose(grads["logits"], jax.grad(exact)(params)["logits"], atol=1e-5)


def global_local_guide(x):
    c = sg.sample("c", dist.Bernoulli(logits=sg.param("phi", jnp.array(-0.4))),
                  estimator=Enumerate())
    m = sg.param("m", jnp.zeros(x.shape[0]))
    a = sg.param("shift", jnp.array(0.5))
    s = sg.param("log_s", jnp.array(-0.5))
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Normal(m + a * c, jnp.exp(s)))


def test_enumerated_global_with_sampled_local_latents_is_unbiased():
    x = models.GL_X
    params = sg.init_params(0, models.global_local_model, global_local_guide, x)
    exact = jax.grad(models.global_local_exact)(params, x)
    loss = lambda key, p: sg.ELBO().loss(key, p, models.global_local_model,
                                         global_local_guide, x)
    samples = grad_samples(loss, params, 3000)
    assert_unbiased(samples, exact)
    # exact in the enumerated site: its logit's gradient has far less noise than sampling it
    sampled = grad_samples(lambda key, p: sg.ELBO().loss(
        key, p, models.global_local_model, models.global_local_guide, x), params, 3000)
    assert float(jnp.var(samples["phi"])) < 0.1 * float(jnp.var(sampled["phi"]))


def test_enumerated_and_score_sites_mixed():
    """An enumerated site next to an independent score-estimated one."""
    def program():
        a = sg.sample("a", dist.Bernoulli(logits=sg.param("la", 0.3)), estimator=Enumerate())
        b = sg.sample("b", dist.Bernoulli(logits=sg.param("lb", -0.2)),
                      estimator=sg.ScoreFunction())
        sg.factor("f", 2.0 * a - 3.0 * b + a * 0.5)

    def exact(p):
        return 2.5 * jax.nn.sigmoid(p["la"]) - 3.0 * jax.nn.sigmoid(p["lb"])

    params = sg.init_params(0, program)
    samples = grad_samples(lambda k, p: sg.Expectation().loss(k, p, program), params, 4000)
    assert_unbiased(samples, jax.grad(exact)(params))
    assert float(jnp.std(samples["la"])) < 1e-5  # exact for the enumerated site


def test_enumerate_errors():
    def normal_site():
        sg.sample("z", dist.Normal(0.0, 1.0), estimator=Enumerate())

    with pytest.raises(sg.SiteError, match="'z'.*finite support"):
        sg.graph(normal_site)

    def event_site():
        sg.sample("z", dist.Bernoulli(logits=jnp.zeros(17)).to_event(1), estimator=Enumerate())

    with pytest.raises(sg.SiteError, match="'z'.*131072 values.*budget"):
        sg.graph(event_site)

    def score_below():
        a = sg.sample("a", dist.Bernoulli(logits=0.0), estimator=Enumerate())
        b = sg.sample("b", dist.Bernoulli(logits=a), estimator=sg.ScoreFunction())
        sg.factor("f", b)

    with pytest.raises(sg.SiteError, match="'b'.*depends on the enumerated site 'a'"):
        sg.Expectation().loss(jax.random.key(0), {}, score_below)

    def linked():
        with sg.plate("data", 3):
            z = sg.sample("z", dist.Bernoulli(logits=0.0), estimator=Enumerate())
        sg.factor("g", z.sum())  # outside the plate: needs the joint, not per-element values

    with pytest.raises(sg.SiteError, match="'z'.*links different elements"):
        sg.Expectation().loss(jax.random.key(0), {}, linked)


def test_independent_enumerated_sites_are_enumerated_apart():
    """Three guide sites of 50 values each, with no cost tying them: enumerated group by group
    (150 runs, not 125,000), and the ELBO is exact."""
    x = jnp.array([1.0, 2.5, -0.5])
    locs = jnp.arange(50) / 10.0

    def model(x):
        for i in range(3):
            k = sg.sample(f"k{i}", dist.Categorical(logits=jnp.zeros(50)))
            sg.sample(f"x{i}", dist.Normal(locs[k], 1.0), obs=x[i])

    def guide(x):
        w = sg.param("w", jnp.zeros((3, 50)))
        for i in range(3):
            sg.sample(f"k{i}", dist.Categorical(logits=w[i]), estimator=Enumerate())

    def exact(w):
        total = 0.0
        for i in range(3):
            lq = jax.nn.log_softmax(w[i])
            lp = -jnp.log(50.0) + dist.Normal(locs, 1.0).log_prob(x[i])
            total = total + jnp.sum(jnp.exp(lq) * (lp - lq))
        return total

    params = {"w": jax.random.normal(jax.random.key(0), (3, 50))}
    loss, grad = jax.value_and_grad(sg.ELBO().loss, argnums=1)(jax.random.key(1), params,
                                                               model, guide, x)
    np.testing.assert_allclose(-loss, exact(params["w"]), rtol=1e-5)
    np.testing.assert_allclose(-grad["w"], jax.grad(exact)(params["w"]), rtol=1e-4, atol=1e-6)
