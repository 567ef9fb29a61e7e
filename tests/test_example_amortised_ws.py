"""Tests of ``examples/amortised_ws.py``: the Gabor ring data, the alignment metric, smoke runs
of both experiments (MNIST from a tiny synthetic IDX set, offline) and a short ring run that
must learn the rotation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from tests.test_examples import _load, _offline, data_dir  # noqa: F401  (fixtures)

RING_PNGS = ("ring_patches.png", "ring_training.png")
MNIST_PNGS = ("mnist_samples.png", "mnist_training.png")


@pytest.fixture(scope="module")
def alws():
    return _load("amortised_ws")


def _check_pngs(out, names) -> None:
    for name in names:
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, name


def test_gabor_patch_shape_and_periodicity(alws):
    assert alws.gabor_patch(0.3).shape == (256,)
    assert alws.gabor_patch(np.zeros((2, 5))).shape == (2, 5, 256)
    a = np.random.default_rng(0).uniform(-np.pi, np.pi, 50)
    patches = alws.gabor_patch(a)
    assert np.abs(patches).max() <= 1.0 and patches.std() > 0.1
    # the circle: one full turn of a is the identity ...
    np.testing.assert_allclose(alws.gabor_patch(a + 2 * np.pi), patches, atol=1e-12)
    # ... and a quarter turn (a 45 degree rotation of the grating) or a half turn (90 degrees)
    # changes every patch substantially
    for shift in (np.pi / 2, np.pi):
        diff = np.mean((alws.gabor_patch(a + shift) - patches) ** 2, axis=1)
        assert diff.min() > 0.01, (shift, diff.min())


def test_ring_data(alws):
    images, angles = alws.make_ring_data(2000, seed=0)
    assert images.shape == (2000, 256) and images.dtype == np.float32
    assert angles.min() >= -np.pi and angles.max() < np.pi
    assert abs(angles.mean()) < 0.15 and abs(angles.std() - np.pi / np.sqrt(3)) < 0.1
    residual = images - alws.gabor_patch(angles)
    assert residual.std() == pytest.approx(alws.RING_NOISE, rel=0.02)


@pytest.mark.parametrize("sign, offset", [(1, 0.0), (1, 2.5), (-1, 1.234), (-1, -3.0)])
def test_alignment_is_zero_for_rotated_or_reflected_truth(alws, sign, offset):
    angles = np.linspace(-np.pi, np.pi, 32, endpoint=False)
    fit = alws.align(alws.gabor_patch(sign * angles + offset), angles)
    assert fit.mse < 1e-12 and fit.sign == sign
    assert abs(math.remainder(fit.offset - offset, 2 * np.pi)) < 1e-6


def test_alignment_of_a_constant_patch_is_the_baseline(alws):
    """The mean patch is equally far from every alignment: its MSE is the data's variance
    along the circle, the baseline that an aligned MSE is compared with."""
    angles = np.linspace(-np.pi, np.pi, 32, endpoint=False)
    mean_patch = alws.gabor_patch(np.linspace(-np.pi, np.pi, 360, endpoint=False)).mean(0)
    fit = alws.align(np.tile(mean_patch, (32, 1)), angles)
    assert fit.mse == pytest.approx(alws.ring_baseline_mse(), rel=0.02)
    assert 0.01 < alws.ring_baseline_mse() < 0.03


def test_smoke_both_experiments(alws, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "alws"
    results = alws.main(["--experiment", "both", "--steps", "12", "--num-sleep", "24",
                         "--batch-size", "16", "--latent-dim", "3", "--no-progress",
                         "--data-dir", str(data_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    _check_pngs(out, RING_PNGS + MNIST_PNGS)
    ring, mnist = results["ring"], results["mnist"]
    for key in ("aligned_mse_initial", "aligned_mse", "relative_mse", "sigma", "surrogate",
                "mean_log_joint", "log_lik", "log_lik_initial", "log_lik_true"):
        assert math.isfinite(ring[key]), key
    assert ring["sign"] in (1, -1) and -np.pi <= ring["offset"] < np.pi
    assert ring["surrogate_per_step"].shape == (12,)
    assert np.all(np.isfinite(ring["surrogate_per_step"]))
    for key in ("mmd_initial", "mmd", "mmd_mean_image", "sigma", "surrogate",
                "mean_log_joint"):
        assert math.isfinite(mnist[key]), key
    assert mnist["mmd"] >= 0 and np.all(np.isfinite(mnist["surrogate_per_step"]))
    assert list(mnist["eval_steps"]) == [0, 12] and list(mnist["metric_steps"]) == [0, 11]
    assert "IDX files in" in mnist["train_source"]
    assert "ring: aligned MSE" in printed and "mnist: MMD^2" in printed
    assert set(results["paths"]) == {"ring_patches", "ring_training", "mnist_samples",
                                     "mnist_training"}


def test_ring_learns_the_rotation(alws, tmp_path):
    """A short run (fixed seed) must bring the aligned MSE well below both its initial value
    and the best constant patch's: the generator has learned to sweep the orientation."""
    out = tmp_path / "ring"
    results = alws.main(["--experiment", "ring", "--steps", "250", "--num-sleep", "300",
                         "--batch-size", "100", "--seed", "0", "--no-progress",
                         "--out", str(out)])
    ring = results["ring"]
    _check_pngs(out, RING_PNGS)
    assert "mnist" not in results
    # measured (seed 0, the defaults: sigma's gradient at the data, half the median
    # bandwidth): aligned MSE 0.149 -> 0.0023, log p(x) -1031 -> 294 (the true process: 400),
    # sigma 0.099 (from 0.1; it ends at 0.052 after the example's 1000 steps)
    assert ring["aligned_mse"] < 0.25 * ring["aligned_mse_initial"], ring["aligned_mse"]
    assert ring["relative_mse"] < 0.6, ring["relative_mse"]
    # the data's noise is 0.05; plain regression of the log-joint collapses sigma well below
    # it (0.023 after 1000 steps), the gradient at the data keeps it above
    assert 0.05 < ring["sigma"] <= 0.1, ring["sigma"]
    # held-out log-likelihood (1-d quadrature over the angle): far up, and below the true
    # process's (the cross-entropy of any model is at least the entropy)
    assert ring["log_lik"] > ring["log_lik_initial"] + 500
    assert 150 < ring["log_lik"] < ring["log_lik_true"] + 5


