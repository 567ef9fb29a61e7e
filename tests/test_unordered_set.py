"""UnorderedSet (Kool, van Hoof & Welling 2020) and SumAndSample: unbiased against exact
enumeration, exact at K = all classes, samples without replacement, variance below RLOO's,
errors."""

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
from scgjax.estimators.unordered_set import set_weights
from scgjax.objectives.program import estimate
from tests.stats import assert_unbiased, mean_and_se

# --- a plate of two 5-class Categorical sites, one with logits exactly 0 (uniform) ----------

LOGITS = jnp.array([[0.0, 0.0, 0.0, 0.0, 0.0], [1.2, -0.4, 0.3, -1.5, 0.6]])
F = jnp.array([[1.0, -2.0, 0.5, 3.0, -1.0], [2.0, 0.0, -3.0, 1.5, 4.0]])


def plate_program(estimator=None):
    with sg.plate("n", 2):
        z = sg.sample("z", dist.Categorical(logits=sg.param("l", LOGITS)), estimator=estimator)
        sg.factor("f", F[jnp.arange(2), z])


def plate_exact(params):
    return jnp.sum(jax.nn.softmax(params["l"], -1) * F)


@functools.cache
def _plate_samples(estimator, k, num_samples=4000):
    """Cached: the unbiasedness and the variance tests share one compiled run."""
    fn = functools.partial(plate_program, estimator)
    params = sg.init_params(0, fn)
    return params, *_samples(fn, params, k, num_samples)


def _samples(fn, params, k, num_samples, seed=0):
    obj = sg.Expectation(num_particles=k)
    keys = jax.random.split(jax.random.key(seed), num_samples)
    val_grad = jax.jit(jax.vmap(lambda key: jax.value_and_grad(obj.loss, argnums=1)(
        key, params, fn)))
    value, grad = val_grad(keys)
    return -np.asarray(value), jax.tree.map(lambda g: -np.asarray(g), grad)


@pytest.mark.parametrize("k", [2, 3])
def test_plate_unbiased_gradient_and_value(k):
    params, value, grad = _plate_samples(sg.UnorderedSet(), k)
    assert_unbiased(grad, jax.grad(plate_exact)(params))
    mean, se = mean_and_se(value)
    assert abs(mean - float(plate_exact(params))) <= 5 * se + 1e-5, (mean, se)


def test_all_classes_is_exact():
    """K = 5 = all classes: the weights are p, the baseline E f, variance 0."""
    params, value, grad = _plate_samples(sg.UnorderedSet(), 5, 64)
    exact = jax.grad(plate_exact)(params)["l"]
    np.testing.assert_allclose(grad["l"], np.broadcast_to(exact, grad["l"].shape), atol=2e-5)
    np.testing.assert_allclose(value, float(plate_exact(params)), atol=2e-5)
    assert np.all(np.var(grad["l"], 0) < 1e-9)


def test_set_weights_sum_to_one_and_match_brute_force():
    p = np.array([0.1, 0.25, 0.05, 0.4, 0.2])
    s = [3, 0, 2]
    rest = 1.0 - p[s].sum()

    def set_prob(items, probs):  # probability of the unordered set, by its orderings
        total = 0.0
        for order in itertools.permutations(items):
            mass, prob = 1.0, 1.0
            for x in order:
                prob *= probs[x] / mass
                mass -= probs[x]
            total += prob
        return total

    def without(e):
        q = p.copy()
        q[list(e)] = 0.0
        return q / q.sum()

    w, m = set_weights(jnp.log(jnp.asarray(p[s])), jnp.log(jnp.asarray(rest)))
    ps = set_prob(s, p)
    for i, a in enumerate(s):
        others = [x for x in s if x != a]
        np.testing.assert_allclose(w[i], p[a] * set_prob(others, without([a])) / ps, rtol=1e-5)
        for j, b in enumerate(s):
            r = 1.0 if a == b else (set_prob([x for x in others if x != b], without([a, b]))
                                    / set_prob(others, without([a])))
            np.testing.assert_allclose(m[i, j], p[b] * r, rtol=1e-5)
    np.testing.assert_allclose(float(w.sum()), 1.0, rtol=1e-6)


# --- an ELBO: a Categorical guide site in a plate, its own cost -log q included ------------

X = jnp.array([0.3, -1.2, 2.1])
MU = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0])
PRIOR = jnp.log(jnp.array([0.1, 0.3, 0.2, 0.25, 0.15]))


def elbo_model():
    with sg.plate("n", 3):
        z = sg.sample("z", dist.Categorical(logits=PRIOR))
        sg.sample("x", dist.Normal(MU[z], 1.0), obs=X)


