"""Learning state-space models by auto-encoding SMC (sg.SMC), IWAE and the ELBO at equal K.

**The bounds.** Each of the three objectives estimates ``log p(y)`` with ``K`` particles
(``--num-particles``, default 32, the same for all three) drawn from a learnable proposal, the
guide, whose loop runs beside the model's (one ``sg.scan`` each, the same loop name):

- ``sg.ELBO(num_particles=K)``: the mean of ``K`` single-path ELBOs;
- ``sg.IWAE(num_particles=K)``: ``log`` of the mean of ``K`` whole-path importance weights;
- ``sg.SMC(num_particles=K)``: auto-encoding SMC (Le et al. 2018; FIVO, Maddison et al. 2017):
  the particles are weighted step by step and resampled (systematic) whenever the effective
  sample size falls under ``K / 2``; ``log Z_hat`` is the sum over the resampling steps (and
  the last) of ``log`` of the mean accumulated weight. Its gradient drops the resampling's
  score term (biased, as in AESMC and FIVO).

All three are lower bounds on ``log p(y)`` in expectation. ``sg.SVI`` trains model and
proposal together with each, from the same initial values (Adam, step size ``--lr`` 0.02
cosine-decayed to 5% of it, ``--steps`` 5000).

**1. The linear-Gaussian model** (LG-SSM; :func:`lgssm_model`)::

    z_t = a z_{t-1} + N(0, q),   y_t = z_t + N(0, r),   z_0 = 0

with ``a`` in (-1, 1), the variances ``q``, ``r`` > 0 learned (``sg.param`` with constraints;
initially 0.5, 1, 1), on one simulated sequence (``T = --length`` = 100, true ``a = 0.9``,
``q = 1``, ``r = 0.5``, a fixed ``--data-seed``). The proposal (:func:`lgssm_guide`) is::

    q(z_t | z_{t-1}, y_t) = Normal(a_g z_{t-1} + b_g (y_t - a_g z_{t-1}), s_g)

with its own ``a_g``, ``b_g``, ``s_g``: it contains the bootstrap proposal (``b_g = 0``) and the
locally optimal one ``p(z_t | z_{t-1}, y_t)`` (:func:`optimal_params`), but it sees no future
observation. The reference is exact: the Kalman filter's ``log p(y | a, q, r)``
(:func:`kalman_log_lik`, plain JAX) and the maximum-likelihood ``(a, q, r)`` found by Adam on it
(:func:`kalman_mle`). Each method's learned params are scored by the Kalman ``log p(y)`` on the
training sequence and on a held-out one.

**2. The nonlinear benchmark** (Kitagawa 1996; :func:`benchmark_model`)::

    x_t = x_{t-1}/2 + 25 x_{t-1} / (1 + x_{t-1}^2) + 8 cos(1.2 t) + N(0, q),
    y_t = x_t^2 / 20 + N(0, r),   x_0 = 0

with ``q``, ``r`` learned (initially 5, 5; true 10, 1). ``y_t`` gives ``|x_t|`` but not its
sign. The proposal (:func:`benchmark_guide`) pulls the transition's prediction ``f`` towards
the root of ``20 y_t`` on ``f``'s side: ``Normal((1 - w) f + w sign(f) sqrt(20 y_t), s)``. Each
method's ``log p(y)`` is estimated at its learned ``q``, ``r`` by ``sg.SMC`` with
``--eval-particles`` (2000) particles and the bootstrap proposal, ``--eval-runs`` (8) runs on the
training and on a held-out sequence (:func:`benchmark_log_lik`).

**3. The bounds against T** (:func:`bounds_against_length`): at the true linear-Gaussian params,
``E[bound]`` of each objective (``--bound-runs`` 200 draws) on the first ``T`` observations of
one sequence, ``T`` in ``--horizons`` (10, 30, 100, 300), with the bootstrap and the locally
optimal proposal, against the Kalman ``log p(y_1:T)``.

Results with the defaults (K = 32, 5000 steps, seed 0; about 100 s in all on a shared 2-core
CPU whose load average was 6-8, so about 2-3x slower than idle; 8-14 s of training per method
and model)::

    linear-Gaussian    a      q      r    bound   log p(y)  - MLE's  held-out log p(y')
    MLE (Kalman)   0.850  1.341  0.309        -    -172.23    +0.00             -170.19
    true           0.900  1.000  0.500        -    -172.89    -0.66             -169.70
    SMC            0.841  1.419  0.263  -172.48    -172.25    -0.02             -170.41
    IWAE           0.815  1.683  0.116  -172.91    -172.63    -0.40             -171.25
    ELBO           0.796  1.861  0.008  -173.25    -173.11    -0.88             -171.95

    benchmark          q       r    bound     log p(y) (SMC)  held-out log p(y')
    true          10.000   1.000        -    -260.46 ± 0.21      -251.47 ± 0.31
    SMC           13.679   1.288  -276.67    -262.18 ± 0.14      -253.30 ± 0.11
    IWAE           5.351  32.828  -328.43    -307.60 ± 0.04      -302.08 ± 0.06
    ELBO           2.138  50.763  -343.12    -320.23 ± 0.05      -315.45 ± 0.06

    log p(y_1:T) - E[bound], true LG params, K = 32 (standard errors 0.03-0.3 nats):
           locally optimal proposal        bootstrap proposal
    T       SMC    IWAE    ELBO         SMC     IWAE     ELBO
    10     0.08    0.04    1.42        0.59      8.1       68
    30     0.16    0.37    3.32        1.29     55.8      252
    100    0.52    4.27   11.85        4.37    397.6      892
    300    1.84   19.76   35.27       15.45   1932.5     3125

SMC lands next to the MLE (0.02 nats under the maximum log-likelihood); IWAE 0.40 and the ELBO
0.88 nats under it, the ELBO with ``r`` = 0.008: variational EM's bias towards models whose
posterior the guide can represent (Turner and Sahani 2011) -- with ``r -> 0`` the filtering
proposal is exact (``b_g`` = 0.995, ``s_g`` = 0.09). On the benchmark SMC learns ``q``, ``r``
near the truth (its ``log p(y)`` 1.7 nats under the true params' on the training sequence, 1.8
on the held-out one), while IWAE and the ELBO explain the observations as noise (``r`` = 33,
51; their proposals ignore ``y_t``: ``w`` = 0.15, 0.06), 47 and 60 nats worse (51 and 64
held out). Seeds 1 and 2 give the same linear-Gaussian params within 0.015 and the same
ordering on the benchmark (SMC: ``q`` 13.7, 13.2, ``r`` 1.27, 1.31; the ELBO's ``q`` varies,
11.7 and 23.3). Against ``T``, SMC's gap grows about linearly with a small slope, IWAE's
faster than linearly towards the ELBO's (its weights degenerate over whole paths); at ``T``
= 10 IWAE and SMC are about as tight (SMC resamples at about one step in nine there).

Writes into ``--out``:

- ``training.png``: each method's bound (``-loss``, running mean) against steps, for both
  models, with the MLE's Kalman ``log p(y)`` and the SMC estimate at the true benchmark params;
- ``bounds_vs_T.png``: ``log p(y_1:T) - E[bound]`` against ``T`` (log-log), per proposal;
- ``params.png``: each method's learned params against the MLE and the true values;
- ``results.json``: every number above (the training curves left out).

Run::

    python examples/smc_state_space.py              # the defaults (about two minutes)
    python examples/smc_state_space.py --quick      # small (CI; about 30 s)
    python examples/smc_state_space.py --num-particles 8 --steps 2000 --horizons 10,100,1000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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

if __package__:  # imported as examples.smc_state_space
    from ._common import smooth
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import smooth

__all__ = [
    "BENCHMARK_TRUE",
    "LGSSM_TRUE",
    "METHODS",
    "benchmark",
    "benchmark_bootstrap",
    "benchmark_guide",
    "benchmark_log_lik",
    "benchmark_model",
    "benchmark_proposal",
    "bootstrap_params",
    "bound_gradients",
    "bounds_against_length",
    "growth",
    "kalman_log_lik",
    "kalman_mle",
    "lgssm",
    "lgssm_at",
    "lgssm_guide",
    "lgssm_model",
    "main",
    "optimal_params",
    "parse",
    "proposal",
    "proposal_at",
    "simulate_benchmark",
    "simulate_lgssm",
    "train",
]

constraints = dist.constraints
#: the linear-Gaussian model's true parameters (``q``, ``r``: variances)
LGSSM_TRUE = {"a": 0.9, "q": 1.0, "r": 0.5}
#: the nonlinear benchmark's true noise variances
BENCHMARK_TRUE = {"q": 10.0, "r": 1.0}
#: the objectives compared, each at ``K`` particles
METHODS: dict[str, Callable[[int], sg.Objective]] = {
    "SMC": lambda k: sg.SMC(num_particles=k),
    "IWAE": lambda k: sg.IWAE(num_particles=k),
    "ELBO": lambda k: sg.ELBO(num_particles=k),
}
COLOURS = {"SMC": "#1f77b4", "IWAE": "#ff7f0e", "ELBO": "#2ca02c"}


# --------------------------------------------------------------------------------------------
# The linear-Gaussian state-space model


def lgssm(ys: jax.Array, a: Any, q: Any, r: Any) -> None:
    """``z_t = a z_{t-1} + N(0, q)``, ``y_t = z_t + N(0, r)``, ``z_0 = 0``: one ``sg.scan``
    over ``ys`` ``(T,)`` (sites ``z`` and ``y``)."""
    def step(z, y):
        z = sg.sample("z", dist.Normal(a * z, jnp.sqrt(q)))
        sg.sample("y", dist.Normal(z, jnp.sqrt(r)), obs=y)
        return z, None

    sg.scan(step, 0.0, xs=ys)


def lgssm_model(ys: jax.Array) -> None:
    """The model with learnable ``a`` in (-1, 1) and variances ``q``, ``r`` > 0."""
    a = sg.param("a", 0.5, constraints.interval(-1.0, 1.0))
    q = sg.param("q", 1.0, constraints.positive)
    r = sg.param("r", 1.0, constraints.positive)
    lgssm(ys, a, q, r)


def proposal(ys: jax.Array, a_g: Any, b_g: Any, s_g: Any) -> None:
    """``q(z_t | z_{t-1}, y_t) = Normal(a_g z_{t-1} + b_g (y_t - a_g z_{t-1}), s_g)``: the
    prediction moved towards the observation, in the model's loop (same name, ``"time"``)."""
    def step(z, y):
        pred = a_g * z
        return sg.sample("z", dist.Normal(pred + b_g * (y - pred), s_g)), None

    sg.scan(step, 0.0, xs=ys)


