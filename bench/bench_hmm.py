"""Benchmark exact HMM marginalisation: compile time and step time against the horizon T.

Issue 17, item 6. One training step (``value_and_grad`` of minus the log-likelihood, then
``optax.adam(1e-2)``, one ``jax.jit``) of a hidden Markov model with ``S`` states and Gaussian
emissions whose states are summed out exactly, in five versions:

- ``scgjax``: ``sg.SVI(hmm, no_guide, optax.adam(1e-2), sg.ELBO()).update``; the model's
  chain is written with ``sg.scan`` and its site marked ``infer={"enumerate": "parallel"}``
  (scgjax sums it by the forward algorithm);
- ``hand``: the forward algorithm in plain JAX (one ``lax.scan`` in log space over the steps,
  ``log_softmax`` of the transition logits computed once), ``jax.value_and_grad``,
  ``optax.adam``, one ``jax.jit``;
- ``numpyro``: ``numpyro.infer.SVI(model, guide, optax.adam(1e-2),
  TraceEnum_ELBO(max_plate_nesting=0))`` with ``numpyro.contrib.control_flow.scan`` in the
  model (needs funsor), ``jax.jit(svi.update)``. **Its loss is not the HMM's** (see the loss
  check): NumPyro's ``TraceEnum_ELBO`` contracts the scan's factors with
  ``funsor.sum_product.sum_product``, without the Markov elimination over the time axis;
- ``numpyro_ld``: the same NumPyro model, minus ``numpyro.contrib.funsor.log_density`` of
  ``enum(config_enumerate(model))`` (the enumerated log-density that NumPyro's MCMC uses for
  HMMs; it eliminates the scan's time axis by funsor's ``sarkka_bilmes_product``),
  ``jax.value_and_grad``, ``optax.adam``, one ``jax.jit``: NumPyro's exact sum over a scan;
- ``np_loop``: NumPyro's ``TraceEnum_ELBO`` with the chain unrolled in Python under
  ``numpyro.contrib.funsor.markov`` (sites ``z_t``, ``y_t``); its compile time grows with T,
  so it runs at the small horizons only and stops once a compile exceeds ``--loop-limit``.

The model (the same in all versions): params ``trans`` (S x S transition logits, initially
``2 I + 0.1``), ``init`` (initial logits, 0) and ``locs`` (emission means, ``linspace(-2, 2,
S)``); ``z_0 ~ Categorical(logits=init)``, ``z_t ~ Categorical(logits=trans[z_{t-1}])``,
``y_t ~ Normal(locs[z_t], 1)``; the data are one sequence drawn from the model at these
params (numpy seed 0). The guide is empty, so minus the ELBO is minus ``log p(y_{1:T})``.

Measured per (S, T):

- **loss check**: each version's first loss (at the initial params) against minus the exact
  log-likelihood of the hand-written forward algorithm (float32, rtol ``--rtol``), and the
  float64 forward algorithm in numpy for reference;
- **compile**: each version built fresh and called once; compile = that first call minus the
  steady-state step (scgjax's includes tracing and its graph analysis); median of
  ``--compile-repeats`` builds, the settings and versions interleaved within a repeat (a
  version slower than ``--slow-compile`` s is built once);
- **step**: interleaved round-robin rounds (the order rotates every round; each round runs
  ``steps`` steps back to back and blocks; ``steps`` is set so that a round of the slowest
  version takes about ``--round-seconds``), one warm-up round first; median per-step time,
  ratios of the medians and paired ratios (median [IQR] of the ratios of rounds run next to
  each other), as in ``bench_scan.py``.

**Gradient check** (T = ``--check-horizon``): the gradient of each version's loss with respect
to the params against the hand-written forward algorithm's.

**Diagnostics** (T = ``--diag-horizons``): where scgjax's time goes. ``value_and_grad`` alone
(no optimiser), interleaved rounds, of scgjax's loss and of hand-written versions of the steps
of its path (see ``scgjax/objectives/marginal.py`` and ``scgjax.control_flow.Transition``: the
model runs once per pair ``(prev, cur)`` of values, a vmap over ``prev`` around one over
``cur``; in each run the loop's steps run as one vmap, each from the carry the previous step
passes on at ``prev``, with the state at ``cur``; each step's costs are stacked and a log-space
forward scan runs over the step tables), and of the path it took before (the state ``a`` at
even steps and ``b`` at odd ones, each of the ``S^2`` runs a sequential scan):

- ``tables``: the forward algorithm over per-step ``(S, S)`` tables built by broadcasting
  (the forward-scan part of scgjax's path alone);
- ``pairs``: scgjax's former path by hand: ``S^2`` runs (vmap) of a ``lax.scan`` of the model's step
  (it stacks each step's logits and emission mean), log-densities after the scan, the even/odd
  swap, the forward scan over the tables;
- ``pairs_unroll``: ``pairs`` with the model's scan unrolled 8 steps (``lax.scan(...,
  unroll=8)``);
- ``pairs_vec``: the same ``S^2`` runs with no model scan: every step's costs at once
  (vectorised over time, the previous value known in each run);
- ``nested``: no model scan and two nested vmaps instead of one over the ``S^2`` pairs: the
  previous value outside, the current one inside, so that the work that depends on the
  previous value only (the transition logits and their ``log_softmax``) runs ``S`` times per
  step, not ``S^2``; the step tables then feed the same forward scan (scgjax's path now,
  except that scgjax computes ``log_softmax`` of a transition row once per previous value, not
  once per step: the incoming carry is the same at every step);

and the same programs' structure: ``scan`` equations of the jaxpr, ``while`` loops of the
optimised HLO, XLA's cost analysis.

``--quick`` is a smoke run (S = 3, T in 10 and 1000, the loop at T = 10, one build each, 3
rounds, gradient check at T = 10, diagnostics at T = 1000; under a minute); the full run
writes ``bench/results/hmm.md`` and ``hmm.json`` (``--out FILE`` writes the markdown there
instead, and the JSON next to it).
"""

