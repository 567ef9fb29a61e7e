"""Pyro's valid-model checks (``tests/infer/test_valid_models.py``), ported to scgjax.

Each case is a model/guide pair that Pyro either accepts (``assert_ok``: an SVI step and the
loss run) or rejects (``assert_error`` / ``assert_warning``). Here the pairs Pyro accepts must run
under the objectives listed with each case, among ``sg.ELBO`` with one particle and with two
(RLOO for discrete sites), ``sg.ELBO`` with ``sg.Enumerate()`` on the guide's discrete sites
(where Pyro runs ``TraceEnum_ELBO`` with ``config_enumerate``), ``sg.IWAE`` and ``sg.RWS`` with
two particles: one ``sg.SVI`` step must give a finite loss and a finite gradient, with no
warning from scgjax. The pairs Pyro rejects must raise a ``sg.SiteError`` / ``sg.ScgjaxError`` /
``TypeError`` / ``ValueError`` naming the offending site, or warn naming it, before any number
is produced. Three cases come from ``tests/infer/test_inference.py::SafetyTests``.

Translation: Pyro's sequential ``for i in pyro.plate(...)`` is a Python loop (scgjax finds the
independence from the data flow); ``pyro.plate(name, size, subsample_size)`` is
``sg.plate(name, size, subsample_size=...)`` (scgjax's third positional argument is ``dim``);
``plate_stack`` is nested ``sg.plate``s; ``.expand_by(shape)`` is ``.expand(shape + batch)``;
``has_rsample_(False)`` is ``estimator=sg.ScoreFunction()``; ``config_enumerate`` sets
``sg.Enumerate()`` on the guide's discrete sites; a ``pyro.param(..., event_dim=...)`` that Pyro
sub-samples automatically is indexed by the plate's indices by hand; ``OneHotCategorical``
(which ``sg.Enumerate`` does not take: it needs scalar events) is ``Categorical``.

Cases not ported, and why:

- sequential plates with ``subsample_size`` (``test_iplate_ok[subsample]``,
  ``test_iplate_iplate*[subsample]``, the sub-sampled ``iplate`` of ``test_plate_iplate_ok`` /
  ``test_iplate_plate_ok``, ``test_enum_discrete_iplate_single_ok``): a Python loop over random
  indices would give sites random names; scgjax has no sequential plate (ported without
  sub-sampling);
- ``test_plate_subsample_primitive_ok``: there is no ``pyro.subsample`` primitive (the same
  manual indexing is ``test_plate_subsample_param_ok``);
- ``test_plate_param_size_mismatch_error``: ``sg.param`` has no ``event_dim`` and is not
  sub-sampled by plates (the ``*_subsample_param_ok`` cases index params by hand);
- ``test_plate_no_size_ok``: ``sg.plate`` needs a size;
- ``test_iplate_in_guide_not_model_error``: an empty (sequential) plate has no effect in scgjax,
  which reads plates from the sites inside them; the meaningful variant, a guide site in a plate
  that the model's site is not in, is ``test_plate_in_guide_not_model_error``;
- ``test_block_plate_*``: no ``block_plate`` handler;
- ``test_enum_discrete_missing_config_warning``, ``*_no_discrete_vars_warning`` with
  ``strict_enumeration_warning`` and ``test_enum_discrete_parallel_ok`` /
  ``test_enumerate_parallel_plate_ok``'s shape checks: scgjax has no ``TraceEnum_ELBO`` (nor
  its flag) and enumerates without enumeration dims (values keep the site's batch shape);
- ``test_enum_discrete_iplates_plate_dependency_warning``: a restriction of Pyro's
  plate-tree variable elimination, with no dependency to report; model-side enumeration
  (``infer={"enumerate": ...}`` in the model: ``test_enum_in_model_*``, ``*_recycling_*``,
  ``test_markov_history``, the model's ``w`` of the ``*_dependency_*`` cases) and
  ``pyro.markov``: not supported;
- ``test_factor_in_guide_ok``: ``sg.factor`` has no ``has_rsample`` (a factor in a guide is an
  error: ``test_factor_in_guide_error``);
- ``TraceMeanField_ELBO`` (``test_mean_field_*``), ``TraceTailAdaptive_ELBO``, ``TraceTMC_ELBO``,
  ``EnergyDistance`` (``test_no_log_prob_ok``), ``poutine.reparam`` / ``LatentStableReparam``
  (``test_reparam_ok``, ``test_reparam_mask_*``, ``test_reparam_stable``), ``obs_mask``
  (``test_obs_mask_*``) and funsor's collapse (``test_collapse_*``): no scgjax equivalent;
- ``test_enum_discrete_vectorized_num_particles``: model-side enumeration under a particle
  plate.
"""

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
from scgjax.primitives import Messenger

LR = 1e-3  # plain SGD: the gradient is (params before - params after) / LR


class config_enumerate(Messenger):
    """Pyro's ``config_enumerate`` for a guide: ``sg.Enumerate()`` on every latent site with a
    finite support and scalar events that names no estimator."""

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg.get("estimator") is not None:
            return
        fn = msg["fn"]
        if getattr(fn, "has_enumerate_support", False) and fn.event_shape == ():
            msg["estimator"] = sg.Enumerate()