def lgssm_guide(ys: jax.Array) -> None:
    """The learnable proposal: its own ``a_g``, ``b_g``, ``s_g`` (initially 0.5, 0.5, 1)."""
    proposal(ys, sg.param("a_g", 0.5), sg.param("b_g", 0.5),
             sg.param("s_g", 1.0, constraints.positive))


def optimal_params(a: Any, q: Any, r: Any) -> jax.Array:
    """``(a_g, b_g, s_g)`` at which :func:`proposal` is the locally optimal proposal
    ``p(z_t | z_{t-1}, y_t)`` of the model ``(a, q, r)``: gain ``q / (q + r)``, variance
    ``q r / (q + r)``."""
    gain = q / (q + r)
    return jnp.stack([jnp.asarray(a, jnp.float32), jnp.asarray(gain, jnp.float32),
                      jnp.sqrt(jnp.asarray(q * r / (q + r), jnp.float32))])


def bootstrap_params(a: Any, q: Any, r: Any) -> jax.Array:
    """``(a_g, b_g, s_g)`` at which :func:`proposal` is the model's transition (the bootstrap
    filter's proposal: ``b_g = 0``)."""
    return jnp.stack([jnp.asarray(a, jnp.float32), jnp.zeros((), jnp.float32),
                      jnp.sqrt(jnp.asarray(q, jnp.float32))])


