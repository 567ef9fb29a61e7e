"""Policy gradients with credit assignment over time: rewards-to-go from data flow vs REINFORCE.

**The environment.** A 5x5 gridworld (``GRID``; ``S`` start, ``G`` goal, ``X`` pit, ``#``
wall)::

    . . . . .
    S . X . G
    . . # . .
    . X . . .
    . . . . .

Four actions (up, right, down, left), deterministic moves; a move into a wall or off the grid
leaves the agent where it is. Entering ``G`` scores ``+1`` and sends the agent back to ``S``;
entering a pit ``X`` scores ``-1`` and sends it back to ``S``; every other move costs ``-0.1``.
An episode is ``T`` steps (default 20) from ``S``, so a good policy runs the 6-move detour
around the pit as many times as it can: the optimal return is ``3 x (1 - 0.5) - 0.2 = 1.3``
(exact finite-horizon value iteration, :func:`optimal_return`); the uniform policy's is
``-3.18``. The transitions are two tables ``next_state[s, a]`` and ``reward[s, a]`` indexed in
JAX: no Python control flow on traced values.

**The policy** is tabular, ``π_θ(a | s) = softmax(θ[s])_a`` with ``θ`` a ``sg.param`` table of
``25 x 4`` logits, initially 0 (uniform).

**The programs.** An episode is an scgjax program run by ``sg.Expectation`` (no guide): a
Python loop over ``t = 0..T-1`` (unrolled into ``T`` sites; ``--scan`` below runs the same
episode as one ``sg.scan``) with ``a_t = sg.sample(f"a{t}", Categorical(logits=θ[s_t]))``,
``s_{t+1} = next_state[s_t, a_t]``, ``r_t = reward[s_t, a_t]``, vectorised over a batch of
``B`` episodes by ``sg.plate("episodes", B)``. Two ways to write the rewards (each divided by
``B``, so the objective is the mean return of the batch):

- ``rewards-to-go``: ``sg.factor(f"r{t}", r_t)`` at every step. scgjax finds from the data flow
  that ``r_{t'}`` depends on ``a_t`` only for ``t' >= t`` (``s_{t'}`` is computed from ``a_t``
  only then), so ``a_t`` is credited with ``r_t, r_{t+1}, ...`` only:
  ``sg.graph(episode).credited_costs("a3") == ("r3", ..., "r19")``, and element by element
  through the plate (episode ``n``'s action only with episode ``n``'s rewards). Nothing in the
  program says "rewards-to-go": it is derived.
- ``whole return``: one ``sg.factor("return", Σ_t r_t)`` at the end: every action is credited
  with every reward, the naive REINFORCE.

**The maths.** With ``J(θ) = E[R]``, ``R = Σ_t r_t``, ``G_t = Σ_{t' >= t} r_{t'}`` and
``g_t = ∇_θ log π_θ(a_t | s_t)``, the two estimates (one episode; averaged over ``B``) are::

    rewards-to-go:  ĝ = Σ_t g_t (G_t - b_t)
    whole return:   ĝ = Σ_t g_t (R - b)

Both are unbiased. Let ``h_t = (s_0, a_0, ..., s_t)`` be the history before ``a_t`` is drawn;
then ``E[g_t | h_t] = Σ_a ∇π(a | s_t) = ∇ Σ_a π(a | s_t) = 0``, so ``E[g_t c] = 0`` for any
``c`` that is a function of ``h_t``: a baseline (``b``, ``b_t`` computed from earlier training
steps), or a past reward ``r_{t'}``, ``t' < t``. The whole-return estimate is the
rewards-to-go one plus ``N = Σ_t g_t (Σ_{t' < t} r_{t'} + b_t - b)``, a sum of such zero-mean
terms (Williams 1992; Schulman et al. 2015, Thm. 1), so both have the policy gradient as
mean. ``N`` is noise: ``Var[whole] = Var[rewards-to-go] + Var[N] + 2 Cov[rewards-to-go, N]``.
That the sum is larger is not a theorem (the covariance can be negative), but ``Var[N]`` grows
with the horizon and with how random the past rewards are (here: how many laps and pit falls
an episode has had so far), and in practice dropping ``N`` lowers the variance: measured here,
by about 1.8x along training and 2.6x at the uniform policy.

**The estimator** is the same for both: by default the score function with an exponential
moving-average baseline per site (``sg.ScoreFunction(sg.baselines.MovingAverage(0.9))``, the
baseline of ``a_t`` tracks the mean of its learning signal, ``G_t`` or ``R``); ``--estimator
rloo`` uses ``sg.RLOO()`` over ``--num-particles K`` particles (``K`` episodes per plate
element, the leave-one-out mean of the signal as baseline). Same seeds, steps and Adam.

**What is measured.** The expected return of the current policy, *exactly* (the state
distribution propagated through the tables, :func:`exact_return`; jitted), every
``--eval-every`` steps; the total gradient variance (the trace of the covariance of the
estimate of ``∇_θ`` mean return from one batch, over ``--variance-samples`` independent
batches: ``jax.vmap`` of ``jax.grad`` of the loss with the run's current baseline state) at
``--checkpoints`` points along each run; the learning-signal variance of every site at the
initial policy and at the end (the objective's recorded learning signals: ``Var[G_t]`` falls
with ``t``, ``Var[R]`` does not). Writes into ``--out``:

- ``returns.png``: exact return vs steps, mean and min-max over seeds;
- ``variance.png``: gradient variance vs steps (log scale) and learning-signal variance per
  time step;
- ``policy.png``: greedy action arrows and state visitation of each variant's final policy
  (first seed);
- ``graph.dot``: ``sg.graph(episode).to_dot()`` for ``T = 3``, ``B = 2``.

It prints a table: final return, steps to reach 90% of the way from the uniform policy's
return to the optimum, gradient variance and its ratio to the rewards-to-go variant's, ms per
step.

Results with the defaults (600 steps, 5 seeds, B = 8, T = 20, score function + moving
average; exact returns, deterministic given the seeds)::

    variant         final return     steps to 90%  grad variance  variance / rtg
    rewards-to-go  1.271 ± 0.004  228 (5/5 seeds)         0.1776            1.00
    whole return   1.259 ± 0.004  274 (5/5 seeds)         0.3158            1.78

(``--estimator rloo --num-particles 2 --seeds 0,1,2``: 207 vs 250 steps, variance ratio 1.58.)
Per step, the rewards-to-go program costs more (``T`` cost nodes instead of one, each with its
own credit): about 0.8 against 0.6 ms on a 2-core CPU.

**Long horizons: the episode as one** ``sg.scan`` (``--scan``). A Python loop unrolls into
``T`` sample sites and ``T`` factors: tracing, the credit analysis and XLA's compile grow with
``T`` (about 4, 6 and 15-22 s at ``T = 10, 20, 50`` with RLOO on a shared 2-core CPU), so
hundreds of steps would take minutes. :func:`episode_scan` writes the same episode as
``sg.scan(step, (s_0, 0), length=T)`` whose body samples ``a = sg.sample("a", ...)`` and writes
``sg.factor("r", r / B)``: one site ``a`` and one cost ``r`` with a leading time axis ``(T,
B)``, the body traced once and compiled as one ``lax.scan``. The credit is still rewards-to-go,
now read from the loop's data flow: ``sg.graph(episode_scan).time_credit("a", "r", "time") ==
{0, 1}`` (step ``s`` of ``a`` reaches step ``t`` of ``r`` at ``t - s = 0`` through the body and
``t - s > 0`` through the carried state, never before). The whole-return variant carries ``Σ_t
r_t`` out of the loop into one factor.
``--scan`` measures

- the time to trace and compile one jitted gradient step (``jax.jit(...).lower().compile()``,
  split into tracing, scgjax's analysis included, and XLA) and the time per step, against
  ``T``: the Python loop at ``--loop-horizons`` (default 10, 20, 50), ``sg.scan`` at
  ``--scan-horizons`` (default 10 ... 1000), in ``scan_compile.png``;
- the gradient variance of both credits at the uniform policy against ``T``
  (``--variance-horizons``), and along training at ``T = --horizon`` (default 200), with the
  exact learning curves of both, in ``scan_training.png``; ``scan_policy.png`` (the final
  policies) and ``scan_graph.dot``.

In ``--scan`` mode the estimator defaults to ``rloo`` with ``K = 2``: its baseline is per
element, so per step and per episode. ``MovingAverage`` keeps one scalar per *site*; a loop's
site ``a`` is one site for all ``T`` steps, so its single baseline sits near the mean of
``G_0 ... G_{T-1}``, far from ``E[G_t]`` at both ends of the episode (the Python loop has a
baseline per ``a_t``). With it (``--estimator score``) rewards-to-go loses its edge at ``T =
200``: in one run (seed 0, 400 steps) its gradient variance was 370 and 49 at steps 133 and 267
against the whole return's 175 and 24, and it ended at return 11.4 against 13.1 (the whole
return's single baseline, ``E[R]``, is the right constant for every step). Results of ``--scan``
with its defaults (``T = 200``, ``B = 8``, RLOO ``K = 2``, 600 steps, 5 seeds; optimum 16.3,
uniform policy -32.0; exact returns; the times on a 2-core CPU shared with other work, load
average about 6, the fastest of 2 rounds)::

    trace + compile (s)  T=10  T=20  T=50  T=100  T=200  T=500  T=1000
    Python loop           4.0   6.7  22.4
    sg.scan               2.5   2.2   2.5    2.6    2.3    2.1     2.0

    whole / rewards-to-go gradient variance, uniform policy:
    T=20 1.82x, T=50 1.98x, T=100 1.94x, T=200 2.07x, T=500 2.02x

    variant          final return     steps to 90%  grad variance  variance / rtg
    rewards-to-go  15.714 ± 0.028  202 (5/5 seeds)          3.336            1.00
    whole return   15.340 ± 0.018  258 (5/5 seeds)          9.089            2.72

(An earlier run, one round, not interleaved: loop 3.3, 5.8, 14.9 s; scan 1.5-3.0 s.) Once
compiled, a step costs about as much either way (0.50 against 0.25 ms at ``T = 50`` in this
run, 0.77 against 0.80 in the earlier one) and grows linearly with ``T`` (2.8 ms at ``T =
1000``). Both variances grow like ``T²``.

Run (about 40 s of CPU time; 1.5 minutes on a shared 2-core CPU; ``--scan`` 2.5 minutes of CPU
time, 3.5 on a shared 2-core CPU)::

    python examples/policy_gradient.py                       # 600 steps, 5 seeds, B = 8, T = 20
    python examples/policy_gradient.py --estimator rloo --num-particles 2 --seeds 0,1,2
    python examples/policy_gradient.py --scan                # T = 200 in sg.scan; compile times
    python examples/policy_gradient.py --scan --quick        # the same, small (CI)
    dot -Tpng out/policy_gradient/graph.dot -o graph.png     # render the graph (Graphviz)
"""

