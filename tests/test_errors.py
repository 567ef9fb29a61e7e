"""Errors a user gets: clear, naming the site, never a raw JAX traceback or a wrong answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import scgjax as sg
from scgjax import dist


def elbo_loss(model, guide, *args, key=None):
    key = jax.random.key(0) if key is None else key
    params = sg.init_params(0, model, guide, *args)
    return sg.ELBO().loss(key, params, model, guide, *args)


def test_duplicate_site_names():
    def model():
        sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(sg.SiteError, match="'z'.*twice"):
        sg.handlers.trace(sg.handlers.seed(model, 0)).get_trace()


def test_guide_site_missing_from_model():
    model = lambda: sg.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(sg.SiteError, match="'extra'.*model has no such site"):
        elbo_loss(model, guide)


def test_model_latent_missing_from_guide():
    def model():
        sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("w", dist.Normal(0.0, 1.0))

    guide = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
    with pytest.raises(sg.SiteError, match="'w'.*guide does not sample"):
        elbo_loss(model, guide)


def test_pathwise_on_a_distribution_without_rsample():
    model = lambda: sg.sample("b", dist.Bernoulli(probs=0.3))
    guide = lambda: sg.sample("b", dist.Bernoulli(probs=0.3), estimator=sg.Pathwise())
    with pytest.raises(sg.SiteError, match="'b'.*Pathwise.*cannot be reparameterised"):
        elbo_loss(model, guide)


def test_rloo_needs_two_particles():
    model = lambda: sg.sample("b", dist.Bernoulli(probs=0.3))
    guide = lambda: sg.sample("b", dist.Bernoulli(probs=0.3), estimator=sg.RLOO())
    with pytest.raises(sg.SiteError, match="'b'.*num_particles >= 2"):
        elbo_loss(model, guide)


def test_obs_shape_does_not_fit():
    def model():
        with sg.plate("data", 3):
            sg.sample("x", dist.Normal(0.0, 1.0), obs=jnp.zeros(4))

    with pytest.raises(sg.SiteError, match=r"'x'.*observed value of shape \(4,\)"):
        sg.handlers.trace(model).get_trace()

    def event_model():
        sg.sample("y", dist.Normal(jnp.zeros(3), 1.0).to_event(1), obs=jnp.zeros((2, 3, 1)))

    with pytest.raises(sg.SiteError, match="'y'"):
        sg.handlers.trace(event_model).get_trace()


def test_plate_size_disagrees_with_batch_shape():
    def model():
        with sg.plate("data", 5):
            sg.sample("x", dist.Normal(jnp.zeros(3), 1.0), obs=jnp.zeros(3))

    with pytest.raises(sg.SiteError, match="'x'.*plate 'data' has size 5"):
        sg.handlers.trace(model).get_trace()


def test_param_redeclared_with_another_shape():
    def model():
        sg.param("w", jnp.zeros(2))
        sg.param("w", jnp.zeros(3))

    with pytest.raises(sg.SiteError, match="'w'.*re-declared"):
        sg.handlers.trace(model).get_trace()

    def model2():
        sg.sample("x", dist.Normal(sg.param("w", jnp.zeros(2)), 1.0).to_event(1),
                  obs=jnp.zeros(2))

    with pytest.raises(sg.SiteError, match="'w'.*shape"):
        sg.Expectation().loss(jax.random.key(0), {"w": jnp.zeros(5)}, model2)

    guide = lambda: sg.param("shared", jnp.zeros(2))
    model3 = lambda: sg.param("shared", jnp.zeros(4))
    with pytest.raises(sg.SiteError, match="'shared'"):
        sg.init_params(0, model3, guide)


@pytest.mark.parametrize("bad", [jnp.array([1.0, 2.0]), 1.5, "seed", jnp.zeros(3, jnp.uint32)])
def test_not_a_prng_key(bad):
    model = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
    guide = lambda: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
    params = sg.init_params(0, model, guide)
    with pytest.raises(TypeError, match="rng_key must be a PRNG key"):
        sg.ELBO().loss(bad, params, model, guide)
    with pytest.raises(TypeError, match="PRNG key"):
        sg.init_params(bad, model, guide)


def test_sample_without_a_seed():
    with pytest.raises(sg.SiteError, match="'z'.*PRNG key"):
        sg.sample("z", dist.Normal(0.0, 1.0))


def test_wrong_objective_arguments():
    model = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="model, guide"):
        sg.ELBO().loss(jax.random.key(0), {}, model, "not a guide")
    with pytest.raises(TypeError, match="guide=None"):
        sg.SVI(model, model, None, sg.Expectation())


def test_sample_inside_lax_scan_is_an_error_not_a_wrong_answer():
    def program():
        def body(carry, _):
            a = sg.sample("a", dist.Bernoulli(logits=0.0))
            sg.factor("r", a)
            return carry + a, None

        jax.lax.scan(body, 0.0, jnp.arange(3))

    with pytest.raises(sg.SiteError, match="'a'.*inside a JAX transformation"):
        sg.Expectation().loss(jax.random.key(0), {}, program)
    with pytest.raises(sg.SiteError, match="'a'.*lax.scan"):
        sg.handlers.trace(sg.handlers.seed(program, 0)).get_trace()
