"""The Rényi bound (Li & Turner 2016), ``sg.RenyiELBO``: alpha = 0 is IWAE, alpha -> 1 the
ELBO, and its score-function gradient (plain and VIMCO-style) is unbiased for the gradient of
the exact expected K-sample bound, computed by enumerating every particle configuration."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist

X = jnp.array([1.2, -0.7, 0.4])
K = 3


def model(x):
    with sg.plate("data", x.shape[0]):
        c = sg.sample("c", dist.Bernoulli(probs=0.3))
        sg.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)


def guide_with(estimator):
    def guide(x):
        logits = sg.param("l", jnp.zeros(x.shape[0]))
        with sg.plate("data", x.shape[0]):
            sg.sample("c", dist.Bernoulli(logits=logits), estimator=estimator)
    return guide


def exact_bound(logits, alpha):
    """E[L_hat_alpha] summed over the data points: each point's K particles enumerated."""
    total = 0.0
    for n in range(X.shape[0]):
        lq1, lq0 = jax.nn.log_sigmoid(logits[n]), jax.nn.log_sigmoid(-logits[n])
        for cs in itertools.product((0, 1), repeat=K):
            c = jnp.array(cs, jnp.float32)
            log_q = jnp.where(c == 1, lq1, lq0)
            log_p = (jnp.where(c == 1, math.log(0.3), math.log(0.7))
                     + dist.Normal(2.0 * c - 1.0, 1.0).log_prob(X[n]))
            log_w = log_p - log_q
            bound = (jax.nn.logsumexp((1 - alpha) * log_w) - math.log(K)) / (1 - alpha)
            total = total + jnp.exp(log_q.sum()) * bound
    return total


@pytest.mark.parametrize("alpha", [0.5, -1.0])
@pytest.mark.parametrize("estimator", [sg.VIMCO(), sg.ScoreFunction()])
def test_renyi_score_gradient_is_unbiased_for_the_exact_bound(alpha, estimator):
    logits = jnp.array([0.4, -0.8, 1.1])
    params = {"l": logits}
    exact_value = float(exact_bound(logits, alpha))
    exact = np.asarray(jax.grad(exact_bound)(logits, alpha))
    objective = sg.RenyiELBO(alpha, num_particles=K)
    guide = guide_with(estimator)
    keys = jax.random.split(jax.random.key(0), 20000)
    values, grads = jax.jit(jax.vmap(lambda k: jax.value_and_grad(objective.loss, argnums=1)(
        k, params, model, guide, X)))(keys)
    est = -np.asarray(grads["l"])
    mean, se = est.mean(0), est.std(0) / np.sqrt(est.shape[0])
    np.testing.assert_array_less(np.abs(mean - exact), 5 * se)
    assert np.all(np.abs(2 * exact) > 5 * se)  # a sign error would be caught
    value_se = float(np.std(values)) / np.sqrt(len(values))
    assert abs(-float(np.mean(values)) - exact_value) < 5 * value_se


def test_alpha_zero_is_iwae_and_alpha_near_one_is_the_elbo():
    def cmodel():
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("y", dist.Normal(z, 0.5), obs=0.8)

    cguide = lambda: sg.sample("z", dist.Normal(sg.param("m", 0.1), 0.7))
    params = {"m": jnp.array(0.1)}
    key = jax.random.key(4)
    vg = lambda obj: jax.value_and_grad(obj.loss, argnums=1)(key, params, cmodel, cguide)
    (v0, g0), (vi, gi) = vg(sg.RenyiELBO(0.0, 5)), vg(sg.IWAE(5))
    np.testing.assert_allclose([v0, g0["m"]], [vi, gi["m"]], rtol=1e-6)
    # alpha -> 1: (logsumexp((1-a) lw) - log K)/(1-a) -> mean_k lw, the K-particle ELBO
    (v1, g1), (ve, ge) = vg(sg.RenyiELBO(0.9999, 5)), vg(sg.ELBO(5))
    np.testing.assert_allclose([v1, g1["m"]], [ve, ge["m"]], rtol=2e-3, atol=2e-3)
    # and in between the bounds are ordered: IWAE >= Renyi(0.5) >= ELBO, particle by particle
    vh = vg(sg.RenyiELBO(0.5, 5))[0]
    assert -float(vi) >= -float(vh) >= -float(ve)


def test_renyi_is_checked():
    with pytest.raises(ValueError, match="alpha=1.*use sg.ELBO"):
        sg.RenyiELBO(1.0, 4)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        sg.RenyiELBO("0.5", 4)
    assert repr(sg.RenyiELBO(0.5, 4)) == "RenyiELBO(alpha=0.5, num_particles=4)"
    with pytest.raises(sg.SiteError, match="'c' uses RLOO"):
        sg.RenyiELBO(0.5, 4).loss(0, {"l": jnp.zeros(3)}, model, guide_with(sg.RLOO()), X)
