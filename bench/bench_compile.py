"""Benchmark compile time, init time, per-step dispatch and program runs per trace.

scgjax's ``sg.SVI(..., sg.ELBO())`` against NumPyro's ``SVI(..., TraceGraph_ELBO())`` on the
same programs, measured in one run (interleaved, so that the ratios share the machine's load):

- **Compile**: the jitted SVI update step, ``jax.jit(lambda state, *a: svi.update(state, *a))``
  for both libraries (scgjax's ``update`` jits its step itself; inside the outer ``jit`` that
  is one nested call). Timed separately: ``.lower(state, *args)`` (Python tracing of the
  programs, scgjax's graph analysis, lowering to StableHLO) and ``.compile()`` (XLA). Each
  repeat builds fresh model and guide functions and a fresh ``SVI`` and calls
  ``jax.clear_caches()`` first, so nothing is reused from an earlier repeat; median of the
  repeats. Also the size of the lowered StableHLO (lines of ``lowered.as_text()``).
  Programs, ``K = 1``:

  * ``normal chain S``: ``z_0 ~ Normal(0, 1)``, ``z_i ~ Normal(z_{i-1}, 1)`` for
    ``i < S``, ``x ~ Normal(z_{S-1}, 1)`` observed; guide ``z_i ~ Normal(q_i, 1)`` (one param
    per site; all pathwise).
  * ``bernoulli chain S``: ``z_0 ~ Bernoulli(logits=w)``, ``z_i ~ Bernoulli(logits=w *
    z_{i-1})`` (``w`` a model param), ``x ~ Normal(z_{S-1}, 1)`` observed; guide
    ``z_i ~ Bernoulli(logits=q_i)``. Score-function sites: scgjax's default for K = 1
    (``ScoreFunction`` with a moving-average baseline), NumPyro's TraceGraph_ELBO (no
    baseline).
  * ``plate N``: ``mu ~ Normal(0, 1)``, ``plate("data", N)``: ``z_n ~ Normal(mu, 1)``,
    ``x_n ~ Normal(z_n, 1)`` observed; guide ``mu ~ Normal(m, s)``, ``z_n ~ Normal(l_n,
    s_n)`` (``s``, ``s_n`` positive params). Also compiled: the hand-written step (below).

- **Step**: per-step wall time of the plate model at ``N = B = 50``, ``K = 1``: scgjax's
  ``svi.update``, ``jax.jit(numpyro_svi.update)`` and a hand-written step (the same negative
  ELBO written in ``jax.numpy``, ``jax.value_and_grad``, ``optax.adam``, one ``jax.jit``),
  interleaved round-robin as in ``bench_step.py``; medians and paired ratios vs hand-written.
- **Init**: ``SVI.init`` of each library on the ``S = 100`` normal chain and the plate model
  (``N = 1000``): a cold call (fresh functions, cleared caches) and a repeated call.
- **Runs per trace**: how many times the model and the guide functions run (counters inside
  them) while the step is traced once (``.lower``), while ``init`` runs, and in the first
  ``svi.update`` call (trace, compile and run).

``--label NAME`` names the outputs ``compile_NAME.json`` / ``compile_NAME.md`` (e.g.
``--label before`` with ``PYTHONPATH`` pointing at an older checkout of scgjax, ``--label
after`` with the current one). ``--quick`` is a smoke run (S in 5, 20; fewer repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as nd
import optax
from _machine import machine_info

import scgjax as sg
from scgjax import dist as sgd

LR = 1e-3
HERE = Path(__file__).resolve().parent

SG = SimpleNamespace(name="scgjax", sample=sg.sample, param=sg.param, plate=sg.plate, dist=sgd)
NP = SimpleNamespace(name="numpyro", sample=numpyro.sample,
                     param=lambda name, init, constraint=nd.constraints.real:
                     numpyro.param(name, init, constraint=constraint),
                     plate=numpyro.plate, dist=nd)
LIBS = (SG, NP)


# --------------------------------------------------------------------------------------------
# Programs (built fresh for every measurement, with call counters)
# --------------------------------------------------------------------------------------------


@dataclass
class Programs:
    """A model, a guide, their arguments and counters of how often each function ran."""

    model: Callable
    guide: Callable
    args: tuple
    counts: dict = field(default_factory=lambda: {"model": 0, "guide": 0})


def chain(lib: SimpleNamespace, size: int, kind: str) -> Programs:
    """A chain of ``size`` scalar latents (``kind`` "normal" or "bernoulli"), one observation."""
    counts = {"model": 0, "guide": 0}
    d = lib.dist

    def model(x):
        counts["model"] += 1
        if kind == "normal":
            z = 0.0
            for i in range(size):
                z = lib.sample(f"z{i}", d.Normal(z, 1.0))
        else:
            w = lib.param("w", 0.5)
            z = 1.0
            for i in range(size):
                z = lib.sample(f"z{i}", d.Bernoulli(logits=w * z))
        lib.sample("x", d.Normal(z, 1.0), obs=x)

    def guide(x):
        counts["guide"] += 1
        for i in range(size):
            q = lib.param(f"q{i}", 0.1)
            fn = d.Normal(q, 1.0) if kind == "normal" else d.Bernoulli(logits=q)
            lib.sample(f"z{i}", fn)

    return Programs(model, guide, (jnp.asarray(0.5),), counts)


def plate_data(n: int) -> jax.Array:
    """A fixed data vector of ``n`` points."""
    return 1.0 + jax.random.normal(jax.random.key(0), (n,))


def plate_model(lib: SimpleNamespace, n: int) -> Programs:
    """A global latent and a local latent per data point in a plate of ``n``."""
    counts = {"model": 0, "guide": 0}
    d = lib.dist

    def model(x):
        counts["model"] += 1
        mu = lib.sample("mu", d.Normal(0.0, 1.0))
        with lib.plate("data", x.shape[0]):
            z = lib.sample("z", d.Normal(mu, 1.0))
            lib.sample("x", d.Normal(z, 1.0), obs=x)

    def guide(x):
        counts["guide"] += 1
        m = lib.param("m", 0.0)
        s = lib.param("s", 1.0, d.constraints.positive)
        loc = lib.param("loc", jnp.zeros(x.shape[0]))
        scale = lib.param("scale", jnp.ones(x.shape[0]), d.constraints.positive)
        lib.sample("mu", d.Normal(m, s))
        with lib.plate("data", x.shape[0]):
            lib.sample("z", d.Normal(loc, scale))

    return Programs(model, guide, (plate_data(n),), counts)


def build(lib: SimpleNamespace, program: str, size: int) -> Programs:
    """``program`` is "normal", "bernoulli" (chains of ``size``) or "plate" (``size`` points)."""
    return plate_model(lib, size) if program == "plate" else chain(lib, size, program)


def make_svi(lib: SimpleNamespace, p: Programs) -> Any:
    """A fresh SVI of ``lib`` (K = 1, adam)."""
    if lib is SG:
        return sg.SVI(p.model, p.guide, optax.adam(LR), sg.ELBO())
    return numpyro.infer.SVI(p.model, p.guide, optax.adam(LR), numpyro.infer.TraceGraph_ELBO())


# --------------------------------------------------------------------------------------------
# Hand-written step of the plate model
# --------------------------------------------------------------------------------------------


def normal_lp(x: jax.Array, loc: jax.Array, scale: jax.Array | float) -> jax.Array:
    """log Normal(x; loc, scale), elementwise."""
    return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)


def hand_loss(params: dict, key: jax.Array, x: jax.Array) -> jax.Array:
    """Minus the one-sample ELBO of the plate model (reparameterised), in jax.numpy;
    positive params are stored as logs (the unconstrained values of both libraries)."""
    k_mu, k_z = jax.random.split(key)
    s, scale = jnp.exp(params["s"]), jnp.exp(params["scale"])
    mu = params["m"] + s * jax.random.normal(k_mu)
    z = params["loc"] + scale * jax.random.normal(k_z, x.shape)
    log_q = normal_lp(mu, params["m"], s) + normal_lp(z, params["loc"], scale).sum()
    log_p = normal_lp(mu, 0.0, 1.0) + normal_lp(z, mu, 1.0).sum() + normal_lp(x, z, 1.0).sum()
    return log_q - log_p


def hand_init(n: int) -> tuple:
    """The hand-written step's state: params (same initial values as the guides), adam, key."""
    params = {"m": jnp.zeros(()), "s": jnp.zeros(()), "loc": jnp.zeros(n),
              "scale": jnp.zeros(n)}
    return params, optax.adam(LR).init(params), jax.random.key(2)


