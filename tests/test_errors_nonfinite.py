"""Non-finite values are reported, never trained on silently; SVI's arguments are checked."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.dist import constraints
from scgjax.errors import NonFiniteError

X = jnp.array([0.5, 1.0, 1.5, 2.0])


def normal_model(x):
    z = sg.sample("z", dist.Normal(0.0, 1.0))
    with sg.plate("data", x.shape[0]):
        sg.sample("x", dist.Normal(z, 1.0), obs=x)


def normal_guide(x):
    sg.sample("z", dist.Normal(sg.param("m", 0.0), sg.param("s", 1.0, constraints.positive)))


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.result_type(v), jnp.inexact))


# --- SVI.run stops at the first non-finite loss ----------------------------------------------

def barrier_model():
    """The reward pulls ``m`` up by exactly 0.25 per SGD step (lr 0.25); the factor
    ``barrier`` is NaN once ``m >= 2``, i.e. from step 8, and depends on ``z`` (so the NaN
    reaches z's learning signal and would poison its moving-average baseline)."""
    z = sg.sample("z", dist.Bernoulli(logits=0.0))
    m = sg.param("m", 0.0)
    sg.factor("reward", m + 0.1 * z)
    sg.factor("barrier", jnp.where(m < 2.0, 0.0 * z, jnp.nan))


def barrier_guide():
    sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.5)),
              estimator=sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9)))


def barrier_svi():
    return sg.SVI(barrier_model, barrier_guide, optax.sgd(0.25), sg.ELBO())


def test_run_stops_at_the_first_nonfinite_loss_with_the_last_good_state():
    svi = barrier_svi()
    with pytest.raises(NonFiniteError, match=r"step 8\b.*factor 'barrier' is nan") as info:
        svi.run(jax.random.key(0), 50, progress_bar=False, log_every=5)
    err = info.value
    assert err.step == 8 and err.site == "barrier"
    assert err.explanation.first.kind == "factor"
    # the state before step 8: 8 updates of +0.25, a finite (not poisoned) baseline
    assert float(err.state.params["m"]) == 2.0
    assert all_finite(err.state.estimator_state) and all_finite(err.state.params)
    assert int(err.state.estimator_state["z"]["steps"]) == 8
    assert err.result.state is err.state
    assert err.result.losses.shape == (8,) and np.isfinite(err.result.losses).all()
    assert set(err.result.metrics) == {"loss", "objective"}
    assert all(v.shape == (8,) for v in err.result.metrics.values())
    # resuming from the last good state reproduces the failing step (same key)
    with pytest.raises(NonFiniteError, match="step 0") as again:
        svi.run(None, 3, state=err.state, progress_bar=False)
    assert again.value.site == "barrier" and again.value.result.losses.shape == (0,)


def test_stop_on_nonfinite_false_keeps_training_through_nan():
    svi = barrier_svi()
    result = svi.run(jax.random.key(0), 12, progress_bar=False, stop_on_nonfinite=False)
    assert result.losses.shape == (12,)
    assert np.isfinite(result.losses[:8]).all() and np.isnan(result.losses[8:]).all()
    assert not all_finite(result.state.estimator_state)  # the baseline is poisoned


def test_run_reports_an_update_that_makes_a_param_nonfinite():
    def program():
        sg.factor("f", 1e30 * sg.param("m", 0.0))

    # step 0: the loss is 0 but the update, -1e10 * -1e30, overflows m to inf
    svi = sg.SVI(program, None, optax.sgd(1e10), sg.Expectation())
    with pytest.raises(NonFiniteError, match=r"step 0 made param 'm' non-finite \(its loss, 0, "
                                             r"was finite\)") as info:
        svi.run(0, 5, progress_bar=False)
    assert info.value.site == "m" and info.value.step == 0
    assert float(info.value.state.params["m"]) == 0.0


def test_guide_scale_overflow_names_the_guide_site():
    def model():
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(z, 1.0), obs=1.0)

    def guide():
        scale = jnp.exp(sg.param("log_s", 0.0) * 100.0)  # inf once log_s > 0.89
        sg.sample("z", dist.Normal(0.0, scale))

    svi = sg.SVI(model, guide, optax.sgd(1.0), sg.ELBO())
    with pytest.raises(NonFiniteError, match="site 'z' in the guide") as info:
        svi.run(0, 20, progress_bar=False)
    assert info.value.site == "z" and all_finite(info.value.state.params)


# --- explain_nonfinite on demand -------------------------------------------------------------

def test_explain_names_a_guide_log_density():
    def guide(x):
        sg.sample("z", dist.Normal(0.0, jnp.exp(sg.param("t", 1.0) * 100.0)))

    params = {"t": jnp.array(1.0)}
    found = sg.diagnostics.explain_nonfinite(sg.ELBO(), params, 0, normal_model, guide, X)
    assert found.first.kind == "log-density" and found.first.role == "guide"
    assert found.site == "z"
    assert "the log-density of site 'z' in the guide" in str(found)
    assert not np.isfinite(found.loss)


