"""Compare the gradient estimators of the categorical VAE (20 latents of 10 classes): held-out
ELBO, importance-sampled bound, encoder-gradient variance and time per step, over seeds.

The model is the one of ``examples/categorical_vae_mnist.py`` (``build(estimator,
architecture, latent_dims=..., joint=...)``, the benchmark of Jang et al. 2017, ARSM and Kool et
al. 2020): ``--architecture linear`` (784-200 / 200-784) or ``nonlinear`` (784-512-256-200 /
200-256-512-784, LeakyReLU(0.1)), a uniform prior over each latent, Bernoulli pixels. Every
estimator of ``categorical_vae_mnist.ESTIMATORS`` (``--estimators``; by default all) is trained
with ``sg.SVI``, ``optax.adam(--lr)`` and ``sg.ELBO(num_particles=K)`` at the same ``K``
(``--num-particles``, default 4: Kool et al. compare their multi-sample estimators at K = 4).
An estimator that scgjax refuses for the model (``UnorderedSet`` and ``SumAndSample`` on the
20 latents in a plate: their weights are per plate element, and the likelihood depends on all
20 latents at once) is listed with the library's error and not trained. ``--latent-dims 2
--joint`` is Kool et al.'s "small domain": the two latents as one Categorical over their 100
joint classes, where those two estimators apply. Estimators that scgjax lacks for Categorical
sites (``categorical_vae_mnist.PENDING``, empty now) are listed as such.

For each seed (``--seeds``) all estimators start from the same initial parameters and see the
same dynamically binarised mini-batches. Measured, per estimator and seed:

- the training objective per image of every step (``-loss / B``: for ``gumbel`` the relaxed
  objective, for the without-replacement estimators their weighted estimate);
- every ``--eval-every`` steps, the **encoder-gradient variance** at the current parameters
  and estimator state: ``sg.diagnostics.gradient_variance`` with ``--grad-samples`` keys on one
  fixed batch (``B`` random training images binarised once), the variance of the gradient of
  ``loss / B`` summed over the encoder's coordinates (``categorical_vae_mnist
  .encoder_variance``);
- at the end, the held-out ELBO per image (``K`` particles, the discrete ELBO with a plain
  score-function guide of the same params, all held-out images dynamically binarised) and the
  importance-sampled bound ``L_S`` (``sg.log_marginal_likelihood``, ``--is-particles`` S on the
  first ``--is-images`` held-out images, binarised once with a fixed key).

Then the time of one ``svi.update`` on a fixed batch, for all trained estimators in one
process, interleaved round-robin (``--timing-rounds`` rounds of ``--timing-steps`` steps, the
order rotating, one warm-up round): the median per-step time and the median [IQR] of its
ratio to RLOO's over adjacent rounds.

Outputs in ``--out``: ``<stem>.md`` (machine, settings, table), ``<stem>.png`` (training
objective and encoder-gradient variance against steps, mean over seeds, min-max band),
``<stem>.json``; ``<stem>`` is ``categorical_vae`` for the linear 20 x 10 model,
``categorical_vae_nonlinear``, and ``categorical_vae_small`` / ``categorical_vae_small_nonlinear``
for ``--latent-dims 2 --joint`` (:func:`output_stem`). ``--quick`` is a smoke run.
Data: ``--data split`` (default; 8,000 training and 2,000 held-out images of the MNIST test
split, the only real split on this project's machines) or ``standard``.

``python bench/report.py --sections categorical_vae`` runs the configurations of the report
and includes the tables in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _machine import machine_info

import scgjax as sg
from scgjax.data import dynamic_binarize

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import _common as common  # noqa: E402
from examples import categorical_vae_mnist as cvae  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

REFERENCE = "rloo"
QUICK = {"steps": 60, "seeds": [0], "grad_samples": 8, "eval_every": 30, "is_particles": 10,
         "is_images": 50, "timing_rounds": 2, "timing_steps": 5}
DEFAULTS = {"steps": 1500, "seeds": [0, 1], "grad_samples": 50, "eval_every": 500,
            "is_particles": 100, "is_images": 500, "timing_rounds": 10, "timing_steps": 20}

# --------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass
class Run:
    """One (estimator, seed) training run."""

    elbo: np.ndarray  # training objective per image, per step
    eval_steps: list[int]
    variance: list[float]
    test_elbo: float
    test_bound: float | None
    first_call_s: float
    seconds: float
    final_state: Any = None


@dataclasses.dataclass
class Result:
    """All runs of one estimator, its interleaved step times, and why it was not trained."""

    name: str
    description: str
    k: int
    unbiased: bool = True
    runs: dict[int, Run] = dataclasses.field(default_factory=dict)
    step_times: list[float] = dataclasses.field(default_factory=list)
    note: str = ""


@dataclasses.dataclass
class Setup:
    name: str
    model: Any
    guide: Any
    svi: sg.SVI


def output_stem(architecture: str, latent_dims: int = cvae.LATENT_DIMS,
                joint: bool = False) -> str:
    """``categorical_vae`` (linear, 20 latents), plus ``_small`` for ``--latent-dims`` other
    than 20 or ``--joint``, plus ``_<architecture>`` for a non-linear one."""
    stem = "categorical_vae"
    if joint or latent_dims != cvae.LATENT_DIMS:
        stem += "_small"
    return stem if architecture == "linear" else f"{stem}_{architecture}"


def seed_keys(seed: int) -> dict[str, jax.Array]:
    names = ("batches", "init", "svi", "grad", "test", "bound")
    return dict(zip(names, jax.random.split(jax.random.key(seed), len(names)), strict=True))


# --------------------------------------------------------------------------------------------
# Training and measurement


def train_one(setup: Setup, args: argparse.Namespace, data: common.Data, seed: int,
              params0: dict, x_eval: jax.Array, x_bound: jax.Array, eval_programs: tuple,
              k: int) -> Run:
    """Train ``setup`` for ``args.steps`` steps from ``params0`` with the seed's batches."""
    keys = seed_keys(seed)
    batches = common.Batches(data.train, args.batch_size, keys["batches"])
    batch = batches()
    # the shared initial params, plus the estimator's own (e.g. RELAX's control variate)
    own = sg.init_params(keys["svi"], setup.model, setup.guide, batch)
    state = setup.svi.init(keys["svi"], batch, init_params_={**own, **params0})
    eval_steps: list[int] = []
    variance: list[float] = []

    def evaluate(step: int) -> None:
        eval_steps.append(step)
        variance.append(cvae.encoder_variance(
            setup.model, setup.guide, state.params, state.estimator_state, x_eval,
            jax.random.fold_in(keys["grad"], step), k, args.grad_samples))

    losses: list[jax.Array] = []
    first_call_s = 0.0
    start = time.perf_counter()
    for i in range(args.steps):
        if i % args.eval_every == 0:
            evaluate(i)
        t0 = time.perf_counter()
        state, loss = setup.svi.update(state, batch)
        if i == 0:
            loss.block_until_ready()
            first_call_s = time.perf_counter() - t0
        losses.append(loss)
        batch = batches()
    evaluate(args.steps)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    elbo = -np.asarray(jax.device_get(losses), dtype=np.float64) / args.batch_size
    shared = {n: state.params[n] for n in params0}
    eval_model, eval_guide = eval_programs
    test_elbo = common.evaluate_elbo(eval_model, eval_guide, shared, data.test, keys["test"],
                                     num_particles=k)
    bound = None
    if args.is_particles > 0:
        bound = cvae.importance_bound(eval_model, eval_guide, shared, x_bound, keys["bound"],
                                      args.is_particles)
    return Run(elbo, eval_steps, variance, test_elbo, bound, first_call_s, seconds, state)


