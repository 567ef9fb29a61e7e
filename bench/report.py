"""Write ``BENCHMARKS.md``: the step-time benchmark, the estimator comparison and the examples'
results, with the machine they ran on. The file is generated, never edited by hand.

Each section's measurements are kept in ``bench/results/`` (markdown, plus the PNGs it shows),
so a section can be re-run alone and the report rebuilt from the others' last results::

    python bench/report.py                          # every section (about 30-40 min on 2 CPUs)
    python bench/report.py --sections step examples # re-run two, keep the estimators' results
    python bench/report.py --sections examples --examples nvil_sbn  # one example
    python bench/report.py --sections               # only rebuild BENCHMARKS.md
    python bench/report.py --quick                  # smoke run (into out/report_quick/)

Sections:

- ``step``: ``bench/bench_step.py`` (one jitted SVI step of scgjax vs hand-written JAX vs
  NumPyro's TraceGraph_ELBO, interleaved rounds, paired ratios);
- ``estimators``: ``bench/bench_estimators.py`` (the linear and the nonlinear binary VAE
  trained with every estimator: held-out ELBO, gradient variance, time per step, over seeds),
  followed by the published numbers beside ours (``bench/published.py``, also written to
  ``bench/results/estimators/published.md`` for the documentation);
- ``categorical_vae``: ``bench/bench_categorical_vae.py`` (the categorical VAE, 20 latents of
  10 classes, linear and nonlinear, and the 2 x 10 "small domain" as one joint Categorical,
  trained with every estimator: held-out ELBO and importance-sampled bound, gradient variance,
  time per step, over seeds; kept per configuration in ``bench/results/categorical_vae/``,
  ``--categorical`` re-runs a few), followed by the published numbers beside ours
  (``bench/published.py``, also written to ``bench/results/categorical_vae/published.md``) and
  the hand-written ``bench/notes/categorical_vae.md`` (how the settings differ, and why some
  estimators are not run);
- ``examples``: every script in ``examples/`` with its default flags; a table of its numbers
  and its main figures per example (each kept in ``bench/results/examples/<name>.md``, so
  ``--examples`` re-runs a few and keeps the others). Hand-written notes on an example
  (measurements made outside these runs, e.g. moved from a docstring) live in
  ``bench/notes/<name>.md`` and are appended to its section whenever the examples section is
  assembled (``--sections examples --examples`` reassembles it without running anything).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
NOTES = ROOT / "bench" / "notes"  #: hand-written notes per example, ``<name>.md``
SECTIONS = ("step", "estimators", "categorical_vae", "examples")
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))

from _machine import machine_info  # noqa: E402  (after the path setup)
from published import published_markdown  # noqa: E402


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


#: the binary VAEs of the estimators section: name -> (bench flags, heading, figure)
ARCHITECTURES: dict[str, tuple[list[str], str]] = {
    "linear": ([], "Linear binary VAE (784-200-784)"),
    "nonlinear": (["--architecture", "nonlinear"],
                  "Nonlinear binary VAE (784-200-200-200, LeakyReLU)"),
}


def run_estimators(quick: bool, results: Path, architectures: Sequence[str] | None = None
                   ) -> str:
    """``bench_estimators.py``'s tables for the binary VAEs ``architectures`` (default: both;
    the others keep their last results in ``results/estimators/``), each with its plot, then
    the published numbers beside ours (:func:`published.published_markdown`)."""
    bench = load(ROOT / "bench" / "bench_estimators.py")
    figures = results / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    saved = results / "estimators"  # the bench's own outputs, one set per architecture
    parts = []
    for name, (flags, heading) in ARCHITECTURES.items():
        stem = "estimators" if name == "linear" else f"estimators_{name}"
        if architectures is None or name in architectures:
            bench.main(["--out", str(saved), *flags] + (["--quick"] * quick))
            shutil.copy(saved / f"{stem}.png", figures / f"{stem}.png")
        text = ((saved / f"{stem}.md").read_text() if (saved / f"{stem}.md").exists() else
                f"(not measured yet: `python bench/report.py --sections estimators "
                f"--architectures {name}`)")
        parts += [f"### {heading}", "", text.strip(), ""]
        if (figures / f"{stem}.png").exists():
            parts += [f"![{heading}](figures/{stem}.png)", ""]
    parts += [_published("binary", results, saved), ""]
    return "\n".join(parts)


def _published(kind: str, results: Path, folder: Path) -> str:
    """The published numbers beside ours for ``kind`` (``binary`` or ``categorical``), also
    written without its heading to ``folder/published.md`` (the documentation pages include it
    from there under their own heading)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "published.md").write_text(published_markdown(kind, results, heading=False))
    return published_markdown(kind, results).strip()


