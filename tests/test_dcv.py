"""Double control variates (DCV): unbiasedness against exact gradients by enumeration, the
learning of ``alpha``, the variance against RLOO, and the errors."""

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
from scgjax.dist import constraints
from scgjax.estimators.dcv import DCV
from tests import models
from tests.models import bern_logp, normal_logp
from tests.stats import assert_unbiased

NUM_SAMPLES = 4000
_SAMPLERS: dict = {}


def _sampler(key, objective, model, guide, *args):
    """A jitted ``(keys, params) -> objective gradients``, cached per model and ``K`` so that
    the ``alpha`` values share one compilation."""
    if key not in _SAMPLERS:
        if guide is None:
            loss = lambda k, p: objective.loss(k, p, model, *args)
        else:
            loss = lambda k, p: objective.loss(k, p, model, guide, *args)
        grad = lambda k, p: jax.tree.map(jnp.negative, jax.grad(loss, argnums=1)(k, p))
        _SAMPLERS[key] = jax.jit(jax.vmap(grad, in_axes=(0, None)))
    return _SAMPLERS[key]


def _samples(sampler, params, num_samples=NUM_SAMPLES, seed=0):
    return sampler(jax.random.split(jax.random.key(seed), num_samples), params)


def _program_params(tree: dict) -> dict:
    return {n: v for n, v in tree.items() if "$" not in n}


def _configs(n: int) -> jax.Array:
    return jnp.array(list(itertools.product([0.0, 1.0], repeat=n)))


# --- (a) several latent dimensions in one event block, nonlinear decoder, logits exactly 0 --

D_A, X_A, Y_A = 4, jnp.array([0.5, -1.0, 0.0, 2.0]), jnp.array([1.0, -0.5, 2.0, 0.3, -1.2])
W_A = 0.7 * jax.random.normal(jax.random.key(21), (4, D_A))
W_A = W_A.at[:, 0].set(0.0).at[:, 2].set(0.0)  # with b = 0: logits exactly 0 in dims 0, 2
DEC_A = 1.2 * jax.random.normal(jax.random.key(22), (D_A, 5))


def block_model():
    pz = sg.param("pz", jnp.array([0.3, -0.2, 0.0, 0.5]))
    a = sg.param("A", DEC_A)
    c = sg.param("c", jnp.zeros(5))
    z = sg.sample("z", dist.Bernoulli(logits=pz).to_event(1))
    sg.sample("y", dist.Normal(2.0 * jnp.tanh(z @ a + c), 1.0).to_event(1), obs=Y_A)


def block_guide(alpha_init=0.0):
    w = sg.param("W", W_A)
    b = sg.param("b", jnp.zeros(D_A))
    sg.sample("z", dist.Bernoulli(logits=X_A @ w + b).to_event(1), estimator=DCV(alpha_init))


def block_exact(p):
    z = _configs(D_A)
    lq = bern_logp(z, X_A @ p["W"] + p["b"]).sum(-1)
    lp = (bern_logp(z, p["pz"]).sum(-1)
          + normal_logp(Y_A, 2.0 * jnp.tanh(z @ p["A"] + p["c"]), 1.0).sum(-1))
    return jnp.sum(jnp.exp(lq) * (lp - lq))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_unbiased_event_block(k):
    params = sg.init_params(0, block_model, block_guide)
    assert float(params["z$alpha"]) == 0.0
    exact = jax.grad(block_exact)(_program_params(params))
    assert np.all(np.asarray(X_A @ params["W"] + params["b"])[[0, 2]] == 0.0)
    sampler = _sampler(("block", k), sg.ELBO(num_particles=k), block_model, block_guide)
    for alpha in (0.0, 0.7):
        params["z$alpha"] = jnp.float32(alpha)
        samples = _program_params(_samples(sampler, params))
        assert_unbiased(samples, exact)
        guide_only = ("W", "b")  # the DCV part must have power of its own
        assert_unbiased({n: samples[n] for n in guide_only}, {n: exact[n] for n in guide_only})


# --- (b) one Bernoulli per data point in a plate (the mixture of tests/models.py) ------------

@pytest.mark.parametrize("k", [2, 3, 4])
def test_unbiased_plate_mixture(k):
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=DCV())
    params = sg.init_params(0, models.mixture_model, guide, x)
    exact = jax.grad(models.mixture_exact)(_program_params(params), x)
    sampler = _sampler(("mixture", k), sg.ELBO(num_particles=k), models.mixture_model, guide, x)
    for alpha in (0.0, 0.7):
        params["z$alpha"] = jnp.float32(alpha)
        assert_unbiased(_program_params(_samples(sampler, params)), exact)


