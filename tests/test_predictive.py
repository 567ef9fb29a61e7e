"""sg.Predictive against NumPyro's Predictive, and sg.log_marginal_likelihood against exact
log-evidences.

Predictive: the same model and params written in NumPyro and in scgjax, drawn with
*different* keys; every returned site must agree in distribution (two-sample z-tests of the
means and of the variances, per element, at 5 standard errors: a false alarm has probability
~6e-7 per element) and the sites returned must be NumPyro's. The log marginal likelihood: on
a conjugate Gaussian model ``log p(x)`` is known, and so is the importance weights' relative
variance ``chi2 = E_q[w^2] / p(x)^2 - 1`` (by quadrature), whence the standard error
``sqrt(chi2 / K)`` of ``L_K`` and its bias ``~ chi2 / (2 K)`` (delta method).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as nd
import pytest
from numpyro.contrib.control_flow import scan as np_scan
from numpyro.infer import Predictive as NumPyroPredictive

import scgjax as sg
from scgjax import dist
from scgjax.errors import SiteError

Z = 5.0
N = 4000  # draws per side of a two-sample test


def numpyro_draws(key, *args, **kwargs):
    """NumPyro's ``Predictive(**kwargs)(key, *args)``, jitted (its vmap runs op by op)."""
    predictive = NumPyroPredictive(parallel=True, **kwargs)
    return jax.jit(lambda k: predictive(k, *args))(key)


# --- one model, written twice -----------------------------------------------------------------


def model(y=None):
    mu = sg.sample("mu", dist.Normal(0.0, 1.0))
    s = sg.param("s", 0.5, dist.constraints.positive)
    sg.factor("pull", -0.5 * mu**2)
    with sg.plate("data", 3):
        sg.deterministic("shifted", mu + jnp.arange(3.0))
        sg.sample("y", dist.Normal(mu + jnp.arange(3.0), s), obs=y)
    sg.sample("seen", dist.Normal(mu, 1.0), obs=0.5)


def guide(y=None):
    sg.sample("mu", dist.Normal(sg.param("m", 0.0),
                                sg.param("sd", 1.0, dist.constraints.positive)))


def np_model(y=None):
    mu = numpyro.sample("mu", nd.Normal(0.0, 1.0))
    s = numpyro.param("s", 0.5, constraint=nd.constraints.positive)
    numpyro.factor("pull", -0.5 * mu**2)
    with numpyro.plate("data", 3):
        numpyro.deterministic("shifted", mu + jnp.arange(3.0))
        numpyro.sample("y", nd.Normal(mu + jnp.arange(3.0), s), obs=y)
    numpyro.sample("seen", nd.Normal(mu, 1.0), obs=0.5)


def np_guide(y=None):
    numpyro.sample("mu", nd.Normal(numpyro.param("m", 0.0),
                                   numpyro.param("sd", 1.0, constraint=nd.constraints.positive)))


#: trained-looking params: scgjax's unconstrained values, NumPyro's constrained ones
PARAMS = {"m": jnp.array(1.3), "sd": jnp.log(0.2), "s": jnp.log(0.7)}
NP_PARAMS = {"m": 1.3, "sd": 0.2, "s": 0.7}


def assert_same_distribution(ours: dict, theirs: dict) -> None:
    """Same sites, same shapes, and per element the same mean and variance (two-sample
    z-tests); a site that is constant (observed, deterministic of a constant) must be equal."""
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        a = np.asarray(ours[name], np.float64)
        b = np.asarray(theirs[name], np.float64)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        if a.size == 0 or np.all(b == b[:1]):
            np.testing.assert_allclose(a, b, err_msg=name)
            continue
        na, nb = len(a), len(b)
        ma, mb = a.mean(0), b.mean(0)
        va, vb = a.var(0, ddof=1), b.var(0, ddof=1)
        z_mean = (ma - mb) / np.sqrt(va / na + vb / nb)
        # var of a sample variance: (m4 - var^2) / n
        m4a, m4b = ((a - ma) ** 4).mean(0), ((b - mb) ** 4).mean(0)
        z_var = (va - vb) / np.sqrt((m4a - va**2) / na + (m4b - vb**2) / nb)
        assert np.all(np.abs(z_mean) < Z), (name, z_mean)
        assert np.all(np.abs(z_var) < Z), (name, z_var)


# --- Predictive ---------------------------------------------------------------------------------


