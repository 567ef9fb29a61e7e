"""sg.SMC, the auto-encoding SMC bound: against the Kalman filter's exact likelihood, IWAE, and
an exact enumeration of every random choice of a small SMC run (for its gradient)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

import scgjax as sg
from scgjax import dist

A, Q, R = 0.9, 1.0, 0.5


def lgssm(ys):
    """z_t = A z_{t-1} + N(0, Q), y_t = z_t + N(0, R); ys is (T,) or (T, B) (a plate of B
    sequences)."""
    def step(z, y):
        z = sg.sample("z", dist.Normal(A * z, Q ** 0.5))
        sg.sample("y", dist.Normal(z, R ** 0.5), obs=y)
        return z, None

    if ys.ndim == 1:
        sg.scan(step, 0.0, xs=ys)
    else:
        with sg.plate("seqs", ys.shape[1]):
            sg.scan(step, jnp.zeros(ys.shape[1]), xs=ys)


def bootstrap(ys):
    """The model's own transition as the proposal."""
    def step(z, y):
        return sg.sample("z", dist.Normal(A * z, Q ** 0.5)), None

    if ys.ndim == 1:
        sg.scan(step, 0.0, xs=ys)
    else:
        with sg.plate("seqs", ys.shape[1]):
            sg.scan(step, jnp.zeros(ys.shape[1]), xs=ys)


def kalman_log_lik(ys):
    """log p(y_{1:T}) by the Kalman filter (float64)."""
    m, p, total = 0.0, 0.0, 0.0
    for y in np.asarray(ys, np.float64):
        m, p = A * m, A * A * p + Q
        s = p + R
        total += -0.5 * (np.log(2 * np.pi * s) + (y - m) ** 2 / s)
        gain = p / s
        m, p = m + gain * (y - m), (1 - gain) * p
    return total


