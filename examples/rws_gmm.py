"""Reweighted wake-sleep on a Gaussian mixture, against the ELBO with RLOO and IWAE with VIMCO.

The Gaussian-mixture experiment of Le, Kosiorek, Siddharth, Teh & Wood, "Revisiting Reweighted
Wake-Sleep for Models with Stochastic Control Flow" (UAI 2019). For ``n = 1..N`` and ``C``
clusters (default 20)::

    p_θ(c_n)       = Categorical(c_n | softmax(θ))           θ: C logits, learned
    p(x_n | c_n)   = Normal(x_n | 10 c_n, 5²)                 fixed means and scale
    q_φ(c_n | x_n) = Categorical(c_n | softmax(f_φ(u_n)))     f_φ: MLP 1-16-16-C (tanh)

with ``u_n = (x_n - m) / s`` the standardised observation (``m``, ``s``: the mean and standard
deviation of ``x`` when ``c`` is uniform). The data come from the true weights
``softmax(θ*)_c ∝ c + 5``, ``c = 0..C-1`` (as in the authors' code, ``tuananhle7/rrws``), a
fresh batch of ``N`` points every step. ``θ`` starts far from them, at ``softmax(θ)_c ∝
exp(-c)`` (the authors' initialisation; ``--init uniform`` starts at ``θ = 0``). Every per-point
site is in ``sg.plate("data", N)``.

With ``K`` particles ``c_{n,k} ~ q_φ(c | x_n)`` per point, log-weights ``log w_{n,k} = log
p_θ(x_n, c_{n,k}) - log q_φ(c_{n,k} | x_n)`` and self-normalised weights ``ŵ_{n,k} = w_{n,k} /
Σ_j w_{n,j}``, three ways to learn ``θ`` and ``φ`` are compared (same seeds, data, ``K``),
and a fourth with no guide at all:

- ``rws``, ``sg.RWS(num_particles=K)``: reweighted wake-sleep, no score function::

      wake-θ:  Σ_n Σ_k ŵ_{n,k} ∇_θ log p_θ(x_n, c_{n,k})     → ∇_θ log p_θ(x)          (K → ∞)
      wake-φ:  Σ_n Σ_k ŵ_{n,k} ∇_φ log q_φ(c_{n,k} | x_n)    → -∇_φ KL(p_θ(c|x) ‖ q_φ)  (K → ∞)

- ``rloo``, ``sg.ELBO(num_particles=K)`` with the guide site's ``estimator=sg.RLOO()``: the
  ELBO ``Σ_n E_q[f_n(c)]``, ``f_n(c) = log p_θ(x_n, c) - log q_φ(c | x_n)``, whose ``φ``-gradient
  is estimated by the score function with a leave-one-out baseline::

      ∇_θ:  (1/K) Σ_k ∇_θ log p_θ(x_n, c_{n,k})
      ∇_φ:  (1/K) Σ_k (f_n(c_{n,k}) - b_{n,k}) ∇_φ log q_φ(c_{n,k} | x_n),
            b_{n,k} = (1/(K-1)) Σ_{j≠k} f_n(c_{n,j})

  (plus the zero-mean term ``-(1/K) Σ_k ∇_φ log q_φ(c_{n,k} | x_n)``), summed over ``n``.

- ``vimco``, ``sg.IWAE(num_particles=K)`` with ``sg.VIMCO()`` on the guide site (IWAE's default
  for a discrete site): the bound ``L_K = Σ_n E[log (1/K) Σ_k w_{n,k}]``, whose ``θ``-gradient is
  wake-θ's and whose ``φ``-gradient is::

      Σ_k (L̂_n - b_{n,k}) ∇_φ log q_φ(c_{n,k} | x_n)  -  Σ_k ŵ_{n,k} ∇_φ log q_φ(c_{n,k} | x_n),
      L̂_n = log (1/K) Σ_k w_{n,k},   b_{n,k} = log (1/K) (Σ_{j≠k} w_{n,j} + w̃_{n,k}),
      log w̃_{n,k} = (1/(K-1)) Σ_{j≠k} log w_{n,j}.

- ``enum``, ``sg.ELBO()`` with the assignments summed out: the model's ``c`` is marked
  ``infer={"enumerate": "parallel"}`` and the guide is empty, so the objective is
  ``Σ_n log Σ_c p_θ(x_n, c) = Σ_n log p_θ(x_n)`` itself (the ELBO whose guide is the exact
  posterior ``p_θ(c | x_n)``: no gap), and its ``θ``-gradient is exact. Nothing is sampled
  (``K`` is not used); there is no ``φ`` to learn, and the posterior, when wanted, is the
  model's own (``sg.infer_discrete``), so its posterior KL is 0.

The mixture is finite, so everything is measured exactly (by enumeration over the ``C``
clusters, jitted, on a fixed held-out set of points drawn from the true model) every
``--eval-every`` steps:

- the model error ``‖softmax(θ) - softmax(θ*)‖₂`` (and ``KL(softmax(θ*) ‖ softmax(θ))``);
- the average held-out ``log p_θ(x) = logsumexp_c [log softmax(θ)_c + log N(x | 10c, 5²)]``;
- the average posterior KL ``KL(p_θ(c | x) ‖ q_φ(c | x)) = Σ_c p_θ(c|x) (log p_θ(c|x) - log
  q_φ(c|x))``, with ``p_θ(c | x) = exp(log p_θ(x, c) - log p_θ(x))`` (the model's own posterior).

(The exact posterior's logits ``θ_c + 0.4 c x - 2 c²`` are affine in ``x``: the guide family can
represent it closely, so a large posterior KL is a failure to learn, not of the family.)

Writes ``rws_gmm.png`` (the three measures against steps, one line per method; none for
``enum`` in the posterior-KL panel) and
``weights.png`` (learned against true mixture weights) into ``--out``; prints a table with the
final numbers and the time per step.

What it shows (defaults, seeds 0, 1, 2; about 1 ms per step for each method on a 2-core CPU):

- RWS learns the best guide: final posterior KL 0.008-0.010, against 0.026-0.039 for VIMCO.
  Its model is good but not exact: model error 0.03-0.14. An outermost cluster (``c = 0`` in
  every seed, and ``c = 19`` too for seed 0) dies: its weight moves to its neighbour, the
  guide stops proposing it, and neither wake phase can bring it back, since both see only the
  guide's particles. (The authors' code has a "defensive" variant that also samples from the
  prior; it is not used here.)
- IWAE with VIMCO learns the model best: model error 0.004 and 0.006 for two seeds; the
  third ends at 0.10, with cluster 18 dead and its weight on its neighbours.
- The ELBO with RLOO fits a wrong model: model error 0.37-0.40, held-out ``log p(x)`` 1.3-2.3
  nats below the true model's, posterior KL 0.5-1.5. The weight collapses onto a few
  well-separated clusters, whose posteriors a peaked guide can match (the ELBO pays
  ``KL(q ‖ p_θ(c|x))`` for overlapping clusters). Training on the ELBO with exact gradients
  (``sg.Enumerate()`` on the guide site) ends the same way, so this comes from the
  objective, not from the estimator.
- The ELBO with the assignments summed out learns the model best and fastest: model error
  0.005, 0.006 and 0.008 (seeds 0, 1, 2), reached by step 6000 (noise of the fresh
  mini-batches after that), and held-out ``log p(x)`` 0.0002-0.0005 nats below the true
  model's; no cluster dies. It is the same ELBO as the ``rloo`` row with the guide replaced by
  the exact posterior: what fails there is the guide family's ``KL(q ‖ p_θ(c|x))`` pulling the
  model, not the ELBO. Its steps are about a third cheaper than the others' (0.25 against
  0.33-0.37 ms in the same run, seed 0: one run of the model per cluster, no network).

Run (about two minutes on a 2-core CPU with the defaults)::

    python examples/rws_gmm.py                                   # 20000 steps, K = 5, C = 20
    python examples/rws_gmm.py --num-particles 10 --methods rws,vimco --out out/rws_gmm_k10
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
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
    "METHODS",
    "SCALE",
    "SPACING",
    "Encoder",
    "Method",
    "MethodResult",
    "build",
    "cluster_means",
    "evaluate",
    "exact_log_evidence",
    "exact_log_posterior",
    "guide_logits",
    "initial_logits",
    "log_joint",
    "main",
    "make_evaluator",
    "mixture_kl",
    "plot_curves",
    "plot_weights",
    "posterior_kl",
    "sample_data",
    "standardise",
    "train_method",
    "true_logits",
]

Program = Callable[..., Any]
SPACING = 10.0  # cluster c has mean SPACING * c
SCALE = 5.0  # every cluster's standard deviation
HIDDEN = 16  # width of the guide's two hidden layers
NUM_TEST = 2000  # held-out points for the exact evaluation


# --------------------------------------------------------------------------------------------
# The mixture


def cluster_means(num_clusters: int) -> jax.Array:
    """The fixed cluster means ``10 c``, ``c = 0..C-1``."""
    return SPACING * jnp.arange(num_clusters, dtype=jnp.float32)


def true_logits(num_clusters: int) -> jax.Array:
    """The true mixture logits ``θ*``: ``softmax(θ*)_c = (c + 5) / Σ_j (j + 5)``."""
    weights = np.arange(num_clusters, dtype=np.float64) + 5.0
    return jnp.asarray(np.log(weights / weights.sum()), jnp.float32)


def initial_logits(num_clusters: int, init: str = "far") -> jax.Array:
    """The model's initial logits: ``"far"`` (``softmax(θ)_c ∝ exp(-c)``, the authors'
    initialisation, far from the truth) or ``"uniform"`` (``θ = 0``)."""
    if init == "far":
        return -jnp.arange(num_clusters, dtype=jnp.float32)
    if init == "uniform":
        return jnp.zeros(num_clusters, jnp.float32)
    raise ValueError(f"unknown init {init!r}; choose 'far' or 'uniform'")


def standardise(x: jax.Array, num_clusters: int) -> jax.Array:
    """``(x - m) / s`` with ``m``, ``s`` the mean and standard deviation of ``x`` when ``c`` is
    uniform over the ``C`` clusters (fixed constants, so the guide sees inputs of order 1)."""
    mean = SPACING * (num_clusters - 1) / 2
    std = math.sqrt(SPACING**2 * (num_clusters**2 - 1) / 12 + SCALE**2)
    return (x - mean) / std


def sample_data(rng_key: jax.Array, logits: jax.Array, num: int) -> jax.Array:
    """``num`` points ``x ~ Σ_c softmax(logits)_c N(10 c, 5²)``, shape ``(num,)``."""
    key_c, key_x = jax.random.split(rng_key)
    c = jax.random.categorical(key_c, logits, shape=(num,))
    return cluster_means(logits.shape[-1])[c] + SCALE * jax.random.normal(key_x, (num,))


class Encoder(nn.Module):
    """The guide's network: standardised ``x`` ``(N, 1)`` → ``C`` logits, 1-16-16-C, tanh."""

    num_clusters: int
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        h = nn.tanh(nn.Dense(self.hidden)(u))
        h = nn.tanh(nn.Dense(self.hidden)(h))
        return nn.Dense(self.num_clusters)(h)