# --- (c) an event block inside a plate: the inner product is per plate element -------------

N_C = 32
X_C = np.asarray(jax.random.normal(jax.random.key(31), (N_C, 3)), dtype=np.float32)
Y_C = np.asarray(jax.random.normal(jax.random.key(32), (N_C, 3)) + 0.5, dtype=np.float32)


plated_model = models.block_model
plated_guide = functools.partial(models.block_guide, estimator=DCV())
plated_exact = models.block_exact


def test_unbiased_event_block_in_plate(k=3):
    params = sg.init_params(0, plated_model, plated_guide, X_C, Y_C)
    exact = jax.jit(jax.grad(plated_exact))(_program_params(params), X_C, Y_C)
    sampler = _sampler(("plated", k), sg.ELBO(num_particles=k), plated_model, plated_guide,
                       X_C, Y_C)
    params["z$alpha"] = jnp.float32(0.7)
    samples = _program_params(_samples(sampler, params))
    assert_unbiased(samples, exact)
    assert_unbiased({"V": samples["V"]}, {"V": exact["V"]})


# --- logits that differ between particles: three DCV layers of a sigmoid belief network ----

def test_unbiased_sigmoid_belief_network_all_layers():
    params = models.sbn_init()
    exact = jax.jit(jax.grad(models.sbn_exact))(params, models.SBN_X)
    params.update({f"{h}$alpha": jnp.float32(0.7) for h in ("h1", "h2", "h3")})
    guide = functools.partial(models.sbn_guide, estimator=DCV())
    sampler = _sampler(("sbn", 3), sg.ELBO(num_particles=3), models.sbn_model, guide,
                       models.SBN_X)
    assert_unbiased(_program_params(_samples(sampler, params)), exact)


# --- probs instead of logits ----------------------------------------------------------------

W_P = jnp.array([1.0, -2.0, 0.5])


def probs_program():
    p = sg.param("p", jnp.array([0.3, 0.5, 0.8]), constraints.unit_interval)
    z = sg.sample("z", dist.Bernoulli(probs=p).to_event(1), estimator=DCV(0.5))
    sg.factor("f", jnp.sin(z @ W_P) + z[0] * z[1])


def probs_exact(p):
    probs = jax.nn.sigmoid(p["p"])  # params hold the unconstrained value (the logit)
    z = _configs(3)
    lq = jnp.sum(z * jnp.log(probs) + (1 - z) * jnp.log1p(-probs), -1)
    return jnp.sum(jnp.exp(lq) * (jnp.sin(z @ W_P) + z[:, 0] * z[:, 1]))


def test_unbiased_probs():
    params = sg.init_params(0, probs_program)
    exact = jax.grad(probs_exact)(_program_params(params))
    sampler = _sampler(("probs", 2), sg.Expectation(num_particles=2), probs_program, None)
    assert_unbiased(_program_params(_samples(sampler, params)), exact)


# --- alpha: its gradient, its learning, and the variance against RLOO ----------------------

TOY_D, TOY_T = 200, 0.499


def toy_program(estimator):
    eta = sg.param("eta", jnp.zeros(TOY_D))
    z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=estimator)
    sg.factor("f", -jnp.sum((z - TOY_T) ** 2))


def test_alpha_gradient_is_that_of_the_mean_squared_estimate():
    """Per key, the estimate is ``A + alpha B``; the loss's alpha-gradient must be
    ``+d mean((A + alpha B)^2) / d alpha`` (so that descent reduces the variance), and the
    value of the loss must not depend on alpha."""
    program = functools.partial(toy_program, DCV())
    objective = sg.Expectation(num_particles=3)
    params = sg.init_params(0, program)
    params["eta"] = jnp.linspace(-2.0, 2.0, TOY_D)

    @jax.jit
    def at(alpha, key):
        p = dict(params, **{"z$alpha": jnp.asarray(alpha, jnp.float32)})
        return jax.value_and_grad(objective.loss, argnums=1)(key, p, program)

    for key in jax.random.split(jax.random.key(4), 3):
        (v0, g0), (v1, g1), (v3, g3) = at(0.0, key), at(1.0, key), at(0.3, key)
        assert float(v0) == float(v1) == float(v3)
        estimate = -g3["eta"]
        slope = g0["eta"] - g1["eta"]  # B = estimate(1) - estimate(0)
        expected = 2.0 * jnp.mean(estimate * slope)
        np.testing.assert_allclose(g3["z$alpha"], expected, rtol=1e-4, atol=1e-9)