def simulate(horizon, batch=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = () if batch is None else (batch,)
    z, ys = np.zeros(shape), []
    for _ in range(horizon):
        z = A * z + rng.normal(size=shape) * Q ** 0.5
        ys.append(z + rng.normal(size=shape) * R ** 0.5)
    return jnp.asarray(np.array(ys), jnp.float32)


def bounds(objective, ys, n, seed=0):
    f = jax.jit(jax.vmap(lambda k: -objective.loss(k, {}, lgssm, bootstrap, ys)))
    return np.asarray(f(jax.random.split(jax.random.key(seed), n)), np.float64)


@pytest.mark.parametrize("resample", ["systematic", "multinomial"])
def test_estimate_of_the_likelihood_is_unbiased_against_the_kalman_filter(resample):
    """T = 50: the mean of Z_hat / p(y) is 1 within 4 standard errors (400 runs, K = 64)."""
    ys = simulate(50)
    ratio = np.exp(bounds(sg.SMC(64, resample=resample), ys, 400) - kalman_log_lik(ys))
    se = ratio.std() / np.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < 4 * se, (ratio.mean(), se)
    assert se < 0.2  # the test has power: a bias of 0.8 nats (a factor 0.45) would fail it


def test_unbiased_per_sequence_of_a_batch():
    """Three sequences in a plate, each resampled on its own: the product of the three
    estimates is unbiased for the product of the likelihoods."""
    ys = simulate(20, batch=3, seed=1)
    exact = sum(kalman_log_lik(ys[:, b]) for b in range(3))
    ratio = np.exp(bounds(sg.SMC(64), ys, 1000) - exact)
    se = ratio.std() / np.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < 4 * se and se < 0.2, (ratio.mean(), se)


@pytest.mark.parametrize("batch", [None, 3])
def test_without_resampling_it_is_iwae_for_the_same_key(batch):
    ys = simulate(20, batch=batch)
    key = jax.random.key(3)
    smc = sg.SMC(16, resample=None).loss(key, {}, lgssm, bootstrap, ys)
    iwae = sg.IWAE(16).loss(key, {}, lgssm, bootstrap, ys)
    np.testing.assert_allclose(smc, iwae, rtol=1e-5)


def test_one_step_is_iwae_even_when_resampling():
    ys = simulate(1)
    key = jax.random.key(4)
    smc = sg.SMC(16, ess_threshold=1.0).loss(key, {}, lgssm, bootstrap, ys)
    np.testing.assert_allclose(smc, sg.IWAE(16).loss(key, {}, lgssm, bootstrap, ys), rtol=1e-6)


def test_bound_rises_with_k_and_beats_iwae_on_long_sequences():
    ys = simulate(50)
    exact = kalman_log_lik(ys)
    means = [bounds(sg.SMC(k), ys, 100).mean() for k in (2, 8, 64)]
    assert means[0] < means[1] < means[2] < exact
    assert exact - means[2] < 2.0  # the gap closes
    assert bounds(sg.IWAE(64), ys, 100).mean() < means[2] - 50.0  # IWAE's gap grows with T


def test_finite_at_a_thousand_particles_and_steps_and_deterministic():
    ys = simulate(1000)
    smc = sg.SMC(1000)
    loss = jax.jit(lambda k: smc.loss(k, {}, lgssm, bootstrap, ys))
    first, again = loss(jax.random.key(0)), loss(jax.random.key(0))
    assert np.isfinite(first) and float(first) == float(again)
    assert abs(-float(first) - kalman_log_lik(ys)) < 30.0


# -- gradients: an exact enumeration of every random choice of SMC with K = 2, T = 2 ----------

THETA = {"m0": 0.3, "m1": -0.4, "g0": -0.2, "g1": 0.5, "gz": 0.8}
YS = jnp.array([0.7, -0.3])


def coin_model(ys):
    m = [sg.param("m0", THETA["m0"]), sg.param("m1", THETA["m1"])]

    def step(prev, inputs):
        t, y = inputs
        z = sg.sample("z", dist.Bernoulli(logits=jnp.where(t == 0, m[0], m[1] + 2.0 * prev - 1)))
        sg.sample("y", dist.Normal(2.0 * z - 1.0, 1.0), obs=y)
        return z * 1.0, None

    sg.scan(step, 0.0, xs=(jnp.arange(2), ys))


def coin_guide(ys):
    g = [sg.param("g0", THETA["g0"]), sg.param("g1", THETA["g1"])]
    gz = sg.param("gz", THETA["gz"])

    def step(prev, t):
        z = sg.sample("z", dist.Bernoulli(logits=jnp.where(t == 0, g[0], g[1] + gz * prev)))
        return z * 1.0, None

    sg.scan(step, 0.0, xs=jnp.arange(2))


def exact_expected_bound(p, ys):
    """E[log Z_hat] of SMC with K = 2, T = 2 and multinomial resampling after step 1, by
    summing over the 64 joint values of (z_1^1, z_1^2, a^1, a^2, z_2^1, z_2^2)."""
    def log_bern(z, logit):
        return z * jax.nn.log_sigmoid(logit) + (1 - z) * jax.nn.log_sigmoid(-logit)

    def log_normal(y, z):
        return -0.5 * (y - (2.0 * z - 1.0)) ** 2 - 0.5 * jnp.log(2 * jnp.pi)

    total = 0.0
    for z1a, z1b, a1, a2, z2a, z2b in itertools.product((0.0, 1.0), repeat=6):
        first = [z1a, z1b]
        lq1 = [log_bern(z, p["g0"]) for z in first]
        lw1 = [log_bern(z, p["m0"]) + log_normal(ys[0], z) - q
               for z, q in zip(first, lq1, strict=True)]
        norm = jax.nn.log_softmax(jnp.stack(lw1))
        anc = [int(a1), int(a2)]
        second = [z2a, z2b]
        lq2 = [log_bern(z, p["g1"] + p["gz"] * first[a]) for z, a in zip(second, anc, strict=True)]
        lw2 = [log_bern(z, p["m1"] + 2.0 * first[a] - 1) + log_normal(ys[1], z) - q
               for z, a, q in zip(second, anc, lq2, strict=True)]
        log_prob = sum(lq1) + norm[anc[0]] + norm[anc[1]] + sum(lq2)
        log_z = (jax.nn.logsumexp(jnp.stack(lw1)) - jnp.log(2.0)
                 + jax.nn.logsumexp(jnp.stack(lw2)) - jnp.log(2.0))
        total = total + jnp.exp(log_prob) * log_z
    return total


def test_score_and_resampling_gradients_are_unbiased_against_exact_enumeration():
    """Discrete proposals (score function) with the resampling's score term: the mean
    gradient over 40,000 runs equals the gradient of the exact expected bound within 4.5
    standard errors, in every param."""
    params = {k: jnp.asarray(v) for k, v in THETA.items()}
    exact = jax.grad(exact_expected_bound)(params, YS)
    keys = jax.random.split(jax.random.key(0), 40_000)

    def grads(smc):
        g = jax.jit(jax.vmap(lambda k: jax.grad(lambda p: -smc.loss(
            k, p, coin_model, coin_guide, YS))(params)))(keys)
        return {k: np.asarray(v, np.float64) for k, v in g.items()}

    full = grads(sg.SMC(2, resample="multinomial", ess_threshold=1.0, resample_grad=True))
    for name, g in full.items():
        se = g.std() / np.sqrt(g.size)
        assert abs(g.mean() - float(exact[name])) < 4.5 * se, (name, g.mean(), exact[name], se)
    # power: the gradient of another bound (IWAE's: no resampling) fails the same check
    other = grads(sg.SMC(2, resample=None))
    z = [abs(g.mean() - float(exact[n])) / (g.std() / np.sqrt(g.size)) for n, g in other.items()]
    assert max(z) > 6.0, z


# -- the carries: a leaf the model's carry shares with the guide's is resampled once ----------


def learnable(tuple_carry=False, copy=False):
    """The linear-Gaussian model and a proposal, both with params. The model's step returns
    the guide's draw ``z`` (the same array: SMC resamples it once for both carries); with
    ``copy``, ``z * 1.0`` instead (the same value, another array: resampled twice, as before
    the sharing). ``tuple_carry``: the guide carries ``(z, z)`` and the model ``(z, a z)``, a
    leaf shared three times beside one of the model's own."""
    same = (lambda z: z * 1.0) if copy else (lambda z: z)

    def model(ys):
        a, log_q = sg.param("a", 0.5), sg.param("log_q", 0.0)

        def step(carry, y):
            mean = 0.5 * (a * carry[0] + carry[1]) if tuple_carry else a * carry
            z = sg.sample("z", dist.Normal(mean, jnp.exp(0.5 * log_q)))
            sg.sample("y", dist.Normal(z, R ** 0.5), obs=y)
            return ((same(z), a * z) if tuple_carry else same(z)), None

        sg.scan(step, (0.0, 0.0) if tuple_carry else 0.0, xs=ys)

    def guide(ys):
        pa, pb, log_s = sg.param("pa", 0.3), sg.param("pb", 0.3), sg.param("log_s", 0.0)

        def step(carry, y):
            prev = 0.5 * (carry[0] + carry[1]) if tuple_carry else carry
            z = sg.sample("z", dist.Normal(pa * prev + pb * y, jnp.exp(log_s)))
            return ((z, same(z)) if tuple_carry else z), None

        sg.scan(step, (0.0, 0.0) if tuple_carry else 0.0, xs=ys)

    return model, guide


def count_primitive(jaxpr, name):
    """Equations of primitive ``name`` in ``jaxpr``, once per call in its sub-jaxprs."""
    return sum((eqn.primitive.name == name)
               + sum(count_primitive(sub, name) for sub in jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


@pytest.mark.parametrize("k, resample, threshold, tuple_carry", [
    (16, "systematic", 0.5, False), (16, "multinomial", 1.0, True),
    (256, "systematic", 1.0, True), (256, "multinomial", 0.5, False)])
def test_a_carry_leaf_shared_by_model_and_guide_is_resampled_once(k, resample, threshold,
                                                                   tuple_carry):
    """The same loss and gradient as with the leaf copied (resampled once per occurrence),
    up to the order of the backward pass's sums; and one gather's transpose (scatter-add)
    per distinct leaf, not per occurrence."""
    ys = simulate(30, seed=2)
    smc = sg.SMC(k, resample=resample, ess_threshold=threshold)
    results = {}
    for copy in (False, True):
        model, guide = learnable(tuple_carry, copy)
        params = sg.init_params(0, model, guide, ys)

        def loss(p, model=model, guide=guide):
            value, (_, metrics) = smc.loss_with_state(jax.random.key(7), p, None, model, guide,
                                                      ys)
            return value, metrics["resampled"]

        (value, resampled), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        scatters = count_primitive(jax.make_jaxpr(jax.grad(lambda p: loss(p)[0]))(params).jaxpr,
                                   "scatter-add")
        results[copy] = value, grad, float(resampled), scatters
    (shared, g_shared, resampled, n_shared), (copied, g_copied, _, n_copied) = (
        results[False], results[True])
    assert 0.0 < resampled < 1.0 or threshold == 1.0 and resampled > 0.5  # it resamples
    np.testing.assert_allclose(shared, copied, rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in g_copied.values())
    for name in g_copied:
        np.testing.assert_allclose(g_shared[name], g_copied[name], rtol=1e-5,
                                   atol=1e-6 * scale, err_msg=name)
    # the distinct leaves: z (and a z); the occurrences: 2 (4)
    assert (n_shared, n_copied) == ((2, 4) if tuple_carry else (1, 2)), (n_shared, n_copied)


# -- errors ------------------------------------------------------------------------------------


def test_errors_name_the_site():
    ys = simulate(5)

    def global_guide(ys):
        sg.sample("scale", dist.LogNormal(0.0, 1.0))
        bootstrap(ys)

    def global_model(ys):
        sg.sample("scale", dist.LogNormal(0.0, 1.0))
        lgssm(ys)

    with pytest.raises(sg.SiteError, match="'scale'.*outside sg.scan"):
        sg.SMC(4).loss(0, {}, global_model, global_guide, ys)

    def after(ys):
        def step(z, y):
            z = sg.sample("z", dist.Normal(A * z, 1.0))
            return z, None
        last, _ = sg.scan(step, 0.0, xs=ys)
        sg.sample("end", dist.Normal(last, 1.0), obs=0.0)

    with pytest.raises(sg.SiteError, match="'end'.*after the sg.scan loop"):
        sg.SMC(4).loss(0, {}, after, bootstrap, ys)

    def rloo_guide(ys):
        def step(z, y):
            return sg.sample("z", dist.Normal(A * z, 1.0), estimator=sg.RLOO()), None
        sg.scan(step, 0.0, xs=ys)

    with pytest.raises(sg.SiteError, match="'z'.*RLOO"):
        sg.SMC(4).loss(0, {}, lgssm, rloo_guide, ys)
    with pytest.raises(ValueError, match="resample_grad=True needs resample='multinomial'"):
        sg.SMC(4, resample_grad=True)
    with pytest.raises(ValueError, match="resample"):
        sg.SMC(4, resample="stratified")

    def flat_carry(ys):  # the carry lacks the plate's axis
        def step(total, y):
            z = sg.sample("z", dist.Normal(0.0, 1.0))
            sg.sample("y", dist.Normal(z, 1.0), obs=y)
            return total + 1.0, None
        with sg.plate("seqs", ys.shape[1]):
            sg.scan(step, 0.0, xs=ys)

    def flat_guide(ys):
        def step(total, y):
            sg.sample("z", dist.Normal(0.0, 1.0))
            return total + 1.0, None
        with sg.plate("seqs", ys.shape[1]):
            sg.scan(step, 0.0, xs=ys)

    with pytest.raises(sg.SiteError, match="carry leaf.*start with the plates' axes"):
        sg.SMC(4).loss(0, {}, flat_carry, flat_guide, simulate(5, batch=2))
