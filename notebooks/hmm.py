# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A hidden Markov model in `sg.scan`: regimes of stock returns, summed out exactly
#
# Markets alternate between calm stretches and turbulent ones, and each lasts for months.
# Hamilton's (1989) regime-switching model makes that a hidden Markov model: per stock, a
# hidden regime $z_t \in \{0, \dots, S-1\}$ follows a Markov chain and the month's return is
# Normal with the regime's mean and scale,
#
# $$z_0 \sim \pi, \qquad z_t \mid z_{t-1} \sim A[z_{t-1}, \cdot\,], \qquad
# r_t \mid z_t \sim \mathcal N\big(\mu_{z_t}, \sigma_{z_t}^2\big).$$
#
# The regimes are discrete, so nothing here needs a guide or a gradient estimator: the
# likelihood sums them out,
#
# $$\log p(r) = \log \sum_{z_{0:T-1}} \pi_{z_0} \mathcal N(r_0 \mid z_0) \prod_{t \ge 1}
# A_{z_{t-1} z_t} \mathcal N(r_t \mid z_t),$$
#
# a sum of $S^T$ terms that the **forward algorithm** computes in $O(T S^2)$:
#
# $$\alpha_0 = \log \pi + \log \mathcal N(r_0 \mid \cdot\,), \qquad
# \alpha_t[j] = \operatorname{logsumexp}_i \big(\alpha_{t-1}[i] + \log A_{ij}\big) +
# \log \mathcal N(r_t \mid j), \qquad \log p(r) = \operatorname{logsumexp}_j \alpha_{T-1}[j].$$
#
# In scgjax the model is written as a loop that *samples* $z_t$, with the site marked
# `infer={"enumerate": "parallel"}`: the objectives then run the forward algorithm themselves,
# compiled once inside the loop. With an empty guide, `sg.ELBO()` is exactly $\log p(r)$, and
# training it with Adam is maximum likelihood. `sg.infer_discrete` then decodes the regimes.
#
# The code is `examples/hmm.py`; this notebook runs it at a reduced size when
# `SCGJAX_NOTEBOOK_QUICK=1` (CI does) and at the example's defaults otherwise (about 10 s on a
# 2-core CPU).

# %%
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import scgjax as sg

try:  # as a script (and under the tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
except NameError:  # in Jupyter, which runs in notebooks/
    sys.path.insert(0, str(Path.cwd()))
from _setup import (  # noqa: E402
    QUICK,
    import_code,
    output_dir,
    quick_compile,
    show_png,
    show_source,
)

hmm = import_code("hmm")
OUT = output_dir("hmm")

# %% [markdown]
# ## The data
#
# Monthly closing prices of Apple, Amazon, IBM and Microsoft from January 2000 to March 2010,
# the `stocks` data set of the Vega project, which the `vega_datasets` package ships in its
# wheel (read from the installed file, no download): the data of the state-space notebook.
# The series are the monthly log-returns $r_t = \log p_{t+1} - \log p_t$, 122 months of 4
# stocks; the dot-com crash and the 2008 crisis stand out as months of large moves both ways.

# %%
data = hmm.load_returns()
returns = jnp.asarray(data.returns)
print(f"{data.returns.shape[0]} months x {len(data.symbols)} stocks from {data.source}")
fig, ax = plt.subplots(figsize=(13, 3.5))
for s, symbol in enumerate(data.symbols):
    ax.plot(data.dates, data.returns[:, s], lw=0.8, label=symbol)
ax.set(ylabel="monthly log-return", title="returns")
ax.grid(alpha=0.3)
ax.legend(fontsize=8, ncol=4)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The model: one `sg.scan` whose carry is the previous regime
#
# The stocks are a plate; inside it, one `sg.scan` over the months. Each stock has its own
# $\pi$, $A$, $\mu$ and $\sigma$ (`sg.param`s, point estimates; $\pi$ and the rows of $A$ as
# logits). The body samples `z` with `infer={"enumerate": "parallel"}` and observes `r`. Its
# carry is $z_{t-1}$ and nothing else: that is what makes the chain first-order Markov, which
# scgjax reads from the body's data flow (a carry that kept older values, a reverse loop or a
# cost after the loop that used $z$ would be refused, naming the site). The first month reads
# $\pi$ instead of the carry, through a flag in `xs`.

# %%
show_source(hmm.model)

# %% [markdown]
# There is no latent left for a guide to sample: it is empty. `sg.graph` shows what the
# objective computes: the log-densities of `z` and `r` are replaced by one cost,
# $\log \sum_z p$, per element of the `stocks` plate, summed over the `time` axis inside the
# log (the forward algorithm).

# %%
fn = functools.partial(hmm.model, num_regimes=2)
gd = functools.partial(hmm.guide, num_regimes=2)
params = sg.init_params(0, fn, gd, returns)
scg = sg.graph(fn, gd, returns, params=params)
print(scg)
print("plates and loops:", {name: plate.size for name, plate in scg.plates.items()})
for name, cost in scg.costs.items():
    print(f"cost {name!r}: kind {cost.kind}, per element of {cost.plates}")

