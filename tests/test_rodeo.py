"""RODEO (discrete Stein-operator control variates): unbiasedness against exact gradients by
enumeration (K = 2, 3, 5, a logit exactly 0, a plate, logits that differ between particles,
ELBO and Expectation), the variance against RLOO on the double-control-variates toy problem
after training, and the errors."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from tests import models
from tests.stats import assert_unbiased

NUM_SAMPLES = 4000


def _program_params(tree: dict) -> dict:
    return {n: v for n, v in tree.items() if "$" not in n}


def _samples(objective, program_args, params, num_samples=NUM_SAMPLES, seed=0):
    loss = lambda k, p: objective.loss(k, p, *program_args)  # noqa: E731
    grad = lambda k: jax.tree.map(jnp.negative, jax.grad(loss, argnums=1)(k, params))  # noqa: E731
    g = jax.jit(jax.vmap(grad))(jax.random.split(jax.random.key(seed), num_samples))
    return _program_params(g)


def _far_from_zero(params: dict) -> dict:
    """Control variates far from 0 (``alpha``, ``beta`` and the network's biases away from
    their initial 0), so that a part of them that did not cancel in expectation shows."""
    out = dict(params)
    for name in [n for n in params if n.endswith("$alpha")]:
        site = name[: -len("$alpha")]
        phi = dict(params[f"{site}$control_variate"])
        phi["b_hidden"] = jnp.linspace(-1.0, 1.0, phi["b_hidden"].shape[0])
        phi["b_out"] = jnp.array([0.8, -0.6])
        out.update({f"{site}$alpha": jnp.float32(0.9), f"{site}$beta": jnp.float32(-1.5),
                    f"{site}$control_variate": phi})
    return out


# --- Expectation, an event block of three Bernoullis, a nonlinear cost, a logit exactly 0 --

W = jnp.array([1.0, -2.0, 0.5])


def block_program():
    eta = sg.param("eta", jnp.array([0.0, 1.0, -1.5]))
    z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=sg.RODEO())
    sg.factor("f", jnp.sin(z @ W) + 2.0 * z[0] * z[1])


def block_exact(p):
    z = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))
    lq = models.bern_logp(z, p["eta"]).sum(-1)
    return jnp.sum(jnp.exp(lq) * (jnp.sin(z @ W) + 2.0 * z[:, 0] * z[:, 1]))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_unbiased_expectation_block(k):
    params = _far_from_zero(sg.init_params(0, block_program))
    assert float(params["eta"][0]) == 0.0
    exact = jax.grad(block_exact)(_program_params(params))
    assert_unbiased(_samples(sg.Expectation(num_particles=k), (block_program,), params), exact)


# --- ELBO, an event block of two Bernoullis in a plate (the inner products per element), a
# nonlinear decoder, logits exactly 0 for the data point x = 0 --------------------------------

N_C = 24
X_C = np.array(jax.random.normal(jax.random.key(31), (N_C, 3)), dtype=np.float32)
X_C[0] = 0.0
Y_C = np.asarray(jax.random.normal(jax.random.key(32), (N_C, 3)) + 0.5, dtype=np.float32)


plated_model = models.block_model
plated_guide = functools.partial(models.block_guide, estimator=sg.RODEO(hidden=16))
plated_exact = models.block_exact


def test_unbiased_elbo_event_block_in_plate():
    params = _far_from_zero(sg.init_params(0, plated_model, plated_guide, X_C, Y_C))
    exact = jax.jit(jax.grad(plated_exact))(_program_params(params), X_C, Y_C)
    samples = _samples(sg.ELBO(num_particles=3), (plated_model, plated_guide, X_C, Y_C), params)
    assert_unbiased(samples, exact)
    assert_unbiased({n: samples[n] for n in ("V", "d")}, {n: exact[n] for n in ("V", "d")})


# --- the double-control-variates toy problem: RODEO below RLOO after training ---------------

TOY_D, TOY_T = 200, 0.499


def toy_program(estimator):
    eta = sg.param("eta", jnp.zeros(TOY_D))
    z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=estimator)
    sg.factor("f", -jnp.sum((z - TOY_T) ** 2))


def _toy_variance(objective, program, params, exact, n=1000, seed=7):
    """Per draw, the mean over coordinates of the squared error of the gradient estimate (its
    mean is the mean per-coordinate variance); returns the samples, their mean and its SE."""
    keys = jax.random.split(jax.random.key(seed), n)
    grad = lambda k: -jax.grad(objective.loss, argnums=1)(k, params, program)["eta"]  # noqa: E731
    g = np.asarray(jax.jit(jax.vmap(grad))(keys), np.float64)
    sq = np.mean((g - np.asarray(exact, np.float64)) ** 2, axis=1)
    return g, sq.mean(), sq.std(ddof=1) / np.sqrt(n)


def _train(objective, program, params, steps=2000, lr=0.01, seed=0):
    """Adam on every parameter (the program's and the estimator's), one compiled scan."""
    opt = optax.adam(lr)

    def step(carry, key):
        params, state = carry
        grads = jax.grad(objective.loss, argnums=1)(key, params, program)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(params, updates), state), None

    run = jax.jit(lambda c, keys: jax.lax.scan(step, c, keys)[0][0])
    return run((params, opt.init(params)), jax.random.split(jax.random.key(seed), steps))


def test_rodeo_is_learned_and_beats_rloo_on_the_toy_problem():
    """Titsias & Shi's toy problem: maximise ``E -sum_d (z_d - 0.499)^2`` over the logits,
    ``K = 2``, ``D = 200``; RODEO's parameters and the logits trained together by Adam."""
    program = functools.partial(toy_program, sg.RODEO())
    objective = sg.Expectation(num_particles=2)
    params = _train(objective, program, sg.init_params(0, program))
    assert abs(float(params["z$alpha"])) > 1e-2 and abs(float(params["z$beta"])) > 1e-2
    assert float(jnp.mean(params["eta"])) < -0.5  # the logits learned to prefer z = 0

    theta = jax.nn.sigmoid(params["eta"])
    exact = -(1 - 2 * TOY_T) * theta * (1 - theta)  # d E f / d eta
    rodeo = _toy_variance(objective, program, params, exact)
    rloo = _toy_variance(objective, functools.partial(toy_program, sg.RLOO()),
                         {"eta": params["eta"]}, exact)
    print(f"alpha {float(params['z$alpha']):.4f}, beta {float(params['z$beta']):.4f}; mean "
          f"per-coordinate variance: RODEO {rodeo[1]:.3e} +- {rodeo[2]:.1e}, RLOO {rloo[1]:.3e} "
          f"+- {rloo[2]:.1e}")
    assert rodeo[1] + 5.0 * np.hypot(rodeo[2], rloo[2]) < rloo[1]  # 5 SEs of the difference
    assert rodeo[1] < 0.5 * rloo[1]
    assert_unbiased({"eta": rodeo[0]}, {"eta": exact}, min_power=0.0)


