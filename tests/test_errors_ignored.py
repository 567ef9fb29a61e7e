"""Nothing a user writes is silently ignored: a params key, an estimator, a handler's data.

Each case names the site, param or key in its error or warning (issue 10, part A).
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.dist import constraints


def model(x):
    z = sg.sample("z", dist.Normal(sg.param("prior_loc", 0.0), 1.0))
    sg.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    scale = sg.param("q_scale", 1.0, constraints.positive)
    sg.sample("z", dist.Normal(sg.param("q_loc", 0.0), scale))


@contextlib.contextmanager
def no_warnings():
    """A context in which any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- A1: params that lack a declared param, or hold an unknown key --------------------------

def misspelt(params: dict) -> dict:
    bad = dict(params)
    bad["q_lco"] = bad.pop("q_loc")
    return bad


def test_misspelt_param_key_is_an_error_naming_the_closest_key():
    params = misspelt(sg.init_params(0, model, guide, 1.0))
    with pytest.raises(sg.SiteError, match=r"'q_loc'.*no key 'q_loc'.*did you mean 'q_lco'"):
        sg.ELBO().loss(0, params, model, guide, 1.0)
    with pytest.raises(sg.SiteError, match="'q_loc'.*'q_lco'"):  # under jit: at trace time
        jax.jit(lambda p: sg.ELBO().loss(0, p, model, guide, 1.0))(params)
    with pytest.raises(sg.SiteError, match="'q_loc'.*'q_lco'"):
        jax.grad(lambda p: sg.ELBO().loss(0, p, model, guide, 1.0))(params)


def test_misspelt_param_key_in_svi_and_constrain_params():
    params = misspelt(sg.init_params(0, model, guide, 1.0))
    svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
    with pytest.raises(sg.SiteError, match="'q_loc'.*'q_lco'"):
        svi.init(0, 1.0, init_params_=params)
    with pytest.raises(sg.SiteError, match="'q_loc'.*'q_lco'"):
        sg.constrain_params(params, model, guide, 1.0)
    missing = {k: v for k, v in sg.init_params(0, model, guide, 1.0).items() if k != "prior_loc"}
    with pytest.raises(sg.SiteError, match="'prior_loc'.*no key 'prior_loc'"):
        sg.ELBO().loss(0, missing, model, guide, 1.0)


def test_empty_params_for_a_program_with_params_is_an_error():
    with pytest.raises(sg.SiteError, match="'q_scale'|'q_loc'|'prior_loc'"):
        sg.ELBO().loss(0, {}, model, guide, 1.0)


def test_params_must_be_a_dict():
    with pytest.raises(TypeError, match="params must be a dict"):
        sg.ELBO().loss(0, None, model, guide, 1.0)
    with pytest.raises(TypeError, match="params must be a dict"):
        sg.handlers.substitute_unconstrained(guide, [1.0, 2.0])


def test_substitute_unconstrained_strict_false_keeps_the_initial_value():
    prog = lambda: sg.param("s", 2.0, constraints.positive)
    with pytest.raises(sg.SiteError, match="'s'.*no key 's'"):
        sg.handlers.substitute_unconstrained(prog, {"t": 0.0})()
    assert float(sg.handlers.substitute_unconstrained(prog, {}, strict=False)()) == 2.0


def test_unknown_params_key_is_a_warning_naming_it():
    params = sg.init_params(0, model, guide, 1.0)
    with pytest.warns(UserWarning, match=r"'q_locc'.*no param.*did you mean 'q_loc'") as rec:
        loss = sg.ELBO().loss(0, {**params, "q_locc": jnp.zeros(())}, model, guide, 1.0)
    assert bool(jnp.isfinite(loss))
    assert rec[0].filename == __file__  # attributed to the caller, not to JAX's internals
    with pytest.warns(UserWarning, match="'not_a_site\\$alpha'"):
        sg.ELBO().loss(0, {**params, "not_a_site$alpha": 0.0}, model, guide, 1.0)


