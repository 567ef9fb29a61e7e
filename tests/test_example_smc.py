"""Tests of ``examples/smc_state_space.py``: the Kalman log-likelihood against the Gaussian
density of the whole sequence, the Kalman MLE is a maximum, the example's programs give the
exact ``log p(y_1)`` at the locally optimal proposal, the benchmark's SMC estimate against
quadrature, the gradient helper against the ELBO's exact gradient, and a smoke run of ``main``.

The example is loaded from its file path, as in ``tests/test_examples.py``.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from tests.test_bench_report import _report
from tests.test_examples import _load


@pytest.fixture(scope="module")
def smc():
    return _load("smc_state_space")


@pytest.fixture
def fast_compile():
    """XLA's optimisations off: a smoke run's programs compile several times faster."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def gaussian_log_lik(ys, a, q, r):
    """``log N(y; 0, Σ)`` in float64 with ``Σ = Cov(z) + r I``, ``Cov(z_i, z_j) = q Σ_{s <=
    min(i, j)} a^{i-s} a^{j-s}`` (``z_0 = 0``)."""
    ys = np.asarray(ys, np.float64)
    n = len(ys)
    cov = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            cov[i, j] = q * sum(a ** (i - s) * a ** (j - s) for s in range(min(i, j) + 1))
    cov += r * np.eye(n)
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (n * math.log(2 * math.pi) + logdet + ys @ np.linalg.solve(cov, ys))


@pytest.mark.parametrize("a, q, r", [(0.9, 1.0, 0.5), (-0.4, 0.3, 2.0)])
def test_kalman_filter_is_the_gaussian_density(smc, a, q, r):
    _, ys = smc.simulate_lgssm(7, 3, a=a, q=q, r=r)
    got = float(jax.jit(smc.kalman_log_lik)(jnp.asarray(ys), a, q, r))
    assert got == pytest.approx(gaussian_log_lik(ys, a, q, r), abs=2e-4)


def test_kalman_mle_is_a_maximum(smc):
    _, ys = smc.simulate_lgssm(100, (0, 0))
    mle = smc.kalman_mle(jnp.asarray(ys), steps=1500)
    assert mle["grad_norm"] < 1e-2
    assert -1 < mle["a"] < 1 and mle["q"] > 0 and mle["r"] > 0
    exact = jax.jit(smc.kalman_log_lik)
    assert mle["loglik"] == pytest.approx(float(exact(ys, mle["a"], mle["q"], mle["r"])),
                                          abs=1e-3)
    assert mle["loglik"] >= float(exact(ys, **smc.LGSSM_TRUE))
    for name, step in (("a", 0.02), ("q", 0.1), ("r", 0.05)):
        for sign in (-1, 1):
            moved = {k: mle[k] for k in ("a", "q", "r")}
            moved[name] += sign * step
            assert float(exact(ys, **moved)) < mle["loglik"], (name, sign)


def test_every_bound_is_exact_at_one_step_with_the_optimal_proposal(smc, fast_compile):
    """At T = 1 the locally optimal proposal is the posterior: every weight is p(y_1)."""
    theta = jnp.array([0.9, 1.3, 0.4])
    phi = smc.optimal_params(*theta)
    ys = jnp.array([0.7])
    exact = float(smc.kalman_log_lik(ys, *theta))
    for name, make in smc.METHODS.items():
        objective = make(4)
        value = -jax.jit(lambda key, objective=objective: objective.loss(
            key, {}, smc.lgssm_at, smc.proposal_at, ys, theta, phi))(jax.random.key(0))
        assert float(value) == pytest.approx(exact, abs=1e-4), name


def test_benchmark_estimate_against_quadrature(smc, fast_compile):
    """T = 2: log p(y_1, y_2) by a grid over (x_1, x_2) against the SMC estimate (the log of
    the mean of Z_hat over 8 runs of K = 2000)."""
    q, r = 10.0, 1.0
    _, ys = smc.simulate_benchmark(2, 5, q=q, r=r)
    grid = np.linspace(-30, 30, 1201)
    dx = grid[1] - grid[0]

    def normal(x, m, v):
        return np.exp(-0.5 * (x - m) ** 2 / v) / np.sqrt(2 * np.pi * v)

    f1 = np.asarray(smc.growth(0.0, 1.0), np.float64)
    first = normal(grid, f1, q) * normal(ys[0], grid ** 2 / 20, r)  # (x_1,)
    f2 = np.asarray(smc.growth(grid, 2.0), np.float64)
    second = normal(grid[None], f2[:, None], q) * normal(ys[1], grid[None] ** 2 / 20, r)
    exact = math.log(float(first @ second.sum(1)) * dx * dx)
    est = smc.benchmark_log_lik(jax.random.key(0), jnp.asarray(ys)[None], q, r, 2000, 8)
    assert est.shape == (1, 8)
    log_mean = float(jax.nn.logsumexp(est[0]) - math.log(8))
    assert log_mean == pytest.approx(exact, abs=0.1), (log_mean, exact, est)