def time_steps(setups: list[Setup], results: dict[str, Result], x: jax.Array, rounds: int,
               steps: int) -> None:
    """Interleaved timing of ``svi.update`` on ``x`` from each estimator's final state of
    its first seed; appends per-step times to ``results``."""
    states = {s.name: next(iter(results[s.name].runs.values())).final_state for s in setups}

    def one_round(s: Setup) -> float:
        state = states[s.name]
        t0 = time.perf_counter()
        for _ in range(steps):
            state, loss = s.svi.update(state, x)
        jax.block_until_ready((state, loss))
        states[s.name] = state
        return (time.perf_counter() - t0) / steps

    for s in setups:
        one_round(s)
    for r in range(rounds):
        for i in range(len(setups)):
            s = setups[(i + r) % len(setups)]
            results[s.name].step_times.append(one_round(s))


# --------------------------------------------------------------------------------------------
# Report


def mean_std(values: Sequence[float | None], fmt: str = ".2f") -> str:
    """``mean ± std`` over seeds (sample std; only the mean for one value)."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ± {statistics.stdev(values):{fmt}}"


def table(results: dict[str, Result], last: int) -> str:
    """The markdown table."""
    head = ["estimator", "K", f"train objective (last {last} steps)", "held-out ELBO",
            "held-out L_S", "enc. grad variance (end)", "var / RLOO", "ms/step",
            "time / RLOO [IQR]", "compile s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results.get(REFERENCE)
    ref_ok = ref is not None and ref.runs and ref.step_times
    ref_var = statistics.fmean(r.variance[-1] for r in ref.runs.values()) if ref_ok else None
    for res in results.values():
        name = res.name + ("" if res.unbiased else " (biased)")
        if not res.runs:
            rows.append(f"| {name} | {res.k} | " + " | ".join(["—"] * (len(head) - 2)) + " |")
            continue
        runs = list(res.runs.values())
        var_end = [r.variance[-1] for r in runs]
        cells = [name, str(res.k),
                 mean_std([float(np.mean(r.elbo[-last:])) for r in runs]),
                 mean_std([r.test_elbo for r in runs]), mean_std([r.test_bound for r in runs]),
                 mean_std(var_end, ".3g"),
                 f"{statistics.fmean(var_end) / ref_var:.3g}" if ref_var else "—"]
        if res.step_times:
            med = statistics.median(res.step_times)
            cells.append(f"{1e3 * med:.2f}")
            if ref_ok and len(ref.step_times) == len(res.step_times):
                q1, q2, q3 = np.percentile(np.asarray(res.step_times)
                                           / np.asarray(ref.step_times), [25, 50, 75])
                cells.append(f"{q2:.2f} [{q1:.2f}-{q3:.2f}]")
            else:
                cells.append("—")
            cells.append(f"{runs[0].first_call_s - med:.2f}")
        else:
            cells += ["—", "—", "—"]
        rows.append("| " + " | ".join(cells) + " |")
    notes = [f"- **{r.name}**: {r.note}" for r in results.values() if r.note]
    return "\n".join(rows + ([""] + notes if notes else []))


def per_seed(results: dict[str, Result]) -> str:
    """Held-out ELBO and L_S per seed (the spread behind the table's ± std)."""
    seeds = sorted({s for r in results.values() for s in r.runs})
    head = ["estimator"] + [f"seed {s}: ELBO / L_S" for s in seeds]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results.values():
        if not res.runs:
            continue
        cells = [res.name]
        for s in seeds:
            r = res.runs.get(s)
            cells.append("—" if r is None else f"{r.test_elbo:.2f} / "
                         + ("—" if r.test_bound is None else f"{r.test_bound:.2f}"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(path: Path, results: dict[str, Result], steps: int, title: str) -> None:
    """Training objective (smoothed) and encoder-gradient variance against steps: mean over
    seeds (geometric for the variance), band min-max."""
    fig, (ax_elbo, ax_var) = plt.subplots(1, 2, figsize=(12.0, 4.5))
    window = max(1, steps // 50)
    x = np.arange(1, steps + 1)
    lows, highs = [], []
    for i, res in enumerate(r for r in results.values() if r.runs):
        color = f"C{i}"
        curves = np.stack([common.smooth(r.elbo, window) for r in res.runs.values()])
        mean = curves.mean(axis=0)
        ax_elbo.plot(x, mean, color=color, lw=1.3, label=f"{res.name} (K={res.k})")
        ax_elbo.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.2)
        lows.append(float(np.percentile(mean[len(mean) // 10:], 1)))
        highs.append(float(curves.max()))
        runs = list(res.runs.values())
        ev = np.asarray(runs[0].eval_steps)
        logv = np.log10(np.maximum(np.stack([r.variance for r in runs]), 1e-30))
        ax_var.plot(ev, 10 ** logv.mean(0), color=color, lw=1.3, marker="o", ms=3,
                    label=res.name)
        ax_var.fill_between(ev, 10 ** logv.min(0), 10 ** logv.max(0), color=color, alpha=0.2)
    if lows:
        lo, hi = min(lows), max(highs)
        ax_elbo.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax_elbo.set_xlabel("step")
    ax_elbo.set_ylabel(f"training objective per image (nats, {window}-step average)")
    ax_elbo.set_title("training objective (mean over seeds, band: min-max)", fontsize=10)
    ax_var.set_yscale("log")
    ax_var.set_xlabel("step")
    ax_var.set_ylabel("encoder-gradient variance (sum over coordinates)")
    ax_var.set_title("encoder-gradient variance on a fixed batch", fontsize=10)
    for ax in (ax_elbo, ax_var):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_json(results: dict[str, Result], settings: dict) -> dict:
    out: dict[str, Any] = {"settings": settings, "estimators": {}}
    for res in results.values():
        out["estimators"][res.name] = {
            "description": res.description, "num_particles": res.k, "unbiased": res.unbiased,
            "note": res.note, "step_times_s": res.step_times,
            "seeds": {str(seed): {
                "train_objective_per_step": [round(v, 4) for v in run.elbo.tolist()],
                "eval_steps": run.eval_steps, "encoder_grad_variance": run.variance,
                "test_elbo": run.test_elbo, "test_bound": run.test_bound,
                "first_call_s": run.first_call_s, "train_seconds": run.seconds,
            } for seed, run in res.runs.items()},
        }
    return out


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_categorical_vae.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--estimators", nargs="+", default=None,
                   help="default: every entry of categorical_vae_mnist.ESTIMATORS")
    p.add_argument("--architecture", choices=sorted(cvae.ARCHITECTURES), default="linear")
    p.add_argument("--latent-dims", type=int, default=cvae.LATENT_DIMS)
    p.add_argument("--joint", action="store_true",
                   help="the latents as one Categorical over their joint classes")
    p.add_argument("--num-particles", type=int, default=cvae.DEFAULT_PARTICLES)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    p.add_argument("--steps", type=int, default=None, help="default 1500")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=None, help="default 500")
    p.add_argument("--grad-samples", type=int, default=None, help="default 50")
    p.add_argument("--is-particles", type=int, default=None, help="S of L_S (default 100)")
    p.add_argument("--is-images", type=int, default=None, help="default 500")
    p.add_argument("--timing-rounds", type=int, default=None, help="default 10")
    p.add_argument("--timing-steps", type=int, default=None, help="default 20")
    p.add_argument("--data", choices=("split", "standard"), default="split")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("out") / "bench_categorical_vae")
    p.add_argument("--quick", action="store_true", help="smoke run")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.grad_samples < 2:
        p.error("--grad-samples must be at least 2")
    names = list(cvae.ESTIMATORS) + list(cvae.PENDING)
    if args.estimators is None:
        args.estimators = names
    unknown = [n for n in args.estimators if n not in names]
    if unknown:
        p.error(f"unknown estimators {unknown}; registered: {names}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Result]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    info = machine_info()
    print(info, flush=True)
    load_before = os.getloadavg()
    data = cvae.load_data(args.data, args.data_dir)
    k = args.num_particles
    arch, dims = args.architecture, args.latent_dims
    pick = np.random.default_rng(12345).choice(len(data.train), args.batch_size, replace=False)
    x_eval = dynamic_binarize(jax.random.key(12345), jnp.asarray(data.train[np.sort(pick)]))
    n_bound = min(args.is_images, len(data.test))
    x_bound = dynamic_binarize(jax.random.key(54321), jnp.asarray(data.test[:n_bound]))
    eval_programs = cvae.build(sg.ScoreFunction(), arch, latent_dims=dims)
    bases = {seed: sg.init_params(seed_keys(seed)["init"], *eval_programs, x_eval)
             for seed in args.seeds}

    results: dict[str, Result] = {}
    setups: list[Setup] = []
    for name in args.estimators:
        if name in cvae.PENDING:
            results[name] = Result(name, "", k, note=f"not run: {cvae.PENDING[name]}")
            continue
        choice = cvae.ESTIMATORS[name]
        res = results[name] = Result(name, choice.description, k, choice.unbiased)
        try:
            estimator, _ = cvae.make_estimator(name, k)
            model, guide = cvae.build(estimator, arch, latent_dims=dims, joint=args.joint)
            cvae.check_programs(model, guide, x_eval, k)
        except (ValueError, sg.SiteError) as e:
            res.note = f"not trained: {e}"
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        svi = sg.SVI(model, guide, optax.adam(args.lr), sg.ELBO(num_particles=k))
        setups.append(Setup(name, model, guide, svi))

    for seed in args.seeds:
        for s in list(setups):
            t0 = time.perf_counter()
            try:
                run = train_one(s, args, data, seed, bases[seed], x_eval, x_bound,
                                eval_programs, k)
            except Exception as e:  # report and go on with the others
                traceback.print_exc()
                results[s.name].note = f"failed (seed {seed}): {type(e).__name__}: {e}"
                results[s.name].runs.clear()
                setups.remove(s)
                continue
            results[s.name].runs[seed] = run
            print(f"seed {seed} {s.name:>10}: held-out ELBO {run.test_elbo:.2f}, L_S "
                  f"{run.test_bound}, enc. grad var {run.variance[-1]:.3g}, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if setups:
        time_steps(setups, results, x_eval, args.timing_rounds, args.timing_steps)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    last = min(args.eval_every, args.steps)
    model_text = cvae.describe(arch, dims) + (
        f", as one Categorical over the {cvae.NUM_CLASSES ** dims} joint classes"
        if args.joint else "")
    settings = {
        "machine": info, "model": model_text, "architecture": arch, "latent_dims": dims,
        "joint": args.joint, "num_particles": k, "seeds": args.seeds, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "eval_every": args.eval_every,
        "grad_samples": args.grad_samples, "is_particles": args.is_particles,
        "is_images": n_bound, "train": data.train_source, "held_out": data.test_source,
        "timing_rounds": args.timing_rounds, "timing_steps": args.timing_steps,
        "seconds": elapsed,
    }
    text = "\n".join([
        f"Machine: {info}",
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"the run took {elapsed:.0f} s.",
        "",
        f"Categorical VAE ({model_text}; uniform prior, Bernoulli pixels, dynamic "
        f"binarisation), Adam lr {args.lr}, batch {args.batch_size}, K={k} for every "
        f"estimator, {args.steps} steps, seeds {args.seeds} (same init and batches for every "
        f"estimator). Train: {data.train_source}; held-out: {data.test_source}. Mean ± std "
        f"over seeds. Train objective: mean of the last {last} steps of -loss / B (for "
        f"gumbel the relaxed objective). Held-out ELBO: the discrete ELBO, K={k}. Held-out "
        f"L_S: sg.log_marginal_likelihood with S={args.is_particles} on the first {n_bound} "
        f"held-out images. Encoder-gradient variance: sg.diagnostics.gradient_variance, "
        f"M={args.grad_samples} estimates of the gradient of loss / B on a fixed batch of "
        f"{args.batch_size} training images, summed over the encoder's coordinates, at the "
        f"final parameters; var / RLOO: ratio of the means. ms/step: median of "
        f"{args.timing_rounds} interleaved rounds of {args.timing_steps} svi.update calls; "
        f"time / RLOO: median [IQR] of the ratios of adjacent rounds. Compile: first call "
        f"minus the steady-state step.",
        "",
        table(results, last),
        "",
        "Per seed:",
        "",
        per_seed(results),
    ])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(arch, dims, args.joint)
    paths = {ext: args.out / f"{stem}.{ext}" for ext in ("md", "png", "json")}
    paths["md"].write_text(text + "\n")
    plot(paths["png"], results, args.steps,
         f"categorical VAE, {model_text}, K={k}, batch {args.batch_size}, Adam {args.lr}, "
         f"seeds {args.seeds}")
    with open(paths["json"], "w") as f:
        json.dump(to_json(results, settings), f)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


if __name__ == "__main__":
    main()