from __future__ import annotations

import argparse
import json
import math
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
from _timing import (
    Impl,
    call_round,
    first_call,
    paired,
    per_repeat,
    primitive_counts,
    time_interleaved,
)
from numpyro.contrib.control_flow import scan as np_scan

import scgjax as sg
from scgjax import dist

try:  # NumPyro's enumeration needs funsor (not a dependency of scgjax)
    import funsor
    from numpyro.contrib.funsor import config_enumerate, enum, markov
    from numpyro.contrib.funsor import log_density as funsor_log_density
    FUNSOR = f"funsor {funsor.__version__}"
except ImportError as e:  # pragma: no cover - reported in the output
    funsor = None
    FUNSOR = f"funsor not importable ({e})"

HERE = Path(__file__).resolve().parent
LR = 1e-2
LOG_2PI = math.log(2 * math.pi)
NAMES = ("scgjax", "hand", "numpyro", "numpyro_ld", "np_loop")
NP_NAMES = ("numpyro", "numpyro_ld", "np_loop")
LABELS = {"scgjax": "scgjax sg.scan + ELBO", "hand": "hand-written forward algorithm",
          "numpyro": "NumPyro scan + TraceEnum_ELBO",
          "numpyro_ld": "NumPyro scan + funsor log_density",
          "np_loop": "NumPyro Python loop + markov + TraceEnum_ELBO"}
DIAG_NAMES = ("scgjax", "scgjax_value", "hand", "hand_value", "tables", "pairs",
              "pairs_unroll", "pairs_vec", "nested")
DIAG_LABELS = {"scgjax": "scgjax ELBO loss", "scgjax_value": "scgjax ELBO loss, value only",
               "hand": "hand-written forward algorithm",
               "hand_value": "hand-written, value only",
               "tables": "forward scan over per-step tables",
               "pairs": "S^2 pair runs (model scan) + forward scan (scgjax's former path)",
               "pairs_unroll": "pairs, model scan unroll=8",
               "pairs_vec": "S^2 pair runs, no model scan",
               "nested": "prev x cur nested vmaps, no model scan"}
NOT_RUN = "-"

Step = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def init_params(states: int) -> dict[str, jax.Array]:
    return {"trans": jnp.eye(states) * 2.0 + 0.1, "init": jnp.zeros(states),
            "locs": jnp.linspace(-2.0, 2.0, states)}


def simulate(horizon: int, states: int, seed: int = 0) -> jax.Array:
    """One sequence ``y_{1:T}`` drawn from the model at the initial params."""
    rng = np.random.default_rng(seed)
    p = {k: np.asarray(v, np.float64) for k, v in init_params(states).items()}
    trans = np.exp(p["trans"]) / np.exp(p["trans"]).sum(-1, keepdims=True)
    cum = np.cumsum(trans, -1)
    u = rng.random(horizon)
    z = np.empty(horizon, np.int64)
    z[0] = rng.integers(states)  # init logits are 0: uniform
    for t in range(1, horizon):
        z[t] = min(np.searchsorted(cum[z[t - 1]], u[t]), states - 1)
    return jnp.asarray(p["locs"][z] + rng.standard_normal(horizon), jnp.float32)


def sg_programs(states: int) -> tuple[Callable, Callable]:
    """scgjax's model (``sg.scan``, the state summed out) and empty guide, fresh functions."""
    p0 = init_params(states)

    def hmm(ys):
        trans = sg.param("trans", p0["trans"])
        init = sg.param("init", p0["init"])
        locs = sg.param("locs", p0["locs"])

        def step(prev, y):
            logits = jnp.where((prev < 0)[..., None], init, trans[jnp.maximum(prev, 0)])
            z = sg.sample("z", dist.Categorical(logits=logits),
                          infer={"enumerate": "parallel"})
            sg.sample("y", dist.Normal(locs[z], 1.0), obs=y)
            return z, None

        sg.scan(step, jnp.array(-1), xs=ys)

    def no_guide(ys):
        pass

    return hmm, no_guide


def np_scan_programs(states: int) -> tuple[Callable, Callable]:
    """NumPyro's model with ``contrib.control_flow.scan`` (the same body; a fresh ``infer``
    dict per call: NumPyro's scan writes into the dict it is given) and empty guide."""
    p0 = init_params(states)

    def hmm(ys):
        trans = numpyro.param("trans", p0["trans"])
        init = numpyro.param("init", p0["init"])
        locs = numpyro.param("locs", p0["locs"])

        def step(prev, y):
            logits = jnp.where((prev < 0)[..., None], init, trans[jnp.maximum(prev, 0)])
            z = numpyro.sample("z", nd.Categorical(logits=logits),
                               infer={"enumerate": "parallel"})
            numpyro.sample("y", nd.Normal(locs[z], 1.0), obs=y)
            return z, None

        np_scan(step, jnp.array(-1), ys)

    def no_guide(ys):
        pass

    return hmm, no_guide