OBJECTIVES = {
    "elbo": lambda: (sg.ELBO(), None),  # Pyro: Trace_ELBO, TraceGraph_ELBO
    "elbo_k2": lambda: (sg.ELBO(num_particles=2), None),
    "enum": lambda: (sg.ELBO(), config_enumerate),  # Pyro: TraceEnum_ELBO + config_enumerate
    "iwae_k2": lambda: (sg.IWAE(num_particles=2), None),
    "rws_k2": lambda: (sg.RWS(num_particles=2), None),
}
ALL = list(OBJECTIVES)
CONTINUOUS = ["elbo", "elbo_k2", "iwae_k2", "rws_k2"]  # config_enumerate changes nothing
# Each valid case compiles a training step (a few seconds on 2 cores): the cases that are
# cheap (errors raised while tracing, programs without latents) and the plate structures that
# the objectives handle differently (sub-sampling, nested and reused plates, enumeration in
# plates) run under every objective; the others under Pyro's main two, Trace(Graph)_ELBO and
# TraceEnum_ELBO (discrete sites) or Trace_ELBO and IWAE (continuous ones).
DISCRETE = ["elbo", "enum"]


def objective_and_guide(kind, guide):
    """``kind`` is a key of ``OBJECTIVES`` or an objective."""
    if isinstance(kind, sg.Objective):
        return kind, guide
    objective, wrap = OBJECTIVES[kind]()
    return objective, (guide if wrap is None else wrap(guide))


def _step(model, guide, objective, args):
    svi = sg.SVI(model, guide, optax.sgd(LR), objective)
    state = svi.init(jax.random.key(0), *args)
    new_state, loss = svi.update(state, *args)
    grads = jax.tree.map(lambda a, b: (a - b) / LR, state.params, new_state.params)
    return loss, grads


def assert_ok(model, guide, kind, *args):
    """One SVI step runs: a finite loss and gradient, and no warning from scgjax."""
    objective, guide = objective_and_guide(kind, guide)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grads = _step(model, guide, objective, args)
    ours = [w for w in caught if "site '" in str(w.message) or "scgjax" in w.filename]
    assert not ours, [str(w.message) for w in ours]
    assert np.isfinite(float(loss)), loss
    for name, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(g))), (name, g)
    return loss, grads


ERRORS = (sg.ScgjaxError, TypeError, ValueError)


def assert_error(model, guide, kind, site, *args):
    """The step raises an error naming ``site``; no loss is computed."""
    objective, guide = objective_and_guide(kind, guide)
    with pytest.raises(ERRORS, match=f"'{site}'"):
        _step(model, guide, objective, args)


def assert_error_or_warning(model, guide, kind, site, *args):
    """The step raises an error naming ``site``, or warns naming it."""
    objective, guide = objective_and_guide(kind, guide)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _step(model, guide, objective, args)
        except ERRORS as e:
            assert f"'{site}'" in str(e), str(e)
            return
    messages = [str(w.message) for w in caught]
    assert any(f"'{site}'" in m for m in messages), (
        f"neither an error nor a warning naming '{site}'; warnings: {messages}")


def bernoulli(p, shape=()):
    """Pyro's ``dist.Bernoulli(p).expand_by(shape)``."""
    d = dist.Bernoulli(probs=p)
    return d.expand(tuple(shape) + tuple(d.batch_shape)) if shape else d


# --------------------------------------------------------------------------------------------
# Empty programs, name clashes, model/guide mismatches
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CONTINUOUS)
def test_nonempty_model_empty_guide_ok(kind):
    def model():
        loc = jnp.zeros(2)
        sg.sample("x", dist.Normal(loc, jnp.ones(2)).to_event(1), obs=loc)

    def guide():
        pass

    loss, _ = assert_ok(model, guide, kind)
    # nothing is random: the loss is exactly -log N(0 | 0, I_2)
    np.testing.assert_allclose(float(loss), np.log(2 * np.pi), rtol=1e-6)


@pytest.mark.parametrize("kind", CONTINUOUS)
def test_nonempty_model_empty_guide_error(kind):
    def model():
        sg.sample("x", dist.Normal(0.0, 1.0))

    def guide():
        pass

    assert_error(model, guide, kind, "x")


@pytest.mark.parametrize("kind", CONTINUOUS)
def test_empty_model_empty_guide_ok(kind):
    def model():
        pass

    def guide():
        pass

    loss, _ = assert_ok(model, guide, kind)
    assert float(loss) == 0.0


@pytest.mark.parametrize("kind", ALL)
def test_variable_clash_in_model_error(kind):
    def model():
        sg.sample("x", dist.Bernoulli(probs=0.5))
        sg.sample("x", dist.Bernoulli(probs=0.5))  # should error here

    def guide():
        sg.sample("x", dist.Bernoulli(probs=sg.param("p", 0.5)))

    assert_error(model, guide, kind, "x")


@pytest.mark.parametrize("kind", ALL)
def test_variable_clash_in_guide_error(kind):
    def model():
        sg.sample("x", dist.Bernoulli(probs=0.5))

    def guide():
        p = sg.param("p", 0.5)
        sg.sample("x", dist.Bernoulli(probs=p))
        sg.sample("x", dist.Bernoulli(probs=p))  # should error here

    assert_error(model, guide, kind, "x")


@pytest.mark.parametrize("kind", CONTINUOUS)
def test_model_guide_dim_mismatch_error(kind):
    def model():
        sg.sample("x", dist.Normal(jnp.zeros(2), jnp.ones(2)).to_event(1))

    def guide():
        loc = sg.param("loc", jnp.zeros((2, 1)))
        scale = sg.param("scale", jnp.ones((2, 1)), constraints.positive)
        sg.sample("x", dist.Normal(loc, scale).to_event(2))

    assert_error(model, guide, kind, "x")