def test_flags(alws, capsys):
    assert alws.parse([]).sigma is None and alws.parse(["--sigma", "learn"]).sigma is None
    args = alws.parse(["--sigma", "0.05", "--experiment", "ring", "--no-progress"])
    assert args.sigma == 0.05 and args.experiment == "ring" and not args.progress
    plain = alws.make_objective(alws.parse([]))
    assert plain.num_heldout == 0 and plain.num_sleep == 500 and plain.ridge == (1e-3,)
    held = alws.make_objective(alws.parse(["--num-heldout", "50", "--ridge", "0.01"]))
    assert held.num_heldout == 50 and held.ridge == pytest.approx((0.01, 0.1, 1.0))
    assert held.bandwidth_scales == alws.BANDWIDTH_SCALES
    for bad in (["--sigma", "-1"], ["--sigma", "x"], ["--num-sleep", "1"], ["--steps", "0"],
                ["--num-heldout", "-1"], ["--experiment", "nope"]):
        with pytest.raises(SystemExit):
            alws.parse(bad)
    capsys.readouterr()


def test_fixed_sigma_model_has_no_noise_param(alws):
    for built, sigma in ((alws.build_ring(0.05), 0.05), (alws.build_mnist(3, 0.2), 0.2)):
        x = jnp.zeros((4, built.generator.out))
        params = jax.eval_shape(lambda b=built, x=x: sg.init_params(0, b.model, None, x))
        assert set(params) == {"generator"}
        assert float(built.scale(params)) == pytest.approx(sigma)
    learned = alws.build_ring()
    params = sg.init_params(0, learned.model, None, jnp.zeros((4, 256)))
    assert set(params) == {"generator", "log_sigma"}
    assert float(learned.scale(params)) == pytest.approx(0.1)