def np_loop_programs(states: int) -> tuple[Callable, Callable]:
    """NumPyro's model unrolled in Python under ``markov`` (sites ``z_t``, ``y_t``)."""
    p0 = init_params(states)

    def hmm(ys):
        trans = numpyro.param("trans", p0["trans"])
        init = numpyro.param("init", p0["init"])
        locs = numpyro.param("locs", p0["locs"])
        z = None
        for t in markov(range(ys.shape[0])):
            logits = init if z is None else trans[z]
            z = numpyro.sample(f"z_{t}", nd.Categorical(logits=logits),
                               infer={"enumerate": "parallel"})
            numpyro.sample(f"y_{t}", nd.Normal(locs[z], 1.0), obs=ys[t])

    def no_guide(ys):
        pass

    return hmm, no_guide


def emission(locs: jax.Array, ys: jax.Array) -> jax.Array:
    """``log Normal(y_t | locs[s], 1)``, shape ``(T, S)``."""
    return -0.5 * (ys[:, None] - locs) ** 2 - 0.5 * LOG_2PI


def hand_loss(p: dict, ys: jax.Array) -> jax.Array:
    """Minus ``log p(y_{1:T})`` by the forward algorithm (log space, one ``lax.scan``)."""
    log_trans = jax.nn.log_softmax(p["trans"], -1)
    e = emission(p["locs"], ys)

    def step(alpha, e_t):
        return jax.nn.logsumexp(alpha[:, None] + log_trans, 0) + e_t, None

    alpha, _ = jax.lax.scan(step, jax.nn.log_softmax(p["init"]) + e[0], e[1:])
    return -jax.nn.logsumexp(alpha)


def exact_float64(p: dict, ys: jax.Array) -> float:
    """Minus ``log p(y_{1:T})`` in float64 numpy (reference)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    y = np.asarray(ys, np.float64)

    def log_softmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    log_trans = log_softmax(p["trans"])
    e = -0.5 * (y[:, None] - p["locs"]) ** 2 - 0.5 * LOG_2PI
    alpha = log_softmax(p["init"]) + e[0]
    for t in range(1, len(y)):
        x = alpha[:, None] + log_trans
        m = x.max(0)
        alpha = m + np.log(np.exp(x - m).sum(0)) + e[t]
    m = alpha.max()
    return float(-(m + np.log(np.exp(alpha - m).sum())))


def np_ld_loss(programs: tuple[Callable, Callable]) -> Callable:
    model = programs[0]

    def loss(p, ys):
        return -funsor_log_density(enum(config_enumerate(model)), (ys,), {}, p)[0]

    return loss


# --------------------------------------------------------------------------------------------
# Builders: (step, state) of one fresh version
# --------------------------------------------------------------------------------------------


def build_sg(states: int, ys: jax.Array) -> tuple[Step, Any]:
    model, guide = sg_programs(states)
    svi = sg.SVI(model, guide, optax.adam(LR), sg.ELBO())
    return svi.update, svi.init(jax.random.key(2), ys, init_params_=init_params(states))


def build_loss_step(loss: Callable, states: int) -> tuple[Step, Any]:
    """``jax.jit`` of value_and_grad + adam for a loss ``loss(params, ys)``."""
    opt = optax.adam(LR)

    @jax.jit
    def step(state, ys):
        params, opt_state = state
        value, grads = jax.value_and_grad(loss)(params, ys)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    params = init_params(states)
    return step, (params, opt.init(params))


def build_np_svi(programs: Callable, states: int, ys: jax.Array) -> tuple[Step, Any]:
    model, guide = programs(states)
    svi = numpyro.infer.SVI(model, guide, optax.adam(LR),
                            numpyro.infer.TraceEnum_ELBO(max_plate_nesting=0))
    state = svi.init(jax.random.key(2), ys, init_params=init_params(states))
    return jax.jit(svi.update), state


BUILDERS: dict[str, Callable[[int, jax.Array], tuple[Step, Any]]] = {
    "scgjax": build_sg,
    "hand": lambda s, ys: build_loss_step(hand_loss, s),
    "numpyro": lambda s, ys: build_np_svi(np_scan_programs, s, ys),
    "numpyro_ld": lambda s, ys: build_loss_step(np_ld_loss(np_scan_programs(s)), s),
    "np_loop": lambda s, ys: build_np_svi(np_loop_programs, s, ys),
}


def loss_functions(states: int) -> dict[str, Callable]:
    """``loss(params, ys)`` of each version (for the gradient check)."""
    sg_model, sg_guide = sg_programs(states)
    np_model, np_guide = np_scan_programs(states)
    loop_model, loop_guide = np_loop_programs(states)
    tenum = numpyro.infer.TraceEnum_ELBO(max_plate_nesting=0)
    key = jax.random.key(0)
    return {
        "scgjax": lambda p, ys: sg.ELBO().loss(key, p, sg_model, sg_guide, ys),
        "hand": hand_loss,
        "numpyro": lambda p, ys: tenum.loss(key, p, np_model, np_guide, ys),
        "numpyro_ld": np_ld_loss((np_model, np_guide)),
        "np_loop": lambda p, ys: tenum.loss(key, p, loop_model, loop_guide, ys),
    }


# --------------------------------------------------------------------------------------------
# Diagnostics: scgjax's path written by hand, piece by piece
# --------------------------------------------------------------------------------------------


def model_step(p: dict, prev: jax.Array, z: jax.Array, y: jax.Array) -> jax.Array:
    """The model's step as a black box: ``log Categorical(z | logits(prev)) + log N(y |
    locs[z], 1)``, with ``Categorical.log_prob``'s ``log_softmax`` of the logits."""
    logits = jnp.where(prev < 0, p["init"], p["trans"][jnp.maximum(prev, 0)])
    return jax.nn.log_softmax(logits)[z] - 0.5 * (y - p["locs"][z]) ** 2 - 0.5 * LOG_2PI


