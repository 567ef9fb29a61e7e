"""gradient_variance: moments of the gradient estimate and of the learning signals, checked
against direct vmapped computations and exact values by enumeration."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
import scgjax.diagnostics
from scgjax import dist
from tests import models
from tests.stats import grad_samples

gradient_variance = scgjax.diagnostics.gradient_variance


def mixture_signal_variance(params, x):
    """Exact Var[Q_n] for the mixture's z[n], averaged over n: Q_n(z) = log p(x_n, z) -
    log q(z | x_n), z ~ Bernoulli(sigmoid(a x_n + b)), so Var = p (1 - p) (Q(1) - Q(0))^2."""
    logits = params["a"] * x + params["b"]
    q = [models.bern_logp(z, params["prior_logit"]) + models.normal_logp(
        x, params["mu"][z], 1.0) - models.bern_logp(z, logits) for z in (0, 1)]
    p = jax.nn.sigmoid(logits)
    return float(jnp.mean(p * (1 - p) * (q[1] - q[0]) ** 2))


def assert_within_se(mean, variance, n, exact, z=5.0):
    """``|mean - exact| <= z * SE`` per element, with some power (not all within noise)."""
    mean, exact = np.asarray(mean), np.asarray(exact)
    se = np.sqrt(np.asarray(variance) / n)
    assert np.all(np.abs(mean - exact) <= z * se + 1e-5 * (1 + np.abs(exact))), (mean, exact)


def test_elbo_moments_match_a_direct_vmap_and_the_exact_gradient():
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=sg.ScoreFunction())
    params = sg.init_params(0, models.mixture_model, guide, x)
    n = 3000
    # chunks of 512 keys: the last one padded (3000 = 5 * 512 + 440)
    gv = gradient_variance(sg.ELBO(), params, jax.random.key(0), models.mixture_model, guide,
                           x, num_samples=n, chunk_size=512)
    assert gv.num_samples == n and set(gv.mean) == set(params)
    # the same keys, directly: grad_samples returns minus the loss gradient
    loss = lambda key, p: sg.ELBO().loss(key, p, models.mixture_model, guide, x)
    direct = grad_samples(loss, params, n, seed=0)
    for name in params:
        g = -np.asarray(direct[name], dtype=np.float64)
        np.testing.assert_allclose(gv.mean[name], g.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gv.variance[name], g.var(0, ddof=1), rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(gv.snr[name], np.abs(gv.mean[name])
                                   / np.sqrt(gv.variance[name]), rtol=1e-6)
    # mean = minus the exact gradient of the ELBO, within 5 standard errors
    exact = jax.grad(models.mixture_exact)(params, x)
    for name in params:
        assert_within_se(gv.mean[name], gv.variance[name], n, -exact[name])
    assert any(float(jnp.max(gv.snr[k])) > 1.0 for k in ("a", "b"))  # power: a clear signal
    # the learning signal of z, per element: exact by enumeration
    assert set(gv.signal_variance) == {"z"}
    exact_signal = mixture_signal_variance(params, x)
    assert abs(gv.signal_variance["z"] - exact_signal) < 0.05 * exact_signal, (
        gv.signal_variance, exact_signal)


def test_signal_variance_is_over_keys_and_particles():
    # K = 3 particles (RLOO by default): the per-particle signals have the same distribution
    # as with K = 1, and their variance is pooled over keys and particles.
    x = models.MIX_X
    params = sg.init_params(0, models.mixture_model, models.mixture_guide, x)
    obj = sg.ELBO(num_particles=3)
    n = 1000
    gv = gradient_variance(obj, params, 1, models.mixture_model, models.mixture_guide, x,
                           num_samples=n)
    exact = jax.grad(models.mixture_exact)(params, x)
    for name in params:
        assert_within_se(gv.mean[name], gv.variance[name], n, -exact[name])
    exact_signal = mixture_signal_variance(params, x)
    assert abs(gv.signal_variance["z"] - exact_signal) < 0.05 * exact_signal
    # the same as pooling the recorded learning signals over the same keys by hand
    keys = jax.random.split(jax.random.key(1), n)
    recording = sg.ELBO(num_particles=3)
    recording.record_signals = True
    signals = jax.jit(jax.vmap(lambda k: recording.loss_with_state(
        k, params, None, models.mixture_model, models.mixture_guide, x)[1][1][
        "learning_signals"]["z"]))(keys)
    assert signals.shape == (n, 3, models.MIX_N)
    by_hand = np.var(np.asarray(signals, np.float64).reshape(n * 3, -1), axis=0, ddof=1)
    np.testing.assert_allclose(gv.signal_variance["z"], by_hand.mean(), rtol=1e-3)


def test_expectation_with_per_step_signals():
    fn = functools.partial(models.episode, True, sg.ScoreFunction())
    params = sg.init_params(0, fn)
    n = 2000
    gv = gradient_variance(sg.Expectation(), params, 2, fn, num_samples=n)
    exact = jax.grad(models.episode_exact)(params)
    for name in params:
        assert_within_se(gv.mean[name], gv.variance[name], n, -exact[name])
    assert set(gv.signal_variance) == {f"a{t}" for t in range(models.SEQ_T)}
    assert all(v > 0 for v in gv.signal_variance.values())
    # the last action is only credited with the last reward, the first with all of them
    assert gv.signal_variance["a5"] < gv.signal_variance["a0"]


def test_exact_variance_and_the_estimator_state():
    # One action a ~ Bernoulli(sigmoid(theta)), reward 3 a + 10, baseline b from a moving
    # average's state: the objective's gradient estimate is (a - p) (3 a + 10 - b), whose
    # mean p (1 - p) 3 and variance follow by enumeration; the signal's variance is 9 p (1-p).
    theta0 = 0.4
    decay = 0.5

    def fn():
        theta = sg.param("theta", jnp.array(theta0))
        a = sg.sample("a", dist.Bernoulli(logits=theta),
                      estimator=sg.ScoreFunction(sg.baselines.MovingAverage(decay)))
        sg.factor("reward", 3.0 * a + 10.0)

    params = sg.init_params(0, fn)
    p = float(jax.nn.sigmoid(theta0))
    n = 4000
    variances = []
    for b in (0.0, 10.0):
        state = {"a": {"mean": jnp.float32(b * (1 - decay)), "steps": jnp.int32(1)}}
        gv = gradient_variance(sg.Expectation(), params, 3, fn, num_samples=n, state=state)
        g = np.array([(1 - p) * (13.0 - b), -p * (10.0 - b)])  # per value of a
        probs = np.array([p, 1 - p])
        mean = (probs * g).sum()
        var = (probs * (g - mean) ** 2).sum()
        np.testing.assert_allclose(mean, 3 * p * (1 - p), rtol=1e-6)
        assert_within_se(gv.mean["theta"], gv.variance["theta"], n, -mean)
        # the sample variance of a two-point variable: SE from its fourth moment
        se_var = np.sqrt(((probs * (g - mean) ** 4).sum() - var**2) / n)
        assert abs(float(gv.variance["theta"]) - var) < 5 * se_var + 1e-6, (gv.variance, var)
        assert abs(gv.signal_variance["a"] - 9 * p * (1 - p)) < 0.05 * 9 * p * (1 - p)
        variances.append(float(gv.variance["theta"]))
    assert variances[1] < 0.02 * variances[0]  # exact: 0.346 with b = 10, 30.2 with b = 0


def test_summary_and_options():
    fn = functools.partial(models.episode, True, sg.ScoreFunction())
    params = sg.init_params(0, fn)
    gv = gradient_variance(sg.Expectation(), params, 0, fn, num_samples=64, chunk_size=16,
                           with_signals=False)
    assert gv.signal_variance == {}
    text = gv.summary()
    assert "theta" in text and "(6,)" in text and "snr" in text
    assert "learning-signal" not in text
    nested = scgjax.diagnostics.GradientVariance(
        mean={"net": {"w": np.ones(2)}}, variance={"net": {"w": np.ones(2)}},
        snr={"net": {"w": np.ones(2)}}, signal_variance={"h1": 2.5}, num_samples=10)
    text = nested.summary()
    assert "net/w" in text and "h1" in text and "2.5" in text


def test_errors():
    fn = functools.partial(models.episode, True, sg.ScoreFunction())
    params = sg.init_params(0, fn)
    with pytest.raises(TypeError, match="model, guide"):
        gradient_variance(sg.ELBO(), params, 0, fn, num_samples=10)
    with pytest.raises(ValueError, match="num_samples"):
        gradient_variance(sg.Expectation(), params, 0, fn, num_samples=1)
    with pytest.raises(TypeError, match="objective"):
        gradient_variance(None, params, 0, fn)