def make_hand_step() -> Callable:
    """A fresh (unjitted) hand-written SVI step: ``(state, x) -> (state, loss)``."""
    opt = optax.adam(LR)

    def step(state: tuple, x: jax.Array) -> tuple[tuple, jax.Array]:
        params, opt_state, key = state
        key, step_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(hand_loss)(params, step_key, x)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    return step


# --------------------------------------------------------------------------------------------
# Compile time, runs per trace
# --------------------------------------------------------------------------------------------


def compile_once(lib: SimpleNamespace | None, program: str, size: int) -> dict:
    """Build fresh programs and SVI, init, clear jax's caches, then time ``.lower`` and
    ``.compile`` of the jitted update step; count the programs' runs. ``lib=None``: the
    hand-written step (plate model only)."""
    if lib is None:
        fn, state, args, counts = make_hand_step(), hand_init(size), (plate_data(size),), None
        init_runs = None
    else:
        p = build(lib, program, size)
        svi = make_svi(lib, p)
        state = svi.init(jax.random.key(1), *p.args)
        init_runs = dict(p.counts)
        p.counts.update(model=0, guide=0)
        args, counts = p.args, p.counts

        def fn(state, *a):
            return svi.update(state, *a)

    jax.block_until_ready(state)
    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(state, *args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
           "hlo_lines": len(lowered.as_text().splitlines())}
    if counts is not None:
        out["trace_runs"] = dict(counts)
        out["init_runs"] = init_runs
    del compiled
    return out


