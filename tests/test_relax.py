"""REBAR and RELAX: unbiasedness against exact gradients by enumeration (logits exactly 0
among the cases, a plate, ELBO and Expectation), the variance on Tucker et al.'s toy problem
after training the control variate, and the errors."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
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


class ElementCV(nn.Module):
    """A control variate applied to each element of ``z`` (and its input) separately."""

    @nn.compact
    def __call__(self, z, x=None):
        h = z[..., None] if x is None else jnp.stack([z, x], -1)
        return nn.Dense(1)(nn.tanh(nn.Dense(8)(h)))[..., 0]


class BlockCV(nn.Module):
    """A control variate of a whole event block ``z`` (no plate): one value."""

    @nn.compact
    def __call__(self, z):
        return nn.Dense(1)(nn.tanh(nn.Dense(8)(z)))


def _samples(objective, program_args, params, num_samples=NUM_SAMPLES, seed=0):
    loss = lambda k, p: objective.loss(k, p, *program_args)  # noqa: E731
    grad = lambda k: jax.tree.map(jnp.negative, jax.grad(loss, argnums=1)(k, params))  # noqa: E731
    g = jax.jit(jax.vmap(grad))(jax.random.split(jax.random.key(seed), num_samples))
    return {n: v for n, v in g.items() if "$" not in n}


def _program_params(tree: dict) -> dict:
    return {n: v for n, v in tree.items() if "$" not in n}


# --- Expectation, an event block of three Bernoullis, a nonlinear cost, a logit exactly 0 --

W = jnp.array([1.0, -2.0, 0.5])


def block_program(estimator):
    eta = sg.param("eta", jnp.array([0.0, 1.0, -1.5]))
    z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=estimator)
    sg.factor("f", jnp.sin(z @ W) + 2.0 * z[0] * z[1])


def block_exact(p):
    z = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))
    lq = models.bern_logp(z, p["eta"]).sum(-1)
    return jnp.sum(jnp.exp(lq) * (jnp.sin(z @ W) + 2.0 * z[:, 0] * z[:, 1]))


@pytest.mark.parametrize("estimator,k", [(sg.REBAR(), 2), (sg.RELAX(BlockCV()), 1),
                                         (sg.RELAX(BlockCV()), 3)],
                         ids=["rebar-k2", "relax-k1", "relax-k3"])
def test_unbiased_expectation_block(estimator, k):
    program = functools.partial(block_program, estimator)
    params = sg.init_params(0, program)
    if "z$eta" in params:  # a control variate that is far from 0: its part must cancel
        params["z$eta"], params["z$log_temperature"] = jnp.float32(0.7), jnp.float32(-1.0)
    exact = jax.grad(block_exact)(_program_params(params))
    assert_unbiased(_samples(sg.Expectation(num_particles=k), (program,), params), exact)


# --- ELBO, one Bernoulli per data point in a plate (logits exactly 0 at x = 0 offsets) -----

@pytest.mark.parametrize("estimator", [sg.REBAR(temperature_init=0.3, eta_init=0.8),
                                       sg.RELAX(ElementCV(), inputs=models.MIX_X)],
                         ids=["rebar", "relax-inputs"])
def test_unbiased_elbo_plate(estimator):
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=estimator)
    params = sg.init_params(0, models.mixture_model, guide, x)
    assert float(params["b"]) == 0.0
    exact = jax.grad(models.mixture_exact)(_program_params(params), x)
    samples = _samples(sg.ELBO(num_particles=2), (models.mixture_model, guide, x), params)
    assert_unbiased(samples, exact)
    assert_unbiased({n: samples[n] for n in ("a", "b")}, {n: exact[n] for n in ("a", "b")})


# --- Tucker et al.'s toy problem: f(b) = (b - t)^2, one Bernoulli with logit theta ----------

T = 0.45


def toy(estimator):
    theta = sg.param("theta", jnp.array(0.0))
    b = sg.sample("b", dist.Bernoulli(logits=theta), estimator=estimator)
    sg.factor("f", -((b - T) ** 2))


def _train_control_variate(estimator, k, steps=500, lr=0.02):
    """Adam on the estimator's parameters only (theta fixed at 0), by the variance term."""
    program, objective = functools.partial(toy, estimator), sg.Expectation(num_particles=k)
    params = sg.init_params(0, program)
    cv = {n: v for n, v in params.items() if "$" in n}
    opt = optax.adam(lr)

    def step(carry, key):
        cv, state = carry
        g = jax.grad(objective.loss, argnums=1)(key, {**params, **cv}, program)
        updates, state = opt.update({n: g[n] for n in cv}, state)
        return (optax.apply_updates(cv, updates), state), None

    (cv, _), _ = jax.jit(lambda c: jax.lax.scan(
        step, c, jax.random.split(jax.random.key(1), steps)))((cv, opt.init(cv)))
    return program, objective, {**params, **cv}


