"""Benchmark DReG: the step time of ``sg.DReG()`` under ``sg.IWAE`` and ``sg.RWS`` against plain
IWAE and against the same estimators written by hand in JAX.

Issue 12's benchmark: step time per method relative to plain IWAE, target at most 1.3x. One
training step (``value_and_grad`` of the loss, then ``optax.adam(1e-3)``, one ``jax.jit``) of
the IWAE example's Gaussian VAE (``examples/iwae_mnist.py``: Burda et al.'s two hidden tanh
layers of 200 units, 50 latents, Bernoulli pixels) on a fixed random binary batch ``(B, 784)``
(the step's cost does not depend on the pixels' values), in six versions:

- ``iwae``: ``sg.SVI(model, guide, adam, sg.IWAE(K)).update``, pathwise through ``z_k``;
- ``iwae_dreg``: the same with the guide's site ``z`` given ``sg.DReG()``
  (``assign_estimators``), the doubly reparameterised gradient of the same bound;
- ``rws_dreg``: ``sg.RWS(K)`` with ``sg.DReG()`` on ``z`` (wake-theta, and wake-phi through
  ``z``'s value with coefficients ``w^_k - w^_k^2``);
- ``hand_iwae``: IWAE in plain JAX: ``z = mu + sigma * eps`` for ``eps`` of shape ``(K, B,
  50)``, ``log w`` per particle and image, minus the sum over images of ``logsumexp_k log w -
  log K``;
- ``hand_dreg``: IWAE-DReG as it is usually written (Tucker et al. 2019's code): the
  decoder's gradient from ``sum_k w^_k log w_k`` at stopped ``z`` and ``q``, the encoder's from
  ``sum_k stop(w^_k^2) log w_k`` with the decoder's params and ``q``'s parameters stopped and
  ``z``'s path kept;
- ``hand_rws_dreg``: the same with the encoder's coefficients ``w^_k - w^_k^2``.

The hand-written versions draw their own noise (one ``jax.random.normal`` of shape ``(K, B,
50)`` per step); their params are initialised by flax with the same shapes as scgjax's.

Measured per K: each version built and called once (its first call includes compilation),
one warm-up round, then ``--rounds`` interleaved round-robin rounds (the order rotates every
round; each round runs ``steps`` steps back to back, ``steps`` set so that a round of the
slowest version takes about ``--round-seconds``); the median per-step time and the paired
ratios (median [IQR] of the ratios of rounds run next to each other) against ``iwae`` and
of each scgjax version against its hand-written counterpart.

Run: ``python bench/bench_dreg.py [--particles 5 50] [--batch-size 100] [--rounds 15]
[--out bench/results/dreg.md]``; the default run takes about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import machine_info
from _timing import Impl, first_call, paired, time_interleaved

import scgjax as sg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import iwae_mnist  # noqa: E402

LATENT = 50
HIDDEN = 200
PIXELS = iwae_mnist.NUM_PIXELS
#: (name, what it is compared with) of the versions, in the table's order
VERSIONS = (("iwae", None), ("iwae_dreg", "hand_dreg"), ("rws_dreg", "hand_rws_dreg"),
            ("hand_iwae", None), ("hand_dreg", None), ("hand_rws_dreg", None))
METHOD = {"iwae": "iwae", "iwae_dreg": "iwae-dreg", "rws_dreg": "rws-dreg"}


def build_sg(name: str, k: int, x: jax.Array) -> tuple[Callable, Any]:
    """``svi.update`` and the initial state of the scgjax version ``name``."""
    model, guide = iwae_mnist.build(LATENT, HIDDEN)
    objective, train_guide = iwae_mnist.objective_and_guide(METHOD[name], k, guide)
    svi = sg.SVI(model, train_guide, optax.adam(1e-3), objective)
    return (lambda state, data: svi.update(state, data)), svi.init(jax.random.key(0), x)


def log_weights(enc: dict, dec: dict, x: jax.Array, eps: jax.Array, *, stop_z: bool = False,
                stop_q: bool = False) -> jax.Array:
    """``log w`` of the ``K`` particles ``(K, B)``: ``log p(x | z) + log N(z; 0, 1) - log q(z
    | x)`` with ``z = mu + sigma * eps``; ``stop_z`` stops ``z``'s path, ``stop_q`` the
    parameters of ``q``'s density (not the path)."""
    loc, scale = iwae_mnist.Encoder(LATENT, HIDDEN).apply(enc, x)
    z = loc + scale * eps
    if stop_z:
        z = jax.lax.stop_gradient(z)
    if stop_q:
        loc, scale = jax.lax.stop_gradient((loc, scale))
    logits = iwae_mnist.Decoder(HIDDEN).apply(dec, z)
    log_lik = jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)
    log_prior = jnp.sum(-0.5 * z**2 - 0.5 * math.log(2 * math.pi), axis=-1)
    log_q = jnp.sum(-0.5 * ((z - loc) / scale) ** 2 - jnp.log(scale)
                    - 0.5 * math.log(2 * math.pi), axis=-1)
    return log_lik + log_prior - log_q