#: the categorical VAEs of the categorical_vae section: name -> (bench flags, heading)
CATEGORICAL: dict[str, tuple[list[str], str]] = {
    "linear": ([], "Linear categorical VAE (784-200-784, 20 x Categorical(10))"),
    "nonlinear": (["--architecture", "nonlinear"],
                  "Nonlinear categorical VAE (784-512-256-200 / 200-256-512-784, LeakyReLU)"),
    "small": (["--latent-dims", "2", "--joint", "--estimators", "score", "rloo", "unordered",
               "sas"],
              "Small domain: 2 x Categorical(10) as one Categorical over 100 classes (linear)"),
}


def run_categorical(quick: bool, results: Path, configs: Sequence[str] | None = None) -> str:
    """``bench_categorical_vae.py``'s tables for the configurations ``configs`` of
    :data:`CATEGORICAL` (default: all; the others keep their last results in
    ``results/categorical_vae/``), each with its plot, then the published numbers beside ours
    (:func:`published.published_markdown`) and ``bench/notes/categorical_vae.md``."""
    bench = load(ROOT / "bench" / "bench_categorical_vae.py")
    saved = results / "categorical_vae"
    parts = []
    for name, (flags, heading) in CATEGORICAL.items():
        args = bench.parse_args(flags)
        stem = bench.output_stem(args.architecture, args.latent_dims, args.joint)
        if configs is None or name in configs:
            bench.main(["--out", str(saved), *flags] + (["--quick"] * quick))
        text = ((saved / f"{stem}.md").read_text() if (saved / f"{stem}.md").exists() else
                f"(not measured yet: `python bench/report.py --sections categorical_vae "
                f"--categorical {name}`)")
        parts += [f"### {heading}", "", text.strip(), ""]
        if (saved / f"{stem}.png").exists():
            parts += [f"![{heading}](categorical_vae/{stem}.png)", ""]
    parts += [_published("categorical", results, saved), ""]
    notes = NOTES / "categorical_vae.md"
    if notes.exists():
        parts.append(notes.read_text().strip() + "\n")
    return "\n".join(parts)


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
    return table(["method", "model error", "KL(p* ‖ p_θ)", "held-out log p(x)", "posterior KL",
                  "ms/step"], rows)


def nvil_table(r: dict) -> str:
    """``examples/nvil_sbn.py``: ELBOs and gradient variance of each baseline variant."""
    rows = [[name, fmt(run.train_elbo), fmt(run.test_elbo), fmt(run.variance[-1], ".3g"),
             fmt(1e3 * run.seconds_per_step)] for name, run in r["runs"].items()]
    ratio = r.get("variance_ratio")
    notes = [f"Layers {r['layers']}. Credit sets as in the thesis: "
             f"{'yes' if r['credit_matches_thesis'] else 'NO'}."]
    if ratio is not None:
        notes.append(f"Gradient variance of the learned baselines / no baseline at the nvil "
                     f"run's final parameters: {ratio:.3g}.")
    return table(["baselines", "train ELBO", "test ELBO", "guide grad variance (end)",
                  "ms/step"], rows) + "\n\n" + " ".join(notes)


def ssvae_table(r: dict) -> str:
    """``examples/ssvae_mnist.py``: accuracy from 100 labels with each estimator of ``y``."""
    rows = [[v["label"], v["num_particles"], fmt(v["train_elbo"]), fmt(v["test_bound"]),
             fmt(v["test_accuracy"], ".3f"), fmt(1e3 * v["seconds_per_step"])]
            for v in r["results"].values()]
    return table(["estimator of y", "K", "train bound J/N", "test bound U(x)",
                  "test accuracy", "ms/step"], rows) + (
        f"\n\n{r['steps']} steps; weight of the labels' log q(y|x) in J_α: α = {r['alpha']:g}"
        " (the script's --alpha times N / N_l).")


