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


def test_examples_section_keeps_each_example_and_marks_the_missing(tmp_path):
    report = _report()
    parts = tmp_path / "examples"
    parts.mkdir()
    first, *others = list(report.EXAMPLES)
    (parts / f"{first}.md").write_text(f"### `examples/{first}.py`\n\nkept table\n")
    text = report.run_examples(False, tmp_path, names=[])  # re-run none: assemble only
    assert "kept table" in text
    for name in others:
        assert f"--examples {name}" in text  # says how to measure it
    order = [text.index(f"`examples/{name}.py`") for name in report.EXAMPLES]
    assert order == sorted(order)


def test_example_tables_format_results():
    report = _report()
    ssvae = {"alpha": 1.0, "steps": 10, "results": {"enumerate": {
        "label": "Enumerate", "num_particles": 1, "train_elbo": -120.0, "test_bound": -130.5,
        "test_accuracy": 0.7291, "seconds_per_step": 0.01}}}
    text = report.ssvae_table(ssvae)
    assert "| Enumerate | 1 | -120.00 | -130.50 | 0.729 | 10.00 |" in text
    policy = {"optimal_return": 1.0, "uniform_return": 0.1, "target_return": 0.9,
              "variants": {"rewards-to-go": {"final_return": 0.95, "variance": 2.0,
                                             "steps_to_threshold": [100.0, float("nan")],
                                             "variance_ratio": 1.0, "ms_per_step": 3.0}}}
    assert "| rewards-to-go | 0.950 | 100 (1/2 seeds) | 2 | 1.00 | 3.00 |" in (
        report.policy_table(policy))