def forward_tables(table: jax.Array) -> jax.Array:
    """Minus the log-sum over paths of per-step tables ``(T, prev, cur)`` (row 0: any
    ``prev``), the forward scan of ``_collapse_loop``."""
    def step(alpha, t):
        return jax.nn.logsumexp(alpha[:, None] + t, 0), None

    alpha, _ = jax.lax.scan(step, table[0, 0], table[1:])
    return -jax.nn.logsumexp(alpha)


def tables_loss(p: dict, ys: jax.Array) -> jax.Array:
    states = p["init"].shape[0]
    e = emission(p["locs"], ys)
    first = jnp.broadcast_to(jax.nn.log_softmax(p["init"]) + e[0], (states, states))
    rest = jax.nn.log_softmax(p["trans"], -1) + e[1:, None, :]
    return forward_tables(jnp.concatenate([first[None], rest], 0))


def _pair_values(pair: jax.Array, states: int, horizon: int) -> jax.Array:
    """The run at pair ``(a, b)``: the state is ``a`` at even steps and ``b`` at odd ones."""
    a, b = pair // states, pair % states
    return jnp.where(jnp.arange(horizon) % 2 == 0, a, b)


def _swap_even(x: jax.Array) -> jax.Array:
    """``(a, b, T)`` costs of the pair runs -> per-step tables ``(T, prev, cur)``."""
    x = jnp.moveaxis(x, 2, 0)
    even = (jnp.arange(x.shape[0]) % 2 == 0)[:, None, None]
    return jnp.where(even, jnp.swapaxes(x, 1, 2), x)


def pairs_loss(p: dict, ys: jax.Array, unroll: int = 1) -> jax.Array:
    states, horizon = p["init"].shape[0], ys.shape[0]

    def run(pair):
        zs = _pair_values(pair, states, horizon)

        def body(prev, z):  # the model's step: its distributions' parameters, stacked
            logits = jnp.where(prev < 0, p["init"], p["trans"][jnp.maximum(prev, 0)])
            return z, (logits, p["locs"][z])

        _, (logits, loc) = jax.lax.scan(body, jnp.array(-1), zs, unroll=unroll)
        log_prior = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), zs[:, None], -1)[:, 0]
        return log_prior - 0.5 * (ys - loc) ** 2 - 0.5 * LOG_2PI

    x = jax.vmap(run)(jnp.arange(states * states)).reshape(states, states, horizon)
    return forward_tables(_swap_even(x))


def pairs_vec_loss(p: dict, ys: jax.Array) -> jax.Array:
    states, horizon = p["init"].shape[0], ys.shape[0]

    def run(pair):
        zs = _pair_values(pair, states, horizon)
        prev = jnp.concatenate([jnp.array([-1]), zs[:-1]])
        return jax.vmap(model_step, (None, 0, 0, 0))(p, prev, zs, ys)

    x = jax.vmap(run)(jnp.arange(states * states)).reshape(states, states, horizon)
    return forward_tables(_swap_even(x))


def nested_loss(p: dict, ys: jax.Array) -> jax.Array:
    states, horizon = p["init"].shape[0], ys.shape[0]

    def per_prev(a):
        prev = jnp.where(jnp.arange(horizon) == 0, -1, a)  # step 0 has no previous state
        per_cur = lambda b: jax.vmap(model_step, (None, 0, None, 0))(p, prev, b, ys)  # noqa: E731
        return jax.vmap(per_cur)(jnp.arange(states))  # (cur, T)

    x = jax.vmap(per_prev)(jnp.arange(states))  # (prev, cur, T)
    return forward_tables(jnp.moveaxis(x, 2, 0))


def diag_functions(states: int) -> dict[str, Callable]:
    """Jitted ``(params, ys) -> value (and grad)`` of each diagnostic version."""
    model, guide = sg_programs(states)
    key = jax.random.key(0)
    sg_loss = lambda p, ys: sg.ELBO().loss(key, p, model, guide, ys)  # noqa: E731
    vg = lambda f: jax.jit(jax.value_and_grad(f))  # noqa: E731
    return {"scgjax": vg(sg_loss), "scgjax_value": jax.jit(sg_loss), "hand": vg(hand_loss),
            "hand_value": jax.jit(hand_loss), "tables": vg(tables_loss),
            "pairs": vg(pairs_loss),
            "pairs_unroll": vg(lambda p, ys: pairs_loss(p, ys, unroll=8)),
            "pairs_vec": vg(pairs_vec_loss), "nested": vg(nested_loss)}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------



def settings_of(states: list[int], horizons: list[int]) -> list[tuple[int, int]]:
    return [(s, t) for s in states for t in horizons]