def test_estimator_params_and_params_less_paths_give_no_warning():
    def dcv_guide():
        sg.sample("b", dist.Bernoulli(logits=sg.param("l", jnp.zeros(2))).to_event(1),
                  estimator=sg.DCV())

    def dcv_model():
        sg.sample("b", dist.Bernoulli(logits=jnp.zeros(2)).to_event(1))
        sg.factor("f", jnp.ones(()))

    with no_warnings():
        params = sg.init_params(0, dcv_model, dcv_guide)
        assert "b$alpha" in params
        sg.graph(dcv_model, dcv_guide, num_particles=2)  # params=None: from init_params
        sg.ELBO(num_particles=2).loss(0, params, dcv_model, dcv_guide)
        sg.Expectation().loss(0, {}, lambda: sg.factor("r", 1.0))
        svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
        result = svi.run(jax.random.key(0), 3, 1.0, progress_bar=False)
        sg.constrain_params(result.params, model, guide, 1.0)


# --- A2: an estimator= that the objective ignores ------------------------------------------

def test_estimator_on_an_observed_site_is_a_warning():
    def obs_model(x):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(z, 1.0), obs=x, estimator=sg.ScoreFunction())

    g = lambda x: sg.sample("z", dist.Normal(0.0, 1.0))
    with pytest.warns(UserWarning, match="'x' is observed in the model.*ignored"):
        sg.ELBO().loss(0, {}, obs_model, g, 1.0)

    def program():
        a = sg.sample("a", dist.Bernoulli(logits=0.0), estimator=sg.RLOO())
        sg.factor("r", a)

    conditioned = sg.handlers.condition(program, {"a": 1.0})
    with pytest.warns(UserWarning, match="'a' is observed in the program.*ignored"):
        sg.Expectation(num_particles=2).loss(0, {}, conditioned)


def test_estimator_on_a_model_latent_is_a_warning_naming_the_guides():
    def est_model(x):
        z = sg.sample("z", dist.Bernoulli(logits=0.0), estimator=sg.RLOO())
        sg.sample("x", dist.Normal(z, 1.0), obs=x)

    est_guide = lambda x: sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0)))
    params = sg.init_params(0, est_model, est_guide, 1.0)
    with pytest.warns(UserWarning, match="'z' has estimator RLOO.*in the model.*guide's "
                      "estimator is used"):
        sg.ELBO().loss(0, params, est_model, est_guide, 1.0)
    with pytest.warns(UserWarning, match="'z'.*guide's estimator"):
        sg.IWAE(num_particles=2).loss(0, params, est_model, est_guide, 1.0)


def test_same_estimator_in_model_and_guide_gives_no_warning():
    def program(x):
        z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0)), estimator=sg.RLOO())
        sg.sample("x", dist.Normal(z, 1.0), obs=x)

    def q(x):
        sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0)), estimator=sg.RLOO())

    with no_warnings():
        sg.ELBO(num_particles=2).loss(0, sg.init_params(0, program, q, 1.0), program, q, 1.0)


# --- A3: handlers given names the program never uses ---------------------------------------

def prog():
    z = sg.sample("z", dist.Normal(0.0, 1.0))
    sg.sample("x", dist.Normal(z, 1.0), obs=0.5)
    sg.factor("f", z)
    sg.deterministic("d", 2 * z)
    return z


def test_substitute_with_an_unknown_name_warns_with_the_closest():
    fn = sg.handlers.seed(sg.handlers.substitute(prog, {"zz": 1.0}), 0)
    with pytest.warns(UserWarning, match=r"'zz' is not a site.*did you mean 'z'.*substitute"):
        fn()
    for name, kind in [("x", "observed"), ("f", "factor"), ("d", "deterministic")]:
        fn = sg.handlers.seed(sg.handlers.substitute(prog, {name: 1.0}), 0)
        with pytest.warns(UserWarning, match=f"'{name}' is .*{kind}.*substitute does not"):
            fn()


