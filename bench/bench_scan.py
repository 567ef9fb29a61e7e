"""Benchmark ``sg.scan``: compile time and step time against the horizon T, and its bias.

One training step of the same guided program (issue 16, item 5) in six versions (two of
them diagnostics):

- ``scan``: scgjax, ``sg.SVI(model, guide, optax.adam(1e-2), sg.ELBO()).update`` with the
  loop written as ``sg.scan`` in the model and the guide;
- ``loop``: scgjax, the same program unrolled in Python, one site per step (``a{t}``,
  ``r{t}``); its compile time grows with T, so it runs only at the smallest horizons;
- ``hand``: the same negative-ELBO surrogate in plain JAX (``lax.scan`` over the steps
  computing log q, log p and the reward; each step's score term multiplied by the
  rewards-to-go, a reverse cumulative sum), ``jax.value_and_grad``, ``optax.adam``, one
  ``jax.jit``;
- ``hand2``: the same, written like a guided program: one ``lax.scan`` (the guide) samples
  the actions and computes log q, a second one (the model) recomputes the carry from the
  actions and computes log p and the reward; it shows what the model/guide split costs;
- ``hand3``: ``hand`` with each step's key split once more inside the body before sampling,
  as a ``seed`` handler does for a site of a loop (scgjax's and NumPyro's); it shows what
  that split costs;
- ``numpyro``: ``numpyro.contrib.control_flow.scan`` in the model and the guide,
  ``numpyro.infer.SVI(..., TraceGraph_ELBO())``, ``jax.jit(svi.update)`` (NumPyro refuses a
  scan under a plate, so its plate is opened inside the body: the same program).

The program: ``B = 16`` episodes (a plate) of ``T`` binary actions. The guide is a policy
``q(a_t | c_t) = Bernoulli(logits = w0 + w1 c_t + w2 x_t)`` with a carry ``c_{t+1} = 0.8 c_t +
a_t`` (a decayed count of the actions, bounded for any T) and fixed inputs ``x_t = sin(0.7 t)``;
score-function estimator without a baseline (``sg.ScoreFunction()``, the estimator of NumPyro's
TraceGraph_ELBO), K = 1. The model has the same sites ``a`` with a fixed ``Bernoulli(0.5)``
prior and a per-step reward ``factor r_t = (a_t - 1/2)(x_t - c_t / 2 + 0.3) + a_t / 10`` that
depends on the carry, so that each action reaches every later step's costs.

Measured per horizon:

- **compile**: each version is built fresh (new functions, new ``SVI``) and called once; compile
  = that first call minus the steady-state step (scgjax's includes tracing and its graph
  analysis); median over ``--compile-repeats`` fresh builds (one build for a version whose
  first compile took more than ``--slow-compile`` seconds);
- **step**: the versions built last are timed in interleaved round-robin rounds (the order
  rotates every round; each round runs ``steps`` steps back to back and blocks), one warm-up
  round first; median per-step time, ratios of the medians and the paired ratios (median
  [IQR] of the ratios of rounds run next to each other), as in ``bench_step.py``;
- **compiled programs** (at ``--profile-horizon``): the number of ``scan`` and ``cumsum``
  equations of each step's jaxpr, the ``while`` loops of its optimised HLO and XLA's cost
  analysis.

**Bias check** (``--bias-keys`` keys, T = 6, ``--bias-batch`` episodes): the mean gradient of
the negative ELBO with respect to the guide's ``w`` for each version (``hand2`` draws the same
actions as ``hand`` and computes the same numbers, so it is left out), against the exact gradient
by enumeration of all 2^6 action sequences in plain JAX, and against the exact expectation of
an estimator that credits each step's choice with that step's costs only (no rewards-to-go):
``z = (mean - exact) / se`` per coordinate.

``--quick`` is a smoke run (T in 10, 100, loop at T = 10, one build each and no warm-up build,
3 rounds, profile at T = 100, 300 bias keys; about a minute); the full run
writes ``bench/results/scan.md`` and ``scan.json`` (``--out FILE`` writes the markdown there
instead, and the JSON next to it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as nd
import optax
from _machine import machine_info
from _timing import Impl, first_call, paired, primitive_counts, run_round
from numpyro.contrib.control_flow import scan as np_scan

import scgjax as sg
from scgjax import dist
from scgjax.dist import softplus

HERE = Path(__file__).resolve().parent
LR = 1e-2
DECAY = 0.8  # carry: c_{t+1} = DECAY * c_t + a_t
W0 = (0.2, -0.3, 0.5)  # initial policy weights (bias, carry, input)
P_PRIOR = 0.5
BATCH = 16
NAMES = ("scan", "loop", "hand", "hand2", "hand3", "numpyro")
LABELS = {"scan": "scgjax sg.scan", "loop": "scgjax Python loop", "hand": "hand-written JAX",
          "hand2": "hand-written, two scans", "hand3": "hand-written, key split in the body",
          "numpyro": "NumPyro scan + TraceGraph_ELBO"}
NOT_RUN = "not run (compile time grows with T)"

Step = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------


def inputs(horizon: int) -> jax.Array:
    """The fixed per-step inputs ``x_t = sin(0.7 t)``, shape ``(T,)``."""
    return jnp.sin(0.7 * jnp.arange(horizon, dtype=jnp.float32))


def policy_logits(w: jax.Array, c: jax.Array, x: jax.Array) -> jax.Array:
    return w[0] + w[1] * c + w[2] * x


def reward(c: jax.Array, a: jax.Array, x: jax.Array) -> jax.Array:
    return (a - 0.5) * (x - 0.5 * c + 0.3) + 0.1 * a


def init_params() -> dict[str, jax.Array]:
    return {"w": jnp.asarray(W0, jnp.float32)}


def sg_scan_programs(batch: int) -> tuple[Callable, Callable]:
    """scgjax model and guide with ``sg.scan`` (fresh functions on every call)."""

    def guide(xs):
        w = sg.param("w", jnp.asarray(W0, jnp.float32))

        def step(c, x):
            a = sg.sample("a", dist.Bernoulli(logits=policy_logits(w, c, x)),
                          estimator=sg.ScoreFunction())
            return DECAY * c + a, None

        with sg.plate("episodes", batch):
            sg.scan(step, jnp.zeros(batch), xs=xs)

    def model(xs):
        def step(c, x):
            a = sg.sample("a", dist.Bernoulli(probs=P_PRIOR))
            sg.factor("r", reward(c, a, x))
            return DECAY * c + a, None

        with sg.plate("episodes", batch):
            sg.scan(step, jnp.zeros(batch), xs=xs)

    return model, guide


def sg_loop_programs(batch: int) -> tuple[Callable, Callable]:
    """The same program unrolled in Python: sites ``a{t}`` and ``r{t}``."""

    def guide(xs):
        w = sg.param("w", jnp.asarray(W0, jnp.float32))
        with sg.plate("episodes", batch):
            c = jnp.zeros(batch)
            for t in range(xs.shape[0]):
                a = sg.sample(f"a{t}", dist.Bernoulli(logits=policy_logits(w, c, xs[t])),
                              estimator=sg.ScoreFunction())
                c = DECAY * c + a

    def model(xs):
        with sg.plate("episodes", batch):
            c = jnp.zeros(batch)
            for t in range(xs.shape[0]):
                a = sg.sample(f"a{t}", dist.Bernoulli(probs=P_PRIOR))
                sg.factor(f"r{t}", reward(c, a, xs[t]))
                c = DECAY * c + a

    return model, guide


def np_programs(batch: int) -> tuple[Callable, Callable]:
    """NumPyro model and guide with ``contrib.control_flow.scan`` (NumPyro refuses a scan
    under a plate, so the plate is opened inside the body: the same program)."""

    def guide(xs):
        w = numpyro.param("w", jnp.asarray(W0, jnp.float32))

        def step(c, x):
            with numpyro.plate("episodes", batch):
                a = numpyro.sample("a", nd.Bernoulli(logits=policy_logits(w, c, x)))
            return DECAY * c + a, None

        np_scan(step, jnp.zeros(batch), xs)

    def model(xs):
        def step(c, x):
            with numpyro.plate("episodes", batch):
                a = numpyro.sample("a", nd.Bernoulli(probs=P_PRIOR))
                numpyro.factor("r", reward(c, a, x))
            return DECAY * c + a, None

        np_scan(step, jnp.zeros(batch), xs)

    return model, guide


def hand_terms(w: jax.Array, key: jax.Array, xs: jax.Array, batch: int,
               split_in_body: bool = False) -> tuple[jax.Array, jax.Array]:
    """Sample one batch of episodes: per-step ``log q(a_t | c_t)`` and ``log p(a_t) + r_t``,
    both ``(T, batch)``. The step keys are split outside the loop in one call;
    ``split_in_body`` splits each step's key once more inside the body before sampling (what
    scgjax's and NumPyro's ``seed`` handlers do for a site of a loop)."""
    keys = jax.random.split(key, xs.shape[0])

    def step(c, inp):
        x, k = inp
        if split_in_body:
            k = jax.random.split(k)[1]
        logits = policy_logits(w, c, x)
        a = jax.random.bernoulli(k, jax.nn.sigmoid(logits), (batch,)).astype(jnp.float32)
        logq = a * logits - softplus(logits)
        logp = a * jnp.log(P_PRIOR) + (1.0 - a) * jnp.log1p(-P_PRIOR)
        return DECAY * c + a, (logq, logp + reward(c, a, x))

    _, (logq, gain) = jax.lax.scan(step, jnp.zeros(batch), (xs, keys))
    return logq, gain


def hand_terms_two_scans(w: jax.Array, key: jax.Array, xs: jax.Array, batch: int
                         ) -> tuple[jax.Array, jax.Array]:
    """As :func:`hand_terms`, written as a model and a guide: one ``lax.scan`` samples the
    actions and computes ``log q``, a second one recomputes the carry from the actions and
    computes ``log p + r`` (the structure of a guided program)."""
    keys = jax.random.split(key, xs.shape[0])

    def guide_step(c, inp):
        x, k = inp
        logits = policy_logits(w, c, x)
        a = jax.random.bernoulli(k, jax.nn.sigmoid(logits), (batch,)).astype(jnp.float32)
        return DECAY * c + a, (a, a * logits - softplus(logits))

    def model_step(c, inp):
        x, a = inp
        logp = a * jnp.log(P_PRIOR) + (1.0 - a) * jnp.log1p(-P_PRIOR)
        return DECAY * c + a, logp + reward(c, a, x)

    _, (actions, logq) = jax.lax.scan(guide_step, jnp.zeros(batch), (xs, keys))
    _, gain = jax.lax.scan(model_step, jnp.zeros(batch), (xs, jax.lax.stop_gradient(actions)))
    return logq, gain


def hand_loss(params: dict, key: jax.Array, xs: jax.Array, batch: int,
              terms: Callable = hand_terms) -> jax.Array:
    """Minus the score-function surrogate of the ELBO, rewards-to-go credit; value = minus
    the ELBO estimate. The own term ``-log q`` enters the costs with its direct derivative
    stopped (as in scgjax and NumPyro)."""
    sg_ = jax.lax.stop_gradient
    logq, gain = terms(params["w"], key, xs, batch)
    f = gain - sg_(logq)  # per-step cost, (T, B)
    to_go = jnp.cumsum(f[::-1], axis=0)[::-1]  # sum_{s >= t} f_s
    return -(f.sum() + jnp.sum((logq - sg_(logq)) * sg_(to_go)))


# --------------------------------------------------------------------------------------------
# Builders: (step, state) of one fresh version
# --------------------------------------------------------------------------------------------


def build_sg(programs: Callable, xs: jax.Array, batch: int) -> tuple[Step, Any]:
    model, guide = programs(batch)
    svi = sg.SVI(model, guide, optax.adam(LR), sg.ELBO(num_particles=1))
    state = svi.init(jax.random.key(2), xs, init_params_=init_params())
    return svi.update, state


def build_hand(xs: jax.Array, batch: int, terms: Callable = hand_terms
               ) -> tuple[Step, Any]:
    opt = optax.adam(LR)

    @jax.jit
    def step(state, xs):
        params, opt_state, key = state
        key, step_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(hand_loss)(params, step_key, xs, batch, terms)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    params = init_params()
    return step, (params, opt.init(params), jax.random.key(2))


def build_numpyro(xs: jax.Array, batch: int) -> tuple[Step, Any]:
    model, guide = np_programs(batch)
    svi = numpyro.infer.SVI(model, guide, optax.adam(LR), numpyro.infer.TraceGraph_ELBO())
    state = svi.init(jax.random.key(2), xs, init_params=init_params())
    return jax.jit(svi.update), state


BUILDERS: dict[str, Callable[[jax.Array, int], tuple[Step, Any]]] = {
    "scan": lambda xs, b: build_sg(sg_scan_programs, xs, b),
    "loop": lambda xs, b: build_sg(sg_loop_programs, xs, b),
    "hand": build_hand,
    "hand2": lambda xs, b: build_hand(xs, b, hand_terms_two_scans),
    "hand3": lambda xs, b: build_hand(
        xs, b, lambda *a: hand_terms(*a, split_in_body=True)),
    "numpyro": build_numpyro,
}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------



def compile_all(horizons: list[int], loop_horizons: list[int], loop_limit: float,
                batch: int, repeats: int, slow: float) -> dict[int, dict[str, Impl]]:
    """Build every version fresh and time its first call, ``repeats`` times, the horizons
    and versions interleaved within each repeat (so that a change in the machine's load
    touches every horizon alike). A version whose first call took longer than ``slow``
    seconds is built once. The Python loop runs at ``loop_horizons`` until its compile
    exceeds ``loop_limit`` seconds. Returns the builds of the last repeat, with every
    repeat's first-call times."""
    impls: dict[int, dict[str, Impl]] = {t: {} for t in horizons}
    loop_ok = True
    for r in range(repeats):
        for j, horizon in enumerate(horizons):
            xs = inputs(horizon)
            names = [n for n in NAMES if n != "loop" or horizon in loop_horizons]
            if "loop" in names and "loop" not in impls[horizon] and not loop_ok:
                names.remove("loop")
            for i in range(len(names)):
                name = names[(i + r + j) % len(names)]
                old = impls[horizon].get(name)
                if old is not None and min(old.first_calls) > slow:
                    continue  # slow to compile: measured once
                step, state = BUILDERS[name](xs, batch)
                impl = Impl(name, step, state)
                if old is not None:
                    impl.first_calls, impl.first_calls_cpu = old.first_calls, old.first_calls_cpu
                first_call(impl, xs)
                impls[horizon][name] = impl
                print(f"    repeat {r} T={horizon} {name}: first call "
                      f"{impl.first_calls[-1]:.2f} s", file=sys.stderr, flush=True)
                if name == "loop" and impl.first_calls[0] > loop_limit:
                    loop_ok = False
    return impls


