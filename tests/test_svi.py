"""Training with SVI: convergence on a conjugate model, state threading, discrete latents."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scgjax as sg
from scgjax import dist
from scgjax.dist import constraints
from tests import models
from tests.test_svi_batches import count_traces

X = jnp.array([0.8, 1.9, 1.2, 0.4, 1.6])


def normal_model(x):
    z = sg.sample("z", dist.Normal(0.0, 1.0))
    with sg.plate("data", x.shape[0]):
        sg.sample("x", dist.Normal(z, 1.0), obs=x)


def normal_guide(x):
    m = sg.param("m", 0.0)
    s = sg.param("s", 1.0, constraints.positive)
    sg.sample("z", dist.Normal(m, s))


def test_svi_finds_the_conjugate_posterior():
    lr = optax.exponential_decay(0.05, transition_steps=1500, decay_rate=0.01)
    svi = sg.SVI(normal_model, normal_guide, optax.adam(lr), sg.ELBO(num_particles=4))
    result = svi.run(jax.random.key(0), 1500, X, progress_bar=False)
    post_var = 1.0 / (1.0 + X.shape[0])
    post_mean = post_var * X.sum()
    fitted = sg.constrain_params(result.params, normal_model, normal_guide, X)
    assert abs(float(fitted["m"]) - post_mean) < 0.05
    assert abs(float(fitted["s"]) - np.sqrt(post_var)) < 0.05
    assert result.losses.shape == (1500,)
    assert result.losses[-100:].mean() < result.losses[:100].mean()


def test_svi_threads_moving_average_state_and_improves_a_discrete_model():
    x = models.MIX_X
    svi = sg.SVI(models.mixture_model, models.mixture_guide, optax.adam(0.05), sg.ELBO())
    state = svi.init(jax.random.key(0), x)
    assert int(state.estimator_state["z"]["steps"]) == 0
    before = float(models.mixture_exact(state.params, x))
    result = svi.run(None, 300, x, state=state, progress_bar=False)
    assert int(result.state.estimator_state["z"]["steps"]) == 300
    assert float(result.state.estimator_state["z"]["mean"]) != 0.0
    after = float(models.mixture_exact(result.params, x))
    assert after > before + 10.0, (before, after)
    assert set(result.metrics) == {"loss", "objective"}


def test_svi_expectation_policy_gradient_and_progress_bar(capsys):
    fn = functools.partial(models.episode, True, None)
    svi = sg.SVI(fn, None, optax.adam(0.1), sg.Expectation(num_particles=8))
    state = svi.init(jax.random.key(1))
    before = float(models.episode_exact(state.params))
    result = svi.run(None, 200, state=state, progress_bar=True)
    after = float(models.episode_exact(result.params))
    assert after > before
    assert "objective" in capsys.readouterr().err


def test_update_compiles_once_per_static_signature():
    svi = sg.SVI(normal_model, normal_guide, optax.sgd(0.01), sg.ELBO())
    traced = count_traces(svi)
    state = svi.init(jax.random.key(0), X)
    for _ in range(3):
        state, loss = svi.update(state, X)
    state, _ = svi.update(state, X + 1.0)
    assert len(svi._jitted) == 1 and np.isfinite(float(loss))
    assert len(traced) == 1  # the state's types are stable from the first call


def test_init_params_traces_a_program_once_per_signature():
    runs = []

    def model(x, scale=1.0):
        runs.append(1)  # a Python side effect: counts the traces
        loc = sg.param("loc", 0.0)
        with sg.plate("data", x.shape[0]):
            sg.sample("x", dist.Normal(loc, scale), obs=x)

    x = jnp.zeros(3)
    first = sg.init_params(0, model, None, x)
    sg.init_params(1, model, None, x + 1.0)  # new arrays, same structure: no new trace
    assert len(runs) == 1
    sg.init_params(0, model, None, x, scale=2.0)  # a new static argument: traced again
    assert len(runs) == 2
    assert float(first["loc"]) == 0.0