def policy_table(r: dict) -> str:
    """``examples/policy_gradient.py``: return, speed and variance of each credit rule."""
    rows = []
    for name, v in r["variants"].items():
        reached = [s for s in v["steps_to_threshold"] if not np.isnan(s)]
        steps = (f"{np.mean(reached):.0f} ({len(reached)}/{len(v['steps_to_threshold'])} seeds)"
                 if reached else "not reached")
        rows.append([name, fmt(v["final_return"], ".3f"), steps, fmt(v["variance"], ".4g"),
                     fmt(v["variance_ratio"]), fmt(v["ms_per_step"])])
    return table(["credit", "final return", "steps to target", "grad variance (geo. mean)",
                  "variance / rewards-to-go", "ms/step"], rows) + (
        f"\n\nExact expected returns: optimum {r['optimal_return']:.3f}, uniform policy "
        f"{r['uniform_return']:.3f}, target {r['target_return']:.3f}.")


def amortised_ws_table(r: dict) -> str:
    """``examples/amortised_ws.py``: the ring's fit and the MNIST generator's MMD."""
    rows = []
    if "ring" in r:
        g = r["ring"]
        rows += [["ring: held-out log p(x)", fmt(g["log_lik_initial"]), fmt(g["log_lik"]),
                  f"true parameters: {g['log_lik_true']:.2f}"],
                 ["ring: aligned patch MSE", fmt(g["aligned_mse_initial"], ".4f"),
                  fmt(g["aligned_mse"], ".4f"), f"mean patch: {g['aligned_mse_baseline']:.4f}"]]
    if "mnist" in r:
        m = r["mnist"]
        rows.append(["MNIST: MMD² to test images", fmt(m["mmd_initial"], ".4f"),
                     fmt(m["mmd"], ".4f"), f"mean image: {m['mmd_mean_image']:.4f}"])
    return table(["measure", "initial", "trained", "reference"], rows)


def state_space_table(r: dict) -> str:
    """``examples/state_space.py``: each guide's ELBO, IWAE bound and log-likelihood."""
    rows = [[name, fmt(f["elbo"], ".1f"), fmt(f["iwae"], ".1f"), fmt(f["loglik"], ".1f"),
             f"{np.min(f['params']['phi']):.2f}–{np.max(f['params']['phi']):.2f}",
             fmt(f["seconds"], ".1f")] for name, f in r["fits"].items()]
    a = r["args"]
    return table(["guide", "ELBO", f"IWAE (K = {a['eval_particles']})",
                  "log p(r) (particle filter)", "phi (per stock)", "s to train"], rows) + (
        f"\n\n{a['steps']} steps, K = {a['num_particles']}; nats over all returns.")


def hmm_table(r: dict) -> str:
    """``examples/hmm.py``: the log-likelihood and each stock's regimes."""
    num_regimes = r["trans"].shape[-1]
    names = {2: ["calm", "volatile"], 3: ["calm", "middle", "volatile"]}.get(
        num_regimes, [f"regime {k}" for k in range(num_regimes)])  # sorted by σ
    rows = []
    for s, symbol in enumerate(r["data"].symbols):
        stays = 1.0 / np.maximum(1.0 - np.diag(r["trans"][s]), 1e-6)
        rows.append([symbol, fmt(r["loglik_per_stock"][s], ".1f"),
                     " / ".join(f"{v:+.3f}" for v in r["params"]["loc"][s]),
                     " / ".join(f"{v:.3f}" for v in r["params"]["scale"][s]),
                     " / ".join(f"{v:.0f}" if v < 1000 else "> 1000" for v in stays)])
    a = r["args"]
    return table(["stock", "log p(r)", f"μ ({' / '.join(names)})", "σ", "expected stay (months)"],
                 rows) + (
        f"\n\n{a['regimes']} regimes, {a['steps']} steps ({r['seconds']:.1f} s to train). "
        f"Total log p(r) = {r['loglik']:.2f} nats by the plain-JAX forward algorithm "
        f"(-sg.ELBO().loss: {r['elbo_loglik']:.2f}); one Normal per stock: "
        f"{r['baseline']:.2f}. BIC {r['bic']:.1f} (one Normal: {r['baseline_bic']:.1f}). "
        f"sg.infer_discrete's MAP path differs from plain-JAX Viterbi's in "
        f"{r['months_differ']} months; its {a['draws']} posterior draws are within "
        f"{r['worst_se']:.1f} standard errors of forward-backward.")


