"""Malformed arguments get a message naming what is wrong, not an error from deep inside JAX,
flax or numpyro (issue 10, part B). Each case names the site, param or plate."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.dist import constraints


def bernoulli_pair(estimator):
    model = lambda: sg.sample("z", dist.Bernoulli(logits=0.0))
    guide = lambda: sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0)),
                              estimator=estimator)
    return model, guide


def traced(fn, *args):
    return sg.handlers.trace(sg.handlers.seed(fn, 0)).get_trace(*args)


# --- B1: estimator= that is not an estimator -------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (sg.RLOO, r"'z' was given the class RLOO.*did you mean sg\.RLOO\(\)\?"),
    (sg.ScoreFunction, r"'z'.*did you mean sg\.ScoreFunction\(\)\?"),
    ("rloo", r"'z' needs an scgjax estimator.*got str 'rloo'"),
    (sg.baselines.MovingAverage(0.9), r"'z' was given the baseline.*sg\.ScoreFunction\("),
    (3, r"'z' needs an scgjax estimator"),
])
def test_estimator_that_is_not_an_estimator(bad, match):
    model, guide = bernoulli_pair(bad)
    with pytest.raises(sg.SiteError, match=match):
        sg.init_params(0, model, guide)
    with pytest.raises(sg.SiteError, match=match):
        sg.ELBO().loss(0, {"l": jnp.zeros(())}, model, guide)
    with pytest.raises(sg.SiteError, match=match.replace("'z'", "'z'")):
        sg.handlers.assign_estimators(guide, {"z": bad})


# --- B2: a baseline that is not a baseline ---------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (sg.baselines.MovingAverage, r"class MovingAverage; did you mean MovingAverage\(\)"),
    ("moving", "got str 'moving'"),
    (True, "got bool True"),
    (sg.RLOO(), "got the estimator RLOO"),
    (object(), "got object"),
])
def test_baseline_that_is_not_a_baseline(bad, match):
    with pytest.raises(TypeError, match=r"ScoreFunction\(baseline=\.\.\.\).*" + match):
        sg.ScoreFunction(baseline=bad)


def test_a_number_baseline_means_constant():
    assert sg.ScoreFunction(baseline=-2.0).baseline.value == -2.0
    assert isinstance(sg.ScoreFunction(baseline=np.int32(1)).baseline, sg.baselines.Constant)
    model, guide = bernoulli_pair(sg.ScoreFunction(baseline=0.5))
    params = sg.init_params(0, model, guide)
    same = sg.ELBO().loss(0, params, *bernoulli_pair(
        sg.ScoreFunction(baseline=sg.baselines.Constant(0.5))))
    assert float(sg.ELBO().loss(0, params, model, guide)) == float(same)


def test_baseline_arguments():
    with pytest.raises(TypeError, match="decay must be a float"):
        sg.baselines.MovingAverage("0.9")
    with pytest.raises(TypeError, match="Constant baseline needs a real number"):
        sg.baselines.Constant("a")
    with pytest.raises(TypeError, match="class Dense.*pass an instance"):
        sg.baselines.Neural(nn.Dense, inputs=jnp.ones(3))


# --- B3: num_particles ------------------------------------------------------------------------

@pytest.mark.parametrize("objective", [sg.ELBO, sg.IWAE, sg.RWS, sg.Expectation])
@pytest.mark.parametrize("bad, error", [(2.0, TypeError), (True, TypeError), ("2", TypeError),
                                        (0, ValueError), (np.int64(-1), ValueError)])
def test_num_particles_must_be_a_positive_int(objective, bad, error):
    with pytest.raises(error, match="num_particles must be an int >= 1"):
        objective(num_particles=bad)


def test_numpy_int_num_particles_work_end_to_end():
    obj = sg.ELBO(num_particles=np.int64(3))
    assert type(obj.num_particles) is int and obj.num_particles == 3
    model, guide = bernoulli_pair(None)
    params = sg.init_params(0, model, guide)
    assert bool(jnp.isfinite(jax.jit(lambda p: obj.loss(0, p, model, guide))(params)))
    svi = sg.SVI(model, guide, optax.adam(0.1), sg.IWAE(num_particles=np.int32(2)))
    assert svi.run(0, 2, progress_bar=False).losses.shape == (2,)
    g = sg.graph(model, guide, num_particles=np.int64(2))
    assert g.nodes["z"].estimator == sg.RLOO()
    with pytest.raises(TypeError, match="num_particles"):
        sg.graph(model, guide, num_particles=2.0)


# --- B4: masks --------------------------------------------------------------------------------

def test_mask_that_does_not_broadcast_names_the_site_and_both_shapes():
    def program():
        with sg.plate("data", 3):
            sg.sample("x", dist.Normal(0.0, 1.0), obs=jnp.zeros(3))

    masked = sg.handlers.mask(program, jnp.array([True, False]))
    with pytest.raises(sg.SiteError, match=r"'x' has batch shape \(3,\).*mask of shape \(2,\)"):
        traced(masked)
    with pytest.raises(sg.SiteError, match="'x'.*mask of shape"):
        sg.Expectation().loss(0, {}, masked)

    def inner():  # the mask is met before the plate expands the site: checked after
        with sg.plate("data", 3), sg.handlers.mask(mask=jnp.ones((2, 3), bool)):
            sg.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(sg.SiteError, match=r"'z' has batch shape \(3,\).*\(2, 3\)"):
        traced(inner)


def test_mask_that_broadcasts_is_accepted_and_non_boolean_is_an_error():
    def program():
        with sg.plate("data", 3):
            sg.sample("x", dist.Normal(0.0, 1.0), obs=jnp.zeros(3))

    tr = traced(sg.handlers.mask(program, jnp.array([True])))
    assert tr["x"]["mask"].shape == (1,)
    traced(sg.handlers.mask(program, False))
    for bad in (jnp.array([1, 0, 1]), jnp.ones(3), [True, False, True], 1):
        with pytest.raises(TypeError, match="mask must be a bool or a boolean array"):
            sg.handlers.mask(program, bad)


# --- B5: flax modules -------------------------------------------------------------------------

def test_linen_module_without_example_inputs():
    prog = lambda x: sg.module("net", nn.Dense(2))(x)
    with pytest.raises(sg.SiteError, match="'net'.*no example inputs.*Dense.__call__"):
        sg.handlers.seed(prog, 0)(jnp.ones(3))
    with pytest.raises(sg.SiteError, match="'net'.*no example inputs"):
        sg.init_params(0, prog, None, jnp.ones(3))


def test_linen_module_with_inputs_of_the_wrong_shape():
    prog = lambda x: sg.module("net", nn.Dense(2), jnp.ones(5))(x)
    with pytest.raises(sg.SiteError, match=r"'net'.*inputs of shapes \[\(3,\)\].*kernel"):
        sg.handlers.seed(prog, 0)(jnp.ones(3))

    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x.reshape(7, -1))

    with pytest.raises(sg.SiteError, match=r"'bad'.*init failed.*shapes \[\(3,\)\]"):
        sg.handlers.seed(lambda x: sg.module("bad", Bad(), x)(x), 0)(jnp.ones(3))


def test_module_that_is_not_a_module():
    with pytest.raises(sg.SiteError, match="'net'.*class Dense"):
        sg.handlers.seed(lambda: sg.module("net", nn.Dense), 0)()
    with pytest.raises(sg.SiteError, match="'net'.*flax linen or nnx module"):
        sg.handlers.seed(lambda: sg.module("net", "dense"), 0)()


# --- B6: constraints --------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ("positive", r"'s'.*got str 'positive'; did you mean constraints\.positive\?"),
    ("unknown", r"'s'.*got str 'unknown'; did you mean constraints\.positive\?"),
    (type(constraints.positive), "'s'.*an instance"),
    (0.0, "'s'.*numpyro constraint"),
    (constraints.nonnegative_integer, "'s'.*no bijection"),
])
def test_constraint_that_is_not_a_constraint(bad, match):
    prog = lambda: sg.param("s", 1.0, bad)
    with pytest.raises(sg.SiteError, match=match):
        sg.handlers.seed(prog, 0)()
    with pytest.raises(sg.SiteError, match=match):
        sg.init_params(0, prog)


def test_constraint_none_means_real_and_param_needs_a_value():
    assert float(sg.handlers.seed(lambda: sg.param("s", 1.5, None), 0)()) == 1.5
    with pytest.raises(sg.SiteError, match="'w' is a param without a value"):
        sg.init_params(0, lambda: sg.param("w"))


# --- B7: factors ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ("abc", "got str"), (None, "got NoneType"), ({"a": 1.0}, "got dict"),
    (jnp.array(1 + 2j), "dtype complex"), (jnp.array([True, False]), "boolean value"),
])
def test_factor_that_is_not_numeric(bad, match):
    with pytest.raises(sg.SiteError, match=f"'reward' is a factor.*{match}"):
        traced(lambda: sg.factor("reward", bad))


def test_integer_factor_is_a_float_cost():
    tr = traced(lambda: sg.factor("count", jnp.array([1, 2])))
    assert jnp.issubdtype(tr["count"]["fn"].log_prob(tr["count"]["value"]).dtype, jnp.floating)
    assert float(-sg.Expectation().loss(0, {}, lambda: sg.factor("n", 3))) == 3.0


# --- B8: one plate name, two sizes ------------------------------------------------------------

def test_plate_sizes_differ_between_guide_and_model():
    def guide():
        with sg.plate("data", 5):
            sg.sample("z", dist.Normal(0.0, 1.0))

    def model():
        with sg.plate("data", 3):
            z = sg.sample("z", dist.Normal(0.0, 1.0))
            sg.sample("x", dist.Normal(z, 1.0), obs=jnp.zeros(3))

    with pytest.raises(sg.SiteError, match="'data' is a plate with size 5 in the guide but 3 in "
                       "the model"):
        sg.ELBO().loss(0, {}, model, guide)
    with pytest.raises(sg.SiteError, match="'data'.*5.*3"):
        sg.graph(model, guide, params={})


def test_plate_sizes_differ_within_one_program():
    def program():
        with sg.plate("data", 5):
            sg.factor("a", jnp.zeros(5))
        with sg.plate("data", 3):
            sg.factor("b", jnp.zeros(3))

    with pytest.raises(sg.SiteError, match="'data' is a plate used with size 5 and then 3"):
        sg.Expectation().loss(0, {}, program)


def test_plate_subsample_sizes_must_agree():
    def guide(sub):
        with sg.plate("data", 10, subsample_size=4):
            sg.sample("z", dist.Normal(0.0, 1.0))

    def model(sub):
        with sg.plate("data", 10, subsample_size=sub):
            sg.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(sg.SiteError, match="'data'.*subsample_size 4 in the guide but 2"):
        sg.ELBO().loss(0, {}, model, guide, 2)
    assert bool(jnp.isfinite(sg.ELBO().loss(0, {}, model, guide, None)))  # follows the guide
    assert bool(jnp.isfinite(sg.ELBO().loss(0, {}, model, guide, 4)))


# --- B9: more of the same kinds ---------------------------------------------------------------

def test_site_name_must_be_a_string():
    with pytest.raises(TypeError, match="sg.sample takes the site's name.*got int 3"):
        traced(lambda: sg.sample(3, dist.Normal(0.0, 1.0)))
    with pytest.raises(TypeError, match="sg.sample takes the site's name.*got Normal"):
        traced(lambda: sg.sample(dist.Normal(0.0, 1.0), "x"))
    for call in (lambda: sg.param(None, 1.0), lambda: sg.factor(1, 0.0),
                 lambda: sg.deterministic(("d",), 1.0)):
        with pytest.raises(TypeError, match="takes the site's name"):
            traced(call)


def test_distribution_class_instead_of_instance():
    with pytest.raises(sg.SiteError, match=r"'x' was given Normal itself.*dist\.Normal\(\.\.\.\)"):
        traced(lambda: sg.sample("x", dist.Normal))
    with pytest.raises(sg.SiteError, match=r"'b' was given Bernoulli itself"):
        traced(lambda: sg.sample("b", dist.Bernoulli))  # a function in scgjax.dist
    with pytest.raises(sg.SiteError, match="'x' expects a distribution.*got float"):
        traced(lambda: sg.sample("x", 1.0))


def test_deterministic_value_must_be_an_array():
    for bad in ("abc", None, {"a": "b"}, object()):
        with pytest.raises(sg.SiteError, match="'d' is a deterministic site and needs an array"):
            traced(lambda bad=bad: sg.deterministic("d", bad))
    tr = traced(lambda: sg.deterministic("d", {"a": jnp.ones(2), "b": 3}))
    assert tr["d"]["value"]["b"] == 3


def test_substitute_and_condition_data_must_be_a_dict_of_names():
    prog = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="substitute needs `data` as a dict"):
        sg.handlers.substitute(prog, [("z", 1.0)])
    with pytest.raises(TypeError, match="condition: the keys of `data` must be site names"):
        sg.handlers.condition(prog, {1: 1.0})


def test_an_objectives_default_estimator_is_checked_and_programs_must_be_callable():
    class Odd(sg.ELBO):
        def default_estimator(self, fn, num_particles):
            return sg.RLOO  # the class: a slip in a custom objective

    model, guide = bernoulli_pair(None)
    with pytest.raises(sg.SiteError, match=r"'z' was given the class RLOO"):
        Odd(num_particles=2).loss(0, {"l": jnp.zeros(())}, model, guide)
    with pytest.raises(TypeError, match="model and guide must be functions, got int"):
        sg.graph(model, 3, params={})


def _plated_obs():
    with sg.plate("n", 2):
        sg.sample("x", dist.Normal(0.0, 1.0), obs=jnp.zeros(2))


def test_scale_of_the_wrong_shape_names_the_site():
    with pytest.raises(sg.SiteError, match=r"'x'.*scale of shape \(3,\)"):
        sg.handlers.trace(sg.handlers.scale(_plated_obs, scale=jnp.ones(3))).get_trace()


@pytest.mark.parametrize("make, match", [
    (lambda fn: sg.handlers.block(fn, hide="x"), "string 'x'"),
    (lambda fn: sg.handlers.block(fn, ["x"]), "hide_fn must be a function"),
    (lambda fn: sg.handlers.block(["x"]), "first argument is the program"),
    (lambda fn: sg.handlers.replay(fn, trace={"x": 1.0}), "not a dict of values"),
], ids=["block-hide-str", "block-list-positional", "block-no-fn", "replay-values"])
def test_malformed_handler_arguments(make, match):
    with pytest.raises(TypeError, match=match):
        make(_plated_obs)


def test_numpy_integer_seeds_are_keys():
    program = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
    a = sg.handlers.seed(program, np.int64(3))()
    assert float(a) == float(sg.handlers.seed(program, 3)())


def test_int_and_list_param_inits_become_float_arrays():
    def program():
        m = sg.param("m", 0)
        v = sg.param("v", [0.0, 1.0])
        sg.factor("f", -((m - 3.0) ** 2) - jnp.sum(v))

    params = sg.init_params(0, program)
    assert params["m"].dtype == jnp.float32 and params["v"].shape == (2,)
    result = sg.SVI(program, None, optax.adam(0.5), sg.Expectation()).run(
        0, 5, progress_bar=False)
    assert result.params["m"] > 0.5


def test_score_estimator_on_a_delta_is_refused():
    model = lambda: sg.sample("z", dist.Normal(3.0, 1.0))
    guide = lambda: sg.sample("z", dist.Delta(sg.param("m", 0.0)), estimator=sg.RLOO())
    with pytest.raises(sg.SiteError, match="'z'.*Delta.*Pathwise"):
        sg.ELBO(num_particles=2).loss(0, sg.init_params(0, model, guide), model, guide)


def test_unknown_node_of_a_graph_is_named():
    model = lambda: sg.sample("z", dist.Normal(3.0, 1.0))
    guide = lambda: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
    g = sg.graph(model, guide)
    with pytest.raises(sg.SiteError, match="'zz' is not a stochastic node"):
        g.credited_costs("zz")
    with pytest.raises(sg.SiteError, match=r"'log p\(zz\)' is not a cost"):
        g.upstream("log p(zz)")


def test_one_param_with_two_constraints_is_an_error():
    def model():
        sg.param("s", 1.0, constraints.positive)
        sg.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        sg.param("s", 1.0)
        sg.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(sg.SiteError, match="'s'.*constraint Real.*Positive"):
        sg.init_params(0, model, guide)

    def twice():
        sg.param("t", 1.0, constraints.positive)
        sg.param("t", 1.0, constraints.unit_interval)

    with pytest.raises(sg.SiteError, match="'t'.*re-declared with constraint"):
        sg.handlers.trace(twice).get_trace()
