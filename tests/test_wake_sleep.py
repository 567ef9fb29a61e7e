"""Wake-sleep and RWS's sleep-phi against analytic gradients and the exact posterior, and the
model/guide parameter split (``sg.param_labels``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from tests.stats import assert_unbiased, grad_samples
from tests.test_rws import X, guide, model

SIGMA_Q = 0.8  # the guide's fixed scale in tests.test_rws.guide


def analytic_wake_sleep_gradient(p: dict, x: jax.Array) -> dict:
    """E[wake-θ] with z_n ~ q(z | x_n) = N(c x_n + d, 0.8²), and E[sleep-φ] with
    (z, x') ~ p: z ~ N(0, 1), x' = a z + b + noise, N = len(x) dreamt points."""
    a, b, c, d = p["a"], p["b"], p["c"], p["d"]
    m = c * x + d
    grad_a = jnp.sum(x * m - a * (m**2 + SIGMA_Q**2) - b * m)
    grad_b = jnp.sum(x - a * m - b)
    n = x.shape[0]
    grad_c = n * (a - c * (a**2 + 1 + b**2) - d * b) / SIGMA_Q**2
    grad_d = n * (-c * b - d) / SIGMA_Q**2
    return {"a": grad_a, "b": grad_b, "c": grad_c, "d": grad_d}


def kl_to_posterior(p: dict, a: float, b: float) -> jax.Array:
    """KL(q(z | X) || p_{a,b}(z | X)), summed over the data."""
    mean, var = a * (X - b) / (a**2 + 1), 1 / (a**2 + 1)
    q_mean, q_var = p["c"] * X + p["d"], SIGMA_Q**2
    return jnp.sum(0.5 * (q_var / var + (q_mean - mean) ** 2 / var - 1 + jnp.log(var / q_var)))


def test_wake_sleep_gradient_is_unbiased():
    params = {"a": jnp.array(0.9), "b": jnp.array(-0.4), "c": jnp.array(0.1),
              "d": jnp.array(0.5)}
    samples = grad_samples(
        lambda key, p: sg.WakeSleep().loss(key, p, model, guide, X), params, 4000)
    assert_unbiased(samples, analytic_wake_sleep_gradient(params, X))


def test_sleep_phi_mixes_the_wake_and_sleep_updates():
    params = sg.init_params(0, model, guide, X)
    key = jax.random.key(5)

    def grad(w):
        return jax.grad(sg.RWS(num_particles=4, sleep_phi=w).loss, argnums=1)(
            key, params, model, guide, X)

    wake, sleep, mixed = grad(0.0), grad(1.0), grad(0.25)
    for name in ("a", "b"):  # wake-θ alone, whatever the guide's update
        np.testing.assert_allclose(mixed[name], wake[name], rtol=1e-6)
        np.testing.assert_allclose(sleep[name], wake[name], rtol=1e-6)
    for name in ("c", "d"):
        np.testing.assert_allclose(mixed[name], 0.75 * wake[name] + 0.25 * sleep[name],
                                   rtol=1e-5, atol=1e-6)
        assert abs(float(sleep[name] - wake[name])) > 1e-3  # the two updates differ
    value = sg.RWS(num_particles=4, sleep_phi=0.25).loss_with_state(
        key, params, None, model, guide, X)
    assert np.isfinite(float(value[1][1]["sleep_log_q"]))
    np.testing.assert_allclose(value[0], sg.IWAE(num_particles=4).loss(
        key, params, model, guide, X), rtol=1e-5)


def test_wake_sleep_moves_the_guide_to_the_exact_posterior_with_the_model_frozen():
    labels = sg.param_labels(model, guide, X)
    assert labels == {"c": "guide", "d": "guide", "a": "model", "b": "model"}
    tx = optax.multi_transform({"guide": optax.adam(0.03), "model": optax.set_to_zero()},
                               labels)
    svi = sg.SVI(model, guide, tx, sg.WakeSleep())
    state = svi.init(jax.random.key(0), X)
    before = float(kl_to_posterior(state.params, 0.5, 0.2))
    result = svi.run(None, 600, X, state=state, progress_bar=False)
    after = float(kl_to_posterior(result.params, 0.5, 0.2))
    assert after < 0.1 * before, (before, after)
    # sleep-φ finds the amortised posterior for every x: c = a / (a²+1), d = -a b / (a²+1)
    np.testing.assert_allclose(result.params["c"], 0.4, atol=0.05)
    np.testing.assert_allclose(result.params["d"], -0.08, atol=0.05)
    assert float(result.params["a"]) == 0.5


def test_wake_sleep_learns_the_model():
    def log_evidence(p):
        return jnp.sum(dist.Normal(p["b"], jnp.sqrt(p["a"] ** 2 + 1.0)).log_prob(X))

    svi = sg.SVI(model, guide, optax.adam(0.03), sg.WakeSleep())
    state = svi.init(jax.random.key(1), X)
    result = svi.run(None, 500, X, state=state, progress_bar=False)
    # the maximum-likelihood b is mean(X) = 0.98; log p(X) rises by more than 1 nat
    assert float(log_evidence(result.params)) > float(log_evidence(state.params)) + 1.0
    np.testing.assert_allclose(result.params["b"], float(X.mean()), atol=0.25)


def test_sleep_args_give_the_guide_the_dreamt_data():
    def two_views(x, y):
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Normal(0.0, 1.0))
            sg.sample("x", dist.Normal(z, 1.0), obs=x)
            sg.sample("y", dist.Normal(z, 1.0), obs=y)

    def two_view_guide(x, y):
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Normal(sg.param("w", 0.0) * (x + y), 0.7))

    x, y = jnp.ones(3), -jnp.ones(3)
    params = sg.init_params(0, two_views, two_view_guide, x, y)
    with pytest.raises(sg.ScgjaxError, match="sleep_args"):
        sg.WakeSleep().loss(jax.random.key(0), params, two_views, two_view_guide, x, y)
    seen = {}

    def sleep_args(observations, x, y):
        seen.update(observations)
        return observations["x"], observations["y"]

    ws = sg.WakeSleep(sleep_args=sleep_args)
    g = jax.grad(ws.loss, argnums=1)(jax.random.key(0), params, two_views, two_view_guide, x, y)
    assert sorted(seen) == ["x", "y"] and seen["x"].shape == (3,)
    assert np.isfinite(float(g["w"])) and float(g["w"]) != 0.0


def test_wake_sleep_errors_name_the_site():
    def shared_model(x):
        loc = sg.param("loc", 0.0)
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Normal(loc, 1.0))
            sg.sample("x", dist.Normal(z, 1.0), obs=x)

    def shared_guide(x):
        loc = sg.param("loc", 0.0)
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Normal(loc + x, 1.0))

    params = sg.init_params(0, shared_model, shared_guide, X)
    assert sg.param_labels(shared_model, shared_guide, X) == {"loc": "shared"}
    for objective in (sg.WakeSleep(), sg.RWS(num_particles=3)):
        with pytest.raises(sg.SiteError, match="'loc'.*both the model and the guide"):
            objective.loss(jax.random.key(0), params, shared_model, shared_guide, X)

    def factor_model(x):
        model(x)
        sg.factor("penalty", -1.0)

    params = sg.init_params(0, factor_model, guide, X)
    with pytest.raises(sg.SiteError, match="'penalty'.*factor"):
        sg.WakeSleep().loss(jax.random.key(0), params, factor_model, guide, X)

    def bad_shape(observations, x):
        return (observations["x"][:2],)

    params = sg.init_params(0, model, guide, X)
    with pytest.raises(sg.SiteError, match="'z'.*shape"):  # the dreamt z vs 2 data points
        sg.WakeSleep(sleep_args=bad_shape).loss(jax.random.key(0), params, model, guide, X)

    def scalar_model(x):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(z, 1.0).expand([2]).to_event(1), obs=x[:2])

    def scalar_guide(x):
        sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))

    params = sg.init_params(0, scalar_model, scalar_guide, X)
    with pytest.raises(sg.SiteError, match="'x'.*shape"):
        sg.WakeSleep().loss(jax.random.key(0), params, scalar_model, scalar_guide, X)
    with pytest.raises(ValueError, match="sleep_phi"):
        sg.RWS(sleep_phi=1.5)


def test_param_labels_of_modules_estimators_and_single_programs():
    def net_model(x):
        decode = sg.module("decoder", nn.Dense(1), jnp.zeros((1, 1)))
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Bernoulli(logits=0.0))
            sg.sample("x", dist.Normal(decode(z[:, None])[:, 0], 1.0), obs=x)

    def net_guide(x):
        encode = sg.module("encoder", nn.Dense(1), jnp.zeros((1, 1)))
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Bernoulli(logits=encode(x[:, None])[:, 0]), estimator=sg.DCV())

    labels = sg.param_labels(net_model, net_guide, X)
    params = sg.init_params(0, net_model, net_guide, X)
    assert set(labels) == set(params)
    estimator_params = [n for n in params if "$" in n]
    assert estimator_params, "DCV has a learned coefficient"
    assert all(labels[n] == "guide" for n in estimator_params)
    assert labels["decoder"] == "model" and labels["encoder"] == "guide"
    # usable as optax's labels: a prefix of the params pytree
    tx = optax.multi_transform({"model": optax.sgd(0.1), "guide": optax.set_to_zero()}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).sum()) == 0.0 for u in jax.tree.leaves(updates["encoder"]))
    assert all(float(jnp.abs(u).sum()) > 0.0 for u in jax.tree.leaves(updates["decoder"]))

    def episode():
        sg.factor("r", sg.sample("a", dist.Normal(sg.param("mu", 0.0), 1.0)))

    assert sg.param_labels(episode) == {"mu": "model"}