def build(num_clusters: int, estimator: sg.Estimator | None = None, init: str = "far",
          summed: bool = False) -> tuple[Program, Program]:
    """The model and guide, as functions of a ``(N,)`` batch ``x``.

    Args:
        num_clusters: ``C``.
        estimator: the gradient estimator of the guide's ``c`` site (``None``: the objective's
            default: ``Detached`` under ``sg.RWS``, ``VIMCO`` under ``sg.IWAE``, ``RLOO``
            under ``sg.ELBO`` with ``K >= 2``).
        init: the initial logits, see :func:`initial_logits`.
        summed: the model's ``c`` marked ``infer={"enumerate": "parallel"}`` and an empty
            guide: the objectives sum ``c`` out per point (``estimator`` is then unused).
    """
    means = cluster_means(num_clusters)
    theta0 = initial_logits(num_clusters, init)
    encoder = Encoder(num_clusters)

    infer = {"enumerate": "parallel"} if summed else None

    def model(x: jax.Array) -> None:
        theta = sg.param("theta", theta0)
        with sg.plate("data", x.shape[0]):
            c = sg.sample("c", dist.Categorical(logits=theta), infer=infer)
            sg.sample("x", dist.Normal(means[c], SCALE), obs=x)

    def empty_guide(x: jax.Array) -> None:
        """Nothing to sample: ``c`` is summed out in the model."""

    if summed:
        return model, empty_guide

    def guide(x: jax.Array) -> None:
        encode = sg.module("encoder", encoder, jnp.zeros((1, 1)))
        with sg.plate("data", x.shape[0]):
            logits = encode(standardise(x, num_clusters)[:, None])
            sg.sample("c", dist.Categorical(logits=logits), estimator=estimator)

    return model, guide


