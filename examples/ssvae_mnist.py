"""Semi-supervised VAE M2 on MNIST (Kingma, Rezende, Mohamed & Welling, NeurIPS 2014).

A digit label ``y`` and a style ``z`` generate each image ``x`` in {0, 1}^784 (dynamically
binarised); ``y`` is observed for a few labelled images (``--labels``, default 100: 10 per
class, chosen with a fixed seed) and latent for all the others::

    p(y)        = Categorical(y | 1/10, ..., 1/10)
    p(z)        = N(z | 0, I_d)                                      (d = --latent-dim)
    p(x | y, z) = prod_i Bernoulli(x_i | sigmoid(f_theta(y, z)_i))    f_theta: 10 + d -> h -> 784
    q(y | x)    = Categorical(y | softmax(g_phi(x)))                  g_phi: 784 -> h -> 10
    q(z | x, y) = N(z | mu_phi(x, y), diag(sigma_phi(x, y)^2))        784 + 10 -> h -> 2d

(one-hot ``y``; one hidden ReLU layer of ``h = --hidden`` units per network). For a labelled
pair the bound is the VAE's, and for an unlabelled image ``y`` is a latent too::

    L(x, y) = E_q(z|x,y)[ log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y) ] <= log p(x, y)
    U(x)    = E_q(y|x)[ L(x, y) ] + H(q(y | x))
            = sum_y q(y | x) L(x, y) - sum_y q(y | x) log q(y | x)                   <= log p(x)

and the training objective adds Kingma's classification term, so that the classifier q(y|x),
which ``U`` trains only through the unlabelled images, also learns from the labels::

    J_alpha = sum_{(x, y) labelled} [ L(x, y) + alpha log q(y | x) ] + sum_{x unlabelled} U(x),
    alpha   = --alpha * N / N_l        (paper: 0.1 * N, on the mean over the N_l labelled images)

Here ``N`` is the number of training images and ``N_l`` the labelled ones, so the classification
term is ``--alpha`` times the mean ``log q(y | x)`` of the labelled images, per image of
``J_alpha / N``. The default, ``--alpha 3``, is 30 times the paper's 0.1: in a run of a few
CPU minutes (about 1000 times shorter than the paper's), with the paper's weight the unlabelled
term dominates and ``y`` tends to become a cluster variable that is not aligned with the digits;
``--alpha 0.1`` shows that (test accuracy 0.31 with enumeration). With ``--latent-dim 2``,
Enumerate reaches 0.65 test accuracy with ``--alpha 1``, 0.77 with 3 and 0.79 with 10.

The style ``z`` is small on purpose (``--latent-dim 2``): M2 is meant to separate the digit
``y`` from the style ``z``, but nothing in ``J_alpha`` forces that, and in a short run a large
``z`` learns the digit's identity itself (it has ample room to, and the encoder sees ``x``), so
the decoder learns to ignore ``y``. With ``--latent-dim 32``
sweeping ``y`` with ``z`` held fixed redraws the *same* digit in ``analogies.png`` (and even
with 3 or 4 dimensions it does for many images); with 2 dimensions ``z`` can hold only coarse
style (slant, stroke width), the decoder must take the digit from ``y``, and the grid shows
the ten digits in each image's style. The price is a worse bound (about -142 nats per test
image, against about -113 with 32 dimensions), not accuracy (0.77 with Enumerate and 0.78 with
RLOO, against 0.73 and 0.71 with 32 dimensions and ``--alpha 1``).

One program holds both kinds of data: ``model(x_l, y_l, x_u)`` and ``guide(x_l, y_l, x_u)``
have a plate ``"labelled"`` (``y_l`` observed in the model; the guide samples only ``z_l``)
and a plate ``"unlabelled"`` (the guide samples ``y_u ~ q(y | x)`` and then
``z_u ~ q(z | x, y_u)``). Each step takes a labelled mini-batch of ``B_l = min(N_l,
--batch-size)`` and an unlabelled one of ``B_u = --batch-size`` images, and scales the plates'
log-densities by ``N_l / (N B_l)`` and ``N_u / (N B_u)`` (``sg.handlers.scale``): the loss is an
unbiased estimate of ``-J_alpha / N``, per image. The term ``alpha log q(y_l | x_l)`` is an
``sg.factor`` of the model that calls the guide's classifier: both programs register it as
``sg.module("classifier", ...)``, and a module (param) of the same name is one set of weights,
trained by the gradients of both programs (``sg.param_labels`` calls it ``"shared"``).

Two estimators are compared for the unlabelled ``y`` (``--estimators``), with the same seed,
mini-batches and number of steps; ``z`` is pathwise (reparameterised) in both:

* ``enumerate``: ``sg.Enumerate()`` computes ``E_q(y|x)`` exactly, as ``sum_y q(y | x) ...``
  over the 10 classes (the program runs once per class, vectorised), so ``U(x)`` is estimated
  with only ``z`` sampled (``--enum-particles``, default 1, samples of ``z`` per image and
  class); the cost is 10 decoder passes per unlabelled image and particle.
* ``rloo``: ``sg.RLOO()`` samples ``y`` in ``K`` particles (``--num-particles``, default 4) and
  estimates the classifier's gradient by the score function with the leave-one-out baseline
  (Kool, van Hoof & Welling 2019), crediting each ``y_u[n]`` only with the costs of image ``n``.

Both are unbiased; enumeration has no score-function noise, at 10/K times the decoder work
(but RLOO also averages its ``K`` samples of ``z``, where enumeration has one per class). The
script reports the accuracy of ``argmax_y q(y | x)`` on the test images (binarised once with a
fixed key), during training and at the end, the test bound ``U(x)`` per image (``y``
enumerated, one ``z``), the training bound ``J / N`` (without the classification term) and the
time per step. Kingma et al. report 88.0% test accuracy for M2 with 100 labels (11.97% error,
Table 1; 96.7% for M1+M2), after far longer training on the full training set; a few CPU minutes
get much less.

Run (about 1 minute on a 2-core CPU for both estimators with the defaults)::

    python examples/ssvae_mnist.py                   # enumerate and rloo, 1000 steps each
    python examples/ssvae_mnist.py --alpha 0.1       # the paper's weight of the labels
    SCGJAX_DATA_DIR=/path/to/mnist python examples/ssvae_mnist.py --steps 20000 --out out/ssvae

It prints where the data came from, a progress bar per estimator, and a table (estimator, K,
training bound, test bound, test accuracy, ms per step), and writes ``training.png`` (training
bound and test accuracy against steps, one curve per estimator) and ``analogies.png`` (per
estimator: test images, then the decoder's means with the style ``z`` inferred from each image
held fixed and the digit ``y`` swept over 0..9) into ``--out`` (default ``out/ssvae_mnist``).

References:
    D. P. Kingma, D. J. Rezende, S. Mohamed, M. Welling. Semi-supervised learning with deep
    generative models. NeurIPS 2014.
    W. Kool, H. van Hoof, M. Welling. Buy 4 REINFORCE samples, get a baseline for free!
    ICLR workshop 2019.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from scgjax.data import dynamic_binarize

if __package__:  # imported as examples.ssvae_mnist
    from . import _common as common
else:  # run as a script, or loaded from its file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common

plt = common.plt

NUM_PIXELS = 784
NUM_CLASSES = 10
#: Kingma et al. 2014, Table 1: M2 with 100 labels, 11.97% (± 1.71) test error
PAPER_ACCURACY = 0.8803
#: the same, for the stacked M1+M2 model: 3.33% (± 0.14) test error
PAPER_ACCURACY_M1_M2 = 0.9667
#: the key that binarises the test images once, the same for every estimator and seed
TEST_BINARIZATION_SEED = 2014
#: the seed that picks the labelled images, the same for every estimator and --seed
LABELS_SEED = 0
ESTIMATORS = ("enumerate", "rloo")
Program = Callable[..., None]


# --------------------------------------------------------------------------------------------
# Networks and programs


class Classifier(nn.Module):
    """``x -> logits`` of q(y | x): one hidden ReLU layer."""

    num_classes: int = NUM_CLASSES
    hidden: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden)(x)))


class Encoder(nn.Module):
    """``(x, one-hot y) -> (mu, sigma)`` of q(z | x, y): one hidden ReLU layer."""

    latent_dim: int
    hidden: int = 256

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([x, y], axis=-1)))
        loc, raw_scale = jnp.split(nn.Dense(2 * self.latent_dim)(h), 2, axis=-1)
        return loc, nn.softplus(raw_scale) + 1e-4


class Decoder(nn.Module):
    """``(one-hot y, z) -> logits`` of the pixels of p(x | y, z): one hidden ReLU layer."""

    hidden: int = 256
    num_pixels: int = NUM_PIXELS

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([y, z], axis=-1)))
        return nn.Dense(self.num_pixels)(h)


@dataclasses.dataclass(frozen=True)
class Networks:
    """The three flax modules of a model/guide pair (to apply them outside the programs)."""

    classifier: Classifier
    encoder: Encoder
    decoder: Decoder
    num_classes: int
    latent_dim: int


def objective_scales(num_labelled: int, num_unlabelled: int, batch_labelled: int,
                     batch_unlabelled: int) -> tuple[float, float]:
    """The plate scales ``(N_l / (N B_l), N_u / (N B_u))`` that make the loss of one pair of
    mini-batches an unbiased estimate of minus the objective per training image, ``J / N``."""
    n = num_labelled + num_unlabelled
    return num_labelled / (n * batch_labelled), num_unlabelled / (n * batch_unlabelled)


def build(y_estimator: sg.Estimator | None = None, *, num_classes: int = NUM_CLASSES,
          latent_dim: int = 32, hidden: int = 256, num_pixels: int = NUM_PIXELS,
          scale_labelled: float = 1.0, scale_unlabelled: float = 1.0, alpha: float = 0.0,
          ) -> tuple[Program, Program, Networks]:
    """The M2 model and guide, as functions ``(x_l, y_l, x_u)`` of a labelled batch (images
    ``(B_l, P)`` and int labels ``(B_l,)``) and an unlabelled batch ``(B_u, P)``.

    ``y_estimator`` is the estimator of the guide's unlabelled ``y_u`` (``None``: the default
    for ``K``). The log-densities of the labelled and unlabelled plates are scaled by
    ``scale_labelled`` and ``scale_unlabelled`` (see :func:`objective_scales`), and the model
    adds ``alpha * log q(y_l | x_l)`` in the labelled plate (a factor named
    ``"classification"``, through the guide's classifier). With ``x_l=None`` (and
    ``y_l=None``) the programs have only the unlabelled plate, and with ``x_u=None`` only the
    labelled one: e.g. ``build(sg.Enumerate())`` with ``x_l=None`` gives ``-U(x)`` summed over
    the batch as the loss of ``sg.ELBO()``.
    """
    nets = Networks(Classifier(num_classes, hidden), Encoder(latent_dim, hidden),
                    Decoder(hidden, num_pixels), num_classes, latent_dim)
    prior_y = dist.Categorical(logits=jnp.zeros(num_classes))
    prior_z = dist.Normal(jnp.zeros(latent_dim), 1.0).to_event(1)
    one_hot = lambda y: jax.nn.one_hot(y, num_classes)
    # Built here, not inside the programs: sg.handlers.scale checks that its scale is positive
    # with jnp, which fails on a Python float while a program is traced under jit. A scale
    # handler has no per-call state, so one object serves every call.
    labelled_scale = sg.handlers.scale(scale=scale_labelled)
    unlabelled_scale = sg.handlers.scale(scale=scale_unlabelled)

    def classifier() -> Callable:
        return sg.module("classifier", nets.classifier, jnp.zeros((1, num_pixels)))

    def model(x_l: jax.Array | None, y_l: jax.Array | None, x_u: jax.Array | None) -> None:
        decode = sg.module("decoder", nets.decoder, jnp.zeros((1, num_classes)),
                           jnp.zeros((1, latent_dim)))
        if x_l is not None:
            classify = classifier()  # the guide's classifier: one set of weights
            with labelled_scale, sg.plate("labelled", x_l.shape[0]):
                y = sg.sample("y_l", prior_y, obs=y_l)
                z = sg.sample("z_l", prior_z)
                sg.sample("x_l", dist.Bernoulli(logits=decode(one_hot(y), z)).to_event(1),
                          obs=x_l)
                if alpha:
                    log_q = dist.Categorical(logits=classify(x_l)).log_prob(y_l)
                    sg.factor("classification", alpha * log_q)
        if x_u is not None:
            with unlabelled_scale, sg.plate("unlabelled", x_u.shape[0]):
                y = sg.sample("y_u", prior_y)
                z = sg.sample("z_u", prior_z)
                sg.sample("x_u", dist.Bernoulli(logits=decode(one_hot(y), z)).to_event(1),
                          obs=x_u)

    def guide(x_l: jax.Array | None, y_l: jax.Array | None, x_u: jax.Array | None) -> None:
        encode = sg.module("encoder", nets.encoder, jnp.zeros((1, num_pixels)),
                           jnp.zeros((1, num_classes)))
        if x_l is not None:
            with labelled_scale, sg.plate("labelled", x_l.shape[0]):
                loc, scale = encode(x_l, one_hot(y_l))
                sg.sample("z_l", dist.Normal(loc, scale).to_event(1))
        if x_u is not None:
            classify = classifier()
            with unlabelled_scale, sg.plate("unlabelled", x_u.shape[0]):
                y = sg.sample("y_u", dist.Categorical(logits=classify(x_u)),
                              estimator=y_estimator)
                loc, scale = encode(x_u, one_hot(y))
                sg.sample("z_u", dist.Normal(loc, scale).to_event(1))  # pathwise

    return model, guide, nets


def make_estimator(name: str, num_particles: int | None = None, enum_particles: int = 1
                   ) -> tuple[sg.Estimator, int]:
    """``(estimator of y_u, K)`` for ``"enumerate"`` (``K = enum_particles``) or ``"rloo"``
    (``K = num_particles``, default 4)."""
    if name == "enumerate":
        return sg.Enumerate(), enum_particles
    if name == "rloo":
        k = 4 if num_particles is None else num_particles
        if k < 2:
            raise ValueError(f"rloo needs --num-particles >= 2, got {k}")
        return sg.RLOO(), k
    raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")


# --------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class LabelledData:
    """MNIST images ``(N, 784)`` in [0, 1] with int32 labels, train and test, and sources."""

    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    train_source: str
    test_source: str


def load_labelled_data(data_dir: str | Path | None = None, holdout: int = 1000
                       ) -> LabelledData:
    """Like ``_common.load_data`` (which returns no labels), with the labels: the splits of
    ``_common.load_splits`` (without a test split, ``holdout`` random training images)."""
    train, test = common.load_splits(data_dir, holdout)
    return LabelledData(train.images, train.labels, test.images, test.labels, train.source,
                        test.source)


def choose_labelled(labels: np.ndarray, num: int, num_classes: int = NUM_CLASSES,
                    seed: int = LABELS_SEED) -> np.ndarray:
    """Indices of ``num`` images, balanced over the classes (``num // num_classes`` each, one
    more for ``num % num_classes`` classes drawn at random), chosen at random with ``seed``."""
    if num < num_classes:
        raise ValueError(f"need at least one label per class ({num_classes}), got {num}")
    rng = np.random.default_rng(seed)
    counts = np.full(num_classes, num // num_classes)
    counts[rng.permutation(num_classes)[: num % num_classes]] += 1
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < counts[c]:
            raise ValueError(f"only {len(pool)} training images of class {c}; "
                             f"{counts[c]} needed for {num} balanced labels")
        chosen.append(rng.choice(pool, counts[c], replace=False))
    return np.sort(np.concatenate(chosen))


class LabelledBatches:
    """Endless dynamically binarised labelled mini-batches ``(x, y)``, reshuffled per epoch
    (``_common.Batches`` with the labels gathered alongside the images)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 rng_key: jax.Array):
        n = int(images.shape[0])
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} labelled images")
        self.images, self.labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
        self.batch_size, self.per_epoch = batch_size, n // batch_size
        key_order, self._key = jax.random.split(rng_key)
        self._rng = np.random.default_rng(np.asarray(jax.random.key_data(key_order)))
        self._perm, self._i = np.empty(0, np.int32), self.per_epoch
        self._gather = jax.jit(lambda images, labels, idx, key: (
            dynamic_binarize(key, images[idx]), labels[idx]))

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        if self._i == self.per_epoch:
            self._perm, self._i = self._rng.permutation(len(self.images)).astype(np.int32), 0
        idx = self._perm[self._i * self.batch_size:(self._i + 1) * self.batch_size]
        self._i += 1
        self._key, key = jax.random.split(self._key)
        return self._gather(self.images, self.labels, idx, key)