def hand_loss(kind: str, params: dict, key: jax.Array, x: jax.Array, k: int) -> jax.Array:
    """Minus the ``K``-sample bound summed over the images, with the gradient of ``kind``."""
    eps = jax.random.normal(key, (k, x.shape[0], LATENT))
    enc, dec = params["encoder"], params["decoder"]
    if kind == "hand_iwae":
        log_w = log_weights(enc, dec, x, eps)
        return -jnp.sum(jax.nn.logsumexp(log_w, axis=0) - math.log(k))
    # the decoder: sum_k w^_k d log w_k / d theta at stopped z (and q's parameters stopped:
    # the encoder's gradient comes from the path term only)
    log_w = log_weights(enc, dec, x, eps, stop_z=True, stop_q=True)
    weights = jax.lax.stop_gradient(jax.nn.softmax(log_w, axis=0))
    bound = jnp.sum(jax.nn.logsumexp(log_w, axis=0) - math.log(k))
    theta = jnp.sum(weights * log_w)
    # the encoder: through z's path only, q's density at stopped parameters
    path = log_weights(enc, jax.lax.stop_gradient(dec), x, eps, stop_q=True)
    coef = weights**2 if kind == "hand_dreg" else weights - weights**2
    phi = jnp.sum(coef * path)
    surrogate = theta + phi
    return -(jax.lax.stop_gradient(bound) + surrogate - jax.lax.stop_gradient(surrogate))


def formula_check(x: jax.Array, k: int = 5) -> float:
    """The hand-written DReG's gradient against DReG's formula, ``-sum_k w^_k^2 (d log w_k /
    d z_k) dz_k/dphi`` for the encoder and ``-sum_k w^_k d log w_k / d theta`` for the decoder,
    on one draw: the largest absolute difference."""
    params = init_hand(x)
    key = jax.random.key(9)
    grads = jax.grad(lambda p: hand_loss("hand_dreg", p, key, x, k))(params)
    eps = jax.random.normal(key, (k, x.shape[0], LATENT))
    encoder, decoder = iwae_mnist.Encoder(LATENT, HIDDEN), iwae_mnist.Decoder(HIDDEN)

    def log_w(z, dec, loc, scale):
        logits = decoder.apply(dec, z)
        return (jnp.sum(x * logits - jax.nn.softplus(logits), -1)
                + jnp.sum(-0.5 * z**2, -1) + jnp.sum(0.5 * ((z - loc) / scale) ** 2
                                                     + jnp.log(scale), -1))

    loc, scale = encoder.apply(params["encoder"], x)
    z = loc + scale * eps
    w = jax.nn.softmax(log_w(z, params["decoder"], loc, scale), axis=0)
    dz = jax.grad(lambda z: jnp.sum(w**2 * log_w(z, params["decoder"], loc, scale)))(z)
    enc = jax.grad(lambda e: jnp.sum(dz * (lambda ls: ls[0] + ls[1] * eps)(
        encoder.apply(e, x))))(params["encoder"])
    dec = jax.grad(lambda d: jnp.sum(w * log_w(z, d, loc, scale)))(params["decoder"])
    return max(float(jnp.max(jnp.abs(a + b))) for a, b in zip(
        jax.tree.leaves(grads), jax.tree.leaves({"decoder": dec, "encoder": enc}), strict=True))


