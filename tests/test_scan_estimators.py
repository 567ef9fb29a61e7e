"""Every estimator works per step of an sg.scan loop, as it works per plate element.

Unbiased estimators are checked against exact gradients (all paths enumerated, or a linear
Gaussian ELBO in closed form); biased ones (relaxations, RWS's self-normalised wake-phi)
against the same program written as a Python loop."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from tests.models import (
    SCAN_YS,
    bern_logp,
    normal_logp,
    scan_chain_guide,
    scan_chain_model,
    scan_chain_paths,
)
from tests.stats import assert_unbiased, grad_samples, mean_and_se

YS = jnp.asarray(SCAN_YS)


def exact_elbo_grad(params):
    def elbo(v):
        lq, lp = scan_chain_paths(YS, v)
        return jnp.sum(jnp.exp(lq) * (lp - lq))
    return {"v": jax.grad(elbo)(params["v"])}


def neural_baseline(prev, y):
    return sg.ScoreFunction(baseline=sg.baselines.Neural(nn.Dense(1),
                                                         inputs=jnp.stack([prev, y])))


@pytest.mark.parametrize("estimator,k,min_power", [
    (sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9)), 1, 3.0),
    (sg.RLOO(), 4, 3.0),
    (sg.DisARM(), 4, 3.0),
    (sg.DCV(), 4, 3.0),
    (neural_baseline, 2, 1.5),
], ids=["sf-moving-average", "rloo", "disarm", "dcv", "neural"])
def test_elbo_estimators_are_exact_on_average(estimator, k, min_power):
    """The estimators' state (a moving average's mean) is warmed up on this program first, then
    held fixed: a baseline that does not depend on the sample leaves the gradient unbiased."""
    guide = lambda ys: scan_chain_guide(ys, estimator)  # noqa: E731
    params = sg.init_params(0, scan_chain_model, guide, YS)
    obj = sg.ELBO(num_particles=k)
    step = jax.jit(lambda key, state: obj.loss_with_state(key, params, state, scan_chain_model,
                                                          guide, YS)[1][0])
    state = obj.init_state(0, params, scan_chain_model, guide, YS)
    for i in range(30):
        state = step(jax.random.key(100 + i), state)
    g = grad_samples(lambda key, p: obj.loss_with_state(key, p, state, scan_chain_model, guide,
                                                        YS)[0], params, 4000 // k)
    assert_unbiased({"v": g["v"]}, exact_elbo_grad(params), min_power=min_power)


def test_neural_baseline_reads_the_step_and_learns():
    """The NVIL baseline's network sees each step's carry and input; it gets its own
    gradient (the regression of the learning signal) in the same step."""
    guide = lambda ys: scan_chain_guide(ys, neural_baseline)  # noqa: E731
    params = sg.init_params(0, scan_chain_model, guide, YS)
    assert "z$baseline" in params
    g = jax.grad(sg.ELBO(num_particles=2).loss, argnums=1)(jax.random.key(0), params,
                                                            scan_chain_model, guide, YS)
    assert float(jnp.abs(g["z$baseline"]["kernel"]).sum()) > 0


def test_vimco_under_iwae_is_exact_on_average():
    """IWAE with K = 2 over a 3-step loop: the exact bound sums over all pairs of paths."""
    ys = YS[:3]
    guide = lambda ys: scan_chain_guide(ys, sg.VIMCO())  # noqa: E731
    params = sg.init_params(0, scan_chain_model, guide, ys)

    def exact_bound(v):
        lq, lp = scan_chain_paths(ys, v)
        lw = lp - lq
        pair = jnp.logaddexp(lw[:, None], lw[None, :]) - jnp.log(2.0)
        return jnp.sum(jnp.exp(lq[:, None] + lq[None, :]) * pair)

    obj = sg.IWAE(num_particles=2)
    g = grad_samples(lambda key, p: obj.loss(key, p, scan_chain_model, guide, ys), params, 4000)
    assert_unbiased(g, {"v": jax.grad(exact_bound)(params["v"])})


def python_loop_chain(estimator=None, prior_logits=lambda prev: jnp.where(prev > 0, 1.0, -1.0)):
    """The chain of tests.models written as a Python loop (sites z0, z1, ...), with the
    model's ``z_t`` logits ``prior_logits(z_{t-1})``."""
    def model(ys):
        prev = 0.0
        for t in range(ys.shape[0]):
            z = sg.sample(f"z{t}", dist.Bernoulli(logits=prior_logits(prev)))
            sg.sample(f"y{t}", dist.Normal(2.0 * z - 1.0, 1.0), obs=ys[t])
            prev = z * 1.0

    def guide(ys):
        v = sg.param("v", jnp.array([0.2, 0.5, -0.3]))
        prev = 0.0
        for t in range(ys.shape[0]):
            z = sg.sample(f"z{t}", dist.Bernoulli(logits=v[0] + v[1] * ys[t] + v[2] * prev),
                          estimator=estimator)
            prev = z * 1.0
    return model, guide