from __future__ import annotations

import argparse
import copy
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
from scgjax import dist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = [
    "ACTIONS",
    "GRID",
    "VARIANTS",
    "GridWorld",
    "RunResult",
    "episode",
    "episode_scan",
    "exact_return",
    "main",
    "make_estimator",
    "make_gradient_sampler",
    "occupancy",
    "optimal_return",
    "parse",
    "step_timings",
    "train_run",
]

GRID = (
    ".....",
    "S.X.G",
    "..#..",
    ".X...",
    ".....",
)
#: (row, column) moves of the actions 0..3
ACTIONS = ((-1, 0), (0, 1), (1, 0), (0, -1))
ACTION_NAMES = ("up", "right", "down", "left")
#: variant name -> whether rewards are per-step factors (rewards-to-go credit)
VARIANTS = {"rewards-to-go": True, "whole return": False}
COLOURS = {"rewards-to-go": "#1f77b4", "whole return": "#d62728"}
THRESHOLD = 0.9


# --------------------------------------------------------------------------------------------
# The environment


@dataclasses.dataclass(frozen=True, eq=False)
class GridWorld:
    """A deterministic gridworld as two tables, built from a layout of equal-length strings.

    Cells: ``S`` start (exactly one), ``G`` goal (+``goal_reward``, back to ``S``), ``X`` pit
    (``pit_reward``, back to ``S``), ``#`` wall (never entered), ``.`` free. Every other move,
    bumps into walls and edges included (the agent stays), scores ``step_reward``. States are
    the cells in row-major order, ``s = row * width + column``.

    Attributes:
        next_state: ``(S, 4)`` int32 numpy table of the state after action ``a`` in ``s``.
        reward: ``(S, 4)`` float32 numpy table of the reward of that move.
    """

    layout: tuple[str, ...] = GRID
    step_reward: float = -0.1
    pit_reward: float = -1.0
    goal_reward: float = 1.0
    next_state: np.ndarray = dataclasses.field(init=False, repr=False)
    reward: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        rows = tuple(self.layout)
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError(f"layout rows must be non-empty and of equal length, got {rows}")
        if set("".join(rows)) - set("SGX#."):
            raise ValueError(f"layout may only contain 'S', 'G', 'X', '#', '.', got {rows}")
        if "".join(rows).count("S") != 1:
            raise ValueError("layout must have exactly one start 'S'")
        height, width = len(rows), len(rows[0])
        start = "".join(rows).index("S")
        nxt = np.zeros((height * width, len(ACTIONS)), np.int32)
        rew = np.zeros((height * width, len(ACTIONS)), np.float32)
        for r in range(height):
            for c in range(width):
                for a, (dr, dc) in enumerate(ACTIONS):
                    rr, cc = r + dr, c + dc
                    if not (0 <= rr < height and 0 <= cc < width) or rows[rr][cc] == "#":
                        rr, cc = r, c
                    cell = rows[rr][cc]
                    if cell == "X":
                        nxt[r * width + c, a], rew[r * width + c, a] = start, self.pit_reward
                    elif cell == "G":
                        nxt[r * width + c, a], rew[r * width + c, a] = start, self.goal_reward
                    else:
                        nxt[r * width + c, a] = rr * width + cc
                        rew[r * width + c, a] = self.step_reward
        object.__setattr__(self, "layout", rows)
        object.__setattr__(self, "next_state", nxt)
        object.__setattr__(self, "reward", rew)

    @property
    def height(self) -> int:
        return len(self.layout)

    @property
    def width(self) -> int:
        return len(self.layout[0])

    @property
    def num_states(self) -> int:
        return self.height * self.width

    @property
    def start(self) -> int:
        return "".join(self.layout).index("S")

    def cells(self, kind: str) -> list[tuple[int, int]]:
        """``(row, column)`` of every cell of ``kind`` (``"S"``, ``"G"``, ``"X"``, ``"#"``)."""
        return [(r, c) for r, row in enumerate(self.layout) for c, ch in enumerate(row)
                if ch == kind]

    def step(self, s: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(next state, reward)`` of action ``a`` in state ``s`` (int arrays, any shape),
        by indexing the tables: traceable, vectorised, no Python branching on values."""
        return jnp.asarray(self.next_state)[s, a], jnp.asarray(self.reward)[s, a]


# --------------------------------------------------------------------------------------------
# The episode, as an scgjax program


def episode(env: GridWorld, horizon: int, num_episodes: int, per_step: bool = True,
            estimator: sg.Estimator | None = None) -> None:
    """``num_episodes`` episodes of ``horizon`` steps of the tabular softmax policy.

    ``per_step=True`` writes one ``sg.factor(f"r{t}", r_t / B)`` per step (scgjax credits
    ``a_t`` with the rewards-to-go); ``False`` one ``sg.factor("return", R / B)`` at the end
    (every action credited with every reward). ``estimator`` is given to every action site
    (``None``: the objective's default).
    """
    logits = sg.param("logits", jnp.zeros((env.num_states, len(ACTIONS))))
    s = jnp.full((num_episodes,), env.start, jnp.int32)
    total = jnp.zeros((num_episodes,))
    with sg.plate("episodes", num_episodes):
        for t in range(horizon):
            a = sg.sample(f"a{t}", dist.Categorical(logits=logits[s]), estimator=estimator)
            s, r = env.step(s, a)
            if per_step:
                sg.factor(f"r{t}", r / num_episodes)
            else:
                total = total + r
        if not per_step:
            sg.factor("return", total / num_episodes)


def episode_scan(env: GridWorld, horizon: int, num_episodes: int, per_step: bool = True,
                 estimator: sg.Estimator | None = None) -> None:
    """The episodes of :func:`episode` as one ``sg.scan`` over ``horizon`` steps.

    The body samples ``a = sg.sample("a", ...)`` and, with ``per_step``, writes
    ``sg.factor("r", r_t / B)``: one site ``a`` and one cost ``r`` of batch shape ``(T, B)``
    (the loop's time axis ``"time"`` in front of the ``episodes`` plate). The carry is the
    state and the return so far, of the plate's shape ``(B,)``; without ``per_step`` the return
    leaves the loop into one ``sg.factor("return", R / B)``. The body is traced once, so the
    program's size and its compile time do not grow with ``horizon``.
    """
    logits = sg.param("logits", jnp.zeros((env.num_states, len(ACTIONS))))

    def step(carry, _):
        s, total = carry
        a = sg.sample("a", dist.Categorical(logits=logits[s]), estimator=estimator)
        s, r = env.step(s, a)
        if per_step:
            sg.factor("r", r / num_episodes)
        return (s, total + r), None

    start = (jnp.full((num_episodes,), env.start, jnp.int32), jnp.zeros((num_episodes,)))
    with sg.plate("episodes", num_episodes):
        (_, total), _ = sg.scan(step, start, length=horizon)
        if not per_step:
            sg.factor("return", total / num_episodes)


# --------------------------------------------------------------------------------------------
# Exact evaluation


def occupancy(env: GridWorld, logits: jax.Array, horizon: int) -> jax.Array:
    """``(horizon, S)``: the probability of being in each state at each step ``t < horizon``
    under ``softmax(logits)``, from the start state (exact, by propagating the distribution
    through the transition table)."""
    policy = jax.nn.softmax(logits, axis=-1)
    nxt = jnp.asarray(env.next_state).reshape(-1)

    def advance(d, _):
        flow = (d[:, None] * policy).reshape(-1)
        return jnp.zeros_like(d).at[nxt].add(flow), d

    d0 = jnp.zeros(env.num_states).at[env.start].set(1.0)
    return jax.lax.scan(advance, d0, None, length=horizon)[1]


def exact_return(env: GridWorld, logits: jax.Array, horizon: int) -> jax.Array:
    """The expected return ``E[Σ_t r_t]`` of the policy ``softmax(logits)`` (exact;
    differentiable, so ``jax.grad`` of it is the exact policy gradient)."""
    d = occupancy(env, logits, horizon)
    policy = jax.nn.softmax(logits, axis=-1)
    return jnp.sum(d[:, :, None] * policy[None] * jnp.asarray(env.reward)[None])


def optimal_return(env: GridWorld, horizon: int) -> float:
    """The best expected return of any policy over ``horizon`` steps from the start
    (finite-horizon value iteration; here a stationary deterministic policy attains it)."""
    value = np.zeros(env.num_states)
    for _ in range(horizon):
        value = np.max(env.reward + value[env.next_state], axis=1)
    return float(value[env.start])


# --------------------------------------------------------------------------------------------
# Training


def make_estimator(name: str) -> sg.Estimator:
    """``"score"``: ``ScoreFunction(MovingAverage(0.9))``; ``"rloo"``: ``RLOO()``."""
    if name == "score":
        return sg.ScoreFunction(sg.baselines.MovingAverage(0.9))
    if name == "rloo":
        return sg.RLOO()
    raise ValueError(f"unknown estimator {name!r}; choose 'score' or 'rloo'")


def make_gradient_sampler(objective: sg.Objective, fn: Callable) -> Callable:
    """A jitted ``(keys, params, state) -> (total variance, signal variances)``.

    One gradient estimate of the loss per key (``jax.vmap`` over keys of ``jax.grad`` of
    ``objective.loss_with_state`` with the estimators' ``state``, e.g. the run's moving
    averages). Returns the sum over the logits of the per-element variance (``ddof=1``), the
    trace of the covariance, and per site ``a_t`` the variance of its learning signal ``Q``
    (over keys and particles, averaged over the episodes), the objective's
    ``metrics["learning_signals"]`` (as in ``sg.diagnostics.gradient_variance``, which computes
    the same per element but compiles anew on every call). Compiled once per program.
    """
    recording = copy.copy(objective)
    recording.record_signals = True

    @jax.jit
    def sample(keys: jax.Array, params: dict, state: dict) -> tuple[jax.Array, dict]:
        def one(key):
            loss = lambda p: recording.loss_with_state(key, p, state, fn)
            grads, (_, metrics) = jax.grad(loss, has_aux=True)(params)
            return grads["logits"], metrics["learning_signals"]

        grads, signals = jax.vmap(one)(keys)
        total = jnp.sum(jnp.var(grads, axis=0, ddof=1))
        signal_var = {site: jnp.mean(jnp.var(q.reshape(-1, *q.shape[2:]), axis=0, ddof=1))
                      for site, q in signals.items()}
        return total, signal_var

    return sample


def step_timings(objective: sg.Objective, fn: Callable, compiles: int = 1, calls: int = 20
                 ) -> tuple[float, float, float]:
    """``(trace seconds, compile seconds, seconds per call)`` of one jitted gradient step.

    The step is ``jax.jit(jax.value_and_grad(loss))`` of ``objective.loss_with_state`` on the
    program ``fn`` at its initial params and estimator state. Tracing
    (``jitted.lower(...)``) runs the program and scgjax's analysis (the sites, the data flow,
    the credit) and builds the surrogate; compiling (``lowered.compile()``) is XLA's. Each is
    the fastest of ``compiles`` fresh ``jax.jit``s (on a shared machine the fastest is the
    least disturbed); the time per call is the median of ``calls`` calls after a first one.
    """
    params = sg.init_params(0, fn)
    state = objective.init_state(0, params, fn)
    key = jax.random.key(0)
    trace_s, compile_s = math.inf, math.inf
    for _ in range(compiles):
        step = jax.jit(jax.value_and_grad(
            lambda p, k: objective.loss_with_state(k, p, state, fn)[0]))
        start = time.perf_counter()
        lowered = step.lower(params, key)
        traced = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
        trace_s, compile_s = min(trace_s, traced - start), min(compile_s, done - traced)
    jax.block_until_ready(compiled(params, key))
    seconds = []
    for i in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, jax.random.key(i + 1)))
        seconds.append(time.perf_counter() - t0)
    return trace_s, compile_s, float(np.median(seconds))


@dataclasses.dataclass
class RunResult:
    """One training run: exact returns at ``eval_steps``, total gradient variances and the
    learning-signal variance per site at ``variance_steps``, final params, and the time per
    step (compilation excluded)."""

    variant: str
    seed: int
    eval_steps: np.ndarray
    returns: np.ndarray
    variance_steps: np.ndarray
    variances: np.ndarray
    signal_variances: list[dict[str, float]]
    params: dict
    seconds_per_step: float


def train_run(variant: str, seed: int, svi: sg.SVI, evaluate: Callable,
              sampler: Callable, args: argparse.Namespace, bar: Any = None,
              init: Callable | None = None) -> RunResult:
    """Train one variant from ``seed`` for ``args.steps`` steps with ``svi.update`` (from
    ``init(key)``, default ``svi.init``; pass ``jax.jit(svi.init)`` to compile it once); evaluate
    the exact return every ``args.eval_every`` steps and the gradient variance at
    ``args.checkpoints`` evenly spaced steps (0 and the last included). The loop calls
    ``svi.update`` itself: ``svi.run`` between evaluations a few steps apart would spend more
    time checking the arguments (one un-jitted run of the program per call) than training."""
    key = jax.random.key(seed)
    key_init, key_var = jax.random.split(key)
    state = (init or svi.init)(key_init)
    checkpoints = {int(round(x)) for x in np.linspace(0, args.steps, args.checkpoints)}
    eval_at = set(range(0, args.steps + 1, args.eval_every)) | {args.steps}
    var_keys = jax.random.split(key_var, args.variance_samples)
    eval_steps, returns, variances, signals = [], [], [], []
    seconds, timed = 0.0, 0
    for i in range(args.steps + 1):
        if i in eval_at:
            eval_steps.append(i)
            returns.append(float(evaluate(state.params["logits"])))
            if bar is not None:
                bar.set_postfix_str(f"{variant}, seed {seed}: return {returns[-1]:.3f}")
        if i in checkpoints:
            total, signal_var = sampler(var_keys, state.params, state.estimator_state)
            variances.append(float(total))
            signals.append({site: float(v) for site, v in signal_var.items()})
        if i == args.steps:
            break
        start = time.perf_counter()
        state, loss = svi.update(state)
        if i > 0:  # the first step may compile
            jax.block_until_ready(loss)
            seconds += time.perf_counter() - start
            timed += 1
        if bar is not None:
            bar.update(1)
    return RunResult(variant, seed, np.asarray(eval_steps), np.asarray(returns),
                     np.asarray(sorted(checkpoints)), np.asarray(variances), signals, state.params,
                     seconds / timed if timed else float("nan"))


def steps_to_threshold(steps: np.ndarray, returns: np.ndarray, target: float) -> float:
    """The first evaluated step whose return is at least ``target`` (``nan`` if none)."""
    hit = np.nonzero(returns >= target)[0]
    return float(steps[hit[0]]) if hit.size else float("nan")


# --------------------------------------------------------------------------------------------
# Plots


def plot_returns(path: Path, runs: dict[str, list[RunResult]], optimum: float, uniform: float,
                 title: str) -> None:
    """Exact expected return vs steps: mean over seeds (line) and min-max (band)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, results in runs.items():
        steps = results[0].eval_steps
        curves = np.stack([r.returns for r in results])
        ax.plot(steps, curves.mean(0), color=COLOURS[name],
                label=f"{name} ({len(results)} seeds)")
        ax.fill_between(steps, curves.min(0), curves.max(0), color=COLOURS[name], alpha=0.2,
                        linewidth=0)
    ax.axhline(optimum, color="k", ls="--", lw=1, label=f"optimum {optimum:.2f}")
    target = uniform + THRESHOLD * (optimum - uniform)
    ax.axhline(target, color="gray", ls=":", lw=1,
               label=f"{THRESHOLD:.0%} of the way from uniform")
    ax.set_xlabel("training step")
    ax.set_ylabel("expected return (exact)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variance(path: Path, runs: dict[str, list[RunResult]],
                  signal_variance: dict[str, dict[str, dict[str, float]]], title: str) -> None:
    """Left: total gradient variance vs steps along each run (log scale; geometric mean
    over seeds, min-max band). Right: learning-signal variance of each ``a_t``, per episode,
    at the uniform policy (solid) and the first seed's final policy (dashed)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2),
                                  gridspec_kw={"width_ratios": [1.4, 1]})
    for name, results in runs.items():
        steps = results[0].variance_steps
        v = np.stack([r.variances for r in results])
        ax.plot(steps, np.exp(np.log(v).mean(0)), "o-", ms=3, color=COLOURS[name], label=name)
        ax.fill_between(steps, v.min(0), v.max(0), color=COLOURS[name], alpha=0.2,
                        linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient variance (trace of covariance)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    for name, by_time in signal_variance.items():
        signal = "G_t" if VARIANTS[name] else "R"
        for when, style in (("initial", "o-"), ("final", "s--")):
            by_step = sorted((int(site[1:]), v) for site, v in by_time[when].items())
            ax2.plot([t for t, _ in by_step], [v for _, v in by_step], style, ms=3,
                     color=COLOURS[name],
                     label=f"{name}: Var[{signal}], {when} policy")
    ax2.set_yscale("log")
    ax2.set_xlabel("time step t of the action a_t")
    ax2.set_ylabel("learning-signal variance per episode")
    ax2.set_title("variance of what a_t is credited with (first seed)", fontsize=9)
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_policy(path: Path, env: GridWorld, policies: dict[str, jax.Array], horizon: int
                ) -> None:
    """Per variant: expected visits per episode of each cell (colour), the greedy action
    (arrow, opacity = its probability), walls, pits, start and goal."""
    fig, axes = plt.subplots(1, len(policies), figsize=(4.6 * len(policies), 4.4))
    axes = np.atleast_1d(axes)
    for ax, (name, logits) in zip(axes, policies.items(), strict=True):
        visits = np.asarray(occupancy(env, logits, horizon).sum(0)).reshape(env.height,
                                                                           env.width)
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        masked = np.ma.masked_array(visits, mask=np.zeros_like(visits, bool))
        for r, c in env.cells("#"):
            masked.mask[r, c] = True
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad="black")
        im = ax.imshow(masked, cmap=cmap, vmin=0.0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="expected visits per episode")
        for kind, text, colour in (("S", "S", "green"), ("G", "G", "goldenrod"),
                                   ("X", "X", "red")):
            for r, c in env.cells(kind):
                ax.text(c - 0.32, r - 0.22, text, color=colour, fontsize=12, fontweight="bold",
                        ha="center", va="center")
        for r in range(env.height):
            for c in range(env.width):
                if env.layout[r][c] in "#XG":
                    continue
                s = r * env.width + c
                a = int(np.argmax(probs[s]))
                dr, dc = ACTIONS[a]
                ax.annotate("", xy=(c + 0.38 * dc, r + 0.38 * dr),
                            xytext=(c - 0.38 * dc, r - 0.38 * dr),
                            arrowprops={"arrowstyle": "->", "lw": 2,
                                        "color": (0.85, 0.2, 0.1, float(probs[s, a]))})
        ax.set_xticks(range(env.width))
        ax.set_yticks(range(env.height))
        ax.set_title(f"{name}: greedy action (opacity = probability)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LOOP_COLOUR, SCAN_COLOUR = "#d62728", "#1f77b4"


def plot_compile(path: Path, timings: dict[str, dict[int, tuple[float, float, float]]],
                 title: str) -> None:
    """Left: seconds to trace + compile one gradient step against ``T`` (solid: total; dashed:
    XLA's compile alone), Python loop vs ``sg.scan``. Right: milliseconds per step."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, colour in (("Python loop", LOOP_COLOUR), ("sg.scan", SCAN_COLOUR)):
        by_t = timings[label]
        ts = sorted(by_t)
        trace = np.array([by_t[t][0] for t in ts])
        xla = np.array([by_t[t][1] for t in ts])
        ax.plot(ts, trace + xla, "o-", color=colour, label=f"{label}: trace + compile")
        ax.plot(ts, xla, "s--", ms=4, color=colour, alpha=0.7, label=f"{label}: XLA compile")
        bx.plot(ts, [1e3 * by_t[t][2] for t in ts], "o-", color=colour, label=label)
    horizons = sorted(set(timings["Python loop"]) | set(timings["sg.scan"]))
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xticks(horizons)
        a.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        a.set_xlabel("horizon T (steps per episode)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    ax.set_ylabel("seconds, once per program")
    ax.set_title(f"time to trace and compile one gradient step; {title}", fontsize=9)
    bx.set_ylabel("ms per gradient step (compiled)")
    bx.set_title("time per step after compiling", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scan_training(path: Path, by_horizon: dict[str, dict[int, float]],
                       runs: dict[str, list[RunResult]], optimum: float, uniform: float,
                       horizon: int, title: str) -> None:
    """Left: gradient variance at the uniform policy against ``T``, per credit. Middle:
    gradient variance along training at ``T = horizon`` (geometric mean over seeds, min-max
    band). Right: exact return along training (mean, min-max)."""
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, values in by_horizon.items():
        ts = sorted(values)
        ax.plot(ts, [values[t] for t in ts], "o-", color=COLOURS[name], label=name)
    ref, other = by_horizon["rewards-to-go"], by_horizon["whole return"]
    for t in sorted(ref):
        ax.annotate(f"{other[t] / ref[t]:.1f}x", (t, other[t]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7, color=COLOURS["whole return"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted(ref))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("horizon T")
    ax.set_ylabel("gradient variance (trace of covariance)")
    ax.set_title("at the uniform policy (labels: whole / to-go)", fontsize=9)
    for name, results in runs.items():
        steps = results[0].variance_steps
        v = np.stack([r.variances for r in results])
        bx.plot(steps, np.exp(np.log(v).mean(0)), "o-", ms=3, color=COLOURS[name], label=name)
        bx.fill_between(steps, v.min(0), v.max(0), color=COLOURS[name], alpha=0.2, linewidth=0)
        returns = np.stack([r.returns for r in results])
        cx.plot(results[0].eval_steps, returns.mean(0), color=COLOURS[name], label=name)
        cx.fill_between(results[0].eval_steps, returns.min(0), returns.max(0),
                        color=COLOURS[name], alpha=0.2, linewidth=0)
    bx.set_yscale("log")
    bx.set_xlabel("training step")
    bx.set_ylabel("gradient variance (trace of covariance)")
    bx.set_title(f"along training, T = {horizon}", fontsize=9)
    cx.axhline(optimum, color="k", ls="--", lw=1, label=f"optimum {optimum:.1f}")
    cx.axhline(uniform, color="gray", ls=":", lw=1, label=f"uniform policy {uniform:.1f}")
    cx.set_xlabel("training step")
    cx.set_ylabel("expected return (exact)")
    cx.set_title(f"learning curves in sg.scan, T = {horizon}; {title}", fontsize=9)
    for a in (ax, bx, cx):
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers: {text}") from e
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


#: defaults of the flags left unset: Python loop / ``--scan``, full size / ``--quick``
DEFAULTS = {
    "loop": {"steps": 600, "seeds": [0, 1, 2, 3, 4], "horizon": 20, "estimator": "score",
             "checkpoints": 7, "variance_samples": 500},
    "loop-quick": {"steps": 80, "seeds": [0], "horizon": 6, "estimator": "score",
                   "checkpoints": 3, "variance_samples": 64},
    "scan": {"steps": 600, "seeds": [0, 1, 2, 3, 4], "horizon": 200, "estimator": "rloo",
             "checkpoints": 7, "variance_samples": 500, "loop_horizons": [10, 20, 50],
             "scan_horizons": [10, 20, 50, 100, 200, 500, 1000],
             "variance_horizons": [20, 50, 100, 200, 500], "compile_repeats": 2},
    "scan-quick": {"steps": 60, "seeds": [0], "horizon": 50, "estimator": "rloo",
                   "checkpoints": 2, "variance_samples": 32, "loop_horizons": [4, 8],
                   "scan_horizons": [8, 500], "variance_horizons": [50], "compile_repeats": 1},
}


def _horizons(text: str) -> list[int]:
    try:
        values = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"horizons must be comma-separated integers: {text}") from e
    if not values:
        raise argparse.ArgumentTypeError("give at least one horizon")
    return values


def make_parser() -> argparse.ArgumentParser:
    """The flags (see ``--help``)."""
    p = argparse.ArgumentParser(prog="policy_gradient.py",
                                description=__doc__.split("\n", 1)[0])
    p.add_argument("--scan", action="store_true",
                   help="the long-horizon experiment: the episode in sg.scan, compile time "
                   "against T, gradient variance and learning curves at T = --horizon")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for every flag left unset (CI; under 30 s); with --scan "
                   "also XLA's optimisations off (faster compiles, timings that mean little)")
    p.add_argument("--steps", type=int, default=None,
                   help="Adam steps (default: 600; --quick: 80, with --scan 60)")
    p.add_argument("--seeds", "--seed", type=_seeds, default=None,
                   help="comma-separated PRNG seeds, one run per seed and variant "
                   "(default: 0,1,2,3,4; --quick: 0)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="episodes per step, B (default: %(default)s)")
    p.add_argument("--horizon", type=int, default=None,
                   help="steps per episode, T (default: 20, with --scan 200; --quick: 6, "
                   "with --scan 50)")
    p.add_argument("--lr", type=float, default=0.02,
                   help="Adam learning rate (default: %(default)s)")
    p.add_argument("--estimator", choices=("score", "rloo"), default=None,
                   help="score: score function with a moving-average baseline; rloo: "
                   "leave-one-out over --num-particles (default: score, with --scan rloo)")
    p.add_argument("--num-particles", type=int, default=None,
                   help="particles K (default: 1 for score, 2 for rloo)")
    p.add_argument("--eval-every", type=int, default=10,
                   help="steps between exact evaluations (default: %(default)s)")
    p.add_argument("--checkpoints", type=int, default=None,
                   help="points along each run where the gradient variance is measured "
                   "(default: 7; --quick: 3, with --scan 2)")
    p.add_argument("--variance-samples", type=int, default=None,
                   help="gradient estimates per variance measurement (default: 500; "
                   "--quick: 64, with --scan 32)")
    p.add_argument("--loop-horizons", type=_horizons, default=None,
                   help="--scan: horizons T at which the Python loop's compile time is "
                   "measured (default: 10,20,50; --quick: 4,8)")
    p.add_argument("--scan-horizons", type=_horizons, default=None,
                   help="--scan: horizons T at which sg.scan's compile time is measured "
                   "(default: 10,20,50,100,200,500,1000; --quick: 8,500)")
    p.add_argument("--variance-horizons", type=_horizons, default=None,
                   help="--scan: horizons T at which the gradient variance at the uniform "
                   "policy is measured (default: 20,50,100,200,500; --quick: 50)")
    p.add_argument("--compile-repeats", type=int, default=None,
                   help="--scan: rounds of compiling every program (interleaved); the fastest "
                   "of each is kept (default: 2; --quick: 1)")
    p.add_argument("--out", type=Path, default=Path("out") / "policy_gradient",
                   help="folder for the PNGs and graph.dot (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags (``None``: ``sys.argv[1:]``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    mode = ("scan" if args.scan else "loop") + ("-quick" if args.quick else "")
    for flag, value in DEFAULTS[mode].items():
        if getattr(args, flag) is None:
            setattr(args, flag, copy.copy(value))
    for flag in ("steps", "batch_size", "horizon", "eval_every", "checkpoints"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer")
    for flag in ("loop_horizons", "scan_horizons", "variance_horizons", "compile_repeats"):
        values = getattr(args, flag)
        if values is not None and not args.scan:
            parser.error(f"--{flag.replace('_', '-')} goes with --scan")
        if values is not None and min(np.atleast_1d(values)) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive integers")
    if args.checkpoints < 2:
        parser.error("--checkpoints must be at least 2 (the first and the last step)")
    if args.variance_samples < 2:
        parser.error("--variance-samples must be at least 2")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.num_particles is None:
        args.num_particles = 2 if args.estimator == "rloo" else 1
    if args.num_particles < 1 or (args.estimator == "rloo" and args.num_particles < 2):
        parser.error("--num-particles must be >= 1 (>= 2 for rloo)")
    return args


def _format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summarise(runs: dict[str, list[RunResult]], target: float, args: argparse.Namespace,
               optimum: float, uniform: float,
               signal_variance: dict[str, dict[str, dict[str, float]]] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Per variant: the numbers :func:`main` returns; prints the table."""
    reference = np.stack([r.variances for r in runs["rewards-to-go"]])
    summary: dict[str, dict[str, Any]] = {}
    rows = [("variant", "final return", f"steps to {THRESHOLD:.0%}", "grad variance",
             "variance / rtg", "ms/step")]
    for name, results in runs.items():
        returns = np.stack([r.returns for r in results])
        variances = np.stack([r.variances for r in results])
        to_target = [steps_to_threshold(r.eval_steps, r.returns, target) for r in results]
        ratio = float(np.exp(np.mean(np.log(variances / reference))))
        reached = [s for s in to_target if not math.isnan(s)]
        ms = 1e3 * float(np.mean([r.seconds_per_step for r in results]))
        summary[name] = {
            "eval_steps": results[0].eval_steps,
            "returns": returns,
            "variance_steps": results[0].variance_steps,
            "variances": variances,
            "final_return": float(returns[:, -1].mean()),
            "steps_to_threshold": to_target,
            "variance": float(np.exp(np.log(variances).mean())),
            "variance_ratio": ratio,
            "ms_per_step": ms,
            "params": results[0].params,
        }
        if signal_variance is not None:
            summary[name]["signal_variance"] = signal_variance[name]
        steps_text = (f"{np.mean(reached):.0f} ({len(reached)}/{len(results)} seeds)"
                      if reached else f"not reached (0/{len(results)})")
        rows.append((name, f"{returns[:, -1].mean():.3f} ± {returns[:, -1].std():.3f}",
                     steps_text, f"{summary[name]['variance']:.4g}", f"{ratio:.2f}",
                     f"{ms:.2f}"))
    print(f"\nafter {args.steps} steps (exact returns; optimum {optimum:.3f}, uniform "
          f"{uniform:.3f}; {THRESHOLD:.0%} = return {target:.3f}; gradient variance: geometric "
          f"mean over {args.checkpoints} checkpoints and the seeds):")
    print(_format_table(rows))
    return summary


def _train_variants(programs: dict[str, Callable], objective: sg.Objective, evaluate: Callable,
                    args: argparse.Namespace, samplers: dict[str, Callable] | None = None
                    ) -> dict[str, list[RunResult]]:
    """:func:`train_run` of every program for every seed, with one progress bar."""
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(programs) * len(args.seeds) * args.steps, desc="policy gradient",
                   dynamic_ncols=True)
    runs: dict[str, list[RunResult]] = {}
    for name, fn in programs.items():
        svi = sg.SVI(fn, None, optax.adam(args.lr), objective)
        sampler = (samplers or {}).get(name) or make_gradient_sampler(objective, fn)
        init = jax.jit(svi.init)  # compiled once, faster than running it op by op per seed
        runs[name] = [train_run(name, seed, svi, evaluate, sampler, args, bar, init)
                      for seed in args.seeds]
    if bar is not None:
        bar.close()
    return runs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train both variants for every seed; plot, write ``graph.dot``, print the table.

    Returns a dict with ``variants`` (per variant: ``eval_steps``, ``returns`` ``(seeds,
    evals)``, ``variance_steps``, ``variances`` ``(seeds, checkpoints)``, ``final_return``
    (mean over seeds), ``steps_to_threshold`` (per seed; ``nan`` where not reached),
    ``variance`` (geometric mean over checkpoints and seeds), ``variance_ratio`` (to
    rewards-to-go's, geometric mean of the per-checkpoint ratios), ``signal_variance``
    (``"initial"`` and ``"final"``: per site, per episode, first seed), ``ms_per_step``,
    ``params`` (first seed)), ``optimal_return``, ``uniform_return``, ``target_return``,
    ``credited`` (``sg.graph(program).credited_costs("a3")`` of each program; ``a{T-1}`` when
    ``T < 4``), ``paths`` and ``args``.
    """
    args = parse(argv)
    if args.scan:
        return main_scan(args)
    env = GridWorld()
    horizon, batch, k = args.horizon, args.batch_size, args.num_particles
    optimum = optimal_return(env, horizon)
    evaluate = jax.jit(functools.partial(exact_return, env, horizon=horizon))
    uniform = float(evaluate(jnp.zeros((env.num_states, len(ACTIONS)))))
    target = uniform + THRESHOLD * (optimum - uniform)
    print(f"gridworld {env.height}x{env.width}, T={horizon}: optimal return {optimum:.3f}, "
          f"uniform policy {uniform:.3f}; estimator {args.estimator}, K={k}, B={batch} "
          f"episodes/step, Adam lr {args.lr:g}, {args.steps} steps, seeds {args.seeds}")

    estimator = make_estimator(args.estimator)
    objective = sg.Expectation(num_particles=k)
    programs = {name: functools.partial(episode, env, horizon, batch, per_step,
                                        estimator=estimator)
                for name, per_step in VARIANTS.items()}
    site = f"a{min(3, horizon - 1)}"
    credited = {}
    for name, fn in programs.items():
        credited[name] = sg.graph(fn, num_particles=k).credited_costs(site)
        print(f"{name}: {site} is credited with {', '.join(credited[name])}")

    runs = _train_variants(programs, objective, evaluate, args)
    # per episode (the factors are divided by B), at the uniform policy and at the end
    signal_variance = {
        name: {when: {f"a{t}": results[0].signal_variances[i][f"a{t}"] * batch**2
                      for t in range(horizon)}
               for when, i in (("initial", 0), ("final", -1))}
        for name, results in runs.items()}

    summary = _summarise(runs, target, args, optimum, uniform, signal_variance)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"returns": out / "returns.png", "variance": out / "variance.png",
             "policy": out / "policy.png", "graph": out / "graph.dot"}
    setting = (f"{env.height}x{env.width} gridworld, T={horizon}, B={batch}, "
               f"{args.estimator} (K={k}), Adam {args.lr:g}")
    plot_returns(paths["returns"], runs, optimum, uniform, f"exact expected return; {setting}")
    plot_variance(paths["variance"], runs, signal_variance,
                  f"gradient variance along each run; {setting}")
    plot_policy(paths["policy"], env, {n: r[0].params["logits"] for n, r in runs.items()},
                horizon)
    short = functools.partial(episode, env, min(3, horizon), 2, True, estimator=estimator)
    paths["graph"].write_text(sg.graph(short, num_particles=k).to_dot() + "\n")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {
        "variants": summary,
        "optimal_return": optimum,
        "uniform_return": uniform,
        "target_return": target,
        "credited": credited,
        "paths": paths,
        "args": vars(args),
    }


def main_scan(args: argparse.Namespace) -> dict[str, Any]:
    """``--scan``: compile time against ``T`` (Python loop vs ``sg.scan``), the gradient
    variance of both credits against ``T`` at the uniform policy, and training at ``T =
    --horizon`` in ``sg.scan``; writes ``scan_compile.png``, ``scan_training.png``,
    ``scan_policy.png`` and ``scan_graph.dot``.

    Returns a dict with ``timings`` (``"Python loop"`` and ``"sg.scan"``: ``T -> (trace s,
    compile s, s per step)``), ``variance_by_horizon`` (per variant: ``T -> gradient variance``
    at the uniform policy), ``variants`` (as :func:`main`'s, without ``signal_variance``),
    ``optimal_return``, ``uniform_return``, ``target_return``, ``time_credit``
    (``time_credit("a", "r", "time")`` of the rewards-to-go program), ``credited``
    (``credited_costs("a")`` of each program), ``paths`` and ``args``.

    With ``--quick``, XLA's optimisations are off while it runs (``jax_disable_most_optimizations``;
    restored after): the many small programs compile about twice as fast, and the compile times
    it reports mean little.
    """
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", before or args.quick)
    try:
        return _main_scan(args)
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def _main_scan(args: argparse.Namespace) -> dict[str, Any]:
    env = GridWorld()
    horizon, batch, k = args.horizon, args.batch_size, args.num_particles
    optimum = optimal_return(env, horizon)
    evaluate = jax.jit(functools.partial(exact_return, env, horizon=horizon))
    uniform = float(evaluate(jnp.zeros((env.num_states, len(ACTIONS)))))
    target = uniform + THRESHOLD * (optimum - uniform)
    estimator = make_estimator(args.estimator)
    objective = sg.Expectation(num_particles=k)
    print(f"gridworld {env.height}x{env.width} in sg.scan, T={horizon}: optimal return "
          f"{optimum:.3f}, uniform policy {uniform:.3f}; estimator {args.estimator}, K={k}, "
          f"B={batch} episodes/step, Adam lr {args.lr:g}, {args.steps} steps, seeds "
          f"{args.seeds}")

    def program(t: int, per_step: bool = True, loop: Callable = episode_scan) -> Callable:
        return functools.partial(loop, env, t, batch, per_step, estimator=estimator)

    graph = sg.graph(program(horizon), num_particles=k)
    time_credit = set(graph.time_credit("a", "r", "time"))
    credited = {name: sg.graph(program(horizon, per_step), num_particles=k).credited_costs("a")
                for name, per_step in VARIANTS.items()}
    print(f"sg.scan: step s of a is credited with step t of r at t - s in {sorted(time_credit)} "
          "(0: the same step; 1: every later step), i.e. with the rewards-to-go")

    # (1) compile time against T: a first compile warms JAX up, untimed; then every program
    # once per round, the rounds interleaved (a load on the machine hits both kinds alike),
    # and the fastest round of each program kept
    step_timings(objective, program(2), calls=1)
    kinds = (("Python loop", episode, args.loop_horizons),
             ("sg.scan", episode_scan, args.scan_horizons))
    timings: dict[str, dict[int, tuple[float, float, float]]] = {k: {} for k, _, _ in kinds}
    for _ in range(args.compile_repeats):
        for label, loop, horizons in kinds:
            for t in horizons:
                new = step_timings(objective, program(t, loop=loop))
                old = timings[label].get(t, new)
                timings[label][t] = tuple(min(a, b) for a, b in zip(old, new, strict=True))
    for label, _, horizons in kinds:
        for t in horizons:
            trace, xla, call = timings[label][t]
            print(f"{label:>11}, T={t:>5}: trace {trace:6.2f} s + compile {xla:6.2f} s; "
                  f"{1e3 * call:7.3f} ms/step")

    # (2) gradient variance at the uniform policy against T (one sampler per program; the
    # ones at T = horizon are reused for training)
    keys = jax.random.split(jax.random.key(12345), args.variance_samples)
    samplers: dict[str, Callable] = {}
    by_horizon: dict[str, dict[int, float]] = {name: {} for name in VARIANTS}
    for t in args.variance_horizons:
        for name, per_step in VARIANTS.items():
            fn = program(t, per_step)
            sampler = make_gradient_sampler(objective, fn)
            params = sg.init_params(0, fn)
            state = objective.init_state(0, params, fn)
            by_horizon[name][t] = float(sampler(keys, params, state)[0])
            if t == horizon:
                samplers[name] = sampler
        ratio = by_horizon["whole return"][t] / by_horizon["rewards-to-go"][t]
        print(f"T={t:>5}, uniform policy: gradient variance "
              f"{by_horizon['rewards-to-go'][t]:.4g} (rewards-to-go) vs "
              f"{by_horizon['whole return'][t]:.4g} (whole return): {ratio:.2f}x")

    # (3) training at the long horizon
    programs = {name: program(horizon, per_step) for name, per_step in VARIANTS.items()}
    runs = _train_variants(programs, objective, evaluate, args, samplers)
    summary = _summarise(runs, target, args, optimum, uniform)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"compile": out / "scan_compile.png", "training": out / "scan_training.png",
             "policy": out / "scan_policy.png", "graph": out / "scan_graph.dot"}
    setting = f"B={batch}, {args.estimator} (K={k})"
    plot_compile(paths["compile"], timings, setting)
    plot_scan_training(paths["training"], by_horizon, runs, optimum, uniform, horizon,
                       f"{setting}, Adam {args.lr:g}")
    plot_policy(paths["policy"], env, {n: r[0].params["logits"] for n, r in runs.items()},
                horizon)
    paths["graph"].write_text(sg.graph(program(3), num_particles=k).to_dot() + "\n")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {
        "timings": timings,
        "variance_by_horizon": by_horizon,
        "variants": summary,
        "optimal_return": optimum,
        "uniform_return": uniform,
        "target_return": target,
        "time_credit": time_credit,
        "credited": credited,
        "paths": paths,
        "args": vars(args),
    }


if __name__ == "__main__":
    main()