def elbo_guide(estimator=None):
    ql = sg.param("ql", jnp.zeros((3, 5)).at[1].set(jnp.array([0.5, -0.3, 1.1, 0.0, -0.8])))
    with sg.plate("n", 3):
        sg.sample("z", dist.Categorical(logits=ql), estimator=estimator)


def elbo_exact(params):
    lq = jax.nn.log_softmax(params["ql"], -1)
    lp = jax.nn.log_softmax(PRIOR) + dist.Normal(MU, 1.0).log_prob(X[:, None])
    return jnp.sum(jnp.exp(lq) * (lp - lq))


def test_elbo_unbiased():
    guide = functools.partial(elbo_guide, sg.UnorderedSet())
    params = sg.init_params(0, elbo_model, guide)
    loss = lambda key, p: sg.ELBO(num_particles=3).loss(key, p, elbo_model, guide)
    keys = jax.random.split(jax.random.key(5), 3000)
    value, grad = jax.jit(jax.vmap(lambda key: jax.value_and_grad(loss, argnums=1)(
        key, params)))(keys)
    assert_unbiased(jax.tree.map(lambda g: -g, grad), jax.grad(elbo_exact)(params))
    values = -np.asarray(value)
    mean, se = mean_and_se(values)
    assert abs(mean - float(elbo_exact(params))) <= 5 * se + 1e-5, (mean, se)


# --- costs downstream weighted: the model's parameters and the sites below ------------------
# z ~ Categorical (the set site) in a plate; below it in the guide u | z ~ Normal (pathwise) and
# b | z ~ Bernoulli (RLOO); the likelihood depends on a model parameter mu. With the plain
# particle average (the estimator's own term only) the gradients of mu, of u's guide params
# and of b's logits would be biased without replacement.

BIAS = jnp.array([0.6, -0.4, 0.2, 1.0, -1.1])


def below_model():
    mu = sg.param("mu", MU)
    with sg.plate("n", 3):
        z = sg.sample("z", dist.Categorical(logits=PRIOR))
        u = sg.sample("u", dist.Normal(0.0, 1.0))
        b = sg.sample("b", dist.Bernoulli(probs=0.3))
        sg.sample("x", dist.Normal(mu[z] + u + 0.5 * b, 1.0), obs=X)


def below_guide(estimator=None):
    ql = sg.param("ql", jnp.zeros((3, 5)).at[1].set(jnp.array([0.5, -0.3, 1.1, 0.0, -0.8])))
    m = sg.param("m", jnp.array([0.3, -0.2, 0.0, 0.4, -0.6]))
    log_s = sg.param("log_s", -0.3)
    bl = sg.param("bl", BIAS)
    with sg.plate("n", 3):
        z = sg.sample("z", dist.Categorical(logits=ql), estimator=estimator)
        sg.sample("u", dist.Normal(m[z], jnp.exp(log_s)))
        sg.sample("b", dist.Bernoulli(logits=bl[z]), estimator=sg.RLOO())


def below_exact(params):
    """The ELBO in closed form: z and b summed, u's Gaussian expectations exact."""
    lq = jax.nn.log_softmax(params["ql"], -1)  # (3, 5)
    m, s2 = params["m"], jnp.exp(2 * params["log_s"])
    qb = jax.nn.sigmoid(params["bl"])  # (5,)
    total = jax.nn.log_softmax(PRIOR) - lq + 0.5 * jnp.log(2 * jnp.pi * jnp.e * s2)
    total = total - 0.5 * jnp.log(2 * jnp.pi) - 0.5 * (m ** 2 + s2)  # E log N(u; 0, 1)
    for b, pb, prior_b in [(0.0, 1 - qb, 0.7), (1.0, qb, 0.3)]:
        lik = -0.5 * jnp.log(2 * jnp.pi) - 0.5 * ((X[:, None] - params["mu"] - m - 0.5 * b) ** 2
                                                  + s2)
        total = total + pb * (lik + jnp.log(prior_b) - jnp.log(pb))
    return jnp.sum(jnp.exp(lq) * total)


@pytest.mark.parametrize("est, k", [(sg.UnorderedSet(), 3), (sg.SumAndSample(2), 3)],
                         ids=["unordered_set", "sum_and_sample"])
def test_costs_downstream_are_weighted_unbiased(est, k):
    guide = functools.partial(below_guide, est)
    params = sg.init_params(0, below_model, guide)
    loss = lambda key, p: sg.ELBO(num_particles=k).loss(key, p, below_model, guide)
    keys = jax.random.split(jax.random.key(7), 4000)
    value, grad = jax.jit(jax.vmap(lambda key: jax.value_and_grad(loss, argnums=1)(
        key, params)))(keys)
    assert_unbiased(jax.tree.map(lambda g: -g, grad), jax.grad(below_exact)(params))
    mean, se = mean_and_se(-np.asarray(value))
    assert abs(mean - float(below_exact(params))) <= 5 * se + 1e-5, (mean, se)