# --------------------------------------------------------------------------------------------
# Exact evaluation (enumeration over the C clusters)


def log_joint(theta: jax.Array, x: jax.Array) -> jax.Array:
    """``log p_θ(x_n, c)`` for every point and cluster, shape ``(N, C)``."""
    means = cluster_means(theta.shape[-1])
    log_lik = jax.scipy.stats.norm.logpdf(x[:, None], means[None, :], SCALE)
    return jax.nn.log_softmax(theta)[None, :] + log_lik


def exact_log_evidence(theta: jax.Array, x: jax.Array) -> jax.Array:
    """``log p_θ(x_n) = logsumexp_c log p_θ(x_n, c)``, shape ``(N,)``."""
    return jax.nn.logsumexp(log_joint(theta, x), axis=-1)


def exact_log_posterior(theta: jax.Array, x: jax.Array) -> jax.Array:
    """``log p_θ(c | x_n)``, shape ``(N, C)`` (each row normalised)."""
    joint = log_joint(theta, x)
    return joint - jax.nn.logsumexp(joint, axis=-1, keepdims=True)


def posterior_kl(theta: jax.Array, q_logits: jax.Array, x: jax.Array) -> jax.Array:
    """``KL(p_θ(c | x_n) ‖ q(c | x_n))`` per point, shape ``(N,)``, for a guide with logits
    ``q_logits`` ``(N, C)`` (unnormalised)."""
    log_p = exact_log_posterior(theta, x)
    log_q = jax.nn.log_softmax(q_logits, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def mixture_kl(reference_logits: jax.Array, theta: jax.Array) -> jax.Array:
    """``KL(softmax(reference) ‖ softmax(θ))`` between mixture weights."""
    log_p = jax.nn.log_softmax(reference_logits)
    return jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(theta)))


