"""Per-call cost of ``svi.update`` against a hand-written jitted JAX/optax step.

The model is tiny so that the step is dominated by dispatch (Python work around the compiled
program), not by computation: ``z ~ Normal(0, 1)``, ``x[n] ~ Normal(z, 1)`` in a plate of
``B = 50`` observations, and a mean-field guide ``z ~ Normal(m, s)`` (``s`` positive, stored
as ``log s``), trained with ``sg.ELBO(num_particles=1)`` (pathwise) and ``optax.adam``.

Three steps are timed:

- ``svi.update``: ``state, loss = svi.update(state, x)`` (the public API);
- ``core``: the jitted function behind ``svi.update`` called directly (reads the private
  ``SVI._jitted`` cache; the dispatch of ``svi.update`` is what lies between the two);
- ``hand``: the same ELBO step written by hand: ``z = m + exp(log_s) * eps``, the log-densities
  of ``jax.scipy.stats.norm``, ``jax.value_and_grad``, ``optax.adam``, one ``jax.jit``, over
  the same state layout (params, optimiser state, estimator state, key).

Last, ``svi.update``'s own work is timed with its jitted step replaced by a stub that returns
at once (pure Python, so robust to a busy machine): the dispatch cost on top of ``core``.

Each is called ``--warmup`` times, then ``--calls`` calls are timed (``timeit``, each repeat
ending with ``block_until_ready``), ``--repeats`` times interleaved; the table shows the best
repeat's microseconds per call, wall-clock and CPU time of the process (all threads), and
the ratios to ``hand``.

Run: ``python bench/bench_dispatch.py`` (about 10 s), ``--calls 500`` for a quick look.
On a loaded machine the best of many repeats is the number to trust.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.scipy.stats import norm

import scgjax as sg
from scgjax import dist

LR = 1e-2


def model(x: jax.Array) -> None:
    z = sg.sample("z", dist.Normal(0.0, 1.0))
    with sg.plate("data", x.shape[0]):
        sg.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x: jax.Array) -> None:
    m = sg.param("m", 0.0)
    s = sg.param("s", 1.0, dist.constraints.positive)
    sg.sample("z", dist.Normal(m, s))


def hand_step() -> tuple[Callable, Any]:
    """The same step written by hand: one ``jax.jit`` of loss, gradient and Adam update."""
    optimizer = optax.adam(LR)
    params = {"m": jnp.array(0.0), "s": jnp.array(0.0)}  # s: unconstrained (log)

    def loss_fn(params: dict, key: jax.Array, x: jax.Array) -> jax.Array:
        scale = jnp.exp(params["s"])
        z = params["m"] + scale * jax.random.normal(key)
        log_joint = norm.logpdf(z, 0.0, 1.0) + norm.logpdf(x, z, 1.0).sum()
        return -(log_joint - norm.logpdf(z, params["m"], scale))

    @jax.jit
    def step(state: tuple, x: jax.Array) -> tuple[tuple, jax.Array]:
        params, opt_state, est_state, key = state
        key, step_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, step_key, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, est_state, key), loss

    return step, (params, optimizer.init(params), {}, jax.random.key(0))


def time_step(step: Callable, state: Any, x: jax.Array, calls: int, warmup: int
              ) -> Callable[[], tuple[float, float]]:
    """A function that times ``calls`` calls of ``state, loss = step(state, x)`` (after
    ``warmup`` calls) and returns microseconds per call: wall-clock time and the process's
    CPU time (all its threads; less sensitive to other processes on a busy machine)."""
    holder = [state]

    def run(n: int) -> None:
        s = holder[0]
        for _ in range(n):
            s, loss = step(s, x)
        jax.block_until_ready((s, loss))
        holder[0] = s

    run(warmup)

    def once() -> tuple[float, float]:
        cpu = time.process_time()
        wall = timeit.timeit(lambda: run(calls), number=1)
        return 1e6 * wall / calls, 1e6 * (time.process_time() - cpu) / calls

    return once


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=50, help="B (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per repeat")
    parser.add_argument("--warmup", type=int, default=200, help="calls before timing")
    parser.add_argument("--repeats", type=int, default=15,
                        help="repeats, interleaved (the best one is shown)")
    args = parser.parse_args(argv)

    x = jax.random.normal(jax.random.key(1), (args.batch_size,)) + 1.0
    svi = sg.SVI(model, guide, optax.adam(LR), sg.ELBO(num_particles=1))
    state = svi.init(jax.random.key(0), x)
    svi.update(state, x)  # fills svi._jitted
    (core,) = svi._jitted.values()

    def core_step(s: sg.SVIState, xb: jax.Array) -> tuple[sg.SVIState, jax.Array]:
        new, metrics = core(s, [xb])
        return new, metrics["loss"]

    hand, hand_state = hand_step()
    timers = {"svi.update": time_step(svi.update, state, x, args.calls, args.warmup),
              "core": time_step(core_step, state, x, args.calls, args.warmup),
              "hand": time_step(hand, hand_state, x, args.calls, args.warmup)}
    best = {name: (float("inf"), float("inf")) for name in timers}
    for _ in range(args.repeats):  # interleaved, so that load changes hit all alike
        for name, timer in timers.items():
            wall, cpu = timer()
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    print(f"B={args.batch_size}, K=1, {args.calls} calls x {args.repeats} repeats "
          f"(best), jax {jax.__version__} on {jax.default_backend()}")
    print(f"{'step':12} {'us/call':>8} {'vs hand':>8} {'CPU us':>8} {'vs hand':>8}")
    hand_wall, hand_cpu = best["hand"]
    for name, (wall, cpu) in best.items():
        print(f"{name:12} {wall:8.1f} {wall / hand_wall:7.2f}x {cpu:8.1f} "
              f"{cpu / hand_cpu:7.2f}x")
    stub = dispatch_overhead(x, args.calls)
    print(f"svi.update's own work (its jitted step replaced by a stub): {stub:.2f} us/call")
    best["dispatch"] = (stub, stub)
    return best


def dispatch_overhead(x: jax.Array, calls: int, repeats: int = 15) -> float:
    """Microseconds per ``svi.update(state, x)`` call spent outside the jitted step: the
    cached steps (private ``SVI._jitted`` and, where it exists, ``SVI._by_types``) are
    replaced by a Python function that returns at once. Pure Python work, so the best of
    ``repeats`` is robust to a busy machine."""
    svi = sg.SVI(model, guide, optax.adam(LR), sg.ELBO(num_particles=1))
    state = svi.init(jax.random.key(0), x)
    svi.update(state, x)

    def stub(s: Any, arrays: list) -> tuple[Any, dict]:
        return s, {"loss": 0.0}

    for cache in (svi._jitted, getattr(svi, "_by_types", {})):
        for key in cache:
            cache[key] = stub
    n = 10 * calls
    return 1e6 * min(timeit.repeat(lambda: svi.update(state, x), number=n, repeat=repeats)) / n


if __name__ == "__main__":
    main()