def relaxed_chain(estimator):
    """Relaxed values are floats in (0, 1): the chain's ``prev > 0`` switch is made smooth."""
    def model(ys):
        def step(prev, y):
            z = sg.sample("z", dist.Bernoulli(logits=2.0 * prev - 1.0))
            sg.sample("y", dist.Normal(2.0 * z - 1.0, 1.0), obs=y)
            return z * 1.0, None
        sg.scan(step, 0.0, xs=ys)

    def guide(ys):
        v = sg.param("v", jnp.array([0.2, 0.5, -0.3]))

        def step(prev, y):
            z = sg.sample("z", dist.Bernoulli(logits=v[0] + v[1] * y + v[2] * prev),
                          estimator=estimator)
            return z * 1.0, None
        sg.scan(step, 0.0, xs=ys)

    return (model, guide), python_loop_chain(estimator, lambda prev: 2.0 * prev - 1.0)


def assert_same_mean(a, b):
    (m1, s1), (m2, s2) = mean_and_se(a), mean_and_se(b)
    assert np.all(np.abs(m1 - m2) < 5 * np.hypot(s1, s2)), (m1, m2, np.hypot(s1, s2))


@pytest.mark.parametrize("objective,estimator", [
    (sg.ELBO(num_particles=4), sg.GumbelSoftmax(0.5)),
    (sg.ELBO(num_particles=4), sg.StraightThrough()),
])
def test_relaxations_match_the_python_loop(objective, estimator):
    (model, guide), (model_loop, guide_loop) = relaxed_chain(estimator)
    params = sg.init_params(0, model, guide, YS)
    g_scan = grad_samples(lambda k, p: objective.loss(k, p, model, guide, YS), params, 600)
    g_loop = grad_samples(lambda k, p: objective.loss(k, p, model_loop, guide_loop, YS),
                          params, 600, seed=1)
    assert_same_mean(g_scan["v"], g_loop["v"])


def test_rws_matches_the_python_loop():
    model_loop, guide_loop = python_loop_chain()
    params = sg.init_params(0, scan_chain_model, scan_chain_guide, YS)
    obj = sg.RWS(num_particles=5)
    g_scan = grad_samples(lambda k, p: obj.loss(k, p, scan_chain_model, scan_chain_guide, YS),
                          params, 600)
    g_loop = grad_samples(lambda k, p: obj.loss(k, p, model_loop, guide_loop, YS), params,
                          600, seed=1)
    assert_same_mean(g_scan["v"], g_loop["v"])


# --- pathwise gradients through the carry: a linear Gaussian state-space model --------------

def lg_model(ys):
    def step(x, y):
        x = sg.sample("x", dist.Normal(x, 1.0))
        sg.sample("y", dist.Normal(x, 1.0), obs=y)
        return x, None
    sg.scan(step, 0.0, xs=ys)


def lg_guide(ys):
    a = sg.param("a", 0.5)
    b = sg.param("b", 0.3)
    s = sg.param("s", 0.8, constraint=dist.constraints.positive)

    def step(x, y):
        return sg.sample("x", dist.Normal(a * x + b * y, s)), None
    sg.scan(step, 0.0, xs=ys)


def lg_exact_elbo(a, b, s, ys):
    """The ELBO in closed form: q is Gaussian with ``x = L (b y + s eps)``, ``L`` the lower
    triangular matrix of powers of ``a``."""
    n = ys.shape[0]
    i, j = np.tril_indices(n)
    lower = jnp.zeros((n, n)).at[i, j].set(a ** (i - j))
    mean = lower @ (b * ys)
    cov = s**2 * lower @ lower.T
    var = jnp.diag(cov)
    prev_mean = jnp.concatenate([jnp.zeros(1), mean[:-1]])
    prev_var = jnp.concatenate([jnp.zeros(1), var[:-1]])
    cross = jnp.concatenate([jnp.zeros(1), jnp.diag(cov, -1)])
    half_log_2pi = 0.5 * jnp.log(2 * jnp.pi)
    transition = -0.5 * ((mean - prev_mean) ** 2 + var + prev_var - 2 * cross) - half_log_2pi
    emission = -0.5 * ((ys - mean) ** 2 + var) - half_log_2pi
    entropy = n * (jnp.log(s) + 0.5 + half_log_2pi)
    return jnp.sum(transition + emission) + entropy


def test_pathwise_through_the_carry_is_exact_on_average():
    params = sg.init_params(0, lg_model, lg_guide, YS)
    g = grad_samples(lambda k, p: sg.ELBO(num_particles=4).loss(k, p, lg_model, lg_guide, YS),
                     params, 400)

    def exact(p):
        c = sg.constrain_params(p, lg_model, lg_guide, YS)
        return lg_exact_elbo(c["a"], c["b"], c["s"], YS)

    assert_unbiased(g, jax.grad(exact)(params))
    values = jax.jit(jax.vmap(lambda k: -sg.ELBO(num_particles=4).loss(
        k, params, lg_model, lg_guide, YS)))(jax.random.split(jax.random.key(1), 400))
    mean, se = mean_and_se(values)
    assert abs(mean - exact(params)) < 5 * se


