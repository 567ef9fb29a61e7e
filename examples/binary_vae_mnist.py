"""Binary-latent VAE on MNIST (linear or nonlinear), trained with score-function estimators.

The benchmark models of the ARM / DisARM / double-control-variates papers (Yin & Zhou, ICLR
2019; Dong, Mnih & Tucker, NeurIPS 2020; Titsias & Shi, AISTATS 2022), for each dynamically
binarised image ``x`` in {0, 1}^784 and latent ``z`` in {0, 1}^200::

    p(z)     = prod_j Bernoulli(z_j | sigmoid(a_j))                a: learned 200-vector
    p(x | z) = prod_i Bernoulli(x_i | sigmoid(dec(z)_i))
    q(z | x) = prod_j Bernoulli(z_j | sigmoid(enc(x)_j))

    ELBO(x) = E_q(z|x)[ log p(x | z) + log p(z) - log q(z | x) ].

``--architecture`` (:data:`ARCHITECTURES`) chooses ``enc`` and ``dec``:

- ``linear`` (default): ``enc(x) = W' x + b'`` (flax ``nn.Dense(200)``) and
  ``dec(z) = W z + b`` (``nn.Dense(784)``), 784-200-784;
- ``nonlinear``: two hidden layers of 200 LeakyReLU units on each side, 784-200-200-200 and
  200-200-200-784 (:class:`MLP`)::

      enc(x) = W3' h2 + b3',  h2 = lrelu(W2' h1 + b2'),  h1 = lrelu(W1' x + b1')
      dec(z) = W3 g2 + b3,    g2 = lrelu(W2 g1 + b2),    g1 = lrelu(W1 z + b1)
      lrelu(u) = max(u, 0.3 u)

  as in the DisARM and double-CV code (google-research ``disarm/experiment_launcher.py`` and
  thjashin/double-cv ``experiment_launcher_singlelayer.py``: ``encoder_type='nonlinear'``,
  Keras ``LeakyReLU(alpha=0.3)``). Weights start at flax's defaults (LeCun-normal kernels,
  zero biases) in both models, where the papers' Keras code uses Glorot-uniform kernels.

``z`` is discrete, so there is no pathwise gradient for the encoder: the guide's ``z`` site is
given a score-function estimator (``--estimator``)

- ``score``: REINFORCE with a moving-average baseline,
  ``sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9))`` (K = 1 by default);
- ``rloo``: REINFORCE leave-one-out over K >= 2 samples, ``sg.RLOO()`` (Kool et al. 2019;
  K = 2 by default);
- ``dcv``: double control variates, ``sg.DCV()`` (Titsias & Shi 2022; K >= 2);
- ``disarm``: antithetic pairs, ``sg.DisARM()`` (Dong, Mnih & Tucker 2020; K even);
- ``gumbel`` / ``st``: the Concrete relaxation and its straight-through form at temperature
  0.5 (Maddison et al. 2017; Jang et al. 2017), biased.

The estimators live in :data:`ESTIMATORS` (name -> :class:`EstimatorChoice`); a new one is one
more entry. The test ELBO is always the discrete one. Each image's ``z`` is in
``sg.plate("data", batch)``, so the score of ``z[n]`` is credited only with image ``n``'s
terms; the 200 latent dimensions form one event (``.to_event(1)``).

Other code (the benchmarks in ``bench/``) reuses exactly this model::

    from examples.binary_vae_mnist import build, make_estimator
    estimator, k = make_estimator("rloo")            # (sg.RLOO(), 2)
    model, guide = build(estimator)                  # or build(estimator, architecture="nonlinear")
    svi = sg.SVI(model, guide, optax.adam(1e-3), sg.ELBO(num_particles=k))
    state = svi.init(key, x_batch); state, loss = svi.update(state, x_batch)

``--compare-estimators`` then measures, at the trained params and on one training batch, the
gradient variance and the time per step of the unbiased estimators of ``z`` (:data:`COMPARED`,
all with the run's K) and recommends the one of least variance x time
(:func:`compare_estimators`, built on ``sg.diagnostics.compare_estimators``).

Run (about a minute on a 2-core CPU with the defaults)::

    python examples/binary_vae_mnist.py                          # score, K=1, 10000 steps
    python examples/binary_vae_mnist.py --estimator rloo --num-particles 4
    python examples/binary_vae_mnist.py --architecture nonlinear --estimator disarm
    python examples/binary_vae_mnist.py --architecture nonlinear --estimator rloo \
        --steps 1000 --compare-estimators
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import scgjax as sg
from scgjax import dist

if __package__:  # imported as examples.binary_vae_mnist
    from . import _common as common
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common

NUM_PIXELS = 784
LATENT_DIM = 200
#: Negative slope of the nonlinear model's LeakyReLU units (Keras' ``LeakyReLU(alpha=0.3)`` in
#: the DisARM and double-CV code).
LEAKY_SLOPE = 0.3

#: ``--architecture`` -> the hidden-layer widths of the encoder and of the (mirrored) decoder;
#: no hidden layer is the linear model.
ARCHITECTURES: dict[str, tuple[int, ...]] = {"linear": (), "nonlinear": (200, 200)}


class MLP(nn.Module):
    """``features`` outputs of ``len(hidden)`` LeakyReLU layers then a linear layer::

        h_0 = x,   h_l = leaky_relu(W_l h_{l-1} + b_l, negative_slope),   out = W h_L + b

    with ``nn.Dense`` layers named ``hidden_0``, ``hidden_1``, ... and ``out`` (whose bias
    starts at ``bias_init``).
    """

    features: int
    hidden: Sequence[int] = (200, 200)
    negative_slope: float = LEAKY_SLOPE
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = nn.leaky_relu(nn.Dense(width, name=f"hidden_{i}")(x), self.negative_slope)
        return nn.Dense(self.features, bias_init=self.bias_init, name="out")(x)


def describe(architecture: str = "linear", latent_dim: int = LATENT_DIM) -> str:
    """A one-line description of the encoder and decoder, e.g. ``"linear 784-200-784"``."""
    hidden = _hidden(architecture)
    if not hidden:
        return f"{architecture} {NUM_PIXELS}-{latent_dim}-{NUM_PIXELS}"
    enc = "-".join(map(str, (NUM_PIXELS, *hidden, latent_dim)))
    dec = "-".join(map(str, (latent_dim, *reversed(hidden), NUM_PIXELS)))
    return f"{architecture}: encoder {enc}, decoder {dec}, LeakyReLU({LEAKY_SLOPE})"


def _hidden(architecture: str) -> tuple[int, ...]:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture]


@dataclasses.dataclass(frozen=True)
class EstimatorChoice:
    """One ``--estimator`` option: how to build it and how many particles it needs."""

    make: Callable[[], sg.Estimator]
    default_particles: int = 1
    min_particles: int = 1
    description: str = ""


class RelaxControlVariate(nn.Module):
    """RELAX's control variate ``c_phi(z)`` of an image's 200 latents: their logistic
    relaxation through a small tanh MLP, one value per image (Grathwohl et al. 2018 use a
    network of ``z`` too)."""

    hidden: int = 64

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        return nn.Dense(1)(nn.tanh(nn.Dense(self.hidden)(jax.nn.sigmoid(z))))[..., 0]


ESTIMATORS: dict[str, EstimatorChoice] = {
    "score": EstimatorChoice(
        lambda: sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9)),
        description="REINFORCE with a moving-average baseline (decay 0.9)"),
    "rloo": EstimatorChoice(
        sg.RLOO, default_particles=2, min_particles=2,
        description="REINFORCE leave-one-out over K >= 2 samples"),
    "dcv": EstimatorChoice(
        sg.DCV, default_particles=2, min_particles=2,
        description="double control variates: RLOO plus a learned Taylor control variate"),
    "disarm": EstimatorChoice(
        sg.DisARM, default_particles=2, min_particles=2,
        description="antithetic pairs of particles (K even)"),
    "rebar": EstimatorChoice(
        lambda: sg.REBAR(relaxation="first_order"), default_particles=2, min_particles=2,
        description="REBAR with its control variate relaxed to first order around the other "
        "particles (not the paper's f(sigma_lambda(z))); eta and the temperature trained"),
    "rebar_exact": EstimatorChoice(
        sg.REBAR, default_particles=2, min_particles=1,
        description="REBAR with the paper's control variate f(sigma_lambda(z)): the model run "
        "again at the relaxed latents z and z~ (twice per step), eta and the temperature "
        "trained"),
    "relax": EstimatorChoice(
        lambda: sg.RELAX(RelaxControlVariate()), default_particles=2, min_particles=1,
        description="RELAX: a learned control variate on the relaxed latents, trained in the "
        "same step on the gradient's variance; leave-one-out baseline at K >= 2"),
    "rodeo": EstimatorChoice(
        sg.RODEO, default_particles=2, min_particles=2,
        description="RODEO: discrete Stein-operator control variates (Shi et al. 2022)"),
    "gumbel": EstimatorChoice(
        lambda: sg.GumbelSoftmax(0.5),
        description="Gumbel-softmax / Concrete relaxation at temperature 0.5 (biased)"),
    "st": EstimatorChoice(
        lambda: sg.StraightThrough(0.5),
        description="straight-through Gumbel-softmax at temperature 0.5 (biased)"),
}


def make_estimator(name: str, num_particles: int | None = None) -> tuple[sg.Estimator, int]:
    """The estimator called ``name`` in :data:`ESTIMATORS` and the number of particles to use
    (its default when ``num_particles`` is ``None``).

    Raises ``ValueError`` for an unknown name or too few particles (e.g. ``rloo`` with K=1).
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    choice = ESTIMATORS[name]
    k = choice.default_particles if num_particles is None else num_particles
    if k < choice.min_particles:
        raise ValueError(
            f"estimator {name!r} needs --num-particles >= {choice.min_particles} (a "
            f"leave-one-out baseline needs other samples), got {k}"
        )
    return choice.make(), k