@pytest.mark.parametrize("kind", CONTINUOUS)
def test_model_guide_shape_mismatch_error(kind):
    def model():
        sg.sample("x", dist.Normal(jnp.zeros((1, 2)), jnp.ones((1, 2))).to_event(2))

    def guide():
        loc = sg.param("loc", jnp.zeros((2, 1)))
        scale = sg.param("scale", jnp.ones((2, 1)), constraints.positive)
        sg.sample("x", dist.Normal(loc, scale).to_event(2))

    assert_error(model, guide, kind, "x")


# SafetyTests (test_inference.py)

def test_duplicate_param_and_sample_names_error():
    def model():
        sg.param("loc_q", jnp.ones(1))
        sg.sample("loc_q", dist.Normal(jnp.zeros(1), jnp.ones(1)))

    def guide():
        p = sg.param("p", jnp.ones(1), constraints.positive)
        sg.sample("loc_q", dist.Normal(jnp.zeros(1), p))

    assert_error(model, guide, "elbo", "loc_q")


def test_extra_guide_sample_error():
    # Pyro warns ("Found non-auxiliary vars in guide but not model"); scgjax refuses.
    def model():
        sg.sample("loc_q", dist.Normal(jnp.zeros(1), jnp.ones(1)))

    def guide():
        p = sg.param("p", jnp.ones(1), constraints.positive)
        sg.sample("loc_q", dist.Normal(jnp.zeros(1), p))
        sg.sample("loc_q_2", dist.Normal(jnp.zeros(1), p))

    assert_error_or_warning(model, guide, "elbo", "loc_q_2")


def test_duplicate_obs_name_error():
    def model():
        sg.sample("loc_q", dist.Normal(jnp.zeros(1), jnp.ones(1)))
        sg.sample("loc_q", dist.Normal(jnp.zeros(1), jnp.ones(1)), obs=jnp.zeros(1))

    def guide():
        p = sg.param("p", jnp.ones(1), constraints.positive)
        sg.sample("loc_q", dist.Normal(jnp.zeros(1), p))

    assert_error(model, guide, "elbo", "loc_q")


# --------------------------------------------------------------------------------------------
# Reparameterised or not
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "has_rsample,kind",
    [(False, "elbo"), (False, "iwae_k2"), (True, "elbo"), (True, "rws_k2")],
)
def test_set_has_rsample_ok(has_rsample, kind):
    # sparse gradients: users may prefer the score function; both must be correct
    def model():
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        loc = jnp.clip(z * 100, 0.0, 1.0)
        sg.sample("x", dist.Normal(loc, 1.0), obs=0.0)

    def guide():
        loc = sg.param("loc", 0.0)
        sg.sample("z", dist.Normal(loc, 1.0),
                  estimator=None if has_rsample else sg.ScoreFunction())

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("kind", ["elbo", "iwae_k2"])
def test_not_has_rsample_ok(kind):
    def model():
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        p = jnp.clip(jnp.round(z), 0.2, 0.8)  # discontinuous
        sg.sample("x", dist.Bernoulli(probs=p), obs=0.0)

    def guide():
        loc = sg.param("loc", 0.0)
        sg.sample("z", dist.Normal(loc, 1.0), estimator=sg.ScoreFunction())

    assert_ok(model, guide, kind)


# --------------------------------------------------------------------------------------------
# Sequential plates (Python loops) and vectorised plates
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL)
def test_sequential_plate_ok(kind):
    def model():
        for i in range(4):
            sg.sample(f"x_{i}", dist.Bernoulli(probs=0.5))

    def guide():
        p = sg.param("p", 0.5)
        for i in range(4):
            sg.sample(f"x_{i}", dist.Bernoulli(probs=p))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("kind", ALL)
def test_sequential_plate_variable_clash_error(kind):
    def model():
        for _ in range(2):
            sg.sample("x", dist.Bernoulli(probs=0.5))  # each iteration needs its own name

    def guide():
        p = sg.param("p", 0.5)
        for _ in range(2):
            sg.sample("x", dist.Bernoulli(probs=p))

    assert_error(model, guide, kind, "x")


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize("kind", ALL)
def test_plate_ok(subsample_size, kind):
    def model():
        with sg.plate("plate", 10, subsample_size=subsample_size) as ind:
            sg.sample("x", bernoulli(0.5, [len(ind)]))

    def guide():
        p = sg.param("p", 0.5)
        with sg.plate("plate", 10, subsample_size=subsample_size) as ind:
            sg.sample("x", bernoulli(p, [len(ind)]))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize("kind", ["elbo", "enum", "rws_k2"])
def test_plate_subsample_param_ok(subsample_size, kind):
    def model():
        with sg.plate("plate", 10, subsample_size=subsample_size):
            sg.sample("x", dist.Bernoulli(probs=0.5))

    def guide():
        p0 = sg.param("p0", jnp.array(0.0))
        p_all = sg.param("p", 0.5 * jnp.ones(10))
        with sg.plate("plate", 10, subsample_size=subsample_size) as ind:
            assert p0.shape == ()
            p = p_all[ind]  # Pyro sub-samples a param with event_dim=0 itself
            assert p.shape == (len(ind),)
            sg.sample("x", dist.Bernoulli(probs=p))

    _, grads = assert_ok(model, guide, kind)
    if subsample_size is not None and kind != "rws_k2":
        # only the drawn elements of p get a gradient (RWS: the guide's wake gradient is
        # importance weighted, and the weights are all 1 here: zero gradient everywhere)
        assert int(np.sum(np.asarray(grads["p"]) != 0.0)) <= subsample_size