def test_explain_names_a_model_log_density_with_its_plate_element():
    def model(x):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        with sg.plate("data", x.shape[0]):
            sg.sample("x", dist.Normal(z, sg.param("sigma", 1.0)), obs=x)

    params = sg.init_params(0, model, normal_guide, X)
    params["sigma"] = jnp.array(0.0)
    found = sg.diagnostics.explain_nonfinite(sg.ELBO(num_particles=2), params, 0, model,
                                             normal_guide, X)
    first = found.first
    assert (first.kind, first.name, first.role) == ("log-density", "x", "model")
    assert first.where == "particle 0, data[0]"
    assert "the log-density of site 'x' in the model" in str(found)


def test_explain_names_a_factor_and_an_estimator_state():
    def model(x):
        normal_model(x)
        z = sg.sample("w", dist.Normal(0.0, 1.0))
        sg.factor("penalty", jnp.log(z - 10.0))

    def guide(x):
        normal_guide(x)
        sg.sample("w", dist.Normal(0.0, 1.0))

    params = sg.init_params(0, model, guide, X)
    found = sg.diagnostics.explain_nonfinite(sg.ELBO(), params, 0, model, guide, X)
    assert (found.first.kind, found.site) == ("factor", "penalty")
    assert str(found.first).startswith("factor 'penalty' is nan")

    state = {"z": {"mean": jnp.array(jnp.nan), "steps": jnp.array(3, jnp.int32)}}
    found = sg.diagnostics.explain_nonfinite(sg.ELBO(), barrier_params(), 0, barrier_model,
                                             barrier_guide, estimator_state=state)
    assert (found.first.kind, found.site) == ("estimator state", "z")
    assert any(q.kind == "estimator term" and q.name == "z" for q in found.quantities)


def barrier_params():
    return sg.init_params(0, barrier_model, barrier_guide)


def test_explain_finds_nothing_when_everything_is_finite_and_checks_its_arguments():
    params = sg.init_params(0, normal_model, normal_guide, X)
    found = sg.diagnostics.explain_nonfinite(sg.ELBO(), params, 0, normal_model,
                                             normal_guide, X)
    assert found.first is None and found.site is None and np.isfinite(found.loss)
    assert str(found).startswith("every quantity is finite")
    with pytest.raises(TypeError, match=r"ELBO\(\)"):
        sg.diagnostics.explain_nonfinite(sg.ELBO, params, 0, normal_model, normal_guide, X)
    with pytest.raises(TypeError, match="model, guide"):
        sg.diagnostics.explain_nonfinite(sg.ELBO(), params, 0, normal_model)


# --- params initialised outside their constraint ---------------------------------------------

@pytest.mark.parametrize("init, constraint, match", [
    (-1.0, constraints.positive, r"'p'.*-1\.0, outside its constraint Positive"),
    (2.0, constraints.unit_interval, r"'p'.*2\.0, outside its constraint UnitInterval"),
    (jnp.array([0.5, 0.7]), constraints.simplex, r"'p'.*\[0\.5, 0\.7\].*Simplex"),
    (1.0, constraints.unit_interval, r"'p'.*on the boundary of its constraint UnitInterval"),
    (lambda key: jnp.full(3, jnp.nan), constraints.real, r"'p'.*not finite \(nan at index"),
    (lambda key: -jnp.ones(2), constraints.positive, r"'p'.*outside its constraint Positive"),
    (jnp.array([1.0, jnp.inf]), constraints.real, r"'p'.*not finite \(inf at index \(1,\)"),
])
def test_param_initialised_outside_its_constraint(init, constraint, match):
    def model():
        sg.sample("x", dist.Normal(jnp.sum(sg.param("p", init, constraint)), 1.0), obs=0.0)

    with pytest.raises(sg.SiteError, match=match):
        sg.init_params(0, model)


def test_param_from_the_arguments_outside_its_constraint_and_svi_init():
    def model(x):
        sg.sample("y", dist.Normal(0.0, sg.param("s", x.mean(), constraints.positive)),
                  obs=0.0)

    with pytest.raises(sg.SiteError, match=r"'s'.*-1\.0, outside its constraint"):
        sg.init_params(0, model, None, -jnp.ones(3))
    svi = sg.SVI(model, None, optax.adam(0.1), sg.Expectation())
    with pytest.raises(sg.SiteError, match="'s'.*outside its constraint"):
        svi.init(0, -jnp.ones(3))


def test_params_inside_their_constraint_up_to_rounding_are_accepted():
    def model():
        w = sg.param("w", jnp.ones(1000) / 1000, constraints.simplex)
        s = sg.param("s", 1e-30, constraints.positive)
        sg.sample("x", dist.Normal(w.sum() * s, 1.0), obs=0.0)

    params = sg.init_params(0, model)
    assert all_finite(params)


# --- non-finite arguments --------------------------------------------------------------------