#: The estimators that ``--compare-estimators`` measures: the unbiased ones (a relaxation's
#: gradient is biased, so its variance is no measure of its quality).
COMPARED: tuple[str, ...] = ("score", "rloo", "dcv", "disarm")


def compare_estimators(params: dict, x: jax.Array, *, architecture: str = "linear",
                       num_particles: int = 2, names: Sequence[str] = COMPARED,
                       num_samples: int = 200, warmup_steps: int = 100, seed: int = 0,
                       criterion: str = "work") -> sg.diagnostics.EstimatorComparison:
    """Measure each estimator of ``names`` (keys of :data:`ESTIMATORS`) for the guide's ``z``
    at ``params`` on the batch ``x``: ``sg.diagnostics.compare_estimators`` under
    ``sg.ELBO(num_particles)``, ``num_samples`` gradient estimates each, after
    ``warmup_steps`` steps that train the estimator's own state and params alone (the
    moving-average baseline, DCV's ``alpha``). Returns the comparison: ``.summary()`` is the
    table and ``.assignment["z"]`` the estimator of least variance x time per step (or of
    least variance, ``criterion="variance"``).

    Raises ``ValueError`` if an estimator needs more particles than ``num_particles``.
    """
    candidates = [make_estimator(name, num_particles)[0] for name in names]
    model, guide = build(None, architecture=architecture)
    return sg.diagnostics.compare_estimators(
        sg.ELBO(num_particles=num_particles), params, seed, model, guide, x,
        candidates={"z": candidates}, num_samples=num_samples, warmup_steps=warmup_steps,
        criterion=criterion)


