"""Same key, same result; handled functions jitted repeatedly; handler objects reused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import scgjax as sg
from tests import models


def test_same_key_same_loss_and_gradient():
    x = models.MIX_X
    params = sg.init_params(0, models.mixture_model, models.mixture_guide, x)
    obj = sg.ELBO(num_particles=3)
    f = jax.value_and_grad(lambda p, k: obj.loss(k, p, models.mixture_model,
                                                 models.mixture_guide, x))
    v1, g1 = f(params, jax.random.key(7))
    v2, g2 = jax.jit(f)(params, jax.random.key(7))
    v3, _ = f(params, jax.random.key(8))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)
    assert float(v1) != float(v3)


def test_jitting_the_same_handled_function_twice():
    def model(scale):
        return sg.sample("z", sg.dist.Normal(0.0, scale))

    seeded = sg.handlers.trace(sg.handlers.seed(model, jax.random.key(0)))

    def run(scale):
        return seeded.get_trace(scale)["z"]["value"]

    first = jax.jit(run)(1.0)
    second = jax.jit(run)(2.0)  # a new trace of the same handler objects: no leaked tracer
    third = jax.jit(lambda s: run(s) * 1.0)(2.0)
    assert float(second) == float(third) == 2 * float(first)
    assert float(run(1.0)) == float(first)  # and eagerly afterwards


def test_loss_jitted_twice_and_under_vmap():
    x = models.MIX_X
    params = sg.init_params(0, models.mixture_model, models.mixture_guide, x)
    obj = sg.ELBO()
    loss = lambda k: obj.loss(k, params, models.mixture_model, models.mixture_guide, x)
    a = jax.jit(loss)(jax.random.key(1))
    b = jax.jit(loss)(jax.random.key(1))
    c = jax.vmap(loss)(jax.random.split(jax.random.key(1), 3))
    assert float(a) == float(b) and c.shape == (3,) and bool(jnp.all(jnp.isfinite(c)))
