"""Benchmark ``sg.SMC``: step time and compile time of auto-encoding SMC against hand-written JAX.

Issue 18, item 5. One training step (``value_and_grad`` of minus the SMC bound, then
``optax.adam(1e-2)``, one ``jax.jit``) of a linear-Gaussian state-space model with a learnable
Gaussian proposal, in three versions:

- ``scgjax``: ``sg.SVI(model, guide, optax.adam(1e-2), sg.SMC(K, resample="systematic",
  ess_threshold=thr)).update``; the model and the guide each run one ``sg.scan``;
- ``hand``: the same SMC in plain JAX: the proposal's noise ``(T, K)`` and the resampling's
  uniforms ``(T,)`` drawn before the loop, one ``lax.scan`` over the steps with the particles
  as a leading axis, log-space weights, systematic resampling when the ESS of the accumulated
  weights falls below ``thr * K`` (never at the last step), ``log Z_hat`` accumulated at the
  resampling steps and the last one; gradient pathwise through the reparameterised proposal,
  the resampling's score term dropped (the ancestors are drawn from stopped weights), as
  scgjax does; ``jax.value_and_grad``, ``optax.adam``, one ``jax.jit``;
- ``iwae``: ``sg.SVI(..., sg.IWAE(K)).update`` on the same programs (reference: no
  resampling; timed at the first threshold only, it does not depend on it).

The model (params ``a``, ``log_q``, ``log_r``; initially 0.5, 0, 0): ``z_0 = 0``,
``z_t ~ N(a z_{t-1}, exp(log_q))``, ``y_t ~ N(z_t, exp(log_r))``; the guide (params ``pa``,
``pb``, ``log_s``; initially 0.3, 0.3, 0): ``z_t ~ N(pa z_{t-1} + pb y_t, exp(log_s)^2)``.
Data: one sequence of length ``T`` simulated with ``a = 0.9, q = 1, r = 0.5`` (numpy seed 0).
Both thresholds of the grid are timed: ``0.5`` (resample when the ESS is below K/2, FIVO's
choice) and ``1.0`` (resample at every step); both versions compute the resampling at every
step and select with ``where``, so the work per step is the same at both.

Measured per (K, T, threshold):

- **compile**: each version built fresh (new programs, new ``SVI`` or ``jax.jit``) and called
  once; compile = that first call minus the steady-state step (scgjax's includes tracing and
  its graph analysis); scgjax: median of ``--compile-repeats`` builds at the first threshold
  (the settings and versions interleaved within a repeat), one build at the others; hand and
  IWAE: one build;
- **step**: interleaved round-robin rounds (the order rotates every round; each round runs
  ``steps`` steps back to back and blocks; ``steps`` is set so that a round of the slowest
  version takes about ``--round-seconds``), one warm-up round first; median per-step time,
  ratios of the medians and paired ratios (median [IQR] of the ratios of rounds run next to
  each other), as in ``bench_scan.py`` and ``bench_hmm.py``.

**Loss check**:

- *same randomness*: scgjax's loss and gradient for a key against the hand-written SMC fed the
  noise that scgjax derives from that key (``hand_keys`` below), at both thresholds and
  without resampling;
- *expected bound*: the mean of ``log Z_hat`` over ``--check-keys`` keys of scgjax and of the
  hand-written SMC (its own key scheme), ``z = (difference) / se``, with the Kalman filter's
  exact ``log p(y)`` at the initial params (the bound is below it);
- ``sg.SMC(K, resample=None)`` against ``sg.IWAE(K)`` for the same keys (equal).

**Diagnostics** (``--diag-settings``, threshold 0.5): where scgjax's time goes.
``jax.jit`` of the loss alone (value) and of ``jax.value_and_grad`` of it (no optimiser),
interleaved rounds, for scgjax's loss and a ladder of hand-written versions that add
scgjax's structure one piece at a time (all but ``hand`` and ``hand_one_key`` compute
scgjax's loss for the key, up to float rounding: normals drawn before the loop can round
differently from those drawn in the body, and at large T a rounding difference can flip a
resampling decision):

- ``hand``: as above;
- ``hand_keys``: the noise scgjax derives from the key (per particle: its key split from the
  step's key, the loop's key from the particle's, the site's ``T`` stepped keys from it
  (``scgjax.stepped_prng``); one normal per particle and step; the resampling's uniforms as
  scgjax draws them), drawn before the loop;
- ``hand_one_key``: one key per particle (its key split from the step's key, then
  ``fold_in(., 1)``) and the particle's ``T`` normals drawn from it in one call, before the
  loop; the uniforms as scgjax: the cost of one key per particle and site, against which
  ``hand_keys`` measures the stepped keys (before them ``sg.scan`` split a key per step and
  drew from each: two threefry hashes per value, each a loop on the CPU whose state held a
  key word per value, 1.17-1.23x at K = 256, T = 1,000);
- ``hand_noise``: the same keys, each particle's normal drawn inside the loop's body from its
  step key (as the guide's step did under scgjax's ``sg.scan`` before its draws were hoisted
  out of the loop), the uniforms before the loop;
- ``hand_body``: the normals and the resampling's uniform drawn inside the body (as scgjax's
  resampling did before it drew its uniforms before the loop);
- ``hand_body2``: ``hand_body`` with the guide's and the model's carries resampled
  separately (two gathers, two scatter-adds in the backward pass), as
  ``scgjax/objectives/smc.py`` did until it resampled a leaf that the two carries share
  (here ``z``) once, and the systematic resampling's ``searchsorted`` on a ``(K, 1)`` array,
  as it did until it searched a ``(K,)`` array when there is one sequence (it still searches
  one column per element of the plates around the loop otherwise);
- ``scgjax_multi``: scgjax's loss with ``resample="multinomial"`` (for reference: it draws
  ``jax.random.categorical(key, log_norm, axis=0, shape=(K, ...))``, Gumbel noise of shape
  ``(K, K)`` per step; only where ``K^2 T <= 10^7``);

and each compiled program's structure: jaxpr equations, ``scan``, ``gather``, ``scatter-add``,
``random_bits`` equations, ``while`` loops of the optimised HLO, the largest array of the HLO
(to see whether the particles' ``all_gather`` under ``vmap`` materialises ``K x K`` arrays),
XLA's cost analysis.

``--unrolled-threefry`` registers JAX's unrolled threefry lowering for the CPU (the one it
uses on GPUs; on CPUs each threefry hash is a 5-iteration ``while`` loop) before anything is
compiled: a diagnostic of what those loops cost inside the scan body; it changes every
version (and the results are not written unless ``--out`` is given).

``--quick`` is a smoke run (K in 16 256, T in 10 100, one build each, 3 rounds, small checks,
diagnostics at K = 16, T = 100; about two minutes); the full run writes
``bench/results/smc.md`` and ``smc.json`` (``--out FILE`` writes the markdown there instead,
and the JSON next to it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import machine_info
from _timing import (
    Impl,
    call_round,
    first_call,
    paired,
    per_repeat,
    primitive_counts,
    time_interleaved,
)

import scgjax as sg
from scgjax import dist
from scgjax.stepped_prng import step_keys

HERE = Path(__file__).resolve().parent
LR = 1e-2
TRUE = {"a": 0.9, "q": 1.0, "r": 0.5}  # the simulation's parameters
INIT = {"a": 0.5, "log_q": 0.0, "log_r": 0.0, "pa": 0.3, "pb": 0.3, "log_s": 0.0}
SQRT_2PI = math.sqrt(2.0 * math.pi)
NAMES = ("scgjax", "hand", "iwae")
LABELS = {"scgjax": "scgjax sg.SMC", "hand": "hand-written SMC", "iwae": "scgjax sg.IWAE"}
DIAG_NAMES = ("scgjax", "hand", "hand_keys", "hand_one_key", "hand_noise", "hand_body",
              "hand_body2", "scgjax_multi")
DIAG_LABELS = {
    "scgjax": "scgjax sg.SMC loss",
    "hand": "hand-written (noise (T, K) before the loop)",
    "hand_keys": "hand, scgjax's keys, all drawn before the loop",
    "hand_one_key": "hand, one key per particle, its T normals in one call before the loop",
    "hand_noise": "hand, scgjax's keys, proposal noise drawn in the body",
    "hand_body": "hand, scgjax's keys, noise and resampling uniform drawn in the body",
    "hand_body2": "hand_body + two carries resampled (as scgjax did) + (K, 1) searchsorted",
    "scgjax_multi": "scgjax sg.SMC loss, multinomial resampling",
}
NOT_RUN = "-"
MULTI_LIMIT = 10_000_000  # the multinomial diagnostic runs where K^2 T is at most this

Step = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


# --------------------------------------------------------------------------------------------
# The programs
# --------------------------------------------------------------------------------------------


def simulate(horizon: int, seed: int = 0) -> jax.Array:
    """One sequence ``y_{1:T}`` of the linear-Gaussian model at :data:`TRUE`."""
    rng = np.random.default_rng(seed)
    z, ys = 0.0, []
    for _ in range(horizon):
        z = TRUE["a"] * z + rng.normal() * TRUE["q"] ** 0.5
        ys.append(z + rng.normal() * TRUE["r"] ** 0.5)
    return jnp.asarray(np.array(ys), jnp.float32)


def init_params() -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in INIT.items()}


def sg_programs() -> tuple[Callable, Callable]:
    """scgjax model and guide, each one ``sg.scan`` (fresh functions on every call)."""

    def model(ys):
        a = sg.param("a", INIT["a"])
        log_q, log_r = sg.param("log_q", INIT["log_q"]), sg.param("log_r", INIT["log_r"])

        def step(z, y):
            z = sg.sample("z", dist.Normal(a * z, jnp.exp(0.5 * log_q)))
            sg.sample("y", dist.Normal(z, jnp.exp(0.5 * log_r)), obs=y)
            return z, None

        sg.scan(step, 0.0, xs=ys)

    def guide(ys):
        pa, pb = sg.param("pa", INIT["pa"]), sg.param("pb", INIT["pb"])
        log_s = sg.param("log_s", INIT["log_s"])

        def step(z, y):
            return sg.sample("z", dist.Normal(pa * z + pb * y, jnp.exp(log_s))), None

        sg.scan(step, 0.0, xs=ys)

    return model, guide


def kalman_log_lik(p: dict, ys: jax.Array) -> float:
    """Exact ``log p(y_{1:T})`` of the model at params ``p`` (float64)."""
    a, q, r = float(p["a"]), math.exp(float(p["log_q"])), math.exp(float(p["log_r"]))
    m, v, total = 0.0, 0.0, 0.0
    for y in np.asarray(ys, np.float64):
        m, v = a * m, a * a * v + q
        s = v + r
        total += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        gain = v / s
        m, v = m + gain * (y - m), (1 - gain) * v
    return total


# --------------------------------------------------------------------------------------------
# Hand-written SMC
# --------------------------------------------------------------------------------------------


def normal_lp(x: jax.Array, loc: jax.Array, scale: jax.Array) -> jax.Array:
    """``log N(x; loc, scale)``, computed as ``numpyro.distributions.Normal.log_prob`` does (the
    same rounding: a rounding difference can flip a resampling decision at large T)."""
    return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(SQRT_2PI * scale)


def systematic(log_w: jax.Array, total: jax.Array, u: jax.Array, column: bool = False
               ) -> jax.Array:
    """``K`` ancestor indices by systematic resampling with uniform ``u``, from stopped
    weights; ``column``: on a ``(K, 1)`` array, as ``scgjax/objectives/smc.py`` does with
    plates around the loop (one column per element)."""
    k = log_w.shape[0]
    w = jnp.exp(jax.lax.stop_gradient(log_w - total))
    positions = (jnp.arange(k) + u) / k
    if column:
        cum = jnp.cumsum(w.reshape(k, 1), axis=0)
        found = jax.vmap(jnp.searchsorted, in_axes=1, out_axes=1)(cum, positions[:, None])
        return jnp.minimum(found, k - 1).reshape(k)
    return jnp.minimum(jnp.searchsorted(jnp.cumsum(w), positions), k - 1)


def smc_scan(p: dict, ys: jax.Array, noise: jax.Array, uniforms: jax.Array, k: int,
             threshold: float | None, noise_in_body: bool = False,
             uniform_in_body: bool = False, two_carries: bool = False) -> jax.Array:
    """Minus ``log Z_hat`` of SMC with the proposal ``N(pa z + pb y, exp(log_s))``: one
    ``lax.scan`` over the steps, particles as a leading axis, log-space weights, systematic
    resampling when ``ESS < threshold * K`` (not at the last step; never for ``None``).

    ``noise``: ``(T, K)`` standard normals, or with ``noise_in_body`` ``(T, K)`` keys, drawn
    from inside the body; ``uniforms``: ``(T,)``, or with ``uniform_in_body`` ``(T,)`` keys.
    ``two_carries``: the guide's and the model's carries resampled separately."""
    horizon = ys.shape[0]
    scale_q, scale_r, scale_s = (jnp.exp(0.5 * p["log_q"]), jnp.exp(0.5 * p["log_r"]),
                                 jnp.exp(p["log_s"]))

    def step(carry, inputs):
        z_guide, z_model, log_w = carry
        y, eps, u, last = inputs
        if noise_in_body:
            eps = jax.vmap(lambda key: jax.random.normal(key, ()))(eps)
        if uniform_in_body:
            u = jax.random.uniform(u, (1,))[0]
        loc = p["pa"] * z_guide + p["pb"] * y
        z = loc + scale_s * eps
        log_p = normal_lp(z, p["a"] * z_model, scale_q) + normal_lp(y, z, scale_r)
        log_w = log_w + log_p - normal_lp(z, loc, scale_s)
        total = jax.nn.logsumexp(log_w)
        if threshold is None:
            return (z, z, log_w), jnp.where(last, total - math.log(k), 0.0)
        ess = jnp.exp(2.0 * total - jax.nn.logsumexp(2.0 * log_w))
        do = jax.lax.stop_gradient(ess < threshold * k) & ~last
        ancestor = systematic(log_w, total, u, column=two_carries)
        z_guide = jnp.where(do, z[ancestor], z)
        z_model = jnp.where(do, z[ancestor], z) if two_carries else z_guide
        delta = jnp.where(do | last, total - math.log(k), 0.0)
        return (z_guide, z_model, jnp.where(do, 0.0, log_w)), delta

    zeros = jnp.zeros(k)
    last = jnp.arange(horizon) == horizon - 1
    _, delta = jax.lax.scan(step, (zeros, zeros, zeros), (ys, noise, uniforms, last))
    return -delta.sum()


def hand_loss(p: dict, key: jax.Array, ys: jax.Array, k: int, threshold: float | None
              ) -> jax.Array:
    """The hand-written SMC with its own keys: ``(T, K)`` normals and ``(T,)`` uniforms."""
    noise_key, uniform_key = jax.random.split(key)
    horizon = ys.shape[0]
    return smc_scan(p, ys, jax.random.normal(noise_key, (horizon, k)),
                    jax.random.uniform(uniform_key, (horizon,)), k, threshold)


def sg_keys(key: jax.Array, k: int, horizon: int) -> tuple[jax.Array, jax.Array]:
    """The keys scgjax's SMC derives from ``key`` (no plates, one latent site per step):
    ``(T, K)`` keys of the proposal's draws and ``(T,)`` keys of the resampling's uniforms.
    Particle ``i``'s key is ``split(key, K)[i]``; the guide's ``seed`` handler gives its
    ``sg.scan`` the key ``split(particle key)[1]``, from which ``sg.scan`` makes the sites'
    stepped keys ``step_keys(fold_in(loop key, 1), T, (1,))`` (one stream per site, the step
    in the counter: ``scgjax.stepped_prng``); the resampling's uniforms are drawn
    before the loop, ``uniform(fold_in(key, 2), (T, 1))``. (The keys returned for them, one
    per step, serve the ``hand_body`` diagnostic, which draws in the body: the same cost as a
    draw per step, another stream.)"""
    def particle(pk):
        loop = jax.random.split(pk)[1]
        return step_keys(jax.random.fold_in(loop, 1), horizon, (1,))[:, 0]

    draws = jax.vmap(particle)(jax.random.split(key, k)).T
    return draws, jax.random.split(jax.random.fold_in(key, 2), horizon)


def sg_uniforms(key: jax.Array, horizon: int) -> jax.Array:
    """The resampling's uniforms scgjax's SMC draws from ``key``, ``(T,)``."""
    return jax.random.uniform(jax.random.fold_in(key, 2), (horizon, 1))[:, 0]


def hand_keys_loss(p: dict, key: jax.Array, ys: jax.Array, k: int, threshold: float | None,
                   noise_in_body: bool = False, uniform_in_body: bool = False,
                   two_carries: bool = False) -> jax.Array:
    """The hand-written SMC fed the randomness scgjax derives from ``key``: its loss equals
    scgjax's for the same key. The draws are made before the loop, or in its body."""
    draws, uniform_keys = sg_keys(key, k, ys.shape[0])
    if not noise_in_body:
        draws = jax.vmap(jax.vmap(lambda kk: jax.random.normal(kk, ())))(draws)
    if not uniform_in_body:
        uniform_keys = sg_uniforms(key, ys.shape[0])
    return smc_scan(p, ys, draws, uniform_keys, k, threshold, noise_in_body, uniform_in_body,
                    two_carries)


