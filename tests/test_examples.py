"""Smoke tests of the MNIST examples (``examples/*.py``) and their shared helpers.

Each example's ``main(argv)`` runs in-process for a few steps on a tiny synthetic MNIST written
as gzipped IDX files into a temporary folder (no network, no real data), and must print its
summary, return finite ELBOs and write its three PNGs. The examples are loaded from their file
paths, as a benchmark script would.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
import sys
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNGS = ("loss_curve.png", "reconstructions.png", "samples.png")
TINY = ["--steps", "20", "--batch-size", "16", "--no-progress"]


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` from its path (the examples folder is not a package)."""
    module_name = f"scgjax_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _write_split(directory: Path, prefix: str, n: int, seed: int) -> None:
    """Digit-like blobs: a bright random rectangle on a dark background, per image."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, 28, 28))
    for img in images:
        r, c = rng.integers(4, 14, size=2)
        img[r:r + 10, c:c + 8] = rng.integers(180, 256, size=(10, 8))
    _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A tiny MNIST: 64 training and 40 test images."""
    directory = tmp_path_factory.mktemp("mnist")
    _write_split(directory, "train", 64, seed=0)
    _write_split(directory, "t10k", 40, seed=1)
    return directory


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No downloads, an empty cache, no data directory from the environment."""
    monkeypatch.setenv("SCGJAX_NO_DOWNLOAD", "1")
    monkeypatch.setenv("SCGJAX_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("SCGJAX_DATA_DIR", raising=False)


def _check_run(results: dict, out: Path, printed: str) -> None:
    for name in PNGS:
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    assert math.isfinite(results["train_elbo"]) and results["train_elbo"] < 0
    assert math.isfinite(results["test_elbo"]) and results["test_elbo"] < 0
    assert results["elbo_per_step"].shape == (20,)
    assert np.all(np.isfinite(results["elbo_per_step"]))
    assert "train ELBO" in printed and "test ELBO" in printed
    assert "IDX files in" in printed  # the data source is printed


def test_vae_mnist_smoke(data_dir, tmp_path, capsys):
    vae = _load("vae_mnist")
    out = tmp_path / "vae"
    results = vae.main([*TINY, "--data-dir", str(data_dir), "--out", str(out),
                        "--latent-dim", "4", "--hidden", "32"])
    _check_run(results, out, capsys.readouterr().out)
    # A few hundred nats per image at worst: the per-image scaling is right.
    assert -800 < results["test_elbo"] < 0


@pytest.mark.parametrize("estimator, particles", [("score", 1), ("rloo", 2)])
def test_binary_vae_mnist_smoke(data_dir, tmp_path, capsys, estimator, particles):
    bvae = _load("binary_vae_mnist")
    out = tmp_path / estimator
    results = bvae.main([*TINY, "--data-dir", str(data_dir), "--out", str(out),
                         "--estimator", estimator])
    _check_run(results, out, capsys.readouterr().out)
    assert results["estimator"] == estimator and results["num_particles"] == particles


def test_binary_vae_rloo_needs_two_particles(capsys):
    bvae = _load("binary_vae_mnist")
    with pytest.raises(SystemExit) as info:
        bvae.main(["--estimator", "rloo", "--num-particles", "1", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "rloo" in err and "--num-particles >= 2" in err
    with pytest.raises(ValueError, match="num-particles >= 2"):
        bvae.make_estimator("rloo", 1)
    with pytest.raises(ValueError, match="unknown estimator"):
        bvae.make_estimator("nope")


def _trace_binary_vae(bvae: ModuleType, name: str) -> None:
    """Build the model with estimator ``name`` and trace (not run) its params and ELBO."""
    estimator, k = bvae.make_estimator(name)
    assert isinstance(estimator, sg.Estimator)
    assert k == bvae.ESTIMATORS[name].default_particles
    model, guide = bvae.build(estimator)
    x = jnp.zeros((3, 784))
    params = jax.eval_shape(lambda: sg.init_params(0, model, guide, x))
    assert params["prior_logits"].shape == (200,)
    assert params["encoder"]["kernel"].shape == (784, 200)
    assert params["decoder"]["kernel"].shape == (200, 784)
    objective = sg.ELBO(num_particles=k)
    loss = jax.eval_shape(
        lambda p: objective.loss(jax.random.key(0), p, model, guide, x), params)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert sg.graph(model, guide, x, num_particles=k).nodes["z"].estimator == estimator


def test_binary_vae_is_reusable(capsys):
    """Importing has no side effects; every registered estimator builds a model that traces."""
    bvae = _load("binary_vae_mnist")
    assert capsys.readouterr().out == ""
    for name in bvae.ESTIMATORS:
        _trace_binary_vae(bvae, name)


def test_evaluate_elbo_matches_exact_log_likelihood():
    """No latents: the ELBO is log p(x) exactly, over full batches and the remainder batch."""
    common = _load("vae_mnist").common

    def model(x, num=None):
        logits = sg.param("logits", jnp.linspace(-2.0, 2.0, 784))
        with sg.plate("data", x.shape[0]):
            sg.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x, num=None):
        pass

    rng = np.random.default_rng(0)
    images = (rng.random((40, 784)) < 0.3).astype(np.float32)  # binary: binarising is a no-op
    params = sg.init_params(0, model, guide, jnp.asarray(images))
    logits = np.linspace(-2.0, 2.0, 784)
    exact = np.mean(np.sum(images * logits - np.logaddexp(0.0, logits), axis=1))
    got = common.evaluate_elbo(model, guide, params, images, jax.random.key(0), batch_size=16)
    assert got == pytest.approx(exact, rel=1e-5)


def test_batches_cover_each_epoch_once():
    common = _load("vae_mnist").common
    images = np.eye(10, 784, dtype=np.float32)  # image i: one white pixel at i
    batches = common.Batches(images, 5, jax.random.key(0))
    for _ in range(3):  # epochs
        seen = np.concatenate([np.asarray(batches()) for _ in range(2)])
        assert seen.shape == (10, 784) and set(np.unique(seen)) <= {0.0, 1.0}
        assert sorted(seen.argmax(axis=1)) == list(range(10))
    with pytest.raises(ValueError, match="exceeds"):
        common.Batches(images, 11, jax.random.key(0))


def test_load_data_holds_out_when_no_test_split(tmp_path, capsys):
    common = _load("vae_mnist").common
    _write_split(tmp_path, "train", 50, seed=2)
    data = common.load_data(tmp_path, holdout=1000)
    assert data.train.shape == (40, 784) and data.test.shape == (10, 784)
    assert "held out" in data.test_source
    assert "holding out 10" in capsys.readouterr().out


def test_image_grid_layout():
    common = _load("vae_mnist").common
    grid = common.image_grid(np.ones((5, 784)), 2, 3, pad=1)
    assert grid.shape == (2 * 30, 3 * 30)
    assert grid[1:29, 1:29].min() == 1.0 and grid[0].max() == 0.0  # padding is background
    assert grid[31:59, 61:89].max() == 0.0  # the sixth tile is blank
