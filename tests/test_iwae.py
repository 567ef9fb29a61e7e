"""The importance-weighted bound (IWAE) and VIMCO against exact answers."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.errors import SiteError
from scgjax.estimators.vimco import VIMCO, vimco_baselines
from scgjax.objectives.iwae import IWAE
from tests.models import bern_logp, normal_logp
from tests.stats import Z, assert_unbiased, grad_samples, mean_and_se

# --- linear-Gaussian: log p(x) analytic --------------------------------------------------

LG_A, LG_B, LG_S = 1.5, 0.3, 0.7
LG_X = np.asarray([0.4, -1.2, 2.1, 0.0, 1.1], dtype=np.float32)


def lg_model(x):
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(LG_A * z + LG_B, LG_S), obs=x)


def lg_guide(x):
    c = sg.param("c", jnp.array(0.2))  # not the exact posterior
    d = sg.param("d", jnp.array(-0.1))
    e = sg.param("e", jnp.array(0.9))
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Normal(c * x + d, e))


def lg_log_evidence(x):
    return float(normal_logp(x, LG_B, np.sqrt(LG_A**2 + LG_S**2)).sum())


def lg_elbo(params, x):
    m, e = params["c"] * x + params["d"], params["e"]
    # E_q[log N(z;0,1)] + E_q[log N(x; a z + b, s)] + H[q]
    prior = -0.5 * (m**2 + e**2) - 0.5 * jnp.log(2 * jnp.pi)
    r = x - LG_A * m - LG_B
    lik = -0.5 * (r**2 + LG_A**2 * e**2) / LG_S**2 - jnp.log(LG_S) - 0.5 * jnp.log(2 * jnp.pi)
    entropy = jnp.log(e) + 0.5 * jnp.log(2 * jnp.pi) + 0.5
    return float((prior + lik + entropy).sum())


def _values(objective, params, model, guide, *args, num=2000, seed=0):
    keys = jax.random.split(jax.random.key(seed), num)
    return np.asarray(jax.jit(jax.vmap(
        lambda k: -objective.loss(k, params, model, guide, *args)))(keys), dtype=np.float64)


def test_linear_gaussian_bound_increases_with_k_towards_log_evidence():
    x = LG_X
    params = sg.init_params(0, lg_model, lg_guide, x)
    log_px = lg_log_evidence(x)
    elbo = lg_elbo(params, x)
    stats = {}
    for k in (1, 5, 50):
        stats[k] = mean_and_se(_values(IWAE(num_particles=k), params, lg_model, lg_guide, x))
    # K = 1 is the ELBO: same keys, same value as sg.ELBO; and the analytic ELBO
    v1 = _values(IWAE(num_particles=1), params, lg_model, lg_guide, x, num=200)
    e1 = _values(sg.ELBO(num_particles=1), params, lg_model, lg_guide, x, num=200)
    np.testing.assert_allclose(v1, e1, rtol=1e-5, atol=1e-4)
    assert abs(stats[1][0] - elbo) <= Z * stats[1][1]
    assert elbo < log_px - 1.0  # the guide is poor: the test has room to see the bound move
    for lo, hi in ((1, 5), (5, 50)):
        gap = stats[hi][0] - stats[lo][0]
        assert gap > Z * np.hypot(stats[hi][1], stats[lo][1]), (lo, hi, stats)
    for k, (mean, se) in stats.items():
        assert mean <= log_px + Z * se, (k, mean, log_px)
    # K = 50 closes most of the ELBO's gap
    assert log_px - stats[50][0] < 0.1 * (log_px - elbo), (stats, log_px, elbo)


# --- tiny discrete model: exact K = 2 bound by enumerating particle tuples ------------------

D_X = np.asarray([-0.8, 0.3, 1.9], dtype=np.float32)
D_K = 2


def d_model(x):
    prior = sg.param("prior_logit", jnp.array(0.4))
    mu = sg.param("mu", jnp.array([-1.0, 1.2]))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=prior))
        sg.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0), obs=x)


def d_guide(x, estimator=None):
    logits = sg.param("q_logits", jnp.array([-0.5, 0.3, 1.0]))
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Bernoulli(logits=logits), estimator=estimator)


def d_exact_bound(params, x, k=D_K):
    """``sum_n E[log (1/K) sum_k w_{k,n}]`` by enumerating all ``2^K`` particle tuples."""
    total = 0.0
    for zs in itertools.product((0, 1), repeat=k):
        z = jnp.asarray(zs, dtype=jnp.float32)[:, None]  # (K, 1)
        lq = bern_logp(z, params["q_logits"])  # (K, N)
        lp = bern_logp(z, params["prior_logit"]) + normal_logp(
            x, params["mu"][jnp.asarray(zs)][:, None], 1.0)
        prob = jnp.exp(lq.sum(0))
        total = total + prob * (jax.nn.logsumexp(lp - lq, axis=0) - jnp.log(k))
    return total.sum()


@pytest.mark.parametrize("estimator", [sg.ScoreFunction(), VIMCO()], ids=["score", "vimco"])
def test_discrete_gradient_unbiased_for_the_k_sample_bound(estimator):
    x = D_X
    guide = lambda x: d_guide(x, estimator)  # noqa: E731
    params = sg.init_params(0, d_model, guide, x)
    exact = jax.grad(d_exact_bound)(params, x)
    loss = lambda key, p: IWAE(num_particles=D_K).loss(key, p, d_model, guide, x)  # noqa: E731
    samples = grad_samples(loss, params, 5000)
    assert_unbiased(samples, exact)
    values = np.asarray(jax.jit(jax.vmap(lambda k: -loss(k, params)))(
        jax.random.split(jax.random.key(3), 5000)))
    assert_unbiased({"bound": values}, {"bound": d_exact_bound(params, x)}, min_power=0.0)


def test_vimco_variance_lower_than_plain_score():
    x = D_X
    out = {}
    for label, est in (("score", sg.ScoreFunction()), ("vimco", VIMCO())):
        guide = lambda x, est=est: d_guide(x, est)  # noqa: E731
        params = sg.init_params(0, d_model, guide, x)
        loss = lambda key, p, g=guide: IWAE(num_particles=4).loss(  # noqa: E731
            key, p, d_model, g, x)
        g = grad_samples(loss, params, 4000, seed=1)
        out[label] = np.asarray(jnp.var(g["q_logits"], axis=0))
    assert np.all(out["vimco"] < out["score"]), out


def test_vimco_baselines_match_direct_formula():
    lw = jax.random.normal(jax.random.key(0), (6, 3)) * 3.0
    k = lw.shape[0]
    direct = []
    for i in range(k):  # the definition, one particle at a time (test only)
        others = jnp.delete(lw, i, axis=0)
        geo = others.mean(0)
        direct.append(jax.nn.logsumexp(jnp.concatenate([others, geo[None]]), axis=0)
                      - jnp.log(k))
    np.testing.assert_allclose(vimco_baselines(lw), jnp.stack(direct), rtol=1e-5, atol=1e-5)


# --- numerical stability -----------------------------------------------------------------


def peaked_model(x):
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        b = sg.sample("b", dist.Bernoulli(logits=0.0))
        sg.factor("peak", -1e4 * (z - x) ** 2 - 1e4 * b)


def peaked_guide(x, estimator=None):
    m = sg.param("m", jnp.zeros(x.shape[0]))
    logit = sg.param("l", jnp.array(0.3))
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Normal(m, 1.0))
        sg.sample("b", dist.Bernoulli(logits=logit), estimator=estimator)


@pytest.mark.parametrize("estimator", [sg.ScoreFunction(), VIMCO()], ids=["score", "vimco"])
def test_stable_with_many_particles_and_huge_log_weights(estimator):
    x = jnp.array([0.5, -2.0])
    guide = lambda x: peaked_guide(x, estimator)  # noqa: E731
    params = sg.init_params(0, peaked_model, guide, x)
    objective = IWAE(num_particles=5000)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: objective.loss(jax.random.key(0), p, peaked_model, guide, x)))(params)
    assert np.isfinite(loss) and abs(float(loss)) > 10.0  # log-weights ~ -1e4 are in play
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))


# --- structure: constant costs, errors ---------------------------------------------------


def test_costs_without_latents_are_outside_the_logsumexp():
    x = LG_X

    def model(x):
        g = sg.param("g", jnp.array(0.7))
        sg.factor("prior_g", -0.5 * g**2 * 10.0)
        lg_model(x)

    params = sg.init_params(0, model, lg_guide, x)
    key = jax.random.key(4)
    objective = IWAE(num_particles=7)
    with_prior, grad = jax.value_and_grad(objective.loss, argnums=1)(
        key, params, model, lg_guide, x)
    without_g = {k: v for k, v in params.items() if k != "g"}
    without = objective.loss(key, without_g, lg_model, lg_guide, x)
    np.testing.assert_allclose(with_prior - without, 0.5 * 0.7**2 * 10.0, rtol=1e-4)
    np.testing.assert_allclose(grad["g"], 0.7 * 10.0, rtol=1e-5)


def test_vimco_with_one_particle_names_the_site():
    guide = lambda x: d_guide(x, VIMCO())  # noqa: E731
    params = sg.init_params(0, d_model, guide, D_X)
    with pytest.raises(SiteError, match="'z'.*VIMCO.*num_particles >= 2"):
        IWAE(num_particles=1).loss(jax.random.key(0), params, d_model, guide, D_X)


def test_vimco_under_elbo_is_an_error_naming_the_site():
    guide = lambda x: d_guide(x, VIMCO())  # noqa: E731
    params = sg.init_params(0, d_model, guide, D_X)
    with pytest.raises(SiteError, match="'z'.*IWAE"):
        sg.ELBO(num_particles=2).loss(jax.random.key(0), params, d_model, guide, D_X)


def test_unsupported_estimator_names_the_site():
    guide = lambda x: d_guide(x, sg.ScoreFunction(sg.baselines.MovingAverage(0.9)))  # noqa
    params = sg.init_params(0, d_model, guide, D_X)
    with pytest.raises(SiteError, match="'z'"):
        IWAE(num_particles=3).loss(jax.random.key(0), params, d_model, guide, D_X)


def test_discrete_sites_default_to_vimco_and_rloo_is_refused():
    guide = lambda x: d_guide(x, None)  # noqa: E731
    params = sg.init_params(0, d_model, guide, D_X)
    g = sg.graph(d_model, guide, D_X, params=params, num_particles=3)
    assert type(g.nodes["z"].estimator) is sg.RLOO  # the ELBO's default ...
    structure = IWAE(num_particles=3).structure(0, params, d_model, guide, D_X)
    assert type(structure.scg.nodes["z"].estimator) is VIMCO  # ... and the IWAE's
    rloo = lambda x: d_guide(x, sg.RLOO())  # noqa: E731
    with pytest.raises(SiteError, match="'z'.*RLOO.*VIMCO"):
        IWAE(num_particles=3).loss(jax.random.key(0), params, d_model, rloo, D_X)


# --- plates: a joint bound when a latent is global, sub-sampled plates ------------------------


def joint_model(x):
    prior = sg.param("prior_logit", jnp.array(0.4))
    mu = sg.param("mu", jnp.array([-1.0, 1.2]))
    z = sg.sample("z", dist.Bernoulli(logits=prior * jnp.ones(x.shape[0])).to_event(1))
    with sg.plate("data", x.shape[0]):
        sg.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0), obs=x)


def joint_guide(x):
    logits = sg.param("q_logits", jnp.array([-0.5, 0.3, 1.0]))
    sg.sample("z", dist.Bernoulli(logits=logits).to_event(1), estimator=VIMCO())


def joint_exact_bound(params, x, k=3):
    """``E[log (1/K) sum_k prod_n w_{k,n}]``: one joint bound over all ``2^(N K)`` tuples."""
    n = x.shape[0]
    z = np.asarray(list(itertools.product((0, 1), repeat=k * n))).reshape(-1, k, n)
    lq = bern_logp(z, params["q_logits"]).sum(-1)  # (configs, K)
    lp = (bern_logp(z, params["prior_logit"]) + normal_logp(x, params["mu"][z], 1.0)).sum(-1)
    prob = jnp.exp(lq.sum(-1))
    return (prob * (jax.nn.logsumexp(lp - lq, axis=-1) - jnp.log(k))).sum()


def test_global_latent_gives_one_joint_bound():
    from scgjax.objectives.bounds import bound_plates

    x = D_X
    params = sg.init_params(0, joint_model, joint_guide, x)
    assert bound_plates(sg.graph(joint_model, joint_guide, x, num_particles=3)) == ()
    exact = jax.grad(joint_exact_bound)(params, x)
    loss = lambda key, p: IWAE(num_particles=3).loss(key, p, joint_model, joint_guide, x)  # noqa
    samples = grad_samples(loss, params, 6000)
    assert_unbiased(samples, exact)
    # the per-point bound of the same latents has another gradient, which the test would see
    per_point = jax.grad(lambda p: d_exact_bound(p, x, 3))(params)
    mean, se = mean_and_se(samples["q_logits"])
    assert np.any(np.abs(mean - np.asarray(per_point["q_logits"])) > Z * se)


def test_subsampled_plate_is_unbiased_for_the_full_data_bound():
    x = LG_X

    def sub_model(x):
        with sg.plate("data", x.shape[0], subsample_size=2) as idx:
            z = sg.sample("z", dist.Normal(0.0, 1.0))
            sg.sample("x", dist.Normal(LG_A * z + LG_B, LG_S), obs=jnp.asarray(x)[idx])

    def sub_guide(x):
        c, d, e = sg.param("c", jnp.array(0.2)), sg.param("d", jnp.array(-0.1)), sg.param(
            "e", jnp.array(0.9))
        with sg.plate("data", x.shape[0], subsample_size=2) as idx:
            sg.sample("z", dist.Normal(c * jnp.asarray(x)[idx] + d, e))

    params = sg.init_params(0, lg_model, lg_guide, x)
    full = mean_and_se(_values(IWAE(num_particles=5), params, lg_model, lg_guide, x))
    sub = mean_and_se(_values(IWAE(num_particles=5), params, sub_model, sub_guide, x,
                              num=4000, seed=1))
    assert abs(full[0] - sub[0]) <= Z * np.hypot(full[1], sub[1]), (full, sub)


def test_svi_with_iwae_and_vimco_raises_the_exact_bound():
    import optax

    guide = lambda x: d_guide(x, VIMCO())  # noqa: E731
    svi = sg.SVI(d_model, guide, optax.adam(0.05), IWAE(num_particles=D_K))
    state = svi.init(jax.random.key(0), D_X)
    before = float(d_exact_bound(state.params, D_X))
    for _ in range(200):
        state, loss = svi.update(state, D_X)
    assert np.isfinite(float(loss))
    assert float(d_exact_bound(state.params, D_X)) > before + 0.3