MASK = np.arange(6) % 2 == 0


def masked_program():
    eta = sg.param("eta", jnp.linspace(-1.0, 1.0, 6))
    z = sg.sample("z", dist.Bernoulli(logits=eta).mask(MASK).to_event(1),
                  estimator=sg.RODEO(hidden=8))
    sg.factor("f", jnp.sum(jnp.sin(3.0 * z + jnp.arange(6.0))))


def test_variance_term_changes_no_value_and_trains_only_its_parameters():
    """The loss value does not depend on the estimator's parameters; the estimate is
    ``E0 + alpha A + beta B``; ``alpha`` and ``beta`` get the gradient of ``+mean(estimate^2)``
    (so that descent reduces the variance), the network a nonzero one unless both are 0, and
    masked elements no score gradient."""
    objective = sg.Expectation(num_particles=3)
    params = _far_from_zero(sg.init_params(0, masked_program))
    key = jax.random.key(4)

    @jax.jit
    def at(alpha, beta):
        p = dict(params, **{"z$alpha": alpha, "z$beta": beta})
        return jax.value_and_grad(objective.loss, argnums=1)(key, p, masked_program)

    alpha, beta = params["z$alpha"], params["z$beta"]
    zero, one = jnp.float32(0.0), jnp.float32(1.0)
    (v, g), (v0, g0), (_, g1), (_, g2) = (at(alpha, beta), at(zero, zero), at(one, zero),
                                          at(zero, one))
    assert float(v) == pytest.approx(float(v0), rel=1e-6, abs=1e-6)
    estimate, d_alpha, d_beta = -g["eta"], g0["eta"] - g1["eta"], g0["eta"] - g2["eta"]
    assert float(jnp.abs(d_alpha).max()) > 1e-3 and float(jnp.abs(d_beta).max()) > 1e-3
    np.testing.assert_allclose(estimate, -g0["eta"] + alpha * d_alpha + beta * d_beta,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["z$alpha"], 2.0 * jnp.mean(estimate * d_alpha), rtol=1e-3)
    np.testing.assert_allclose(g["z$beta"], 2.0 * jnp.mean(estimate * d_beta), rtol=1e-3)
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g["z$control_variate"]))
    assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(g0["z$control_variate"]))
    for grads in (g, g0, g1, g2):  # masked elements: no score gradient, whatever the CV
        assert np.all(np.asarray(grads["eta"])[~MASK] == 0.0)
    assert np.all(np.asarray(g["eta"])[MASK] != 0.0)