def guide_logits(params: dict, x: jax.Array, num_clusters: int) -> jax.Array:
    """The guide's logits ``f_φ(u_n)`` at the trained ``params`` (the ``"encoder"`` entry)."""
    u = standardise(x, num_clusters)[:, None]
    return Encoder(num_clusters).apply({"params": params["encoder"]}, u)


def evaluate(params: dict, x: jax.Array, reference_logits: jax.Array) -> dict[str, jax.Array]:
    """Exact measures at ``params`` on the points ``x``: ``model_error`` (``‖softmax(θ) -
    softmax(θ*)‖₂``), ``mixture_kl`` (``KL(softmax(θ*) ‖ softmax(θ))``), ``log_px`` (mean
    ``log p_θ(x_n)``) and ``posterior_kl`` (mean ``KL(p_θ(c | x_n) ‖ q_φ(c | x_n))``; 0 without
    a guide network, when ``c`` is summed out: its posterior is then the model's own, exact,
    ``sg.infer_discrete``)."""
    theta = params["theta"]
    num_clusters = theta.shape[-1]
    if "encoder" in params:
        kl = posterior_kl(theta, guide_logits(params, x, num_clusters), x).mean()
    else:
        kl = jnp.zeros(())
    return {
        "model_error": jnp.linalg.norm(jax.nn.softmax(theta) - jax.nn.softmax(reference_logits)),
        "mixture_kl": mixture_kl(reference_logits, theta),
        "log_px": exact_log_evidence(theta, x).mean(),
        "posterior_kl": kl,
    }


def make_evaluator(x_test: jax.Array, reference_logits: jax.Array
                   ) -> Callable[[dict], dict[str, jax.Array]]:
    """:func:`evaluate` on the fixed ``x_test``, jitted (one call per evaluation, no loops)."""
    return jax.jit(lambda params: evaluate(params, x_test, reference_logits))


# --------------------------------------------------------------------------------------------
# Methods and training


@dataclasses.dataclass(frozen=True)
class Method:
    """One ``--methods`` entry: the objective, the guide site's estimator and a label
    (``summed``: ``c`` summed out in the model, no guide network; see :func:`build`)."""

    objective: Callable[[int], sg.Objective]
    estimator: Callable[[], sg.Estimator | None]
    label: str
    min_particles: int = 1
    summed: bool = False


