"""Handlers and primitives: plates, subsampling, scale, mask, condition, block, modules."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import scgjax as sg
from scgjax import dist
from scgjax.dist import constraints
from tests.stats import assert_unbiased, grad_samples


def test_nested_plates_broadcast_and_credit_per_cell():
    f1 = jnp.arange(6.0).reshape(3, 2) - 2.0  # cost of z == 1 in cell (i, j); 0 otherwise

    def program():
        t = sg.param("t", jnp.array(0.3))
        with sg.plate("rows", 3, dim=-2), sg.plate("cols", 2):
            z = sg.sample("z", dist.Bernoulli(logits=t), estimator=sg.ScoreFunction())
            sg.factor("f", z * f1)
        return z

    tr = sg.handlers.trace(sg.handlers.seed(program, 0)).get_trace()
    assert tr["z"]["value"].shape == (3, 2)
    assert [f.name for f in tr["z"]["cond_indep_stack"]] == ["cols", "rows"]
    assert set(sg.graph(program).shared_plates("z", "f")) == {"rows", "cols"}
    params = sg.init_params(0, program)
    s = jax.nn.sigmoid(0.3)
    exact = {"t": s * (1 - s) * f1.sum()}
    loss = lambda key, p: sg.Expectation().loss(key, p, program)
    assert_unbiased(grad_samples(loss, params, 20000), exact)


def test_subsampled_plate_is_unbiased_for_the_full_sum():
    data = jnp.linspace(-1.0, 2.0, 20)

    def program():
        with sg.plate("data", 20, subsample_size=5) as idx:
            sg.factor("f", data[idx] ** 2)

    keys = jax.random.split(jax.random.key(0), 4000)
    values = jax.jit(jax.vmap(lambda k: -sg.Expectation().loss(k, {}, program)))(keys)
    assert_unbiased({"v": values}, {"v": jnp.sum(data**2)}, min_power=0.0)
    assert float(jnp.std(values)) > 0  # it really subsamples


def test_replay_reuses_subsample_indices():
    def guide():
        with sg.plate("data", 10, subsample_size=3) as idx:
            sg.sample("z", dist.Normal(0.0, 1.0))
        return idx

    def model():
        with sg.plate("data", 10, subsample_size=3) as idx:
            sg.sample("z", dist.Normal(0.0, 1.0))
        return idx

    tr = sg.handlers.trace(sg.handlers.seed(guide, 1)).get_trace()
    replayed = sg.handlers.seed(sg.handlers.replay(model, tr), 2)()
    np.testing.assert_array_equal(replayed, tr["data"]["value"])


def test_scale_and_mask():
    def program():
        with sg.plate("n", 3):
            sg.sample("x", dist.Normal(0.0, 1.0), obs=jnp.array([0.0, 1.0, 2.0]))

    base = -sg.Expectation().loss(jax.random.key(0), {}, program)
    scaled = -sg.Expectation().loss(jax.random.key(0), {}, sg.handlers.scale(program, 3.0))
    np.testing.assert_allclose(scaled, 3 * base, rtol=1e-6)
    keep = jnp.array([True, False, True])
    masked = -sg.Expectation().loss(jax.random.key(0), {}, sg.handlers.mask(program, keep))
    lp = dist.Normal(0.0, 1.0).log_prob(jnp.array([0.0, 1.0, 2.0]))
    np.testing.assert_allclose(masked, lp[0] + lp[2], rtol=1e-6)


def test_scale_created_under_jit():
    # a Python-float scale made inside a jitted function is checked without tracing it
    def program():
        sg.sample("x", dist.Normal(0.0, 1.0), obs=1.0)

    @jax.jit
    def loss(key):
        return sg.Expectation().loss(key, {}, sg.handlers.scale(program, 0.5))

    expected = -0.5 * dist.Normal(0.0, 1.0).log_prob(1.0)
    np.testing.assert_allclose(loss(jax.random.key(0)), expected, rtol=1e-6)
    with pytest.raises(sg.ScgjaxError, match="scale must be positive"):
        sg.handlers.scale(program, -1.0)


def test_masked_latent_elements_earn_no_credit():
    def program():
        t = sg.param("t", jnp.zeros(2))
        with sg.plate("n", 2), sg.handlers.mask(mask=jnp.array([True, False])):
            z = sg.sample("z", dist.Bernoulli(logits=t), estimator=sg.ScoreFunction())
            sg.factor("f", z * 3.0)

    g = grad_samples(lambda k, p: sg.Expectation().loss(k, p, program),
                     sg.init_params(0, program), 200)
    assert float(jnp.abs(g["t"][:, 1]).max()) == 0.0
    assert float(jnp.abs(g["t"][:, 0]).max()) > 0.0


def test_condition_and_block():
    def program():
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(z, 1.0), obs=0.5)
        return z

    conditioned = sg.handlers.condition(program, {"z": 2.0})
    tr = sg.handlers.trace(sg.handlers.seed(conditioned, 0)).get_trace()
    assert tr["z"]["is_observed"] and float(tr["z"]["value"]) == 2.0
    g = sg.graph(conditioned)
    assert set(g.costs) == {"log p(z)", "log p(x)"} and not g.nodes
    hidden = sg.handlers.trace(sg.handlers.block(sg.handlers.seed(program, 0), expose=["x"]))
    assert sorted(hidden.get_trace()) == ["x"]


def test_constrained_params_are_stored_unconstrained():
    def model():
        s = sg.param("s", 2.0, constraints.positive)
        p = sg.param("p", jnp.array([0.2, 0.8]), constraints.simplex)
        sg.sample("x", dist.Normal(0.0, s), obs=p[0])

    params = sg.init_params(0, model)
    np.testing.assert_allclose(params["s"], np.log(2.0), rtol=1e-6)
    assert params["p"].shape == (1,)  # the simplex's unconstrained space
    constrained = sg.constrain_params(params, model)
    np.testing.assert_allclose(constrained["p"], [0.2, 0.8], rtol=1e-5)
    grad = jax.grad(lambda p: sg.Expectation().loss(jax.random.key(0), p, model))(params)
    assert np.isfinite(grad["s"]) and float(grad["s"]) != 0.0


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.layer(x)[..., 0]


def test_linen_and_nnx_modules_become_params():
    x = jnp.ones((4, 3))

    def model(x):
        linen_out = sg.module("dense", nn.Dense(1), x)(x)[..., 0]
        nnx_out = sg.module("mlp", MLP(nnx.Rngs(0)))(x)
        with sg.plate("data", 4):
            sg.sample("y", dist.Normal(linen_out + nnx_out, 1.0), obs=jnp.zeros(4))

    params = sg.init_params(0, model, None, x)
    assert set(params) == {"dense", "mlp"}
    grads = jax.grad(lambda p: sg.Expectation().loss(jax.random.key(0), p, model, x))(params)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 4 and all(float(jnp.abs(g).sum()) > 0 for g in leaves)


def test_assign_estimators_by_name_from_outside():
    x = jnp.linspace(-1.0, 1.0, 8)

    def guide(x):
        with sg.plate("data", 8):
            sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0) * x))

    def model(x):
        with sg.plate("data", 8):
            sg.sample("z", dist.Bernoulli(logits=0.0))

    assigned = sg.handlers.assign_estimators(guide, {"z": sg.ScoreFunction()})
    g = sg.graph(model, assigned, x, num_particles=3)
    assert g.nodes["z"].estimator == sg.ScoreFunction()
    misspelt = sg.handlers.assign_estimators(guide, {"zz": sg.RLOO()})
    with pytest.raises(sg.SiteError, match="'zz'.*no latent site"):
        sg.graph(model, misspelt, x)
