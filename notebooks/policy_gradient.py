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
# # Policy gradients: rewards-to-go derived from data flow
#
# An episode of a gridworld is an scgjax program: the agent's actions are `sg.sample` sites, the
# rewards are `sg.factor`s, and `sg.Expectation` maximises the expected sum of the factors,
#
# $$J(\theta) = \mathbb E_{\tau \sim \pi_\theta}\Big[\sum_{t=0}^{T-1} r_t\Big], \qquad
# \tau = (s_0, a_0, r_0, s_1, a_1, r_1, \dots), \quad a_t \sim \pi_\theta(\cdot \mid s_t).$$
#
# The actions are discrete, so there is no pathwise gradient through them: the estimator is
# the score function (REINFORCE, Williams 1992). With $g_t = \nabla_\theta \log \pi_\theta(a_t
# \mid s_t)$, the return $R = \sum_t r_t$ and the *rewards-to-go* $G_t = \sum_{t' \ge t}
# r_{t'}$, two unbiased estimates from one episode are
#
# $$\hat g_{\text{whole}} = \sum_t g_t\, (R - b), \qquad
# \hat g_{\text{to-go}} = \sum_t g_t\, (G_t - b_t),$$
#
# with baselines $b, b_t$ learned from earlier steps. They differ by
# $N = \sum_t g_t \big(\sum_{t' < t} r_{t'} + b_t - b\big)$, whose every term has mean zero:
# given the history $h_t$ before $a_t$ is drawn, $\mathbb E[g_t \mid h_t] = \sum_a
# \nabla_\theta \pi_\theta(a \mid s_t) = 0$, and past rewards are functions of $h_t$. $N$ is
# noise, and its variance grows with the horizon. Schulman et al. (2015) state the general rule for
# stochastic computation graphs: a stochastic node need only be credited with the costs
# *downstream* of it. scgjax applies that rule from the program's data flow, so writing one
# `sg.factor` per reward *is* rewards-to-go; writing one factor for the whole return is the
# naive estimator. Nothing else changes.
#
# The code is `examples/policy_gradient.py`; this notebook runs its experiment at a reduced
# size when `SCGJAX_NOTEBOOK_QUICK=1` (CI does) and at the example's defaults otherwise
# (under two minutes on a 2-core CPU).

# %%
import argparse
import functools
import inspect
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import scgjax as sg

try:  # as a script (and under the tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
except NameError:  # in Jupyter, which runs in notebooks/
    sys.path.insert(0, str(Path.cwd()))
from _setup import QUICK, import_code, output_dir, quick_compile, show_png  # noqa: E402

pg = import_code("policy_gradient")
OUT = output_dir("policy_gradient")
HORIZON = 6 if QUICK else 20  # T
BATCH = 8  # B
STEPS = 80 if QUICK else 600
SEEDS = [0] if QUICK else [0, 1, 2, 3, 4]

env = pg.GridWorld()
print("\n".join(" ".join(row) for row in env.layout))
uniform = float(pg.exact_return(env, jnp.zeros((env.num_states, 4)), HORIZON))
print(f"T = {HORIZON}: optimal return {pg.optimal_return(env, HORIZON):.3f}, "
      f"uniform policy {uniform:.3f}")

# %% [markdown]
# ## The environment and the episode program
#
# A 5x5 grid: start `S`, goal `G` (+1, back to the start), pits `X` (-1, back to the start),
# a wall `#`, and -0.1 for every other move. The best policy runs the 6-move detour around the
# pit as often as the horizon allows (three laps in 20 steps: return 1.3). The transitions
# are two tables indexed in JAX, and the policy is a table of $25 \times 4$ logits,
# $\pi_\theta(a \mid s) = \mathrm{softmax}(\theta_s)_a$, initially uniform. This is the whole
# episode, `B` of them at once in a plate (each reward is divided by `B`, so the objective is
# the batch's mean return):

# %%
print(inspect.getsource(pg.episode))

# %% [markdown]
# ## The credit, derived
#
# `sg.graph` traces the program into its stochastic computation graph and lists, for each
# score-function site, the costs it is credited with. With a factor per step, `a_t` is
# credited with `r_t, r_{t+1}, ...` only, because `s_{t'}` (hence `r_{t'}`) is computed from
# `a_t` only for $t' \ge t$; and element by element through the `episodes` plate (episode
# $n$'s action only with episode $n$'s rewards). With one factor at the end every action is
# credited with the whole return.

# %%
for name, per_step in pg.VARIANTS.items():
    print(f"--- {name}")
    print(sg.graph(functools.partial(pg.episode, env, 4, 2, per_step)))