METHODS: dict[str, Method] = {
    "rws": Method(lambda k: sg.RWS(num_particles=k), lambda: None,
                  "RWS (wake-θ + wake-φ)"),
    "rloo": Method(lambda k: sg.ELBO(num_particles=k), sg.RLOO, "ELBO, RLOO", min_particles=2),
    "vimco": Method(lambda k: sg.IWAE(num_particles=k), sg.VIMCO, "IWAE, VIMCO",
                    min_particles=2),
    "ws": Method(lambda k: sg.WakeSleep(), lambda: None, "wake-sleep"),
    # nothing is sampled, so K particles would be K copies of the same exact value
    "enum": Method(lambda k: sg.ELBO(), lambda: None, "ELBO, c summed out", summed=True),
}


@dataclasses.dataclass
class MethodResult:
    """Curves (at ``steps``) and timings of one trained method."""

    name: str
    label: str
    steps: np.ndarray
    curves: dict[str, np.ndarray]
    losses: np.ndarray
    weights: np.ndarray
    params: dict
    compile_seconds: float
    seconds_per_step: float

    def final(self) -> dict[str, float]:
        """The last recorded value of every curve."""
        return {k: float(v[-1]) for k, v in self.curves.items()}


def train_method(name: str, args: argparse.Namespace, evaluator: Callable[[dict], dict],
                 ) -> MethodResult:
    """Train one method with :class:`scgjax.SVI` and Adam; evaluate every ``args.eval_every``
    steps.

    Each step draws a fresh batch of ``args.batch_size`` points from the true model with one
    jitted call (``fold_in`` of the step number into the data key) and passes it to the
    jitted ``svi.update`` as an array, so the step compiles once. Seeds depend only on
    ``args.seed``: every method starts from the same parameters and sees the same data.
    ``seconds_per_step`` times the training steps only (the first step, which compiles, and
    the evaluations are left out; data sampling is included). The loop calls ``svi.update``
    itself: ``svi.run`` between evaluations would add a check of the data (one un-jitted run
    of the programs, about 20 training steps' time) to every one of them.
    """
    method = METHODS[name]
    model, guide = build(args.clusters, method.estimator(), args.init, method.summed)
    svi = sg.SVI(model, guide, optax.adam(args.lr), method.objective(args.num_particles))
    key_data, key_train = jax.random.split(jax.random.key(args.seed))
    theta_star = true_logits(args.clusters)
    batch_size = args.batch_size

    @jax.jit
    def batch(step: int | jax.Array) -> jax.Array:
        return sample_data(jax.random.fold_in(key_data, step), theta_star, batch_size)

    state = jax.jit(svi.init)(key_train, batch(0))
    every = args.eval_every
    record_at = [i for i in range(args.steps + 1) if i % every == 0 or i == args.steps]
    history: dict[str, list[float]] = {}

    def record(params: dict) -> dict[str, float]:
        values = {k: float(v) for k, v in evaluator(params).items()}
        for k, v in values.items():
            history.setdefault(k, []).append(v)
        return values

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc=f"{name:>5}", dynamic_ncols=True)
    record(state.params)
    losses: list[jax.Array] = []
    compile_seconds = 0.0
    train_seconds = 0.0
    upcoming = 1  # index in record_at of the next evaluation
    for i in range(1, args.steps + 1):
        start = time.perf_counter()
        state, loss = svi.update(state, batch(i))
        losses.append(loss)
        evaluate_now = i == record_at[upcoming]
        if i == 1 or evaluate_now:
            jax.block_until_ready(state)
        elapsed = time.perf_counter() - start
        if i == 1:
            compile_seconds = elapsed
        else:
            train_seconds += elapsed
        if evaluate_now:
            upcoming += 1
            values = record(state.params)
            if bar is not None:
                bar.set_postfix_str(f"model err {values['model_error']:.3f}, "
                                    f"log p(x) {values['log_px']:.3f}, "
                                    f"post. KL {values['posterior_kl']:.3f}")
                bar.update(i - bar.n)
    if bar is not None:
        bar.close()
    # dispatch is asynchronous: an interval usually ends when its step is enqueued, but those
    # before an evaluation wait for the queue, so the intervals add up to the real time
    per_step = train_seconds / (args.steps - 1) if args.steps > 1 else float("nan")
    return MethodResult(
        name=name,
        label=method.label,
        steps=np.asarray(record_at),
        curves={k: np.asarray(v) for k, v in history.items()},
        losses=np.asarray(jax.device_get(losses)),
        weights=np.asarray(jax.nn.softmax(state.params["theta"])),
        params=state.params,
        compile_seconds=compile_seconds,
        seconds_per_step=per_step,
    )