def lgssm_at(ys: jax.Array, theta: jax.Array, phi: jax.Array) -> None:
    """The model at fixed ``theta = (a, q, r)`` (no params; ``phi`` is the proposal's)."""
    lgssm(ys, theta[0], theta[1], theta[2])


def proposal_at(ys: jax.Array, theta: jax.Array, phi: jax.Array) -> None:
    """The proposal at fixed ``phi = (a_g, b_g, s_g)``: the guide of :func:`lgssm_at`."""
    proposal(ys, phi[0], phi[1], phi[2])


def simulate_lgssm(length: int, seed: Any, a: float = LGSSM_TRUE["a"],
                   q: float = LGSSM_TRUE["q"], r: float = LGSSM_TRUE["r"]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(z, y)``, each ``(length,)`` float32, simulated from :func:`lgssm` (NumPy, ``seed``
    for ``np.random.default_rng``)."""
    rng = np.random.default_rng(seed)
    z, zs, ys = 0.0, [], []
    for _ in range(length):
        z = a * z + math.sqrt(q) * rng.normal()
        zs.append(z)
        ys.append(z + math.sqrt(r) * rng.normal())
    return np.asarray(zs, np.float32), np.asarray(ys, np.float32)


def kalman_log_lik(ys: jax.Array, a: Any, q: Any, r: Any) -> jax.Array:
    """The exact ``log p(y_{1:T} | a, q, r)`` of :func:`lgssm` by the Kalman filter (plain JAX,
    one ``lax.scan``; differentiable in ``a``, ``q``, ``r``)."""
    ys = jnp.asarray(ys)
    dtype = jnp.result_type(ys.dtype, jnp.float32)

    def step(carry, y):
        m, p, total = carry
        m, p = a * m, a * a * p + q  # predict z_t
        s = p + r  # the variance of y_t given y_{<t}
        total = total - 0.5 * (jnp.log(2 * jnp.pi * s) + (y - m) ** 2 / s)
        gain = p / s
        return (m + gain * (y - m), (1 - gain) * p, total), None

    zero = jnp.zeros((), dtype)
    (_, _, total), _ = jax.lax.scan(step, (zero, zero, zero), ys.astype(dtype))
    return total


def kalman_mle(ys: jax.Array, steps: int = 3000, lr: float = 0.05,
               init: tuple[float, float, float] = (0.5, 1.0, 1.0)) -> dict[str, Any]:
    """The maximum-likelihood ``(a, q, r)``: Adam (cosine-decayed step size) on the Kalman
    log-likelihood in plain JAX, over ``a = tanh(u_a)``, ``q = exp(u_q)``, ``r = exp(u_r)``,
    from ``init`` (the model's initial values). Returns ``a``, ``q``, ``r``, ``loglik`` and
    ``grad_norm`` (of the log-likelihood in the unconstrained ``u`` at the end: about 0 at a
    maximum)."""
    ys = jnp.asarray(ys)

    def unpack(u):
        return jnp.tanh(u[0]), jnp.exp(u[1]), jnp.exp(u[2])

    def loss(u):
        return -kalman_log_lik(ys, *unpack(u))

    optimiser = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))

    @jax.jit
    def fit(u):
        def body(carry, _):
            u, state = carry
            grad = jax.grad(loss)(u)
            updates, state = optimiser.update(grad, state)
            return (optax.apply_updates(u, updates), state), None

        (u, _), _ = jax.lax.scan(body, (u, optimiser.init(u)), None, length=steps)
        value, grad = jax.value_and_grad(loss)(u)
        return u, -value, jnp.linalg.norm(grad)

    a0, q0, r0 = init
    u, loglik, grad_norm = fit(jnp.array([math.atanh(a0), math.log(q0), math.log(r0)]))
    a, q, r = (float(v) for v in unpack(u))
    return {"a": a, "q": q, "r": r, "loglik": float(loglik), "grad_norm": float(grad_norm)}


# --------------------------------------------------------------------------------------------
# The nonlinear benchmark (Kitagawa 1996; Gordon, Salmond and Smith 1993)


def growth(x: Any, t: Any) -> Any:
    """The benchmark's transition mean ``x/2 + 25 x / (1 + x^2) + 8 cos(1.2 t)``."""
    return x / 2 + 25 * x / (1 + x**2) + 8 * jnp.cos(1.2 * t)


def _times(ys: jax.Array) -> jax.Array:
    return jnp.arange(1, ys.shape[0] + 1, dtype=jnp.float32)


def benchmark(ys: jax.Array, q: Any, r: Any) -> None:
    """``x_t = growth(x_{t-1}, t) + N(0, q)``, ``y_t = x_t^2 / 20 + N(0, r)``, ``x_0 = 0``: one
    ``sg.scan`` (sites ``x`` and ``y``). ``y_t`` tells ``|x_t|``, not its sign: the posterior is
    often bimodal."""
    def step(x, inputs):
        t, y = inputs
        x = sg.sample("x", dist.Normal(growth(x, t), jnp.sqrt(q)))
        sg.sample("y", dist.Normal(x**2 / 20, jnp.sqrt(r)), obs=y)
        return x, None

    sg.scan(step, 0.0, xs=(_times(ys), ys))


def benchmark_model(ys: jax.Array) -> None:
    """The benchmark with learnable noise variances ``q``, ``r`` (both initially 5)."""
    benchmark(ys, sg.param("q", 5.0, constraints.positive),
              sg.param("r", 5.0, constraints.positive))


def benchmark_proposal(ys: jax.Array, w: Any, s: Any) -> None:
    """``q(x_t | x_{t-1}, y_t) = Normal((1 - w) f + w sign(f) sqrt(20 y_t), s)`` with ``f =
    growth(x_{t-1}, t)``: the transition's prediction pulled towards the root of ``y_t`` on
    its side (``w`` in [0, 1])."""
    def step(x, inputs):
        t, y = inputs
        f = growth(x, t)
        root = jnp.sign(f) * jnp.sqrt(jnp.maximum(20 * y, 0.0))
        return sg.sample("x", dist.Normal((1 - w) * f + w * root, s)), None

    sg.scan(step, 0.0, xs=(_times(ys), ys))


def benchmark_guide(ys: jax.Array) -> None:
    """The learnable proposal: ``w_g`` in (0, 1) (initially 0.5) and ``s_g`` > 0 (2)."""
    benchmark_proposal(ys, sg.param("w_g", 0.5, constraints.unit_interval),
                       sg.param("s_g", 2.0, constraints.positive))


def benchmark_bootstrap(ys: jax.Array, q: Any, r: Any) -> None:
    """The model's transition as the proposal (the guide of :func:`benchmark` at fixed
    ``q``, ``r``, for the held-out estimates of ``log p(y)``)."""
    def step(x, inputs):
        t, _ = inputs
        return sg.sample("x", dist.Normal(growth(x, t), jnp.sqrt(q))), None

    sg.scan(step, 0.0, xs=(_times(ys), ys))


def simulate_benchmark(length: int, seed: Any, q: float = BENCHMARK_TRUE["q"],
                       r: float = BENCHMARK_TRUE["r"]) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``, each ``(length,)`` float32, simulated from :func:`benchmark`."""
    rng = np.random.default_rng(seed)
    x, xs, ys = 0.0, [], []
    for t in range(1, length + 1):
        x = x / 2 + 25 * x / (1 + x * x) + 8 * math.cos(1.2 * t) + math.sqrt(q) * rng.normal()
        xs.append(x)
        ys.append(x * x / 20 + math.sqrt(r) * rng.normal())
    return np.asarray(xs, np.float32), np.asarray(ys, np.float32)


@functools.lru_cache(maxsize=8)
def _benchmark_estimator(num_particles: int) -> Callable:
    """``(keys (S, R), ys (S, T), q, r) -> log Z_hat (S, R)``, jitted once per ``K``."""
    smc = sg.SMC(num_particles=num_particles)

    def one(key, ys, q, r):
        return -smc.loss(key, {}, benchmark, benchmark_bootstrap, ys, q, r)

    return jax.jit(jax.vmap(jax.vmap(one, in_axes=(0, None, None, None)),
                            in_axes=(0, 0, None, None)))


def benchmark_log_lik(key: jax.Array, sequences: jax.Array, q: Any, r: Any,
                      num_particles: int, runs: int) -> np.ndarray:
    """``log Z_hat`` of a bootstrap particle filter (``sg.SMC(num_particles)``, the model's
    transition as the proposal, systematic resampling when the ESS falls under K/2) at the
    benchmark's ``q``, ``r``: ``(S, runs)`` independent runs per sequence of ``sequences``
    ``(S, T)``. Each is an unbiased estimate of ``p(y)``, so its log is low by about half its
    variance."""
    sequences = jnp.asarray(sequences)
    keys = jax.random.split(key, sequences.shape[0] * runs).reshape(sequences.shape[0], runs)
    return np.asarray(_benchmark_estimator(num_particles)(keys, sequences, q, r))


# --------------------------------------------------------------------------------------------
# Training and the bounds


@contextlib.contextmanager
def _fast_compile() -> Iterator[None]:
    """One-off evaluations (each compiled once and run once) with XLA's optimisations off: the
    same values, about 5x faster to compile on a CPU. Restored after."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def train(model: Callable, guide: Callable, objective: sg.Objective, ys: jax.Array, *,
          steps: int, lr: float, key: jax.Array, progress: bool = False, last: int = 100
          ) -> dict[str, Any]:
    """``sg.SVI`` with Adam (step size ``lr`` cosine-decayed to 5% of it) for ``steps`` steps.
    Returns ``params`` (constrained, floats), ``losses`` (per step; ``-loss`` is the
    objective's bound), ``bound`` (the mean of ``-loss`` over the last ``last`` steps) and
    ``seconds`` (compilation included)."""
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.05)
    svi = sg.SVI(model, guide, optax.adam(schedule), objective)
    start = time.perf_counter()
    result = svi.run(key, steps, ys, progress_bar=progress)
    jax.block_until_ready(result.state)
    seconds = time.perf_counter() - start
    params = {k: float(v) for k, v in svi.get_params(result.state, ys).items()}
    losses = np.asarray(result.losses, np.float64)
    return {"params": params, "losses": losses, "bound": float(-losses[-last:].mean()),
            "seconds": seconds}