# --------------------------------------------------------------------------------------------
# Evaluation


def accuracy_fn(nets: Networks, images: jax.Array, labels: jax.Array
                ) -> Callable[[dict], jax.Array]:
    """A jitted ``params -> accuracy of argmax_y q(y | x)`` on ``images`` (binary)."""
    images, labels = jnp.asarray(images), jnp.asarray(labels)

    @jax.jit
    def accuracy(params: dict) -> jax.Array:
        logits = nets.classifier.apply({"params": params["classifier"]}, images)
        return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

    return accuracy


@functools.lru_cache(maxsize=8)
def _bound_sums(latent_dim: int, hidden: int) -> Callable:
    """A jitted ``(params, key, batches) -> sum of U(x)``, built (and compiled) once per
    architecture, so that every estimator's model reuses it."""
    model, guide, _ = build(sg.Enumerate(), latent_dim=latent_dim, hidden=hidden)
    objective = sg.ELBO()

    @jax.jit
    def total(params: dict, key: jax.Array, xs: jax.Array) -> jax.Array:
        keys = jax.random.split(key, xs.shape[0])
        return jax.lax.map(
            lambda kx: -objective.loss(kx[0], params, model, guide, None, None, kx[1]),
            (keys, xs)).sum()

    return total


def unlabelled_bound(params: dict, images: jax.Array, rng_key: jax.Array, *,
                     latent_dim: int, hidden: int, batch_size: int = 500) -> float:
    """The bound ``U(x)`` per image on binary ``images``: ``-sg.ELBO().loss`` of the
    unlabelled plate with ``y`` enumerated (exact in ``y``, one ``z`` per image and class);
    batches under one ``jax.lax.map`` and a remainder batch, jitted."""
    total = _bound_sums(latent_dim, hidden)
    images = jnp.asarray(images)
    n = int(images.shape[0])
    batch_size = min(batch_size, n)
    full, rest = divmod(n, batch_size)
    key_full, key_rest = jax.random.split(rng_key)
    value = total(params, key_full, images[: full * batch_size].reshape(full, batch_size, -1))
    if rest:
        value = value + total(params, key_rest, images[full * batch_size:][None])
    return float(value) / n