# --------------------------------------------------------------------------------------------
# Plots

PANELS = (
    ("model_error", "model error ‖softmax(θ) − p*‖₂", True),
    ("log_px", "held-out log p_θ(x) (nats/point)", False),
    ("posterior_kl", "held-out KL(p_θ(c|x) ‖ q_φ(c|x))", True),
)


def plot_curves(path: Path, results: Sequence[MethodResult], true_log_px: float,
                title: str) -> None:
    """Three panels against steps: the model error, the held-out ``log p(x)`` (the true model's
    as a dashed line) and the posterior KL; one line per method."""
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.0))
    for ax, (key, ylabel, log_scale) in zip(axes, PANELS, strict=True):
        zero = []
        for r in results:
            if log_scale and not np.any(r.curves[key] > 0):  # no guide: KL 0 by construction
                ax.plot([], [], lw=1.4)  # keeps each method's colour in every panel
                zero.append(r.label)
                continue
            ax.plot(r.steps, r.curves[key], lw=1.4, label=r.label)
        if key == "log_px":
            ax.axhline(true_log_px, color="k", ls="--", lw=1.0, label="true model")
            values = np.concatenate([r.curves[key][1:] for r in results])
            values = values[np.isfinite(values)]
            if values.size:  # leave out the first evaluations' very low values
                lo = min(np.percentile(values, 5), true_log_px)
                hi = max(values.max(), true_log_px)
                pad = 0.1 * (hi - lo) + 1e-3
                ax.set_ylim(lo - pad, hi + pad)
        if zero:
            ax.text(0.98, 0.98, "\n".join(f"{label}: 0 (exact posterior)" for label in zero),
                    transform=ax.transAxes, ha="right", va="top", fontsize=8)
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_weights(path: Path, results: Sequence[MethodResult], true_weights: np.ndarray,
                 title: str) -> None:
    """Learned mixture weights ``softmax(θ)`` of each method against the true ones."""
    num_clusters = len(true_weights)
    clusters = np.arange(num_clusters)
    width = 0.8 / (len(results) + 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * num_clusters), 4.0))
    ax.bar(clusters - 0.4 + width / 2, true_weights, width, color="k", alpha=0.7, label="true")
    for j, r in enumerate(results, start=1):
        ax.bar(clusters - 0.4 + (j + 0.5) * width, r.weights, width, label=r.label)
    ax.set_xticks(clusters)
    ax.set_xlabel("cluster c (mean 10c)")
    ax.set_ylabel("mixture weight")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line


def make_parser() -> argparse.ArgumentParser:
    """The flags (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="rws_gmm.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20000,
                        help="training steps per method (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="fresh data points per step, N (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--num-particles", type=int, default=5,
                        help="particles per data point, K (default: %(default)s)")
    parser.add_argument("--clusters", type=int, default=20,
                        help="mixture components, C (default: %(default)s)")
    parser.add_argument("--methods", default="rws,rloo,vimco,enum",
                        help="comma-separated, from " + ", ".join(
                            f"{k} ({v.label})" for k, v in METHODS.items())
                        + " (default: %(default)s)")
    parser.add_argument("--init", choices=("far", "uniform"), default="far",
                        help="initial mixture weights: far (∝ exp(-c), as in the paper's code) "
                        "or uniform (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between exact evaluations (default: steps / 100)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out") / "rws_gmm",
                        help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check ``argv`` (``None``: ``sys.argv[1:]``); fills in ``eval_every`` and turns
    ``methods`` into a list."""
    parser = make_parser()
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "num_particles", "eval_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.clusters < 2:
        parser.error(f"--clusters must be at least 2, got {args.clusters}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        parser.error(f"--methods: unknown {unknown or 'empty list'}; choose from "
                     f"{', '.join(METHODS)}")
    for m in methods:
        if args.num_particles < METHODS[m].min_particles:
            parser.error(f"method {m!r} needs --num-particles >= {METHODS[m].min_particles} "
                         f"(a leave-one-out baseline needs other particles), got "
                         f"{args.num_particles}")
    args.methods = list(dict.fromkeys(methods))
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 100)
    return args