# %% [markdown]
# ## What the loss is, checked three ways
#
# On the first 8 months (so that the $2^8 = 256$ paths per stock can be listed) and at the
# initial params: `-sg.ELBO().loss`, the plain-JAX forward algorithm of the example
# (`hmm.forward_loglik`, no scgjax), and the brute-force sum over every path.

# %%
short = returns[:8]
with quick_compile():
    loss = jax.jit(lambda p: sg.ELBO().loss(0, p, fn, gd, short))(params)
    constrained = sg.constrain_params(params, fn, gd, short)
    tables = hmm.hmm_tables(constrained, short)
    forward = jax.jit(hmm.forward_loglik)(*tables)
brute = [hmm.brute_force_viterbi(*(np.asarray(t, np.float64)[s] for t in tables[:2]),
                                 np.asarray(tables[2], np.float64)[:, s])[2]
         for s in range(len(data.symbols))]
print(f"-sg.ELBO().loss          {-float(loss):.5f}")
print(f"forward algorithm        {float(forward.sum()):.5f}")
print(f"sum over all 256 paths   {sum(brute):.5f}")

# %% [markdown]
# ## Training: maximum likelihood with Adam
#
# `sg.SVI` with `sg.ELBO()` and Adam (step size 0.05, cosine-decayed) for 1500 steps (quick
# mode: 200). There is no sampling, so every step's loss is the exact $-\log p(r)$ at that
# step's params and the gradient has no variance. At the end the example asserts that
# `-sg.ELBO().loss` equals the plain-JAX forward algorithm at the learned params, sorts each
# stock's regimes by scale (regime 0 the calmest) and decodes them with `sg.infer_discrete`.

# %%
with quick_compile():  # quick mode: XLA's optimisations off, a faster compile
    result = hmm.main(["--no-progress", "--out", str(OUT)] + (["--quick"] if QUICK else []))

# %%
show_png(result["paths"]["loglik"])

# %% [markdown]
# The log-likelihood climbs from 368 to 404.4 nats within a few hundred steps and stays there;
# one Normal per stock (no regimes) reaches 334.5. The dashed line is the plain-JAX forward
# algorithm at the learned params: the curve ends on it.
#
# ## Decoding the regimes with `sg.infer_discrete`
#
# `sg.infer_discrete(model, temperature=0)` replaces the summed-out sites by their most
# probable joint value given the data: inside `sg.scan`, the Viterbi path, from the same step
# tables the forward algorithm uses. `temperature=1` draws whole paths from the exact
# posterior $p(z_{0:T-1} \mid r)$ instead (forward filtering, backward sampling). The example
# runs the model under `sg.handlers.substitute_unconstrained` at the learned params:

# %%
show_source(hmm.decode)

# %% [markdown]
# Both are checked against plain JAX: the MAP path against the example's own Viterbi, and the
# draws' frequency of each regime against the smoothed marginals $p(z_t \mid r)$ by
# forward-backward.

# %%
print(f"MAP path months that differ from plain-JAX Viterbi: {result['months_differ']}")
print(f"largest difference between the draws' frequencies and p(z_t | r): "
      f"{result['worst_se']:.1f} standard errors ({result['args']['draws']} draws)")

# %%
show_png(result["paths"]["regimes"])

# %% [markdown]
# Every stock has a calm regime with a positive mean and a volatile one with a negative mean
# and 2 to 3 times the scale. The MAP path puts all four stocks in the volatile regime
# through the dot-com crash and AAPL, IBM and MSFT again in the financial crisis; AMZN never
# goes back. Where the posterior probability (line) hovers around one half, as for AAPL in
# 2001-2002, the MAP *path* may still stay in one regime: it is the most probable sequence,
# not the sequence of the most probable months.

# %%
show_png(result["paths"]["transitions"])

# %% [markdown]
# ## Reading the numbers
#
# With the defaults (this notebook without `SCGJAX_NOTEBOOK_QUICK`), two regimes reach
# $\log p(r) = 404.4$ nats over the 488 returns, 70 above one Normal per stock (334.5); the
# stochastic-volatility model of `notebooks/state_space.ipynb` reaches 386.7 on the same
# returns. The regimes are persistent: expected stays $1 / (1 - A_{kk})$ of 10 to 38 months.
# Three regimes (`python examples/hmm.py --regimes 3`) gain 15 nats for 28 more parameters,
# and BIC ($-2 \log p + k \log T$: -674.4 for two, -569.5 for three) prefers two. The numbers
# of this run:

# %%
names = hmm.regime_names(result["args"]["regimes"])
for s, symbol in enumerate(data.symbols):
    p = result["params"]
    stays = 1 / np.maximum(1 - np.diag(result["trans"][s]), 1e-6)
    print(f"{symbol}: log p {result['loglik_per_stock'][s]:.1f}; " + "; ".join(
        f"{n}: mu {p['loc'][s, k]:+.3f}, sigma {p['scale'][s, k]:.3f}, stay "
        + (f"{stays[k]:.0f}" if stays[k] < 1000 else "> 1000") + " months"
        for k, n in enumerate(names)))
print(f"total log p(r) {result['loglik']:.2f} (one Normal per stock: {result['baseline']:.2f})")