@pytest.mark.parametrize("kind", DISCRETE)
@pytest.mark.parametrize("swap", [False, True], ids=["same_order", "swapped"])
def test_sequential_plate_sequential_plate_ok(kind, swap):
    # Pyro: test_iplate_iplate_ok and test_iplate_iplate_swap_ok (the guide loops the other way)
    def model():
        for i in range(3):
            for j in range(3):
                sg.sample(f"x_{i}_{j}", dist.Bernoulli(probs=0.5))

    def guide():
        p = sg.param("p", 0.5)
        pairs = [(i, j) for j in range(3) for i in range(3)] if swap else \
            [(i, j) for i in range(3) for j in range(3)]
        for i, j in pairs:
            sg.sample(f"x_{i}_{j}", dist.Bernoulli(probs=p))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("kind", DISCRETE)
def test_sequential_plate_in_model_not_guide_ok(kind):
    def model():
        for _ in range(10):
            pass
        sg.sample("x", dist.Bernoulli(probs=0.5))

    def guide():
        sg.sample("x", dist.Bernoulli(probs=sg.param("p", 0.5)))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("kind", ALL)
def test_plate_in_guide_not_model_error(kind):
    # The scgjax meaning of test_iplate_in_guide_not_model_error: the guide's site is in a
    # plate that the model's site of the same name is not in.
    def model():
        sg.sample("x", dist.Bernoulli(probs=0.5))

    def guide():
        p = sg.param("p", 0.5)
        with sg.plate("plate", 10):
            sg.sample("x", dist.Bernoulli(probs=p))

    assert_error(model, guide, kind, "x")


@pytest.mark.parametrize("kind", ALL)
def test_plate_broadcast_error(kind):
    def model():
        with sg.plate("plate", 10, subsample_size=5):
            sg.sample("x", bernoulli(0.5, [2]))

    assert_error(model, model, kind, "x")


@pytest.mark.parametrize("kind", DISCRETE)
def test_plate_sequential_plate_ok(kind):
    # Pyro: test_plate_iplate_ok (its sequential plate sub-samples 2 of 3; here it loops over 3)
    def model():
        with sg.plate("plate", 3, subsample_size=2) as ind:
            for i in range(3):
                sg.sample(f"x_{i}", bernoulli(0.5, [len(ind)]))

    def guide():
        p = sg.param("p", 0.5)
        with sg.plate("plate", 3, subsample_size=2) as ind:
            for i in range(3):
                sg.sample(f"x_{i}", bernoulli(p, [len(ind)]))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("kind", DISCRETE)
def test_sequential_plate_plate_ok(kind):
    # Pyro: test_iplate_plate_ok (a vectorised plate object re-entered inside a loop)
    def model():
        inner = sg.plate("plate", 3, subsample_size=2)
        for i in range(3):
            with inner as ind:
                sg.sample(f"x_{i}", bernoulli(0.5, [len(ind)]))

    def guide():
        p = sg.param("p", 0.5)
        inner = sg.plate("plate", 3, subsample_size=2)
        for i in range(3):
            with inner as ind:
                sg.sample(f"x_{i}", bernoulli(p, [len(ind)]))

    assert_ok(model, guide, kind)


class plate_stack:
    """Pyro's ``plate_stack(prefix, sizes)``: one plate per size, the last one rightmost."""

    def __init__(self, prefix, sizes):
        self.plates = [sg.plate(f"{prefix}_{i}", size, dim=i - len(sizes))
                       for i, size in enumerate(sizes)]

    def __enter__(self):
        for p in self.plates:
            p.__enter__()

    def __exit__(self, *exc):
        for p in reversed(self.plates):
            p.__exit__(*exc)


SIZES = [(3,), (3, 4), (3, 4, 5)]


@pytest.mark.parametrize("kind", ["elbo"])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_plate_stack_ok(kind, sizes):
    def model():
        with plate_stack("plate_stack", sizes):
            sg.sample("x", dist.Bernoulli(probs=0.5))

    def guide():
        p = sg.param("p", 0.5)
        with plate_stack("plate_stack", sizes):
            sg.sample("x", dist.Bernoulli(probs=p))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("sizes", SIZES[-1:], ids=str)
def test_plate_stack_and_plate_ok(kind, sizes):
    def model():
        with plate_stack("plate_stack", sizes):
            with sg.plate("plate", 7):
                sg.sample("x", dist.Bernoulli(probs=0.5))

    def guide():
        p = sg.param("p", 0.5)
        with plate_stack("plate_stack", sizes):
            with sg.plate("plate", 7):
                sg.sample("x", dist.Bernoulli(probs=p))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_plate_stack_sizes(sizes):
    def model():
        with plate_stack("plate_stack", sizes):
            x = sg.sample("x", dist.Bernoulli(probs=0.5 * jnp.ones(3)).to_event(1))
            assert x.shape == sizes + (3,)

    sg.handlers.seed(model, 0)()