def smc_table(r: dict) -> str:
    """``examples/smc_state_space.py``: each bound's learned params and log p(y), and the
    bounds' gaps against T."""
    a, lg, nl, sweep = r["args"], r["lgssm"], r["benchmark"], r["bounds"]
    mle = lg["mle"]
    rows = [[name, fmt(p["a"], ".3f"), fmt(p["q"], ".3f"), fmt(p["r"], ".3f"), "-",
             fmt(p["loglik"]), fmt(p["loglik"] - mle["loglik"], "+.2f"), fmt(p["held_out"]), "-"]
            for name, p in (("MLE (Kalman)", mle), ("true", lg["true"]))]
    for name, f in lg["methods"].items():
        p = f["params"]
        rows.append([name, fmt(p["a"], ".3f"), fmt(p["q"], ".3f"), fmt(p["r"], ".3f"),
                     fmt(f["bound"]), fmt(f["loglik"]), fmt(f["loglik"] - mle["loglik"], "+.2f"),
                     fmt(f["held_out"]), fmt(f["seconds"], ".1f")])
    linear = table(["linear-Gaussian", "a", "q", "r", "bound (last 100 steps)",
                    "log p(y) (Kalman)", "minus the MLE's", "held-out log p(y')", "s to train"],
                   rows)
    rows = []
    for name, f in [("true", nl["true"]), *nl["methods"].items()]:
        p = f.get("params", f)
        rows.append([name, fmt(p["q"]), fmt(p["r"]), fmt(f.get("bound")),
                     f"{f['loglik']:.2f} ± {f['loglik_se']:.2f}",
                     f"{f['held_out']:.2f} ± {f['held_out_se']:.2f}", fmt(f.get("seconds"), ".1f")])
    bench = table(["benchmark", "q", "r", "bound (last 100 steps)",
                   f"log p(y) (SMC, K = {nl['eval_particles']})", "held-out log p(y')",
                   "s to train"], rows)
    methods = list(sweep["proposals"]["optimal"])
    rows = [[t, fmt(exact)] + [fmt(sweep["proposals"][prop][m]["gap"][i])
                               for prop in ("optimal", "bootstrap") for m in methods]
            for i, (t, exact) in enumerate(zip(sweep["horizons"], sweep["exact"], strict=True))]
    gaps = table(["T", "log p(y_1:T)"] + [f"{m} gap ({prop})" for prop in ("optimal", "bootstrap")
                                          for m in methods], rows)
    return "\n\n".join([
        linear, bench,
        f"{a['steps']} steps, K = {a['num_particles']} for every bound, T = {a['length']}; "
        f"benchmark log p(y): mean ± se of {nl['eval_runs']} SMC runs (bootstrap proposal). "
        f"The gaps log p(y_1:T) - E[bound] at the true linear-Gaussian params, K = "
        f"{a['num_particles']}, {a['bound_runs']} draws each, with the locally optimal and the "
        "bootstrap proposal:", gaps])


@dataclasses.dataclass(frozen=True)
class Example:
    """How the report runs one script of ``examples/`` and shows its results."""

    quick_flags: list[str]  #: flags of a smoke run (``--quick``)
    formatter: Callable[[dict], str]  #: ``main``'s results -> a markdown table
    figures: tuple[str, ...]  #: files of ``--out`` shown in the report


EXAMPLES: dict[str, Example] = {
    "vae_mnist": Example(["--steps", "50"], elbo_table, ("loss_curve.png",)),
    "binary_vae_mnist": Example(["--steps", "50"], elbo_table, ("loss_curve.png",)),
    "iwae_mnist": Example(["--steps", "20", "--particles-list", "1,5", "--eval-particles", "100",
                           "--eval-images", "20"], iwae_table, ("bounds.png",)),
    "rws_gmm": Example(["--steps", "100", "--clusters", "5"], rws_gmm_table, ("rws_gmm.png",)),
    "nvil_sbn": Example(["--steps", "30", "--layers", "20-10-5", "--checkpoints", "2",
                         "--variance-samples", "20"], nvil_table,
                        ("training.png", "variance.png")),
    "ssvae_mnist": Example(["--steps", "30"], ssvae_table, ("training.png", "analogies.png")),
    "policy_gradient": Example(["--steps", "30", "--seeds", "0", "--checkpoints", "2",
                                "--variance-samples", "20"], policy_table,
                               ("returns.png", "variance.png")),
    "amortised_ws": Example(["--experiment", "ring", "--steps", "20"], amortised_ws_table,
                            ("ring_patches.png", "ring_training.png", "mnist_samples.png")),
    "state_space": Example(["--quick"], state_space_table, ("volatility.png", "elbo.png")),
    "hmm": Example(["--quick"], hmm_table, ("regimes.png", "transitions.png", "loglik.png")),
    "smc_state_space": Example(["--quick"], smc_table,
                               ("training.png", "bounds_vs_T.png", "params.png")),
}