def _theta_grads(program, objective, params, n=20000):
    keys = jax.random.split(jax.random.key(7), n)
    g = jax.jit(jax.vmap(
        lambda key: -jax.grad(objective.loss, argnums=1)(key, params, program)["theta"]))(keys)
    g = np.asarray(g, np.float64)
    sq = (g - g.mean()) ** 2
    return g, sq.mean(), sq.std() / np.sqrt(n)  # samples, variance, its standard error


def test_variance_ordering_on_the_toy_problem():
    exact = 0.25 * (T**2 - (1 - T) ** 2)  # d/d theta E[-(b - t)^2] at theta = 0
    sf = _theta_grads(functools.partial(toy, sg.ScoreFunction()), sg.Expectation(), {"theta":
                                                                                      0.0})
    rloo = _theta_grads(functools.partial(toy, sg.RLOO()), sg.Expectation(num_particles=2),
                        {"theta": 0.0})
    rebar = _theta_grads(*_train_control_variate(sg.REBAR(), 2))
    relax = _theta_grads(*_train_control_variate(sg.RELAX(ElementCV()), 1))
    print(f"variance: SF (K=1) {sf[1]:.3e}, RLOO (K=2) {rloo[1]:.3e}, REBAR (K=2) {rebar[1]:.3e}, "
          f"RELAX (K=1) {relax[1]:.3e}")
    for g, _, _ in (sf, rloo, rebar, relax):
        assert_unbiased({"theta": g}, {"theta": np.float64(exact)}, min_power=0.0)

    def below(a, b, z=4.0):  # var(a) < var(b) by more than z standard errors of the difference
        assert a[1] + z * np.hypot(a[2], b[2]) < b[1], (a[1], b[1])

    below(relax, rebar)
    # REBAR with K = 2 against the score function averaged over two independent samples
    below(rebar, (None, sf[1] / 2, sf[2] / 2))
    below(relax, rloo)  # one relaxed sample beats the leave-one-out pair


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", [sg.REBAR(), sg.RELAX(ElementCV())], ids=["rebar", "relax"])
def test_error_on_a_categorical_site(estimator):
    def program():
        c = sg.sample("c", dist.Categorical(logits=sg.param("l", jnp.zeros(3))),
                      estimator=estimator)
        sg.factor("f", c.astype(jnp.float32))

    with pytest.raises(sg.SiteError, match="'c'.*Bernoulli") as info:
        params = sg.init_params(0, program)
        sg.Expectation(num_particles=2).loss(0, params, program)
    assert info.value.site == "c"


@pytest.mark.parametrize("estimator", [sg.REBAR(), sg.RELAX(ElementCV())], ids=["rebar", "relax"])
def test_error_under_iwae(estimator):
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=estimator)
    params = sg.init_params(0, models.mixture_model, guide, x)
    with pytest.raises(sg.SiteError, match="'z'.*multi-sample bound") as info:
        sg.IWAE(num_particles=2).loss(0, params, models.mixture_model, guide, x)
    assert info.value.site == "z"


def test_rebar_errors():
    program = functools.partial(toy, sg.REBAR())
    params = sg.init_params(0, program)
    assert sorted(params) == ["b$eta", "b$log_temperature", "theta"]
    with pytest.raises(sg.SiteError, match="'b'.*num_particles >= 2"):
        sg.Expectation(num_particles=1).loss(0, params, program)
    with pytest.raises(sg.SiteError, match=r"'b'.*b\$eta.*sg.init_params"):
        sg.Expectation(num_particles=2).loss(0, {"theta": jnp.zeros(())}, program)
    with pytest.raises(ValueError, match="temperature_init"):
        sg.REBAR(temperature_init=0.0)
    with pytest.raises(TypeError, match="instance"):
        sg.RELAX(ElementCV)


def test_variance_term_changes_no_value_and_trains_only_its_parameters():
    program = functools.partial(toy, sg.RELAX(ElementCV()))
    params = sg.init_params(0, program)
    objective = sg.Expectation(num_particles=2)
    loss, grads = jax.value_and_grad(objective.loss, argnums=1)(0, params, program)
    plain = sg.Expectation(num_particles=2).loss(0, {"theta": params["theta"]},
                                                 functools.partial(toy, sg.RLOO()))
    assert float(loss) == pytest.approx(float(plain))
    cv_grads = jax.tree.leaves(grads["b$control_variate"])
    assert any(float(jnp.abs(g).sum()) > 0 for g in cv_grads)