def first_update_runs(lib: SimpleNamespace, program: str, size: int) -> dict:
    """Model and guide runs in the first ``svi.update`` call (numpyro's jitted), after init."""
    p = build(lib, program, size)
    svi = make_svi(lib, p)
    state = svi.init(jax.random.key(1), *p.args)
    p.counts.update(model=0, guide=0)
    update = svi.update if lib is SG else jax.jit(svi.update)
    jax.block_until_ready(update(state, *p.args))
    return dict(p.counts)


def bench_compile(program: str, size: int, repeats: int, first_update: bool = True) -> dict:
    """Repeats of compile_once for each library (order alternating), medians and ratios;
    with ``first_update``, also the program runs in a first ``svi.update`` call (one more
    compilation per library)."""
    names = ["scgjax", "numpyro"] + (["hand"] if program == "plate" else [])
    libs = {"scgjax": SG, "numpyro": NP, "hand": None}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            runs[name].append(compile_once(libs[name], program, size))
    out: dict[str, Any] = {"program": program, "size": size, "repeats": repeats}
    for name in names:
        rs = runs[name]
        out[name] = {k: statistics.median(x[k] for x in rs)
                     for k in ("lower_s", "compile_s", "total_s")}
        out[name]["hlo_lines"] = rs[0]["hlo_lines"]
        out[name]["all"] = rs
        if name != "hand":
            out[name]["trace_runs"] = rs[0]["trace_runs"]
            out[name]["init_runs"] = rs[0]["init_runs"]
            if first_update:
                out[name]["first_update_runs"] = first_update_runs(libs[name], program, size)
    for k in ("lower_s", "compile_s", "total_s", "hlo_lines"):
        out[f"ratio_{k}"] = out["scgjax"][k] / out["numpyro"][k]
    # paired: the ratio within each repeat (the two ran next to each other)
    out["paired_total"] = statistics.median(
        a["total_s"] / b["total_s"] for a, b in zip(runs["scgjax"], runs["numpyro"], strict=True))
    return out


# --------------------------------------------------------------------------------------------
# Init time
# --------------------------------------------------------------------------------------------


