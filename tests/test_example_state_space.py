"""Tests of ``examples/state_space.py``: the returns load from the file inside ``vega_datasets``
(no network), the ELBO gradient through ``sg.scan`` is unbiased against the exact ELBO (closed
form for this model and guide: Gaussian guide, log-normal moments) and has the same mean as the
same model and guide written as Python loops, and a smoke run of ``main``.

The example is loaded from its file path, as in ``tests/test_examples.py``.
"""

from __future__ import annotations

import functools
import math
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from tests.stats import assert_unbiased, grad_samples, mean_and_se
from tests.test_examples import _load

pytest.importorskip("vega_datasets")

T_SMALL, SYMBOLS = 8, ("AAPL", "IBM")  # a short window of two stocks for the gradient tests
NUM_SAMPLES = 2000
C = dist.constraints


@pytest.fixture(scope="module")
def ss():
    return _load("state_space")


@pytest.fixture(scope="module")
def short(ss):
    return jnp.asarray(ss.load_returns(SYMBOLS).returns[:T_SMALL])


def test_returns_load_from_the_package_without_network(ss, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("state_space tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    data = ss.load_returns()
    assert data.symbols == ("AAPL", "AMZN", "IBM", "MSFT")
    assert data.returns.shape == (122, 4) and data.returns.dtype == np.float32
    assert str(data.dates[0])[:7] == "2000-02" and str(data.dates[-1])[:7] == "2010-03"
    np.testing.assert_allclose(data.returns.mean(0), 0.0, atol=1e-6)  # centred per stock
    source = Path(data.source)
    assert source.is_file() and source.name == "stocks.csv"
    assert "vega_datasets" in source.parts  # the file inside the installed package
    # MSFT closed at 39.81 in January 2000 and 36.35 in February
    msft = data.symbols.index("MSFT")
    assert data.returns[0, msft] + data.means[msft] == pytest.approx(math.log(36.35 / 39.81),
                                                                     abs=1e-5)
    with pytest.raises(ValueError, match="lack some"):
        ss.load_returns(["GOOG"])  # from August 2004 only
    with pytest.raises(ValueError, match="unknown"):
        ss.load_returns(["XYZ"])


def test_sites_have_a_time_axis_in_front_of_the_plate(ss, short):
    params = sg.init_params(0, ss.model, ss.guide, short)
    assert params["h_loc"].shape == (T_SMALL, 2)
    tr = sg.handlers.trace_program(ss.guide, 0, params, short)
    assert tr["h"]["value"].shape == (T_SMALL, 2)
    scg = sg.graph(ss.model, ss.guide, short)
    assert scg.nodes["h"].plates == ("time", "stocks")
    assert scg.nodes["h"].reparameterisable
    assert isinstance(scg.nodes["h"].estimator, sg.Pathwise)  # the default for a Normal
    assert scg.nodes["h"].batch_shape == (T_SMALL, 2)


# --- the ELBO gradient through the scan ---------------------------------------------------


def model_loop(returns):
    """``state_space.model`` as a Python loop: sites ``h0 .. h{T-1}``, ``r0 ..``."""
    num_steps, num_series = returns.shape
    mu = sg.param("mu", jnp.full(num_series, -5.0))
    phi = sg.param("phi", jnp.full(num_series, 0.8), C.interval(-1.0, 1.0))
    sigma = sg.param("sigma", jnp.full(num_series, 0.3), C.positive)
    h = mu
    with sg.plate("stocks", num_series):
        for t in range(num_steps):
            scale = sigma / jnp.sqrt(1.0 - phi**2) if t == 0 else sigma
            h = sg.sample(f"h{t}", dist.Normal(mu + phi * (h - mu), scale))
            sg.sample(f"r{t}", dist.Normal(0.0, jnp.exp(h / 2)), obs=returns[t])


def guide_loop(returns):
    """``state_space.guide`` (Markov) as a Python loop."""
    num_steps, num_series = returns.shape
    loc = sg.param("h_loc", jnp.full((num_steps, num_series), -5.0))
    scale = sg.param("h_scale", jnp.full((num_steps, num_series), 0.3), C.positive)
    coupling = sg.param("h_coupling", jnp.full(num_series, 0.5), C.interval(-1.0, 1.0))
    h = loc[0]
    with sg.plate("stocks", num_series):
        for t in range(num_steps):
            prev = loc[max(t - 1, 0)]
            h = sg.sample(f"h{t}", dist.Normal(loc[t] + coupling * (h - prev), scale[t]))


def exact_elbo(p, returns):
    """The ELBO in closed form (constrained params ``p``): under the Markov guide ``h_t`` has
    mean ``m_t``, variance ``v_t = c² v_{t-1} + s_t²`` and ``Cov(h_t, h_{t-1}) = c v_{t-1}``;
    ``E[exp(-h)] = exp(-m + v/2)``; the guide's entropy is ``Σ log s_t + const``."""
    mu, phi, sigma = p["mu"], p["phi"], p["sigma"]
    m, s, c = p["h_loc"], p["h_scale"], p["h_coupling"]
    log2pi = jnp.log(2 * jnp.pi)
    total = 0.0
    v_prev = None
    for t in range(returns.shape[0]):
        if t == 0:
            v = s[0] ** 2
            var0 = sigma**2 / (1 - phi**2)
            sq = v + (m[0] - mu) ** 2
            total += -0.5 * log2pi - 0.5 * jnp.log(var0) - 0.5 * sq / var0
        else:
            v = c**2 * v_prev + s[t] ** 2
            cov = c * v_prev
            sq = (v + phi**2 * v_prev - 2 * phi * cov
                  + (m[t] - mu - phi * (m[t - 1] - mu)) ** 2)
            total += -0.5 * log2pi - jnp.log(sigma) - 0.5 * sq / sigma**2
        # E[log N(r; 0, exp(h/2))] = -log 2π/2 - E[h]/2 - r² E[exp(-h)]/2
        total += -0.5 * log2pi - 0.5 * m[t] - 0.5 * returns[t] ** 2 * jnp.exp(-m[t] + v / 2)
        total += 0.5 * log2pi + 0.5 + jnp.log(s[t])  # the guide's entropy, step t
        v_prev = v
    return jnp.sum(total)


@pytest.fixture(scope="module")
def gradients(ss, short):
    """Unconstrained params away from their initial values, the exact ELBO gradient, and
    gradient samples of the scan and the loop programs (``sg.ELBO``, one particle)."""
    params = sg.init_params(0, ss.model, ss.guide, short)
    # a guide near the data's scale, not yet at the optimum, and a coupling of about 0.3
    key1, key2 = jax.random.split(jax.random.key(7))
    params = dict(params)
    params["h_loc"] = jnp.log(short**2 + 1e-3) + 0.3 * jax.random.normal(key1, short.shape)
    params["h_scale"] = jnp.log(0.4) + 0.2 * jax.random.normal(key2, short.shape)
    params["h_coupling"] = jnp.full(2, 0.6)  # unconstrained: tanh-like, about 0.3
    params["mu"] = jnp.array([-4.5, -5.5])

    def exact(unconstrained):
        return exact_elbo(sg.constrain_params(unconstrained, ss.model, ss.guide, short), short)

    objective = sg.ELBO()
    scan = grad_samples(lambda key, p: objective.loss(key, p, ss.model, ss.guide, short),
                        params, NUM_SAMPLES)
    loop = grad_samples(lambda key, p: objective.loss(key, p, model_loop, guide_loop, short),
                        params, NUM_SAMPLES, seed=1)
    values = jax.jit(jax.vmap(lambda key: -objective.loss(key, params, ss.model, ss.guide,
                                                          short)))(
        jax.random.split(jax.random.key(3), NUM_SAMPLES))
    return {"params": params, "exact": jax.grad(exact)(params), "exact_value": exact(params),
            "scan": scan, "loop": loop, "values": values}


def test_elbo_value_through_the_scan_is_the_exact_elbo(gradients):
    mean, se = mean_and_se(gradients["values"])
    assert abs(mean - float(gradients["exact_value"])) < 5 * se + 1e-3, (
        mean, se, gradients["exact_value"])


def test_elbo_gradient_through_the_scan_is_unbiased(gradients):
    assert_unbiased(gradients["scan"], gradients["exact"])


def test_elbo_gradient_of_the_scan_matches_the_python_loop(gradients):
    assert_unbiased(gradients["loop"], gradients["exact"])  # the reference itself is right
    for name in gradients["exact"]:
        (m1, s1), (m2, s2) = (mean_and_se(gradients[k][name]) for k in ("scan", "loop"))
        assert np.all(np.abs(m1 - m2) < 5 * np.hypot(s1, s2) + 1e-6), name
        # the same estimator (pathwise through the same draws' distribution): similar spread
        ratio = np.var(np.asarray(gradients["scan"][name]), 0).sum() / \
            np.var(np.asarray(gradients["loop"][name]), 0).sum()
        assert 0.7 < ratio < 1.4, (name, ratio)


# --- the script -----------------------------------------------------------------------------


def test_flags_are_checked(ss):
    for argv in (["--steps", "0"], ["--lr", "0"], ["--symbols", ","], ["--pf-particles", "0"],
                 ["--guide", "full"]):
        with pytest.raises(SystemExit):
            ss.parse(argv)
    assert ss.parse([]).steps == 4000 and ss.parse(["--quick"]).steps < 1000
    assert ss.parse(["--quick", "--steps", "7"]).steps == 7
    assert ss.parse(["--symbols", "ibm,msft"]).symbols == ("IBM", "MSFT")


@pytest.fixture
def fast_compile():
    """XLA's optimisations off: a smoke run's programs compile about 2x faster."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_main_smoke(ss, tmp_path, capsys, fast_compile):
    result = ss.main(["--quick", "--steps", "40", "--eval-particles", "16",
                      "--pf-particles", "64", "--symbols", "IBM,MSFT", "--no-progress",
                      "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "IWAE" in out and "log p(r)" in out and "stocks.csv" in out
    for name in ("volatility.png", "elbo.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 1000, path
    assert set(result["fits"]) == {"markov", "meanfield"}
    num_steps = result["data"].returns.shape[0]
    for name, fit in result["fits"].items():
        assert fit["losses"].shape == (40,) and np.all(np.isfinite(fit["losses"])), name
        for key in ("elbo", "iwae", "loglik"):
            assert math.isfinite(fit[key]), (name, key)
        assert fit["h_mean"].shape == fit["h_sd"].shape == (num_steps, 2)
        assert np.all(fit["h_sd"] > 0)
        assert np.all(np.abs(fit["params"]["phi"]) < 1) and np.all(fit["params"]["sigma"] > 0)
    assert "h_coupling" in result["fits"]["markov"]["params"]
    assert "h_coupling" not in result["fits"]["meanfield"]["params"]


def test_particle_filter_is_exact_without_dynamics(ss):
    """With ``phi = 0`` the months are independent and ``log p(r)`` is a one-dimensional
    integral per month: Gauss-Hermite quadrature against the filter."""
    returns = jnp.asarray([[0.1, -0.05], [-0.2, 0.02], [0.05, 0.1]])
    mu, phi, sigma = jnp.array([-4.0, -5.0]), jnp.zeros(2), jnp.array([0.5, 0.8])
    x, w = np.polynomial.hermite_e.hermegauss(80)
    h = mu[None, None] + sigma[None, None] * x[:, None, None]  # (nodes, 1, S)
    dens = jnp.exp(dist.Normal(0.0, jnp.exp(h / 2)).log_prob(returns[None]))
    exact = jnp.sum(jnp.log(jnp.tensordot(w / w.sum(), dens, axes=1)), axis=0)
    estimate = jax.jit(functools.partial(ss.particle_filter_loglik, num_particles=20000))(
        jax.random.key(0), mu, phi, sigma, returns)
    np.testing.assert_allclose(estimate, exact, atol=0.02)