def bounds_against_length(ys: jax.Array, horizons: Sequence[int], num_particles: int,
                          runs: int, key: jax.Array, theta: dict[str, float] = LGSSM_TRUE
                          ) -> dict[str, Any]:
    """The three bounds of the linear-Gaussian model at fixed params ``theta`` on the first
    ``T`` observations of ``ys``, for each ``T`` of ``horizons``: ``runs`` draws of each
    objective's ``-loss`` at ``K = num_particles``, with the bootstrap and the locally optimal
    proposal (:func:`bootstrap_params`, :func:`optimal_params`). Returns ``horizons``,
    ``exact`` (the Kalman ``log p(y_{1:T})``) and ``proposals`` -> method -> ``mean``, ``se``
    (standard error), ``gap`` (``exact - mean``), one per ``T``."""
    vec = jnp.asarray([theta["a"], theta["q"], theta["r"]], jnp.float32)
    proposals = {"bootstrap": bootstrap_params(*vec), "optimal": optimal_params(*vec)}
    phis = jnp.stack(list(proposals.values()))
    out: dict[str, Any] = {"horizons": [int(t) for t in horizons], "exact": [],
                           "proposals": {p: {m: {"mean": [], "se": [], "gap": []}
                                             for m in METHODS} for p in proposals}}
    with _fast_compile():
        for length in horizons:
            y = jnp.asarray(ys[:length])
            exact = float(kalman_log_lik(y, *vec))
            out["exact"].append(exact)
            for i, (name, make) in enumerate(METHODS.items()):
                objective = make(num_particles)

                def bound(k, phi, y=y, objective=objective):
                    return -objective.loss(k, {}, lgssm_at, proposal_at, y, vec, phi)

                keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, length), i),
                                        runs)
                values = np.asarray(jax.jit(jax.vmap(jax.vmap(bound, (0, None)), (None, 0)))(
                    keys, phis), np.float64)  # (proposals, runs)
                for p, v in zip(proposals, values, strict=True):
                    entry = out["proposals"][p][name]
                    entry["mean"].append(float(v.mean()))
                    entry["se"].append(float(v.std(ddof=1) / math.sqrt(runs)))
                    entry["gap"].append(exact - float(v.mean()))
    return out