def _table(results: Sequence[MethodResult], initial: dict[str, float], true_log_px: float
           ) -> str:
    header = (f"{'method':<22} {'model err':>9} {'KL(p*‖pθ)':>10} {'log p(x)':>9} "
              f"{'post. KL':>9} {'ms/step':>8} {'compile s':>9}")
    rows = [header, "-" * len(header),
            f"{'initial':<22} {initial['model_error']:>9.4f} {initial['mixture_kl']:>10.4f} "
            f"{initial['log_px']:>9.4f} {initial['posterior_kl']:>9.4f}"]
    for r in results:
        f = r.final()
        rows.append(f"{r.label:<22} {f['model_error']:>9.4f} {f['mixture_kl']:>10.4f} "
                    f"{f['log_px']:>9.4f} {f['posterior_kl']:>9.4f} "
                    f"{1e3 * r.seconds_per_step:>8.3f} {r.compile_seconds:>9.2f}")
    rows.append(f"{'true model':<22} {0.0:>9.4f} {0.0:>10.4f} {true_log_px:>9.4f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train every method in ``--methods`` with the flags in ``argv`` (see ``--help``); write
    the PNGs, print the table.

    Returns a dict with ``methods`` (per method: ``label``, ``steps``, the ``curves``
    ``model_error``, ``mixture_kl``, ``log_px`` and ``posterior_kl`` at those steps, ``final``
    (their last values), ``weights`` (learned mixture weights), ``losses`` (per step),
    ``params``, ``ms_per_step`` and ``compile_seconds``), ``true_weights``, ``true_log_px``
    (the true model's mean held-out ``log p(x)``), ``paths`` of the PNGs and ``args``.
    """
    args = parse(argv)
    print(f"Gaussian mixture: C={args.clusters} clusters (means 10c, sd {SCALE:g}), true "
          f"weights ∝ c + 5, init {args.init}; guide MLP 1-{HIDDEN}-{HIDDEN}-{args.clusters}; "
          f"K={args.num_particles}, N={args.batch_size} fresh points/step, Adam lr {args.lr}, "
          f"{args.steps} steps, seed {args.seed}")
    theta_star = true_logits(args.clusters)
    x_test = sample_data(jax.random.fold_in(jax.random.key(args.seed), 10**6), theta_star,
                         NUM_TEST)
    evaluator = make_evaluator(x_test, theta_star)
    true_log_px = float(exact_log_evidence(theta_star, x_test).mean())

    results = []
    for name in args.methods:
        results.append(train_method(name, args, evaluator))
    initial = {k: float(v[0]) for k, v in results[0].curves.items()}

    print(f"\nafter {args.steps} steps (exact, on {NUM_TEST} held-out points):")
    print(_table(results, initial, true_log_px))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"curves": out / "rws_gmm.png", "weights": out / "weights.png"}
    title = (f"Gaussian mixture, C={args.clusters}, K={args.num_particles}, "
             f"N={args.batch_size}, Adam {args.lr:g}, seed {args.seed}")
    plot_curves(paths["curves"], results, true_log_px, title)
    true_weights = np.asarray(jax.nn.softmax(theta_star))
    plot_weights(paths["weights"], results, true_weights,
                 f"mixture weights after {args.steps} steps (K={args.num_particles}, "
                 f"seed {args.seed})")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {
        "methods": {
            r.name: {
                "label": r.label,
                "steps": r.steps,
                "curves": r.curves,
                "final": r.final(),
                "weights": r.weights,
                "losses": r.losses,
                "params": r.params,
                "ms_per_step": 1e3 * r.seconds_per_step,
                "compile_seconds": r.compile_seconds,
            }
            for r in results
        },
        "initial": initial,
        "true_weights": true_weights,
        "true_log_px": true_log_px,
        "paths": paths,
        "args": vars(args),
    }


if __name__ == "__main__":
    main()