def test_nan_in_observed_data_names_the_site_and_the_argument():
    data = np.array([0.5, 1.0, np.nan, 2.0], np.float32)
    svi = sg.SVI(normal_model, normal_guide, optax.adam(0.1), sg.ELBO())
    with pytest.raises(sg.SiteError, match=r"site 'x'.*positional argument 0.*nan at index "
                                           r"\(2,\)"):
        svi.init(0, data)
    with pytest.raises(sg.SiteError, match=r"site 'x'.*keyword argument 'x'"):
        svi.run(0, 5, x=jnp.asarray(data), progress_bar=False)
    state = svi.init(0, X)
    with pytest.raises(sg.SiteError, match="site 'x'"):
        svi.run(None, 5, data, state=state, progress_bar=False)


def test_inf_in_a_covariate_names_the_site_whose_log_density_it_reaches():
    def model(c, y):
        w = sg.sample("w", dist.Normal(0.0, 1.0))
        with sg.plate("data", y.shape[0]):
            sg.sample("y", dist.Normal(w * c, 1.0), obs=y)

    def guide(c, y):
        sg.sample("w", dist.Normal(sg.param("m", 0.0), 1.0))

    svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
    with pytest.raises(sg.SiteError, match=r"site 'y' has a non-finite log-density in the "
                                           r"model.*positional argument 0.*inf at index \(1,\)"):
        svi.init(0, jnp.array([1.0, jnp.inf]), jnp.ones(2))


def test_nonfinite_argument_the_program_handles_is_a_warning_and_integers_are_skipped():
    def program(bounds, y, idx):
        with sg.plate("data", y.shape[0]):
            sg.sample("y", dist.Normal(sg.param("m", 0.0), 1.0),
                      obs=jnp.clip(y[idx], bounds[0], bounds[1]))

    svi = sg.SVI(program, None, optax.adam(0.1), sg.Expectation())
    with pytest.warns(UserWarning, match=r"positional argument 0 holds a non-finite value "
                                         r"\(-inf at index \(0,\)\)"):
        result = svi.run(0, 3, jnp.array([-jnp.inf, jnp.inf]), jnp.ones(2), np.arange(2),
                         progress_bar=False)
    assert np.isfinite(result.losses).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.run(0, 2, jnp.array([-1.0, 1.0]), jnp.ones(2), np.arange(2), progress_bar=False)


# --- SVI's arguments -------------------------------------------------------------------------

def test_svi_checks_its_optimizer_objective_and_num_steps():
    with pytest.raises(TypeError, match=r"did you mean optax\.adam\(learning_rate\)\?"):
        sg.SVI(normal_model, normal_guide, optax.adam, sg.ELBO())
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        sg.SVI(normal_model, normal_guide, "adam", sg.ELBO())
    with pytest.raises(TypeError, match=r"class ELBO.*sg\.ELBO\(\)"):
        sg.SVI(normal_model, normal_guide, optax.adam(0.1), sg.ELBO)
    svi = sg.SVI(normal_model, normal_guide, optax.adam(0.1), sg.ELBO())
    with pytest.raises(ValueError, match="num_steps must be an int >= 0, got -1"):
        svi.run(0, -1, X, progress_bar=False)
    with pytest.raises(TypeError, match=r"num_steps must be an int, got 2\.0.*num_steps=2"):
        svi.run(0, 2.0, X, progress_bar=False)
    with pytest.raises(TypeError, match="num_steps must be an int, got the bool True"):
        svi.run(0, True, X, progress_bar=False)
    with pytest.raises(ValueError, match="log_every must be an int >= 1"):
        svi.run(0, 2, X, progress_bar=False, log_every=0)


def test_zero_steps_numpy_integers_and_update_under_jit_still_work():
    svi = sg.SVI(normal_model, normal_guide, optax.adam(0.1), sg.ELBO())
    empty = svi.run(jax.random.key(0), 0, X, progress_bar=False)
    assert empty.losses.shape == (0,) and empty.metrics == {}
    result = svi.run(jax.random.key(0), np.int64(3), X, progress_bar=False)
    assert result.losses.shape == (3,)

    def model(x, idx):
        normal_model(x[idx])

    def guide(x, idx):
        normal_guide(x[idx])

    svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
    idx = np.arange(3, dtype=np.int64)
    state = svi.init(0, X, idx)
    state, loss = jax.jit(svi.update)(state, X, idx)
    assert np.isfinite(float(loss))
    result = svi.run(None, np.int32(2), X, idx, state=state, progress_bar=False)
    assert np.isfinite(result.losses).all()


def test_nan_param_given_to_a_loss_names_the_param():
    model = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
    guide = lambda: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
    params = dict(sg.init_params(0, model, guide), m=jnp.array(jnp.nan))
    with pytest.raises(sg.SiteError, match="'m'.*not finite"):
        sg.ELBO().loss(0, params, model, guide)


def test_nan_scale_is_refused():
    with pytest.raises(sg.ScgjaxError, match="scale must be positive"):
        sg.handlers.scale(lambda: None, scale=float("nan"))