# --- errors -----------------------------------------------------------------------------------

def _bernoulli_program():
    z = sg.sample("z", dist.Bernoulli(logits=sg.param("eta", jnp.zeros(3))).to_event(1),
                  estimator=sg.RODEO(hidden=4))
    sg.factor("f", jnp.sum(z))


def test_error_on_a_categorical_site():
    def program():
        c = sg.sample("c", dist.Categorical(logits=sg.param("l", jnp.zeros(5))),
                      estimator=sg.RODEO())
        sg.factor("f", c.astype(jnp.float32))

    with pytest.raises(sg.SiteError, match="'c'.*RODEO.*Bernoulli") as info:
        params = sg.init_params(0, program)
        jax.eval_shape(lambda p: sg.Expectation(num_particles=2).loss(0, p, program), params)
    assert info.value.site == "c"


def test_error_with_one_particle():
    params = sg.init_params(0, _bernoulli_program)
    with pytest.raises(sg.SiteError, match="'z'.*num_particles >= 2") as info:
        jax.eval_shape(lambda p: sg.Expectation(num_particles=1).loss(0, p, _bernoulli_program),
                       params)
    assert info.value.site == "z"


def test_error_under_iwae():
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=sg.RODEO(hidden=4))
    params = sg.init_params(0, models.mixture_model, guide, x)
    with pytest.raises(sg.SiteError, match="'z'.*RODEO.*multi-sample bound") as info:
        jax.eval_shape(lambda p: sg.IWAE(num_particles=2).loss(0, p, models.mixture_model,
                                                               guide, x), params)
    assert info.value.site == "z"


def test_error_without_its_params():
    params = sg.init_params(0, _bernoulli_program)
    del params["z$beta"], params["z$control_variate"]
    with pytest.raises(sg.SiteError,
                       match=r"'z'.*z\$beta.*z\$control_variate.*sg.init_params") as info:
        jax.eval_shape(lambda p: sg.Expectation(num_particles=2).loss(0, p, _bernoulli_program),
                       params)
    assert info.value.site == "z"


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden": 0}, "hidden"), ({"hidden": 2.5}, "hidden"),
    ({"alpha_init": float("nan")}, "alpha_init"), ({"beta_init": "1"}, "beta_init"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sg.RODEO(**kwargs)


def test_param_labels_put_its_params_on_the_inference_side():
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=sg.RODEO(hidden=4))
    labels = sg.param_labels(models.mixture_model, guide, x)
    assert {labels[f"z${p}"] for p in ("alpha", "beta", "control_variate")} == {"guide"}