def bench_init(program: str, size: int, repeats: int, warm_calls: int) -> dict:
    """Cold ``SVI.init`` (fresh functions and SVI, cleared caches) and repeated init (same SVI,
    same arguments: ``warm_calls`` calls, the median) for each library, alternating."""
    out: dict[str, Any] = {"program": program, "size": size, "repeats": repeats}
    cold: dict[str, list[float]] = {"scgjax": [], "numpyro": []}
    warm: dict[str, list[float]] = {"scgjax": [], "numpyro": []}
    for r in range(repeats):
        for lib in (LIBS if r % 2 == 0 else LIBS[::-1]):
            p = build(lib, program, size)
            svi = make_svi(lib, p)
            jax.clear_caches()
            t0 = time.perf_counter()
            jax.block_until_ready(svi.init(jax.random.key(1), *p.args))
            cold[lib.name].append(time.perf_counter() - t0)
            times = []
            for _ in range(warm_calls):
                t0 = time.perf_counter()
                jax.block_until_ready(svi.init(jax.random.key(1), *p.args))
                times.append(time.perf_counter() - t0)
            warm[lib.name].append(statistics.median(times))
    for name in cold:
        out[name] = {"cold_s": statistics.median(cold[name]),
                     "warm_s": statistics.median(warm[name]),
                     "cold_all": cold[name], "warm_all": warm[name]}
    out["ratio_cold"] = out["scgjax"]["cold_s"] / out["numpyro"]["cold_s"]
    out["ratio_warm"] = out["scgjax"]["warm_s"] / out["numpyro"]["warm_s"]
    return out


# --------------------------------------------------------------------------------------------
# Step (dispatch) time
# --------------------------------------------------------------------------------------------