def time_horizon(horizon: int, impls: dict[str, Impl], rounds: int, steps: int) -> None:
    """Interleaved round-robin rounds of ``steps`` steps (the order rotates every round),
    after one warm-up round each."""
    xs = inputs(horizon)
    order = [impls[n] for n in NAMES if n in impls]
    for impl in order:
        run_round(impl, xs, steps, record=False)
    for r in range(rounds):
        for i in range(len(order)):
            run_round(order[(i + r) % len(order)], xs, steps)


def plan(horizon: int, steps: int) -> int:
    """Steps per round at a horizon: ``steps`` up to T = 100, then scaled by 100 / T (at
    least 2), so that a round of every version takes about the same time."""
    return max(2, min(steps, round(steps * 100 / horizon)))



def program_structure(horizon: int, batch: int) -> str:
    """The compiled step of each version (the loop's only where T <= 10): sequential loops
    in the jaxpr (``scan``) and in the optimised HLO (``while``, including the PRNG's), the
    cumulative sums of the jaxpr, and XLA's cost analysis. Reads the private
    ``SVI._jitted`` cache for scgjax's step, as ``bench_step.py --profile`` does."""
    xs = inputs(horizon)
    head = ["version", "jaxpr equations", "scan", "cumsum", "HLO while", "kFLOP",
            "kB accessed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in NAMES:
        if name == "loop" and horizon > 10:  # at T = 100 its compile alone takes minutes
            continue
        step, state = BUILDERS[name](xs, batch)
        if name in ("scan", "loop"):
            step(state, xs)
            (fn,) = step.__self__._jitted.values()
            fargs = (state, [xs])
        else:
            fn, fargs = step, (state, xs)
        prims = primitive_counts(jax.make_jaxpr(fn)(*fargs).jaxpr)
        compiled = fn.lower(*fargs).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        hlo = compiled.as_text()
        out.append(f"| {LABELS[name]} | {sum(prims.values())} | {prims.get('scan', 0)} | "
                   f"{prims.get('cumsum', 0)} | {hlo.count(' while(')} | "
                   f"{cost.get('flops', 0.0) / 1e3:.0f} | "
                   f"{cost.get('bytes accessed', 0.0) / 1e3:.0f} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Bias check
# --------------------------------------------------------------------------------------------


def exact_gradients(horizon: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """By enumeration of the ``2^T`` action sequences of one episode (times ``batch``): the
    exact gradient of the negative ELBO with respect to ``w``, and the exact expectation of
    the estimator that credits each step's choice with that step's costs only."""
    xs = inputs(horizon)
    paths = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=horizon)), jnp.float32)
    stop = jax.lax.stop_gradient

    def per_path(w, path):
        def step(c, inp):
            a, x = inp
            logits = policy_logits(w, c, x)
            logp = a * jnp.log(P_PRIOR) + (1.0 - a) * jnp.log1p(-P_PRIOR)
            return DECAY * c + a, (a * logits - softplus(logits), logp + reward(c, a, x))

        _, (logq, gain) = jax.lax.scan(step, jnp.zeros(()), (path, xs))
        return logq, gain  # (T,) each

    def neg_elbo(w):
        logq, gain = jax.vmap(per_path, (None, 0))(w, paths)
        return -batch * jnp.sum(jnp.exp(logq.sum(1)) * (gain - logq).sum(1))

    def neg_step_credit(w):  # gradient: -E[sum_t grad log q_t * f_t]
        logq, gain = jax.vmap(per_path, (None, 0))(w, paths)
        prob = stop(jnp.exp(logq.sum(1)))
        return -batch * jnp.sum(prob[:, None] * logq * stop(gain - logq))

    w = jnp.asarray(W0, jnp.float32)
    return np.asarray(jax.grad(neg_elbo)(w)), np.asarray(jax.grad(neg_step_credit)(w))


