"""The baseline protocol: ``sg.baselines.Baseline`` and the adapter of duck-typed baselines.

A baseline subclass overrides ``baseline_for(ctx)``; the other methods default to nothing.
An object with ``init_state()`` and ``__call__(learning_signal, state)`` is wrapped in
``FromCallable``; one with protocol methods that is not a ``Baseline`` is refused (its methods
would otherwise be ignored).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.baselines import Baseline, FromCallable


def bernoulli_pair(estimator):
    """A Bernoulli guide site scored against a Bernoulli prior: ``Q_z`` varies with ``z``."""
    model = lambda: sg.sample("z", dist.Bernoulli(probs=0.3))
    guide = lambda: sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.4)),
                              estimator=estimator)
    return model, guide


def step(estimator, key=1, state=None):
    """``(loss, grad of l, new state)`` of one ELBO evaluation with ``estimator`` at ``z``."""
    model, guide = bernoulli_pair(estimator)
    params = sg.init_params(0, model, guide)
    elbo = sg.ELBO()
    state = elbo.init_state(0, params, model, guide) if state is None else state
    loss_fn = lambda p: elbo.loss_with_state(key, p, state, model, guide)
    (loss, (new_state, _)), grad = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return float(loss), float(grad["l"]), new_state


@dataclasses.dataclass(frozen=True)
class Fixed(Baseline):
    """A user-written baseline: a fixed scalar ``b``."""

    b: float = 0.0

    def baseline_for(self, ctx):
        return jnp.asarray(self.b), ctx.state


class DuckMovingAverage:
    """A duck-typed baseline (no subclass), delegating to ``MovingAverage``'s ``__call__``."""

    def __init__(self, decay):
        self.average = sg.baselines.MovingAverage(decay)

    def init_state(self):
        return self.average.init_state()

    def __call__(self, learning_signal, state):
        return self.average(learning_signal, state)


def test_defaults_do_nothing():
    base = Fixed(1.0)
    assert base.init_state() == {}
    assert base.collect({}) is None
    assert base.init_params(jax.random.key(0), {}) == {}
    assert float(base.training_term(None)) == 0.0


def test_a_subclass_is_used_as_is_and_equals_a_constant():
    est = sg.ScoreFunction(baseline=Fixed(-2.0))
    assert est.baseline == Fixed(-2.0) and repr(est) == "ScoreFunction(baseline=Fixed(b=-2.0))"
    ours, constant = step(est), step(sg.ScoreFunction(baseline=sg.baselines.Constant(-2.0)))
    assert ours[:2] == constant[:2]
    assert step(sg.ScoreFunction())[1] != ours[1]  # the baseline changes the gradient


def test_built_in_baselines_are_baselines():
    for baseline in (sg.baselines.MovingAverage(0.9), sg.baselines.Constant(1.0),
                     sg.baselines.Neural(nn.Dense(1), inputs=jnp.ones(3))):
        assert isinstance(baseline, Baseline)
        assert sg.ScoreFunction(baseline=baseline).baseline is baseline
    assert "Baseline" in sg.baselines.__all__


def test_moving_average_baseline_for_is_its_call():
    ma = sg.baselines.MovingAverage(0.5)
    state = ma.init_state()
    ctx = sg.estimators.ScoreContext(name="z", log_prob=jnp.zeros((1,)),
                                     learning_signal=jnp.array([3.0]), state=state,
                                     num_particles=1)
    (b1, s1), (b2, s2) = ma.baseline_for(ctx), ma(jnp.array([3.0]), state)
    assert float(b1) == float(b2) and jax.tree.map(float, s1) == jax.tree.map(float, s2)


def test_duck_typed_baseline_is_wrapped_and_behaves_as_the_original():
    duck = DuckMovingAverage(0.5)
    est = sg.ScoreFunction(baseline=duck)
    assert isinstance(est.baseline, FromCallable) and est.baseline.wrapped is duck
    assert "DuckMovingAverage" in repr(est)
    reference = sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.5))
    state_ours = state_ref = None
    for key in range(3):  # the state is threaded: the baseline is non-zero after step 1
        loss, grad, state_ours = step(est, key, state_ours)
        loss_ref, grad_ref, state_ref = step(reference, key, state_ref)
        assert (loss, grad) == (loss_ref, grad_ref)
    np.testing.assert_array_equal(state_ours["z"]["mean"], state_ref["z"]["mean"])


def test_object_with_protocol_methods_must_subclass_baseline():
    class Half:
        def init_state(self):
            return {}

        def baseline_for(self, ctx):
            return jnp.zeros(()), ctx.state

    with pytest.raises(TypeError, match="defines baseline_for but does not subclass "
                                        r"sg\.baselines\.Baseline"):
        sg.ScoreFunction(baseline=Half())


def test_subclass_without_baseline_for_says_so():
    class Nothing(Baseline):
        pass

    with pytest.raises(NotImplementedError, match="Nothing.*baseline_for"):
        step(sg.ScoreFunction(baseline=Nothing()))


@pytest.mark.parametrize("baseline", [Fixed(1.0), sg.baselines.MovingAverage(0.9)])
def test_a_baseline_given_as_an_estimator_is_named(baseline):
    model, guide = bernoulli_pair(baseline)
    with pytest.raises(sg.SiteError, match=r"'z' was given the baseline.*ScoreFunction\("):
        sg.init_params(0, model, guide)