def init_hand(x: jax.Array) -> dict:
    """The hand-written versions' params (flax's initialisation, scgjax's shapes)."""
    ke, kd = jax.random.split(jax.random.key(0))
    return {"encoder": iwae_mnist.Encoder(LATENT, HIDDEN).init(ke, x[:1]),
            "decoder": iwae_mnist.Decoder(HIDDEN).init(kd, jnp.zeros((1, LATENT)))}


def build_hand(kind: str, k: int, x: jax.Array) -> tuple[Callable, Any]:
    """The jitted hand-written step of ``kind`` and its initial state."""
    params = init_hand(x)
    opt = optax.adam(1e-3)

    @jax.jit
    def step(state: tuple, data: jax.Array) -> tuple[tuple, jax.Array]:
        params, opt_state, key = state
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(hand_loss, argnums=1)(kind, params, sub, data, k)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    return step, (params, opt.init(params), jax.random.key(1))


def run_k(k: int, x: jax.Array, rounds: int, round_s: float) -> dict[str, Impl]:
    impls: dict[str, Impl] = {}
    for name, _ in VERSIONS:
        step, state = (build_hand if name.startswith("hand") else build_sg)(name, k, x)
        impls[name] = Impl(name, step, state)
        first_call(impls[name], x)
    time_interleaved(impls, [n for n, _ in VERSIONS], x, rounds, round_s, max_steps=200)
    return impls


def table(results: dict[int, dict[str, Impl]], batch: int) -> str:
    lines = [f"B = {batch}; ms per step (median of the rounds); ratios: paired median [IQR].",
             "",
             "| K | version | ms / step | / iwae (paired [IQR]) | / hand-written (paired [IQR]) "
             "| first call s |",
             "|---|---|---|---|---|---|"]
    for k, impls in results.items():
        base = impls["iwae"].times
        for name, counterpart in VERSIONS:
            impl = impls[name]
            to_iwae = "{:.2f} [{:.2f}, {:.2f}]".format(*paired(impl.times, base))
            to_hand = ("{:.2f} [{:.2f}, {:.2f}]".format(*paired(impl.times,
                                                                impls[counterpart].times))
                       if counterpart else "")
            lines.append(f"| {k} | {name} | {1e3 * np.median(impl.times):.2f} | {to_iwae} "
                         f"| {to_hand} | {impl.first_calls[0]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--round-seconds", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    x = (jax.random.uniform(jax.random.key(2016), (args.batch_size, PIXELS)) < 0.3
         ).astype(jnp.float32)
    check = formula_check(x[:4])
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results = {k: run_k(k, x, args.rounds, args.round_seconds) for k in args.particles}
    load_after = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    report = (f"`python bench/bench_dreg.py {' '.join(argv or sys.argv[1:])}`\n\n"
              f"Machine: {machine_info()}. Load average (1, 5, 15 min) before ({load}), "
              f"after ({load_after}).\n\nCheck: the hand-written DReG's gradient against "
              f"DReG's formula (encoder: -sum_k w^2 dlog w/dz dz/dphi; decoder: -sum_k w "
              f"dlog w/dtheta), one draw of K = 5 on 4 images: largest difference {check:.1e}."
              f"\n\n{table(results, args.batch_size)}\n")
    print(report)
    if args.out:
        args.out.write_text("# DReG step time (generated by bench/bench_dreg.py)\n\n" + report)
    return report


if __name__ == "__main__":
    main()
