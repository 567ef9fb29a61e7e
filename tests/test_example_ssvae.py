"""Tests of ``examples/ssvae_mnist.py``: the semi-supervised VAE M2.

A smoke run of ``main(argv)`` on the tiny synthetic gzipped-IDX MNIST (with random labels) of
``tests/test_examples.py``, for both estimators of the unlabelled ``y``; then the M2 objective
of the example's ``build`` on a tiny instance (3 classes, 6 pixels, fixed weights, 3 labelled
and 2 unlabelled images: plates of different sizes), against the same objective written by
hand in plain JAX:

* with the styles ``z`` held fixed (``sg.handlers.substitute``), ``sg.Enumerate()`` (two
  particles) gives the exact ``J`` (``sum_y q(y|x) [L(x, y) - log q(y|x)]`` per unlabelled
  image, the labelled ELBO and ``alpha log q(y_l|x_l)``, scaled) and its exact gradient, to
  float precision;
* with ``z`` sampled (pathwise, downstream of ``y``), the means over 1000 keys of the library's
  estimates of ``J`` and of its gradient, with ``Enumerate`` (K = 1) and with ``RLOO``
  (K = 4), match the same estimator written by hand (20000 draws) within 5 combined standard
  errors, every parameter; and RLOO's gradient of the classifier matches Enumerate's. Every
  check also asserts that it has the power to catch a wrong answer (a leave-one-out baseline
  that includes the particle itself, biased by 25%, fails it).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from tests.stats import mean_and_se
from tests.test_examples import _load, _offline, data_dir  # noqa: F401  (fixtures: by name)

C, D, H, P = 3, 2, 8, 6  # classes, latent dim, hidden units, pixels
SCALE_L, SCALE_U, ALPHA = 0.7, 1.3, 0.5


def test_ssvae_mnist_smoke(data_dir, tmp_path, capsys):  # noqa: F811
    ssvae = _load("ssvae_mnist")
    out = tmp_path / "ssvae"
    steps = 12
    run = ssvae.main(["--steps", str(steps), "--batch-size", "16", "--labels", "20",
                      "--latent-dim", "2", "--hidden", "16", "--eval-every", "5",
                      "--enum-particles", "2", "--no-progress", "--data-dir", str(data_dir),
                      "--out", str(out)])
    printed = capsys.readouterr().out
    for name in ("training", "analogies"):
        path = run["paths"][name]
        assert path == out / f"{name}.png" and path.is_file() and path.stat().st_size > 1000
    assert run["estimators"] == ["enumerate", "rloo"]
    assert len(run["labelled_indices"]) == 20
    assert run["alpha"] == pytest.approx(3.0 * 64 / 20)  # --alpha 3: alpha * N / N_l
    for name, res in run["results"].items():
        assert res["num_particles"] == (2 if name == "enumerate" else 4)
        assert 0.0 <= res["test_accuracy"] <= 1.0
        assert math.isfinite(res["train_elbo"]) and -800 < res["train_elbo"] < 0
        assert math.isfinite(res["test_bound"]) and -800 < res["test_bound"] < 0
        assert res["elbo_per_step"].shape == (steps,)
        assert np.all(np.isfinite(res["elbo_per_step"]))
        assert list(res["eval_steps"]) == [5, 10, 12]
        assert np.all((res["accuracy_curve"] >= 0) & (res["accuracy_curve"] <= 1))
        assert res["seconds_per_step"] > 0
    assert "IDX files in" in printed and "ms/step" in printed and "test acc" in printed
    assert f"{ssvae.PAPER_ACCURACY:.4f}" in printed  # the paper's number, for reference


def test_flags_and_labelled_choice():
    ssvae = _load("ssvae_mnist")
    for bad in (["--estimators", "enumerate,nope"], ["--estimators", "rloo",
                                                      "--num-particles", "1"]):
        with pytest.raises(SystemExit):
            ssvae.main([*bad, "--no-progress"])
    labels = np.repeat(np.arange(10), 7)
    idx = ssvae.choose_labelled(labels, 25)
    counts = np.bincount(labels[idx], minlength=10)
    assert len(set(idx)) == 25 and sorted(counts) == [2] * 5 + [3] * 5
    np.testing.assert_array_equal(idx, ssvae.choose_labelled(labels, 25))  # fixed seed
    with pytest.raises(ValueError, match="only 7"):
        ssvae.choose_labelled(labels, 80)
    scale_l, scale_u = ssvae.objective_scales(100, 4900, 100, 50)
    assert scale_l == pytest.approx(1 / 5000) and scale_u == pytest.approx(98 / 5000)


# --------------------------------------------------------------------------------------------
# The tiny instance, and J by hand


def _instance():
    rng = np.random.default_rng(3)
    x_l = jnp.asarray(rng.random((3, P)) < 0.5, jnp.float32)
    y_l = jnp.asarray([2, 0, 2], jnp.int32)
    x_u = jnp.asarray(rng.random((2, P)) < 0.5, jnp.float32)
    return x_l, y_l, x_u


def _programs(estimator):
    ssvae = _load("ssvae_mnist")
    return ssvae.build(estimator, num_classes=C, latent_dim=D, hidden=H, num_pixels=P,
                       scale_labelled=SCALE_L, scale_unlabelled=SCALE_U, alpha=ALPHA)


@functools.cache
def _params():
    model, guide, _ = _programs(sg.Enumerate())
    params = sg.init_params(0, model, guide, *_instance())
    # A sharper classifier than at initialisation: q(y|x) far from uniform, not degenerate.
    return {**params, "classifier": jax.tree.map(lambda w: 1.5 * w, params["classifier"])}


def _normal_logpdf(z, loc, scale):
    return jnp.sum(-0.5 * ((z - loc) / scale) ** 2 - jnp.log(scale)
                   - 0.5 * math.log(2 * math.pi), axis=-1)


def _elbo_integrand(nets, params, x, y, z):
    """``log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)`` by hand: images ``x`` (..., P),
    labels ``y`` (...), styles ``z`` (M, ..., D); returns (M, ...)."""
    y1 = jax.nn.one_hot(y, C)
    loc, scale = nets.encoder.apply({"params": params["encoder"]}, x, y1)
    logits = nets.decoder.apply({"params": params["decoder"]},
                                jnp.broadcast_to(y1, (*z.shape[:-1], C)), z)
    log_px = jnp.sum(x * logits - jnp.logaddexp(0.0, logits), axis=-1)
    return (log_px - math.log(C) + _normal_logpdf(z, 0.0, 1.0)
            - _normal_logpdf(z, loc, scale))


def _unlabelled_grid():
    """Every unlabelled image with every class: images (N_u, C, P) and labels (N_u, C)."""
    x_u = _instance()[2]
    return (jnp.broadcast_to(x_u[:, None, :], (x_u.shape[0], C, P)),
            jnp.broadcast_to(jnp.arange(C), (x_u.shape[0], C)))


def _hand_objective(nets, params, z_l, z_u):
    """``J`` by hand, per draw of the styles ``z_l`` (M, N_l, D) of the labelled images and
    ``z_u`` (M, N_u, C, D) of the unlabelled images per class; returns its M values."""
    x_l, y_l, x_u = _instance()
    log_q = lambda x: jax.nn.log_softmax(
        nets.classifier.apply({"params": params["classifier"]}, x))
    labelled = (_elbo_integrand(nets, params, x_l, y_l, z_l)
                + ALPHA * jnp.take_along_axis(log_q(x_l), y_l[:, None], axis=1)[:, 0])
    elbo_y = _elbo_integrand(nets, params, *_unlabelled_grid(), z_u)  # (M, N_u, C)
    lq = log_q(x_u)
    unlabelled = jnp.sum(jnp.exp(lq) * (elbo_y - lq), axis=-1)  # sum over y, exactly
    return SCALE_L * labelled.sum(-1) + SCALE_U * unlabelled.sum(-1)


Z_L = jnp.asarray([[0.3, -1.1], [0.8, 0.2], [-0.4, 0.6]])
Z_U = jnp.asarray([[-0.5, 0.9], [1.4, -0.3]])


def _fixed_z(fn):
    """The program with the styles fixed (substituted) in the guide; the model replays them."""
    return sg.handlers.substitute(fn, {"z_l": Z_L, "z_u": Z_U})


def _exact(params, nets):
    """``J`` with the styles fixed: the same ``z`` for every class of an unlabelled image."""
    z_u = jnp.broadcast_to(Z_U[:, None, :], (Z_U.shape[0], C, D))
    return _hand_objective(nets, params, Z_L[None], z_u[None])[0]


def test_classifier_is_shared_by_model_and_guide():
    model, guide, _ = _programs(sg.Enumerate())
    labels = sg.param_labels(model, guide, *_instance())
    assert labels == {"classifier": "shared", "encoder": "guide", "decoder": "model"}


def test_enumerate_is_the_exact_m2_objective_with_z_fixed():
    """Two particles, each enumerated: with z fixed both are J exactly, and so is the mean."""
    model, guide, nets = _programs(sg.Enumerate())
    params = _params()
    value, grads = jax.jit(jax.value_and_grad(lambda p: -sg.ELBO(num_particles=2).loss(
        jax.random.key(0), p, model, _fixed_z(guide), *_instance())))(params)
    exact, exact_grads = jax.jit(jax.value_and_grad(lambda p: _exact(p, nets)))(params)
    np.testing.assert_allclose(value, exact, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(exact_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Power: the entropy term alone moves J by far more than the tolerance.
    assert SCALE_U * _entropy(params, nets) > 0.5


def _entropy(params, nets) -> float:
    """``sum_n H(q(y | x_u[n]))`` on the unlabelled images."""
    log_q = jax.nn.log_softmax(nets.classifier.apply({"params": params["classifier"]},
                                                     _instance()[2]))
    return float(-jnp.sum(jnp.exp(log_q) * log_q))


def _library_samples(objective, model, guide, params, num: int, seed: int):
    """``num`` independent estimates of ``J`` and of its gradient (minus the loss's)."""
    keys = jax.random.split(jax.random.key(seed), num)
    one = lambda key: jax.value_and_grad(
        lambda p: -objective.loss(key, p, model, guide, *_instance()))(params)
    return jax.jit(jax.vmap(one))(keys)


def _hand_samples(params, nets, num: int, seed: int):
    """``num`` independent draws of the hand-written estimate of ``J`` (y summed, one z per
    image and class, reparameterised) and of its gradient."""
    x_l, y_l, _ = _instance()
    key_l, key_u = jax.random.split(jax.random.key(seed))
    eps_l = jax.random.normal(key_l, (num, x_l.shape[0], D))
    eps_u = jax.random.normal(key_u, (num, Z_U.shape[0], C, D))

    def style(p, x, y, eps):
        loc, scale = nets.encoder.apply({"params": p["encoder"]}, x, jax.nn.one_hot(y, C))
        return loc + scale * eps

    def one(p, e_l, e_u):  # one draw
        z_l = style(p, x_l, y_l, e_l)
        z_u = style(p, *_unlabelled_grid(), e_u)
        return _hand_objective(nets, p, z_l[None], z_u[None])[0]

    return jax.jit(jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0)))(params, eps_l,
                                                                            eps_u)