def test_estimators_that_average_the_particles_are_refused_below():
    def guide():
        with sg.plate("n", 3):
            z = sg.sample("z", dist.Categorical(logits=jnp.zeros(5)),
                          estimator=sg.UnorderedSet())
            sg.sample("u", dist.Normal(MU[z], 1.0))
            sg.sample("b", dist.Bernoulli(logits=BIAS[z]), estimator=sg.DisARM())

    params = sg.init_params(0, below_model, guide)
    with pytest.raises(SiteError, match="'b'.*DisARM.*downstream of the site 'z'.*RLOO"):
        sg.ELBO(num_particles=2).loss(jax.random.key(0), params, below_model, guide)

    def beside():  # b does not depend on z, but the likelihood depends on both
        with sg.plate("n", 3):
            sg.sample("z", dist.Categorical(logits=jnp.zeros(5)), estimator=sg.UnorderedSet())
            sg.sample("u", dist.Normal(0.0, 1.0))
            sg.sample("b", dist.Bernoulli(logits=0.3), estimator=sg.DisARM())

    with pytest.raises(SiteError, match="'b'.*DisARM.*downstream of the site 'z'"):
        sg.ELBO(num_particles=2).loss(jax.random.key(0), params, below_model, beside)


def test_cost_outside_the_plate_is_refused():
    def program():
        with sg.plate("n", 3):
            z = sg.sample("z", dist.Categorical(logits=jnp.zeros(5)),
                          estimator=sg.UnorderedSet())
        sg.factor("f", jnp.sum(MU[z]) ** 2)  # all of the plate's elements at once

    with pytest.raises(SiteError, match="'z'.*plate 'n'.*'f'.*outside"):
        sg.Expectation(num_particles=2).loss(jax.random.key(0), {}, program)


# --- a site whose logits depend on an i.i.d. continuous site: per-element RLOO fallback -----

TABLE = jnp.array([1.0, -2.0, 0.5, 3.0])
GH_X, GH_W = np.polynomial.hermite_e.hermegauss(60)


def continuous_parent(estimator=None):
    u = sg.sample("u", dist.Normal(sg.param("mu", 0.3), 1.0))
    c = sg.param("c", jnp.array([0.0, 1.0, -0.5, 0.8]))
    b = sg.param("b", jnp.array([0.0, 0.2, -0.4, 0.1]))
    z = sg.sample("z", dist.Categorical(logits=c * u + b), estimator=estimator)
    sg.factor("f", TABLE[z] * (1.0 + 0.5 * u))


def continuous_parent_exact(params):
    u = params["mu"] + jnp.asarray(GH_X)
    p = jax.nn.softmax(params["c"] * u[:, None] + params["b"], -1)
    inner = (p * TABLE).sum(-1) * (1.0 + 0.5 * u)
    return jnp.sum(jnp.asarray(GH_W) * inner) / np.sqrt(2 * np.pi)


def test_particle_dependent_logits_fall_back_unbiased():
    fn = functools.partial(continuous_parent, sg.UnorderedSet())
    params = sg.init_params(0, fn)
    value, grad = _samples(fn, params, 3, 4000)
    assert_unbiased(grad, jax.grad(continuous_parent_exact)(params))
    mean, se = mean_and_se(value)
    assert abs(mean - float(continuous_parent_exact(params))) <= 5 * se + 1e-5, (mean, se)


# --- without replacement -------------------------------------------------------------------

def test_samples_are_distinct_across_particles():
    logits = jnp.array([[0.0] * 6, [3.0, -2.0, 0.5, 0.0, 1.0, -1.0]])

    def program():
        with sg.plate("n", 2):
            sg.sample("z", dist.Categorical(logits=logits), estimator=sg.UnorderedSet())

    def one_particle(key):
        with estimate(num_particles=4):
            tr = sg.handlers.trace(sg.handlers.seed(program, key)).get_trace()
        return tr["z"]["value"]

    def one_draw(key):
        return jax.vmap(one_particle, axis_name=PARTICLE_AXIS)(jax.random.split(key, 4))

    z = np.asarray(jax.jit(jax.vmap(one_draw))(jax.random.split(jax.random.key(2), 1000)))
    assert z.shape == (1000, 4, 2)
    for n in range(2):
        assert all(len(set(row)) == 4 for row in z[:, :, n])
    # Gumbel-top-k: the first particle is an exact draw from p.
    for n in range(2):
        freq = np.bincount(z[:, 0, n], minlength=6) / len(z)
        p = np.asarray(jax.nn.softmax(logits[n]))
        se = np.sqrt(p * (1 - p) / len(z))
        assert np.all(np.abs(freq - p) <= 5 * se + 1e-9), (freq, p)


# --- variance --------------------------------------------------------------------------------