def gradient_samples(horizon: int, batch: int, num_keys: int, chunk: int = 500
                     ) -> dict[str, np.ndarray]:
    """``num_keys`` single-sample gradients of the negative ELBO w.r.t. ``w`` per version."""
    xs = inputs(horizon)
    params = init_params()
    elbo = sg.ELBO(num_particles=1)
    tg = numpyro.infer.TraceGraph_ELBO()
    scan_prog, loop_prog, np_prog = (sg_scan_programs(batch), sg_loop_programs(batch),
                                     np_programs(batch))
    losses = {
        "scan": lambda key, p: elbo.loss(key, p, *scan_prog, xs),
        "loop": lambda key, p: elbo.loss(key, p, *loop_prog, xs),
        "hand": lambda key, p: hand_loss(p, key, xs, batch),
        "numpyro": lambda key, p: tg.loss(key, p, *np_prog, xs),
    }
    keys = jax.random.split(jax.random.key(123), num_keys)
    out = {}
    for name, loss in losses.items():
        grad = jax.jit(jax.vmap(lambda key, loss=loss: jax.grad(loss, argnums=1)(key, params)
                                ["w"]))
        out[name] = np.concatenate([np.asarray(grad(keys[i:i + chunk]))
                                    for i in range(0, num_keys, chunk)])
    return out


