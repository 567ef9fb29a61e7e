"""Reweighted wake-sleep against analytic gradients and posteriors (linear-Gaussian model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.objectives.iwae import IWAE
from scgjax.objectives.rws import RWS

X = jnp.array([0.3, 1.7, -0.4, 2.2, 1.1])


def model(x):
    a = sg.param("a", 0.5)
    b = sg.param("b", 0.2)
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(a * z + b, 1.0), obs=x)


def guide(x):
    c = sg.param("c", 0.1)
    d = sg.param("d", -0.3)
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Normal(c * x + d, 0.8))


def log_evidence(p, x):  # x_n ~ N(b, a^2 + 1)
    return jnp.sum(dist.Normal(p["b"], jnp.sqrt(p["a"] ** 2 + 1.0)).log_prob(x))


def mean_gradient(k, params, n=2000):
    keys = jax.random.split(jax.random.key(k), n)
    g = jax.jit(jax.vmap(lambda key: jax.grad(RWS(num_particles=k).loss, argnums=1)(
        key, params, model, guide, X)))(keys)
    return {name: -np.asarray(v).mean(0) for name, v in g.items()}


def test_wake_theta_approaches_the_gradient_of_the_log_evidence():
    params = sg.init_params(0, model, guide, X)
    exact = jax.grad(log_evidence)(params, X)
    errors = []
    for k in (1, 10, 100):
        g = mean_gradient(k, params)
        errors.append(np.hypot(g["a"] - exact["a"], g["b"] - exact["b"])
                      / np.hypot(exact["a"], exact["b"]))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1 and errors[0] > 0.3, errors


def test_wake_phi_moves_the_guide_towards_the_exact_posterior():
    # with a, b fixed, the posterior of z_n is N(a (x_n - b) / (a^2 + 1), 1 / (a^2 + 1))
    def kl_to_posterior(p):
        a, b = 0.5, 0.2
        mean = a * (X - b) / (a**2 + 1)
        var = 1 / (a**2 + 1)
        q_mean, q_var = p["c"] * X + p["d"], 0.8**2
        return jnp.sum(0.5 * (q_var / var + (q_mean - mean) ** 2 / var - 1
                              + jnp.log(var / q_var)))

    tx = optax.multi_transform({"guide": optax.adam(0.02), "model": optax.set_to_zero()},
                               {"a": "model", "b": "model", "c": "guide", "d": "guide"})
    svi = sg.SVI(model, guide, tx, RWS(num_particles=10))
    state = svi.init(jax.random.key(0), X)
    before = float(kl_to_posterior(state.params))
    result = svi.run(None, 300, X, state=state, progress_bar=False)
    after = float(kl_to_posterior(result.params))
    assert after < 0.2 * before, (before, after)
    assert float(result.params["a"]) == 0.5  # the model's params were not moved


def test_value_is_the_k_sample_bound():
    params = sg.init_params(0, model, guide, X)
    key = jax.random.key(3)
    np.testing.assert_allclose(RWS(num_particles=7).loss(key, params, model, guide, X),
                               IWAE(num_particles=7).loss(key, params, model, guide, X),
                               rtol=1e-5)


def test_discrete_latents_train_without_a_score_term():
    x = jnp.array([2.1, -1.8, 1.5, -2.4, 0.3, 2.8])

    def mix_model(x):
        mu = sg.param("mu", jnp.array([-0.5, 0.5]))
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Bernoulli(logits=0.0))
            sg.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0), obs=x)

    def mix_guide(x):
        w = sg.param("w", 0.0)
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Bernoulli(logits=w * x))

    def evidence(p):
        comps = jnp.stack([dist.Normal(p["mu"][i], 1.0).log_prob(x) for i in (0, 1)])
        return jnp.sum(jax.nn.logsumexp(comps, axis=0) - jnp.log(2.0))

    svi = sg.SVI(mix_model, mix_guide, optax.adam(0.05), RWS(num_particles=8))
    state = svi.init(jax.random.key(1), x)
    before = float(evidence(state.params))
    result = svi.run(None, 300, x, state=state, progress_bar=False)
    assert float(evidence(result.params)) > before + 1.0
    assert float(result.params["w"]) > 0.5  # q(z = 1 | x) grows with x, like the posterior


def test_an_explicit_estimator_is_an_error_naming_the_site():
    def scored(x):
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Normal(0.0, 1.0), estimator=sg.Pathwise())

    params = sg.init_params(0, model, scored, X)
    with pytest.raises(sg.SiteError, match="'z'.*RWS"):
        RWS(num_particles=2).loss(jax.random.key(0), params, model, scored, X)
