"""Tests of ``examples/rws_gmm.py``: a smoke run, its exact evaluation, that RWS learns, and
that the ELBO with the assignments summed out is the exact log-likelihood and learns.

The example is loaded from its file path, as in ``tests/test_examples.py``.
"""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from tests.test_examples import _load


@pytest.fixture(scope="module")
def gmm():
    return _load("rws_gmm")


@pytest.fixture(scope="module")
def run(gmm, tmp_path_factory):
    """One small run of every default method (C=5, 300 steps: ~20 s, mostly compilation)."""
    out = tmp_path_factory.mktemp("rws_gmm")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = gmm.main(["--steps", "300", "--clusters", "5", "--lr", "1e-2", "--eval-every",
                           "50", "--no-progress", "--seed", "0", "--out", str(out)])
    return out, result, printed.getvalue()


def test_main_writes_the_plots_and_finite_curves(run):
    out, result, printed = run
    assert "ms/step" in printed and "true model" in printed
    for r in result["methods"].values():
        assert r["label"] in printed
    for name in ("rws_gmm.png", "weights.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 1000, path
    assert set(result["methods"]) == {"rws", "rloo", "vimco", "enum"}
    for name, r in result["methods"].items():
        np.testing.assert_array_equal(r["steps"], np.arange(0, 301, 50))
        for key in ("model_error", "mixture_kl", "log_px", "posterior_kl"):
            curve = r["curves"][key]
            assert curve.shape == (7,) and np.all(np.isfinite(curve)), (name, key, curve)
        assert r["final"]["posterior_kl"] >= 0 and r["final"]["mixture_kl"] >= 0
        assert r["weights"].shape == (5,) and abs(r["weights"].sum() - 1) < 1e-5
        assert r["losses"].shape == (300,) and np.all(np.isfinite(r["losses"]))
        assert np.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0
        assert r["final"]["log_px"] <= result["true_log_px"] + 0.02  # held-out, up to noise
    # every method starts from the same parameters
    starts = {name: r["curves"]["log_px"][0] for name, r in result["methods"].items()}
    assert len(set(starts.values())) == 1, starts
    assert result["initial"]["log_px"] == starts["rws"]
    # summed out: no guide network, the model's own posterior (KL 0)
    enum = result["methods"]["enum"]
    assert set(enum["params"]) == {"theta"}
    np.testing.assert_array_equal(enum["curves"]["posterior_kl"], 0.0)


def test_rws_learns_the_model_and_the_guide(run):
    # measured over seeds 0-4: the model error falls ~6x (0.60 -> 0.10), the posterior KL
    # ~100x (1.0 -> 0.01) and log p(x) ends within 0.02 nats of the true model's
    _, result, _ = run
    curves = result["methods"]["rws"]["curves"]
    error, kl, log_px = (curves[k] for k in ("model_error", "posterior_kl", "log_px"))
    assert error[-1] < 0.3 * error[0], error
    assert kl[-1] < 0.1 * kl[0], kl
    assert log_px[-1] > result["true_log_px"] - 0.05, (log_px, result["true_log_px"])


def test_elbo_with_summed_assignments_learns_the_model(run):
    # measured over seeds 0-4 at these settings: the model error falls ~6x (0.60 -> 0.10) and
    # log p(x) ends within 0.02 nats of the true model's, as RWS's
    _, result, _ = run
    curves = result["methods"]["enum"]["curves"]
    assert curves["model_error"][-1] < 0.3 * curves["model_error"][0], curves["model_error"]
    assert curves["log_px"][-1] > result["true_log_px"] - 0.05


def test_summed_assignments_give_the_exact_log_likelihood_and_posterior(gmm):
    import scgjax as sg

    num_clusters = 5
    model, guide = gmm.build(num_clusters, summed=True)
    x = jnp.asarray(np.random.default_rng(3).uniform(-10, 50, size=40), jnp.float32)
    params = sg.init_params(0, model, guide, x)
    assert set(params) == {"theta"}
    params = {"theta": jnp.asarray([0.3, -1.0, 0.5, 0.0, 1.2])}
    loss, grad = jax.jit(jax.value_and_grad(
        lambda p: sg.ELBO().loss(jax.random.key(0), p, model, guide, x)))(params)
    exact = lambda p: gmm.exact_log_evidence(p["theta"], x).sum()  # noqa: E731
    np.testing.assert_allclose(-loss, exact(params), rtol=1e-6)
    np.testing.assert_allclose(-grad["theta"], jax.grad(exact)(params)["theta"], rtol=1e-4,
                               atol=1e-5)
    # after training, sg.infer_discrete gives each point's most probable cluster
    decode = sg.infer_discrete(sg.handlers.substitute_unconstrained(model, params),
                               temperature=0)
    c = sg.handlers.trace(decode).get_trace(x)["c"]["value"]
    np.testing.assert_array_equal(c, np.argmax(gmm.exact_log_posterior(params["theta"], x), -1))


def test_flags_are_checked(gmm):
    for argv in (["--methods", "rws,nope"], ["--num-particles", "1"], ["--clusters", "1"],
                 ["--lr", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            gmm.main(argv)


def test_exact_log_evidence_and_posterior_against_scipy(gmm):
    num_clusters = 6
    theta = jnp.asarray(np.random.default_rng(0).normal(size=num_clusters), jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).uniform(-20, 70, size=50), jnp.float32)
    weights = special.softmax(np.asarray(theta, np.float64))
    means = 10.0 * np.arange(num_clusters)
    joint = np.log(weights)[None] + stats.norm.logpdf(np.asarray(x, np.float64)[:, None],
                                                      means[None], 5.0)
    expected = special.logsumexp(joint, axis=1)
    log_px, log_post = jax.jit(lambda t, x: (gmm.exact_log_evidence(t, x),
                                             gmm.exact_log_posterior(t, x)))(theta, x)
    np.testing.assert_allclose(log_px, expected, rtol=1e-5)
    posterior = np.exp(joint - expected[:, None])
    np.testing.assert_allclose(np.exp(log_post), posterior, atol=1e-5)
    # the true weights are proportional to c + 5
    np.testing.assert_allclose(special.softmax(np.asarray(gmm.true_logits(4))),
                               np.array([5, 6, 7, 8]) / 26, rtol=1e-6)


def test_posterior_kl_is_zero_at_the_posterior_and_matches_a_direct_sum(gmm):
    num_clusters = 5
    theta = jnp.asarray([0.3, -1.0, 0.5, 0.0, 1.2])
    x = jnp.asarray([-3.0, 4.0, 12.0, 25.0, 38.0, 47.0])
    log_post = jax.jit(gmm.exact_log_posterior)(theta, x)
    posterior_kl = jax.jit(gmm.posterior_kl)
    # q = the exact posterior (any logits differing by a constant per point)
    np.testing.assert_allclose(posterior_kl(theta, log_post + 3.0, x), 0.0, atol=1e-5)
    q_logits = jnp.asarray(np.random.default_rng(1).normal(size=(6, num_clusters)),
                           jnp.float32)
    p = np.exp(np.asarray(log_post, np.float64))
    q = special.softmax(np.asarray(q_logits, np.float64), axis=1)
    expected = np.sum(special.rel_entr(p, q), axis=1)
    kl = posterior_kl(theta, q_logits, x)
    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(kl) > 0.01)
    # mixture weights: KL to itself is 0, and it matches scipy
    mixture_kl = jax.jit(gmm.mixture_kl)
    assert abs(float(mixture_kl(theta, theta))) < 1e-6
    other = jnp.zeros(num_clusters)
    expected = np.sum(special.rel_entr(special.softmax(np.asarray(theta, np.float64)),
                                       np.full(num_clusters, 1 / num_clusters)))
    np.testing.assert_allclose(mixture_kl(theta, other), expected, rtol=1e-5)


def test_evaluate_uses_the_guide_network(gmm, run):
    # the jitted evaluator's posterior KL is the KL to the guide the trained params define
    num_clusters = 5
    params = run[1]["methods"]["vimco"]["params"]
    x = jnp.asarray(np.random.default_rng(2).uniform(-20, 70, size=300), jnp.float32)
    values = gmm.make_evaluator(x, gmm.true_logits(num_clusters))(params)

    @jax.jit
    def reference(params):
        q_logits = gmm.guide_logits(params, x, num_clusters)
        return (gmm.posterior_kl(params["theta"], q_logits, x).mean(),
                gmm.exact_log_evidence(params["theta"], x).mean())

    kl, log_px = reference(params)
    np.testing.assert_allclose(values["posterior_kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(values["log_px"], log_px, rtol=1e-6)
    assert float(kl) > 0
    weights = np.asarray(jax.nn.softmax(params["theta"]))
    np.testing.assert_allclose(values["model_error"],
                               np.linalg.norm(weights - np.arange(5, 10) / 35), rtol=1e-5)
