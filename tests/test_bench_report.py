"""``bench/report.py`` assembles BENCHMARKS.md from the sections' saved results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("scgjax_bench_report", ROOT / "bench" /
                                                  "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_report_links_figures_and_marks_missing_sections(tmp_path):
    report = _report()
    results = tmp_path / "results"
    (results / "figures").mkdir(parents=True)
    (results / "step.md").write_text("| B | K |\n|---|---|\n| 50 | 1 |\n")
    (results / "examples.md").write_text("### ex\n\n![ex](figures/ex.png)\n")
    (results / "examples.png").write_bytes(b"png")
    text = report.build_report(results, tmp_path / "docs" / "BENCHMARKS.md")
    assert "do not edit by hand" in text and "CPU figure" in text
    assert "| 50 | 1 |" in text
    assert "![ex](../results/figures/ex.png)" in text  # relative to the report's folder
    assert "![examples](../results/examples.png)" in text
    assert "--sections estimators" in text  # not measured: says how to measure it
    assert text.index("## Step time") < text.index("## Estimators") < text.index("## Examples")


def test_every_registered_example_exists():
    report = _report()
    for name in report.EXAMPLES:
        assert (ROOT / "examples" / f"{name}.py").is_file(), name