def compile_all(settings: list[tuple[int, int]], loop_horizons: list[int], loop_limit: float,
                repeats: int, slow: float, data: dict
                ) -> tuple[dict[tuple[int, int], dict[str, Impl]], dict[int, str]]:
    """Build every version fresh and time its first call, ``repeats`` times, the settings and
    versions interleaved within each repeat. A version whose first call took longer than
    ``slow`` seconds is built once. The Python loop runs at ``loop_horizons`` (per S, in
    increasing T) until a compile exceeds ``loop_limit`` seconds, or would by a linear
    extrapolation from the last one by more than 3x. Returns the builds of the last repeat,
    with every repeat's first-call times, and why the loop stopped (per S)."""
    impls: dict[tuple[int, int], dict[str, Impl]] = {st: {} for st in settings}
    loop_last: dict[int, tuple[int, float]] = {}  # S -> (T, compile s) of the last loop build
    loop_stopped: dict[int, str] = {}
    for r in range(repeats):
        for j, (states, horizon) in enumerate(settings):
            ys = data[states, horizon]
            names = [n for n in NAMES if n != "np_loop" or horizon in loop_horizons]
            if funsor is None:
                names = [n for n in names if n not in NP_NAMES]
            if "np_loop" in names and "np_loop" not in impls[states, horizon]:
                last = loop_last.get(states)
                if states in loop_stopped:
                    names.remove("np_loop")
                elif last is not None and last[1] * horizon / last[0] > 3 * loop_limit:
                    loop_stopped[states] = (f"not run at T >= {horizon:,} (T = {last[0]:,} "
                                            f"compiled in {last[1]:.0f} s)")
                    names.remove("np_loop")
            for i in range(len(names)):
                name = names[(i + r + j) % len(names)]
                old = impls[states, horizon].get(name)
                if old is not None and (old.error or min(old.first_calls) > slow):
                    continue  # slow to compile (or failed): measured once
                t0 = time.perf_counter()
                try:
                    step, state = BUILDERS[name](states, ys)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    impls[states, horizon][name] = Impl(name, None, None,
                                                        error=f"{type(e).__name__}: {e}")
                    continue
                impl = Impl(name, step, state)
                if old is not None:
                    impl.first_calls, impl.first_calls_cpu = old.first_calls, old.first_calls_cpu
                    impl.init_s = old.init_s
                impl.init_s.append(time.perf_counter() - t0)
                try:
                    first_call(impl, ys)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    impl.error = f"{type(e).__name__}: {str(e)[:200]}"
                impls[states, horizon][name] = impl
                if impl.error:
                    print(f"    S={states} T={horizon} {name}: {impl.error}", file=sys.stderr)
                    continue
                print(f"    repeat {r} S={states} T={horizon} {name}: first call "
                      f"{impl.first_calls[-1]:.2f} s, loss {impl.first_loss:.4f}",
                      file=sys.stderr, flush=True)
                if name == "np_loop":
                    loop_last[states] = (horizon, impl.first_calls[0])
                    if impl.first_calls[0] > loop_limit:
                        loop_stopped[states] = (f"not run at T > {horizon:,} (T = {horizon:,} "
                                                f"compiled in {impl.first_calls[0]:.0f} s > "
                                                f"{loop_limit:g} s)")
    return impls, loop_stopped



def summarise(states: int, horizon: int, impls: dict[str, Impl], rounds: int, steps: int,
              exact: float, exact64: float, rtol: float) -> dict:
    row: dict[str, Any] = {"S": states, "T": horizon, "rounds": rounds,
                           "steps_per_round": steps, "exact_neg_loglik": exact,
                           "exact_neg_loglik_float64": exact64}
    ok = {n: i for n, i in impls.items() if not i.error}
    med = {n: statistics.median(i.times) for n, i in ok.items()}
    for n, impl in impls.items():
        if impl.error:
            row[n] = {"error": impl.error}
            continue
        rel = abs(impl.first_loss - exact) / abs(exact)
        row[n] = {"step_s": med[n],
                  "compile_s": statistics.median(impl.first_calls) - med[n],
                  "compile_cpu_s": statistics.median(impl.first_calls_cpu) - med[n],
                  "init_s": statistics.median(impl.init_s),
                  "first_calls_s": impl.first_calls, "first_calls_cpu_s": impl.first_calls_cpu,
                  "round_times_s": impl.times, "loss": impl.first_loss, "loss_rel_err": rel,
                  "loss_rel_err_float64": abs(impl.first_loss - exact64) / abs(exact64),
                  "loss_ok": bool(rel <= rtol)}
    for other in ("hand", "numpyro", "numpyro_ld", "np_loop"):
        if "scgjax" in ok and other in ok:
            row[f"scgjax/{other}"] = med["scgjax"] / med[other]
            row[f"scgjax/{other} paired"] = paired(ok["scgjax"].times, ok[other].times)
    return row


# --------------------------------------------------------------------------------------------
# Checks and diagnostics
# --------------------------------------------------------------------------------------------