def one_key_loss(p: dict, key: jax.Array, ys: jax.Array, k: int, threshold: float | None
                 ) -> jax.Array:
    """The hand-written SMC with one key per particle, ``fold_in(split(key, K)[i], 1)``, and
    the particle's ``(T,)`` normals drawn from it in one call (another stream than scgjax's;
    the uniforms are scgjax's)."""
    horizon = ys.shape[0]
    draws = jax.vmap(lambda pk: jax.random.normal(jax.random.fold_in(pk, 1), (horizon,)))(
        jax.random.split(key, k)).T
    return smc_scan(p, ys, draws, sg_uniforms(key, horizon), k, threshold)


# --------------------------------------------------------------------------------------------
# Builders: (step, state) of one fresh version
# --------------------------------------------------------------------------------------------


def build_sg(objective: Any, ys: jax.Array) -> tuple[Step, Any]:
    model, guide = sg_programs()
    svi = sg.SVI(model, guide, optax.adam(LR), objective)
    return svi.update, svi.init(jax.random.key(2), ys, init_params_=init_params())


def build_hand(k: int, threshold: float) -> tuple[Step, Any]:
    opt = optax.adam(LR)

    @jax.jit
    def step(state, ys):
        params, opt_state, key = state
        key, step_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(hand_loss)(params, step_key, ys, k, threshold)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    params = init_params()
    return step, (params, opt.init(params), jax.random.key(2))