def bound_gradients(objective: sg.Objective, ys: jax.Array, theta: jax.Array, phi: jax.Array,
                    num: int, key: jax.Array) -> np.ndarray:
    """``(num, 3)`` draws of the gradient of ``-objective.loss`` (the bound) in the model's
    ``theta = (a, q, r)`` at a fixed proposal ``phi`` (:func:`lgssm_at`,
    :func:`proposal_at`): what ``sg.SVI`` follows."""
    def one(k):
        return jax.grad(lambda th: -objective.loss(k, {}, lgssm_at, proposal_at, ys, th, phi))(
            theta)

    with _fast_compile():
        return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(key, num)), np.float64)


# --------------------------------------------------------------------------------------------
# Plots


def plot_training(path: Path, lg: dict[str, Any], nl: dict[str, Any], window: int) -> None:
    """Each method's training bound (``-loss``, smoothed) against steps, with the exact
    ``log p(y)`` at the MLE (linear-Gaussian) and the particle filter's at the true params
    (benchmark) as levels."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    panels = ((axes[0], lg, lg["mle"]["loglik"], "Kalman log p(y) at the MLE",
               "linear-Gaussian model (a, q, r learned)"),
              (axes[1], nl, nl["true"]["loglik"], "log p(y) at the true q, r (SMC, K = "
               f"{nl['eval_particles']})", "nonlinear benchmark (q, r learned)"))
    for ax, part, level, label, title in panels:
        curves = []
        for name, fit in part["methods"].items():
            curve = smooth(-fit["losses"], window)
            curves.append(curve)
            ax.plot(np.arange(1, len(curve) + 1), curve, color=COLOURS[name],
                    label=f"{name} bound (running mean of {window})")
        ax.axhline(level, color="k", ls="--", lw=1, label=label)
        low = min(float(np.percentile(c[len(c) // 10:], 5)) for c in curves)
        top = max(level, max(float(np.max(c)) for c in curves))
        ax.set_ylim(low - 0.1 * (top - low), top + 0.1 * (top - low))
        ax.set_xlabel("step")
        ax.set_ylabel("nats (training sequence)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bounds_vs_length(path: Path, sweep: dict[str, Any], num_particles: int) -> None:
    """``log p(y_{1:T}) - E[bound]`` against ``T`` (log-log) per method, for each proposal."""
    titles = {"bootstrap": "bootstrap proposal (the model's transition)",
              "optimal": "locally optimal proposal p(z_t | z_{t-1}, y_t)"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    horizons = np.asarray(sweep["horizons"])
    for ax, (prop, methods) in zip(axes, sweep["proposals"].items(), strict=True):
        for name, entry in methods.items():
            gap = np.asarray(entry["gap"])
            se = np.asarray(entry["se"])
            ax.errorbar(horizons, np.maximum(gap, 1e-3), yerr=2 * se, color=COLOURS[name],
                        marker="o", capsize=3, label=name)
        ax.set(xscale="log", yscale="log", xlabel="T (observations)",
               ylabel="log p(y_1:T) - E[bound] (nats)")
        ax.set_title(f"linear-Gaussian model at the true params, K = {num_particles}: "
                     f"{titles[prop]}", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(path: Path, lg: dict[str, Any], nl: dict[str, Any]) -> None:
    """The learned parameters of each method against the MLE (linear-Gaussian) and the true
    values."""
    panels = [("a", lg, lg["mle"]), ("q", lg, lg["mle"]), ("r", lg, lg["mle"]),
              ("q", nl, None), ("r", nl, None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.2))
    for ax, (name, part, mle) in zip(axes, panels, strict=True):
        methods = list(part["methods"])
        for i, m in enumerate(methods):
            ax.plot(i, part["methods"][m]["params"][name], "o", color=COLOURS[m], ms=8)
        if mle is not None:
            ax.axhline(mle[name], color="k", ls="--", lw=1, label="MLE (Kalman)")
        ax.axhline(part["true"][name], color="0.5", ls=":", lw=1.5, label="true")
        ax.set_xticks(range(len(methods)), methods)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        values = [part["methods"][m]["params"][name] for m in methods] + [part["true"][name]]
        if min(values) > 0 and max(values) / min(values) > 5:  # variances over decades
            ax.set_yscale("log")
        model = "linear-Gaussian" if mle is not None else "benchmark"
        ax.set_title(f"{model}: {name}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line

FULL = {"steps": 5000, "num_particles": 32, "length": 100, "eval_particles": 2000,
        "eval_runs": 8, "bound_runs": 200}
QUICK = {"steps": 200, "num_particles": 8, "length": 50, "eval_particles": 200,
         "eval_runs": 2, "bound_runs": 20}
HORIZONS = (10, 30, 100, 300)
QUICK_HORIZONS = (10, 30)


def _horizons(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give positive lengths, got {text!r}")
    return tuple(sorted(set(values)))


def make_parser() -> argparse.ArgumentParser:
    """The flags (see ``--help``)."""
    p = argparse.ArgumentParser(prog="smc_state_space.py",
                                description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes for every flag left unset, and XLA's optimisations off "
                   "for a faster compile (CI; about 20 s)")
    p.add_argument("--steps", type=int, default=None,
                   help="Adam steps per method and model (default: 5000; --quick: 200)")
    p.add_argument("--num-particles", type=int, default=None,
                   help="K, the same for SMC, IWAE and the ELBO (default: 32; --quick: 8)")
    p.add_argument("--length", type=int, default=None,
                   help="T, observations of each training sequence (default: 100; --quick: 50)")
    p.add_argument("--lr", type=float, default=0.02,
                   help="initial Adam step size, cosine-decayed to 5%% of it "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="PRNG seed of the training (default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the simulated sequences (default: %(default)s)")
    p.add_argument("--eval-particles", type=int, default=None,
                   help="particles of the SMC estimates of the benchmark's log p(y) "
                   "(default: 2000; --quick: 200)")
    p.add_argument("--eval-runs", type=int, default=None,
                   help="independent runs of each such estimate (default: 8; --quick: 2)")
    p.add_argument("--horizons", type=_horizons, default=None,
                   help="comma-separated lengths T of the bounds-against-T experiment "
                   "(default: 10,30,100,300; --quick: 10,30)")
    p.add_argument("--bound-runs", type=int, default=None,
                   help="draws of each bound per T in that experiment (default: 200; "
                   "--quick: 20)")
    p.add_argument("--out", type=Path, default=Path("out") / "smc_state_space",
                   help="folder for the PNGs and results.json (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags (``None``: ``sys.argv[1:]``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    for flag, value in (QUICK if args.quick else FULL).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.horizons is None:
        args.horizons = QUICK_HORIZONS if args.quick else HORIZONS
    for flag in FULL:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got "
                         f"{getattr(args, flag)}")
    if args.bound_runs < 2:
        parser.error(f"--bound-runs must be at least 2, got {args.bound_runs}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, r in enumerate([header, *rows]):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if k != "losses"}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def run_lgssm(args: argparse.Namespace) -> dict[str, Any]:
    """Simulate, fit the Kalman MLE, train each method; Kalman ``log p(y)`` of each."""
    _, ys = simulate_lgssm(args.length, (args.data_seed, 0))
    _, held_out = simulate_lgssm(args.length, (args.data_seed, 1))
    ys, held_out = jnp.asarray(ys), jnp.asarray(held_out)
    start = time.perf_counter()
    mle = kalman_mle(ys)
    mle["seconds"] = time.perf_counter() - start
    truth = dict(LGSSM_TRUE)
    exact = jax.jit(kalman_log_lik)
    for p in (mle, truth):
        p["held_out"] = float(exact(held_out, p["a"], p["q"], p["r"]))
    truth["loglik"] = float(exact(ys, truth["a"], truth["q"], truth["r"]))
    methods = {}
    for i, (name, make) in enumerate(METHODS.items()):
        fit = train(lgssm_model, lgssm_guide, make(args.num_particles), ys, steps=args.steps,
                    lr=args.lr, key=jax.random.fold_in(jax.random.key(args.seed), i),
                    progress=not args.no_progress)
        p = fit["params"]
        fit["loglik"] = float(exact(ys, p["a"], p["q"], p["r"]))
        fit["held_out"] = float(exact(held_out, p["a"], p["q"], p["r"]))
        methods[name] = fit
    return {"ys": np.asarray(ys), "held_out_ys": np.asarray(held_out), "mle": mle,
            "true": truth, "methods": methods}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Simulate, train each method; SMC estimates of ``log p(y)`` (training and held-out
    sequence) at each method's ``q``, ``r`` and at the true ones."""
    _, ys = simulate_benchmark(args.length, (args.data_seed, 2))
    _, held_out = simulate_benchmark(args.length, (args.data_seed, 3))
    ys, held_out = jnp.asarray(ys), jnp.asarray(held_out)
    sequences = jnp.stack([ys, held_out])
    key = jax.random.key(args.seed + 1)

    def evaluate(p: dict[str, float]) -> dict[str, float]:
        with _fast_compile():
            est = benchmark_log_lik(key, sequences, p["q"], p["r"], args.eval_particles,
                                    args.eval_runs)
        se = (est.std(1, ddof=1) / math.sqrt(args.eval_runs) if args.eval_runs > 1
              else np.full(2, np.nan))
        return {"loglik": float(est[0].mean()), "loglik_se": float(se[0]),
                "held_out": float(est[1].mean()), "held_out_se": float(se[1])}

    truth = dict(BENCHMARK_TRUE)
    truth.update(evaluate(truth))
    methods = {}
    for i, (name, make) in enumerate(METHODS.items()):
        fit = train(benchmark_model, benchmark_guide, make(args.num_particles), ys,
                    steps=args.steps, lr=args.lr,
                    key=jax.random.fold_in(jax.random.key(args.seed), 10 + i),
                    progress=not args.no_progress)
        fit.update(evaluate(fit["params"]))
        methods[name] = fit
    return {"ys": np.asarray(ys), "held_out_ys": np.asarray(held_out), "true": truth,
            "methods": methods, "eval_particles": args.eval_particles,
            "eval_runs": args.eval_runs}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both models and the bounds-against-T experiment; print the tables, write the plots
    and ``results.json``.

    Returns a dict with ``lgssm`` (``ys``, ``held_out_ys``, ``mle`` and ``true`` (``a``,
    ``q``, ``r``, ``loglik``, ``held_out``; the MLE also ``grad_norm``, ``seconds``) and
    ``methods`` -> name -> ``params`` (constrained, the guide's included), ``losses``,
    ``bound`` (mean ``-loss`` of the last 100 steps), ``loglik`` and ``held_out`` (Kalman
    ``log p(y)`` at the learned params on the training and the held-out sequence),
    ``seconds``), ``benchmark`` (the same without ``mle``; ``loglik``, ``held_out`` are SMC
    estimates, mean of ``eval_runs`` runs, with ``loglik_se``, ``held_out_se``), ``bounds``
    (:func:`bounds_against_length` at the true params), ``paths`` and ``args``.
    """
    args = parse(argv)
    with _fast_compile() if args.quick else contextlib.nullcontext():
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    k = args.num_particles
    print(f"K = {k} particles for every objective; {args.steps} Adam steps each; T = "
          f"{args.length}")
    lg = run_lgssm(args)
    mle, truth = lg["mle"], lg["true"]
    print(f"\nlinear-Gaussian model, true (a, q, r) = ({truth['a']}, {truth['q']}, "
          f"{truth['r']}); Kalman MLE found in {mle['seconds']:.1f} s (|grad| "
          f"{mle['grad_norm']:.1e}). log p(y) by the Kalman filter at each method's params:")
    rows = []
    for name, p in (("MLE (Kalman)", mle), ("true", truth)):
        rows.append([name, f"{p['a']:.3f}", f"{p['q']:.3f}", f"{p['r']:.3f}", "-",
                     f"{p['loglik']:.2f}", f"{p['loglik'] - mle['loglik']:+.2f}",
                     f"{p['held_out']:.2f}", "-"])
    for name, fit in lg["methods"].items():
        p = fit["params"]
        rows.append([name, f"{p['a']:.3f}", f"{p['q']:.3f}", f"{p['r']:.3f}",
                     f"{fit['bound']:.2f}", f"{fit['loglik']:.2f}",
                     f"{fit['loglik'] - mle['loglik']:+.2f}", f"{fit['held_out']:.2f}",
                     f"{fit['seconds']:.1f}"])
    _print_table(["params", "a", "q", "r", "bound (last 100)", "log p(y)", "- MLE's",
                  "held-out log p(y')", "s"], rows)
    for name, fit in lg["methods"].items():
        p = fit["params"]
        print(f"{name} proposal: a_g {p['a_g']:.3f}, b_g {p['b_g']:.3f}, s_g {p['s_g']:.3f}")

    nl = run_benchmark(args)
    print(f"\nnonlinear benchmark, true (q, r) = ({BENCHMARK_TRUE['q']}, {BENCHMARK_TRUE['r']}); "
          f"log p(y) estimated by sg.SMC with K = {args.eval_particles} (bootstrap proposal, "
          f"mean ± se of {args.eval_runs} runs):")
    rows = []

    def fmt(v, se):
        return f"{v:.2f} ± {se:.2f}" if math.isfinite(se) else f"{v:.2f}"

    for name, fit in [("true", nl["true"]), *nl["methods"].items()]:
        p = fit.get("params", fit)
        rows.append([name, f"{p['q']:.3f}", f"{p['r']:.3f}",
                     f"{fit['bound']:.2f}" if "bound" in fit else "-",
                     fmt(fit["loglik"], fit["loglik_se"]), fmt(fit["held_out"], fit["held_out_se"]),
                     f"{fit['seconds']:.1f}" if "seconds" in fit else "-"])
    _print_table(["params", "q", "r", "bound (last 100)", "log p(y)", "held-out log p(y')",
                  "s"], rows)
    for name, fit in nl["methods"].items():
        print(f"{name} proposal: w_g {fit['params']['w_g']:.3f}, s_g {fit['params']['s_g']:.3f}")

    _, long_ys = simulate_lgssm(max(args.horizons), (args.data_seed, 0))
    start = time.perf_counter()
    sweep = bounds_against_length(jnp.asarray(long_ys), args.horizons, k, args.bound_runs,
                                  jax.random.key(args.seed + 2))
    sweep["seconds"] = time.perf_counter() - start
    print(f"\nlinear-Gaussian model at the true params, K = {k}: log p(y_1:T) - E[bound] "
          f"(nats; {args.bound_runs} draws each; {sweep['seconds']:.1f} s)")
    for prop, methods in sweep["proposals"].items():
        rows = [[str(t), f"{e:.2f}", *[f"{methods[m]['gap'][i]:.2f} ± {methods[m]['se'][i]:.2f}"
                                       for m in METHODS]]
                for i, (t, e) in enumerate(zip(sweep["horizons"], sweep["exact"], strict=True))]
        print(f"{prop} proposal:")
        _print_table(["T", "log p(y)", *[f"{m} gap" for m in METHODS]], rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"training": out / "training.png", "bounds_vs_T": out / "bounds_vs_T.png",
             "params": out / "params.png", "results": out / "results.json"}
    plot_training(paths["training"], lg, nl, window=max(1, min(100, args.steps // 20)))
    plot_bounds_vs_length(paths["bounds_vs_T"], sweep, k)
    plot_params(paths["params"], lg, nl)
    result = {"lgssm": lg, "benchmark": nl, "bounds": sweep, "paths": paths,
              "args": vars(args)}
    paths["results"].write_text(json.dumps(_jsonable(
        {key: value for key, value in result.items() if key != "paths"}), indent=1))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result


if __name__ == "__main__":
    main()