def test_bound_gradients_of_the_elbo_are_unbiased_at_one_step(smc):
    """T = 1 with the proposal fixed: the ELBO's gradient in (a, q, r) is
    E_q[d/dθ (log N(z; 0, q) + log N(y; z, r))] with z ~ N(b_g y, s_g²)."""
    theta = jnp.array([0.9, 1.3, 0.4])
    phi = jnp.array([0.9, 0.6, 0.5])
    y = 0.7
    grads = smc.bound_gradients(sg.ELBO(), jnp.array([y]), theta, phi, 4000,
                                jax.random.key(1))
    q, r = float(theta[1]), float(theta[2])
    m, v = float(phi[1]) * y, float(phi[2]) ** 2
    exact = np.array([0.0, -0.5 / q + 0.5 * (v + m * m) / q**2,
                      -0.5 / r + 0.5 * (v + (y - m) ** 2) / r**2])
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert grads.shape == (4000, 3)
    assert np.all(np.abs(mean - exact) < 5 * se + 1e-6), (mean, exact, se)


def test_flags_are_checked(smc):
    for argv in (["--steps", "0"], ["--lr", "0"], ["--horizons", "0,10"], ["--horizons", "x"],
                 ["--num-particles", "-1"], ["--bound-runs", "1"]):
        with pytest.raises(SystemExit):
            smc.parse(argv)
    full, quick = smc.parse([]), smc.parse(["--quick"])
    assert full.steps == 5000 and full.num_particles == 32 and full.horizons == (10, 30, 100, 300)
    assert quick.steps < full.steps and quick.horizons == (10, 30)
    assert smc.parse(["--quick", "--steps", "7", "--horizons", "20,5"]).horizons == (5, 20)


def test_main_smoke(smc, tmp_path, capsys, fast_compile):
    result = smc.main(["--quick", "--steps", "30", "--length", "30", "--eval-particles", "100",
                       "--bound-runs", "10", "--horizons", "30", "--no-progress",
                       "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Kalman" in out and "held-out" in out and "bootstrap proposal" in out
    for name in ("training.png", "bounds_vs_T.png", "params.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 1000, path
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"lgssm", "benchmark", "bounds", "args"}

    lg = result["lgssm"]
    assert set(lg["methods"]) == {"SMC", "IWAE", "ELBO"}
    for name, fit in lg["methods"].items():
        assert fit["losses"].shape == (30,) and np.all(np.isfinite(fit["losses"])), name
        p = fit["params"]
        assert -1 < p["a"] < 1 and p["q"] > 0 and p["r"] > 0 and p["s_g"] > 0
        assert fit["loglik"] <= lg["mle"]["loglik"] + 1e-3, name  # the MLE is the maximum
        assert math.isfinite(fit["held_out"])
    assert lg["mle"]["loglik"] >= lg["true"]["loglik"]

    nl = result["benchmark"]
    for name, fit in [("true", nl["true"]), *nl["methods"].items()]:
        for key in ("loglik", "held_out"):
            assert math.isfinite(fit[key]), (name, key)
    for name, fit in nl["methods"].items():
        p = fit["params"]
        assert p["q"] > 0 and p["r"] > 0 and 0 < p["w_g"] < 1, name

    sweep = result["bounds"]
    assert sweep["horizons"] == [30] and len(sweep["exact"]) == 1
    for prop in ("bootstrap", "optimal"):
        gaps = {m: sweep["proposals"][prop][m]["gap"][-1] for m in ("SMC", "IWAE", "ELBO")}
        assert max(gaps["SMC"], gaps["IWAE"]) < gaps["ELBO"], (prop, gaps)
        if prop == "bootstrap":  # tens of nats apart at T = 30
            assert gaps["SMC"] < gaps["IWAE"], gaps
        for m, entry in sweep["proposals"][prop].items():  # each is a lower bound
            assert all(g > -4 * s - 0.05 for g, s in zip(entry["gap"], entry["se"],
                                                          strict=True)), (prop, m)

    text = _report().smc_table(result)  # the table of bench/report.py's examples section
    assert "| MLE (Kalman) |" in text and "| SMC |" in text and "ELBO gap (bootstrap)" in text