def build(name: str, k: int, threshold: float, ys: jax.Array) -> tuple[Step, Any]:
    if name == "scgjax":
        return build_sg(sg.SMC(k, resample="systematic", ess_threshold=threshold), ys)
    if name == "iwae":
        return build_sg(sg.IWAE(k), ys)
    return build_hand(k, threshold)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------



Setting = tuple[int, int, float]  # (K, T, threshold)


def names_at(setting: Setting, thresholds: list[float]) -> list[str]:
    return [n for n in NAMES if n != "iwae" or setting[2] == thresholds[0]]


def compile_all(settings: list[Setting], thresholds: list[float], repeats: int, data: dict
                ) -> dict[Setting, dict[str, Impl]]:
    """Build every version fresh and time its first call: scgjax ``repeats`` times at the
    first threshold, once at the others (hand and IWAE once); the settings and versions
    interleaved within each repeat (the order rotating), so that a change in the machine's load
    touches every setting alike. Returns the builds of the last repeat, with every repeat's
    first-call times."""
    impls: dict[Setting, dict[str, Impl]] = {s: {} for s in settings}
    for r in range(repeats):
        todo = [s for s in settings if r == 0 or s[2] == thresholds[0]]
        for j, setting in enumerate(todo):
            k, horizon, threshold = setting
            ys = data[horizon]
            names = [n for n in names_at(setting, thresholds) if r == 0 or n == "scgjax"]
            for i in range(len(names)):
                name = names[(i + r + j) % len(names)]
                old = impls[setting].get(name)
                t0 = time.perf_counter()
                step, state = build(name, k, threshold, ys)
                impl = Impl(name, step, state)
                if old is not None:
                    impl.first_calls, impl.first_calls_cpu = old.first_calls, old.first_calls_cpu
                    impl.init_s = old.init_s
                impl.init_s.append(time.perf_counter() - t0)
                first_call(impl, ys)
                impls[setting][name] = impl
                print(f"    repeat {r} K={k} T={horizon} thr={threshold} {name}: first call "
                      f"{impl.first_calls[-1]:.2f} s", file=sys.stderr, flush=True)
    return impls