@pytest.mark.parametrize("kind", ALL)
def test_nested_plate_plate_ok(kind):
    def model():
        with sg.plate("plate_outer", 10, subsample_size=5) as ind_outer:
            sg.sample("x", bernoulli(0.5, [len(ind_outer)]))
            with sg.plate("plate_inner", 11, subsample_size=6) as ind_inner:
                sg.sample("y", bernoulli(0.5, [len(ind_inner), len(ind_outer)]))

    assert_ok(model, model, kind)


@pytest.mark.parametrize("kind", ALL)
def test_plate_reuse_ok(kind):
    def model():
        plate_outer = sg.plate("plate_outer", 10, dim=-1, subsample_size=5)
        plate_inner = sg.plate("plate_inner", 11, dim=-2, subsample_size=6)
        with plate_outer as ind_outer:
            sg.sample("x", bernoulli(0.5, [len(ind_outer)]))
        with plate_inner as ind_inner:
            sg.sample("y", bernoulli(0.5, [len(ind_inner), 1]))
        with plate_outer as ind_outer, plate_inner as ind_inner:
            sg.sample("z", bernoulli(0.5, [len(ind_inner), len(ind_outer)]))

    assert_ok(model, model, kind)


@pytest.mark.parametrize("kind", ALL)
def test_nested_plate_plate_dim_error_1(kind):
    # x's batch dim -2 (size 5) is declared by no plate of x, while the program's inner plate
    # uses dim -2 (size 6): Pyro's "invalid log_prob shape".
    def model():
        p = jnp.array([0.5])
        with sg.plate("plate_outer", 10, subsample_size=5) as ind_outer:
            sg.sample("x", bernoulli(p, [len(ind_outer)]))  # error here
            with sg.plate("plate_inner", 11, subsample_size=6) as ind_inner:
                sg.sample("y", bernoulli(p, [len(ind_inner)]))
                sg.sample("z", bernoulli(p, [len(ind_outer), len(ind_inner)]))

    assert_error_or_warning(model, model, kind, "x")


# In the next three, Pyro writes x as Bernoulli(p).expand_by([5, 1]) with p.shape == (1,):
# batch shape (5, 1, 1), whose leading 5 Pyro ignores (it lies left of max_plate_nesting) and
# scgjax rejects (an undeclared dim while the plate broadcasts dim -1). x is written here as
# Pyro accepts it and scgjax does too, so that the error must come from the site Pyro blames.

@pytest.mark.parametrize("kind", ALL)
def test_nested_plate_plate_dim_error_2(kind):
    def model():
        p = jnp.array([0.5])
        with sg.plate("plate_outer", 10, subsample_size=5) as ind_outer:
            sg.sample("x", bernoulli(0.5, [len(ind_outer)]))
            with sg.plate("plate_inner", 11, subsample_size=6) as ind_inner:
                sg.sample("y", bernoulli(p, [len(ind_outer)]))  # error here
                sg.sample("z", bernoulli(p, [len(ind_outer), len(ind_inner)]))

    assert_error(model, model, kind, "y")


@pytest.mark.parametrize("kind", ALL)
def test_nested_plate_plate_dim_error_3(kind):
    # z's batch shape (6, 1, 1) gets a leading 6 that no plate declares, while both plates
    # broadcast against it
    def model():
        p = jnp.array([0.5])
        with sg.plate("plate_outer", 10, subsample_size=5) as ind_outer:
            sg.sample("x", bernoulli(0.5, [len(ind_outer)]))
            with sg.plate("plate_inner", 11, subsample_size=6) as ind_inner:
                sg.sample("y", bernoulli(p, [len(ind_inner)]))
                sg.sample("z", bernoulli(p, [len(ind_inner), 1]))  # error here

    assert_error_or_warning(model, model, kind, "z")


@pytest.mark.parametrize("kind", ALL)
def test_nested_plate_plate_dim_error_4(kind):
    def model():
        p = jnp.array([0.5])
        with sg.plate("plate_outer", 10, subsample_size=5) as ind_outer:
            sg.sample("x", bernoulli(0.5, [len(ind_outer)]))
            with sg.plate("plate_inner", 11, subsample_size=6) as ind_inner:
                sg.sample("y", bernoulli(p, [len(ind_inner)]))
                sg.sample("z", bernoulli(p, [len(ind_outer), len(ind_outer)]))  # error here

    assert_error(model, model, kind, "z")


@pytest.mark.parametrize("kind", ["elbo", "enum", "iwae_k2"])
def test_nested_plate_plate_subsample_param_ok(kind):
    def model():
        with sg.plate("plate_outer", 10, subsample_size=5):
            sg.sample("x", dist.Bernoulli(probs=0.2))
            with sg.plate("plate_inner", 11, subsample_size=6):
                sg.sample("y", dist.Bernoulli(probs=0.2))

    def guide():
        p0 = sg.param("p0", 0.5 * jnp.ones((4, 5)))
        assert p0.shape == (4, 5)
        p1_all = sg.param("p1", 0.5 * jnp.ones((10, 3)))
        px_all = sg.param("px", 0.5 * jnp.ones(10))
        py_all = sg.param("py", 0.5 * jnp.ones((11, 10)))
        with sg.plate("plate_outer", 10, subsample_size=5) as i_outer:
            assert p1_all[i_outer].shape == (5, 3)
            px = px_all[i_outer]
            assert px.shape == (5,)
            sg.sample("x", dist.Bernoulli(probs=px))
            with sg.plate("plate_inner", 11, subsample_size=6) as i_inner:
                py = py_all[i_inner][:, i_outer]
                assert py.shape == (6, 5)
                sg.sample("y", dist.Bernoulli(probs=py))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("kind", DISCRETE)