def test_enumerate_per_step_where_a_step_reaches_only_its_own_costs():
    """A step's site that does not reach the carry is summed out step by step: the ELBO and its
    gradient are exact to float precision."""
    def model(ys):
        def step(c, y):
            z = sg.sample("z", dist.Bernoulli(logits=-0.5))
            sg.sample("y", dist.Normal(2.0 * z - 1.0 + 0.1 * c, 1.0), obs=y)
            return c + y, None
        sg.scan(step, 0.0, xs=ys)

    def guide(ys):
        v = sg.param("v", jnp.array([0.2, 0.5]))

        def step(c, y):
            sg.sample("z", dist.Bernoulli(logits=v[0] + v[1] * y), estimator=sg.Enumerate())
            return c + y, None
        sg.scan(step, 0.0, xs=ys)

    def exact(v):
        c = jnp.concatenate([jnp.zeros(1), jnp.cumsum(YS)[:-1]])
        total = 0.0
        for z in (0.0, 1.0):
            q = jnp.exp(bern_logp(z, v[0] + v[1] * YS))
            lp = bern_logp(z, -0.5) + normal_logp(YS, 2.0 * z - 1.0 + 0.1 * c, 1.0)
            total = total + jnp.sum(q * (lp - jnp.log(q)))
        return total

    params = sg.init_params(0, model, guide, YS)
    loss, grad = jax.value_and_grad(sg.ELBO().loss, argnums=1)(jax.random.key(0), params,
                                                               model, guide, YS)
    np.testing.assert_allclose(-loss, exact(params["v"]), rtol=1e-5)
    np.testing.assert_allclose(-grad["v"], jax.grad(exact)(params["v"]), rtol=1e-4, atol=1e-5)


def test_enumerate_inside_a_loop_is_refused_naming_the_site():
    guide = lambda ys: scan_chain_guide(ys, sg.Enumerate())  # noqa: E731
    params = sg.init_params(0, scan_chain_model, guide, YS)
    with pytest.raises(sg.SiteError, match="'z'.*sg.scan"):
        sg.ELBO().loss(0, params, scan_chain_model, guide, YS)


def test_a_loop_site_that_the_guide_samples_outside_any_loop_is_an_error():
    def guide(ys):
        sg.sample("x", dist.Normal(jnp.zeros(ys.shape[0]), 1.0).to_event(1))

    with pytest.raises(sg.SiteError, match="'x' is inside sg.scan 'time' here but outside"):
        sg.ELBO().loss(0, {}, lg_model, guide, YS)


def test_stl_through_the_carry_is_exact_on_average():
    guide = lambda ys: _lg_guide_with(ys, sg.STL())  # noqa: E731
    params = sg.init_params(0, lg_model, guide, YS)
    g = grad_samples(lambda k, p: sg.ELBO(num_particles=4).loss(k, p, lg_model, guide, YS),
                     params, 400)

    def exact(p):
        c = sg.constrain_params(p, lg_model, guide, YS)
        return lg_exact_elbo(c["a"], c["b"], c["s"], YS)

    assert_unbiased(g, jax.grad(exact)(params))


def _lg_guide_with(ys, estimator):
    a = sg.param("a", 0.5)
    b = sg.param("b", 0.3)
    s = sg.param("s", 0.8, constraint=dist.constraints.positive)

    def step(x, y):
        return sg.sample("x", dist.Normal(a * x + b * y, s), estimator=estimator), None
    sg.scan(step, 0.0, xs=ys)


def test_dreg_under_iwae_matches_the_python_loop():
    """DReG where the guide's steps do not feed each other (its path is then followed
    exactly); a guide chain through the carry is refused naming the site, as in a Python
    loop."""
    def guide(ys):
        b = sg.param("b", 0.3)
        s = sg.param("s", 0.8, constraint=dist.constraints.positive)

        def step(c, y):
            return c, sg.sample("x", dist.Normal(b * y, s), estimator=sg.DReG())
        sg.scan(step, 0.0, xs=ys)

    def guide_loop(ys):
        b = sg.param("b", 0.3)
        s = sg.param("s", 0.8, constraint=dist.constraints.positive)
        for t in range(ys.shape[0]):
            sg.sample(f"x{t}", dist.Normal(b * ys[t], s), estimator=sg.DReG())

    def model_loop(ys):
        x = 0.0
        for t in range(ys.shape[0]):
            x = sg.sample(f"x{t}", dist.Normal(x, 1.0))
            sg.sample(f"y{t}", dist.Normal(x, 1.0), obs=ys[t])

    params = sg.init_params(0, lg_model, guide, YS)
    obj = sg.IWAE(num_particles=4)
    g_scan = grad_samples(lambda k, p: obj.loss(k, p, lg_model, guide, YS), params, 600)
    g_loop = grad_samples(lambda k, p: obj.loss(k, p, model_loop, guide_loop, YS), params,
                          600, seed=1)
    for name in ("b", "s"):
        assert_same_mean(g_scan[name], g_loop[name])
    chained = lambda ys: _lg_guide_with(ys, sg.DReG())  # noqa: E731
    params = sg.init_params(0, lg_model, chained, YS)
    with pytest.raises(sg.SiteError, match="'x' uses DReG"):
        obj.loss(0, params, lg_model, chained, YS)