def bias_table(samples: dict[str, np.ndarray], exact: np.ndarray, step_credit: np.ndarray
               ) -> tuple[str, dict]:
    n = next(iter(samples.values())).shape[0]
    head = ["version"] + [f"w{i}: mean ± se (z)" for i in range(exact.size)]
    head += ["max abs z vs exact", "max abs z vs per-step credit"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows.append("| exact (enumeration) | " + " | ".join(f"{v:.4f}" for v in exact) + " | | |")
    rows.append("| exact per-step-credit expectation | "
                + " | ".join(f"{v:.4f}" for v in step_credit) + " | | |")
    stats = {}
    for name, g in samples.items():
        mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(n)
        z, z_step = (mean - exact) / se, (mean - step_credit) / se
        stats[name] = {"mean": mean.tolist(), "se": se.tolist(), "z": z.tolist(),
                       "z_step_credit": z_step.tolist()}
        cells = [f"{m:.4f} ± {s:.4f} ({zz:+.1f})" for m, s, zz in zip(mean, se, z, strict=True)]
        rows.append(f"| {LABELS[name]} | " + " | ".join(cells)
                    + f" | {np.abs(z).max():.1f} | {np.abs(z_step).max():.1f} |")
    return "\n".join(rows), stats


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------



def summarise(horizon: int, impls: dict[str, Impl], rounds: int, steps: int) -> dict:
    row: dict[str, Any] = {"T": horizon, "rounds": rounds, "steps_per_round": steps}
    med = {n: statistics.median(i.times) for n, i in impls.items()}
    for n, impl in impls.items():
        row[n] = {"step_s": med[n],
                  "compile_s": statistics.median(impl.first_calls) - med[n],
                  "compile_cpu_s": statistics.median(impl.first_calls_cpu) - med[n],
                  "first_calls_s": impl.first_calls, "first_calls_cpu_s": impl.first_calls_cpu,
                  "round_times_s": impl.times}
    for other in ("hand", "hand2", "hand3", "numpyro"):
        row[f"scan/{other}"] = med["scan"] / med[other]
        row[f"scan/{other} paired"] = paired(impls["scan"].times, impls[other].times)
    if "loop" in impls:
        row["loop/hand"] = med["loop"] / med["hand"]
        row["loop/hand paired"] = paired(impls["loop"].times, impls["hand"].times)
    return row


def compile_vs_first(rows: list[dict]) -> None:
    """Per row: scgjax sg.scan's compile time relative to the first horizon's, the ratio of
    the medians and the median [IQR] of the ratios within each repeat (wall and CPU)."""
    first = rows[0]["scan"]
    for row in rows:
        scan = row["scan"]
        for key, calls in (("wall", "first_calls_s"), ("cpu", "first_calls_cpu_s")):
            step = scan["step_s"], first["step_s"]
            n = min(len(scan[calls]), len(first[calls]))
            per_repeat = [(a - step[0]) / (b - step[1])
                          for a, b in zip(scan[calls][:n], first[calls][:n], strict=True)]
            q1, q2, q3 = np.percentile(per_repeat, [25, 50, 75])
            row[f"scan compile / first, {key}"] = (
                scan["compile_s" if key == "wall" else "compile_cpu_s"]
                / first["compile_s" if key == "wall" else "compile_cpu_s"])
            row[f"scan compile / first, {key}, paired"] = (float(q2), float(q1), float(q3))


FMT = "{:.2f} [{:.2f}-{:.2f}]"


def step_table(rows: list[dict]) -> str:
    head = ["T", "rounds x steps", "scan ms", "loop ms", "hand ms", "hand2 ms", "hand3 ms",
            "numpyro ms", "scan/hand", "paired [IQR]", "scan/hand2 paired", "scan/hand3 paired",
            "scan/numpyro", "paired [IQR]", "loop/hand paired"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        loop = row.get("loop")
        ms = {n: f"{1e3 * row[n]['step_s']:.3f}" for n in NAMES if n in row}
        cells = [f"{row['T']:,}", f"{row['rounds']} x {row['steps_per_round']}", ms["scan"],
                 ms["loop"] if loop else NOT_RUN, ms["hand"], ms["hand2"], ms["hand3"],
                 ms["numpyro"], f"{row['scan/hand']:.2f}", FMT.format(*row["scan/hand paired"]),
                 FMT.format(*row["scan/hand2 paired"]), FMT.format(*row["scan/hand3 paired"]),
                 f"{row['scan/numpyro']:.2f}", FMT.format(*row["scan/numpyro paired"]),
                 FMT.format(*row["loop/hand paired"]) if loop else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def compile_table(rows: list[dict]) -> str:
    t0 = f"{rows[0]['T']:,}"
    head = ["T", "scan s", "loop s", "hand s", "hand2 s", "hand3 s", "numpyro s",
            f"scan / scan at T={t0}", "per-repeat [IQR]", f"CPU: scan / scan at T={t0}",
            "scan/hand", "scan/numpyro", "scan CPU s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        c = {n: row[n]["compile_s"] for n in NAMES if n in row}
        cells = [f"{row['T']:,}", f"{c['scan']:.2f}",
                 f"{c['loop']:.2f}" if "loop" in c else NOT_RUN, f"{c['hand']:.2f}",
                 f"{c['hand2']:.2f}", f"{c['hand3']:.2f}", f"{c['numpyro']:.2f}",
                 f"{row['scan compile / first, wall']:.2f}",
                 FMT.format(*row["scan compile / first, wall, paired"]),
                 f"{row['scan compile / first, cpu']:.2f}",
                 f"{c['scan'] / c['hand']:.2f}", f"{c['scan'] / c['numpyro']:.2f}",
                 f"{row['scan']['compile_cpu_s']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def verdict(rows: list[dict], compile_target: float, step_target: float) -> list[str]:
    first, last = rows[0], rows[-1]
    wall, cpu = last["scan compile / first, wall"], last["scan compile / first, cpu"]
    lines = [f"- Compile: scgjax sg.scan at T = {last['T']:,} takes {wall:.2f}x (wall; "
             f"{cpu:.2f}x in process CPU time) its compile time at T = {first['T']:,} "
             f"(target <= {compile_target}x): "
             f"{'met' if max(wall, cpu) <= compile_target else 'NOT met'}."]
    worst = max(rows, key=lambda r: r["scan/hand"])
    met = all(r["scan/hand"] <= step_target for r in rows)
    lines.append("- Step: scgjax sg.scan / hand-written (medians) "
                 + ", ".join(f"{r['scan/hand']:.2f} (T={r['T']:,})" for r in rows)
                 + f"; target <= {step_target}x: {'met' if met else 'NOT met'} "
                 f"(worst {worst['scan/hand']:.2f} at T = {worst['T']:,}); against the "
                 "hand-written step that splits each step's key in the body (hand3): "
                 + ", ".join(f"{r['scan/hand3']:.2f}" for r in rows) + ".")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--horizons", type=int, nargs="+", default=[10, 50, 100, 1000, 10_000],
                   help="horizons T (default 10 50 100 1000 10000)")
    p.add_argument("--loop-horizons", type=int, nargs="*", default=[10, 50, 100],
                   help="horizons at which the Python loop runs too (default 10 50 100; a "
                        "horizon is skipped once the loop's compile exceeded --loop-limit)")
    p.add_argument("--loop-limit", type=float, default=60.0,
                   help="skip the loop's larger horizons once its compile took longer (60 s)")
    p.add_argument("--batch", type=int, default=BATCH, help="episodes B (16)")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (30)")
    p.add_argument("--steps-per-round", type=int, default=200,
                   help="steps per round up to T = 100, then scaled by 100/T, at least 2 "
                        "(200)")
    p.add_argument("--compile-repeats", type=int, default=3,
                   help="fresh builds whose first call is timed (3)")
    p.add_argument("--slow-compile", type=float, default=10.0,
                   help="a version whose compile took longer is built once (10 s)")
    p.add_argument("--bias-horizon", type=int, default=6, help="T of the bias check (6)")
    p.add_argument("--bias-batch", type=int, default=4, help="episodes of the bias check (4)")
    p.add_argument("--bias-keys", type=int, default=2000, help="keys of the bias check (2000)")
    p.add_argument("--profile-horizon", type=int, default=1000,
                   help="T of the compiled-program comparison (1000; 100 with --quick)")
    p.add_argument("--skip", nargs="*", default=[], choices=["timing", "profile", "bias"])
    p.add_argument("--compile-target", type=float, default=1.5)
    p.add_argument("--step-target", type=float, default=1.10)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: T in 10 100, loop at T = 10, few rounds, 300 bias keys")
    p.add_argument("--out", type=Path, default=None,
                   help="write the markdown report here (and the JSON next to it); default "
                        "bench/results/scan.md for a full run, nothing for --quick or --skip")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.horizons, args.loop_horizons = [10, 100], [10]
        args.rounds, args.steps_per_round, args.compile_repeats = 3, 20, 1
        args.bias_keys = min(args.bias_keys, 300)
        args.profile_horizon = min(args.profile_horizon, 100)
    elif args.out is None and not args.skip:  # a partial run does not replace the results
        args.out = HERE / "results" / "scan.md"
    info = machine_info(numpyro=numpyro.__version__)
    print(info, flush=True)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    if "timing" not in args.skip:
        xs = inputs(10)  # warm-up: one-time costs of the first trace of each version
        for name in NAMES if not args.quick else ():
            step, state = BUILDERS[name](xs, args.batch)
            jax.block_until_ready(step(state, xs))
        horizons = sorted(args.horizons)
        t0 = time.perf_counter()
        builds = compile_all(horizons, args.loop_horizons, args.loop_limit, args.batch,
                             args.compile_repeats, args.slow_compile)
        print(f"  compile done in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
        for horizon in horizons:
            t0 = time.perf_counter()
            steps = plan(horizon, args.steps_per_round)
            time_horizon(horizon, builds[horizon], args.rounds, steps)
            rows.append(summarise(horizon, builds[horizon], args.rounds, steps))
            print(f"  T={horizon} timed in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                  flush=True)
        compile_vs_first(rows)
    structure = None
    if "profile" not in args.skip:
        structure = program_structure(args.profile_horizon, args.batch)
        print(structure, file=sys.stderr, flush=True)
    bias = None
    if "bias" not in args.skip:
        t0 = time.perf_counter()
        exact, step_credit = exact_gradients(args.bias_horizon, args.bias_batch)
        samples = gradient_samples(args.bias_horizon, args.bias_batch, args.bias_keys)
        table, stats = bias_table(samples, exact, step_credit)
        bias = {"exact": exact.tolist(), "step_credit": step_credit.tolist(), "stats": stats,
                "table": table}
        print(f"  bias check done in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    lines = [
        f"Machine: {info}",
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"the run took {elapsed:.0f} s.",
    ]
    if rows:
        lines += [
            "",
            f"Program: B = {args.batch} episodes of T binary actions, policy guide with a "
            "carry (decayed count), Bernoulli(0.5) prior and a carry-dependent reward factor "
            "in the model; score function without baseline, K = 1, adam(1e-2). Versions: "
            "scan = scgjax `sg.scan`, loop = scgjax Python loop (sites `a{t}`, `r{t}`), hand = "
            "hand-written JAX (one `lax.scan`, rewards-to-go by a reverse cumsum), hand2 = "
            "hand-written as a guide scan and a model scan, hand3 = hand-written with each "
            "step's key split once more inside the body (as a `seed` handler does for a "
            "loop's site), numpyro = `contrib.control_flow.scan` + TraceGraph_ELBO.",
            "",
            "## Step time",
            "",
            "Median per-step wall time over interleaved rounds (rounds x steps per round "
            "below; one warm-up round each). Ratios: of the medians; 'paired': median "
            "[interquartile range] of the per-round ratios.",
            "",
            step_table(rows),
            "",
            "## Compile time",
            "",
            "First call of a fresh build minus the steady-state step (wall time), median of "
            f"{args.compile_repeats} builds (one for a version slower than "
            f"{args.slow_compile:g} s); the horizons and versions interleaved within each "
            "repeat. scgjax's includes tracing and its graph analysis. 'per-repeat': median "
            "[IQR] of scan's ratio to the first horizon within each repeat; 'CPU': the same "
            "from the process CPU time of the first call (less sensitive to other work on "
            "the machine).",
            "",
            compile_table(rows),
            "",
            "## Targets",
            "",
            *verdict(rows, args.compile_target, args.step_target),
        ]
    if structure:
        lines += [
            "",
            f"## Compiled programs (T = {args.profile_horizon:,})",
            "",
            "Equations of the step's jaxpr (those of a nested jaxpr once per call); its `scan` "
            "and `cumsum` equations (a scan's transpose in the backward pass is a scan too); "
            "`while` loops of the optimised HLO (the scans and the PRNG's own loops, one per "
            "threefry hash); XLA's cost analysis (flops, bytes accessed).",
            "",
            structure,
        ]
    if bias:
        lines += [
            "",
            f"## Bias check (T = {args.bias_horizon}, {args.bias_batch} episodes, "
            f"{args.bias_keys} keys)",
            "",
            "Mean single-sample gradient of the negative ELBO with respect to the guide's "
            "`w = (bias, carry, input)`, its standard error and `z = (mean - exact) / se`; "
            "'per-step credit': the exact expectation of an estimator that credits each "
            "step's choice with that step's costs only.",
            "",
            bias["table"],
        ]
    text = "\n".join(lines)
    print(text)
    result = {"machine": info, "seconds": elapsed,
              "load_average_1min": [load_before[0], load_after[0]],
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "timing": rows, "structure": structure, "bias": bias}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        with open(args.out.with_suffix(".json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out} and its .json", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