def test_nonnested_plate_plate_ok(kind):
    def model():
        with sg.plate("plate_0", 10, subsample_size=5) as ind1:
            sg.sample("x0", bernoulli(0.5, [len(ind1)]))
        with sg.plate("plate_1", 11, subsample_size=6) as ind2:
            sg.sample("x1", bernoulli(0.5, [len(ind2)]))

    assert_ok(model, model, kind)


def test_three_indep_plate_at_different_depths_ok():
    def program(p):
        inner = sg.plate("plate2", 10, subsample_size=5)
        for i in range(2):
            sg.sample(f"x_{i}", dist.Bernoulli(probs=p))
            if i == 0:
                for j in range(2):
                    with inner as ind:
                        sg.sample(f"y_{j}", bernoulli(p, [len(ind)]))
            else:
                with inner as ind:
                    sg.sample("z", bernoulli(p, [len(ind)]))

    assert_ok(lambda: program(0.5), lambda: program(sg.param("p", 0.5)), "elbo")


def test_plate_wrong_size_error():
    def model():
        with sg.plate("plate", 10, subsample_size=5) as ind:
            sg.sample("x", bernoulli(0.5, [1 + len(ind)]))

    def guide():
        p = sg.param("p", 0.5)
        with sg.plate("plate", 10, subsample_size=5) as ind:
            sg.sample("x", bernoulli(p, [1 + len(ind)]))

    assert_error(model, guide, "elbo", "x")


@pytest.mark.parametrize("kind", DISCRETE)
def test_dim_allocation_ok(kind):
    def model():
        with sg.plate("plate_outer", 10, subsample_size=5, dim=-3):
            x = sg.sample("x", dist.Bernoulli(probs=0.5))
            with sg.plate("plate_inner_1", 11, subsample_size=6):  # rightmost free: -1
                y = sg.sample("y", dist.Bernoulli(probs=0.5))
                with sg.plate("plate_inner_2", 12, subsample_size=7):  # next: -2
                    z = sg.sample("z", dist.Bernoulli(probs=0.5))
                    with sg.plate("plate_inner_3", 13, subsample_size=8):  # -3 taken: -4
                        q = sg.sample("q", dist.Bernoulli(probs=0.5))
        assert x.shape == (5, 1, 1)
        assert y.shape == (5, 1, 6)
        assert z.shape == (5, 7, 6)
        assert q.shape == (8, 5, 7, 6)

    assert_ok(model, model, kind)


@pytest.mark.parametrize("kind", DISCRETE)
def test_dim_allocation_error(kind):
    def model():
        with sg.plate("plate_outer", 10, subsample_size=5, dim=-2):
            sg.sample("x", dist.Bernoulli(probs=0.5))
            with sg.plate("plate_inner_1", 11, subsample_size=6):  # gets dim -1
                sg.sample("y", dist.Bernoulli(probs=0.5))
                with sg.plate("plate_inner_2", 12, subsample_size=7, dim=-1):  # collides
                    sg.sample("z", dist.Bernoulli(probs=0.5))

    assert_error(model, model, kind, "plate_inner_2")


@pytest.mark.parametrize("kind", ["elbo", "iwae_k2", "rws_k2"])
def test_plate_shape_broadcasting(kind):
    data = jnp.ones((100, 2))  # Pyro: 1000 x 2

    def model():
        with sg.plate("num_particles", 10, dim=-3):
            with sg.plate("components", 2, dim=-1):
                p = sg.sample("p", dist.Beta(1.1, 1.1))
                assert p.shape == (10, 1, 2)
            with sg.plate("data", data.shape[0], dim=-2):
                sg.sample("obs", dist.Bernoulli(probs=p), obs=data)

    def guide():
        with sg.plate("num_particles", 10, dim=-3):
            with sg.plate("components", 2, dim=-1):
                sg.sample("p", dist.Beta(1.1, 1.1))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("objective", [sg.ELBO, sg.IWAE, sg.RWS])
def test_vectorized_num_particles(objective):
    # Pyro: Elbo(num_particles=10, vectorize_particles=True); scgjax vmaps the particles, so
    # the program sees one particle's shapes.
    data = jnp.ones((100, 2))

    def model():
        with sg.plate("components", 2):
            p = sg.sample("p", dist.Beta(1.1, 1.1))
            assert p.shape == (2,)
            with sg.plate("data", data.shape[0]):
                sg.sample("obs", dist.Bernoulli(probs=p), obs=data)

    def guide():
        with sg.plate("components", 2):
            sg.sample("p", dist.Beta(1.1, 1.1))

    assert_ok(model, guide, objective(num_particles=10))


