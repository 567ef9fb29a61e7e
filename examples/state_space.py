"""Stochastic volatility of monthly stock returns: a state-space model, ELBO through sg.scan.

**The data** are real: the monthly closing prices of AAPL, AMZN, IBM and MSFT from January 2000
to March 2010 (123 months each), the ``stocks`` data set of the Vega visualisation project as
the ``vega_datasets`` package ships it *inside its wheel* (``vega_datasets/_data/stocks.csv``,
read by ``vega_datasets.local_data.stocks()``: no download; ``pip install vega_datasets``, part
of this repository's ``examples`` extra). The file also has GOOG, from August 2004 only, which is
left out by default (``--symbols`` picks others among the complete ones). The series are the
log-returns ``r_{t,s} = log p_{t+1,s} - log p_{t,s}``, centred per stock: ``T = 122`` months by
``S = 4`` stocks, with the dot-com crash (2000-2002) and the financial crisis (2008-2009) in
them.

**The model** (Taylor 1982; Kim, Shephard and Chib 1998): per stock, a latent log-variance
``h_t`` follows a stationary AR(1) process, and the return is Normal with variance ``exp(h_t)``::

    h_0 ~ Normal(μ, σ / sqrt(1 - φ²))           (the stationary distribution)
    h_t ~ Normal(μ + φ (h_{t-1} - μ), σ)        t = 1 .. T-1
    r_t ~ Normal(0, exp(h_t / 2))

with ``μ``, ``φ ∈ (-1, 1)`` and ``σ > 0`` one per stock (``sg.param``: point estimates,
maximised together with the guide, i.e. variational EM on ``log p(r | μ, φ, σ)``). The stocks
are a plate, ``sg.plate("stocks", S)``; time is one ``sg.scan`` over the ``T`` months whose body
samples ``h`` and observes ``r`` (the carry is ``h_{t-1}``, of the plate's shape ``(S,)``): the
sites ``h`` and ``r`` have batch shape ``(T, S)``, and the program's size does not grow with
``T``.

**The guide** is a Gaussian Markov chain run by the same ``sg.scan`` (``--guide markov``)::

    q(h_t | h_{t-1}) = Normal(m_t + c (h_{t-1} - m_{t-1}), s_t)

with ``m_t``, ``s_t`` per month and stock and one coupling ``c ∈ (-1, 1)`` per stock: a
Gaussian over the whole path with the posterior's correlation between neighbouring months.
``--guide meanfield`` fixes ``c = 0`` (independent months). Both are sampled pathwise
(``sg.Pathwise``, the default for a Normal), so the gradient of ``sg.ELBO`` flows through the
loop: ``jax.grad`` of one ``lax.scan``.

**Training.** ``sg.SVI`` with ``sg.ELBO(num_particles=K)`` (default ``K = 8``) and Adam with a
cosine-decayed step size (0.02 to 0.001) for ``--steps`` steps (default 4000). At the end:

- the ELBO, estimated with ``--eval-particles`` (1000) samples of the guide;
- the importance-weighted bound ``sg.IWAE(num_particles=1000)`` at the same params (tighter);
- ``log p(r | μ, φ, σ)`` itself, by a bootstrap particle filter (plain JAX, ``--pf-particles``
  10,000 particles, systematic resampling; :func:`particle_filter_loglik`): the target both
  bounds approach, and how good the learned model is.

Results with the defaults (4000 steps, K = 8, seed 0; about 8 s of training per guide on a
shared 2-core CPU; nats over all 488 returns)::

    guide       ELBO  IWAE (K=1000)  log p(r) (PF)  phi AAPL  phi AMZN  phi IBM  phi MSFT
    markov     384.7          386.8          386.7     0.892     0.813    0.885     0.966
    meanfield  363.3          365.6          365.6     0.049     0.018    0.103     0.116

The mean-field guide cannot represent the months' posterior correlation, and variational EM
pays for it in the model: it learns almost no persistence (``φ`` = 0.02-0.12, where the Markov
guide finds 0.81-0.97, months-long volatility regimes) and a larger ``σ`` (0.74-0.97 against
0.26-0.41). Its ELBO is lower,
and the particle filter says its *model* is worse too, by about 21 nats (a known failure of
mean-field variational EM in time series: Turner and Sahani 2011).

Writes into ``--out``:

- ``volatility.png``: per stock, ``|r_t|`` (bars) and the inferred monthly volatility
  ``exp(h_t / 2)``: the guide's posterior mean of ``h_t`` with ``± 2`` standard deviations
  (from 1000 guide samples) mapped through ``exp(h / 2)``, for the Markov guide (band) and the
  mean-field one (dashed);
- ``elbo.png``: the training ELBO per step (smoothed) of each guide, with its final IWAE bound
  and the particle filter's ``log p(r)`` as levels.

Run::

    python examples/state_space.py                 # both guides, 4000 steps (about 40 s)
    python examples/state_space.py --quick         # small (CI)
    python examples/state_space.py --guide markov --symbols AAPL,MSFT --steps 2000
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

if __package__:  # imported as examples.state_space
    from ._common import stock_log_returns, symbols_arg
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import stock_log_returns, symbols_arg

__all__ = [
    "DEFAULT_SYMBOLS",
    "GUIDES",
    "Returns",
    "guide",
    "guide_samples",
    "load_returns",
    "main",
    "model",
    "parse",
    "particle_filter_loglik",
]

DEFAULT_SYMBOLS = ("AAPL", "AMZN", "IBM", "MSFT")
#: guide name -> whether it is a Markov chain (else mean-field)
GUIDES = {"markov": True, "meanfield": False}
COLOURS = {"markov": "#1f77b4", "meanfield": "#d62728"}
constraints = dist.constraints


# --------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Returns:
    """Centred monthly log-returns.

    Attributes:
        returns: ``(T, S)`` float32, ``log p_{t+1} - log p_t`` minus its mean per stock.
        dates: ``(T,)`` ``datetime64``, the month each return ends in.
        symbols: the ``S`` ticker symbols.
        means: ``(S,)`` the per-stock mean log-return that was subtracted.
        source: where the prices came from (the CSV file's path).
    """

    returns: np.ndarray
    dates: np.ndarray
    symbols: tuple[str, ...]
    means: np.ndarray
    source: str


def load_returns(symbols: Sequence[str] = DEFAULT_SYMBOLS) -> Returns:
    """The centred monthly log-returns of ``symbols`` from ``vega_datasets``' local ``stocks``
    file (no network); a ``ValueError`` for a symbol that is not there or lacks months."""
    returns, dates, symbols, source = stock_log_returns(symbols, "state_space.py")
    means = returns.mean(0)
    return Returns(returns=(returns - means).astype(np.float32), dates=dates, symbols=symbols,
                   means=means.astype(np.float32), source=source)


# --------------------------------------------------------------------------------------------
# Model and guide


def model(returns: jax.Array) -> None:
    """The stochastic-volatility model of ``returns`` ``(T, S)``: a plate of ``S`` stocks, one
    ``sg.scan`` over the ``T`` months (sites ``h`` and ``r``, batch shape ``(T, S)``)."""
    num_steps, num_series = returns.shape
    mu = sg.param("mu", jnp.full(num_series, -5.0))
    phi = sg.param("phi", jnp.full(num_series, 0.8), constraints.interval(-1.0, 1.0))
    sigma = sg.param("sigma", jnp.full(num_series, 0.3), constraints.positive)
    stationary = sigma / jnp.sqrt(1.0 - phi**2)

    def step(h_prev, inputs):
        r, first = inputs
        h = sg.sample("h", dist.Normal(mu + phi * (h_prev - mu),
                                       jnp.where(first, stationary, sigma)))
        sg.sample("r", dist.Normal(0.0, jnp.exp(h / 2)), obs=r)
        return h, None

    with sg.plate("stocks", num_series):
        # h_{-1} = μ: the first step's mean is μ, its scale the stationary one
        sg.scan(step, mu, xs=(returns, jnp.arange(num_steps) == 0))


def guide(returns: jax.Array, markov: bool = True) -> None:
    """``q(h_t | h_{t-1}) = Normal(m_t + c (h_{t-1} - m_{t-1}), s_t)`` per stock, in the same
    ``sg.scan`` (``markov=False``: ``c = 0``, mean-field)."""
    num_steps, num_series = returns.shape
    loc = sg.param("h_loc", jnp.full((num_steps, num_series), -5.0))
    scale = sg.param("h_scale", jnp.full((num_steps, num_series), 0.3), constraints.positive)
    if markov:
        coupling = sg.param("h_coupling", jnp.full(num_series, 0.5),
                            constraints.interval(-1.0, 1.0))
    else:
        coupling = jnp.zeros(num_series)
    prev_loc = jnp.concatenate([loc[:1], loc[:-1]])  # m_{t-1}; at t = 0 the carry equals it

    def step(h_prev, inputs):
        m, s, m_prev = inputs
        h = sg.sample("h", dist.Normal(m + coupling * (h_prev - m_prev), s))
        return h, None

    with sg.plate("stocks", num_series):
        sg.scan(step, loc[0], xs=(loc, scale, prev_loc))


def guide_samples(key: jax.Array, params: dict, returns: jax.Array, markov: bool,
                  num_samples: int) -> jax.Array:
    """``(num_samples, T, S)`` draws of ``h`` from the guide at (unconstrained) ``params``."""
    fn = functools.partial(guide, markov=markov)

    def one(k):
        return sg.handlers.trace_program(fn, k, params, returns)["h"]["value"]

    return jax.jit(jax.vmap(one))(jax.random.split(key, num_samples))


def particle_filter_loglik(key: jax.Array, mu: jax.Array, phi: jax.Array, sigma: jax.Array,
                           returns: jax.Array, num_particles: int) -> jax.Array:
    """``log p(r_s | μ_s, φ_s, σ_s)`` per stock ``(S,)``, estimated by a bootstrap particle
    filter (propose from the AR(1) prior, weight by the likelihood, systematic resampling at
    every step). Plain JAX, no scgjax: an independent check of the bounds. Its estimate of
    ``p`` is unbiased, so that of ``log p`` is slightly low; with 10,000 particles at the learned
    params its standard deviation is about 0.1 nats (summed over the four stocks)."""
    num_steps, num_series = returns.shape
    n = num_particles
    key0, key = jax.random.split(key)
    h = mu + sigma / jnp.sqrt(1 - phi**2) * jax.random.normal(key0, (n, num_series))

    def step(carry, inputs):
        h, loglik = carry
        r, k, first = inputs
        k_move, k_resample = jax.random.split(k)
        moved = mu + phi * (h - mu) + sigma * jax.random.normal(k_move, h.shape)
        h = jnp.where(first, h, moved)
        logw = dist.Normal(0.0, jnp.exp(h / 2)).log_prob(r)
        loglik = loglik + jax.scipy.special.logsumexp(logw, axis=0) - jnp.log(n)
        cumulative = jnp.cumsum(jax.nn.softmax(logw, axis=0), axis=0)
        u = (jax.random.uniform(k_resample, (num_series,)) + jnp.arange(n)[:, None]) / n
        idx = jax.vmap(jnp.searchsorted, in_axes=(1, 1), out_axes=1)(cumulative, u)
        return (jnp.take_along_axis(h, jnp.minimum(idx, n - 1), axis=0), loglik), None

    keys = jax.random.split(key, num_steps)
    (_, loglik), _ = jax.lax.scan(step, (h, jnp.zeros(num_series)),
                                  (returns, keys, jnp.arange(num_steps) == 0))
    return loglik


# --------------------------------------------------------------------------------------------
# Plots


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Running mean over ``window`` steps (shorter at the start)."""
    c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_volatility(path: Path, data: Returns, fits: dict[str, dict[str, Any]]) -> None:
    """Per stock: ``|r_t|`` and the volatility ``exp(h_t / 2)`` at the guide's posterior mean of
    ``h_t`` (lines), and at ``mean ± 2 sd`` (the Markov guide's band)."""
    num_series = len(data.symbols)
    fig, axes = plt.subplots(num_series, 1, figsize=(11, 2.3 * num_series), sharex=True)
    axes = np.atleast_1d(axes)
    dates = data.dates
    for s, ax in enumerate(axes):
        ax.bar(dates, np.abs(data.returns[:, s]), width=25, color="0.7",
               label="|monthly log-return|")
        for name, fit in fits.items():
            mean, sd = fit["h_mean"][:, s], fit["h_sd"][:, s]
            style = "-" if GUIDES[name] else "--"
            ax.plot(dates, np.exp(mean / 2), style, color=COLOURS[name], lw=1.5,
                    label=f"{name} guide: exp(E[h_t] / 2)")
            if GUIDES[name]:
                ax.fill_between(dates, np.exp((mean - 2 * sd) / 2), np.exp((mean + 2 * sd) / 2),
                                color=COLOURS[name], alpha=0.25, lw=0,
                                label=f"{name} guide: E[h_t] ± 2 sd")
        ax.set_ylabel(data.symbols[s])
        ax.grid(alpha=0.3)
        if s == 0:
            ax.set_title("inferred monthly volatility exp(h_t / 2) against |r_t| "
                         "(posterior of h_t from 1000 guide samples)", fontsize=9)
            ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_elbo(path: Path, fits: dict[str, dict[str, Any]], window: int) -> None:
    """The training ELBO of each guide (smoothed), its final IWAE bound and the particle
    filter's ``log p(r)`` at its params."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, fit in fits.items():
        elbo = -np.asarray(fit["losses"])
        steps = np.arange(1, len(elbo) + 1)
        for a in (ax, bx):
            a.plot(steps, smooth(elbo, window), color=COLOURS[name],
                   label=f"{name}: ELBO (running mean of {window})")
        bx.axhline(fit["iwae"], color=COLOURS[name], ls="--", lw=1,
                   label=f"{name}: IWAE bound, K = {fit['iwae_particles']}")
        bx.axhline(fit["loglik"], color=COLOURS[name], ls=":", lw=1.5,
                   label=f"{name}: log p(r) at its params (particle filter)")
    final = [-np.asarray(f["losses"])[-max(1, len(f["losses"]) // 4):] for f in fits.values()]
    top = max([f["loglik"] for f in fits.values()] + [float(np.max(x)) for x in final])
    low = min(float(np.percentile(x, 5)) for x in final)
    bx.set_ylim(low - 0.1 * (top - low), top + 0.15 * (top - low))
    bx.set_xlim(len(elbo) // 2, len(elbo))
    curves = [smooth(-np.asarray(f["losses"]), window) for f in fits.values()]
    ax.set_ylim(bottom=min(float(np.percentile(c, 2)) for c in curves))
    ax.set_title("training ELBO (nats, all months and stocks)", fontsize=9)
    bx.set_title("second half, with the IWAE bound and log p(r)", fontsize=9)
    for a in (ax, bx):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    bx.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line

FULL = {"steps": 4000, "num_particles": 8, "eval_particles": 1000, "pf_particles": 10000}
QUICK = {"steps": 300, "num_particles": 4, "eval_particles": 100, "pf_particles": 1000}


def make_parser() -> argparse.ArgumentParser:
    """The flags (see ``--help``)."""
    p = argparse.ArgumentParser(prog="state_space.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes for every flag left unset (CI; a few seconds per guide)")
    p.add_argument("--steps", type=int, default=None,
                   help="Adam steps per guide (default: 4000; --quick: 300)")
    p.add_argument("--num-particles", type=int, default=None,
                   help="guide samples per step, K (default: 8; --quick: 4)")
    p.add_argument("--lr", type=float, default=0.02,
                   help="initial Adam step size, cosine-decayed to 5%% of it "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    p.add_argument("--guide", choices=("markov", "meanfield", "both"), default="both",
                   help="which guide(s) to train (default: %(default)s)")
    p.add_argument("--symbols", type=symbols_arg, default=DEFAULT_SYMBOLS,
                   help="comma-separated ticker symbols (default: AAPL,AMZN,IBM,MSFT)")
    p.add_argument("--eval-particles", type=int, default=None,
                   help="samples for the final ELBO, IWAE bound and the volatility plot "
                   "(default: 1000; --quick: 100)")
    p.add_argument("--pf-particles", type=int, default=None,
                   help="particles of the filter estimating log p(r) (default: 10000; "
                   "--quick: 1000)")
    p.add_argument("--out", type=Path, default=Path("out") / "state_space",
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
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def fit_guide(name: str, data: Returns, args: argparse.Namespace) -> dict[str, Any]:
    """Train model and one guide; evaluate the ELBO, the IWAE bound, the particle filter's
    ``log p(r)`` and the posterior mean and sd of ``h``."""
    returns = jnp.asarray(data.returns)
    fn = functools.partial(guide, markov=GUIDES[name])
    schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05)
    svi = sg.SVI(model, fn, optax.adam(schedule), sg.ELBO(num_particles=args.num_particles))
    start = time.perf_counter()
    result = svi.run(jax.random.key(args.seed), args.steps, returns,
                     progress_bar=not args.no_progress)
    seconds = time.perf_counter() - start
    params = result.state.params
    key_elbo, key_iwae, key_pf, key_h = jax.random.split(jax.random.key(args.seed + 1), 4)
    k = args.eval_particles
    elbo = -float(jax.jit(lambda key: sg.ELBO(num_particles=k).loss(
        key, params, model, fn, returns))(key_elbo))
    iwae = -float(jax.jit(lambda key: sg.IWAE(num_particles=k).loss(
        key, params, model, fn, returns))(key_iwae))
    constrained = svi.get_params(result.state, returns)
    loglik = jax.jit(particle_filter_loglik, static_argnums=5)(
        key_pf, constrained["mu"], constrained["phi"], constrained["sigma"], returns,
        args.pf_particles)
    h = np.asarray(guide_samples(key_h, params, returns, GUIDES[name], k))
    return {
        "losses": np.asarray(result.losses),
        "elbo": elbo,
        "iwae": iwae,
        "iwae_particles": k,
        "loglik": float(jnp.sum(loglik)),
        "loglik_per_stock": np.asarray(loglik),
        "params": {n: np.asarray(v) for n, v in constrained.items()},
        "h_mean": h.mean(0),
        "h_sd": h.std(0),
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Load the returns, train the guide(s), print the table, write the plots.

    Returns a dict with ``data`` (:class:`Returns`), ``fits`` (per guide: ``losses`` (the loss
    of every step, minus the ELBO), ``elbo``, ``iwae``, ``loglik`` (summed over stocks) and
    ``loglik_per_stock``, ``params`` (constrained; ``mu``, ``phi``, ``sigma`` ``(S,)``),
    ``h_mean``, ``h_sd`` ``(T, S)``, ``seconds``), ``paths`` and ``args``.
    """
    args = parse(argv)
    data = load_returns(args.symbols)
    num_steps, num_series = data.returns.shape
    first, last = (str(d)[:7] for d in (data.dates[0], data.dates[-1]))
    print(f"{num_series} stocks ({', '.join(data.symbols)}), {num_steps} monthly log-returns "
          f"{first} to {last}, from {data.source}; sd per stock "
          f"{np.round(data.returns.std(0), 3)}")
    names = list(GUIDES) if args.guide == "both" else [args.guide]
    fits = {name: fit_guide(name, data, args) for name in names}

    rows = [("guide", "ELBO", f"IWAE (K={args.eval_particles})", "log p(r) (PF)", "s/run",
             *[f"phi {s}" for s in data.symbols])]
    for name, fit in fits.items():
        rows.append((name, f"{fit['elbo']:.1f}", f"{fit['iwae']:.1f}", f"{fit['loglik']:.1f}",
                     f"{fit['seconds']:.1f}", *[f"{v:.3f}" for v in fit["params"]["phi"]]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nafter {args.steps} steps, K = {args.num_particles} (nats over all "
          f"{num_steps * num_series} returns; log p(r) by a particle filter with "
          f"{args.pf_particles} particles at each guide's learned model):")
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for name, fit in fits.items():
        p = fit["params"]
        print(f"{name}: mu {np.round(p['mu'], 2)}, sigma {np.round(p['sigma'], 3)}"
              + (f", coupling {np.round(p['h_coupling'], 3)}" if "h_coupling" in p else ""))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"volatility": out / "volatility.png", "elbo": out / "elbo.png"}
    plot_volatility(paths["volatility"], data, fits)
    plot_elbo(paths["elbo"], fits, window=max(1, min(100, args.steps // 10)))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"data": data, "fits": fits, "paths": paths, "args": vars(args)}


if __name__ == "__main__":
    main()
