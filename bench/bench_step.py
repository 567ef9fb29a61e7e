"""Benchmark one jitted training step of a linear binary VAE (MNIST-shaped data).

Three implementations of the same score-function ELBO step are timed against each other:

- ``scgjax``: ``sg.SVI(model, guide, optax.adam(1e-3), sg.ELBO(num_particles=K)).update``, with
  ``sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9))`` for ``K == 1`` and
  ``sg.RLOO()`` for ``K >= 2`` on the guide site ``z``;
- ``hand``: the same estimator written directly in JAX (``jax.random.bernoulli`` vmapped over
  the ``K`` particles, ``f = log p(x, z) - log q(z | x)`` per data point, surrogate
  ``f + stop_grad(f - b) * (log q - stop_grad(log q))`` (the gradient of
  ``f + stop_grad(f - b) * log q``, with the ELBO estimate as its value), log-densities
  ``x * l - softplus(l)`` (``scgjax.dist.softplus``, the numerics of ``BernoulliLogits``),
  ``jax.value_and_grad``,
  optax adam, one ``jax.jit``; moving-average baseline for ``K == 1``, leave-one-out for
  ``K >= 2``);
- ``numpyro``: ``numpyro.infer.SVI`` with ``TraceGraph_ELBO(num_particles=K)``, jitted
  ``svi.update`` (NumPyro's TraceGraph_ELBO has no baseline: plain REINFORCE with per-element
  credit assignment).

The model is ``p(z) = Bernoulli(logits=a)`` (200 latents, ``.to_event(1)`` inside
``plate("data", B)``), ``p(x | z) = Bernoulli(logits=z @ W + b)`` (784 pixels), and the guide
``q(z | x) = Bernoulli(logits=x @ W' + b')``; all weights are plain params with the same initial
values in every implementation. Measurements are interleaved round-robin (the order rotates
every round); each round runs ``--steps-per-round`` steps of one implementation and blocks on
the result. The table reports the median per-step time over rounds, the ratios
scgjax/hand-written and scgjax/numpyro, and the compile time (first call minus the steady-state
step). ``--check`` compares the mean gradient of the encoder bias over many keys;
``--profile`` compares the compiled programs (jaxpr size, XLA thunks and opcodes, XLA's cost
analysis); ``--core`` also times the jitted function behind ``svi.update`` called directly
(``--core`` and ``--profile`` read the private ``SVI._jitted`` cache).

Run ``python bench/bench_step.py --help`` for the flags; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as nd
import optax
from _machine import machine_info

import scgjax as sg
from scgjax import dist
from scgjax.dist import softplus

LATENT = 200
PIXELS = 784
LR = 1e-3
DECAY = 0.9

Params = dict[str, jax.Array]
Step = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


# --------------------------------------------------------------------------------------------
# Shared data and parameters
# --------------------------------------------------------------------------------------------


def make_batch(batch_size: int, seed: int = 0) -> jax.Array:
    """A fixed random binary batch of shape ``(batch_size, 784)`` (float32 0/1)."""
    x = jax.random.bernoulli(jax.random.key(seed), 0.3, (batch_size, PIXELS))
    return x.astype(jnp.float32)


def make_params(seed: int = 1) -> Params:
    """Initial weights shared by all implementations (small random, no logit exactly 0)."""
    k = jax.random.split(jax.random.key(seed), 5)
    return {
        "prior_logits": 0.1 * jax.random.normal(k[0], (LATENT,)),
        "dec_w": 0.01 * jax.random.normal(k[1], (LATENT, PIXELS)),
        "dec_b": 0.1 * jax.random.normal(k[2], (PIXELS,)),
        "enc_w": 0.01 * jax.random.normal(k[3], (PIXELS, LATENT)),
        "enc_b": 0.1 * jax.random.normal(k[4], (LATENT,)),
    }


# --------------------------------------------------------------------------------------------
# (s) scgjax
# --------------------------------------------------------------------------------------------


def sg_model(x: jax.Array) -> None:
    """p(z) p(x | z) with plain params."""
    prior_logits = sg.param("prior_logits", jnp.zeros(LATENT))
    w = sg.param("dec_w", jnp.zeros((LATENT, PIXELS)))
    b = sg.param("dec_b", jnp.zeros(PIXELS))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=prior_logits).to_event(1))
        sg.sample("x", dist.Bernoulli(logits=z @ w + b).to_event(1), obs=x)


def make_sg_guide(estimator: sg.Estimator) -> Callable[[jax.Array], None]:
    """q(z | x) = Bernoulli(logits = x @ W' + b') with the given site estimator."""

    def sg_guide(x: jax.Array) -> None:
        w = sg.param("enc_w", jnp.zeros((PIXELS, LATENT)))
        b = sg.param("enc_b", jnp.zeros(LATENT))
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Bernoulli(logits=x @ w + b).to_event(1), estimator=estimator)

    return sg_guide


def sg_estimator(k: int) -> sg.Estimator:
    """Score function with a moving-average baseline for K == 1, RLOO otherwise."""
    if k == 1:
        return sg.ScoreFunction(baseline=sg.baselines.MovingAverage(DECAY))
    return sg.RLOO()


def build_scgjax(x: jax.Array, k: int, params: Params) -> tuple[Step, Any, sg.SVI]:
    """The scgjax step (``svi.update``) and its initial state."""
    svi = sg.SVI(sg_model, make_sg_guide(sg_estimator(k)), optax.adam(LR),
                 sg.ELBO(num_particles=k))
    state = svi.init(jax.random.key(2), x, init_params_=dict(params))
    return svi.update, state, svi


def scgjax_core_step(svi: sg.SVI, x: jax.Array) -> Step:
    """The jitted function behind ``svi.update``, without its per-call Python dispatch."""
    svi.update(svi.init(jax.random.key(2), x, init_params_=make_params()), x)  # fill the cache
    (jitted,) = svi._jitted.values()

    def step(state: Any, xb: jax.Array) -> tuple[Any, jax.Array]:
        new_state, metrics = jitted(state, [xb])
        return new_state, metrics["loss"]

    return step


# --------------------------------------------------------------------------------------------
# (a) hand-written JAX
# --------------------------------------------------------------------------------------------


def bernoulli_log_prob(logits: jax.Array, value: jax.Array) -> jax.Array:
    """``value * logits - softplus(logits)``, summed over the last axis."""
    return jnp.sum(value * logits - softplus(logits), axis=-1)


def hand_loss(params: Params, key: jax.Array, x: jax.Array, baseline: dict, k: int
              ) -> tuple[jax.Array, dict]:
    """Minus the score-function surrogate of the ELBO; value = minus the ELBO estimate."""
    enc_logits = x @ params["enc_w"] + params["enc_b"]  # (B, L), shared by the particles

    def particle(pkey: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = jax.random.bernoulli(pkey, jax.nn.sigmoid(enc_logits)).astype(x.dtype)
        logq = bernoulli_log_prob(enc_logits, z)
        logpz = bernoulli_log_prob(params["prior_logits"], z)
        logpx = bernoulli_log_prob(z @ params["dec_w"] + params["dec_b"], x)
        return logpz + logpx - logq, logq

    f, logq = jax.vmap(particle)(jax.random.split(key, k))  # (K, B) each
    fs = jax.lax.stop_gradient(f)
    if k == 1:  # moving average, bias-corrected as sg.baselines.MovingAverage
        steps = baseline["steps"]
        corr = 1.0 - DECAY ** steps.astype(jnp.float32)
        b = jnp.where(steps > 0, baseline["mean"] / jnp.where(steps > 0, corr, 1.0), 0.0)
        new_baseline = {"mean": DECAY * baseline["mean"] + (1.0 - DECAY) * fs.mean(),
                        "steps": steps + 1}
    else:  # leave-one-out mean over particles, per data point
        b = (fs.sum(axis=0, keepdims=True) - fs) / (k - 1)
        new_baseline = baseline
    # (logq - stop_grad(logq)) has value 0 and the gradient of logq: the value stays the ELBO.
    surrogate = f + (fs - b) * (logq - jax.lax.stop_gradient(logq))
    return -surrogate.sum(axis=1).mean(), new_baseline


def build_hand(x: jax.Array, k: int, params: Params) -> tuple[Step, Any]:
    """The hand-written jitted step and its initial state (same layout as ``sg.SVIState``)."""
    opt = optax.adam(LR)

    @jax.jit
    def step(state: tuple, xb: jax.Array) -> tuple[tuple, jax.Array]:
        params, opt_state, baseline, key = state
        key, step_key = jax.random.split(key)
        (loss, baseline), grads = jax.value_and_grad(hand_loss, has_aux=True)(
            params, step_key, xb, baseline, k)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, baseline, key), loss

    baseline = {"mean": jnp.zeros(()), "steps": jnp.zeros((), jnp.int32)}
    state = (dict(params), opt.init(params), baseline, jax.random.key(2))
    return step, state


# --------------------------------------------------------------------------------------------
# (b) NumPyro TraceGraph_ELBO
# --------------------------------------------------------------------------------------------


def np_model(x: jax.Array) -> None:
    """The same model in NumPyro."""
    prior_logits = numpyro.param("prior_logits", jnp.zeros(LATENT))
    w = numpyro.param("dec_w", jnp.zeros((LATENT, PIXELS)))
    b = numpyro.param("dec_b", jnp.zeros(PIXELS))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", nd.Bernoulli(logits=prior_logits).to_event(1))
        numpyro.sample("x", nd.Bernoulli(logits=z @ w + b).to_event(1), obs=x)


def np_guide(x: jax.Array) -> None:
    """The same guide in NumPyro."""
    w = numpyro.param("enc_w", jnp.zeros((PIXELS, LATENT)))
    b = numpyro.param("enc_b", jnp.zeros(LATENT))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", nd.Bernoulli(logits=x @ w + b).to_event(1))


def build_numpyro(x: jax.Array, k: int, params: Params) -> tuple[Step, Any]:
    """``jax.jit(numpyro SVI.update)`` with TraceGraph_ELBO (no baseline) and its state."""
    svi = numpyro.infer.SVI(np_model, np_guide, optax.adam(LR),
                            numpyro.infer.TraceGraph_ELBO(num_particles=k))
    state = svi.init(jax.random.key(2), x, init_params=dict(params))
    return jax.jit(svi.update), state


# --------------------------------------------------------------------------------------------
# Gradient sanity check
# --------------------------------------------------------------------------------------------


def check_gradients(x: jax.Array, k: int, num_keys: int) -> list[str]:
    """Mean gradient of -ELBO w.r.t. the encoder bias over ``num_keys`` keys, per impl.

    All three are unbiased estimators of the same gradient, so their means must agree up to
    Monte Carlo error: per coordinate ``z = (m_a - m_b) / sqrt(se_a^2 + se_b^2)``; ``mean z^2``
    should be about 1 and ``max |z|`` about 3 over 200 coordinates. The moving-average baseline
    is checked at a non-zero baseline value (any constant keeps the estimator unbiased). Also
    reported: the ratio of the estimators' standard errors (variance reduction vs. NumPyro).
    """
    params = make_params()
    keys = jax.random.split(jax.random.key(123), num_keys)
    guide = make_sg_guide(sg_estimator(k))
    elbo = sg.ELBO(num_particles=k)
    sg_state = elbo.init_state(jax.random.key(0), params, sg_model, guide, x)
    hand_state = {"mean": jnp.zeros(()), "steps": jnp.zeros((), jnp.int32)}
    if k == 1:  # a non-trivial baseline: b = mean / (1 - 0.9) = -500 (a rough ELBO scale)
        sg_state = {"z": {"mean": jnp.asarray(-50.0), "steps": jnp.asarray(1, jnp.int32)}}
        hand_state = sg_state["z"]

    def sg_grad(key: jax.Array) -> jax.Array:
        g = jax.grad(lambda p: elbo.loss_with_state(key, p, sg_state, sg_model, guide, x)[0])
        return g(params)["enc_b"]

    def hand_grad(key: jax.Array) -> jax.Array:
        return jax.grad(lambda p: hand_loss(p, key, x, hand_state, k)[0])(params)["enc_b"]

    tg = numpyro.infer.TraceGraph_ELBO(num_particles=k)

    def np_grad(key: jax.Array) -> jax.Array:
        return jax.grad(lambda p: tg.loss(key, p, np_model, np_guide, x))(params)["enc_b"]

    def stats(fn: Callable) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(jax.jit(jax.vmap(fn))(keys))
        return g.mean(0), g.std(0) / np.sqrt(num_keys)

    ref_m, ref_s = stats(hand_grad)
    lines = [f"gradient check, B={x.shape[0]} K={k}, {num_keys} keys, d(-ELBO)/d enc_b:"]
    for name, fn in (("scgjax", sg_grad), ("numpyro", np_grad)):
        m, s = stats(fn)
        z = np.abs(m - ref_m) / np.sqrt(s**2 + ref_s**2)
        lines.append(f"  {name:8s} vs hand: mean z^2 = {np.mean(z**2):.2f}, max|z| = "
                     f"{z.max():.2f} over {z.size} coords; s.e. {name}/hand = "
                     f"{s.mean() / ref_s.mean():.2f}")
    return lines


# --------------------------------------------------------------------------------------------
# Compiled-program comparison (--profile)
# --------------------------------------------------------------------------------------------


def compiled_summary(batch: int, k: int) -> list[str]:
    """Compare the three optimised XLA programs: jaxpr size, HLO thunks of the entry
    computation, XLA's cost analysis (flops, transcendentals, bytes) and HLO opcode counts."""
    x = make_batch(batch)
    params = make_params()
    _, sg_state, svi = build_scgjax(x, k, params)
    svi.update(sg_state, x)
    (sg_jit,) = svi._jitted.values()
    hand_step, hand_state = build_hand(x, k, params)
    np_step, np_state = build_numpyro(x, k, params)
    programs = {"scgjax": (sg_jit, (sg_state, [x])), "hand": (hand_step, (hand_state, x)),
                "numpyro": (np_step, (np_state, x))}
    rows, opcodes = {}, {}
    for name, (fn, fargs) in programs.items():
        jaxpr_lines = len(str(jax.make_jaxpr(fn)(*fargs)).splitlines())
        compiled = fn.lower(*fargs).compile()
        text = compiled.as_text()
        entry = text[text.index("\nENTRY"):].split("\n}", 1)[0]
        skip = (" parameter(", " get-tuple-element(", " constant(", " bitcast(", " tuple(")
        thunks = [ln for ln in entry.splitlines()[1:] if " = " in ln
                  and not any(t in ln for t in skip)]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        rows[name] = (jaxpr_lines, len(thunks), cost.get("flops", 0.0),
                      cost.get("transcendentals", 0.0), cost.get("bytes accessed", 0.0))
        counts: dict[str, int] = {}
        for ln in text.splitlines():
            parts = ln.split(" = ", 1)
            match = re.search(r"\s([a-z][\w\-]*)\(", " " + parts[1]) if len(parts) == 2 else None
            if match:
                counts[match.group(1)] = counts.get(match.group(1), 0) + 1
        opcodes[name] = counts
    lines = [f"compiled step, B={batch} K={k}:",
             "| impl | jaxpr lines | entry thunks | MFLOP | k transcendentals | MB accessed |",
             "|---|---|---|---|---|---|"]
    for name, (jl, nt, fl, tr, by) in rows.items():
        lines.append(f"| {name} | {jl} | {nt} | {fl / 1e6:.2f} | {tr / 1e3:.1f} | "
                     f"{by / 1e6:.2f} |")
    ops = sorted(set().union(*opcodes.values()))
    diff = [op for op in ops if opcodes["scgjax"].get(op, 0) != opcodes["hand"].get(op, 0)]
    lines += ["", "HLO opcodes (whole module) whose count differs, scgjax / hand / numpyro:",
              ", ".join(f"{op} {opcodes['scgjax'].get(op, 0)}/{opcodes['hand'].get(op, 0)}/"
                        f"{opcodes['numpyro'].get(op, 0)}" for op in diff)]
    return lines


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One implementation under test: its step, its state and its timings."""

    name: str
    step: Step
    state: Any
    first_call_s: float = 0.0
    times: list[float] | None = None


def first_call(impl: Impl, x: jax.Array) -> None:
    """Run the first (compiling) call and record its wall time."""
    t0 = time.perf_counter()
    impl.state, loss = impl.step(impl.state, x)
    jax.block_until_ready((impl.state, loss))
    impl.first_call_s = time.perf_counter() - t0
    impl.times = []


def run_round(impl: Impl, x: jax.Array, steps: int) -> None:
    """``steps`` steps back to back; record the mean per-step wall time."""
    state = impl.state
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = impl.step(state, x)
    jax.block_until_ready((state, loss))
    impl.times.append((time.perf_counter() - t0) / steps)
    impl.state = state


def steps_for(batch: int, k: int, steps: int) -> int:
    """Steps per round, scaled down for large ``B * K`` so that every setting takes about
    the same time (``steps`` up to ``B * K = 200``, then proportionally fewer, at least 5)."""
    return max(5, min(steps, round(steps * 200 / (batch * k))))


def bench_config(batch: int, k: int, rounds: int, steps: int, core: bool) -> list[Impl]:
    """Build and time every implementation for one (B, K) setting, interleaved."""
    x = make_batch(batch)
    params = make_params()
    sg_step, sg_state, svi = build_scgjax(x, k, params)
    impls = [Impl("scgjax", sg_step, sg_state)]
    hand_step, hand_state = build_hand(x, k, params)
    impls.append(Impl("hand", hand_step, hand_state))
    np_step, np_state = build_numpyro(x, k, params)
    impls.append(Impl("numpyro", np_step, np_state))
    for impl in impls:
        first_call(impl, x)
    if core:  # the jitted function behind svi.update, called directly (already compiled)
        impls.append(Impl("scgjax-core", scgjax_core_step(svi, x), impls[0].state, 0.0, []))
    for impl in impls:  # one warm-up round each
        run_round(impl, x, max(1, steps // 5))
        impl.times.clear()
    for r in range(rounds):
        for i in range(len(impls)):
            run_round(impls[(i + r) % len(impls)], x, steps)
    return impls


def estimator_name(k: int) -> str:
    """How the scgjax / hand-written step estimates the gradient for this K."""
    return "SF + MA(0.9)" if k == 1 else "RLOO"


def paired(a: Impl, b: Impl) -> str:
    """Median and interquartile range of the per-round ratios ``a / b`` (rounds are adjacent
    in time, so their ratio is robust to slow drifts in machine load)."""
    r = np.asarray(a.times) / np.asarray(b.times)
    q1, q2, q3 = np.percentile(r, [25, 50, 75])
    return f"{q2:.3f} [{q1:.2f}-{q3:.2f}]"


def table(results: list[tuple[int, int, list[Impl]]]) -> str:
    """The markdown table of median step times, ratios and compile times."""
    core = any(len(impls) > 3 for *_, impls in results)
    head = ["B", "K", "estimator", "scgjax ms", "hand ms", "numpyro ms", "scgjax/hand",
            "paired [IQR]", "best", "scgjax/numpyro", "paired [IQR]", "best"]
    if core:
        head += ["scgjax-core ms", "core/hand"]
    head += ["compile s (scgjax / hand / numpyro)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for batch, k, impls in results:
        by = {i.name: i for i in impls}
        med = {n: statistics.median(i.times) for n, i in by.items()}
        comp = {n: by[n].first_call_s - med[n] for n in ("scgjax", "hand", "numpyro")}
        cells = [str(batch), str(k), estimator_name(k),
                 f"{1e3 * med['scgjax']:.3f}", f"{1e3 * med['hand']:.3f}",
                 f"{1e3 * med['numpyro']:.3f}",
                 f"{med['scgjax'] / med['hand']:.3f}", paired(by["scgjax"], by["hand"]),
                 f"{min(by['scgjax'].times) / min(by['hand'].times):.3f}",
                 f"{med['scgjax'] / med['numpyro']:.3f}", paired(by["scgjax"], by["numpyro"]),
                 f"{min(by['scgjax'].times) / min(by['numpyro'].times):.3f}"]
        if core:
            cells += [f"{1e3 * med['scgjax-core']:.3f}",
                      f"{med['scgjax-core'] / med['hand']:.3f}"]
        cells.append(f"{comp['scgjax']:.2f} / {comp['hand']:.2f} / {comp['numpyro']:.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    p.add_argument("--steps-per-round", type=int, default=50,
                   help="steps per round (50; scaled by 200/(B*K) when B*K > 200)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[50, 100],
                   help="batch sizes B (default 50 100)")
    p.add_argument("--particles", type=int, nargs="+", default=[1, 2],
                   help="particle counts K; K=1 uses SF+moving average, K>=2 RLOO (default 1 2)")
    p.add_argument("--extra", type=str, nargs="*", default=["1000x2", "100x10"],
                   help="extra BxK settings to see scaling (default 1000x2 100x10)")
    p.add_argument("--core", action="store_true",
                   help="also time the jitted function behind svi.update without its Python "
                        "dispatch (isolates the per-call overhead)")
    p.add_argument("--check", action="store_true",
                   help="also compare mean encoder-bias gradients over many keys")
    p.add_argument("--check-keys", type=int, default=2000, help="keys for --check (2000)")
    p.add_argument("--profile", action="store_true",
                   help="also compare the compiled programs (jaxpr size, HLO thunks and "
                        "opcodes, XLA cost analysis)")
    p.add_argument("--quick", action="store_true", help="smoke run in a few seconds")
    p.add_argument("--out", type=str, default=None, help="also write the table to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = [(b, k) for b in args.batch_sizes for k in args.particles]
    settings += [tuple(int(v) for v in s.lower().split("x")) for s in args.extra]
    if args.quick:
        args.rounds, args.steps_per_round = 3, 5
        settings = [(50, 1), (50, 2)]
        args.check_keys = min(args.check_keys, 200)
    info = machine_info(numpyro=numpyro.__version__)
    print(info, flush=True)
    load_before = os.getloadavg()
    results = []
    t_start = time.perf_counter()
    for batch, k in settings:
        t0 = time.perf_counter()
        steps = steps_for(batch, k, args.steps_per_round)
        impls = bench_config(batch, k, args.rounds, steps, args.core)
        results.append((batch, k, impls))
        print(f"  B={batch} K={k} ({steps} steps/round) done in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    lines = [
        f"Machine: {info}",
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"timing took {time.perf_counter() - t_start:.0f} s.",
        "",
        f"Per-step wall time, median over {args.rounds} interleaved rounds of "
        f"{args.steps_per_round} steps (fewer for B*K > 200: 200/(B*K) of it, at least 5); "
        f"linear binary VAE, {LATENT} latents, {PIXELS} pixels, adam(1e-3). scgjax and "
        "hand-written use the score function with a moving-average baseline (K=1) or RLOO "
        "(K>=2); NumPyro's TraceGraph_ELBO uses no baseline. Ratios: of the medians; 'paired': "
        "median [interquartile range] of the per-round ratios; 'best': of the fastest rounds. "
        "Compile = first call minus the steady-state step (scgjax's includes its graph "
        "analysis).",
        "",
        table(results),
    ]
    if args.profile:
        for batch, k in settings:
            lines += ["", *compiled_summary(batch, k)]
    if args.check:
        for batch, k in settings[:2] if not args.quick else settings:
            lines += ["", *check_gradients(make_batch(batch), k, args.check_keys)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