def summarise(setting: Setting, impls: dict[str, Impl], rounds: int, steps: int) -> dict:
    k, horizon, threshold = setting
    row: dict[str, Any] = {"K": k, "T": horizon, "threshold": threshold, "rounds": rounds,
                           "steps_per_round": steps}
    med = {n: statistics.median(i.times) for n, i in impls.items()}
    for n, impl in impls.items():
        row[n] = {"step_s": med[n],
                  "compile_s": statistics.median(impl.first_calls) - med[n],
                  "compile_cpu_s": statistics.median(impl.first_calls_cpu) - med[n],
                  "init_s": statistics.median(impl.init_s),
                  "first_calls_s": impl.first_calls, "first_calls_cpu_s": impl.first_calls_cpu,
                  "round_times_s": impl.times, "last_loss": impl.last_loss}
    for other in ("hand", "iwae"):
        if other in impls:
            row[f"scgjax/{other}"] = med["scgjax"] / med[other]
            row[f"scgjax/{other} paired"] = paired(impls["scgjax"].times, impls[other].times)
    return row


# --------------------------------------------------------------------------------------------
# Loss check
# --------------------------------------------------------------------------------------------


def rel_err(a: Any, b: Any) -> float:
    """``max |a - b| / max |b|`` over the leaves."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))
    return num / max(float(jnp.max(jnp.abs(y))) for y in b)


def same_randomness_check(k: int, horizon: int, keys: int,
                          thresholds: tuple = (0.5, 1.0, None)) -> list[dict]:
    """scgjax's loss and gradient against the hand-written SMC fed scgjax's noise, per key
    (threshold ``None``: no resampling)."""
    ys = simulate(horizon)
    params = init_params()
    model, guide = sg_programs()
    out = []
    for threshold in thresholds:
        smc = sg.SMC(k, resample="systematic" if threshold is not None else None,
                     ess_threshold=0.5 if threshold is None else threshold)
        sg_vg = jax.jit(jax.value_and_grad(
            lambda p, key, smc=smc: smc.loss(key, p, model, guide, ys)))
        hand_vg = jax.jit(jax.value_and_grad(
            lambda p, key, t=threshold: hand_keys_loss(p, key, ys, k, t)))
        loss_err, grad_err, values = [], [], []
        for s in range(keys):
            key = jax.random.key(100 + s)
            (va, ga), (vb, gb) = sg_vg(params, key), hand_vg(params, key)
            loss_err.append(abs(float(va) - float(vb)) / abs(float(vb)))
            grad_err.append(rel_err(ga, gb))
            values.append(float(va))
        out.append({"K": k, "T": horizon, "threshold": threshold, "keys": keys,
                    "loss_rel_err": max(loss_err), "grad_rel_err": max(grad_err),
                    "mean_loss": float(np.mean(values))})
    return out


def iwae_check(k: int, horizon: int, keys: int) -> dict:
    """``sg.SMC(K, resample=None)`` against ``sg.IWAE(K)`` for the same keys."""
    ys = simulate(horizon)
    params = init_params()
    model, guide = sg_programs()
    smc, iwae = sg.SMC(k, resample=None), sg.IWAE(k)
    f = jax.jit(jax.vmap(lambda key: jnp.stack([smc.loss(key, params, model, guide, ys),
                                                iwae.loss(key, params, model, guide, ys)])))
    v = np.asarray(f(jax.random.split(jax.random.key(7), keys)), np.float64)
    return {"K": k, "T": horizon, "keys": keys,
            "max_abs_diff": float(np.abs(v[:, 0] - v[:, 1]).max()),
            "max_rel_diff": float((np.abs(v[:, 0] - v[:, 1]) / np.abs(v[:, 1])).max()),
            "exactly_equal": int((v[:, 0] == v[:, 1]).sum())}


def expected_bound_check(k: int, horizon: int, keys: int, chunk: int = 250) -> list[dict]:
    """Mean ``log Z_hat`` over ``keys`` keys: scgjax's SMC (thresholds 0.5, 1.0), the
    hand-written SMC with its own keys, scgjax's IWAE; against the exact log-likelihood."""
    ys = simulate(horizon)
    params = init_params()
    model, guide = sg_programs()
    exact = kalman_log_lik(params, ys)
    all_keys = jax.random.split(jax.random.key(11), keys)
    out = []
    for threshold in (0.5, 1.0):
        smc = sg.SMC(k, ess_threshold=threshold)
        fns = {"scgjax": lambda key, smc=smc: -smc.loss(key, params, model, guide, ys),
               "hand": lambda key, t=threshold: -hand_loss(params, key, ys, k, t)}
        stats = {}
        for name, fn in fns.items():
            f = jax.jit(jax.vmap(fn))
            v = np.concatenate([np.asarray(f(all_keys[i:i + chunk]), np.float64)
                                for i in range(0, keys, chunk)])
            stats[name] = (v.mean(), v.std(ddof=1) / math.sqrt(v.size))
        (ma, sa), (mb, sb) = stats["scgjax"], stats["hand"]
        out.append({"K": k, "T": horizon, "threshold": threshold, "keys": keys,
                    "exact_log_lik": exact, "scgjax_mean": ma, "scgjax_se": sa,
                    "hand_mean": mb, "hand_se": sb, "z": (ma - mb) / math.hypot(sa, sb)})
    iwae = sg.IWAE(k)
    f = jax.jit(jax.vmap(lambda key: -iwae.loss(key, params, model, guide, ys)))
    v = np.concatenate([np.asarray(f(all_keys[i:i + chunk]), np.float64)
                        for i in range(0, keys, chunk)])
    out.append({"K": k, "T": horizon, "threshold": None, "keys": keys, "exact_log_lik": exact,
                "iwae_mean": v.mean(), "iwae_se": v.std(ddof=1) / math.sqrt(v.size)})
    return out


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------