def gradient_check(states_list: list[int], horizon: int) -> list[dict]:
    """Each version's loss and gradient at the initial params against the hand-written
    forward algorithm's: ``max |g - g_hand| / max |g_hand|`` per param."""
    out = []
    for states in states_list:
        ys = simulate(horizon, states)
        params = init_params(states)
        fns = loss_functions(states)
        if funsor is None:
            fns = {k: v for k, v in fns.items() if k not in NP_NAMES}
        ref_value, ref_grad = jax.jit(jax.value_and_grad(hand_loss))(params, ys)
        for name, fn in fns.items():
            if name == "hand":
                continue
            try:
                value, grad = jax.jit(jax.value_and_grad(fn))(params, ys)
            except Exception as e:  # noqa: BLE001 - reported in the table
                out.append({"S": states, "T": horizon, "version": name,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            errs = {k: float(jnp.abs(grad[k] - ref_grad[k]).max() / jnp.abs(ref_grad[k]).max())
                    for k in ref_grad}
            out.append({"S": states, "T": horizon, "version": name, "loss": float(value),
                        "exact": float(ref_value),
                        "loss_rel_err": abs(float(value) - float(ref_value))
                        / abs(float(ref_value)),
                        "grad_rel_err": errs})
    return out



def diagnostics(states_list: list[int], horizons: list[int], rounds: int, round_s: float
                ) -> list[dict]:
    """``value_and_grad`` (and value) of scgjax's loss and of the hand-written pieces of its
    path: per-call time (interleaved rounds), the values, the compiled programs' structure."""
    out = []
    for horizon in horizons:
        for states in states_list:
            ys = simulate(horizon, states)
            params = init_params(states)
            fns = diag_functions(states)
            res: dict[str, dict] = {}
            for name, fn in fns.items():
                t0 = time.perf_counter()
                value = jax.block_until_ready(fn(params, ys))
                first = time.perf_counter() - t0
                value = value[0] if isinstance(value, tuple) else value
                jaxpr = jax.make_jaxpr(fn)(params, ys).jaxpr
                prims = primitive_counts(jaxpr)
                compiled = fn.lower(params, ys).compile()
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                res[name] = {"value": float(value), "first_call_s": first, "times": [],
                             "jaxpr_eqns": sum(prims.values()), "scan": prims.get("scan", 0),
                             "hlo_while": compiled.as_text().count(" while("),
                             "kflop": cost.get("flops", 0.0) / 1e3,
                             "kbytes": cost.get("bytes accessed", 0.0) / 1e3}
            names = list(fns)
            slowest = max(min(call_round(fns[n], (params, ys), 2) for _ in range(3))
                          for n in names)
            steps = int(min(200, max(2, round(round_s / slowest))))
            for n in names:
                call_round(fns[n], (params, ys), steps)
            for r in range(rounds):
                for i in range(len(names)):
                    n = names[(i + r) % len(names)]
                    res[n]["times"].append(call_round(fns[n], (params, ys), steps))
            for n in names:
                res[n]["call_s"] = statistics.median(res[n]["times"])
                res[n]["vs_scgjax paired"] = paired(res[n]["times"], res["scgjax"]["times"])
                res[n]["vs_hand paired"] = paired(res[n]["times"], res["hand"]["times"])
            out.append({"S": states, "T": horizon, "rounds": rounds, "steps_per_round": steps,
                        "exact": float(hand_loss(params, ys)), "versions": res})
            print(f"  diagnostics S={states} T={horizon} done", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

FMT = "{:.2f} [{:.2f}-{:.2f}]"


def _ms(row: dict, name: str, key: str = "step_s", scale: float = 1e3, digits: int = 3
        ) -> str:
    v = row.get(name)
    if v is None:
        return NOT_RUN
    if "error" in v:
        return "error"
    return f"{scale * v[key]:.{digits}f}"


def loss_table(rows: list[dict], rtol: float) -> str:
    head = ["S", "T", "-log p(y), float64", "hand (float32) rel. err. vs float64"]
    head += [f"{n} rel. err." for n in NAMES if n != "hand"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["S"]), f"{row['T']:,}", f"{row['exact_neg_loglik_float64']:.4f}",
                 f"{row['hand']['loss_rel_err_float64']:.1e}"]
        for n in NAMES:
            if n == "hand":
                continue
            v = row.get(n)
            if v is None:
                cells.append(NOT_RUN)
            elif "error" in v:
                cells.append(f"error: {v['error'][:80]}")
            else:
                flag = "ok" if v["loss_ok"] else f"**WRONG** (loss {v['loss']:.2f})"
                cells.append(f"{v['loss_rel_err']:.1e} {flag}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def step_table(rows: list[dict]) -> str:
    head = ["S", "T", "rounds x steps"] + [f"{n} ms" for n in NAMES]
    head += ["scgjax/hand", "paired [IQR]", "scgjax/numpyro_ld", "paired [IQR]",
             "scgjax/numpyro (wrong loss)", "scgjax/np_loop"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["S"]), f"{row['T']:,}", f"{row['rounds']} x {row['steps_per_round']}"]
        cells += [_ms(row, n) for n in NAMES]
        for other, with_paired in (("hand", True), ("numpyro_ld", True), ("numpyro", False),
                                   ("np_loop", False)):
            key = f"scgjax/{other}"
            if key not in row:
                cells += [NOT_RUN] * (2 if with_paired else 1)
                continue
            cells.append(f"{row[key]:.2f}")
            if with_paired:
                cells.append(FMT.format(*row[key + " paired"]))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def compile_table(rows: list[dict]) -> str:
    head = ["S", "T"] + [f"{n} s" for n in NAMES]
    head += ["scgjax / scgjax at smallest T", "per-repeat [IQR]", "CPU: same", "scgjax/hand",
             "scgjax/numpyro_ld", "scgjax init s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first: dict[int, dict] = {}
    for row in rows:
        first.setdefault(row["S"], row)
        f = first[row["S"]]["scgjax"]
        c = row["scgjax"]
        cells = [str(row["S"]), f"{row['T']:,}"]
        cells += [_ms(row, n, "compile_s", 1.0, 2) for n in NAMES]
        cells += [f"{c['compile_s'] / f['compile_s']:.2f}", FMT.format(*per_repeat(c, f)),
                  f"{c['compile_cpu_s'] / f['compile_cpu_s']:.2f}",
                  f"{c['compile_s'] / row['hand']['compile_s']:.2f}",
                  (f"{c['compile_s'] / row['numpyro_ld']['compile_s']:.2f}"
                   if "numpyro_ld" in row and "error" not in row["numpyro_ld"] else NOT_RUN),
                  f"{c['init_s']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)



def gradient_table(results: list[dict]) -> str:
    head = ["S", "T", "version", "loss", "exact", "loss rel. err.", "grad rel. err. (trans, init, "
            "locs)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            out.append(f"| {r['S']} | {r['T']} | {LABELS[r['version']]} | error: "
                       f"{r['error'][:100]} | | | |")
            continue
        g = r["grad_rel_err"]
        out.append(f"| {r['S']} | {r['T']} | {LABELS[r['version']]} | {r['loss']:.4f} | "
                   f"{r['exact']:.4f} | {r['loss_rel_err']:.1e} | "
                   f"{g['trans']:.1e}, {g['init']:.1e}, {g['locs']:.1e} |")
    return "\n".join(out)


def diag_table(results: list[dict]) -> str:
    head = ["S", "T", "version", "ms per call", "/ hand, paired [IQR]", "/ scgjax, paired [IQR]",
            "value", "jaxpr eqns", "scan", "HLO while", "kFLOP", "kB accessed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for name, v in r["versions"].items():
            out.append(f"| {r['S']} | {r['T']:,} | {DIAG_LABELS[name]} | {1e3 * v['call_s']:.3f} | "
                       f"{FMT.format(*v['vs_hand paired'])} | "
                       f"{FMT.format(*v['vs_scgjax paired'])} | {v['value']:.3f} | "
                       f"{v['jaxpr_eqns']} | {v['scan']} | {v['hlo_while']} | "
                       f"{v['kflop']:.0f} | {v['kbytes']:.0f} |")
    return "\n".join(out)


def verdict(rows: list[dict], main_horizons: list[int], step_target: float,
            compile_target: float) -> list[str]:
    lines = []
    main = [r for r in rows if r["T"] in main_horizons] or rows
    ratios = ", ".join(f"{r['scgjax/hand']:.2f} (S={r['S']}, T={r['T']:,})" for r in main)
    met = all(r["scgjax/hand"] <= step_target for r in main)
    lines.append(f"- Step, scgjax / hand-written (medians): {ratios}; target <= "
                 f"{step_target}x: {'met' if met else 'NOT met'}.")
    if all("scgjax/numpyro_ld" in r for r in main):
        ratios = ", ".join(f"{r['scgjax/numpyro_ld']:.2f}" for r in main)
        met = all(r["scgjax/numpyro_ld"] <= 1.0 for r in main)
        lines.append(f"- Step, scgjax / NumPyro's exact sum (scan + funsor log_density): "
                     f"{ratios}; target <= 1 (not slower): {'met' if met else 'NOT met'}.")
    if all("scgjax/numpyro" in r for r in main):
        ratios = ", ".join(f"{r['scgjax/numpyro']:.2f}" for r in main)
        lines.append(f"- Step, scgjax / NumPyro scan + TraceEnum_ELBO (which computes a "
                     f"different, wrong loss): {ratios}.")
    by_s: dict[int, list[dict]] = {}
    for r in rows:
        by_s.setdefault(r["S"], []).append(r)
    for states, rs in by_s.items():
        lo, hi = rs[0], rs[-1]
        wall = hi["scgjax"]["compile_s"] / lo["scgjax"]["compile_s"]
        cpu = hi["scgjax"]["compile_cpu_s"] / lo["scgjax"]["compile_cpu_s"]
        lines.append(f"- Compile, S = {states}: scgjax at T = {hi['T']:,} takes {wall:.2f}x "
                     f"(wall; {cpu:.2f}x process CPU) its compile at T = {lo['T']:,} "
                     f"({hi['scgjax']['compile_s']:.2f} s vs {lo['scgjax']['compile_s']:.2f} s); "
                     f"flat (<= {compile_target}x): "
                     f"{'met' if max(wall, cpu) <= compile_target else 'NOT met'}.")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--states", type=int, nargs="+", default=[3, 10], help="S (3 10)")
    p.add_argument("--horizons", type=int, nargs="+", default=[100, 1000, 10_000],
                   help="horizons T of the comparison (100 1000 10000)")
    p.add_argument("--loop-horizons", type=int, nargs="*", default=[10, 30, 100, 300],
                   help="horizons at which NumPyro's Python loop runs too; the others run "
                        "there as well (10 30 100 300)")
    p.add_argument("--loop-limit", type=float, default=60.0,
                   help="stop the loop once a compile took longer, or would by extrapolation "
                        "by 3x (60 s)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (20)")
    p.add_argument("--round-seconds", type=float, default=0.05,
                   help="target length of a round of the slowest version (0.05 s)")
    p.add_argument("--max-steps", type=int, default=200, help="most steps per round (200)")
    p.add_argument("--compile-repeats", type=int, default=3,
                   help="fresh builds whose first call is timed (3)")
    p.add_argument("--slow-compile", type=float, default=10.0,
                   help="a version whose compile took longer is built once (10 s)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="loss check: relative tolerance against the hand-written forward "
                        "algorithm (1e-4)")
    p.add_argument("--check-horizon", type=int, default=30, help="T of the gradient check (30)")
    p.add_argument("--diag-horizons", type=int, nargs="*", default=[1000],
                   help="T of the diagnostics (1000)")
    p.add_argument("--diag-rounds", type=int, default=15, help="rounds of the diagnostics (15)")
    p.add_argument("--skip", nargs="*", default=[], choices=["timing", "gradients", "diag"])
    p.add_argument("--step-target", type=float, default=1.10)
    p.add_argument("--compile-target", type=float, default=1.5)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: S = 3, T in 10 1000, loop at T = 10, 3 rounds (< 1 min)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the markdown report here (and the JSON next to it); default "
                        "bench/results/hmm.md for a full run, nothing for --quick or --skip")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.states, args.horizons, args.loop_horizons = [3], [1000], [10]
        args.rounds, args.compile_repeats, args.round_seconds = 3, 1, 0.02
        args.check_horizon, args.diag_horizons, args.diag_rounds = 10, [1000], 3
    elif args.out is None and not args.skip:  # a partial run does not replace the results
        args.out = HERE / "results" / "hmm.md"
    info = machine_info(numpyro=numpyro.__version__) + f", {FUNSOR}"
    print(info, flush=True)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    horizons = sorted(set(args.horizons) | set(args.loop_horizons))
    settings = settings_of(args.states, horizons)
    rows: list[dict] = []
    loop_stopped: dict = {}
    if "timing" not in args.skip:
        data = {(s, t): simulate(t, s) for s, t in settings}
        t0 = time.perf_counter()
        builds, loop_stopped = compile_all(settings, args.loop_horizons, args.loop_limit,
                                           args.compile_repeats, args.slow_compile, data)
        print(f"  compile done in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
        for states, horizon in settings:
            t0 = time.perf_counter()
            ys = data[states, horizon]
            impls = builds[states, horizon]
            steps = time_interleaved(impls, NAMES, ys, args.rounds, args.round_seconds,
                                     args.max_steps)
            exact = float(jax.jit(hand_loss)(init_params(states), ys))
            rows.append(summarise(states, horizon, impls, args.rounds, steps, exact,
                                  exact_float64(init_params(states), ys), args.rtol))
            print(f"  S={states} T={horizon} timed in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
    grads = None
    if "gradients" not in args.skip:
        t0 = time.perf_counter()
        grads = gradient_check(args.states, args.check_horizon)
        print(f"  gradient check done in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
    diag = None
    if "diag" not in args.skip and args.diag_horizons:
        diag = diagnostics(args.states, args.diag_horizons, args.diag_rounds, args.round_seconds)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    lines = [
        f"Machine: {info}. CPU only (no GPU was lent to this run).",
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"the run took {elapsed:.0f} s.",
        "",
        "Model: HMM with S states, Gaussian emissions N(locs[z_t], 1), params trans (S x S "
        "logits), init (S logits), locs (S); one simulated sequence of length T; empty guide, "
        "so the loss is -log p(y_{1:T}); adam(1e-2). Versions: "
        + "; ".join(f"{n} = {LABELS[n]}" for n in NAMES) + ".",
    ]
    if rows:
        lines += [
            "",
            "## Loss check",
            "",
            "Each version's loss at the initial params (its first step's) against the "
            f"hand-written forward algorithm (float32): relative error, ok if <= {args.rtol:g}.",
            "",
            loss_table(rows, args.rtol),
            "",
            "## Step time",
            "",
            "Median per-step wall time (ms) over interleaved rounds (one warm-up round "
            "each). Ratios: of the medians; 'paired': median [IQR] of the per-round ratios. "
            f"np_loop runs at T in {args.loop_horizons} only"
            + (": " + "; ".join(f"S = {s}: {note}" for s, note in loop_stopped.items())
               if loop_stopped else "") + ".",
            "",
            step_table(rows),
            "",
            "## Compile time",
            "",
            "First call of a fresh build minus the steady-state step (wall s), median of "
            f"{args.compile_repeats} builds (one for a version slower than "
            f"{args.slow_compile:g} s), the settings and versions interleaved within each "
            "repeat; scgjax's includes tracing and its graph analysis. 'per-repeat': median "
            "[IQR] of scgjax's ratio to the smallest T within each repeat; 'CPU': the ratio from "
            "the process CPU time of the first call. 'init': building the SVI state "
            "(`svi.init`, which runs the program once un-jitted to check the data).",
            "",
            compile_table(rows),
            "",
            "## Targets",
            "",
            *verdict(rows, args.horizons, args.step_target, args.compile_target),
        ]
    if grads:
        lines += [
            "",
            f"## Gradient check (T = {args.check_horizon})",
            "",
            "Loss and gradient at the initial params against the hand-written forward "
            "algorithm's: max |g - g_hand| / max |g_hand| per param.",
            "",
            gradient_table(grads),
        ]
    if diag:
        lines += [
            "",
            "## Diagnostics: where scgjax's time goes",
            "",
            "value_and_grad only (no optimiser), jitted, per call; interleaved rounds; "
            "the compiled programs' jaxpr equations, scans, HLO while loops and XLA cost "
            "analysis.",
            "",
            diag_table(diag),
        ]
    text = "\n".join(lines)
    print(text)
    result = {"machine": info, "seconds": elapsed,
              "load_average_1min": [load_before[0], load_after[0]],
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "timing": rows, "loop_stopped": loop_stopped, "gradients": grads,
              "diagnostics": diag}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        with open(args.out.with_suffix(".json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.out} and its .json", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