def test_condition_with_an_unknown_name_warns_with_the_closest():
    fn = sg.handlers.seed(sg.handlers.condition(prog, {"Z": 1.0}), 0)
    with pytest.warns(UserWarning, match=r"'Z' is not a site.*did you mean 'z'.*condition"):
        fn()
    fn = sg.handlers.seed(sg.handlers.condition(prog, {"f": 1.0}), 0)
    with pytest.warns(UserWarning, match="'f' is a factor, which condition does not change"):
        fn()
    with pytest.warns(UserWarning, match="'zz'"):  # reaches the user through an objective
        sg.Expectation().loss(0, {}, sg.handlers.condition(prog, {"zz": 1.0}))


def test_substitute_and_condition_stay_stateless_under_jit():
    sub = sg.handlers.substitute(prog, {"z": 2.0})
    cond = sg.handlers.condition(prog, {"z": 3.0})
    with no_warnings():
        for _ in range(2):
            assert float(jax.jit(sg.handlers.seed(sub, 0))()) == 2.0
            assert float(jax.jit(sg.handlers.seed(cond, 0))()) == 3.0
            assert float(sg.handlers.seed(sub, 0)()) == 2.0
    used_once = sg.handlers.substitute(lambda flag: sg.sample("z", dist.Normal(0., 1.))
                                       if flag else sg.sample("w", dist.Normal(0., 1.)),
                                       {"z": 1.0})
    with no_warnings():
        sg.handlers.seed(used_once, 0)(True)
    with pytest.warns(UserWarning, match="'z' is not a site"):  # a new call: fresh state
        sg.handlers.seed(used_once, 0)(False)


def test_assign_estimators_unknown_name_is_still_an_error():
    q = lambda: sg.sample("z", dist.Bernoulli(logits=0.0))
    with pytest.raises(sg.SiteError, match="'y'.*assign_estimators"):
        sg.graph(q, sg.handlers.assign_estimators(q, {"y": sg.RLOO()}), num_particles=2)


def test_no_number_is_computed_for_a_misspelt_key():
    """The loss of a misspelt dict would equal the loss at the initial value: it must not be
    returned at all."""
    params = sg.init_params(0, model, guide, 1.0)
    params = {**params, "q_loc": jnp.asarray(5.0)}
    good = sg.ELBO().loss(0, params, model, guide, 1.0)
    bad = misspelt(params)
    result = None
    with pytest.raises(sg.SiteError):
        result = sg.ELBO().loss(0, bad, model, guide, 1.0)
    assert result is None and np.isfinite(float(good))


def test_block_and_replay_with_names_the_program_never_uses_warn():
    program = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
    with pytest.warns(UserWarning, match="'zz'.*did you mean 'z'.*block ignores it"):
        sg.handlers.block(sg.handlers.seed(program, 0), hide=["zz"])()
    other = sg.handlers.trace(sg.handlers.seed(lambda: sg.sample("y", dist.Normal(0.0, 1.0)),
                                               0)).get_trace()
    with pytest.warns(UserWarning, match="'y'.*nothing was replayed"):
        sg.handlers.seed(sg.handlers.replay(program, trace=other), 0)()


def test_numpyro_keyword_names_are_not_passed_to_the_programs():
    def model(x):
        sg.sample("x", dist.Normal(sg.param("m", 0.0), 1.0), obs=x)

    svi = sg.SVI(model, None, optax.adam(0.1), sg.Expectation())
    params = sg.init_params(0, model, None, 1.0)
    with pytest.raises(TypeError, match="init_params=.*state="):
        svi.run(0, 2, 1.0, init_params=params, progress_bar=False)
    with pytest.raises(TypeError, match="init_state=.*state="):
        svi.run(0, 2, 1.0, init_state=None, progress_bar=False)


def test_get_params_gives_the_constrained_values():
    # state.params are unconstrained (what is trained); numpyro users expect get_params
    def model():
        sg.sample("x", dist.Normal(0.0, 1.0), obs=0.5)

    def guide():
        sg.param("s", 3.0, constraints.positive)

    svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
    state = svi.init(0)
    np.testing.assert_allclose(float(state.params["s"]), np.log(3.0), rtol=1e-6)
    np.testing.assert_allclose(float(svi.get_params(state)["s"]), 3.0, rtol=1e-6)