def build(estimator: sg.Estimator | None = None, latent_dim: int = LATENT_DIM,
          decoder_bias: np.ndarray | None = None, architecture: str = "linear",
          ) -> tuple[Callable, Callable]:
    """The model and guide, as functions ``(x, num=None)`` of a ``(B, 784)`` binary batch.

    Args:
        estimator: the gradient estimator of the guide's ``z`` site (``None``: scgjax's
            default for a discrete site: RLOO when K >= 2, else the score function with a
            moving-average baseline).
        latent_dim: number of binary latents (200 in the papers).
        decoder_bias: optional initial value of the decoder's output bias ``b`` (784 logits,
            e.g. the logit of the mean training image); zeros by default, as in the papers'
            code.
        architecture: a key of :data:`ARCHITECTURES`: ``"linear"`` (``nn.Dense`` encoder and
            decoder, params ``encoder/kernel`` (784, 200) and ``decoder/kernel`` (200, 784)) or
            ``"nonlinear"`` (:class:`MLP` with two hidden LeakyReLU layers of 200 on each side,
            params ``encoder/{hidden_0,hidden_1,out}`` and likewise for the decoder).

    With ``x=None`` the model draws ``num`` images instead of scoring data.

    Raises ``ValueError`` for an unknown architecture.
    """
    hidden = _hidden(architecture)
    bias_init = nn.initializers.zeros
    if decoder_bias is not None:
        bias = jnp.asarray(decoder_bias, jnp.float32)
        bias_init = lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(bias, shape)  # noqa: E731
    if hidden:
        decoder: nn.Module = MLP(NUM_PIXELS, tuple(reversed(hidden)), bias_init=bias_init)
        encoder: nn.Module = MLP(latent_dim, hidden)
    else:
        decoder = nn.Dense(NUM_PIXELS, bias_init=bias_init)
        encoder = nn.Dense(latent_dim)

    def model(x: jax.Array | None, num: int | None = None) -> None:
        prior_logits = sg.param("prior_logits", jnp.zeros(latent_dim))
        decode = sg.module("decoder", decoder, jnp.zeros((1, latent_dim)))
        with sg.plate("data", num if x is None else x.shape[0]):
            z = sg.sample("z", dist.Bernoulli(logits=prior_logits).to_event(1))
            logits = decode(z.astype(jnp.float32))
            sg.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x: jax.Array, num: int | None = None) -> None:
        encode = sg.module("encoder", encoder, jnp.zeros((1, NUM_PIXELS)))
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Bernoulli(logits=encode(x)).to_event(1), estimator=estimator)

    return model, guide


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the binary VAE with the flags in ``argv`` (see ``--help``); return the results
    dict of ``_common.run_experiment`` plus ``estimator``, ``num_particles`` and
    ``architecture``."""
    parser = common.make_parser("binary_vae_mnist", __doc__.split("\n")[0], steps=10000,
                                batch_size=50, lr=1e-3)
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="score",
                        help="gradient estimator of z (default: %(default)s): " + "; ".join(
                            f"{k}: {v.description} (default K={v.default_particles})"
                            for k, v in ESTIMATORS.items()))
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="linear",
                        help="encoder and decoder (default: %(default)s): linear 784-200-784, "
                        "or nonlinear 784-200-200-200 / 200-200-200-784 with LeakyReLU(0.3)")
    parser.add_argument("--compare-estimators", action="store_true",
                        help="after training, measure the gradient variance and time per step "
                        f"of {', '.join(COMPARED)} at the trained params (K as trained) and "
                        "recommend one")
    parser.add_argument("--compare-samples", type=int, default=200,
                        help="gradient estimates per estimator for --compare-estimators "
                        "(default: %(default)s)")
    args = common.parse(parser, argv)
    try:
        estimator, k = make_estimator(args.estimator, args.num_particles)
    except ValueError as e:
        parser.error(str(e))
    if args.compare_estimators and (k < 2 or k % 2):
        parser.error(f"--compare-estimators compares {', '.join(COMPARED)} at the run's K: it "
                     f"needs an even --num-particles >= 2 (DisARM's pairs), got {k}")
    if args.compare_samples < 20:  # 10 groups of at least 2 (the standard errors)
        parser.error(f"--compare-samples must be >= 20, got {args.compare_samples}")
    model, guide = build(estimator, architecture=args.architecture)
    print(f"binary VAE ({describe(args.architecture)}): {LATENT_DIM} Bernoulli latents, "
          f"estimator {estimator}, K={k}, batch {args.batch_size}, Adam lr {args.lr}, "
          f"{args.steps} steps")
    # evaluate every estimator on the discrete ELBO (a relaxation trains on a relaxed one)
    _, discrete_guide = build(sg.ScoreFunction(), architecture=args.architecture)
    title = "binary VAE" if args.architecture == "linear" else "nonlinear binary VAE"
    results = common.run_experiment(args, model, guide, sg.ELBO(num_particles=k),
                                    f"{title} ({args.estimator}, K={k})",
                                    eval_guide=discrete_guide)
    results = {**results, "estimator": args.estimator, "num_particles": k,
               "architecture": args.architecture}
    if args.compare_estimators:
        key_batch, key_bin = jax.random.split(jax.random.key(args.seed + 1))
        images = common.load_data(args.data_dir).train
        idx = jax.random.choice(key_batch, len(images), (args.batch_size,), replace=False)
        x = common.dynamic_binarize(key_bin, jnp.asarray(images)[idx])
        comparison = compare_estimators(results["params"], x, architecture=args.architecture,
                                        num_particles=k, num_samples=args.compare_samples,
                                        seed=args.seed)
        print(comparison.summary())
        results["comparison"] = comparison
    return results


if __name__ == "__main__":
    main()