def _eta_grads(objective, program, params, num_samples=10000, seed=1):
    keys = jax.random.split(jax.random.key(seed), num_samples)
    grad = lambda k: jax.grad(objective.loss, argnums=1)(k, params, program)["eta"]
    return jax.jit(jax.vmap(grad))(keys)


def test_alpha_is_learned_and_beats_rloo_on_the_toy_problem():
    """Titsias & Shi's toy problem: minimise ``E sum_d (z_d - 0.499)^2`` over the logits, with
    ``K = 2``, ``D = 200``; alpha and the logits trained together by Adam."""
    program = functools.partial(toy_program, DCV())
    objective = sg.Expectation(num_particles=2)
    svi = sg.SVI(program, None, optax.adam(0.01), objective)
    result = svi.run(jax.random.key(0), 1000, progress_bar=False)
    params = result.params
    alpha = float(params["z$alpha"])
    assert abs(alpha) > 1e-3  # it moved from 0
    assert float(jnp.mean(params["eta"])) < -0.2  # and the logits learned to prefer z = 0

    dcv = _eta_grads(objective, program, params)
    rloo = _eta_grads(objective, functools.partial(toy_program, sg.RLOO()),
                      {"eta": params["eta"]})
    disarm = _eta_grads(objective, functools.partial(toy_program, sg.DisARM()),
                        {"eta": params["eta"]})
    var_dcv, var_rloo, var_disarm = jnp.var(dcv, 0), jnp.var(rloo, 0), jnp.var(disarm, 0)
    print(f"alpha {alpha:.5f}; mean per-coordinate variance: DCV {float(var_dcv.mean()):.3e}, "
          f"RLOO {float(var_rloo.mean()):.3e}, DisARM {float(var_disarm.mean()):.3e}")
    assert float(var_dcv.mean()) < 0.5 * float(var_rloo.mean())
    assert float(jnp.mean(var_dcv < var_rloo)) > 0.9
    assert float(var_dcv.mean()) < float(var_disarm.mean())
    # Both still estimate the same gradient (the RLOO one at alpha = 0).
    theta = jax.nn.sigmoid(params["eta"])
    exact = (1 - 2 * TOY_T) * theta * (1 - theta)  # d E f / d eta = loss gradient
    assert_unbiased({"eta": dcv}, {"eta": exact}, min_power=0.0)


def test_masked_elements_get_no_score_gradient():
    mask = jnp.arange(6) % 2 == 0

    def program():
        eta = sg.param("eta", jnp.linspace(-1.0, 1.0, 6))
        z = sg.sample("z", dist.Bernoulli(logits=eta).mask(mask).to_event(1),
                      estimator=DCV(0.3))
        sg.factor("f", jnp.sum(jnp.sin(3.0 * z + jnp.arange(6.0))))

    params = sg.init_params(0, program)
    grads = _eta_grads(sg.Expectation(num_particles=3), program, params, 64)
    assert np.all(np.asarray(grads)[:, ~mask] == 0.0)
    assert np.all(np.any(np.asarray(grads)[:, mask] != 0.0, axis=0))


# --- errors -----------------------------------------------------------------------------------

def _bernoulli_program():
    z = sg.sample("z", dist.Bernoulli(logits=sg.param("eta", jnp.zeros(3))).to_event(1),
                  estimator=DCV())
    sg.factor("f", jnp.sum(z))


def test_error_on_a_normal_site():
    def program():
        z = sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0), estimator=DCV())
        sg.factor("f", z)

    params = sg.init_params(0, program)
    with pytest.raises(sg.SiteError, match="'z'.*Bernoulli") as info:
        sg.Expectation(num_particles=2).loss(0, params, program)
    assert info.value.site == "z"


def test_error_with_one_particle():
    params = sg.init_params(0, _bernoulli_program)
    with pytest.raises(sg.SiteError, match="'z'.*num_particles >= 2") as info:
        sg.Expectation(num_particles=1).loss(0, params, _bernoulli_program)
    assert info.value.site == "z"


def test_error_without_alpha_param():
    with pytest.raises(sg.SiteError, match=r"'z'.*z\$alpha.*sg.init_params") as info:
        jax.eval_shape(lambda p: sg.Expectation(num_particles=2).loss(0, p, _bernoulli_program),
                       {"eta": jnp.zeros(3)})
    assert info.value.site == "z"
