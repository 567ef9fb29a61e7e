"""Linear VAE with 200 binary latents on MNIST, trained with score-function estimators.

The benchmark model of the ARM / DisARM / double-control-variates papers (Yin & Zhou, ICLR
2019; Dong, Mnih & Tucker, NeurIPS 2020; Titsias & Shi, AISTATS 2022), for each dynamically
binarised image ``x`` in {0, 1}^784 and latent ``z`` in {0, 1}^200::

    p(z)     = prod_j Bernoulli(z_j | sigmoid(a_j))                a: learned 200-vector
    p(x | z) = prod_i Bernoulli(x_i | sigmoid((W z + b)_i))        flax nn.Dense(784)
    q(z | x) = prod_j Bernoulli(z_j | sigmoid((W' x + b')_j))      flax nn.Dense(200)

    ELBO(x) = E_q(z|x)[ log p(x | z) + log p(z) - log q(z | x) ].

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
    model, guide = build(estimator)
    svi = sg.SVI(model, guide, optax.adam(1e-3), sg.ELBO(num_particles=k))
    state = svi.init(key, x_batch); state, loss = svi.update(state, x_batch)

Run (about a minute on a 2-core CPU with the defaults)::

    python examples/binary_vae_mnist.py                          # score, K=1, 10000 steps
    python examples/binary_vae_mnist.py --estimator rloo --num-particles 4
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


@dataclasses.dataclass(frozen=True)
class EstimatorChoice:
    """One ``--estimator`` option: how to build it and how many particles it needs."""

    make: Callable[[], sg.Estimator]
    default_particles: int = 1
    min_particles: int = 1
    description: str = ""


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


def build(estimator: sg.Estimator | None = None, latent_dim: int = LATENT_DIM,
          decoder_bias: np.ndarray | None = None) -> tuple[Callable, Callable]:
    """The model and guide, as functions ``(x, num=None)`` of a ``(B, 784)`` binary batch.

    Args:
        estimator: the gradient estimator of the guide's ``z`` site (``None``: scgjax's
            default for a discrete site: RLOO when K >= 2, else the score function with a
            moving-average baseline).
        latent_dim: number of binary latents (200 in the papers).
        decoder_bias: optional initial value of the decoder bias ``b`` (784 logits, e.g. the
            logit of the mean training image); zeros by default, as in the papers' code.

    With ``x=None`` the model draws ``num`` images instead of scoring data.
    """
    bias_init = nn.initializers.zeros
    if decoder_bias is not None:
        bias = jnp.asarray(decoder_bias, jnp.float32)
        bias_init = lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(bias, shape)  # noqa: E731
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
    dict of ``_common.run_experiment`` plus ``estimator`` and ``num_particles``."""
    parser = common.make_parser("binary_vae_mnist", __doc__.split("\n")[0], steps=10000,
                                batch_size=50, lr=1e-3)
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="score",
                        help="gradient estimator of z (default: %(default)s): " + "; ".join(
                            f"{k}: {v.description} (default K={v.default_particles})"
                            for k, v in ESTIMATORS.items()))
    args = common.parse(parser, argv)
    try:
        estimator, k = make_estimator(args.estimator, args.num_particles)
    except ValueError as e:
        parser.error(str(e))
    model, guide = build(estimator)
    print(f"binary VAE: {LATENT_DIM} Bernoulli latents, linear encoder/decoder, estimator "
          f"{estimator}, K={k}, batch {args.batch_size}, Adam lr {args.lr}, {args.steps} steps")
    # evaluate every estimator on the discrete ELBO (a relaxation trains on a relaxed one)
    _, discrete_guide = build(sg.ScoreFunction())
    results = common.run_experiment(args, model, guide, sg.ELBO(num_particles=k),
                                    f"binary VAE ({args.estimator}, K={k})",
                                    eval_guide=discrete_guide)
    return {**results, "estimator": args.estimator, "num_particles": k}


if __name__ == "__main__":
    main()
