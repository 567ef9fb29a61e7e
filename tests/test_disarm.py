"""DisARM and ARM: unbiased against exact gradients, antithetic pairs, errors, variance."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.errors import SiteError
from scgjax.estimators.base import PARTICLE_AXIS
from scgjax.estimators.disarm import ARM, DisARM
from scgjax.objectives.program import estimate
from tests import models
from tests.stats import assert_unbiased, grad_samples, mean_and_se

# --- a multivariate Bernoulli (.to_event) with logits exactly 0 and a coupled cost ---------

LOGITS = jnp.array([0.0, 0.8, -1.3, 0.0])
W = jnp.array([1.0, -0.7, 0.5, 1.5])


def _f(z):
    return jnp.sin(z @ W) + 0.8 * z[..., 0] * z[..., 3] - 0.3 * z[..., 1]


def event_program(estimator=None):
    z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", LOGITS)).to_event(1),
                  estimator=estimator)
    sg.factor("f", _f(z.astype(jnp.float32)))


def event_exact(params):
    z = jnp.array(list(itertools.product([0.0, 1.0], repeat=LOGITS.shape[0])))
    logp = models.bern_logp(z, params["l"]).sum(-1)
    return jnp.sum(jnp.exp(logp) * _f(z))


# --- an ELBO with a .to_event guide site and a model prior (costs include -log q) -----------

X_OBS = jnp.array([0.4, -1.1])
W_LIK = jnp.array([[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]])


def vec_model():
    z = sg.sample("z", dist.Bernoulli(logits=sg.param("pl", jnp.array(-0.4))).expand([3])
                  .to_event(1))
    sg.sample("x", dist.Normal(z.astype(jnp.float32) @ W_LIK, 1.0).to_event(1), obs=X_OBS)


def vec_guide(estimator=None):
    sg.sample("z", dist.Bernoulli(logits=sg.param("ql", jnp.array([0.0, 0.6, -0.9])))
              .to_event(1), estimator=estimator)


def vec_exact(params):
    z = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))
    lq = models.bern_logp(z, params["ql"]).sum(-1)
    lp = (models.bern_logp(z, params["pl"]).sum(-1)
          + models.normal_logp(X_OBS, z @ W_LIK, 1.0).sum(-1))
    return jnp.sum(jnp.exp(lq) * (lp - lq))


def expectation_samples(fn, params, k, num_samples, seed=0):
    loss = lambda key, p: sg.Expectation(num_particles=k).loss(key, p, fn)
    return grad_samples(loss, params, num_samples, seed)


def elbo_samples(model, guide, params, k, *args, num_samples=4000, seed=0):
    loss = lambda key, p: sg.ELBO(num_particles=k).loss(key, p, model, guide, *args)
    return grad_samples(loss, params, num_samples, seed)


@pytest.mark.parametrize("make, k", [(DisARM, 2), (DisARM, 4), (ARM, 2)])
def test_event_block_unbiased(make, k):
    fn = functools.partial(event_program, make())
    params = sg.init_params(0, fn)
    exact = jax.grad(event_exact)(params)
    assert_unbiased(expectation_samples(fn, params, k, 6000), exact)


@pytest.mark.parametrize("k", [2])
def test_elbo_event_block_unbiased(k):
    guide = functools.partial(vec_guide, DisARM())
    params = sg.init_params(0, vec_model, guide)
    exact = jax.grad(vec_exact)(params)
    assert_unbiased(elbo_samples(vec_model, guide, params, k), exact)


@pytest.mark.parametrize("make, k", [(DisARM, 2), (DisARM, 4), (ARM, 4)])
def test_plate_mixture_unbiased(make, k):
    x = models.MIX_X  # N = 64 data points, one latent each
    guide = functools.partial(models.mixture_guide, estimator=make())
    params = sg.init_params(0, models.mixture_model, guide, x)
    exact = jax.grad(models.mixture_exact)(params, x)
    assert_unbiased(elbo_samples(models.mixture_model, guide, params, k, x), exact)


V = jnp.array([[0.9, -1.4], [0.0, 0.7]])


def _g(z1, z2):
    mix = z1 @ jnp.array([1.0, 2.0]) - z2 @ jnp.array([0.5, 1.5])
    return jnp.cos(mix) + z1[..., 0] * z2[..., 1]


def layered_program(estimator=None):
    c1 = sg.param("c1", jnp.array([0.0, -0.6]))
    z1 = sg.sample("z1", dist.Bernoulli(logits=c1).to_event(1), estimator=estimator)
    z1 = z1.astype(jnp.float32)
    c2 = sg.param("c2", jnp.array([0.4, 0.0]))
    z2 = sg.sample("z2", dist.Bernoulli(logits=z1 @ sg.param("V", V) + c2).to_event(1),
                   estimator=estimator)
    sg.factor("g", _g(z1, z2.astype(jnp.float32)))


def layered_exact(params):
    z = jnp.array(list(itertools.product([0.0, 1.0], repeat=4)))
    z1, z2 = z[:, :2], z[:, 2:]
    logp = (models.bern_logp(z1, params["c1"]).sum(-1)
            + models.bern_logp(z2, z1 @ params["V"] + params["c2"]).sum(-1))
    return jnp.sum(jnp.exp(logp) * _g(z1, z2))


@pytest.mark.parametrize("k", [2, 4])
def test_layered_sites_fall_back_unbiased(k):
    """The pair shares the first layer's logits (DisARM there) but not, in general, the
    second's (its logits depend on the sampled first layer): where they differ the
    estimator falls back to the score function (with a leave-pair-out baseline at K = 4),
    and every gradient stays unbiased."""
    fn = functools.partial(layered_program, DisARM())
    params = sg.init_params(0, fn)
    exact = jax.grad(layered_exact)(params)
    assert_unbiased(expectation_samples(fn, params, k, 8000), exact)


def test_exact_at_zero_logits_for_a_linear_signal():
    """At logits 0 the pair is always (0, 1): DisARM is then exact, sigmoid'(0) (f1 - f0),
    for each plate element (credited with its own cost only)."""
    def program():
        with sg.plate("d", 3):
            z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", jnp.zeros(3))),
                          estimator=DisARM())
            sg.factor("f", jnp.array([0.5, -2.0, 3.0]) * z)

    params = sg.init_params(0, program)
    g = expectation_samples(program, params, 2, 50)["l"]
    np.testing.assert_allclose(g, np.broadcast_to([0.125, -0.5, 0.75], g.shape), rtol=1e-6)


def test_masked_elements_get_no_gradient():
    keep = jnp.array([True, False, True, False])

    def program():
        with sg.plate("d", 4):
            z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", jnp.zeros(4))).mask(keep),
                          estimator=DisARM())
            sg.factor("f", 2.0 * z)

    params = sg.init_params(0, program)
    g = expectation_samples(program, params, 2, 20)["l"]
    np.testing.assert_allclose(g, np.broadcast_to([0.5, 0.0, 0.5, 0.0], g.shape), rtol=1e-6)


# --- the pairs are antithetic --------------------------------------------------------------

def _particle_values(logits, k, num_draws=2000):
    """Values of a DisARM site drawn the way objectives draw them: ``(draws, K, D)``."""
    def program():
        sg.sample("z", dist.Bernoulli(logits=logits).to_event(1), estimator=DisARM())

    def one_particle(key):
        with estimate(num_particles=k):
            tr = sg.handlers.trace(sg.handlers.seed(program, key)).get_trace()
        return tr["z"]["value"]

    def one_draw(key):
        return jax.vmap(one_particle, axis_name=PARTICLE_AXIS)(jax.random.split(key, k))

    keys = jax.random.split(jax.random.key(3), num_draws)
    return np.asarray(jax.jit(jax.vmap(one_draw))(keys))


def test_pairs_are_antithetic():
    logits = jnp.array([0.0, 1.2, -0.7, 0.0, 2.5])
    z = _particle_values(logits, 4)
    assert set(np.unique(z)) <= {0, 1}
    first, second = z[:, :2], z[:, 2:]  # particle k pairs with k + K/2
    # logits 0: u < 1/2 exactly when 1 - u > 1/2, so the pair is always complementary.
    assert np.all(first[..., [0, 3]] + second[..., [0, 3]] == 1)
    # u / 1 - u coupling: never both 0 when sigmoid(alpha) > 1/2, never both 1 when < 1/2,
    # and P(both 1) = max(0, 2 sigmoid(alpha) - 1).
    p = np.asarray(jax.nn.sigmoid(logits))
    assert not np.any((first[..., [1, 4]] == 0) & (second[..., [1, 4]] == 0))
    assert not np.any((first[..., 2] == 1) & (second[..., 2] == 1))
    both, se = mean_and_se(((first == 1) & (second == 1)).reshape(-1, len(p)))
    assert np.all(np.abs(both - np.maximum(0.0, 2 * p - 1)) <= 5 * se + 1e-9)
    # Each particle alone is an exact Bernoulli(sigmoid(alpha)) draw.
    for j in range(4):
        mean, se = mean_and_se(z[:, j])
        assert np.all(np.abs(mean - p) <= 5 * se + 1e-9)
    # The two pairs are independent of each other (different keys).
    assert not np.all(z[:, 0, 1:3] == z[:, 1, 1:3])


def test_outside_an_objective_it_samples_plainly():
    def program():
        return sg.sample("z", dist.Bernoulli(logits=jnp.zeros(200)), estimator=DisARM())

    with estimate(num_particles=2):
        z = sg.handlers.seed(program, 0)()
    assert z.shape == (200,) and 50 < int(z.sum()) < 150


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_particle_count_errors_name_the_site(k):
    fn = functools.partial(event_program, DisARM())
    params = sg.init_params(0, fn)
    with pytest.raises(SiteError, match="'z'.*num_particles"):
        sg.Expectation(num_particles=k).loss(jax.random.key(0), params, fn)


@pytest.mark.parametrize("fn", [dist.Normal(0.0, 1.0), dist.Categorical(logits=jnp.zeros(3)),
                                dist.Poisson(2.0)], ids=["normal", "categorical", "poisson"])
def test_non_bernoulli_is_an_error(fn):
    def program():
        sg.sample("w", fn, estimator=DisARM())

    with pytest.raises(SiteError, match="'w'.*Bernoulli"):
        sg.Expectation(num_particles=2).loss(jax.random.key(0), {}, program)


def test_wrapped_bernoulli_with_probs_is_accepted():
    fn = dist.Bernoulli(probs=jnp.full((2,), 0.3)).expand([4, 2]).mask(True).to_event(2)
    DisARM().validate("z", fn, 2)


# --- variance ----------------------------------------------------------------------------

PLATE_LOGITS = jnp.array([0.0, 0.8, -1.3, 0.0, 2.0])


def plate_program(estimator=None):
    with sg.plate("d", PLATE_LOGITS.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", PLATE_LOGITS)),
                      estimator=estimator)
        sg.factor("f", jnp.sin(2.0 * z + jnp.arange(5.0)) + 3.0)


def test_disarm_variance_below_rloo():
    """At K = 2, one Bernoulli per plate element with its own cost: DisARM's gradient
    variance is below RLOO's (the score function with the other particle as baseline) for
    every element, and zero at logits 0 (the pair is then always (0, 1))."""
    var = {}
    for name, est in [("disarm", DisARM()), ("rloo", sg.RLOO())]:
        fn = functools.partial(plate_program, est)
        params = sg.init_params(0, fn)
        var[name] = np.var(np.asarray(expectation_samples(fn, params, 2, 4000)["l"]), 0)
    assert np.all(var["disarm"] < var["rloo"]), var
    assert var["disarm"].sum() < 0.6 * var["rloo"].sum(), var
    assert np.all(var["disarm"][[0, 3]] < 1e-8), var