def analogies(nets: Networks, params: dict, x: jax.Array) -> np.ndarray:
    """Decoder means ``(len(x), num_classes, P)``: the style ``z = mu_phi(x, y_hat)`` of each
    image (``y_hat = argmax q(y | x)``) held fixed, the digit swept over all classes."""
    c = nets.num_classes
    y_hat = jnp.argmax(nets.classifier.apply({"params": params["classifier"]}, x), axis=-1)
    z, _ = nets.encoder.apply({"params": params["encoder"]}, x, jax.nn.one_hot(y_hat, c))
    ys = jnp.broadcast_to(jnp.eye(c), (x.shape[0], c, c))
    zs = jnp.broadcast_to(z[:, None, :], (x.shape[0], c, z.shape[-1]))
    return np.asarray(jax.nn.sigmoid(nets.decoder.apply({"params": params["decoder"]}, ys, zs)))


# --------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class Run:
    """One estimator's training: per-step bound, accuracy checkpoints, timings, params."""

    params: dict
    elbo_per_step: np.ndarray
    eval_steps: np.ndarray
    accuracy: np.ndarray
    compile_seconds: float
    seconds_per_step: float


def train(svi: sg.SVI, rng_key: jax.Array, labelled: LabelledBatches,
          unlabelled: common.Batches, num_steps: int, classification: Callable,
          accuracy: Callable[[dict], jax.Array], *, eval_every: int, progress: bool = True,
          desc: str = "svi") -> Run:
    """``num_steps`` of ``svi.update(state, x_l, y_l, x_u)``; test accuracy every
    ``eval_every`` steps (and after the last), not counted in the time per step.

    ``classification(params, x_l, y_l)`` is the classification term of the loss per image
    (before the step, like the loss), subtracted from ``-loss`` to give the training bound.
    It needs every step's params, so the loop calls ``svi.update`` itself (``svi.run``
    returns only the final state).
    """
    x_l, y_l = labelled()
    x_u = unlabelled()
    state = jax.jit(svi.init)(rng_key, x_l, y_l, x_u)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc=desc, dynamic_ncols=True)
    every = max(1, num_steps // 100)
    elbos: list[jax.Array] = []
    eval_steps: list[int] = []
    accs: list[float] = []
    compile_seconds, train_seconds = 0.0, 0.0
    start = time.perf_counter()
    for i in range(num_steps):
        term = classification(state.params, x_l, y_l)
        state, loss = svi.update(state, x_l, y_l, x_u)
        elbos.append(-loss - term)
        if i == 0:
            loss.block_until_ready()
            compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
        if (i + 1) % eval_every == 0 or i == num_steps - 1:
            jax.block_until_ready(state)
            if i > 0:
                train_seconds += time.perf_counter() - start
            eval_steps.append(i + 1)
            accs.append(float(accuracy(state.params)))
            start = time.perf_counter()
        if bar is not None and (i % every == 0 or i == num_steps - 1):
            recent = float(np.mean(jax.device_get(elbos[-every:])))
            acc = f", test acc {accs[-1]:.3f}" if accs else ""
            bar.set_postfix_str(f"elbo {recent:.2f}{acc}")
            bar.update(i + 1 - bar.n)
        if i + 1 < num_steps:
            x_l, y_l = labelled()
            x_u = unlabelled()
    if bar is not None:
        bar.close()
    per_step = train_seconds / (num_steps - 1) if num_steps > 1 else float("nan")
    return Run(state.params, np.asarray(jax.device_get(elbos), dtype=np.float64),
               np.asarray(eval_steps), np.asarray(accs), compile_seconds, per_step)


# --------------------------------------------------------------------------------------------
# Plots


def plot_training(path: Path, results: dict[str, dict], title: str) -> None:
    """Left: training bound per image against steps (moving average); right: test accuracy
    at the checkpoints, with the paper's M2 accuracy for reference."""
    fig, (ax_elbo, ax_acc) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    lows, highs = [], []
    for res in results.values():
        elbo = res["elbo_per_step"]
        steps = np.arange(1, len(elbo) + 1)
        window = max(1, len(elbo) // 50)
        smoothed = common.smooth(elbo, window)
        line, = ax_elbo.plot(steps, smoothed, lw=1.5,
                             label=f"{res['label']} (moving average, {window} steps)")
        ax_elbo.plot(steps, elbo, color=line.get_color(), alpha=0.2, lw=0.6)
        finite = smoothed[np.isfinite(smoothed)]
        if finite.size > 10:
            lows.append(np.percentile(finite[len(finite) // 20:], 1))
            highs.append(np.nanmax(smoothed))
        ax_acc.plot(res["eval_steps"], res["accuracy_curve"], "o-", ms=3, color=line.get_color(),
                    label=f"{res['label']}: {res['test_accuracy']:.3f}")
    if lows:
        lo, hi = min(lows), max(highs)
        ax_elbo.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
    ax_acc.axhline(PAPER_ACCURACY, color="gray", ls="--", lw=1.0,
                   label=f"Kingma et al. 2014, M2: {PAPER_ACCURACY:.3f}")
    ax_acc.axhline(0.1, color="gray", ls=":", lw=1.0, label="chance: 0.1")
    ax_elbo.set_xlabel("step")
    ax_elbo.set_ylabel("training bound J / N (nats per image)")
    ax_elbo.set_title(f"{title}: training bound", fontsize=10)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy of argmax q(y | x)")
    ax_acc.set_ylim(0.0, 1.0)
    ax_acc.set_title(f"{title}: test accuracy", fontsize=10)
    for ax in (ax_elbo, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_analogies(path: Path, x: np.ndarray, grids: dict[str, np.ndarray], title: str) -> None:
    """One panel per estimator: each row a test image, then the decoder's means for its style
    and the digits 0..9."""
    n, c = grids[next(iter(grids))].shape[:2]
    fig, axes = plt.subplots(len(grids), 1, figsize=(0.55 * (c + 1) + 0.4,
                                                       len(grids) * (0.55 * n + 0.6)),
                             squeeze=False)
    for ax, (label, means) in zip(axes[:, 0], grids.items(), strict=True):
        tiles = np.concatenate([np.asarray(x)[:, None, :], means], axis=1)
        grid = common.image_grid(tiles.reshape(n * (c + 1), -1), n, c + 1)
        ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
        side = grid.shape[1] / (c + 1)
        ax.set_xticks((np.arange(c + 1) + 0.5) * side, ["x", *map(str, range(c))], fontsize=8)
        ax.set_yticks([])
        ax.tick_params(length=0)
        ax.set_title(f"{title}, {label}: test image x, then style z(x) with y = 0..{c - 1}",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The experiment


def parse_estimators(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The comma-separated ``--estimators``, checked and deduplicated in order."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in ESTIMATORS]
    if not names or bad:
        parser.error(f"--estimators must be a comma-separated subset of {','.join(ESTIMATORS)}"
                     f", got {text!r}")
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train M2 with each estimator in ``--estimators`` (see ``--help``) and evaluate them.

    Returns ``results`` (per estimator: ``train_elbo`` (mean training bound ``J / N`` per
    image over the last 100 steps), ``test_accuracy``, ``test_bound`` (``U(x)`` per test image),
    ``elbo_per_step``, ``eval_steps`` and ``accuracy_curve``, ``num_particles``,
    ``seconds_per_step``, ``compile_seconds``, ``params``), ``paths`` of the PNGs, the labelled
    indices and the settings and data sources.
    """
    parser = common.make_parser("ssvae_mnist", __doc__.split("\n")[0], steps=1000,
                                batch_size=100, lr=3e-3)
    parser.add_argument("--labels", type=int, default=100,
                        help="labelled training images, balanced over the classes "
                        "(default: %(default)s)")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS),
                        help="estimators of the unlabelled y to compare, comma-separated "
                        "(default: %(default)s); --num-particles is K of rloo (default 4)")
    parser.add_argument("--alpha", type=float, default=3.0,
                        help="weight of the classification term: alpha * N / N_l per labelled "
                        "image (Kingma et al.: 0.1) (default: %(default)s)")
    parser.add_argument("--enum-particles", type=int, default=1,
                        help="samples of z per image (and class) with enumerate "
                        "(default: %(default)s)")
    parser.add_argument("--latent-dim", type=int, default=2,
                        help="dimension of the style z; small, so that the digit is left to y "
                        "(default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden units of each MLP (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between test-accuracy checkpoints (default: steps / 20)")
    args = common.parse(parser, argv)
    names = parse_estimators(parser, args.estimators)
    if args.num_particles is not None and args.num_particles < 2 and "rloo" in names:
        parser.error(f"rloo needs --num-particles >= 2, got {args.num_particles}")
    for flag in ("labels", "latent_dim", "hidden", "eval_every", "enum_particles"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if not args.alpha >= 0:
        parser.error(f"--alpha must be non-negative, got {args.alpha}")
    eval_every = args.eval_every or max(1, args.steps // 20)

    key = jax.random.key(args.seed)
    key_labelled, key_unlabelled, key_train, key_bound = jax.random.split(key, 4)
    data = load_labelled_data(args.data_dir)
    labelled_idx = choose_labelled(data.train_labels, args.labels)
    unlabelled_mask = np.ones(len(data.train), bool)
    unlabelled_mask[labelled_idx] = False
    n_l, n_u = len(labelled_idx), int(unlabelled_mask.sum())
    b_l, b_u = min(n_l, args.batch_size), args.batch_size
    scale_l, scale_u = objective_scales(n_l, n_u, b_l, b_u)
    alpha = args.alpha * (n_l + n_u) / n_l
    print(f"train: {len(data.train)} images from {data.train_source}: {n_l} labelled "
          f"({np.bincount(data.train_labels[labelled_idx], minlength=NUM_CLASSES).tolist()} "
          f"per class), {n_u} unlabelled")
    print(f"test:  {len(data.test)} images from {data.test_source}")
    print(f"M2: latent dim {args.latent_dim}, hidden {args.hidden}, batches {b_l} labelled + "
          f"{b_u} unlabelled, alpha = {args.alpha} * N / N_l = {alpha:.1f}, Adam lr {args.lr}, "
          f"{args.steps} steps per estimator")

    test = dynamic_binarize(jax.random.key(TEST_BINARIZATION_SEED), data.test)
    train_l, labels_l = data.train[labelled_idx], data.train_labels[labelled_idx]
    train_u = data.train[unlabelled_mask]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        estimator, k = make_estimator(name, args.num_particles, args.enum_particles)
        label = f"Enumerate (exact), K={k}" if name == "enumerate" else f"RLOO, K={k}"
        print(f"--- {label}")
        model, guide, nets = build(estimator, latent_dim=args.latent_dim, hidden=args.hidden,
                                   scale_labelled=scale_l, scale_unlabelled=scale_u,
                                   alpha=alpha)

        @jax.jit
        def classification(params, x_l, y_l, nets=nets):
            logits = nets.classifier.apply({"params": params["classifier"]}, x_l)
            return scale_l * alpha * dist.Categorical(logits=logits).log_prob(y_l).sum()

        svi = sg.SVI(model, guide, optax.adam(args.lr), sg.ELBO(num_particles=k))
        run = train(svi, key_train, LabelledBatches(train_l, labels_l, b_l, key_labelled),
                    common.Batches(train_u, b_u, key_unlabelled), args.steps, classification,
                    accuracy_fn(nets, test, data.test_labels), eval_every=eval_every,
                    progress=not args.no_progress, desc=name)
        start = time.perf_counter()
        bound = unlabelled_bound(run.params, test, key_bound, latent_dim=args.latent_dim,
                                 hidden=args.hidden)
        eval_seconds = time.perf_counter() - start
        last = min(100, args.steps)
        results[name] = {
            "label": label,
            "num_particles": k,
            "train_elbo": float(np.mean(run.elbo_per_step[-last:])),
            "test_accuracy": float(run.accuracy[-1]),
            "test_bound": bound,
            "elbo_per_step": run.elbo_per_step,
            "eval_steps": run.eval_steps,
            "accuracy_curve": run.accuracy,
            "seconds_per_step": run.seconds_per_step,
            "compile_seconds": run.compile_seconds,
            "params": run.params,
            "nets": nets,
        }
        print(f"{args.steps} steps: first step (compilation) {run.compile_seconds:.2f} s, then "
              f"{1e3 * run.seconds_per_step:.2f} ms/step; test accuracy {run.accuracy[-1]:.4f}"
              f", test U(x) {bound:.2f} nats/image ({eval_seconds:.1f} s)")

    last = min(100, args.steps)
    print(f"\ntrain bound J/N: nats per image, mean of the last {last} steps (without the "
          f"classification term); test U(x): nats per image, y enumerated, on {len(test)} "
          "test images; accuracy of argmax q(y|x) on the same images")
    header = (f"{'estimator':<24} | {'train ELBO':>10} | {'test U(x)':>9} | {'test acc':>8} | "
              f"{'ms/step':>7}")
    print(header)
    print("-" * len(header))
    for res in results.values():
        print(f"{res['label']:<24} | {res['train_elbo']:10.2f} | {res['test_bound']:9.2f} | "
              f"{res['test_accuracy']:8.4f} | {1e3 * res['seconds_per_step']:7.2f}")
    print(f"{'paper (M2, 100 labels)':<24} | {'':>10} | {'':>9} | {PAPER_ACCURACY:8.4f} |"
          f"  (Kingma et al. 2014, Table 1; M1+M2: {PAPER_ACCURACY_M1_M2:.4f})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.png" for name in ("training", "analogies")}
    plot_training(paths["training"], results, "M2")
    shown = test[:6]
    grids = {res["label"]: analogies(res["nets"], res["params"], shown)
             for res in results.values()}
    plot_analogies(paths["analogies"], np.asarray(shown), grids, "M2")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {
        "results": results,
        "estimators": names,
        "labelled_indices": labelled_idx,
        "alpha": alpha,
        "steps": args.steps,
        "train_source": data.train_source,
        "test_source": data.test_source,
        "paths": paths,
    }


if __name__ == "__main__":
    main()