def test_ordered_logistic_plate():
    n, k = 5, 4
    data = jnp.floor(k * jax.random.uniform(jax.random.key(0), (n,))).astype(jnp.int32)

    def model():
        predictor = sg.sample("predictor", dist.Normal(0.0, 1.0).expand([n]).to_event(1))
        cutpoints = sg.sample("cutpoints", dist.Normal(0.0, 1.0).expand([k - 1]).to_event(1))
        cutpoints = jnp.sort(cutpoints, axis=-1)  # not identifiable; not a real model
        with sg.plate("obs_plate", n):
            sg.sample("obs", dist.OrderedLogistic(predictor, cutpoints), obs=data)

    def guide():
        pred_mu = sg.param("pred_mu", jnp.zeros(n))
        pred_std = sg.param("pred_std", jnp.ones(n), constraints.positive)
        cp_mu = sg.param("cp_mu", jnp.zeros(k - 1))
        cp_std = sg.param("cp_std", jnp.ones(k - 1), constraints.positive)
        sg.sample("predictor", dist.Normal(pred_mu, pred_std).to_event(1))
        sg.sample("cutpoints", dist.Normal(cp_mu, cp_std).to_event(1))

    assert_ok(model, guide, "elbo")


# --------------------------------------------------------------------------------------------
# Enumeration of the guide's discrete sites (Pyro: TraceEnum_ELBO + config_enumerate)
# --------------------------------------------------------------------------------------------

def _single_bernoulli(estimator=None):
    def model():
        sg.sample("x", dist.Bernoulli(probs=0.5))

    def guide():
        sg.sample("x", dist.Bernoulli(probs=sg.param("p", 0.5)), estimator=estimator)

    return model, guide


@pytest.mark.parametrize("kind", ["elbo", "elbo_k2"])
def test_enum_discrete_ok(kind):
    # Pyro: test_enum_discrete_misuse_warning with enumerate_="parallel" under TraceEnum_ELBO,
    # and test_enum_discrete_single_ok
    assert_ok(*_single_bernoulli(sg.Enumerate()), kind)


@pytest.mark.parametrize("kind", ["iwae_k2", "rws_k2"])
def test_enum_discrete_misuse_error(kind):
    # Pyro: test_enum_discrete_misuse_warning, enumeration asked of an objective that does not
    # enumerate (Pyro warns); scgjax refuses.
    assert_error_or_warning(*_single_bernoulli(sg.Enumerate()), kind, "x")


def test_enum_discrete_single_single_ok():
    def model():
        sg.sample("x", dist.Bernoulli(probs=0.5))
        sg.sample("y", dist.Bernoulli(probs=0.5))

    def guide():
        p = sg.param("p", 0.5)
        sg.sample("x", dist.Bernoulli(probs=p))
        sg.sample("y", dist.Bernoulli(probs=p))

    assert_ok(model, guide, "enum")


def test_plate_enum_discrete_batch_ok():
    def model():
        with sg.plate("plate", 10, subsample_size=5) as ind:
            sg.sample("x", bernoulli(0.5, [len(ind)]))

    def guide():
        p = sg.param("p", 0.5)
        with sg.plate("plate", 10, subsample_size=5) as ind:
            sg.sample("x", bernoulli(p, [len(ind)]))

    loss, grads = assert_ok(model, guide, "enum")
    # exact: q = p = 0.5 everywhere, so the ELBO and its gradient are 0
    assert abs(float(loss)) < 1e-5 and abs(float(grads["p"])) < 1e-4


def test_enum_on_a_continuous_site_error():
    # Pyro: test_plate_enum_discrete_no_discrete_vars_warning (enumeration asked for a guide
    # without discrete sites warns); here Enumerate on a Normal site is refused.
    def model():
        with sg.plate("plate", 10, subsample_size=5):
            sg.sample("x", dist.Normal(0.0, 1.0))

    def guide():
        loc = sg.param("loc", 1.0)
        scale = sg.param("scale", 2.0, constraints.positive)
        with sg.plate("plate", 10, subsample_size=5):
            sg.sample("x", dist.Normal(loc, scale), estimator=sg.Enumerate())

    assert_error_or_warning(model, guide, "elbo", "x")


def test_no_plate_enum_discrete_batch_error():
    # A batch of 5 discrete values that no plate declares: enumerating "every element at the
    # same value" is not the sum over the 2^5 joint values (Pyro: "invalid log_prob shape").
    def model():
        sg.sample("x", bernoulli(0.5, [5]))

    def guide():
        sg.sample("x", bernoulli(sg.param("p", 0.5), [5]))

    assert_error_or_warning(model, guide, "enum", "x")


def test_enum_discrete_parallel_nested_ok():
    # Pyro: OneHotCategorical(2) and (3); Enumerate needs scalar events: Categorical
    def model():
        sg.sample("x2", dist.Categorical(probs=jnp.ones(2) / 2))
        sg.sample("x3", dist.Categorical(probs=jnp.ones(3) / 3))

    loss, _ = assert_ok(model, model, "enum")
    assert abs(float(loss)) < 1e-5  # guide == model: the exact ELBO is 0


@pytest.mark.parametrize("kind", ALL)
def test_enumerate_parallel_plate_ok(kind):
    def model():
        sg.sample("x2", dist.Categorical(probs=jnp.ones(2) / 2))
        with sg.plate("outer", 3):
            x34 = sg.sample("x34", dist.Categorical(probs=jnp.ones((3, 4)) / 4))
            with sg.plate("inner", 5):
                x536 = sg.sample("x536", dist.Categorical(probs=jnp.ones((5, 3, 6)) / 6))
        assert x34.shape == (3,)
        assert x536.shape == (5, 3)

    assert_ok(model, model, kind)