def test_prior_predictive_matches_numpyro():
    ours = sg.Predictive(model, num_samples=N)(jax.random.key(1))
    theirs = numpyro_draws(jax.random.key(2), model=np_model, num_samples=N)
    # NumPyro's default sites: every sample site (observed ones and factors too), deterministic
    assert sorted(ours) == ["mu", "pull", "seen", "shifted", "y"]
    assert_same_distribution(ours, theirs)
    assert ours["y"].shape == (N, 3) and ours["pull"].shape == (N, 0)
    np.testing.assert_allclose(ours["seen"], 0.5)  # observed: the data, repeated
    y = np.asarray(ours["y"])  # y ~ N(mu + n, s): var 1 + 0.5^2 (s at its initial value)
    assert abs(y[:, 0].var() - 1.25) < Z * 1.25 * math.sqrt(2 / N)


def test_posterior_predictive_from_a_guide_matches_numpyro():
    ours = sg.Predictive(model, guide, PARAMS, num_samples=N)(3)
    theirs = numpyro_draws(jax.random.key(4), model=np_model, guide=np_guide,
                           params=NP_PARAMS, num_samples=N)
    # the sites the guide samples are not returned by default
    assert sorted(ours) == ["pull", "seen", "shifted", "y"]
    assert_same_distribution(ours, theirs)
    # mu ~ q = N(1.3, 0.2), y | mu ~ N(mu + n, 0.7): the trained params reach both programs
    y = np.asarray(ours["y"])
    assert abs(y[:, 0].mean() - 1.3) < Z * math.sqrt(0.53 / N)
    assert abs(y[:, 2].var() - (0.04 + 0.49)) < Z * 0.53 * math.sqrt(2 / N)


def test_predictive_from_posterior_samples_matches_numpyro():
    mu = jax.random.normal(jax.random.key(5), (N,)) * 0.3 + 2.0
    samples = {"mu": mu, "shifted": jnp.zeros((N, 3))}  # deterministic: recomputed
    ours = sg.Predictive(model, params=PARAMS, posterior_samples=samples)(6)
    theirs = numpyro_draws(jax.random.key(7), model=np_model, posterior_samples=samples,
                           params=NP_PARAMS)
    assert_same_distribution(ours, theirs)
    assert sorted(ours) == ["pull", "seen", "shifted", "y"]
    np.testing.assert_allclose(ours["shifted"], mu[:, None] + jnp.arange(3.0), rtol=1e-6)
    residual = np.asarray(ours["y"] - ours["shifted"])  # N(0, 0.7^2), independent of mu
    assert abs(residual.std() - 0.7) < Z * 0.7 / math.sqrt(2 * 3 * N)
    given = sg.Predictive(model, params=PARAMS, posterior_samples=samples,
                          return_sites=["mu", "y"])(6)
    np.testing.assert_array_equal(given["mu"], mu)
    np.testing.assert_array_equal(given["y"], ours["y"])  # the same key: the same draws


def np_ar(length, ys=None):
    def step(x, y):
        x = numpyro.sample("x", nd.Normal(0.9 * x + 0.2, 1.0))
        numpyro.sample("y", nd.Normal(x, 0.5), obs=y)
        return x, x

    return np_scan(step, 0.0, ys, length=length)


def ar(length, ys=None):
    def step(x, y):
        x = sg.sample("x", dist.Normal(0.9 * x + 0.2, 1.0))
        sg.sample("y", dist.Normal(x, 0.5), obs=y)
        return x, x

    return sg.scan(step, 0.0, ys, length=length)


def test_scan_model_matches_numpyro_and_takes_stacked_posterior_samples():
    ours = sg.Predictive(ar, num_samples=N)(8, 4)
    theirs = numpyro_draws(jax.random.key(9), 4, model=np_ar, num_samples=N)
    assert ours["x"].shape == ours["y"].shape == (N, 4)  # a time axis after the samples
    assert_same_distribution(ours, theirs)
    # at a posterior path of x (one per sample, with its time axis), y | x ~ N(x, 0.5)
    xs = jnp.broadcast_to(jnp.arange(4.0), (500, 4))
    got = sg.Predictive(ar, posterior_samples={"x": xs})(10, 4)
    assert sorted(got) == ["y"] and got["y"].shape == (500, 4)
    resid = np.asarray(got["y"] - xs)
    assert np.all(np.abs(resid.mean(0)) < Z * 0.5 / math.sqrt(500))
    with pytest.raises(SiteError, match=r"site 'x' is inside sg.scan 'time' of length 4"):
        sg.Predictive(ar, posterior_samples={"x": jnp.zeros((5, 3))})(0, 4)


def test_chunks_give_the_same_draws():
    """Chunks of 3 of 10 samples (the last one padded), or one sample at a time: the draws
    of one vmap over all 10, exactly."""
    cases = [(lambda **kw: sg.Predictive(model, guide, PARAMS, num_samples=10,
                                         return_sites=["mu", "y"], **kw), (), {"batch_size": 3}),
             (lambda **kw: sg.Predictive(ar, num_samples=10, **kw), (3,), {"parallel": False})]
    for make, args, chunked in cases:
        whole, got = make()(11, *args), make(**chunked)(11, *args)
        assert sorted(got) == sorted(whole) and got[sorted(got)[0]].shape[0] == 10
        for name in whole:
            np.testing.assert_array_equal(got[name], whole[name], err_msg=name)


