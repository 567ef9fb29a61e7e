"""Write ``BENCHMARKS.md``: the step-time benchmark, the estimator comparison and the examples'
results, with the machine they ran on. The file is generated, never edited by hand.

Each section's measurements are kept in ``bench/results/`` (markdown, plus the PNGs it shows),
so a section can be re-run alone and the report rebuilt from the others' last results::

    python bench/report.py                          # every section (about 30-40 min on 2 CPUs)
    python bench/report.py --sections step examples # re-run two, keep the estimators' results
    python bench/report.py --sections               # only rebuild BENCHMARKS.md
    python bench/report.py --quick                  # smoke run (into out/report_quick/)

Sections:

- ``step``: ``bench/bench_step.py`` (one jitted SVI step of scgjax vs hand-written JAX vs
  NumPyro's TraceGraph_ELBO, interleaved rounds, paired ratios);
- ``estimators``: ``bench/bench_estimators.py`` (the binary VAE trained with every estimator:
  held-out ELBO, gradient variance, time per step, over seeds);
- ``examples``: every script in ``examples/`` with its default flags; a table of its numbers
  and its main figure per example.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECTIONS = ("step", "estimators", "examples")
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))

from _machine import machine_info  # noqa: E402  (after the path setup)


def load(path: Path) -> ModuleType:
    """Import a script from its path (``bench/`` and ``examples/`` are not packages)."""
    spec = importlib.util.spec_from_file_location(f"report_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Sections


def run_step(quick: bool, results: Path) -> str:
    """``bench_step.py``'s table (its own machine line and method included)."""
    out = results / "step.md"
    load(ROOT / "bench" / "bench_step.py").main(["--out", str(out)] + (["--quick"] * quick))
    return out.read_text()


def run_estimators(quick: bool, results: Path) -> str:
    """``bench_estimators.py``'s table; its plot lands in ``results/estimators.png``."""
    load(ROOT / "bench" / "bench_estimators.py").main(
        ["--out", str(results)] + (["--quick"] * quick))
    return (results / "estimators.md").read_text()


def fmt(value: Any, spec: str = ".2f") -> str:
    """A number for a table (``-`` when missing)."""
    if value is None:
        return "-"
    if isinstance(value, (float, int, np.floating, np.integer)):
        return format(float(value), spec)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def elbo_table(r: dict) -> str:
    """The table of the MNIST VAE examples (``_common.run_experiment``'s results)."""
    return table(["train ELBO (last 100 steps)", "test ELBO", "ms/step", "steps", "data"],
                 [[fmt(r["train_elbo"]), fmt(r["test_elbo"]), fmt(1e3 * r["seconds_per_step"]),
                   r["steps"], r["train_source"]]])


def iwae_table(r: dict) -> str:
    """``examples/iwae_mnist.py``: the bounds of each trained K."""
    rows = [[k, fmt(v["train_bound"]), fmt(v["test_elbo"]), fmt(v["test_bound"]),
             fmt(v["test_bound_eval"]), fmt(1e3 * v["seconds_per_step"])]
            for k, v in r["results"].items()]
    return table(["K", "train L_K", "test ELBO", "test L_K", "test L_5000 (subset)", "ms/step"],
                 rows)


def rws_gmm_table(r: dict) -> str:
    """``examples/rws_gmm.py``: exact model and guide errors of each method."""
    rows = []
    for m in r["methods"].values():
        f = m["final"]
        rows.append([m["label"]] + [fmt(f.get(key), ".4f") for key in
                                    ("model_error", "mixture_kl", "log_px", "posterior_kl")]
                    + [fmt(m["ms_per_step"])])
    return table(["method", "model error", "KL(p*||p_θ)", "held-out log p(x)", "posterior KL",
                  "ms/step"], rows)


#: ``name -> (flags for --quick, formatter of main's results, main figure file name)``
EXAMPLES: dict[str, tuple[list[str], Callable[[dict], str], str]] = {
    "vae_mnist": (["--steps", "50"], elbo_table, "loss_curve.png"),
    "binary_vae_mnist": (["--steps", "50"], elbo_table, "loss_curve.png"),
    "iwae_mnist": (["--steps", "20", "--particles-list", "1,5", "--eval-particles", "100",
                    "--eval-images", "20"], iwae_table, "bounds.png"),
    "rws_gmm": (["--steps", "100", "--clusters", "5"], rws_gmm_table, "rws_gmm.png"),
}


