"""``examples/categorical_vae_mnist.py``: the estimator choice is wired through (wrong or
unavailable names and particle counts are errors, the guide's site carries the estimator
asked for), the joint form of ``--joint`` is the same distribution as the factorised one, and
a short run improves the held-out ELBO. Runs in-process on the tiny synthetic MNIST of
``tests/test_examples.py``; kept small (a few seconds) on purpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from tests.test_examples import _load, _offline, data_dir  # noqa: F401  (fixtures: by name)


@pytest.fixture(scope="module")
def cvae():
    return _load("categorical_vae_mnist")


def test_estimator_names_and_particle_counts_are_checked(cvae):
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        cvae.make_estimator("nope")
    est, k = cvae.make_estimator("mvd")
    assert isinstance(est, sg.MeasureValued) and k == 4
    with pytest.raises(ValueError, match="<= 6"):
        cvae.make_estimator("unordered", 7)
    with pytest.raises(ValueError, match=">= 2"):
        cvae.make_estimator("rloo", 1)
    est, k = cvae.make_estimator("sas", 4, sas_k=2)
    assert est == sg.SumAndSample(2) and k == 4
    est, k = cvae.make_estimator("st", temperature=0.7)
    assert isinstance(est, sg.GumbelSoftmax) and est.straight_through and k == 4
    with pytest.raises(SystemExit):  # argparse's error, before any data is loaded
        cvae.main(["--estimator", "nope", "--no-progress"])


def test_the_guide_site_carries_the_chosen_estimator(cvae):
    x = jnp.zeros((4, cvae.NUM_PIXELS))
    for name in ("rloo", "unordered"):
        est, _ = cvae.make_estimator(name)
        model, guide = cvae.build(est, latent_dims=2, num_classes=3, joint=name == "unordered")
        found = {}

        def trace_guide(model=model, guide=guide, found=found):  # abstractly: nothing computed
            params = sg.init_params(0, model, guide, x)
            program = sg.handlers.seed(sg.handlers.substitute_unconstrained(guide, params), 0)
            site = sg.handlers.trace(program).get_trace(x)["z"]
            found.update(estimator=site["estimator"], shape=site["value"].shape)
            return 0

        jax.eval_shape(trace_guide)
        assert found["estimator"] is est
        assert found["shape"] == ((4,) if name == "unordered" else (2, 4))


def test_joint_form_is_the_factorised_distribution(cvae):
    logits = jax.random.normal(jax.random.key(0), (5, 2, 3))
    joint = cvae.joint_logits(logits)  # (5, 9), class 3 * z1 + z2
    lp = jax.nn.log_softmax(logits, -1)
    expected = (lp[:, 0, :, None] + lp[:, 1, None, :]).reshape(5, 9)
    np.testing.assert_allclose(joint, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.nn.logsumexp(joint, -1), 0.0, atol=1e-5)
    # the decoder sees the same one-hot inputs from a joint index and from the two latents
    z1, z2 = jnp.array([0, 2, 1]), jnp.array([1, 0, 2])
    per_latent = cvae.decoder_input(jnp.stack([z1, z2]), 2, 3, joint=False)
    from_joint = cvae.decoder_input(3 * z1 + z2, 2, 3, joint=True)
    np.testing.assert_array_equal(per_latent, from_joint)
    assert per_latent.shape == (3, 6) and per_latent[1].tolist() == [0, 0, 1, 1, 0, 0]


def test_training_improves_the_elbo_and_refusals_are_explained(cvae, data_dir,  # noqa: F811
                                                                tmp_path):
    common = ["--latent-dims", "4", "--batch-size", "16", "--data", "standard", "--no-progress",
              "--data-dir", str(data_dir), "--out", str(tmp_path)]
    run = cvae.main(["--estimator", "rloo", "--steps", "40", "--lr", "0.01", "--quick",
                     *common])
    assert run["num_particles"] == 4 and isinstance(run["estimator_object"], sg.RLOO)
    elbo = run["elbo_per_step"]
    assert elbo.shape == (40,) and np.all(np.isfinite(elbo))
    # 40 steps on the blobs: from about -550 nats (a fresh initialisation) to about -400
    assert elbo[-10:].mean() > elbo[:5].mean() + 50, (elbo[:5].mean(), elbo[-10:].mean())
    # UnorderedSet on latents in a plate: the library's refusal, with the way out
    with pytest.raises(SystemExit):
        cvae.main(["--estimator", "unordered", *common])