def test_batch_ndims_and_num_samples():
    samples = {"mu": jnp.arange(6.0).reshape(2, 3)}  # (chains, draws)
    out = sg.Predictive(model, posterior_samples=samples, batch_ndims=2,
                        return_sites=["mu", "y"])(0)
    assert out["y"].shape == (2, 3, 3)
    np.testing.assert_array_equal(out["mu"], samples["mu"])
    with pytest.warns(UserWarning, match="hold 6 samples, not num_samples=5"):
        p = sg.Predictive(model, num_samples=5, posterior_samples={"mu": jnp.zeros(6)})
    assert p.num_samples == 6


def test_errors_name_the_site():
    with pytest.raises(SiteError, match=r"site 'Mu' is in return_sites .*did you mean 'mu'"):
        sg.Predictive(model, num_samples=2, return_sites=["Mu"])(0)
    with pytest.raises(SiteError, match=r"site 'y' has posterior samples with leading \(sample\)"
                       r" shape \(4,\), but site 'mu' has \(5,\)"):
        sg.Predictive(model, posterior_samples={"mu": jnp.zeros(5), "y": jnp.zeros((4, 3))})
    with pytest.warns(UserWarning, match=r"site 'mus' is in posterior_samples but is not a "
                      r"site of the model \(did you mean 'mu'\?\)"):
        sg.Predictive(model, posterior_samples={"mus": jnp.zeros(2)})(0)
    with pytest.warns(UserWarning, match=r"site 'seen' is in posterior_samples but the model "
                      "observes it"):
        sg.Predictive(model, posterior_samples={"seen": jnp.zeros(2)})(0)
    with pytest.raises(TypeError, match="posterior samples go by keyword"):
        sg.Predictive(model, {"mu": jnp.zeros(2)})
    with pytest.raises(ValueError, match="Only one of guide or posterior_samples"):
        sg.Predictive(model, guide, posterior_samples={"mu": jnp.zeros(2)})
    with pytest.raises(ValueError, match="num_samples must be specified"):
        sg.Predictive(model)
    with pytest.raises(TypeError, match=r"write return_sites=\['y'\]"):
        sg.Predictive(model, num_samples=2, return_sites="y")
    with pytest.raises(TypeError, match="batch_size must be None or an int >= 1"):
        sg.Predictive(model, num_samples=2, batch_size=0)
    with pytest.raises(SiteError, match="site 'sd' is a param of the program, but params has no"):
        sg.Predictive(model, guide, {"m": 0.0, "s": 0.0}, num_samples=2)(0)


# --- log marginal likelihood -------------------------------------------------------------------

# z ~ N(0, 1), x | z ~ N(A z + B, S); guide N(C x + D, E), not the posterior
A, B, S, C, D, E = 1.5, 0.3, 0.7, 0.2, -0.1, 0.9
X = np.array([0.4, -1.2, 2.1, 0.0, 1.1])


def lg_model(x):
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(A * z + B, S), obs=x)


def lg_guide(x):
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Normal(C * x + D, E))