SHAPE = re.compile(r"\b(?:f32|s32|u32|pred|f64|s64|u8|bf16)\[([0-9,]+)\]")


def largest_array(hlo: str) -> tuple[int, str]:
    """The most elements of any array shape in the HLO text, and that shape."""
    best, shape = 0, ""
    for m in SHAPE.finditer(hlo):
        n = math.prod(int(d) for d in m.group(1).split(","))
        if n > best:
            best, shape = n, m.group(0)
    return best, shape


def diag_functions(k: int, threshold: float) -> dict[str, Callable]:
    """``loss(params, key, ys)`` of scgjax and of the ladder of hand-written versions."""
    model, guide = sg_programs()
    smc = sg.SMC(k, resample="systematic", ess_threshold=threshold)
    multi = sg.SMC(k, resample="multinomial", ess_threshold=threshold)
    return {
        "scgjax": lambda p, key, ys: smc.loss(key, p, model, guide, ys),
        "hand": lambda p, key, ys: hand_loss(p, key, ys, k, threshold),
        "hand_keys": lambda p, key, ys: hand_keys_loss(p, key, ys, k, threshold),
        "hand_one_key": lambda p, key, ys: one_key_loss(p, key, ys, k, threshold),
        "hand_noise": lambda p, key, ys: hand_keys_loss(p, key, ys, k, threshold, True),
        "hand_body": lambda p, key, ys: hand_keys_loss(p, key, ys, k, threshold, True, True),
        "hand_body2": lambda p, key, ys: hand_keys_loss(p, key, ys, k, threshold, True, True,
                                                        True),
        "scgjax_multi": lambda p, key, ys: multi.loss(key, p, model, guide, ys),
    }



