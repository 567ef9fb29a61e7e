"""DReG (Tucker et al. 2019) under sg.IWAE: the same expected gradient as IWAE's (both are
unbiased for the gradient of the K-sample bound), per plate element and mixed with a VIMCO
discrete site; the guide's gradient SNR does not fall with K as IWAE's does (Rainforth et al.
2018); refused where it would be wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from tests import models

X = jnp.array([1.4, -0.6, 0.2, 2.0])


model = models.normal_plate_model
guide_with = models.normal_plate_guide


PARAMS = {"m": jnp.array([0.2, -0.1, 0.5, 0.3]), "s": jnp.log(jnp.array([0.9, 0.5, 1.3, 0.7]))}


def paired_grads(model, guides, params, args, k, n_keys, seed=0):
    keys = jax.random.split(jax.random.key(seed), n_keys)
    out = []
    for guide in guides:
        g = jax.jit(jax.vmap(lambda key, guide=guide: jax.grad(
            sg.IWAE(num_particles=k).loss, argnums=1)(key, params, model, guide, *args)))
        out.append(g(keys))
    return out


def test_dreg_has_iwae_expected_gradient_per_plate_element():
    dreg, iwae = paired_grads(model, [guide_with(sg.DReG()), guide_with(sg.Pathwise())],
                              PARAMS, (X,), 5, 20000)
    for name in PARAMS:
        diff = np.asarray(dreg[name] - iwae[name])
        se = diff.std(0) / np.sqrt(diff.shape[0])
        np.testing.assert_array_less(np.abs(diff.mean(0)), 5 * se + 1e-7)
        # the test can fail: DReG's mean is many SEs from 0 and from IWAE's mean sign-flipped
        mean = np.asarray(iwae[name]).mean(0)
        assert np.sum(np.abs(2 * mean) > 5 * se) >= 3


def test_dreg_mixed_with_a_discrete_vimco_site_upstream():
    """A discrete global c (VIMCO) sets the location of the local z (DReG): unbiased against
    IWAE with Pathwise z, paired, for both the discrete logit and the continuous params."""
    def mixed_model(x):
        c = sg.sample("c", dist.Bernoulli(probs=0.4))
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Normal(2.0 * c - 1.0, 1.0))
            sg.sample("x", dist.Normal(z, 0.8), obs=x)

    def mixed_guide(estimator):
        def guide(x):
            c = sg.sample("c", dist.Bernoulli(logits=sg.param("l", 0.3)), estimator=sg.VIMCO())
            m = sg.param("m", jnp.zeros(x.shape[0]))
            with sg.plate("data", x.shape[0]):
                sg.sample("z", dist.Normal(m + sg.param("a", 0.5) * c, 0.8), estimator=estimator)
        return guide

    params = {"l": jnp.array(0.3), "m": jnp.array([0.1, -0.2, 0.3, 0.6]), "a": jnp.array(0.5)}
    dreg, iwae = paired_grads(mixed_model, [mixed_guide(sg.DReG()), mixed_guide(sg.Pathwise())],
                              params, (X,), 4, 20000, seed=1)
    for name in params:
        diff = np.asarray(dreg[name] - iwae[name])
        se = diff.std(0) / np.sqrt(diff.shape[0])
        np.testing.assert_array_less(np.abs(diff.mean(0)), 5 * se + 1e-7)


@pytest.mark.parametrize("sleep_phi", [0.0, 0.5])
def test_dreg_under_rws_has_the_wake_phi_expected_gradient(sleep_phi):
    """RWS's wake-phi, sum_k w^_k grad log q(z_k) at fixed z_k, has the same mean as
    sum_k (w^_k - w^_k^2) dlog w_k/dz_k dz_k/dphi (Tucker et al. 2019, RWS-DReG); the model's
    gradient (wake-theta) is unchanged, here with a model param."""
    def theta_model(x):
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Normal(sg.param("mu", 0.3), 1.0))
            sg.sample("x", dist.Normal(z, 1.0), obs=x)

    params = {**PARAMS, "mu": jnp.array(0.3)}
    keys = jax.random.split(jax.random.key(5), 20000)
    rws = sg.RWS(num_particles=5, sleep_phi=sleep_phi)

    def grads(est):
        return jax.jit(jax.vmap(lambda k: jax.grad(rws.loss, argnums=1)(
            k, params, theta_model, guide_with(est), X)))(keys)

    dreg, plain = grads(sg.DReG()), grads(None)
    for name in params:
        diff = np.asarray(dreg[name] - plain[name])
        se = diff.std(0) / np.sqrt(diff.shape[0])
        np.testing.assert_array_less(np.abs(diff.mean(0)), 5 * se + 1e-7)
    np.testing.assert_allclose(dreg["mu"], plain["mu"], rtol=1e-5, atol=1e-6)
    mean = np.asarray(plain["m"]).mean(0)
    se = np.asarray(dreg["m"] - plain["m"]).std(0) / np.sqrt(len(keys))
    assert np.sum(np.abs(2 * mean) > 5 * se) >= 3  # the test can fail


def snr(grads):
    g = np.asarray(grads)
    return np.abs(g.mean(0)) / g.std(0)


def test_guide_snr_falls_with_k_under_iwae_and_not_under_dreg():
    """Rainforth et al. (2018): the IWAE guide gradient's SNR is O(1/sqrt K); DReG's is not."""
    x = X[:1]
    params = {"m": jnp.array([0.2]), "s": jnp.log(jnp.array([0.9]))}
    out = {}
    for k in (4, 64):
        dreg, iwae = paired_grads(model, [guide_with(sg.DReG()), guide_with(sg.Pathwise())],
                                  params, (x,), k, 4000, seed=k)
        out[k] = (snr(dreg["m"])[0], snr(iwae["m"])[0])
    assert out[64][1] < 0.6 * out[4][1]      # IWAE: falls (about 1/4 expected from 4 to 64)
    assert out[64][0] > 0.9 * out[4][0]      # DReG: does not fall
    assert out[64][0] > 2 * out[64][1]


def test_dreg_is_refused_where_it_would_be_wrong():
    with pytest.raises(sg.SiteError, match="'z' uses DReG, which is defined for a multi-sample"):
        sg.ELBO().loss(0, PARAMS, model, guide_with(sg.DReG()), X)
    with pytest.raises(sg.SiteError, match="'z' uses DReG, which is derived for the IWAE bound"):
        sg.RenyiELBO(0.5, 3).loss(0, PARAMS, model, guide_with(sg.DReG()), X)

    def chain_model():
        a = sg.sample("a", dist.Normal(0.0, 1.0))
        sg.sample("b", dist.Normal(a, 1.0))

    def chain_guide():
        a = sg.sample("a", dist.Normal(sg.param("ma", 0.0), 1.0), estimator=sg.DReG())
        sg.sample("b", dist.Normal(a, 1.0))

    with pytest.raises(sg.SiteError, match="'a' uses DReG, but its value feeds .* site 'b'"):
        sg.IWAE(num_particles=3).loss(0, {"ma": jnp.zeros(())}, chain_model, chain_guide)
