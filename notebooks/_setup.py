"""What the example notebooks share: the repository's paths, quick mode, importing the
examples' code, and showing what it writes.

Not a notebook: its leading underscore keeps it out of ``tests/test_notebooks.py``. A notebook
starts with::

    try:  # as a script (and under the tests)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    except NameError:  # in Jupyter, which runs in notebooks/
        sys.path.insert(0, str(Path.cwd()))
    from _setup import QUICK, import_code, output_dir, show_png, show_source
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import jax
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
#: ``SCGJAX_NOTEBOOK_QUICK=1``: fewer samples and steps (CI runs every notebook so)
QUICK = os.environ.get("SCGJAX_NOTEBOOK_QUICK") == "1"

__all__ = ["QUICK", "ROOT", "import_code", "output_dir", "quick_compile", "show_png",
           "show_source"]


def output_dir(name: str) -> Path:
    """The folder a notebook's runs write to (created): ``$SCGJAX_NOTEBOOK_OUT/<name>`` (the
    tests point it at a temporary folder), else ``out/notebooks/<name>`` (git-ignored)."""
    base = os.environ.get("SCGJAX_NOTEBOOK_OUT")
    out = (Path(base) if base else ROOT / "out" / "notebooks") / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def import_code(*names: str) -> ModuleType | list[ModuleType]:
    """Import modules of ``examples/`` and ``bench/`` (``"nvil_sbn"``, ``"bench_estimators"``,
    ``"examples.binary_vae_mnist"``): one module, or a list for several names.

    The examples select matplotlib's Agg backend to write their PNGs; the notebook's own
    backend (inline plots in Jupyter) is restored afterwards.
    """
    # in front of notebooks/ (and Jupyter's working directory), where notebooks share the
    # examples' names: "policy_gradient" must be examples/policy_gradient.py
    for path in (ROOT, ROOT / "bench", ROOT / "examples"):
        if str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))
    backend = plt.get_backend()
    modules = [importlib.import_module(name) for name in names]
    plt.switch_backend(backend)
    _restore_inline_output(backend)
    return modules[0] if len(modules) == 1 else modules


def _restore_inline_output(backend: str) -> None:
    """Under IPython's inline backend, register its figure output again (switching to Agg
    unregistered it, and the plots would not show in Jupyter)."""
    if "inline" not in backend:
        return
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import configure_inline_support
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        configure_inline_support(shell, backend)


def show_source(obj: object) -> None:
    """Print a function's or class's source without its docstring."""
    print(re.sub(r'\n\s+""".*?"""\n', "\n", inspect.getsource(obj), count=1, flags=re.S))


def show_png(path: Path) -> None:
    """Show a PNG written by an example's own plotting code."""
    image = plt.imread(path)
    plt.figure(figsize=(image.shape[1] / 100, image.shape[0] / 100))
    plt.imshow(image)
    plt.axis("off")
    plt.show()


@contextlib.contextmanager
def quick_compile() -> Iterator[None]:
    """In quick mode, compile with most XLA optimisations off: a few steps run slower, but
    compiling (most of a short run) is about 3x faster. The setting is restored after."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", QUICK or before)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
