"""Smoke tests of the MNIST examples (``examples/*.py``) and their shared helpers.

Each example's ``main(argv)`` runs in-process for a few steps on a tiny synthetic MNIST written
as gzipped IDX files into a temporary folder (no network, no real data), and must print its
summary, return finite ELBOs and write its three PNGs. The examples are loaded from their file
paths, as a benchmark script would.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
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


#: Param shapes of the two architectures: the papers' linear 784-200-784 model and their
#: nonlinear one (encoder 784-200-200-200, decoder 200-200-200-784).
SHAPES = {
    "linear": {"prior_logits": (200,),
               "encoder": {"kernel": (784, 200), "bias": (200,)},
               "decoder": {"kernel": (200, 784), "bias": (784,)}},
    "nonlinear": {"prior_logits": (200,),
                  "encoder": {"hidden_0": {"kernel": (784, 200), "bias": (200,)},
                              "hidden_1": {"kernel": (200, 200), "bias": (200,)},
                              "out": {"kernel": (200, 200), "bias": (200,)}},
                  "decoder": {"hidden_0": {"kernel": (200, 200), "bias": (200,)},
                              "hidden_1": {"kernel": (200, 200), "bias": (200,)},
                              "out": {"kernel": (200, 784), "bias": (784,)}}},
}


def _trace_binary_vae(bvae: ModuleType, name: str, architecture: str = "linear") -> None:
    """Build the model with estimator ``name`` and trace (not run) its params and ELBO."""
    estimator, k = bvae.make_estimator(name)
    assert isinstance(estimator, sg.Estimator)
    assert k == bvae.ESTIMATORS[name].default_particles
    model, guide = bvae.build(estimator, architecture=architecture)
    x = jnp.zeros((3, 784))
    params = jax.eval_shape(lambda: sg.init_params(0, model, guide, x))
    shared = {n: v for n, v in params.items() if "$" not in n}  # not DCV's "z$alpha"
    assert jax.tree.map(lambda a: tuple(a.shape), shared) == SHAPES[architecture]
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


def test_binary_vae_nonlinear_builds():
    """The nonlinear model: 784-200-200-200 / 200-200-200-784 params, and its ELBO traces with
    the estimators that differentiate the learning signal in ``z`` (DCV, straight-through);
    the linear one is the default; an unknown architecture is an error."""
    bvae = _load("binary_vae_mnist")
    for name in ("dcv", "st"):
        _trace_binary_vae(bvae, name, "nonlinear")
    x = jnp.zeros((2, 784))
    model, guide = bvae.build()
    params = jax.eval_shape(lambda: sg.init_params(0, model, guide, x))
    assert jax.tree.map(lambda a: tuple(a.shape), params) == SHAPES["linear"]
    with pytest.raises(ValueError, match="unknown architecture"):
        bvae.build(architecture="conv")
    assert bvae.describe("nonlinear").startswith("nonlinear: encoder 784-200-200-200, "
                                                 "decoder 200-200-200-784")


def test_binary_vae_mlp_is_leaky_relu_network():
    """``MLP`` computes W3 lrelu(W2 lrelu(W1 x + b1) + b2) + b3 with slope 0.3, and the decoder's
    output bias starts at ``decoder_bias``."""
    bvae = _load("binary_vae_mnist")
    mlp = bvae.MLP(3, (5, 4))
    x = jax.random.normal(jax.random.key(0), (6, 7))
    params = jax.jit(mlp.init)(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * np.random.default_rng(2).normal(size=p.shape),
                          params)  # nonzero biases
    h = np.asarray(x, np.float64)
    for layer in ("hidden_0", "hidden_1"):
        h = h @ np.asarray(params[layer]["kernel"]) + np.asarray(params[layer]["bias"])
        h = np.where(h > 0, h, 0.3 * h)
    expected = h @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
    got = np.asarray(jax.jit(mlp.apply)({"params": params}, x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (h < 0).any()  # the negative slope was exercised

    bias = np.linspace(-3.0, 3.0, 784).astype(np.float32)
    model, guide = bvae.build(sg.RLOO(), decoder_bias=bias, architecture="nonlinear")
    init = jax.jit(lambda x: sg.init_params(0, model, guide, x))(jnp.zeros((2, 784)))
    np.testing.assert_array_equal(np.asarray(init["decoder"]["out"]["bias"]), bias)


def test_binary_vae_mnist_nonlinear_smoke(data_dir, tmp_path, capsys):
    bvae = _load("binary_vae_mnist")
    out = tmp_path / "nonlinear"
    results = bvae.main([*TINY, "--data-dir", str(data_dir), "--out", str(out),
                         "--estimator", "disarm", "--architecture", "nonlinear"])
    printed = capsys.readouterr().out
    _check_run(results, out, printed)
    assert results["architecture"] == "nonlinear" and results["num_particles"] == 2
    assert "encoder 784-200-200-200" in printed
    shapes = jax.tree.map(lambda a: tuple(a.shape), results["params"])
    assert {n: v for n, v in shapes.items() if "$" not in n} == SHAPES["nonlinear"]


def test_bench_estimators_nonlinear_writes_its_files(data_dir, tmp_path, monkeypatch):
    """``bench_estimators.py --quick --architecture nonlinear`` (cut down further) writes
    ``estimators_nonlinear.{md,png,json}``, not the linear model's files."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "bench"))
    spec = importlib.util.spec_from_file_location("scgjax_bench_estimators_test",
                                                  root / "bench" / "bench_estimators.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # for its dataclasses
    spec.loader.exec_module(bench)
    out = tmp_path / "bench"
    results = bench.main(["--quick", "--architecture", "nonlinear", "--estimators", "rloo",
                          "--steps", "4", "--eval-every", "2", "--grad-samples", "2",
                          "--grad-chunk", "1", "--test-images", "40", "--timing-rounds", "1",
                          "--timing-steps", "1", "--data-dir", str(data_dir),
                          "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [
        "estimators_nonlinear.json", "estimators_nonlinear.md", "estimators_nonlinear.png"]
    text = (out / "estimators_nonlinear.md").read_text()
    assert "Binary VAE (nonlinear: encoder 784-200-200-200, decoder 200-200-200-784" in text
    saved = json.loads((out / "estimators_nonlinear.json").read_text())
    assert saved["settings"]["architecture"] == "nonlinear"
    run = results["rloo"].runs[0]
    assert run.eval_steps == [0, 2, 4] and np.all(np.isfinite(run.variance))
    assert math.isfinite(run.test_elbo) and run.test_elbo < 0
    # the trained (and measured) model is the nonlinear one
    assert run.final_state.params["encoder"]["hidden_1"]["kernel"].shape == (200, 200)


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
    train, test = common.load_splits(tmp_path, holdout=1000)  # with labels, same split
    assert np.array_equal(train.images, data.train) and np.array_equal(test.images, data.test)
    everything = common.load_mnist("train", data_dir=tmp_path)
    rows = {everything.images[i].tobytes(): everything.labels[i] for i in range(50)}
    for split in (train, test):  # each image keeps its own label
        assert [rows[x.tobytes()] for x in split.images] == split.labels.tolist()


def test_image_grid_layout():
    common = _load("vae_mnist").common
    grid = common.image_grid(np.ones((5, 784)), 2, 3, pad=1)
    assert grid.shape == (2 * 30, 3 * 30)
    assert grid[1:29, 1:29].min() == 1.0 and grid[0].max() == 0.0  # padding is background
    assert grid[31:59, 61:89].max() == 0.0  # the sixth tile is blank