def diagnostics(settings: list[tuple[int, int]], threshold: float, rounds: int, round_s: float
                ) -> list[dict]:
    """Value and value_and_grad of scgjax's loss and of the hand-written ladder: per-call
    time (interleaved rounds), the values, the compiled programs' structure."""
    out = []
    for k, horizon in settings:
        ys = simulate(horizon)
        params = init_params()
        key = jax.random.key(5)
        args = (params, key, ys)
        compiled: dict[str, Any] = {}
        res: dict[str, dict] = {}
        fns = diag_functions(k, threshold)
        if k * k * horizon > MULTI_LIMIT:
            del fns["scgjax_multi"]  # its (K, K) Gumbel draws per step: seconds per call
        for name, fn in fns.items():
            for mode, f in (("value", fn), ("value_and_grad", jax.value_and_grad(fn))):
                label = f"{name} {mode}"
                jitted = jax.jit(f)
                prims = primitive_counts(jax.make_jaxpr(jitted)(*args).jaxpr)
                exe = jitted.lower(*args).compile()
                cost = exe.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                hlo = exe.as_text()
                value = exe(*args)
                value = value[0] if isinstance(value, tuple) else value
                size, shape = largest_array(hlo)
                compiled[label] = exe
                res[label] = {"name": name, "mode": mode, "value": float(value), "times": [],
                              "jaxpr_eqns": sum(prims.values()),
                              **{p: prims.get(p, 0) for p in ("scan", "gather", "scatter-add",
                                                              "random_bits", "all_gather")},
                              "hlo_while": hlo.count(" while("), "largest": size,
                              "largest_shape": shape,
                              "kflop": cost.get("flops", 0.0) / 1e3,
                              "kbytes": cost.get("bytes accessed", 0.0) / 1e3}
        labels = list(compiled)
        slowest = max(min(call_round(compiled[n], args, 1) for _ in range(2)) for n in labels)
        steps = int(min(200, max(2, round(round_s / slowest))))
        for n in labels:
            call_round(compiled[n], args, steps)
        for r in range(rounds):
            for i in range(len(labels)):
                n = labels[(i + r) % len(labels)]
                res[n]["times"].append(call_round(compiled[n], args, steps))
        for n in labels:
            mode = res[n]["mode"]
            res[n]["call_s"] = statistics.median(res[n]["times"])
            res[n]["vs_scgjax paired"] = paired(res[n]["times"],
                                                res[f"scgjax {mode}"]["times"])
            res[n]["vs_hand paired"] = paired(res[n]["times"], res[f"hand {mode}"]["times"])
        out.append({"K": k, "T": horizon, "threshold": threshold, "rounds": rounds,
                    "steps_per_round": steps, "versions": res})
        print(f"  diagnostics K={k} T={horizon} done", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

FMT = "{:.2f} [{:.2f}-{:.2f}]"


def _ms(row: dict, name: str, key: str = "step_s", scale: float = 1e3, digits: int = 3
        ) -> str:
    v = row.get(name)
    return NOT_RUN if v is None else f"{scale * v[key]:.{digits}f}"


def step_table(rows: list[dict]) -> str:
    head = ["K", "T", "ESS thr.", "rounds x steps", "scgjax ms", "hand ms", "iwae ms",
            "scgjax/hand", "paired [IQR]", "scgjax/iwae paired [IQR]"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["K"]), f"{row['T']:,}", f"{row['threshold']:g}",
                 f"{row['rounds']} x {row['steps_per_round']}"]
        cells += [_ms(row, n) for n in NAMES]
        cells += [f"{row['scgjax/hand']:.2f}", FMT.format(*row["scgjax/hand paired"]),
                  FMT.format(*row["scgjax/iwae paired"]) if "scgjax/iwae" in row else NOT_RUN]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)



def compile_ratios(rows: list[dict]) -> dict[tuple[int, float], dict]:
    """Per (K, threshold): scgjax's compile time at the largest T over the smallest."""
    groups: dict[tuple[int, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["K"], row["threshold"]), []).append(row)
    out = {}
    for key, rs in groups.items():
        lo, hi = rs[0]["scgjax"], rs[-1]["scgjax"]
        out[key] = {"T_lo": rs[0]["T"], "T_hi": rs[-1]["T"],
                    "wall": hi["compile_s"] / lo["compile_s"],
                    "cpu": hi["compile_cpu_s"] / lo["compile_cpu_s"],
                    "per_repeat": per_repeat(hi, lo), "repeats": len(hi["first_calls_s"])}
    return out


