"""The notebooks run (at reduced sizes) and their ``.ipynb`` matches the ``.py`` they are
paired with (jupytext percent format: the ``.py`` is the source that is reviewed and run)."""

from __future__ import annotations

import runpy
from pathlib import Path

import matplotlib
import pytest

# notebooks/_setup.py (what they share) is a module, not a notebook
NOTEBOOKS = sorted(p for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("*.py")
                   if not p.name.startswith("_"))


def _cells(path: Path) -> list[tuple[str, str]]:
    jupytext = pytest.importorskip("jupytext")
    return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired(script: Path):
    notebook = script.with_suffix(".ipynb")
    assert notebook.is_file(), f"run: jupytext --to ipynb {script.name}"
    assert _cells(script) == _cells(notebook), f"out of sync: jupytext --sync {script.name}"


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(script: Path, monkeypatch, tmp_path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("SCGJAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("SCGJAX_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        plt.close("all")
