"""Variational autoencoder with Gaussian latents on MNIST (Kingma & Welling, ICLR 2014).

Model and guide, for each image ``x`` in {0, 1}^784 (dynamically binarised) and latent
``z`` in R^d (``--latent-dim``, default 20)::

    p(z)     = N(z | 0, I_d)
    p(x | z) = prod_i Bernoulli(x_i | sigmoid(f_theta(z)_i))        f_theta: d -> 400 -> 784
    q(z | x) = N(z | mu_phi(x), diag(sigma_phi(x)^2))               (mu, sigma): 784 -> 400 -> 2d

and the evidence lower bound, maximised in ``theta`` and ``phi`` by Adam,

    ELBO(x) = E_q(z|x)[ log p(x | z) + log p(z) - log q(z | x) ]  <=  log p(x),

estimated with ``K`` (``--num-particles``) samples ``z = mu + sigma * eps``, ``eps ~ N(0, I)``:
the Normal guide site defaults to the pathwise (reparameterisation) gradient. The networks are
flax linen MLPs registered with ``sg.module``; the per-image sites sit in
``sg.plate("data", batch)`` and the latent dimension is an event (``.to_event(1)``).

Run (about 2 to 3 minutes on a 2-core CPU with the defaults)::

    python examples/vae_mnist.py                       # 3000 steps, batch 100
    SCGJAX_DATA_DIR=/path/to/mnist python examples/vae_mnist.py --steps 10000 --out out/vae

It prints where the data came from, a progress bar, the training ELBO (mean of the last 100
steps) and the test-set ELBO in nats per image, and writes ``loss_curve.png``,
``reconstructions.png`` and ``samples.png`` into ``--out`` (default ``out/vae_mnist``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import scgjax as sg
from scgjax import dist

if __package__:  # imported as examples.vae_mnist
    from . import _common as common
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common

NUM_PIXELS = 784


class Encoder(nn.Module):
    """``x -> (mu, sigma)``: one hidden ReLU layer, then ``2 * latent_dim`` outputs."""

    latent_dim: int
    hidden: int = 400

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.relu(nn.Dense(self.hidden)(x))
        out = nn.Dense(2 * self.latent_dim)(h)
        loc, raw_scale = jnp.split(out, 2, axis=-1)
        return loc, nn.softplus(raw_scale) + 1e-4


class Decoder(nn.Module):
    """``z -> logits`` of the 784 pixels: one hidden ReLU layer."""

    hidden: int = 400

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.hidden)(z))
        return nn.Dense(NUM_PIXELS)(h)


def gaussian_vae(encoder: nn.Module, decoder: nn.Module, latent_dim: int
                 ) -> tuple[Callable, Callable]:
    """The model and guide of a Gaussian-latent VAE with these networks (``encoder: x -> (mu,
    sigma)``, ``decoder: z -> logits``), as functions ``(x, num=None)`` of a ``(B, 784)``
    batch. With ``x=None`` the model draws ``num`` images instead of scoring data."""

    def model(x: jax.Array | None, num: int | None = None) -> None:
        decode = sg.module("decoder", decoder, jnp.zeros((1, latent_dim)))
        prior = dist.Normal(jnp.zeros(latent_dim), 1.0).to_event(1)
        with sg.plate("data", num if x is None else x.shape[0]):
            z = sg.sample("z", prior)
            sg.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x)

    def guide(x: jax.Array, num: int | None = None) -> None:
        encode = sg.module("encoder", encoder, jnp.zeros((1, NUM_PIXELS)))
        with sg.plate("data", x.shape[0]):
            loc, scale = encode(x)
            sg.sample("z", dist.Normal(loc, scale).to_event(1))  # pathwise by default

    return model, guide


def build(latent_dim: int = 20, hidden: int = 400) -> tuple[Callable, Callable]:
    """The model and guide (:func:`gaussian_vae`) with one-hidden-layer ReLU MLPs."""
    return gaussian_vae(Encoder(latent_dim, hidden), Decoder(hidden), latent_dim)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the VAE with the flags in ``argv`` (see ``--help``); return the results dict of
    ``_common.run_experiment`` (``train_elbo``, ``test_elbo``, timings, PNG paths, ...)."""
    parser = common.make_parser("vae_mnist", __doc__.split("\n")[0], steps=3000,
                                batch_size=100, lr=1e-3)
    parser.add_argument("--latent-dim", type=int, default=20,
                        help="dimension of z (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=400,
                        help="hidden units per MLP (default: %(default)s)")
    args = common.parse(parser, argv)
    num_particles = args.num_particles or 1
    model, guide = build(args.latent_dim, args.hidden)
    print(f"Gaussian VAE: latent dim {args.latent_dim}, hidden {args.hidden}, K={num_particles},"
          f" batch {args.batch_size}, Adam lr {args.lr}, {args.steps} steps")
    return common.run_experiment(args, model, guide, sg.ELBO(num_particles=num_particles),
                                 "Gaussian VAE")


if __name__ == "__main__":
    main()