def lg_exact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log p(x)`` and ``chi2 = E_q[w^2] / p(x)^2 - 1 = int p(z | x)^2 / q(z) dz - 1``
    (quadrature), per point."""
    sd = math.sqrt(A**2 + S**2)
    log_p = -0.5 * ((x - B) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)
    precision = 1.0 + A**2 / S**2
    post_mean, post_sd = A * (x - B) / S**2 / precision, 1.0 / math.sqrt(precision)
    z = np.linspace(-12, 12, 200_001)[:, None]
    normal = lambda v, m, s: np.exp(-0.5 * ((v - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    ratio = normal(z, post_mean, post_sd) ** 2 / normal(z, C * x + D, E)
    chi2 = ratio.sum(0) * (z[1, 0] - z[0, 0]) - 1.0
    return log_p, chi2


K, REPS = 4096, 8


@pytest.mark.parametrize("chunk", [None, 1000, 3000])  # one IWAE(K); 4 chunks + 96; 1 + 1096
def test_log_marginal_likelihood_is_log_p_within_its_standard_error(chunk):
    log_p, chi2 = lg_exact(X)
    xs = jnp.asarray(np.tile(X, REPS))  # REPS independent estimates per point
    got = sg.log_marginal_likelihood(jax.random.key(12), {}, lg_model, lg_guide, xs,
                                     num_particles=K, chunk_size=chunk, per_element=True)
    assert got.shape == (REPS * len(X),)
    got = np.asarray(got, np.float64).reshape(REPS, len(X)).mean(0)
    se, bias = np.sqrt(chi2 / K / REPS), chi2 / (2 * K)
    assert np.all(np.abs(got - log_p) < Z * se + bias), (got - log_p, se)
    assert np.all(se < 0.01)  # the bound is tight enough to fail
    # the ELBO (analytic) is well below log p(x): a wrong combination of the chunks (a mean of
    # their bounds, say, which tends to L_C < L_K) would be caught
    m = C * X + D  # E_q[log N(z; 0, 1) + log N(x; A z + B, S)] + H[q]
    elbo = (-0.5 * (m**2 + E**2) - 0.5 * ((X - A * m - B) ** 2 + A**2 * E**2) / S**2
            - math.log(S) - 0.5 * math.log(2 * math.pi) + math.log(E) + 0.5)
    assert np.all(log_p - elbo > 20 * (Z * se + bias))


def test_unchunked_is_iwae_and_one_particle_chunks_combine_exactly():
    x, key = jnp.asarray(X), jax.random.key(13)
    iwae = jax.jit(lambda k, x: -sg.IWAE(num_particles=8).loss(k, {}, lg_model, lg_guide, x))(
        key, x)
    whole = sg.log_marginal_likelihood(key, {}, lg_model, lg_guide, x, num_particles=8)
    np.testing.assert_allclose(whole, iwae, rtol=1e-6)  # the same particles (jitted apart)
    # chunks of one particle get the keys split(key, 8), the keys IWAE(8) gives its particles:
    # logsumexp_j (L^(j) + log 1) - log 8 must be IWAE(8)'s bound, up to rounding
    ones = sg.log_marginal_likelihood(key, {}, lg_model, lg_guide, x, num_particles=8,
                                      chunk_size=1, per_element=True)
    assert ones.shape == (5,)
    np.testing.assert_allclose(ones.sum(), iwae, rtol=1e-5)


def test_per_element_layout_costs_without_latents_and_global_terms():
    def nested(x):
        with sg.plate("a", 2):
            with sg.plate("b", 3):  # dim -2
                z = sg.sample("z", dist.Normal(0.0, 1.0))
                sg.sample("x", dist.Normal(z, 1.0), obs=x)

    def nested_guide(x):
        with sg.plate("a", 2), sg.plate("b", 3):
            sg.sample("z", dist.Normal(0.5 * x, 0.8))

    x = jnp.arange(6.0).reshape(3, 2) / 3
    got = sg.log_marginal_likelihood(0, {}, nested, nested_guide, x, num_particles=2000,
                                     per_element=True)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    assert got.shape == (3, 2)  # batch order: plate b (dim -2) first
    np.testing.assert_allclose(got, exact, atol=0.05)

    def with_prior(x):  # a global term that no latent reaches, and an observed site
        w = sg.param("w", 0.3)
        sg.factor("prior", -0.5 * w**2)
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Bernoulli(0.3))
            sg.sample("x", dist.Normal(2.0 * z + w, 1.0), obs=x)

    def discrete_guide(x):  # trained with a relaxation: the estimate samples z itself
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Bernoulli(logits=x - 1.0),
                      estimator=sg.GumbelSoftmax(0.5))

    x = jnp.array([-0.5, 1.0, 2.5])
    params = sg.init_params(0, with_prior, discrete_guide, x)
    exact = (np.log(0.7 * np.exp(dist.Normal(0.3, 1.0).log_prob(x))
                    + 0.3 * np.exp(dist.Normal(2.3, 1.0).log_prob(x)))).sum() - 0.5 * 0.09
    total = sg.log_marginal_likelihood(1, params, with_prior, discrete_guide, x,
                                       num_particles=3000, chunk_size=1000)
    assert total.shape == () and abs(float(total) - exact) < 0.02
    with pytest.raises(SiteError, match="site 'prior' is a cost that no latent reaches"):
        sg.log_marginal_likelihood(1, params, with_prior, discrete_guide, x, num_particles=4,
                                   per_element=True)


def test_log_marginal_likelihood_argument_errors():
    x = jnp.asarray(X)
    with pytest.raises(TypeError, match="the order is log_marginal_likelihood"):
        sg.log_marginal_likelihood(0, lg_model, lg_guide, {}, x, num_particles=4)
    with pytest.raises(ValueError, match="num_particles must be an int >= 1"):
        sg.log_marginal_likelihood(0, {}, lg_model, lg_guide, x, num_particles=0)
    with pytest.raises(TypeError, match="chunk_size must be None or an int >= 1"):
        sg.log_marginal_likelihood(0, {}, lg_model, lg_guide, x, num_particles=4,
                                   chunk_size=2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious warning for a plain call
        sg.log_marginal_likelihood(0, {}, lg_model, lg_guide, x, num_particles=4)