def run_examples(quick: bool, results: Path) -> str:
    """Every registered example with its default flags (``--quick``: a few steps)."""
    parts = []
    figures = results / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, (quick_flags, formatter, figure) in EXAMPLES.items():
        module = load(ROOT / "examples" / f"{name}.py")
        out = ROOT / "out" / "report" / name
        argv = ["--out", str(out), "--no-progress"] + (quick_flags if quick else [])
        start = time.perf_counter()
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            numbers = module.main(argv)
        seconds = time.perf_counter() - start
        print(captured.getvalue())
        shutil.copy(out / figure, figures / f"{name}.png")
        doc = (module.__doc__ or name).strip().split("\n")[0]
        parts.append("\n".join([
            f"### `examples/{name}.py`", "", doc, "",
            f"`python examples/{name}.py {' '.join(quick_flags) if quick else ''}`".replace(
                " `", "`") + f" ({seconds:.0f} s including data loading and plots)", "",
            formatter(numbers), "", f"![{name}](figures/{name}.png)", ""]))
    return "\n".join(parts)


RUNNERS: dict[str, Callable[[bool, Path], str]] = {
    "step": run_step, "estimators": run_estimators, "examples": run_examples,
}
TITLES = {
    "step": "Step time: scgjax vs hand-written JAX vs NumPyro",
    "estimators": "Estimators on the binary VAE",
    "examples": "Examples",
}


# --------------------------------------------------------------------------------------------
# The report


def build_report(results: Path, output: Path) -> str:
    """The report from the sections' last results in ``results``, with links relative to
    ``output``'s folder."""
    backend = jax.default_backend()
    gpu_note = ("" if backend == "gpu" else
                "No GPU was available to the run that generated this file: **every figure is a "
                "CPU figure**. ")
    lines = [
        "# Benchmarks", "",
        "<!-- generated by `python bench/report.py`; do not edit by hand -->", "",
        f"Generated by `python bench/report.py` on "
        f"{datetime.date.today().isoformat()}. {gpu_note}Each section states the machine "
        "and the settings it was measured with; `bench/README.md` explains the method.", "",
        f"Machine of this build: {machine_info()}", "",
    ]
    prefix = Path(os.path.relpath(results, output.resolve().parent)).as_posix()
    for section in SECTIONS:
        path = results / f"{section}.md"
        lines += [f"## {TITLES[section]}", ""]
        if not path.exists():
            lines += [f"(not measured yet: `python bench/report.py --sections {section}`)", ""]
            continue
        text = path.read_text().strip().replace("](figures/", f"]({prefix}/figures/")
        lines += [text, ""]
        if (results / f"{section}.png").exists():
            lines += [f"![{section}]({prefix}/{section}.png)", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the chosen sections, then write ``BENCHMARKS.md``; return its text."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS),
                   help="sections to re-run (default: all; none: only rebuild the report)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps each")
    p.add_argument("--output", type=Path, default=None,
                   help="the report (default: BENCHMARKS.md; with --quick, "
                   "out/report_quick/BENCHMARKS.md)")
    p.add_argument("--results", type=Path, default=None,
                   help="the sections' results (default: bench/results; with --quick, "
                   "out/report_quick/results, so a smoke run never replaces real results)")
    args = p.parse_args(argv)
    scratch = ROOT / "out" / "report_quick"
    results = args.results or (scratch / "results" if args.quick else RESULTS)
    output = args.output or (scratch / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md")
    results.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    for section in args.sections:
        start = time.perf_counter()
        text = RUNNERS[section](args.quick, results)
        (results / f"{section}.md").write_text(text.strip() + "\n")
        print(f"[{section}] {time.perf_counter() - start:.0f} s", file=sys.stderr)
    report = build_report(results, output)
    output.write_text(report + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