def test_variance_below_rloo():
    """At equal K = 3, summed over the plate's logits, UnorderedSet's gradient variance is
    below RLOO's by a margin well outside the variance estimates' noise."""
    var, se = {}, {}
    for name, est in [("us", sg.UnorderedSet()), ("rloo", sg.RLOO())]:
        g = _plate_samples(est, 3)[2]["l"]
        var[name], se[name] = mean_and_se(np.sum((g - g.mean(0)) ** 2, axis=(1, 2)))
    assert var["us"] + 5 * se["us"] < 0.8 * (var["rloo"] - 5 * se["rloo"]), (var, se)


# --- errors ----------------------------------------------------------------------------------

def _single(fn, est=None):
    def program():
        sg.sample("w", fn, estimator=est or sg.UnorderedSet())
        sg.factor("f", 1.0)

    return program


@pytest.mark.parametrize("k, match", [(1, "num_particles >= 2"), (4, "num_particles <= 3")])
def test_particle_count_errors_name_the_site(k, match):
    program = _single(dist.Categorical(logits=jnp.zeros(3)))
    with pytest.raises(SiteError, match=f"'w'.*{match}"):
        sg.Expectation(num_particles=k).loss(jax.random.key(0), {}, program)


def test_too_many_particles_for_exact_set_probabilities():
    program = _single(dist.Categorical(logits=jnp.zeros(10)))
    with pytest.raises(SiteError, match="'w'.*K!"):
        sg.Expectation(num_particles=7).loss(jax.random.key(0), {}, program)


@pytest.mark.parametrize("fn", [dist.Normal(0.0, 1.0), dist.Bernoulli(logits=0.0),
                                dist.Categorical(logits=jnp.zeros((2, 3))).to_event(1)],
                         ids=["normal", "bernoulli", "to_event"])
def test_non_categorical_is_an_error(fn):
    with pytest.raises(SiteError, match="'w'.*Categorical"):
        sg.Expectation(num_particles=2).loss(jax.random.key(0), {}, _single(fn))


@pytest.mark.parametrize("est", [sg.UnorderedSet(), sg.SumAndSample(2)],
                         ids=["unordered_set", "sum_and_sample"])
def test_refused_under_iwae(est):
    def model():
        sg.sample("z", dist.Categorical(logits=jnp.zeros(3)))

    def guide():
        sg.sample("z", dist.Categorical(logits=jnp.zeros(3)), estimator=est)

    with pytest.raises(SiteError, match=f"'z'.*{type(est).__name__}.*VIMCO"):
        sg.IWAE(num_particles=2).loss(jax.random.key(0), {}, model, guide)


def test_probs_and_wrappers_are_accepted():
    sg.UnorderedSet().validate("z", dist.Categorical(probs=jnp.ones(4) / 4).expand([3]).mask(
        jnp.array([True, False, True])), 4)


# --- SumAndSample ----------------------------------------------------------------------------

@pytest.mark.parametrize("k, num", [(2, 2), (3, 4)])
def test_sum_and_sample_unbiased(k, num):
    fn = functools.partial(plate_program, sg.SumAndSample(k))
    params = sg.init_params(0, fn)
    value, grad = _samples(fn, params, num, 3000)
    assert_unbiased(grad, jax.grad(plate_exact)(params))
    mean, se = mean_and_se(value)
    assert abs(mean - float(plate_exact(params))) <= 5 * se + 1e-5, (mean, se)


def test_sum_and_sample_exact_when_the_rest_is_one_class():
    fn = functools.partial(plate_program, sg.SumAndSample(5))
    params = sg.init_params(0, fn)
    value, grad = _samples(fn, params, 5, 16)
    exact = jax.grad(plate_exact)(params)["l"]
    np.testing.assert_allclose(grad["l"], np.broadcast_to(exact, grad["l"].shape), atol=2e-5)
    np.testing.assert_allclose(value, float(plate_exact(params)), atol=2e-5)


def test_sum_and_sample_errors():
    program = _single(dist.Categorical(logits=jnp.zeros(3)), sg.SumAndSample(3))
    with pytest.raises(SiteError, match="'w'.*num_particles >= 3"):
        sg.Expectation(num_particles=2).loss(jax.random.key(0), {}, program)
    program = _single(dist.Categorical(logits=jnp.zeros(3)), sg.SumAndSample(4))
    with pytest.raises(SiteError, match="'w'.*k <= 3"):
        sg.Expectation(num_particles=4).loss(jax.random.key(0), {}, program)
    with pytest.raises(SiteError, match="'w'.*Categorical"):
        sg.Expectation(num_particles=2).loss(jax.random.key(0), {}, _single(
            dist.Normal(0.0, 1.0), sg.SumAndSample(2)))
    with pytest.raises(TypeError, match="k >= 1"):
        sg.SumAndSample(0)