@pytest.mark.parametrize("enumerate_", [False, True], ids=["sampled", "enumerated"])
def test_enum_discrete_plate_dependency(enumerate_):
    # Pyro: test_enum_discrete_plate_dependency_warning. y, outside the plate, depends on every
    # element of x: enumerating x element by element would be wrong (Pyro warns).
    def model():
        with sg.plate("plate", 10, subsample_size=5):
            x = sg.sample("x", bernoulli(0.5, [5]),
                          estimator=sg.Enumerate() if enumerate_ else None)
        sg.sample("y", dist.Bernoulli(probs=x.mean()))  # the user should move this line up

    if enumerate_:
        assert_error_or_warning(model, model, "elbo", "x")
    else:
        assert_ok(model, model, "elbo")


@pytest.mark.parametrize("enumerate_", [False, True], ids=["sampled", "enumerated"])
def test_enum_discrete_sequential_plate_plate_dependency_ok(enumerate_):
    def model():
        inner = sg.plate("plate", 10, subsample_size=5)
        for i in range(3):
            sg.sample(f"y_{i}", dist.Bernoulli(probs=0.5))
            with inner:
                sg.sample(f"x_{i}", bernoulli(0.5, [5]),
                          estimator=sg.Enumerate() if enumerate_ else None)

    assert_ok(model, model, "elbo")


@pytest.mark.parametrize("kind", ["elbo", "enum"])
def test_enum_discrete_plates_dependency_ok(kind):
    def model():
        x_plate = sg.plate("x_plate", 10, subsample_size=5, dim=-1)
        y_plate = sg.plate("y_plate", 11, subsample_size=6, dim=-2)
        sg.sample("a", dist.Bernoulli(probs=0.5))
        with x_plate:
            sg.sample("b", bernoulli(0.5, [5]))
        with y_plate:
            sg.sample("c", bernoulli(0.5, [6, 1]))
        with x_plate, y_plate:
            sg.sample("d", bernoulli(0.5, [6, 5]))

    assert_ok(model, model, kind)


@pytest.mark.parametrize("enumerate_", [False, True], ids=["sampled", "enumerated"])
def test_enum_discrete_non_enumerated_plate_ok(enumerate_):
    def model():
        with sg.plate("non_enum", 2):
            a = sg.sample("a", bernoulli(0.5, [2]))
        p = (1.0 + a.sum(-1)) / (2.0 + a.shape[0])  # b depends on a
        with sg.plate("enum_1", 3):
            sg.sample("b", bernoulli(p, [3]), estimator=sg.Enumerate() if enumerate_ else None)

    assert_ok(model, model, "elbo")


@pytest.mark.parametrize("kind", ["elbo", "enum"])
def test_enum_discrete_plate_shape_broadcasting_ok(kind):
    def model():
        x_plate = sg.plate("x_plate", 10, subsample_size=5, dim=-1)
        y_plate = sg.plate("y_plate", 11, subsample_size=6, dim=-2)
        with sg.plate("num_particles", 10, dim=-3):  # Pyro: 50
            with x_plate:
                b = sg.sample("b", dist.Beta(1.1, 1.1))
            with y_plate:
                c = sg.sample("c", dist.Bernoulli(probs=0.5))
            with x_plate, y_plate:
                d = sg.sample("d", dist.Bernoulli(probs=b))
        assert b.shape == (10, 1, 5)
        assert c.shape == (10, 6, 1)
        assert d.shape == (10, 6, 5)

    assert_ok(model, model, kind)


# --------------------------------------------------------------------------------------------
# Factors and scales
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CONTINUOUS)
def test_factor_in_model_ok(kind):
    def model():
        sg.factor("f", jnp.array(0.0))

    def guide():
        pass

    assert_ok(model, guide, kind)


@pytest.mark.parametrize("kind", CONTINUOUS)
def test_factor_in_guide_error(kind):
    def model():
        pass

    def guide():
        sg.factor("f", jnp.array(0.0))

    assert_error(model, guide, kind, "f")


@pytest.mark.parametrize(
    "kind,scale", [("elbo", 1.0), ("elbo", 0.1), ("elbo", jnp.array(0.5)),
                   ("iwae_k2", 0.1), ("rws_k2", 0.1)])
def test_scale_ok(kind, scale):
    # Pyro: test_reparam_scale_ok (poutine.scale on an observation)
    def model():
        x = sg.sample("x", dist.Normal(0.0, 1.0))
        with sg.handlers.scale(scale=scale):
            sg.sample("y", dist.Normal(x, 1.0), obs=0.0)

    def guide():
        sg.sample("x", dist.Normal(sg.param("loc", 0.0), 1.0))

    assert_ok(model, guide, kind)


@pytest.mark.parametrize(
    "scale", [1.0, 0.1, jnp.array(0.5), jnp.array([0.1, 0.9])],
    ids=["1", "0.1", "array", "per_element"])
@pytest.mark.parametrize("kind", ["elbo"])
def test_scale_plate_ok(kind, scale):
    # Pyro: test_reparam_scale_plate_ok
    data = jnp.exp(jax.random.normal(jax.random.key(0), (2, 3)))
    data = data / data.sum(-1, keepdims=True)

    def model():
        c = sg.sample("c", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
        with sg.plate("data", len(data)), sg.handlers.scale(scale=scale):
            sg.sample("obs", dist.Dirichlet(c), obs=data)

    def guide():
        loc = sg.param("loc", jnp.zeros(3))
        s = sg.param("scale", jnp.ones(3), constraints.positive)
        sg.sample("c", dist.LogNormal(loc, s).to_event(1))

    assert_ok(model, guide, kind)
