"""Gumbel-softmax / Concrete relaxations: what they estimate, their bias, their values."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as nd
import pytest
from jax.scipy.special import gammaln

import scgjax as sg
from scgjax import dist
from scgjax.errors import SiteError
from scgjax.estimators.relaxation import (
    GumbelSoftmax,
    OneHotCategorical,
    RelaxedOneHotCategorical,
    StraightThrough,
)
from scgjax.objectives.program import estimate
from tests import models
from tests.stats import assert_unbiased, grad_samples, mean_and_se

# --- a small Bernoulli block with a smooth cost ----------------------------------------------

LOGITS = jnp.array([0.0, 1.0, -0.5])
W = jnp.array([1.0, -0.8, 0.6])


def _f(z):
    return jnp.sin(z @ W + 0.3) + 0.5 * (z[..., 0] - 0.3) ** 2 * z[..., 2]


def block_program(estimator=None):
    z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", LOGITS)).to_event(1),
                  estimator=estimator)
    sg.factor("f", _f(z))


def block_exact(params):
    z = jnp.array(list(itertools.product([0.0, 1.0], repeat=LOGITS.shape[0])))
    return jnp.sum(jnp.exp(models.bern_logp(z, params["l"]).sum(-1)) * _f(z))


def expectation_samples(fn, num_samples, k=1, seed=0):
    params = sg.init_params(0, fn)
    loss = lambda key, p: sg.Expectation(num_particles=k).loss(key, p, fn)
    return params, grad_samples(loss, params, num_samples, seed)


def test_bias_shrinks_with_the_temperature():
    """GumbelSoftmax is biased for the discrete gradient; the bias falls with tau."""
    exact = np.asarray(jax.grad(block_exact)({"l": LOGITS})["l"])
    bias, se = {}, {}
    for tau in (2.0, 1.0, 0.5, 0.2):
        _, samples = expectation_samples(functools.partial(block_program, GumbelSoftmax(tau)),
                                         20000)
        mean, err = mean_and_se(samples["l"])
        bias[tau], se[tau] = np.linalg.norm(mean - exact), np.linalg.norm(err)
    # Measured (seed 0): 0.147, 0.081, 0.031, 0.007 with SE 0.0002, 0.0007, 0.0016, 0.0034.
    assert bias[2.0] > 50 * se[2.0], (bias, se)  # clearly biased at a high temperature
    for hi, lo in ((2.0, 1.0), (1.0, 0.5), (0.5, 0.2)):
        assert bias[hi] - bias[lo] > 4 * (se[hi] + se[lo]), (bias, se)
    assert bias[0.2] < 0.1 * bias[2.0], (bias, se)


def _relaxed_quadrature(fun, num=20000):
    """``E_u[fun(logit(u))]`` for ``u ~ U(0, 1)`` by the midpoint rule: the expectation over a
    standard logistic variable, computed without sampling."""
    u = (jnp.arange(num) + 0.5) / num
    return jnp.mean(fun(jnp.log(u) - jnp.log1p(-u)))


def test_gumbel_softmax_is_unbiased_for_the_relaxed_objective():
    """What it does estimate: the gradient of E_{y ~ BinConcrete(alpha, tau)}[f(y)]."""
    tau = 0.7

    def program():
        with sg.plate("d", 2):
            y = sg.sample("y", dist.Bernoulli(logits=sg.param("l", jnp.array([0.0, -0.8]))),
                          estimator=GumbelSoftmax(tau))
            sg.factor("f", jnp.cos(2.0 * y) + y**3)

    def relaxed_objective(params):
        def per_dim(alpha):
            y = lambda logistic: jax.nn.sigmoid((alpha + logistic) / tau)
            return _relaxed_quadrature(lambda l_: jnp.cos(2.0 * y(l_)) + y(l_) ** 3)

        return jax.vmap(per_dim)(params["l"]).sum()

    params, samples = expectation_samples(program, 8000)
    assert_unbiased(samples, jax.grad(relaxed_objective)(params))


def test_relaxed_elbo_scores_the_model_site_under_the_relaxed_density():
    """In an ELBO the model's site of the same name is relaxed too: the gradient is that of
    E_q[log p_tau(y) + log N(x | w y, 1) - log q_tau(y)] (the relaxed ELBO)."""
    tau, x = 1.0, 0.8

    def model():
        y = sg.sample("y", dist.Bernoulli(logits=sg.param("pl", jnp.array(-0.3))))
        sg.sample("x", dist.Normal(sg.param("w", jnp.array(1.5)) * y, 1.0), obs=x)

    def guide():
        sg.sample("y", dist.Bernoulli(logits=sg.param("ql", jnp.array(0.0))),
                  estimator=GumbelSoftmax(tau))

    def relaxed_elbo(p):
        def integrand(logistic):
            y = jax.nn.sigmoid((p["ql"] + logistic) / tau)
            return (nd.RelaxedBernoulliLogits(tau, p["pl"]).log_prob(y)
                    + models.normal_logp(x, p["w"] * y, 1.0)
                    - nd.RelaxedBernoulliLogits(tau, p["ql"]).log_prob(y))

        return _relaxed_quadrature(integrand)

    params = sg.init_params(0, model, guide)
    loss = lambda key, p: sg.ELBO().loss(key, p, model, guide)
    assert_unbiased(grad_samples(loss, params, 8000), jax.grad(relaxed_elbo)(params))
    values = jax.jit(jax.vmap(lambda k: -loss(k, params)))(
        jax.random.split(jax.random.key(2), 8000))
    assert_unbiased({"v": values}, {"v": relaxed_elbo(params)}, min_power=0.0)


# --- values -----------------------------------------------------------------------------

def _values(estimator, fn, num=4000):
    def program():
        return sg.sample("z", fn, estimator=estimator)

    def one(key):  # drawn the way objectives draw: the estimator's transform and sample
        with estimate(num_particles=1):
            return sg.handlers.seed(program, key)()

    return np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(7), num)))


def test_relaxed_bernoulli_values_lie_in_the_open_interval():
    z = _values(GumbelSoftmax(0.3), dist.Bernoulli(logits=jnp.array([0.0, 2.0, -3.0]))
                .to_event(1))
    assert z.shape == (4000, 3) and np.all((z > 0) & (z < 1))
    assert np.mean((z > 0.05) & (z < 0.95)) > 0.05  # not all hard


def test_relaxed_categorical_values_lie_on_the_simplex():
    logits = jnp.log(jnp.array([0.2, 0.5, 0.3]))
    z = _values(GumbelSoftmax(0.5), dist.Categorical(logits=logits).expand([2]))
    assert z.shape == (4000, 2, 3) and np.all(z >= 0)
    np.testing.assert_allclose(z.sum(-1), 1.0, rtol=1e-5)
    # Gumbel-max: the argmax of the relaxed value is an exact categorical draw.
    freq = np.mean(np.argmax(z, -1)[..., None] == np.arange(3), axis=(0, 1))
    assert np.all(np.abs(freq - np.exp(logits)) < 5 * np.sqrt(0.25 / 8000))


@pytest.mark.parametrize("fn", [dist.Bernoulli(logits=jnp.array([0.0, 1.5, -2.0])).to_event(1),
                                OneHotCategorical(logits=jnp.array([0.3, -1.0, 0.0])),
                                dist.Categorical(logits=jnp.zeros(4)).expand([2])],
                         ids=["bernoulli", "onehot", "categorical"])
def test_straight_through_gives_hard_values(fn):
    z = _values(StraightThrough(0.5), fn)
    assert set(np.unique(z)) <= {0.0, 1.0}
    if z.shape[-1] in (3, 4) and not isinstance(fn, nd.Independent):
        assert np.all(z.sum(-1) == 1)  # one-hot


def test_straight_through_gradient_is_the_relaxed_sample_s():
    fn = StraightThrough(0.5).transform_fn(dist.Bernoulli(logits=jnp.zeros(3)))
    relaxed = GumbelSoftmax(0.5).transform_fn(dist.Bernoulli(logits=jnp.zeros(3)))
    key = jax.random.key(3)

    def grad_of(d_fn, logits):
        return jax.grad(lambda a: jnp.sum(d_fn(a).rsample(key) * jnp.arange(1.0, 4.0)))(logits)

    st = grad_of(lambda a: StraightThrough(0.5).transform_fn(dist.Bernoulli(logits=a)),
                 jnp.zeros(3))
    rel = grad_of(lambda a: GumbelSoftmax(0.5).transform_fn(dist.Bernoulli(logits=a)),
                  jnp.zeros(3))
    np.testing.assert_allclose(st, rel, rtol=1e-6)
    hard = np.asarray(fn.rsample(key))
    np.testing.assert_array_equal(hard, np.asarray(relaxed.rsample(key)) > 0.5)


def test_straight_through_loss_value_is_the_discrete_elbo():
    """ST scores the hard value with the discrete log-masses: the loss value is an unbiased
    estimate of the discrete ELBO (while its gradient is biased)."""
    x = models.MIX_X[:8]
    mu = jnp.array([-1.0, 1.0])

    def model(x):
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Bernoulli(logits=sg.param("prior_logit", jnp.array(0.0))))
            sg.sample("x", dist.Normal(mu[0] + (mu[1] - mu[0]) * z, 1.0), obs=x)

    def guide(x):
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Bernoulli(logits=sg.param("a", jnp.array(0.5)) * x),
                      estimator=StraightThrough(0.5))

    params = sg.init_params(0, model, guide, x)
    exact = models.mixture_exact({"a": params["a"], "b": 0.0, "mu": mu,
                                  "prior_logit": params["prior_logit"]}, x)
    keys = jax.random.split(jax.random.key(4), 8000)
    values = jax.jit(jax.vmap(lambda k: -sg.ELBO().loss(k, params, model, guide, x)))(keys)
    assert_unbiased({"elbo": values}, {"elbo": exact}, min_power=0.0)
    g = jax.jit(jax.grad(lambda p: sg.ELBO(num_particles=4).loss(
        jax.random.key(0), p, model, guide, x)))(params)
    assert all(np.all(np.isfinite(v)) for v in g.values())


# --- the Concrete density -----------------------------------------------------------------

def _concrete_density(y, logits, tau):
    """Maddison et al. 2017, Definition 1, as written (products, not logs)."""
    n = y.shape[-1]
    a = jnp.exp(logits)
    return (jnp.exp(gammaln(n)) * tau ** (n - 1)
            * jnp.prod(a * y ** (-tau - 1) / jnp.sum(a * y ** (-tau), -1, keepdims=True), -1))


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_concrete_log_prob_matches_the_formula(tau):
    logits = jnp.array([0.4, -1.0, 0.0, 1.2])
    d = RelaxedOneHotCategorical(tau, logits=logits)
    y = d.rsample(jax.random.key(0), (50,))
    y = jnp.clip(y, 1e-6)
    y = y / y.sum(-1, keepdims=True)
    np.testing.assert_allclose(d.log_prob(y), jnp.log(_concrete_density(y, logits, tau)),
                               rtol=2e-4, atol=2e-4)
    # Invariant to a shift of the logits (only the softmax matters).
    np.testing.assert_allclose(RelaxedOneHotCategorical(tau, logits=logits + 3.0).log_prob(y),
                               d.log_prob(y), rtol=1e-5, atol=1e-5)


def test_two_class_concrete_is_the_binary_concrete_and_integrates_to_one():
    tau, a = 0.8, 0.6
    y = jnp.linspace(1e-4, 1 - 1e-4, 20001)
    two = jnp.stack([y, 1 - y], -1)
    lp = RelaxedOneHotCategorical(tau, logits=jnp.array([a, 0.0])).log_prob(two)
    np.testing.assert_allclose(lp, nd.RelaxedBernoulliLogits(tau, a).log_prob(y), rtol=1e-4,
                               atol=1e-4)
    assert abs(float(jnp.trapezoid(jnp.exp(lp), y)) - 1.0) < 2e-3


def test_one_hot_categorical():
    logits = jnp.array([[0.3, -1.0, 0.0], [2.0, 0.0, 0.0]])
    d = OneHotCategorical(logits=logits)
    assert d.batch_shape == (2,) and d.event_shape == (3,)
    support = d.enumerate_support()
    np.testing.assert_allclose(jnp.exp(d.log_prob(support)).sum(0), 1.0, rtol=1e-6)
    z = d.sample(jax.random.key(0), (4000,))
    assert np.all(z.sum(-1) == 1)
    freq, se = mean_and_se(z)
    assert np.all(np.abs(freq - jax.nn.softmax(logits)) < 5 * se + 1e-9)


def test_categorical_relaxation_bias_shrinks():
    c = jnp.array([1.0, -2.0, 0.5])

    def program(estimator):
        z = sg.sample("z", OneHotCategorical(logits=sg.param("l", jnp.array([0.0, 0.5, -0.3]))),
                      estimator=estimator)
        sg.factor("f", jnp.sin(z @ c))

    p = jax.nn.softmax(jnp.array([0.0, 0.5, -0.3]))
    fc = jnp.sin(c)
    exact = np.asarray(p * (fc - jnp.sum(p * fc)))
    bias = {}
    for tau in (2.0, 0.2):
        _, s = expectation_samples(functools.partial(program, GumbelSoftmax(tau)), 20000)
        mean, se = mean_and_se(s["l"])
        bias[tau] = np.linalg.norm(mean - exact)
        assert np.linalg.norm(se) < 0.1 * bias[2.0]
    assert bias[0.2] < 0.25 * bias[2.0], bias


# --- errors ---------------------------------------------------------------------------------

def test_non_discrete_site_is_an_error():
    def program():
        sg.sample("w", dist.Normal(0.0, 1.0), estimator=GumbelSoftmax(1.0))

    with pytest.raises(SiteError, match="'w'.*Bernoulli"):
        sg.Expectation().loss(jax.random.key(0), {}, program)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_temperature_must_be_positive(tau):
    with pytest.raises(ValueError, match="temperature"):
        GumbelSoftmax(tau)


def test_straight_through_is_the_straight_through_form():
    assert StraightThrough(0.5).straight_through and StraightThrough(0.5).temperature == 0.5
    assert isinstance(StraightThrough(0.5), GumbelSoftmax)
    with pytest.raises(ValueError):
        StraightThrough(0.5, straight_through=False)