# %% [markdown]
# ## Training both programs
#
# The same estimator for both (the score function with an exponential moving-average
# baseline per site, `sg.ScoreFunction(sg.baselines.MovingAverage(0.9))`), the same seeds,
# batches of `B = 8` episodes, Adam. There is no guide: `sg.SVI(program, None, optimiser,
# sg.Expectation())`. `pg.train_run` (the example's loop) evaluates the policy's expected
# return *exactly* every 10 steps (the state distribution propagated through the tables, no
# sampling), and at a few checkpoints measures the total gradient variance (the trace of the
# covariance of the one-batch gradient over independent batches, with the run's current
# baselines) and the variance of every site's learning signal ($G_t$ or $R$).

# %%
estimator = pg.make_estimator("score")  # sg.ScoreFunction(sg.baselines.MovingAverage(0.9))
objective = sg.Expectation()
evaluate = jax.jit(functools.partial(pg.exact_return, env, horizon=HORIZON))
settings = argparse.Namespace(steps=STEPS, eval_every=10, checkpoints=3 if QUICK else 7,
                              variance_samples=64 if QUICK else 500)
runs = {}
for name, per_step in pg.VARIANTS.items():
    program = functools.partial(pg.episode, env, HORIZON, BATCH, per_step, estimator=estimator)
    svi = sg.SVI(program, None, optax.adam(0.02), objective)
    sampler = pg.make_gradient_sampler(objective, program)
    init = jax.jit(svi.init)
    runs[name] = [pg.train_run(name, seed, svi, evaluate, sampler, settings, init=init)
                  for seed in SEEDS]
    print(f"{name}: {1e3 * np.mean([r.seconds_per_step for r in runs[name]]):.2f} ms/step")

# %%
optimum = pg.optimal_return(env, HORIZON)
target = uniform + pg.THRESHOLD * (optimum - uniform)
fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 3.8))
for name, results in runs.items():
    colour = pg.COLOURS[name]
    returns = np.stack([r.returns for r in results])
    variances = np.stack([r.variances for r in results])
    steps = results[0].eval_steps
    ax.plot(steps, returns.mean(0), color=colour, label=name)
    ax.fill_between(steps, returns.min(0), returns.max(0), color=colour, alpha=0.2, lw=0)
    bx.semilogy(results[0].variance_steps, np.exp(np.log(variances).mean(0)), "o-",
                color=colour, label=name)
    for when, i, style in (("initial", 0, "o-"), ("final", -1, "s--")):
        signal = results[0].signal_variances[i]  # of r_t / B: times B^2 per episode
        cx.semilogy(range(HORIZON), [BATCH**2 * signal[f"a{t}"] for t in range(HORIZON)],
                    style, ms=3, color=colour, label=f"{name}, {when} policy")
ax.axhline(optimum, color="k", ls="--", lw=1, label="optimum")
ax.axhline(target, color="gray", ls=":", lw=1, label="90% of the way")
ax.set(xlabel="step", ylabel="expected return (exact)",
       title=f"learning curves (mean and range over seeds {SEEDS})")
bx.set(xlabel="step", ylabel="trace of the gradient covariance",
       title="gradient variance along training")
cx.set(xlabel="time step t of the action", ylabel="Var[learning signal] per episode",
       title="what a_t is credited with: Var[G_t] vs Var[R]")
for a in (ax, bx, cx):
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# The final policies (first seed): expected visits per episode of every cell, and the greedy
# action with its probability as the arrow's opacity (the example's own figure).

# %%
path = OUT / "policy_gradient_policy.png"
pg.plot_policy(path, env, {name: r[0].params["logits"] for name, r in runs.items()}, HORIZON)
show_png(path)

# %% [markdown]
# ## Reading the numbers
#
# At the example's defaults (600 steps, 5 seeds, $T = 20$, as this notebook runs without
# `SCGJAX_NOTEBOOK_QUICK`; the returns are exact, so the numbers are deterministic given the
# seeds) rewards-to-go reaches 90% of the way from the uniform policy to the optimum in 228
# steps on average, the whole-return program in 274, and both end near the optimum (1.271
# and 1.259 of 1.3). Along training the whole-return gradient has 1.8 times the variance
# (geometric mean over checkpoints and seeds). The learning signal of `a_t`, $G_t$, has a
# variance that falls with $t$ (fewer rewards ahead), while $R$'s is the same for every
# action. The price is a bigger graph: one cost node per step, each with its own credit and
# baseline (about 0.8 against 0.6 ms per step on a 2-core CPU). The numbers of this run:

# %%
reference = np.stack([r.variances for r in runs["rewards-to-go"]])
for name, results in runs.items():
    variances = np.stack([r.variances for r in results])
    reached = [s for r in results
               if np.isfinite(s := pg.steps_to_threshold(r.eval_steps, r.returns, target))]
    final = np.mean([r.returns[-1] for r in results])
    ratio = np.exp(np.mean(np.log(variances / reference)))
    print(f"{name:>14}: final return {final:.3f} (optimum {optimum:.3f}); 90% reached by "
          f"{len(reached)}/{len(results)} seeds"
          + (f", after {np.mean(reached):.0f} steps on average" if reached else "")
          + f"; gradient variance {np.exp(np.log(variances).mean()):.3g} "
          f"({ratio:.2f}x rewards-to-go's)")

# %% [markdown]
# ## Long horizons: the episode as one `sg.scan`
#
# The episode above is a Python loop: at $T$ steps the program has $T$ sample sites and $T$
# factors, and tracing it, working out the credit and compiling it grow with $T$. For hundreds
# of steps, write the loop with `sg.scan` (NumPyro's `contrib.control_flow.scan`): the body
# samples one action and writes one factor, it is traced once and compiled as one `lax.scan`,
# and each of its sites becomes one site of the program with a leading time axis, here
# $(T, B)$. The carry is the state and the return so far, of the `episodes` plate's shape:

# %%
print(inspect.getsource(pg.episode_scan))

# %% [markdown]
# The graph has one stochastic node and one cost, whatever $T$. The credit is still
# rewards-to-go, now read from the loop's data flow: step $s$ of `a` reaches step $t$ of `r`
# through the body when $t = s$ (lag 0) and through the carried state when $t > s$ (lag 1
# stands for every later step), never before; the objective computes the credited sums $G_t$
# with a cumulative sum over the time axis, $O(T)$.

# %%
g = sg.graph(functools.partial(pg.episode_scan, env, 200, 2, True))
print(g)
print("time credit of a to r:", sorted(g.time_credit("a", "r", "time")))

# %% [markdown]
# The example's `--scan` mode measures, on the same objective (`sg.Expectation` with RLOO,
# `K = 2`), how long one gradient step takes to trace and compile against $T$ for both ways
# of writing the loop, then the gradient variance of both credits at the uniform policy
# against $T$, and trains both at the long horizon (default $T = 200$; this notebook in quick
# mode: $T = 50$ and a few steps). RLOO rather than the moving average: a loop's site is one
# site for all $T$ steps, and `MovingAverage` keeps one scalar per site, a poor baseline for
# $G_t$, whose mean falls from $E[R]$ at $t = 0$ to about $0$ at $t = T - 1$ (RLOO's
# leave-one-out baseline is per element: per step and per episode).

# %%
# quick mode: small sizes and XLA's optimisations off (the timings then mean little)
with quick_compile():
    scan = pg.main(["--scan", "--no-progress", "--out", str(OUT / "scan")]
                   + (["--quick"] if QUICK else []))
show_png(scan["paths"]["compile"])

# %% [markdown]
# Left: the Python loop's trace-and-compile time grows with $T$ (about 4, 6 and 15-22 s at
# $T = 10, 20, 50$ on a shared 2-core CPU, almost all of it XLA's), `sg.scan`'s stays at 2-3 s
# from $T = 10$ to $1000$. Right: once compiled, a step's run time grows linearly with $T$
# either way (2.8 ms at $T = 1000$). In quick mode XLA's optimisations are off and the sizes
# small: these timings then mean little.

# %%
show_png(scan["paths"]["training"])

# %% [markdown]
# Left: at the uniform policy the whole-return gradient has about twice the variance of
# rewards-to-go at every horizon (1.8-2.1x from $T = 20$ to $500$), and both grow like $T^2$
# (a sum of $T$ terms, each with a learning signal of size $O(T)$). Middle and right: along
# training at $T = 200$ the gap widens (2.7x, geometric mean over checkpoints and 5 seeds),
# and rewards-to-go gets 90% of the way from the uniform policy's return (-32.0) to the
# optimum (16.3) in 202 steps against 258, ending at 15.71 against 15.34. The numbers of this
# run:

# %%
for T in sorted(scan["variance_by_horizon"]["rewards-to-go"]):
    to_go = scan["variance_by_horizon"]["rewards-to-go"][T]
    whole = scan["variance_by_horizon"]["whole return"][T]
    print(f"T = {T:4d}: gradient variance at the uniform policy {to_go:10.4g} (rewards-to-go), "
          f"{whole:10.4g} (whole return), ratio {whole / to_go:.2f}")
for name, r in scan["variants"].items():
    print(f"{name:>14}: final return {r['final_return']:.2f} (optimum "
          f"{scan['optimal_return']:.2f}, uniform {scan['uniform_return']:.2f}); gradient "
          f"variance along training {r['variance']:.4g} ({r['variance_ratio']:.2f}x "
          f"rewards-to-go's)")