def compile_table(rows: list[dict]) -> str:
    head = ["K", "T", "ESS thr.", "builds", "scgjax s", "hand s", "iwae s",
            "scgjax / scgjax at smallest T", "per-repeat [IQR]", "CPU: same", "scgjax/hand",
            "scgjax init s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first: dict[tuple[int, float], dict] = {}
    for row in rows:
        f = first.setdefault((row["K"], row["threshold"]), row)["scgjax"]
        c = row["scgjax"]
        cells = [str(row["K"]), f"{row['T']:,}", f"{row['threshold']:g}",
                 str(len(c["first_calls_s"]))]
        cells += [_ms(row, n, "compile_s", 1.0, 2) for n in NAMES]
        cells += [f"{c['compile_s'] / f['compile_s']:.2f}", FMT.format(*per_repeat(c, f)),
                  f"{c['compile_cpu_s'] / f['compile_cpu_s']:.2f}",
                  f"{c['compile_s'] / row['hand']['compile_s']:.2f}", f"{c['init_s']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def check_tables(same: list[dict], iwae: list[dict], expected: list[dict]) -> list[str]:
    lines = ["Same randomness (scgjax against the hand-written SMC fed the noise scgjax derives "
             "from the key; max over the keys of the relative error of the loss and of max "
             "|g - g_hand| / max |g_hand| over the params):", "",
             "| K | T | ESS thr. | keys | mean loss | loss rel. err. | grad rel. err. |",
             "|---|---|---|---|---|---|---|"]
    for r in same:
        thr = "none (no resampling)" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(f"| {r['K']} | {r['T']:,} | {thr} | {r['keys']} | {r['mean_loss']:.3f} | "
                     f"{r['loss_rel_err']:.1e} | {r['grad_rel_err']:.1e} |")
    lines += ["", "`sg.SMC(K, resample=None)` against `sg.IWAE(K)`, the same keys:", "",
              "| K | T | keys | exactly equal | max abs. diff. | max rel. diff. |",
              "|---|---|---|---|---|---|"]
    for r in iwae:
        lines.append(f"| {r['K']} | {r['T']:,} | {r['keys']} | {r['exactly_equal']} of "
                     f"{r['keys']} | {r['max_abs_diff']:.1e} | {r['max_rel_diff']:.1e} |")
    lines += ["", "Expected bound (mean of log Z_hat ± se over independent keys; scgjax and the "
              "hand-written SMC with its own key scheme; z = difference / se):", "",
              "| K | T | ESS thr. | keys | exact log p(y) | scgjax | hand-written | z | "
              "sg.IWAE |", "|---|---|---|---|---|---|---|---|---|"]
    iw = next(r for r in expected if r["threshold"] is None)
    for r in expected:
        if r["threshold"] is None:
            continue
        lines.append(f"| {r['K']} | {r['T']:,} | {r['threshold']:g} | {r['keys']} | "
                     f"{r['exact_log_lik']:.3f} | {r['scgjax_mean']:.3f} ± {r['scgjax_se']:.3f} "
                     f"| {r['hand_mean']:.3f} ± {r['hand_se']:.3f} | {r['z']:+.2f} | "
                     f"{iw['iwae_mean']:.3f} ± {iw['iwae_se']:.3f} |")
    return lines


def diag_table(results: list[dict]) -> str:
    head = ["K", "T", "version", "mode", "ms per call", "/ scgjax, paired [IQR]",
            "/ hand, paired [IQR]", "value", "jaxpr eqns", "scan", "gather", "scatter-add",
            "random_bits", "HLO while", "largest HLO array", "kFLOP", "kB accessed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for v in r["versions"].values():
            out.append(f"| {r['K']} | {r['T']:,} | {DIAG_LABELS[v['name']]} | {v['mode']} | "
                       f"{1e3 * v['call_s']:.3f} | {FMT.format(*v['vs_scgjax paired'])} | "
                       f"{FMT.format(*v['vs_hand paired'])} | {v['value']:.3f} | "
                       f"{v['jaxpr_eqns']} | {v['scan']} | {v['gather']} | {v['scatter-add']} | "
                       f"{v['random_bits']} | {v['hlo_while']} | `{v['largest_shape']}` | "
                       f"{v['kflop']:.0f} | {v['kbytes']:.0f} |")
    return "\n".join(out)


def verdict(rows: list[dict], step_target: float, compile_target: float) -> list[str]:
    lines = []
    by_thr: dict[float, list[dict]] = {}
    for r in rows:
        by_thr.setdefault(r["threshold"], []).append(r)
    for threshold, rs in by_thr.items():
        met = all(r["scgjax/hand"] <= step_target for r in rs)
        worst = max(rs, key=lambda r: r["scgjax/hand"])
        best = min(rs, key=lambda r: r["scgjax/hand"])
        lines.append(
            f"- Step, ESS threshold {threshold:g}, scgjax / hand-written (medians): "
            + ", ".join(f"{r['scgjax/hand']:.2f} (K={r['K']}, T={r['T']:,})" for r in rs)
            + f"; target <= {step_target}x: {'met' if met else 'NOT met'} (worst "
            f"{worst['scgjax/hand']:.2f} at K = {worst['K']}, T = {worst['T']:,}; best "
            f"{best['scgjax/hand']:.2f} at K = {best['K']}, T = {best['T']:,}).")
    for (k, threshold), c in compile_ratios(rows).items():
        lines.append(f"- Compile, K = {k}, threshold {threshold:g}: scgjax at T = "
                     f"{c['T_hi']:,} takes {c['wall']:.2f}x (wall; {c['cpu']:.2f}x process CPU; "
                     f"per-repeat {FMT.format(*c['per_repeat'])}, {c['repeats']} builds) its "
                     f"compile at T = {c['T_lo']:,}; flat (<= {compile_target}x): "
                     f"{'met' if max(c['wall'], c['cpu']) <= compile_target else 'NOT met'}.")
    return lines


def parse_setting(text: str) -> tuple[int, int]:
    k, horizon = text.lower().split("x")
    return int(k), int(horizon)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--particles", type=int, nargs="+", default=[16, 256, 1024],
                   help="K (16 256 1024)")
    p.add_argument("--horizons", type=int, nargs="+", default=[10, 100, 1000],
                   help="T (10 100 1000)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 1.0],
                   help="ESS thresholds; the first gets the repeated compile builds and the "
                        "IWAE reference (0.5 1.0)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (15)")
    p.add_argument("--round-seconds", type=float, default=0.1,
                   help="target length of a round of the slowest version (0.1 s)")
    p.add_argument("--max-steps", type=int, default=200, help="most steps per round (200)")
    p.add_argument("--compile-repeats", type=int, default=3,
                   help="fresh scgjax builds whose first call is timed, at the first "
                        "threshold (3)")
    p.add_argument("--check-keys", type=int, default=1000,
                   help="keys of the expected-bound check (1000)")
    p.add_argument("--check-setting", type=parse_setting, default=(16, 100),
                   help="KxT of the expected-bound check (16x100)")
    p.add_argument("--diag-settings", type=parse_setting, nargs="*",
                   default=[(16, 1000), (256, 1000)],
                   help="KxT of the diagnostics (16x1000 256x1000)")
    p.add_argument("--diag-rounds", type=int, default=10, help="rounds of the diagnostics (10)")
    p.add_argument("--skip", nargs="*", default=[], choices=["timing", "check", "diag"])
    p.add_argument("--step-target", type=float, default=1.10)
    p.add_argument("--compile-target", type=float, default=1.5)
    p.add_argument("--unrolled-threefry", action="store_true",
                   help="diagnostic: compile threefry unrolled on the CPU (as on GPUs)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: K in 16 256, T in 10 100, 3 rounds, small checks")
    p.add_argument("--out", type=Path, default=None,
                   help="write the markdown report here (and the JSON next to it); default "
                        "bench/results/smc.md for a full run, nothing for --quick or --skip")
    return p.parse_args(argv)


def unroll_threefry() -> None:
    """Lower ``threefry2x32`` on the CPU as on GPUs: unrolled, no ``while`` loop (private JAX
    API, ``jax._src.random.threefry2x32``)."""
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as tf

    mlir.register_lowering(tf.threefry2x32_p, tf._threefry2x32_lowering_rule, platform="cpu")


def source_state() -> str:
    """The commit and whether ``scgjax/`` differs from it (the benchmark times the working
    tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "scgjax"], cwd=HERE.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git state unknown"
    return f"commit {head}" + (", scgjax/ with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.particles, args.horizons = [16, 256], [10, 100]
        args.rounds, args.compile_repeats, args.round_seconds = 3, 1, 0.02
        args.check_keys, args.check_setting = 250, (16, 30)
        args.diag_settings, args.diag_rounds = [(16, 100)], 3
    elif args.out is None and not args.skip and not args.unrolled_threefry:
        args.out = HERE / "results" / "smc.md"  # a partial run does not replace the results
    if args.unrolled_threefry:
        unroll_threefry()
    info = machine_info()
    state = source_state()
    print(info, state, flush=True)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    settings = [(k, t, thr) for thr in args.thresholds for k in sorted(args.particles)
                for t in sorted(args.horizons)]
    rows: list[dict] = []
    if "timing" not in args.skip:
        data = {t: simulate(t) for t in args.horizons}
        t0 = time.perf_counter()
        if not args.quick:  # warm-up: one-time costs of the first trace of each version
            for name in NAMES:
                step, st = build(name, 4, args.thresholds[0], data[min(args.horizons)])
                jax.block_until_ready(step(st, data[min(args.horizons)]))
        builds = compile_all(settings, args.thresholds, args.compile_repeats, data)
        print(f"  compile done in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
        for setting in settings:
            t0 = time.perf_counter()
            ys = data[setting[1]]
            steps = time_interleaved(builds[setting], NAMES, ys, args.rounds, args.round_seconds,
                                     args.max_steps)
            rows.append(summarise(setting, builds[setting], args.rounds, steps))
            print(f"  K={setting[0]} T={setting[1]} thr={setting[2]} timed in "
                  f"{time.perf_counter() - t0:.1f} s: scgjax/hand "
                  f"{rows[-1]['scgjax/hand']:.2f}", file=sys.stderr, flush=True)
    check = None
    if "check" not in args.skip:
        t0 = time.perf_counter()
        k, horizon = args.check_setting
        same = same_randomness_check(k, horizon, 4)
        same += same_randomness_check(256, horizon, 2, (0.5,))
        iwae = [iwae_check(k, horizon, 16), iwae_check(256, horizon, 8)]
        expected = expected_bound_check(k, horizon, args.check_keys)
        check = {"same_randomness": same, "iwae": iwae, "expected_bound": expected}
        print(f"  loss check done in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
    diag = None
    if "diag" not in args.skip and args.diag_settings:
        diag = diagnostics(args.diag_settings, args.thresholds[0], args.diag_rounds,
                           args.round_seconds)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    lines = [
        f"Machine: {info}. CPU only. scgjax source: {state}."
        + (" **threefry lowered unrolled (--unrolled-threefry)**." if args.unrolled_threefry
           else ""),
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"the run took {elapsed:.0f} s.",
        "",
        "Model: linear-Gaussian state-space model z_t ~ N(a z_{t-1}, exp(log_q)), y_t ~ "
        "N(z_t, exp(log_r)), learnable a, log_q, log_r; guide z_t ~ N(pa z_{t-1} + pb y_t, "
        "exp(log_s)^2); one simulated sequence of length T; systematic resampling; adam(1e-2). "
        "Versions: " + "; ".join(f"{n} = {LABELS[n]}" for n in NAMES) + ".",
    ]
    if rows:
        lines += [
            "",
            "## Step time",
            "",
            "Median per-step wall time (ms) over interleaved rounds (one warm-up round "
            "each). Ratios: of the medians; 'paired': median [IQR] of the per-round ratios. "
            "IWAE (which does not depend on the threshold) runs at the first threshold only.",
            "",
            step_table(rows),
            "",
            "## Compile time",
            "",
            "First call of a fresh build minus the steady-state step (wall s), median of the "
            "builds (column 'builds'), the settings and versions interleaved within each "
            "repeat; scgjax's includes tracing and its graph analysis. 'per-repeat': median "
            "[IQR] of scgjax's ratio to the smallest T within each repeat; 'CPU': the ratio "
            "from the process CPU time of the first call. 'init': building the SVI state.",
            "",
            compile_table(rows),
            "",
            "## Targets",
            "",
            *verdict(rows, args.step_target, args.compile_target),
        ]
    if check:
        lines += ["", "## Loss check", "", *check_tables(check["same_randomness"], check["iwae"],
                                                         check["expected_bound"])]
    if diag:
        lines += [
            "",
            "## Diagnostics: where scgjax's time goes",
            "",
            f"ESS threshold {args.thresholds[0]:g}. The loss alone ('value') and "
            "value_and_grad (no optimiser), jitted and compiled ahead, per call; "
            f"interleaved rounds ({args.diag_rounds}). The compiled programs: jaxpr equations "
            "(nested jaxprs once per call) and some of their primitives, `while` loops of the "
            "optimised HLO (the scans, searchsorted's loop and the PRNG's threefry loops), the "
            "largest array shape of the HLO, XLA's cost analysis (which counts a loop's body "
            "once).",
            "",
            diag_table(diag),
        ]
    text = "\n".join(lines)
    print(text)
    result = {"machine": info, "source": state, "seconds": elapsed,
              "load_average_1min": [load_before[0], load_after[0]],
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "timing": rows, "check": check, "diagnostics": diag}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        with open(args.out.with_suffix(".json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.out} and its .json", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
