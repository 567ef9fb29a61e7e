"""Regimes of monthly stock returns: a hidden Markov model, its states summed out in sg.scan.

**The data** are real: the monthly closing prices of AAPL, AMZN, IBM and MSFT from January 2000
to March 2010 (123 months each), the ``stocks`` data set of the Vega visualisation project as
the ``vega_datasets`` package ships it *inside its wheel* (``vega_datasets/_data/stocks.csv``,
read by ``vega_datasets.local_data.stocks()``: no download; ``pip install vega_datasets``, part
of this repository's ``examples`` extra). They are the data of ``examples/state_space.py``; the
file's GOOG starts in August 2004 and is left out by default. The series are the monthly
log-returns ``r_{t,s} = log p_{t+1,s} - log p_{t,s}`` (not centred: each regime has its own
mean): ``T = 122`` months by ``N = 4`` stocks.

**The model** (Hamilton 1989's regime switching): per stock ``s``, a hidden regime ``z_t ∈
{0, .., S-1}`` (``S = --regimes``, default 2) follows a Markov chain, and the month's return is
Normal with the regime's mean and scale::

    z_0 ~ Categorical(π_s)
    z_t ~ Categorical(A_s[z_{t-1}])                t = 1 .. T-1
    r_t ~ Normal(μ_{s, z_t}, σ_{s, z_t})

with the initial distribution ``π_s = softmax(init_logits_s)``, the transition matrix ``A_s``
(row ``i``: ``softmax(trans_logits_s[i])``), the means ``μ_s`` and the scales ``σ_s > 0`` one
set per stock, all ``sg.param`` (point estimates). The stocks are a plate,
``sg.plate("stocks", N)``; time is one ``sg.scan`` over the months whose body samples ``z``,
marked ``infer={"enumerate": "parallel"}``, and observes ``r``. The carry is ``z_{t-1}`` only (a
first-order Markov chain), so the objectives sum ``z`` out by the forward algorithm, O(T S²),
compiled once; the first month reads ``π`` instead of the carry (a flag in ``xs``).

**Training.** The guide is empty (no latent is sampled: every parameter is a point estimate),
so ``sg.ELBO()`` *is* the exact log-likelihood ``log p(r | π, A, μ, σ) = Σ_s log Σ_{z_{0:T-1}}
p(r_s, z)``, and ``sg.SVI`` with Adam (step size ``--lr``, 0.05, cosine-decayed to 5% of it)
for ``--steps`` steps (1500) is maximum-likelihood training by gradient ascent: no EM, no
sampling, no variance. The regimes
start ordered by scale (``σ`` from 0.6 to 1.6 times the stock's standard deviation, jittered by
``--seed``) and are sorted by the learned ``σ`` afterwards (regime 0 the calmest).

**Checks.** At the learned params, ``-sg.ELBO().loss`` must equal a plain-JAX forward algorithm
(:func:`forward_loglik`, no scgjax) to float precision: the example asserts it. The baseline
with one regime (a Normal per stock, fitted in closed form) shows what the regimes add.

**Decoding.** ``sg.infer_discrete`` decodes the summed-out chain from the learned params
(:func:`decode`): ``temperature=0`` gives the most probable path of each stock (Viterbi, from
the forward algorithm's step tables), ``temperature=1`` draws paths from the exact posterior
``p(z_{0:T-1} | r)`` (forward-filter backward-sample; ``--draws`` of them, 500). Both are
checked against plain JAX: the MAP path against :func:`viterbi` (the example asserts that they
agree), the draws' frequency of each regime against the exact smoothed marginals ``p(z_t |
r)`` by forward-backward (:func:`posterior_marginals`; printed as the largest difference in
standard errors).

Results with the defaults (1500 steps, seed 0; about 3 s of training on a shared 2-core CPU;
seeds 1 and 2 end at the same log-likelihood; nats over all 488 returns; BIC = -2 log p +
(free params) log 122, lower is better)::

    regimes                    log p(r)  params     BIC
    1 (a Normal per stock)        334.5       8  -630.6
    2 (default)                   404.4      28  -674.4
    3 (--regimes 3)               419.2      56  -569.5

    stock  mu calm  mu volatile  sigma calm  sigma volatile  stay calm  stay volatile
    AAPL    +0.049       -0.057       0.096           0.231       32.5           10.1
    AMZN    +0.024       -0.071       0.133           0.263      >1000           23.5
    IBM     +0.014       -0.018       0.045           0.121       29.3           12.9
    MSFT    +0.009       -0.018       0.048           0.136       37.9           20.0

(stay: the expected months in a regime, ``1 / (1 - A_kk)``.) Two regimes add 70 nats to one
Normal per stock; the stochastic-volatility model of ``examples/state_space.py`` (3 params per
stock, on the same returns centred, which the HMM's likelihood does not depend on) reaches
386.7 by its particle filter. Every stock has a calm regime with a positive mean and a volatile
one with a negative mean and 2.0-2.8 times the scale, both persistent. The MAP path puts all
four stocks in the volatile regime through the dot-com crash (from February 2000, for 22 to 36
months), and AAPL, IBM and MSFT again in the financial crisis (6 to 21 months in 2007-2009);
AMZN never returns to it (its calm regime is absorbing). Three regimes gain 15 nats for 28
more params: BIC prefers two.

Writes into ``--out``:

- ``regimes.png``: per stock, the returns as bars coloured by the MAP regime path
  (``sg.infer_discrete``, ``temperature=0``), and on a second axis the posterior probability of
  the most volatile regime (forward-backward) with its frequency in the posterior draws (dots);
- ``transitions.png``: the learned transition matrix of each stock (a heatmap, probabilities
  written in), with each regime's expected stay ``1 / (1 - A_kk)`` in months;
- ``loglik.png``: the training curve, ``-loss`` = the log-likelihood per step, with the
  forward algorithm's value at the learned params and the one-regime baseline as levels.

Run::

    python examples/hmm.py                       # 2 regimes, 1500 steps (about 8 s)
    python examples/hmm.py --quick               # small (CI)
    python examples/hmm.py --regimes 3 --symbols AAPL,MSFT --steps 3000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import scgjax as sg
from scgjax import dist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

if __package__:  # imported as examples.hmm
    from ._common import stock_log_returns, symbols_arg
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import stock_log_returns, symbols_arg

__all__ = [
    "DEFAULT_SYMBOLS",
    "Returns",
    "brute_force_viterbi",
    "decode",
    "forward_loglik",
    "guide",
    "hmm_tables",
    "load_returns",
    "main",
    "model",
    "normal_baseline",
    "parse",
    "path_log_joint",
    "posterior_marginals",
    "regime_names",
    "sort_regimes",
    "viterbi",
]

DEFAULT_SYMBOLS = ("AAPL", "AMZN", "IBM", "MSFT")
ENUM = {"enumerate": "parallel"}
constraints = dist.constraints


# --------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Returns:
    """Monthly log-returns.

    Attributes:
        returns: ``(T, N)`` float32, ``log p_{t+1} - log p_t`` per stock (not centred).
        dates: ``(T,)`` ``datetime64``, the month each return ends in.
        symbols: the ``N`` ticker symbols.
        source: where the prices came from (the CSV file's path).
    """

    returns: np.ndarray
    dates: np.ndarray
    symbols: tuple[str, ...]
    source: str


def load_returns(symbols: Sequence[str] = DEFAULT_SYMBOLS) -> Returns:
    """The monthly log-returns of ``symbols`` from ``vega_datasets``' local ``stocks`` file (no
    network); a ``ValueError`` for a symbol that is not there or lacks months."""
    returns, dates, symbols, source = stock_log_returns(symbols, "hmm.py")
    return Returns(returns=returns.astype(np.float32), dates=dates, symbols=symbols,
                   source=source)


# --------------------------------------------------------------------------------------------
# The model


def model(returns: jax.Array, num_regimes: int = 2) -> None:
    """Per stock, a Markov chain of ``num_regimes`` regimes with Normal emissions; the regimes
    are summed out (``infer={"enumerate": "parallel"}`` inside ``sg.scan``)."""
    num_steps, num_series = returns.shape
    sd = jnp.std(returns, axis=0)
    spread = jnp.geomspace(0.6, 1.6, num_regimes)  # regimes start ordered by scale

    def jitter(key, shape):
        return 0.1 * jax.random.normal(key, shape)

    init_logits = sg.param("init_logits", jnp.zeros((num_series, num_regimes)))
    trans_logits = sg.param(
        "trans_logits", jnp.broadcast_to(3.0 * jnp.eye(num_regimes),
                                         (num_series, num_regimes, num_regimes)))
    loc = sg.param("loc", lambda key: sd[:, None] * jitter(key, (num_series, num_regimes)))
    scale = sg.param("scale", lambda key: sd[:, None] * spread * jnp.exp(
        jitter(key, (num_series, num_regimes))), constraints.positive)
    series = jnp.arange(num_series)

    def step(z_prev, inputs):
        r, first = inputs
        logits = jnp.where(first, init_logits, trans_logits[series, z_prev])
        z = sg.sample("z", dist.Categorical(logits=logits), infer=ENUM)
        sg.sample("r", dist.Normal(loc[series, z], scale[series, z]), obs=r)
        return z, None

    with sg.plate("stocks", num_series):
        # the carry is z_{t-1} alone; at t = 0 it is unused (the flag picks π)
        sg.scan(step, jnp.zeros(num_series, jnp.int32),
                xs=(returns, jnp.arange(num_steps) == 0))


def guide(returns: jax.Array, num_regimes: int = 2) -> None:
    """Empty: no latent is sampled (``z`` is summed out, the rest are point estimates)."""


def decode(params: dict, returns: jax.Array, rng_key: jax.Array, *, num_regimes: int = 2,
           temperature: float = 0) -> jax.Array:
    """The regimes ``z`` ``(T, N)`` by ``sg.infer_discrete`` at (unconstrained) ``params``:
    the most probable path of each stock (``temperature=0``) or a draw from ``p(z | r)``
    (``1``)."""
    fn = functools.partial(model, num_regimes=num_regimes)
    served = sg.infer_discrete(sg.handlers.substitute_unconstrained(fn, params),
                               temperature=temperature, rng_key=rng_key)
    return sg.handlers.trace(served).get_trace(returns)["z"]["value"]


# --------------------------------------------------------------------------------------------
# Plain JAX: forward algorithm, Viterbi, forward-backward (no scgjax)


def hmm_tables(params: dict, returns: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(log π (N, S), log A (N, S, S), log N(r_t | μ, σ) (T, N, S))`` from constrained
    ``params`` (those of :func:`model`)."""
    log_init = jax.nn.log_softmax(params["init_logits"], axis=-1)
    log_trans = jax.nn.log_softmax(params["trans_logits"], axis=-1)
    log_emit = dist.Normal(params["loc"], params["scale"]).log_prob(returns[..., None])
    return log_init, log_trans, log_emit