def bench_step(batch: int, rounds: int, steps: int) -> dict:
    """Per-step time of the plate model (N = batch, K = 1): scgjax, numpyro, hand-written,
    interleaved round-robin (order rotating every round), one warm-up round each."""
    x = plate_data(batch)
    impls: dict[str, list] = {}
    p = build(SG, "plate", batch)
    svi = make_svi(SG, p)
    impls["scgjax"] = [svi.update, svi.init(jax.random.key(2), x)]
    p = build(NP, "plate", batch)
    nsvi = make_svi(NP, p)
    impls["numpyro"] = [jax.jit(nsvi.update), nsvi.init(jax.random.key(2), x)]
    impls["hand"] = [jax.jit(make_hand_step()), hand_init(batch)]
    times: dict[str, list[float]] = {n: [] for n in impls}
    first: dict[str, float] = {}

    def run(name: str, n: int) -> float:
        step, state = impls[name]
        t0 = time.perf_counter()
        for _ in range(n):
            state, loss = step(state, x)
        jax.block_until_ready((state, loss))
        impls[name][1] = state
        return (time.perf_counter() - t0) / n

    for name in impls:
        first[name] = run(name, 1)
        run(name, max(1, steps // 5))
    names = list(impls)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            times[name].append(run(name, steps))
    med = {n: statistics.median(t) for n, t in times.items()}
    out: dict[str, Any] = {"batch": batch, "num_particles": 1, "rounds": rounds,
                           "steps_per_round": steps}
    for n in names:
        out[n] = {"median_ms": 1e3 * med[n], "best_ms": 1e3 * min(times[n]),
                  "first_call_s": first[n], "round_ms": [1e3 * t for t in times[n]]}
    for n in ("scgjax", "numpyro"):
        r = np.asarray(times[n]) / np.asarray(times["hand"])
        q1, q2, q3 = np.percentile(r, [25, 50, 75])
        out[f"{n}_vs_hand"] = {"ratio": med[n] / med["hand"], "paired": q2,
                               "paired_iqr": [q1, q3],
                               "best": min(times[n]) / min(times["hand"])}
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def runs_str(d: dict | None) -> str:
    """``model / guide`` run counts, or "-" when not measured."""
    return "-" if d is None else f"{d['model']} / {d['guide']}"


def compile_table(results: list[dict]) -> str:
    head = ["program", "size", "scgjax lower s", "compile s", "total s", "numpyro lower s",
            "compile s", "total s", "total ratio", "paired", "lower ratio", "compile ratio",
            "HLO lines scgjax / numpyro", "HLO ratio"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results:
        s, n = c["scgjax"], c["numpyro"]
        rows.append("| " + " | ".join([
            c["program"], str(c["size"]),
            f"{s['lower_s']:.3f}", f"{s['compile_s']:.3f}", f"{s['total_s']:.3f}",
            f"{n['lower_s']:.3f}", f"{n['compile_s']:.3f}", f"{n['total_s']:.3f}",
            f"{c['ratio_total_s']:.2f}", f"{c['paired_total']:.2f}",
            f"{c['ratio_lower_s']:.2f}", f"{c['ratio_compile_s']:.2f}",
            f"{s['hlo_lines']} / {n['hlo_lines']}", f"{c['ratio_hlo_lines']:.2f}"]) + " |")
    hands = [c for c in results if "hand" in c]
    if hands:
        rows.append("")
        rows.append("Hand-written step of the plate model (same measurement): " + "; ".join(
            f"N={c['size']}: lower {c['hand']['lower_s']:.3f} s, compile "
            f"{c['hand']['compile_s']:.3f} s, total {c['hand']['total_s']:.3f} s, "
            f"{c['hand']['hlo_lines']} HLO lines" for c in hands) + ".")
    return "\n".join(rows)


def runs_table(results: list[dict]) -> str:
    head = ["program", "size", "scgjax: per trace", "in init", "first update",
            "numpyro: per trace", "in init", "first update"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results:
        s, n = c["scgjax"], c["numpyro"]
        rows.append("| " + " | ".join([
            c["program"], str(c["size"]), runs_str(s["trace_runs"]), runs_str(s["init_runs"]),
            runs_str(s.get("first_update_runs")), runs_str(n["trace_runs"]),
            runs_str(n["init_runs"]), runs_str(n.get("first_update_runs"))]) + " |")
    return "\n".join(rows)


def init_table(results: list[dict]) -> str:
    head = ["program", "size", "scgjax cold s", "numpyro cold s", "ratio", "scgjax again ms",
            "numpyro again ms", "ratio"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results:
        rows.append("| " + " | ".join([
            c["program"], str(c["size"]), f"{c['scgjax']['cold_s']:.3f}",
            f"{c['numpyro']['cold_s']:.3f}", f"{c['ratio_cold']:.2f}",
            f"{1e3 * c['scgjax']['warm_s']:.1f}", f"{1e3 * c['numpyro']['warm_s']:.1f}",
            f"{c['ratio_warm']:.2f}"]) + " |")
    return "\n".join(rows)


def step_table(s: dict) -> str:
    head = ["impl", "median ms", "best ms", "vs hand (medians)", "paired [IQR]", "best",
            "first call s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in ("scgjax", "numpyro", "hand"):
        v = s.get(f"{n}_vs_hand")
        cells = [n, f"{s[n]['median_ms']:.3f}", f"{s[n]['best_ms']:.3f}"]
        cells += ([f"{v['ratio']:.2f}",
                   f"{v['paired']:.2f} [{v['paired_iqr'][0]:.2f}-{v['paired_iqr'][1]:.2f}]",
                   f"{v['best']:.2f}"] if v else ["1", "1", "1"])
        cells.append(f"{s[n]['first_call_s']:.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def scgjax_source() -> str:
    """The git commit of the imported scgjax's checkout (and "+ local changes" if its package
    differs from that commit), without any path; "unknown" outside git."""
    pkg = Path(sg.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + local changes" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--label", default=None,
                   help="name the outputs compile_LABEL.json/.md (default compile.json/.md)")
    p.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 50, 100],
                   help="chain lengths S (default 5 20 50 100)")
    p.add_argument("--programs", nargs="+", default=["normal", "bernoulli"],
                   choices=["normal", "bernoulli"], help="chain kinds (default both)")
    p.add_argument("--plate-size", type=int, default=1000,
                   help="N of the plate model in the compile and init measurements (1000)")
    p.add_argument("--repeats", type=int, default=3,
                   help="compile and cold-init repeats per setting, median (default 3)")
    p.add_argument("--batch", type=int, default=50, help="N of the step timing (50)")
    p.add_argument("--rounds", type=int, default=30, help="step timing rounds (30)")
    p.add_argument("--steps-per-round", type=int, default=200, help="steps per round (200)")
    p.add_argument("--init-size", type=int, default=100,
                   help="S of the chain in the init measurement (100)")
    p.add_argument("--skip", nargs="*", default=[], choices=["compile", "init", "step"],
                   help="parts to skip")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: S in 5 20, 2 repeats, 5 step rounds of 50 steps")
    p.add_argument("--out", type=Path, default=HERE / "results",
                   help="output folder (default bench/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 20] or [5, 20]
        args.repeats, args.rounds, args.steps_per_round = 2, 5, 50
        args.init_size = min(args.init_size, 20)
    info = machine_info(numpyro=numpyro.__version__)
    source = scgjax_source()
    print(info, flush=True)
    print(f"scgjax from {sg.__file__} ({source}), label {args.label}", file=sys.stderr,
          flush=True)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    compiles, inits, step = [], [], None
    if "compile" not in args.skip:
        settings = [(prog, s) for prog in args.programs for s in args.sizes]
        settings.append(("plate", args.plate_size))
        for lib in (*LIBS, None):  # warm-up (one-time costs of the first trace), discarded
            compile_once(lib, "plate", 10)
        for j, (prog, size) in enumerate(settings):
            t0 = time.perf_counter()
            first = j == 0 or settings[j - 1][0] != prog  # the smallest size of each program
            compiles.append(bench_compile(prog, size, args.repeats, first_update=first))
            c = compiles[-1]
            print(f"  compile {prog} {size}: scgjax {c['scgjax']['total_s']:.2f} s, numpyro "
                  f"{c['numpyro']['total_s']:.2f} s ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    if "init" not in args.skip:
        for prog, size in (("normal", args.init_size), ("plate", args.plate_size)):
            inits.append(bench_init(prog, size, args.repeats, 5))
            print(f"  init {prog} {size} done", file=sys.stderr, flush=True)
    if "step" not in args.skip:
        step = bench_step(args.batch, args.rounds, args.steps_per_round)
        print("  step done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    settings_out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k != "out"}
    lines = [
        f"Machine: {info}",
        f"scgjax source: {source}; label: {args.label or '(none)'}",
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"the run took {elapsed:.0f} s.",
    ]
    if compiles:
        lines += [
            "",
            "## Compile time of the jitted SVI update step",
            "",
            "`jax.jit(lambda state, *a: svi.update(state, *a))` for both libraries, K = 1, "
            "adam; `lower` = `.lower(state, *args)` (tracing the programs, scgjax's graph "
            "analysis, lowering to StableHLO), `compile` = `.compile()` (XLA). Fresh programs "
            f"and SVI, `jax.clear_caches()` before each; median of {args.repeats} repeats "
            "(scgjax and numpyro alternating). Ratios: scgjax / numpyro of the medians; "
            "'paired': median of the per-repeat ratios of the totals. HLO lines: "
            "`lowered.as_text()`. Chains: S scalar sites, mean-field guide; the Bernoulli "
            "chain uses scgjax's default score-function estimator (moving-average baseline) "
            "and NumPyro's TraceGraph_ELBO (no baseline). Plate: a global latent and a local "
            "latent per data point.",
            "",
            compile_table(compiles),
            "",
            "## Program runs (model / guide)",
            "",
            "How many times the model and guide functions ran while the step was traced once "
            "(`.lower`), during `SVI.init`, and during the first `svi.update` call "
            "(numpyro's: `jax.jit(svi.update)`; measured at the smallest size of each "
            "program only, '-' elsewhere). The target for scgjax is at most 2 per trace.",
            "",
            runs_table(compiles),
        ]
    if inits:
        lines += [
            "",
            "## SVI.init",
            "",
            f"Cold: fresh programs and SVI, `jax.clear_caches()`, median of {args.repeats}. "
            "Again: the same SVI and arguments, median of 5 further calls.",
            "",
            init_table(inits),
        ]
    if step:
        lines += [
            "",
            f"## Step time, plate model, B = {args.batch}, K = 1",
            "",
            f"Median per-step wall time over {args.rounds} interleaved rounds of "
            f"{args.steps_per_round} steps: scgjax `svi.update`, `jax.jit(numpyro svi.update)` "
            "(TraceGraph_ELBO), hand-written jax.numpy + optax step in one `jax.jit`. Ratios "
            "vs hand-written: of the medians, 'paired' = median [IQR] of the ratios of "
            "adjacent rounds, 'best' = of the fastest rounds.",
            "",
            step_table(step),
        ]
    lines += ["", "The machine is shared: single timings are noisy; compare the ratios, "
              "which were measured in the same run."]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"compile_{args.label}" if args.label else "compile"
    result = {"machine": info, "scgjax_source": source, "label": args.label,
              "settings": settings_out, "seconds": elapsed,
              "load_average_1min": [load_before[0], load_after[0]],
              "compile": compiles, "init": inits, "step": step}
    (args.out / f"{stem}.md").write_text(text + "\n")
    with open(args.out / f"{stem}.json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {stem}.md and {stem}.json in the output folder", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
