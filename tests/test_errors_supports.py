"""Supports (issue 10, part 1): observed values and guide values must fit the model site's
support; a concrete value outside it is an error naming the site, never a finite number."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist


def run(fn, *args):
    return sg.handlers.trace(sg.handlers.seed(fn, 0)).get_trace(*args)


def observe(fn, value):
    def program():
        with sg.plate("n", np.shape(value)[0]):
            sg.sample("y", fn, obs=value)

    return program


@pytest.mark.parametrize("fn, value, match", [
    (dist.Bernoulli(logits=0.0), jnp.array([0.0, 2.0]), "outside the support"),
    (dist.Bernoulli(probs=0.3), jnp.array([1.0, 0.5]), "outside the support"),
    (dist.Poisson(2.0), jnp.array([1.0, -1.0]), "outside the support"),
    (dist.Exponential(1.0), jnp.array([1.0, -0.5]), "outside the support"),
    (dist.Beta(2.0, 2.0), jnp.array([0.5, 1.5]), "outside the support"),
    (dist.Categorical(logits=jnp.zeros(3)), jnp.array([0, 3]), "outside the support"),
    (dist.Categorical(logits=jnp.zeros(3)), jnp.array([1.0, 0.5]), "not whole numbers"),
    (dist.Normal(0.0, 1.0), jnp.array([0.0, jnp.nan]), "non-finite"),
    (dist.Normal(0.0, 1.0), np.array([np.inf, 0.0]), "non-finite"),
], ids=["bernoulli-logits-2", "bernoulli-probs-half", "poisson-negative", "exponential-neg",
        "beta-above-1", "categorical-3-of-3", "categorical-fraction", "normal-nan",
        "normal-inf-numpy"])
def test_observed_value_outside_support_names_the_site(fn, value, match):
    with pytest.raises(sg.SiteError, match=f"'y'.*{match}"):
        run(observe(fn, value))


def test_event_support_is_checked():
    program = lambda: sg.sample("w", dist.Dirichlet(jnp.ones(3)), obs=jnp.array([0.5, 0.6, 0.1]))
    with pytest.raises(sg.SiteError, match="'w'.*Simplex"):
        run(program)


def test_bernoulli_override_keeps_numpyro_validation():
    # scgjax replaces numpyro's BernoulliLogits.log_prob; validate_args must still give -inf
    with pytest.warns(UserWarning, match="Out-of-support"):
        lp = dist.Bernoulli(logits=0.0, validate_args=True).log_prob(2.0)
    assert float(lp) == -np.inf
    fixed = sg.dist.fix_known_bugs(
        __import__("numpyro").distributions.BernoulliLogits(0.0, validate_args=True))
    assert fixed._validate_args


def test_whole_float_labels_are_cast_to_int():
    tr = run(observe(dist.Categorical(logits=jnp.zeros(3)), jnp.array([2.0, 0.0])))
    value = tr["y"]["value"]
    assert jnp.issubdtype(value.dtype, jnp.integer) and value.tolist() == [2, 0]
    lp = tr["y"]["fn"].log_prob(value)
    assert np.allclose(lp, -np.log(3.0))


def test_masked_elements_are_not_checked():
    def program():
        with sg.plate("n", 2), sg.handlers.mask(mask=jnp.array([True, False])):
            sg.sample("y", dist.Normal(0.0, 1.0), obs=jnp.array([0.0, jnp.nan]))

    assert "y" in run(program)


def test_valid_observations_pass():
    for fn, value in [(dist.Bernoulli(logits=0.0), jnp.array([0, 1])),
                      (dist.Poisson(2.0), jnp.array([0.0, 4.0])),
                      (dist.Normal(0.0, 1.0), np.array([-3.0, 3.0]))]:
        assert "y" in run(observe(fn, value))


def test_observed_data_is_checked_when_svi_starts():
    def model(x):
        with sg.plate("n", x.shape[0]):
            sg.sample("x", dist.Bernoulli(logits=sg.param("l", 0.0)), obs=x)

    svi = sg.SVI(model, None, optax.adam(0.1), sg.Expectation())
    with pytest.raises(sg.SiteError, match="'x'.*outside the support"):
        svi.run(0, 2, jnp.array([0.0, 1.0, 3.0]), progress_bar=False)


def elbo(model, guide):
    params = sg.init_params(0, model, guide)
    return sg.ELBO().loss(jax.random.key(0), params, model, guide)


@pytest.mark.parametrize("model_fn, guide_fn, match", [
    (dist.Bernoulli(probs=0.3), dist.Normal(0.5, 1.0), "discrete in the model"),
    (dist.Categorical(logits=jnp.zeros(3)), dist.Beta(2.0, 2.0), "discrete in the model"),
    (dist.Gamma(2.0, 1.0), dist.Normal(0.5, 1.0), "not contained in the model's support"),
    (dist.Beta(2.0, 1.0), dist.LogNormal(0.0, 1.0), "not contained in the model's support"),
    (dist.HalfNormal(1.0), dist.Normal(0.0, 1.0), "not contained in the model's support"),
    (dist.Categorical(logits=jnp.zeros(3)), dist.Categorical(logits=jnp.zeros(5)),
     "not contained in the model's support"),
], ids=["bernoulli-normal", "categorical-beta", "gamma-normal", "beta-lognormal",
        "halfnormal-normal", "categorical-3-5"])
def test_guide_support_outside_model_support(model_fn, guide_fn, match):
    model = lambda: sg.sample("z", model_fn)
    estimator = None if guide_fn.has_rsample else sg.ScoreFunction()
    guide = lambda: sg.sample("z", guide_fn, estimator=estimator)
    with pytest.raises(sg.SiteError, match=f"'z'.*{match}"):
        elbo(model, guide)


def test_guide_support_mismatch_is_caught_inside_a_jitted_step():
    model = lambda: sg.sample("z", dist.Gamma(2.0, 1.0))
    guide = lambda: sg.sample("z", dist.Normal(sg.param("m", 1.0), 1.0))
    svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
    with pytest.raises(sg.SiteError, match="'z'.*Positive"):
        state = svi.init(0)
        svi.update(state)


@pytest.mark.parametrize("model_fn, guide_fn", [
    (dist.Gamma(2.0, 1.0), dist.LogNormal(0.0, 1.0)),
    (dist.Normal(0.0, 1.0), dist.LogNormal(0.0, 1.0)),
    (dist.Uniform(0.0, 2.0), dist.Beta(2.0, 2.0)),
    (dist.Dirichlet(jnp.ones(3)), dist.Dirichlet(2.0 * jnp.ones(3))),
    (dist.Categorical(logits=jnp.zeros(3)), dist.Bernoulli(probs=0.4)),
])
def test_contained_supports_are_fine(model_fn, guide_fn):
    model = lambda: sg.sample("z", model_fn)
    estimator = None if guide_fn.has_rsample else sg.ScoreFunction()
    guide = lambda: sg.sample("z", guide_fn, estimator=estimator)
    assert np.isfinite(float(elbo(model, guide)))


def test_discrete_guide_without_enumerable_support_is_checked():
    # a Poisson guide proposes counts a Binomial(3) model cannot score
    model = lambda: sg.sample("z", dist.Binomial(3, probs=0.5))
    guide = lambda: sg.sample("z", dist.Poisson(2.0), estimator=sg.ScoreFunction())
    with pytest.raises(sg.SiteError, match="'z'.*not contained"):
        elbo(model, guide)


@pytest.mark.parametrize("value, match", [(jnp.nan, "non-finite substituted"),
                                          (-1.0, "substituted values outside the support")])
def test_substituted_values_are_checked_when_concrete(value, match):
    model = lambda: sg.sample("z", dist.Exponential(1.0))
    with pytest.raises(sg.SiteError, match=f"'z'.*{match}"):
        run(sg.handlers.substitute(model, data={"z": value}))