def _forward_one(log_init: jax.Array, log_trans: jax.Array, log_emit: jax.Array) -> jax.Array:
    """``log p(r)`` of one series (``(S,)``, ``(S, S)``, ``(T, S)``)."""

    def step(alpha, emit):
        return jax.nn.logsumexp(alpha[:, None] + log_trans, axis=0) + emit, None

    alpha, _ = jax.lax.scan(step, log_init + log_emit[0], log_emit[1:])
    return jax.nn.logsumexp(alpha)


def _viterbi_one(log_init: jax.Array, log_trans: jax.Array, log_emit: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """The most probable path ``(T,)`` of one series and its log joint."""

    def forward(delta, emit):
        scores = delta[:, None] + log_trans  # (previous, current)
        return jnp.max(scores, axis=0) + emit, jnp.argmax(scores, axis=0).astype(jnp.int32)

    delta, pointers = jax.lax.scan(forward, log_init + log_emit[0], log_emit[1:])
    last = jnp.argmax(delta).astype(jnp.int32)

    def backward(state, pointer):  # pointer[j]: the best previous state given state j now
        return pointer[state], pointer[state]

    _, earlier = jax.lax.scan(backward, last, pointers, reverse=True)
    return jnp.append(earlier, last), jnp.max(delta)


def _posterior_one(log_init: jax.Array, log_trans: jax.Array, log_emit: jax.Array
                   ) -> jax.Array:
    """``p(z_t = k | r)`` ``(T, S)`` of one series, forward-backward in log space."""

    def forward(alpha, emit):
        alpha = jax.nn.logsumexp(alpha[:, None] + log_trans, axis=0) + emit
        return alpha, alpha

    def backward(beta, emit):  # beta_{t-1}[i] = log sum_j A[i, j] N(r_t | j) exp(beta_t[j])
        beta = jax.nn.logsumexp(log_trans + (emit + beta)[None, :], axis=1)
        return beta, beta

    alpha0 = log_init + log_emit[0]
    _, alphas = jax.lax.scan(forward, alpha0, log_emit[1:])
    _, betas = jax.lax.scan(backward, jnp.zeros_like(alpha0), log_emit[1:], reverse=True)
    alphas = jnp.concatenate([alpha0[None], alphas])
    betas = jnp.concatenate([betas, jnp.zeros_like(alpha0)[None]])
    return jax.nn.softmax(alphas + betas, axis=-1)


def forward_loglik(log_init: jax.Array, log_trans: jax.Array, log_emit: jax.Array
                   ) -> jax.Array:
    """``log p(r_s)`` per series ``(N,)`` by the forward algorithm, ``α_t[j] = log Σ_i
    exp(α_{t-1}[i] + log A[i, j]) + log N(r_t | μ_j, σ_j)``, from :func:`hmm_tables`."""
    return jax.vmap(_forward_one, in_axes=(0, 0, 1))(log_init, log_trans, log_emit)


def viterbi(log_init: jax.Array, log_trans: jax.Array, log_emit: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
    """The most probable path per series and its log joint, ``((T, N) int32, (N,))``:
    max-product forward pass with back-pointers, then a backward pass along them."""
    path, logjoint = jax.vmap(_viterbi_one, in_axes=(0, 0, 1), out_axes=(1, 0))(
        log_init, log_trans, log_emit)
    return path, logjoint


def posterior_marginals(log_init: jax.Array, log_trans: jax.Array, log_emit: jax.Array
                        ) -> jax.Array:
    """``p(z_t = k | r)`` per series, ``(T, N, S)``, by forward-backward."""
    return jax.vmap(_posterior_one, in_axes=(0, 0, 1), out_axes=1)(log_init, log_trans,
                                                                    log_emit)


def path_log_joint(log_init: jax.Array, log_trans: jax.Array, log_emit: jax.Array,
                   path: jax.Array) -> jax.Array:
    """``log p(r_s, z_s)`` per series ``(N,)`` of the paths ``(T, N)``."""
    series = jnp.arange(path.shape[1])
    emit = jnp.take_along_axis(log_emit, path[..., None], axis=-1)[..., 0].sum(0)
    moves = log_trans[series, path[:-1], path[1:]].sum(0)
    return log_init[series, path[0]] + moves + emit


def brute_force_viterbi(log_init: np.ndarray, log_trans: np.ndarray, log_emit: np.ndarray
                        ) -> tuple[np.ndarray, float, float]:
    """For one short series (``(S,)``, ``(S, S)``, ``(T, S)``): the most probable path, its
    log joint and ``log p(r)``, by listing all ``S^T`` paths (a reference for the tests)."""
    num_steps, num_regimes = log_emit.shape
    paths = np.stack(np.meshgrid(*[np.arange(num_regimes)] * num_steps, indexing="ij"),
                     axis=-1).reshape(-1, num_steps)
    joint = (log_init[paths[:, 0]] + log_emit[np.arange(num_steps), paths].sum(1)
             + log_trans[paths[:, :-1], paths[:, 1:]].sum(1))
    best = int(np.argmax(joint))
    top = joint.max()
    return paths[best], float(joint[best]), float(top + np.log(np.exp(joint - top).sum()))


def normal_baseline(returns: np.ndarray) -> np.ndarray:
    """``log p(r_s)`` per series under one Normal per stock at its maximum-likelihood mean and
    standard deviation (a model with a single regime)."""
    r = np.asarray(returns, np.float64)
    var = r.var(axis=0)
    return -0.5 * r.shape[0] * (np.log(2 * np.pi * var) + 1.0)


def sort_regimes(params: dict) -> dict:
    """The constrained params with each stock's regimes sorted by scale (regime 0 the
    calmest): the same model, relabelled."""
    order = np.argsort(np.asarray(params["scale"]), axis=-1)  # (N, S)
    rows = np.arange(order.shape[0])[:, None]
    trans = np.asarray(params["trans_logits"])[rows, order]  # rows of the new order
    trans = np.take_along_axis(trans, order[:, None, :], axis=-1)  # and its columns
    out = {k: np.asarray(v)[rows, order] for k, v in params.items()
           if k in ("init_logits", "loc", "scale")}
    out["trans_logits"] = trans
    return out


def regime_names(num_regimes: int) -> list[str]:
    """``calm`` / ``volatile`` (and ``middle`` for three), else ``regime k``."""
    if num_regimes == 2:
        return ["calm", "volatile"]
    if num_regimes == 3:
        return ["calm", "middle", "volatile"]
    return [f"regime {k}" for k in range(num_regimes)]


def num_params(num_regimes: int) -> int:
    """Free parameters per stock: ``π`` (S - 1), ``A`` (S (S - 1)), ``μ`` and ``σ`` (2 S)."""
    return (num_regimes - 1) + num_regimes * (num_regimes - 1) + 2 * num_regimes


# --------------------------------------------------------------------------------------------
# Plots


def _colours(num_regimes: int) -> list:
    return list(plt.get_cmap("coolwarm")(np.linspace(0.05, 0.95, num_regimes)))


def plot_regimes(path: Path, data: Returns, path_z: np.ndarray, probs: np.ndarray,
                 frequency: np.ndarray, scale: np.ndarray) -> None:
    """Per stock: the returns as bars coloured by the MAP regime, and on a second axis
    ``p(z_t = most volatile | r)`` (forward-backward) and its frequency in the posterior
    draws."""
    num_series = len(data.symbols)
    num_regimes = probs.shape[-1]
    colours, names = _colours(num_regimes), regime_names(num_regimes)
    fig, axes = plt.subplots(num_series, 1, figsize=(11, 2.3 * num_series), sharex=True)
    axes = np.atleast_1d(axes)
    for s, ax in enumerate(axes):
        for k in range(num_regimes):
            here = path_z[:, s] == k
            ax.bar(data.dates[here], data.returns[here, s], width=25, color=colours[k],
                   label=f"{names[k]} (σ = {scale[s, k]:.3f})")
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_ylabel(f"{data.symbols[s]}\nlog-return")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(data.dates, probs[:, s, -1], color="k", lw=1.0,
                  label=f"p({names[-1]} | r), forward-backward")
        twin.plot(data.dates, frequency[:, s, -1], ".", color="0.3", ms=2.5,
                  label="its frequency in the posterior draws")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel(f"p({names[-1]})", fontsize=8)
        handles = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        twin.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="lower left",
                    ncol=num_regimes + 2, framealpha=0.9)  # on the twin axis: drawn on top
        if s == 0:
            ax.set_title("monthly log-returns coloured by the most probable regime path "
                         "(sg.infer_discrete, temperature 0); line: posterior probability of the "
                         "most volatile regime", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_transitions(path: Path, data: Returns, trans: np.ndarray) -> None:
    """Each stock's transition matrix ``A[i, j] = p(z_t = j | z_{t-1} = i)`` as a heatmap."""
    num_series, num_regimes = trans.shape[:2]
    names = regime_names(num_regimes)
    fig, axes = plt.subplots(1, num_series, figsize=(2.9 * num_series + 1.0, 3.2))
    axes = np.atleast_1d(axes)
    for s, ax in enumerate(axes):
        image = ax.imshow(trans[s], vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(num_regimes):
            for j in range(num_regimes):
                ax.text(j, i, f"{trans[s, i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="k" if trans[s, i, j] > 0.5 else "w")
        stays = 1.0 / np.maximum(1.0 - np.diag(trans[s]), 1e-6)
        ax.set_title(f"{data.symbols[s]}: stays " + ", ".join(
            f"{d:.0f}" if d < 1e3 else ">1000" for d in stays) + " mo", fontsize=9)
        ax.set_xticks(range(num_regimes), names, fontsize=7)
        ax.set_yticks(range(num_regimes), names if s == 0 else [""] * num_regimes, fontsize=7)
        ax.set_xlabel("to z_t", fontsize=8)
        if s == 0:
            ax.set_ylabel("from z_{t-1}", fontsize=8)
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.02)
    fig.suptitle("learned transition matrices (expected stay 1 / (1 - A_kk) in months)",
                 fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_loglik(path: Path, losses: np.ndarray, loglik: float, baseline: float) -> None:
    """``-loss`` (the exact log-likelihood) per step, the forward algorithm's value at the
    learned params and the one-regime baseline."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, -np.asarray(losses), lw=1.5, label="-loss of sg.ELBO() (summed out by sg.scan)")
    ax.axhline(loglik, color="k", ls="--", lw=1,
               label=f"plain-JAX forward algorithm at the learned params: {loglik:.2f}")
    ax.axhline(baseline, color="0.5", ls=":", lw=1.5,
               label=f"one Normal per stock (no regimes): {baseline:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("log p(r) (nats, all months and stocks)")
    ax.set_title("training: maximum likelihood by Adam, the regimes summed out exactly",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line

FULL = {"steps": 1500, "draws": 500}
QUICK = {"steps": 200, "draws": 100}


def make_parser() -> argparse.ArgumentParser:
    """The flags (see ``--help``)."""
    p = argparse.ArgumentParser(prog="hmm.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes for every flag left unset (CI; a few seconds)")
    p.add_argument("--steps", type=int, default=None,
                   help="Adam steps (default: 1500; --quick: 200)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="initial Adam step size, cosine-decayed to 5%% of it "
                   "(default: %(default)s)")
    p.add_argument("--draws", type=int, default=None,
                   help="paths drawn from the posterior by sg.infer_discrete(temperature=1) "
                   "(default: 500; --quick: 100)")
    p.add_argument("--regimes", type=int, default=2,
                   help="hidden regimes per stock, S (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="PRNG seed of the initial means and scales (default: %(default)s)")
    p.add_argument("--symbols", type=symbols_arg, default=DEFAULT_SYMBOLS,
                   help="comma-separated ticker symbols (default: AAPL,AMZN,IBM,MSFT)")
    p.add_argument("--out", type=Path, default=Path("out") / "hmm",
                   help="folder for the PNGs (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags (``None``: ``sys.argv[1:]``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    for flag, value in (QUICK if args.quick else FULL).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    for flag in FULL:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.regimes < 2:
        parser.error(f"--regimes must be at least 2, got {args.regimes}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Load the returns, train the HMM, check it against the forward algorithm, decode, plot.

    Returns a dict with ``data`` (:class:`Returns`), ``losses`` (per step; ``-loss`` is the
    log-likelihood), ``loglik`` (the plain-JAX forward algorithm at the learned params, summed
    over stocks), ``loglik_per_stock``, ``elbo_loglik`` (``-sg.ELBO().loss`` there),
    ``baseline`` and ``baseline_per_stock`` (one Normal per stock), ``bic`` and
    ``baseline_bic``, ``params`` (constrained, regimes sorted by scale: ``init_logits``,
    ``trans_logits``, ``loc``, ``scale``), ``init`` ``(N, S)`` and ``trans`` ``(N, S, S)``
    (probabilities), ``viterbi`` ``(T, N)`` (``sg.infer_discrete``'s MAP path) and
    ``viterbi_logjoint`` ``(N,)``, ``months_differ`` (from plain-JAX Viterbi's), ``posterior``
    ``(T, N, S)`` (forward-backward), ``draw_frequency`` ``(T, N, S)`` (of the regimes in
    ``sg.infer_discrete``'s posterior draws) and ``worst_se`` (their largest difference, in
    standard errors), ``seconds``, ``paths`` and ``args``. Regimes are sorted by scale.
    """
    args = parse(argv)
    data = load_returns(args.symbols)
    num_steps, num_series = data.returns.shape
    first, last = (str(d)[:7] for d in (data.dates[0], data.dates[-1]))
    print(f"{num_series} stocks ({', '.join(data.symbols)}), {num_steps} monthly log-returns "
          f"{first} to {last}, from {data.source}")
    returns = jnp.asarray(data.returns)
    fn = functools.partial(model, num_regimes=args.regimes)
    gd = functools.partial(guide, num_regimes=args.regimes)

    schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05)
    svi = sg.SVI(fn, gd, optax.adam(schedule), sg.ELBO())
    start = time.perf_counter()
    result = svi.run(jax.random.key(args.seed), args.steps, returns,
                     progress_bar=not args.no_progress)
    seconds = time.perf_counter() - start
    constrained = svi.get_params(result.state, returns)

    # the check: the objective at the learned params is the forward algorithm's log p(r)
    elbo_loglik = -float(jax.jit(lambda p: sg.ELBO().loss(0, p, fn, gd, returns))(
        result.state.params))
    tables = hmm_tables(constrained, returns)
    per_stock = np.asarray(jax.jit(forward_loglik)(*tables))
    loglik = float(per_stock.sum())
    np.testing.assert_allclose(elbo_loglik, loglik, rtol=1e-5, err_msg=(
        "-sg.ELBO().loss differs from the plain-JAX forward algorithm at the learned params"))

    # decode with sg.infer_discrete (MAP path, posterior draws), checked against plain JAX
    key_map, key_draws = jax.random.split(jax.random.key(args.seed + 1))
    map_path = jax.jit(functools.partial(decode, num_regimes=args.regimes, temperature=0))(
        result.state.params, returns, key_map)
    draws = jax.jit(jax.vmap(functools.partial(decode, num_regimes=args.regimes, temperature=1),
                             in_axes=(None, None, 0)))(
        result.state.params, returns, jax.random.split(key_draws, args.draws))
    reference, reference_joint = jax.jit(viterbi)(*tables)
    months_differ = int(np.sum(np.asarray(map_path) != np.asarray(reference)))
    map_joint = np.asarray(jax.jit(path_log_joint)(*tables, map_path))
    np.testing.assert_allclose(map_joint, reference_joint, rtol=1e-6, atol=1e-4, err_msg=(
        "sg.infer_discrete's MAP path is less probable than plain-JAX Viterbi's"))
    exact = np.asarray(jax.jit(posterior_marginals)(*tables))  # (T, N, S)
    frequency = np.asarray(jax.nn.one_hot(draws, args.regimes).mean(0))
    se = np.sqrt(np.maximum(exact * (1 - exact), 1e-12) / args.draws)
    worst_se = float(np.max(np.abs(frequency - exact) / np.maximum(se, 1.0 / args.draws)))

    # relabel: each stock's regimes sorted by scale (regime 0 the calmest)
    params = sort_regimes(constrained)
    rank = np.argsort(np.argsort(np.asarray(constrained["scale"]), axis=-1), axis=-1)  # old->new
    series = np.arange(num_series)
    path_z = rank[series, np.asarray(map_path)]  # (T, N)
    order = np.argsort(rank, axis=-1)  # new -> old
    probs = exact[:, series[:, None], order]  # (T, N, S) in the new labels
    frequency = frequency[:, series[:, None], order]
    init = np.asarray(jax.nn.softmax(params["init_logits"], axis=-1))
    trans = np.asarray(jax.nn.softmax(params["trans_logits"], axis=-1))

    baseline_per_stock = normal_baseline(data.returns)
    baseline = float(baseline_per_stock.sum())
    log_n = np.log(num_steps)
    bic = -2 * loglik + num_series * num_params(args.regimes) * log_n
    baseline_bic = -2 * baseline + num_series * 2 * log_n

    names = regime_names(args.regimes)
    print(f"\nafter {args.steps} steps ({seconds:.1f} s): log p(r) = {loglik:.2f} nats by the "
          f"plain-JAX forward algorithm, {elbo_loglik:.2f} by -sg.ELBO().loss (difference "
          f"{abs(loglik - elbo_loglik):.1e}); one Normal per stock: {baseline:.2f}")
    print(f"sg.infer_discrete: MAP path = plain-JAX Viterbi's in {path_z.size - months_differ} "
          f"of {path_z.size} months; the regimes' frequencies in {args.draws} posterior draws "
          f"are within {worst_se:.1f} standard errors of forward-backward's p(z_t | r)")
    print(f"BIC: {bic:.1f} with {args.regimes} regimes "
          f"({num_series * num_params(args.regimes)} params), {baseline_bic:.1f} with one "
          f"({2 * num_series} params)")
    header = ["stock", "log p", *[f"mu {n}" for n in names], *[f"sigma {n}" for n in names],
              *[f"stay {n}" for n in names], *[f"months {n}" for n in names]]
    rows = [header]
    for s, symbol in enumerate(data.symbols):
        stays = 1.0 / np.maximum(1.0 - np.diag(trans[s]), 1e-6)
        counts = np.bincount(path_z[:, s], minlength=args.regimes)
        rows.append([symbol, f"{per_stock[s]:.1f}",
                     *[f"{v:+.3f}" for v in params["loc"][s]],
                     *[f"{v:.3f}" for v in params["scale"][s]],
                     *[f"{v:.1f}" if v < 1e3 else ">1000" for v in stays],
                     *[str(c) for c in counts]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print("per stock (regimes sorted by sigma; stay = 1 / (1 - A_kk) months; months: in the "
          "MAP path):")
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"regimes": out / "regimes.png", "transitions": out / "transitions.png",
             "loglik": out / "loglik.png"}
    plot_regimes(paths["regimes"], data, path_z, probs, frequency, params["scale"])
    plot_transitions(paths["transitions"], data, trans)
    plot_loglik(paths["loglik"], result.losses, loglik, baseline)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {
        "data": data,
        "losses": np.asarray(result.losses),
        "loglik": loglik,
        "loglik_per_stock": per_stock,
        "elbo_loglik": elbo_loglik,
        "baseline": baseline,
        "baseline_per_stock": baseline_per_stock,
        "bic": float(bic),
        "baseline_bic": float(baseline_bic),
        "params": params,
        "init": init,
        "trans": trans,
        "viterbi": path_z,
        "viterbi_logjoint": map_joint,
        "months_differ": months_differ,
        "posterior": probs,
        "draw_frequency": frequency,
        "worst_se": worst_se,
        "seconds": seconds,
        "paths": paths,
        "args": vars(args),
    }


if __name__ == "__main__":
    main()
