"""What the step-time benchmarks share (``bench_scan.py``, ``bench_hmm.py``, ``bench_smc.py``):
one version under test, its first (compiling) call, rounds of steps interleaved round-robin,
paired ratios, and the structure of a compiled program."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.extend.core import jaxprs_in_params

#: a training step: ``step(state, data) -> (state, loss)``
Step = Callable[[Any, Any], tuple[Any, jax.Array]]


@dataclass
class Impl:
    """One version under test at one setting: its step, its state and its timings."""

    name: str
    step: Step
    state: Any
    first_calls: list[float] = field(default_factory=list)  # wall s
    first_calls_cpu: list[float] = field(default_factory=list)  # process CPU s
    init_s: list[float] = field(default_factory=list)  # building (svi.init) s
    times: list[float] = field(default_factory=list)  # mean per-step wall s of each round
    first_loss: float | None = None  # the first call's loss (at the initial state)
    last_loss: float = float("nan")  # the last round's last loss
    error: str | None = None  # why the version could not be built, if it could not


def first_call(impl: Impl, data: Any) -> None:
    """Run the first (tracing + compiling) call; record its wall and process CPU time and
    the loss it returns (at the initial params)."""
    t0, c0 = time.perf_counter(), time.process_time()
    impl.state, loss = impl.step(impl.state, data)
    jax.block_until_ready((impl.state, loss))
    impl.first_calls.append(time.perf_counter() - t0)
    impl.first_calls_cpu.append(time.process_time() - c0)
    impl.first_loss = float(loss)


def run_round(impl: Impl, data: Any, steps: int, record: bool = True) -> float:
    """``steps`` steps back to back; record (and return) the mean per-step wall time."""
    state = impl.state
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = impl.step(state, data)
    jax.block_until_ready((state, loss))
    per_step = (time.perf_counter() - t0) / steps
    if record:
        impl.times.append(per_step)
    impl.state = state
    impl.last_loss = float(loss)
    return per_step


def time_interleaved(impls: dict[str, Impl], names: Sequence[str], data: Any, rounds: int,
                     round_s: float, max_steps: int) -> int:
    """Interleaved round-robin rounds of the versions ``names`` (the order rotates every
    round) after one warm-up round; the steps per round are set so that a round of the
    slowest version takes about ``round_s``. Returns the steps per round."""
    order = [impls[n] for n in names if n in impls and not impls[n].error]
    slowest = max(min(run_round(impl, data, 2, record=False) for _ in range(3))
                  for impl in order)
    steps = int(min(max_steps, max(2, round(round_s / slowest))))
    for impl in order:
        run_round(impl, data, steps, record=False)
    for r in range(rounds):
        for i in range(len(order)):
            run_round(order[(i + r) % len(order)], data, steps)
    return steps


def call_round(fn: Callable, args: tuple, steps: int) -> float:
    """``steps`` calls ``fn(*args)`` back to back; the mean wall time per call."""
    t0 = time.perf_counter()
    for _ in range(steps):
        v = fn(*args)
    jax.block_until_ready(v)
    return (time.perf_counter() - t0) / steps


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Median and quartiles of the ratios ``a / b`` of measurements taken next to each
    other."""
    r = np.asarray(a) / np.asarray(b)
    q1, q2, q3 = np.percentile(r, [25, 50, 75])
    return float(q2), float(q1), float(q3)


def per_repeat(c: dict, f: dict) -> tuple[float, float, float]:
    """Median [IQR] of the ratios of two versions' compile times (first call minus the
    steady-state step) within each repeat."""
    n = min(len(c["first_calls_s"]), len(f["first_calls_s"]))
    r = [(a - c["step_s"]) / (b - f["step_s"])
         for a, b in zip(c["first_calls_s"][:n], f["first_calls_s"][:n], strict=True)]
    q1, q2, q3 = np.percentile(r, [25, 50, 75])
    return float(q2), float(q1), float(q3)


def primitive_counts(jaxpr: Any, counts: dict[str, int] | None = None) -> dict[str, int]:
    """How often each primitive occurs in ``jaxpr`` and (once per call) in its sub-jaxprs."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for sub in jaxprs_in_params(eqn.params):
            primitive_counts(sub, counts)
    return counts