def run_example(name: str, quick: bool, results: Path) -> str:
    """Run ``examples/<name>.py`` (its default flags; ``quick``: a few steps) and return its
    section, whose figures are copied to ``results/figures/<name>_<file>``."""
    example = EXAMPLES[name]
    module = load(ROOT / "examples" / f"{name}.py")
    out = ROOT / "out" / ("report_quick" if quick else "report") / name
    argv = ["--out", str(out), "--no-progress"] + (example.quick_flags if quick else [])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        numbers = module.main(argv)
    seconds = time.perf_counter() - start
    machine_load = f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(captured.getvalue())
    figures = results / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    links = []
    for figure in example.figures:
        if not (out / figure).exists():  # e.g. an experiment a smoke run leaves out
            print(f"[{name}] no {figure}; left out of the report", file=sys.stderr)
            continue
        target = f"{name}_{figure}"
        shutil.copy(out / figure, figures / target)
        links.append(f"![{name}: {Path(figure).stem}](figures/{target})")
    doc = (module.__doc__ or name).strip().split("\n")[0]
    flags = " ".join(example.quick_flags) if quick else ""
    command = f"python examples/{name}.py {flags}".strip()
    return "\n".join([f"### `examples/{name}.py`", "", doc, "",
                      f"`{command}` ({seconds:.0f} s including data loading and plots; "
                      f"{machine_load})",
                      "",
                      example.formatter(numbers), "", *links, ""])


def run_examples(quick: bool, results: Path, names: Sequence[str] | None = None) -> str:
    """Run the examples ``names`` (default: all registered), keeping each one's section in
    ``results/examples/<name>.md``; return all sections that exist, in registry order, each
    followed by its hand-written notes (``bench/notes/<name>.md``) if any."""
    parts_dir = results / "examples"
    parts_dir.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else EXAMPLES:
        (parts_dir / f"{name}.md").write_text(run_example(name, quick, results).strip() + "\n")
    parts = []
    for name in EXAMPLES:
        path = parts_dir / f"{name}.md"
        parts.append(path.read_text() if path.exists() else
                     f"### `examples/{name}.py`\n\n(not measured yet: `python bench/report.py "
                     f"--sections examples --examples {name}`)\n")
        notes = NOTES / f"{name}.md"
        if notes.exists():
            parts.append(notes.read_text().strip() + "\n")
    return "\n".join(parts)


RUNNERS: dict[str, Callable[[bool, Path], str]] = {
    "step": run_step, "estimators": run_estimators, "categorical_vae": run_categorical,
    "examples": run_examples,
}
TITLES = {
    "step": "Step time: scgjax vs hand-written JAX vs NumPyro",
    "estimators": "Estimators on the binary VAE",
    "categorical_vae": "Estimators on the categorical VAE",
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
        text = (path.read_text().strip().replace("](figures/", f"]({prefix}/figures/")
                .replace("](categorical_vae/", f"]({prefix}/categorical_vae/"))
        lines += [text, ""]
        if (results / f"{section}.png").exists() and f"/{section}.png)" not in text:
            lines += [f"![{section}]({prefix}/{section}.png)", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the chosen sections, then write ``BENCHMARKS.md``; return its text."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS),
                   help="sections to re-run (default: all; none: only rebuild the report)")
    p.add_argument("--examples", nargs="*", choices=list(EXAMPLES), default=None,
                   help="with the examples section: re-run only these (default: all; none: "
                   "reassemble the section); the others keep their last results")
    p.add_argument("--architectures", nargs="*", choices=list(ARCHITECTURES), default=None,
                   help="with the estimators section: re-run only these binary VAEs (default: "
                   "both; none: reassemble the section from the saved results)")
    p.add_argument("--categorical", nargs="*", choices=list(CATEGORICAL), default=None,
                   help="with the categorical_vae section: re-run only these configurations "
                   "(default: all; none: reassemble the section from the saved results)")
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
        if section == "examples":
            text = run_examples(args.quick, results, args.examples)
        elif section == "estimators":
            text = run_estimators(args.quick, results, args.architectures)
        elif section == "categorical_vae":
            text = run_categorical(args.quick, results, args.categorical)
        else:
            text = RUNNERS[section](args.quick, results)
        (results / f"{section}.md").write_text(text.strip() + "\n")
        print(f"[{section}] {time.perf_counter() - start:.0f} s", file=sys.stderr)
    report = build_report(results, output)
    output.write_text(report + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
