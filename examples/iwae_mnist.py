"""Importance-weighted autoencoder on MNIST (Burda, Grosse & Salakhutdinov, ICLR 2016).

The model and guide of a Gaussian VAE, for each image ``x`` in {0, 1}^784 (dynamically
binarised) and latent ``z`` in R^d (``--latent-dim``, default 50)::

    p(z)     = N(z | 0, I_d)
    p(x | z) = prod_i Bernoulli(x_i | sigmoid(f_theta(z)_i))       f_theta: d -> 200 -> 200 -> 784
    q(z | x) = N(z | mu_phi(x), diag(sigma_phi(x)^2))     (mu, sigma): 784 -> 200 -> 200 -> 2d

(two tanh hidden layers of ``--hidden`` units, as in the paper), trained on the ``K``-sample
importance-weighted bound

    L_K(x) = E_{z_1..z_K ~ q(z|x)} [ log (1/K) sum_k p(x, z_k) / q(z_k | x) ],

    L_1 = ELBO  <=  L_K  <=  L_{K+1}  <=  log p(x),     L_K -> log p(x) as K -> infinity

(Jensen's inequality applied to the unbiased estimate ``(1/K) sum_k w_k`` of ``p(x)``; a larger
``K`` tolerates a guide that covers the posterior loosely). ``sg.IWAE(num_particles=K)``
computes the bound per image (per element of the data plate) with ``logsumexp``, and its
gradient is pathwise through the reparameterised ``z_k``: the normalised importance weights
``w_k / sum_j w_j`` weight the particles' gradients.

The script trains one model per ``K`` in ``--particles-list`` (default 1, 5, 50: the paper's
comparison; ``K = 1`` is the plain VAE), with the same seed, mini-batches and number of steps,
and then evaluates every model on the same test images, binarised once with a fixed key:

* the test ELBO and the test ``L_K`` at the training ``K``, on the whole test set;
* ``L_5000`` (``--eval-particles``) on the first ``--eval-images`` test images, the paper's
  estimate of ``log p(x)``, by ``sg.log_marginal_likelihood``: the particles go in chunks
  (``lax.map`` over chunks, one jitted function); chunk ``c`` gives the bound ``L^(c)`` of its
  ``C`` particles per image, and ``log (1/K) sum_k w_k = logsumexp_c (L^(c) + log C) - log K``
  combines them exactly, so memory stays bounded for any ``K``.

At fixed parameters the three estimates must be ordered, ``ELBO <= L_K <= L_5000``, up to
Monte Carlo noise; the script checks it on the evaluation images (paired differences and their
standard errors) and prints the result.

Run (with the defaults, 3 minutes of CPU time on a 2-core CPU, most of it the K = 50 model:
its steps cost about 50 times those of K = 1, and each model's L_5000 on 500 images is 2.5
million decoder passes)::

    python examples/iwae_mnist.py                              # K = 1, 5, 50; 1000 steps each
    python examples/iwae_mnist.py --num-particles 5            # one model
    SCGJAX_DATA_DIR=/path/to/mnist python examples/iwae_mnist.py --steps 20000 --out out/iwae

``--method`` picks the gradient: ``iwae`` (the default: pathwise through ``z_k``, IWAE's own
gradient), ``iwae-dreg`` (the guide's site ``z`` with ``sg.DReG()``, the doubly reparameterised
gradient of the same bound, Tucker et al. 2019) or ``rws-dreg`` (``sg.RWS`` with DReG's
wake-phi). ``--snr-keys N`` also measures, at the trained params, the signal-to-noise ratio
``|mean| / std`` over ``N`` keys of the guide's gradient under IWAE and under DReG for every K
of the list (median over the encoder's parameters) and plots it against K (``snr.png``):
Rainforth et al. (ICML 2018) showed that IWAE's falls as K grows (per data point, as
``O(1/sqrt K)``); DReG's does not (``bench/notes/iwae_mnist.md`` has the measured values).

It prints a table (K, training bound over the last 100 steps, test ELBO, test L_K, test
L_5000, ms per training step) and writes ``bounds.png`` (training bound per step, one curve per
K, and the test bounds per K) and ``samples.png`` (prior samples of the model with the best
L_5000) into ``--out`` (default ``out/iwae_mnist``).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import scgjax as sg
from scgjax.data import dynamic_binarize

if __package__:  # imported as examples.iwae_mnist
    from . import _common as common
    from . import vae_mnist
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common
    import vae_mnist

NUM_PIXELS = 784
#: the key that binarises the test images once, the same for every model, K and seed
TEST_BINARIZATION_SEED = 2016
#: images x particles evaluated at once by :func:`evaluate_bounds` (bounds the memory)
EVAL_BATCH = 25_000


class Encoder(nn.Module):
    """``x -> (mu, sigma)``: two hidden tanh layers, then ``2 * latent_dim`` outputs."""

    latent_dim: int
    hidden: int = 200

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.tanh(nn.Dense(self.hidden)(x))
        h = nn.tanh(nn.Dense(self.hidden)(h))
        out = nn.Dense(2 * self.latent_dim)(h)
        loc, raw_scale = jnp.split(out, 2, axis=-1)
        return loc, nn.softplus(raw_scale) + 1e-4


class Decoder(nn.Module):
    """``z -> logits`` of the 784 pixels: two hidden tanh layers."""

    hidden: int = 200

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = nn.tanh(nn.Dense(self.hidden)(z))
        h = nn.tanh(nn.Dense(self.hidden)(h))
        return nn.Dense(NUM_PIXELS)(h)


def build(latent_dim: int = 50, hidden: int = 200) -> tuple[Callable, Callable]:
    """The Gaussian VAE of ``vae_mnist`` (:func:`vae_mnist.gaussian_vae`) with Burda et al.'s
    two-hidden-layer tanh networks, as functions ``(x, num=None)`` of a ``(B, 784)`` batch."""
    return vae_mnist.gaussian_vae(Encoder(latent_dim, hidden), Decoder(hidden), latent_dim)


# --------------------------------------------------------------------------------------------
# Evaluation: L_K per image, for any K, in bounded memory


def particle_chunks(num_particles: int, num_images: int, max_batch: int = EVAL_BATCH
                    ) -> tuple[int, int, int]:
    """``(chunk, full, rest)``: ``K = full * chunk + rest`` particles, evaluated ``chunk`` at a
    time for all ``num_images`` images (at most ``max_batch`` image-particle pairs at once,
    but at least one particle per image), then the ``rest``."""
    chunk = max(1, min(num_particles, max_batch // max(1, num_images)))
    full, rest = divmod(num_particles, chunk)
    return chunk, full, rest


@functools.partial(jax.jit, static_argnames=("model", "guide", "num_particles", "max_batch"))
def evaluate_bounds(model: Callable, guide: Callable, params: dict, xs: jax.Array,
                    rng_key: jax.Array, *, num_particles: int, max_batch: int = EVAL_BATCH
                    ) -> jax.Array:
    """The ``K``-sample bound ``L_K`` of each of the images ``xs`` (``(N, ...)``, binary), as an
    ``(N,)`` array: one draw of ``log (1/K) sum_k p(x_n, z_k) / q(z_k | x_n)`` per image.

    ``model`` and ``guide`` take a batch ``x`` with a ``"data"`` plate over its first axis;
    :func:`sg.log_marginal_likelihood` gives the bound per element of that plate, each image
    with its own particles. The ``K`` particles go in chunks of ``C`` (:func:`particle_chunks`:
    ``C x N`` image-particle pairs at once; ``lax.map`` over the chunks, then one call for a
    remainder chunk), combined exactly: ``L_K = logsumexp_c (L^(c) + log C_c) - log K``.
    ``K = 1`` is the ELBO's one-sample estimate. Jitted; ``model``, ``guide``,
    ``num_particles`` and ``max_batch`` are static.
    """
    chunk, _, _ = particle_chunks(num_particles, xs.shape[0], max_batch)
    return sg.log_marginal_likelihood(rng_key, params, model, guide, xs,
                                      num_particles=num_particles, chunk_size=chunk,
                                      per_element=True)


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    values = np.asarray(values, dtype=np.float64)
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def check_order(elbo: np.ndarray, bound: np.ndarray, bound_eval: np.ndarray, k: int,
                k_eval: int, z: float = 3.0) -> bool:
    """Print and check ``ELBO <= L_K <= L_eval`` on the same images (per-image arrays): each
    mean paired difference must exceed ``-z`` standard errors."""
    ok = True
    parts = []
    for lo, hi, name in ((elbo, bound, f"L_{k} - ELBO"),
                         (bound, bound_eval, f"L_{k_eval} - L_{k}")):
        diff, se = mean_and_se(hi - lo)
        holds = not diff < -z * se  # a difference of exactly 0 (K = 1) holds
        ok &= holds
        parts.append(f"{name} = {diff:+.2f} ± {se:.2f}")
    print(f"  K={k}: {', '.join(parts)} -> {'ok' if ok else 'ORDER VIOLATED'}")
    return ok


# --------------------------------------------------------------------------------------------
# Plots


def plot_bounds(path: Path, results: dict[int, dict], k_eval: int, title: str) -> None:
    """Left: training bound per image against steps (smoothed), one curve per K. Right: the
    test ELBO, test ``L_K`` and test ``L_eval`` of each model."""
    import matplotlib.pyplot as plt  # the backend was chosen by _common

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.0, 4.2),
                                 gridspec_kw={"width_ratios": [3, 2]})
    lows, highs = [], []
    for i, (k, res) in enumerate(results.items()):
        per_step = res["bound_per_step"]
        window = max(1, len(per_step) // 50)
        smoothed = common.smooth(per_step, window)
        ax.plot(np.arange(1, len(per_step) + 1), smoothed, color=f"C{i}", lw=1.4,
                label=f"K={k} (moving average of {window})")
        finite = smoothed[np.isfinite(smoothed)]
        if finite.size > 10:
            lows.append(np.percentile(finite[len(finite) // 20:], 1))
            highs.append(finite.max())
    if lows:  # leave out the first steps' very low values
        lo, hi = min(lows), max(highs)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("step")
    ax.set_ylabel("training bound L_K per image (nats)")
    ax.set_title(f"{title}: training", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)

    ks = list(results)
    xs = np.arange(len(ks))
    series = (("test_elbo", "ELBO (all test images)", "v"),
              ("test_bound", "L_K (all test images)", "o"),
              ("test_bound_eval", f"L_{k_eval} (evaluation images)", "*"))
    for key, label, marker in series:
        bx.plot(xs, [results[k][key] for k in ks], marker=marker, ms=8, lw=1.0, label=label)
    bx.set_xticks(xs, [f"K={k}" for k in ks])
    bx.set_xlim(-0.5, len(ks) - 0.5)
    bx.set_ylabel("test bound per image (nats)")
    bx.set_title(f"{title}: test bounds per trained K", fontsize=10)
    bx.grid(alpha=0.3)
    bx.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The experiment


METHODS = ("iwae", "iwae-dreg", "rws-dreg")


def objective_and_guide(method: str, k: int, guide: Callable) -> tuple[Any, Callable]:
    """The objective and guide of ``--method`` at ``K = k`` (see the module docstring)."""
    if method == "iwae":
        return sg.IWAE(num_particles=k), guide
    dreg_guide = sg.handlers.assign_estimators(guide, {"z": sg.DReG()})
    if method == "iwae-dreg":
        return sg.IWAE(num_particles=k), dreg_guide
    return sg.RWS(num_particles=k), dreg_guide


def guide_snr(model: Callable, guide: Callable, params: dict, x: jax.Array, ks: Sequence[int],
              num_keys: int, key: jax.Array) -> dict[str, list[float]]:
    """Median over the encoder's parameters of ``|mean| / std`` of the IWAE gradient over
    ``num_keys`` keys, per K of ``ks``, with the pathwise (``iwae``) and DReG gradients."""
    out: dict[str, list[float]] = {"iwae": [], "iwae-dreg": []}
    keys = jax.random.split(key, num_keys)
    for method in out:
        for k in ks:
            objective, g = objective_and_guide(method, k, guide)
            grads = jax.lax.map(lambda kk, o=objective, g=g: jax.grad(o.loss, argnums=1)(
                kk, params, model, g, x)["encoder"], keys)
            flat = jnp.concatenate([v.reshape(num_keys, -1) for v in jax.tree.leaves(grads)], 1)
            snr = jnp.abs(flat.mean(0)) / (flat.std(0) + 1e-30)
            out[method].append(float(jnp.median(snr)))
    return out


def plot_snr(path: Path, ks: Sequence[int], snr: dict[str, list[float]]) -> None:
    """The guide's gradient SNR against K, one line per gradient."""
    import matplotlib.pyplot as plt  # the backend was chosen by _common

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, values in snr.items():
        ax.plot(ks, values, "o-", label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (particles)")
    ax.set_ylabel("guide gradient SNR (median)")
    ax.set_title("guide gradient SNR against K", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_particles(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """The K of every model to train: ``--num-particles`` alone, else ``--particles-list``."""
    if args.num_particles is not None:
        return [args.num_particles]
    try:
        ks = [int(k) for k in args.particles_list.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--particles-list must be comma-separated integers, got "
                     f"{args.particles_list!r}")
    if not ks or min(ks) < 1:
        parser.error(f"--particles-list needs positive integers, got {args.particles_list!r}")
    return list(dict.fromkeys(ks))  # unique, in order


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train one IWAE per K with the flags in ``argv`` (see ``--help``) and evaluate them.

    Returns ``results`` (per K: ``train_bound``, ``test_elbo``, ``test_bound``,
    ``test_bound_eval``, ``eval_elbo`` and ``eval_bound`` (ELBO and ``L_K`` on the evaluation
    images), ``order_ok``, ``bound_per_step``, ``seconds_per_step``, ``compile_seconds``,
    ``params``), ``best`` (the K with the highest ``L_eval``), ``paths`` of the PNGs, and the
    settings and data sources.
    """
    parser = common.make_parser("iwae_mnist", __doc__.split("\n")[0], steps=1000,
                                batch_size=100, lr=1e-3)
    parser.add_argument("--particles-list", default="1,5,50",
                        help="train one model per K in this comma-separated list, unless "
                        "--num-particles is given (default: %(default)s)")
    parser.add_argument("--eval-particles", type=int, default=5000,
                        help="particles of the test bound L_K that estimates log p(x) "
                        "(default: %(default)s)")
    parser.add_argument("--eval-images", type=int, default=500,
                        help="first test images the L_eval bound is computed on "
                        "(default: %(default)s)")
    parser.add_argument("--latent-dim", type=int, default=50,
                        help="dimension of z (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=200,
                        help="hidden units per layer (default: %(default)s)")
    parser.add_argument("--method", choices=METHODS, default="iwae",
                        help="the gradient: IWAE's pathwise, DReG under IWAE or under RWS "
                        "(default: %(default)s)")
    parser.add_argument("--snr-keys", type=int, default=0,
                        help="also measure the guide's gradient SNR against K over this many "
                        "keys (0: off; default: %(default)s)")
    args = common.parse(parser, argv)
    if args.snr_keys == 1 or args.snr_keys < 0:
        parser.error("--snr-keys must be 0 (off) or at least 2")
    for flag in ("eval_particles", "eval_images", "latent_dim", "hidden"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer")
    ks = parse_particles(parser, args)
    k_eval = args.eval_particles

    model, guide = build(args.latent_dim, args.hidden)
    print(f"IWAE ({args.method}): latent dim {args.latent_dim}, hidden {args.hidden}x2 tanh, K "
          f"in {ks}, batch "
          f"{args.batch_size}, Adam lr {args.lr}, {args.steps} steps per K")
    key = jax.random.key(args.seed)
    key_batches, key_train, key_eval, key_gen = jax.random.split(key, 4)
    data = common.load_data(args.data_dir)
    print(f"train: {len(data.train)} images from {data.train_source}")
    print(f"test:  {len(data.test)} images from {data.test_source}")
    test = dynamic_binarize(jax.random.key(TEST_BINARIZATION_SEED), data.test)
    n_eval = min(args.eval_images, len(data.test))
    key_elbo, key_bound, key_bound_eval = jax.random.split(key_eval, 3)

    results: dict[int, dict[str, Any]] = {}
    for k in ks:
        print(f"--- K={k}")
        objective, train_guide = objective_and_guide(args.method, k, guide)
        svi = sg.SVI(model, train_guide, optax.adam(args.lr), objective)
        batches = common.Batches(data.train, args.batch_size, key_batches)  # same for every K
        run = common.train(svi, key_train, batches, args.steps, progress=not args.no_progress,
                           batch_size=args.batch_size, label=f"L_{k}")
        bound_per_step = -run.losses / args.batch_size
        train_bound = float(np.mean(bound_per_step[-100:]))
        print(f"{args.steps} steps: first step (compilation) {run.compile_seconds:.2f} s, then "
              f"{1e3 * run.seconds_per_step:.2f} ms/step; train L_{k} (last "
              f"{min(100, args.steps)} steps) {train_bound:.2f} nats/image")

        start = time.perf_counter()
        params = run.params
        elbo = np.asarray(evaluate_bounds(model, guide, params, test, key_elbo,
                                          num_particles=1))
        bound = elbo if k == 1 else np.asarray(
            evaluate_bounds(model, guide, params, test, key_bound, num_particles=k))
        bound_eval = np.asarray(evaluate_bounds(model, guide, params, test[:n_eval],
                                                key_bound_eval, num_particles=k_eval))
        eval_seconds = time.perf_counter() - start
        print(f"test: ELBO {elbo.mean():.2f}, L_{k} {bound.mean():.2f} ({len(test)} images); "
              f"L_{k_eval} {bound_eval.mean():.2f} (first {n_eval}) ({eval_seconds:.1f} s)")
        results[k] = {
            "train_bound": train_bound,
            "test_elbo": float(elbo.mean()),
            "test_bound": float(bound.mean()),
            "test_bound_eval": float(bound_eval.mean()),
            "eval_elbo": float(elbo[:n_eval].mean()),
            "eval_bound": float(bound[:n_eval].mean()),
            "per_image": {"elbo": elbo[:n_eval], "bound": bound[:n_eval],
                          "bound_eval": bound_eval},
            "bound_per_step": bound_per_step,
            "seconds_per_step": run.seconds_per_step,
            "compile_seconds": run.compile_seconds,
            "eval_seconds": eval_seconds,
            "params": params,
        }

    print(f"\nnats per image; train: mean of the last {min(100, args.steps)} steps; test ELBO "
          f"and L_K: all {len(test)} test images; L_{k_eval}: the first {n_eval}")
    header = (f"{'K':>5} | {'train L_K':>9} | {'test ELBO':>9} | {'test L_K':>9} | "
              f"{f'test L_{k_eval}':>11} | {'ms/step':>7}")
    print(header)
    print("-" * len(header))
    for k, res in results.items():
        print(f"{k:>5} | {res['train_bound']:9.2f} | {res['test_elbo']:9.2f} | "
              f"{res['test_bound']:9.2f} | {res['test_bound_eval']:11.2f} | "
              f"{1e3 * res['seconds_per_step']:7.2f}")
    print(f"\nELBO <= L_K <= L_{k_eval} at the same params, on the first {n_eval} test images "
          "(mean paired difference ± standard error):")
    for k, res in results.items():
        per = res["per_image"]
        res["order_ok"] = check_order(per["elbo"], per["bound"], per["bound_eval"], k, k_eval)

    best = max(results, key=lambda k: results[k]["test_bound_eval"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.png" for name in ("bounds", "samples")}
    plot_bounds(paths["bounds"], results, k_eval, "IWAE")
    samples = common.generate_means(model, results[best]["params"], key_gen, 64)
    common.plot_samples(paths["samples"], samples,
                        f"IWAE, K={best} (best L_{k_eval}): samples (Bernoulli means)")
    snr = None
    if args.snr_keys:
        snr = guide_snr(model, guide, results[best]["params"], test[:args.batch_size], ks,
                        args.snr_keys, key_gen)
        paths["snr"] = out / "snr.png"
        plot_snr(paths["snr"], ks, snr)
        print("guide gradient SNR (median over the encoder's parameters) at the params of "
              f"K={best}, over {args.snr_keys} keys:")
        for method, values in snr.items():
            print(f"  {method:>9}: " + ", ".join(f"K={k} {v:.3f}" for k, v in zip(ks, values,
                                                                                 strict=True)))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {
        "method": args.method,
        "snr": snr,
        "results": results,
        "best": best,
        "particles": ks,
        "eval_particles": k_eval,
        "eval_images": n_eval,
        "steps": args.steps,
        "train_source": data.train_source,
        "test_source": data.test_source,
        "paths": paths,
    }


if __name__ == "__main__":
    main()
