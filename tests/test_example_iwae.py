"""Smoke test of ``examples/iwae_mnist.py`` and checks of its bound evaluation.

``main(argv)`` runs in-process for a few steps on the tiny synthetic gzipped-IDX MNIST of
``tests/test_examples.py`` (no network, no real data). Its chunked ``L_K`` evaluation is
checked where the answer is known: without latents every bound is ``log p(x)`` exactly, and on a
linear-Gaussian model ``L_5000`` is ``log p(x)`` up to Monte Carlo error while the ELBO is
analytic and well below it.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.data import dynamic_binarize
from tests.test_examples import _load, _offline, data_dir  # noqa: F401  (fixtures: by name)

PNGS = ("bounds.png", "samples.png")
STEPS, N_EVAL, K_EVAL = 10, 8, 200


@pytest.mark.parametrize("method", ["iwae-dreg", "rws-dreg"])
def test_iwae_mnist_dreg_methods_and_the_snr_plot(data_dir, tmp_path, capsys, method):  # noqa: F811
    iwae = _load("iwae_mnist")
    out = tmp_path / method
    run = iwae.main(["--steps", "3", "--batch-size", "8", "--particles-list", "2,16",
                     "--eval-particles", "20", "--eval-images", "4", "--no-progress",
                     "--latent-dim", "3", "--hidden", "16", "--method", method,
                     "--snr-keys", "64", "--data-dir", str(data_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert run["method"] == method and f"IWAE ({method})" in printed
    assert run["paths"]["snr"].is_file() and run["paths"]["snr"].stat().st_size > 1000
    snr = run["snr"]
    assert set(snr) == {"iwae", "iwae-dreg"} and all(len(v) == 2 for v in snr.values())
    # Rainforth et al.: from K = 2 to 16, IWAE's guide SNR falls and DReG's does not fall as much
    assert snr["iwae"][1] < snr["iwae"][0]
    assert snr["iwae-dreg"][1] / snr["iwae-dreg"][0] > snr["iwae"][1] / snr["iwae"][0]


def test_iwae_mnist_smoke(data_dir, tmp_path, capsys):  # noqa: F811
    iwae = _load("iwae_mnist")
    out = tmp_path / "iwae"
    run = iwae.main(["--steps", str(STEPS), "--batch-size", "16", "--particles-list", "1,5",
                     "--eval-particles", str(K_EVAL), "--eval-images", str(N_EVAL),
                     "--no-progress", "--latent-dim", "4", "--hidden", "32",
                     "--data-dir", str(data_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    for name in PNGS:
        path = run["paths"][name.removesuffix(".png")]
        assert path == out / name and path.is_file() and path.stat().st_size > 1000, name
    assert "test L_200" in printed and "ms/step" in printed and "IDX files in" in printed
    assert run["particles"] == [1, 5] and run["best"] in (1, 5)
    assert run["eval_particles"] == K_EVAL and run["eval_images"] == N_EVAL

    # The evaluation images, as the script binarises them.
    common = iwae.common
    images = common.load_data(data_dir).test
    xs = dynamic_binarize(jax.random.key(iwae.TEST_BINARIZATION_SEED), images)[:N_EVAL]
    model, guide = iwae.build(4, 32)
    objective, reps = sg.ELBO(num_particles=250), 8

    @jax.jit
    def elbos(params, keys):  # per-image ELBO on the evaluation images, `reps` estimates
        return jax.vmap(lambda key: -objective.loss(key, params, model, guide, xs))(keys) / N_EVAL

    for k, res in run["results"].items():
        for name in ("train_bound", "test_elbo", "test_bound", "test_bound_eval"):
            assert math.isfinite(res[name]) and -800 < res[name] < 0, (k, name, res[name])
        assert res["bound_per_step"].shape == (STEPS,)
        assert np.all(np.isfinite(res["bound_per_step"]))
        assert res["seconds_per_step"] > 0 and res["order_ok"]
        if k == 1:
            assert res["test_bound"] == res["test_elbo"]

        # L_200 >= ELBO on the evaluation images, at the trained params. The ELBO is the
        # library's, averaged over reps x 250 particles per image. Per image, the script's L_200
        # is at least the mean of its own 200 log-weights (Jensen), whose mean over the images
        # has 250 / 200 times the variance of one rep.
        got = np.asarray(elbos(res["params"], jax.random.split(jax.random.key(7), reps)),
                         dtype=np.float64)
        var = got.var(ddof=1)
        tolerance = 5.0 * math.sqrt(1.25 * var + var / reps)
        assert res["test_bound_eval"] >= got.mean() - tolerance, (k, got, tolerance)
        assert tolerance < 5.0  # the check has the power to fail


def test_parse_particles():
    iwae = _load("iwae_mnist")
    parser = argparse.ArgumentParser()
    assert iwae.parse_particles(
        parser, argparse.Namespace(num_particles=None, particles_list="1, 5,50,5")) == [1, 5, 50]
    assert iwae.parse_particles(
        parser, argparse.Namespace(num_particles=7, particles_list="1,5")) == [7]
    for bad in ("1,x", "0,5", ""):
        with pytest.raises(SystemExit):
            iwae.main(["--particles-list", bad, "--no-progress"])


def test_particle_chunks():
    chunks = _load("iwae_mnist").particle_chunks
    assert chunks(5000, 500, 25_000) == (50, 100, 0)
    assert chunks(5000, 40, 280) == (7, 714, 2)
    assert chunks(3, 10, 25_000) == (3, 1, 0)
    assert chunks(50, 100_000, 25_000) == (1, 50, 0)  # at least one particle per image


def test_bounds_without_latents_are_exact():
    """No latents: every L_K is log p(x) exactly, through the chunks and the remainder."""
    iwae = _load("iwae_mnist")

    def model(x, num=None):
        logits = sg.param("logits", jnp.linspace(-2.0, 2.0, 784))
        with sg.plate("data", x.shape[0]):
            sg.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x, num=None):
        pass

    images = (np.random.default_rng(0).random((40, 784)) < 0.3).astype(np.float32)
    params = sg.init_params(0, model, guide, jnp.asarray(images))
    logits = np.linspace(-2.0, 2.0, 784)
    exact = np.sum(images * logits - np.logaddexp(0.0, logits), axis=1)
    for k in (1, 5000):  # 5000 = 714 chunks of 7, then 2
        got = iwae.evaluate_bounds(model, guide, params, jnp.asarray(images),
                                   jax.random.key(0), num_particles=k, max_batch=280)
        np.testing.assert_allclose(np.asarray(got), exact, rtol=1e-5)


# Linear-Gaussian: z ~ N(0, 1), x | z ~ N(A z + B, S); guide N(C x + D, E), not the posterior.
A, B, S, C, D, E = 1.5, 0.3, 0.7, 0.2, -0.1, 0.9


def _lg_model(x, num=None):
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(A * z + B, S), obs=x)


def _lg_guide(x, num=None):
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Normal(C * x + D, E))


def _normal_logpdf(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


def test_bounds_match_exact_log_likelihood_on_a_linear_gaussian():
    """The K = 1 bound is the analytic ELBO, and L_5000 is log p(x) up to Monte Carlo error
    (well above the ELBO: the guide is not the posterior)."""
    iwae = _load("iwae_mnist")
    x = np.asarray([0.4, -1.2, 2.1, 0.0, 1.1], dtype=np.float64)
    log_evidence = _normal_logpdf(x, B, math.sqrt(A**2 + S**2))
    m = C * x + D  # E_q[log N(z; 0, 1) + log N(x; A z + B, S)] + H[q]
    elbo = (-0.5 * (m**2 + E**2) - 0.5 * math.log(2 * math.pi)
            - 0.5 * ((x - A * m - B) ** 2 + A**2 * E**2) / S**2 - math.log(S)
            - 0.5 * math.log(2 * math.pi) + math.log(E) + 0.5 * math.log(2 * math.pi) + 0.5)
    assert np.all(log_evidence - elbo > 0.1)

    def bounds(k: int, reps: int, max_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard error of ``reps`` draws of L_k per point."""
        xs = jnp.asarray(np.tile(x, reps), dtype=jnp.float32)
        got = iwae.evaluate_bounds(_lg_model, _lg_guide, {}, xs, jax.random.key(k),
                                   num_particles=k, max_batch=max_batch)
        got = np.asarray(got, dtype=np.float64).reshape(reps, len(x))
        return got.mean(axis=0), got.std(axis=0, ddof=1) / math.sqrt(reps)

    l1, se1 = bounds(1, 400, 50_000)
    np.testing.assert_array_less(np.abs(l1 - elbo), 5 * se1)

    # L_5000 (chunks of 128 particles and a remainder of 8), 20 draws per point: within 5
    # standard errors (about 0.015 nats) of log p(x); its bias, var(w) / (2 K p(x)^2), is below
    # 2e-4 nats here.
    l5000, se5000 = bounds(5000, 20, 5 * 20 * 128)
    np.testing.assert_array_less(np.abs(l5000 - log_evidence), 5 * se5000 + 2e-4)
    assert np.all(se5000 < 0.01)