def _two_sample_close(a, b, z: float = 5.0, min_power: float = 3.0) -> float:
    """Per element, ``|mean(a) - mean(b)| <= z * sqrt(SE_a^2 + SE_b^2)`` (plus float
    round-off); somewhere ``|mean(b)|`` exceeds ``min_power`` times that bound, so a sign
    error would be caught. Returns the largest bound."""
    powerful, largest = False, 0.0
    for sa, sb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        (ma, sea), (mb, seb) = mean_and_se(sa), mean_and_se(sb)
        bound = z * np.sqrt(sea**2 + seb**2) + 1e-5 * (1.0 + np.abs(mb))
        assert np.all(np.abs(ma - mb) <= bound), (ma, mb, np.abs(ma - mb) / bound)
        powerful |= bool(np.any(np.abs(mb) > min_power * bound))
        largest = max(largest, float(np.max(bound)))
    assert powerful, "no power: the exact value is within the noise"
    return largest


def test_enumerate_and_rloo_are_unbiased_with_z_sampled():
    """z sampled (pathwise, downstream of y): the means over keys of the library's estimates
    of J and of its gradient, with y enumerated (K = 1) or by RLOO (K = 4), match the same
    estimates written by hand (y summed, 20000 draws of z), within 5 standard errors; and
    RLOO's gradient of the classifier matches Enumerate's."""
    params = _params()
    model, guide_enum, nets = _programs(sg.Enumerate())
    _, guide_rloo, _ = _programs(sg.RLOO())
    hand_value, hand_grads = _hand_samples(params, nets, 20000, seed=0)
    enum_value, enum_grads = _library_samples(sg.ELBO(), model, guide_enum, params, 1000, 1)
    rloo_value, rloo_grads = _library_samples(sg.ELBO(num_particles=4), model, guide_rloo,
                                              params, 1000, 2)
    for value in (enum_value, rloo_value):
        tolerance = _two_sample_close(value, hand_value)
        # Power: leaving out the entropy of q(y|x) would be caught.
        assert SCALE_U * _entropy(params, nets) > 3 * tolerance, tolerance
    _two_sample_close(enum_grads, hand_grads)
    _two_sample_close(rloo_grads, hand_grads)
    _two_sample_close(rloo_grads["classifier"], enum_grads["classifier"])
