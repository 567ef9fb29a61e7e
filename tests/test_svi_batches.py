"""``SVI.run(..., batches=...)``: mini-batches per step, a host-side history of bounded size,
and the cached dispatch of ``SVI.update``."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.dist import constraints
from scgjax.errors import NonFiniteError
from tests import models

X = jnp.array([0.8, 1.9, 1.2, 0.4, 1.6])


def normal_model(x, scale=1.0):
    z = sg.sample("z", dist.Normal(0.0, 1.0))
    with sg.plate("data", x.shape[0]):
        sg.sample("x", dist.Normal(z, scale), obs=x)


def normal_guide(x, scale=1.0):
    m = sg.param("m", 0.0)
    s = sg.param("s", 1.0, constraints.positive)
    sg.sample("z", dist.Normal(m, s))


def two_part_model(x, y):
    normal_model(jnp.concatenate([x, y]))


def two_part_guide(x, y):
    normal_guide(x)


def make_svi(model=normal_model, guide=normal_guide, lr=0.05):
    return sg.SVI(model, guide, optax.adam(lr), sg.ELBO())


def shifted(step: int) -> jax.Array:
    return X + 0.1 * step


def test_batches_of_the_same_arguments_reproduce_the_plain_run():
    svi = make_svi()
    plain = svi.run(jax.random.key(0), 30, X, progress_bar=False)
    listed = svi.run(jax.random.key(0), 30, batches=[X] * 30, progress_bar=False)
    called = svi.run(jax.random.key(0), 30, batches=lambda step: (X,), progress_bar=False)
    for other in (listed, called):
        np.testing.assert_array_equal(other.losses, plain.losses)
        np.testing.assert_array_equal(other.params["m"], plain.params["m"])


def test_each_step_gets_its_own_batch():
    svi = make_svi()
    seen: list[int] = []

    def batches(step):
        seen.append(step)
        return shifted(step)

    result = svi.run(jax.random.key(1), 12, batches=batches, progress_bar=False)
    assert seen == list(range(12))  # one call per step, the first one before init
    # the same steps taken one by one with svi.update, batch by batch
    state = svi.init(jax.random.key(1), shifted(0))
    for step in range(12):
        state, loss = svi.update(state, shifted(step))
        assert float(loss) == pytest.approx(float(result.losses[step]), rel=1e-6)
    np.testing.assert_allclose(result.params["m"], state.params["m"], rtol=1e-6)


def test_tuples_are_positional_arguments_and_keywords_stay_fixed():
    svi = make_svi(two_part_model, two_part_guide)
    pairs = [(X, X[:2] + step) for step in range(6)]
    result = svi.run(jax.random.key(2), 6, batches=iter(pairs), progress_bar=False)
    state = svi.init(jax.random.key(2), *pairs[0])
    for step, pair in enumerate(pairs):
        state, loss = svi.update(state, *pair)
        assert float(loss) == pytest.approx(float(result.losses[step]), rel=1e-6)
    # a keyword argument reaches every step alongside the batch
    svi = make_svi()
    wide = svi.run(jax.random.key(3), 5, batches=map(shifted, range(5)), scale=10.0,
                   progress_bar=False)
    state = svi.init(jax.random.key(3), shifted(0), scale=10.0)
    for step in range(5):
        state, loss = svi.update(state, shifted(step), scale=10.0)
        assert float(loss) == pytest.approx(float(wide.losses[step]), rel=1e-6)


def test_an_array_is_iterated_along_its_first_axis():
    stacked = jnp.stack([shifted(i) for i in range(8)])
    svi = make_svi()
    from_array = svi.run(jax.random.key(4), 8, batches=stacked, progress_bar=False)
    from_fn = svi.run(jax.random.key(4), 8, batches=shifted, progress_bar=False)
    np.testing.assert_allclose(from_array.losses, from_fn.losses, rtol=1e-6)


def test_args_and_batches_together_are_an_error():
    svi = make_svi()
    with pytest.raises(TypeError, match=r"positional argument for the programs and batches="):
        svi.run(jax.random.key(0), 3, X, batches=[X] * 3, progress_bar=False)
    with pytest.raises(TypeError, match="batches must be an iterable .* got int"):
        svi.run(jax.random.key(0), 3, batches=3, progress_bar=False)


def test_batches_that_run_out_name_the_step():
    svi = make_svi()
    calls: list[int] = []

    def short():
        for i in range(4):
            calls.append(i)
            yield X

    with pytest.raises(ValueError, match=r"batches ran out at step 4 .*yielded 4 batches for "
                                         r"num_steps=10; pass num_steps=4"):
        svi.run(jax.random.key(0), 10, batches=short(), progress_bar=False)
    assert calls == [0, 1, 2, 3]
    # a list's length is known: refused before any training
    with pytest.raises(ValueError, match=r"batches has 3 items but num_steps=10.*cycle"):
        svi.run(jax.random.key(0), 10, batches=[X] * 3, progress_bar=False)
    # cycling is the caller's choice
    result = svi.run(jax.random.key(0), 10, batches=itertools.cycle([X, X + 1.0]),
                     progress_bar=False)
    assert result.losses.shape == (10,)


def test_data_are_checked_on_the_first_batch_only(monkeypatch):
    """The programs run un-jitted (which checks the data) once, on the first batch: in
    ``init_state``, or in ``SVI._check_data`` for objectives whose ``init_state`` does not."""
    from scgjax.objectives import program

    svi = make_svi()
    checked: list[float] = []
    original = program.run

    def spy(kind, key, params, programs, args, *rest, **kw):
        if not isinstance(args[0], jax.core.Tracer):
            checked.append(float(args[0][0]))
        return original(kind, key, params, programs, args, *rest, **kw)

    monkeypatch.setattr(program, "run", spy)
    svi.run(jax.random.key(0), 20, batches=shifted, progress_bar=False)
    assert checked == [pytest.approx(float(X[0]))]


def test_same_shaped_batches_compile_one_step():
    svi = make_svi()
    traced = count_traces(svi)
    svi.run(jax.random.key(0), 25, batches=shifted, progress_bar=False)
    assert len(svi._jitted) == 1
    assert len(traced) == 1  # one trace of the step, so one compilation, for 25 batches


def count_traces(svi) -> list:
    """A list that grows by one each time ``svi``'s step is traced (each time ``jax.jit``
    compiles it anew; counted by tracing, not by the jitted function's C++ cache, whose size
    depends on the process's earlier work)."""
    traced: list = []
    step = svi._step

    def counting(state, args, kwargs):
        traced.append(None)
        return step(state, args, kwargs)

    svi._step = counting
    return traced


def test_nonfinite_batch_stops_the_run_at_its_step():
    svi = make_svi()

    def batches(step):
        return X.at[2].set(jnp.nan) if step == 7 else shifted(step)

    with pytest.raises(NonFiniteError, match=r"step 7\b") as info:
        svi.run(jax.random.key(0), 20, batches=batches, progress_bar=False, log_every=5)
    err = info.value
    assert err.step == 7 and err.site == "x"  # replayed on its own batch, explained there
    assert err.result.losses.shape == (7,) and np.isfinite(err.result.losses).all()
    assert all(v.shape == (7,) for v in err.result.metrics.values())
    # the state before step 7: the same as 7 steps on the same batches
    state = svi.init(jax.random.key(0), shifted(0))
    for step in range(7):
        state, _ = svi.update(state, shifted(step))
    np.testing.assert_allclose(err.state.params["m"], state.params["m"], rtol=1e-6)
    # and without the check, training goes on through it
    result = svi.run(jax.random.key(0), 20, batches=batches, progress_bar=False,
                     stop_on_nonfinite=False)
    assert not np.isfinite(result.losses[7]) and result.losses.shape == (20,)


def test_progress_bar_with_batches(capsys):
    svi = make_svi()
    svi.run(jax.random.key(0), 20, batches=shifted, progress_bar=True)
    assert "objective" in capsys.readouterr().err


def test_zero_steps_with_batches_initialises_from_the_first_batch():
    svi = make_svi()
    result = svi.run(jax.random.key(0), 0, batches=[X], progress_bar=False)
    assert result.losses.shape == (0,) and result.metrics == {}
    assert set(result.params) == {"m", "s"}


# --------------------------------------------------------------------------------------------
# The history: on the host, a fixed size per step


def test_history_is_numpy_of_fixed_size_per_step():
    svi = make_svi()
    result = svi.run(jax.random.key(0), 300, X, progress_bar=False)
    assert isinstance(result.losses, np.ndarray) and result.losses.dtype == np.float32
    assert set(result.metrics) == {"loss", "objective"}
    for values in result.metrics.values():
        assert type(values) is np.ndarray and not isinstance(values, jax.Array)
        assert values.shape == (300,) and values.nbytes == 300 * values.itemsize
    np.testing.assert_array_equal(result.losses, result.metrics["loss"])


def test_device_arrays_stay_bounded_during_a_run():
    """The live device arrays do not grow with the steps: each step's metrics leave the
    device in chunks (a history of device arrays would add two arrays per step)."""
    svi = make_svi()
    counts: dict[int, int] = {}

    def batches(step):
        counts[step] = len(jax.live_arrays())
        return X

    svi.run(jax.random.key(0), 2000, batches=batches, progress_bar=False, log_every=500)
    growth = max(counts[s] for s in range(1000, 2000)) - counts[200]
    assert growth < 600, growth  # at most a chunk's worth, not 2 per step (~3600)


def test_a_non_scalar_metric_is_kept_at_the_last_step_only():
    objective = sg.ELBO()
    objective.record_signals = True  # adds metrics["learning_signals"]: {site: array}
    svi = sg.SVI(models.mixture_model, models.mixture_guide, optax.adam(0.05), objective)
    result = svi.run(jax.random.key(0), 50, models.MIX_X, progress_bar=False)
    assert result.metrics["loss"].shape == (50,)
    signals = result.metrics["learning_signals"]
    assert set(signals) == {"z"}
    leaves = jax.tree.leaves(signals)
    assert leaves and all(isinstance(v, np.ndarray) and v.shape[:1] != (50,) for v in leaves)


# --------------------------------------------------------------------------------------------
# Dispatch of SVI.update


def test_update_dispatch_cache_tells_static_arguments_and_pytrees_apart():
    svi = make_svi()
    state = svi.init(jax.random.key(0), X)
    _, by_update = svi.update(state, X)
    assert len(svi._by_types) == 1  # one array argument: found by its type from now on
    _, again = svi.update(state, X)
    assert float(again) == float(by_update) and len(svi._jitted) == 1
    # a static keyword: its own step; 1, 1.0 and True are different statics
    losses = {}
    for scale in (2, 2.0, True, 1.0):
        losses[repr(scale)] = float(svi.update(state, X, scale=scale)[1])
    assert len(svi._jitted) == 5
    assert losses["2"] == losses["2.0"] and losses["True"] == losses["1.0"] == float(by_update)
    # a list argument (a pytree, not an array) is never found by its type alone
    svi2 = make_svi(two_part_model, two_part_guide)
    state2 = svi2.init(jax.random.key(0), X, X[:2])
    svi2.update(state2, X, X[:2])
    assert len(svi2._by_types) == 1

    def listed_model(xs):
        normal_model(jnp.concatenate(xs))

    def listed_guide(xs):
        normal_guide(xs[0])

    svi3 = make_svi(listed_model, listed_guide)
    state3 = svi3.init(jax.random.key(0), [X])
    _, one = svi3.update(state3, [X])
    _, two = svi3.update(state3, [X, X])
    assert len(svi3._jitted) == 2 and not svi3._by_types
    assert float(one) != float(two)


def test_update_under_jit_and_with_numpy_arguments():
    svi = make_svi()
    state = svi.init(jax.random.key(0), X)
    _, loss = svi.update(state, X)
    _, from_numpy = svi.update(state, np.asarray(X))
    _, jitted = jax.jit(svi.update)(state, X)
    assert float(from_numpy) == pytest.approx(float(loss))
    assert float(jitted) == pytest.approx(float(loss))


def test_one_progress_bar_follows_several_runs():
    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, ""

        def update(self, n):
            self.n += n

        def set_postfix_str(self, s):
            self.postfix = s

    bar = Bar()
    svi = make_svi()
    first = svi.run(jax.random.key(0), 30, X, progress_bar=bar)
    svi.run(None, 20, X, state=first.state, progress_bar=bar)
    assert bar.n == 50 and bar.postfix.startswith("objective ")


def test_resuming_for_no_step_with_batches_draws_nothing():
    svi = make_svi()
    state = svi.init(jax.random.key(0), X)
    drawn: list[int] = []
    result = svi.run(None, 0, batches=lambda step: drawn.append(step) or X, state=state,
                     progress_bar=False)
    assert drawn == [] and result.state is state and result.losses.shape == (0,)


def test_update_traced_inside_jit_compiles_one_step():
    svi = make_svi()
    state = svi.init(jax.random.key(0), X)
    many = jax.jit(lambda s, x: jax.lax.fori_loop(0, 3, lambda _, s: svi.update(s, x)[0], s))
    for x in (X, jnp.concatenate([X, X])):  # two shapes: traced twice
        many(state, x)
    # the tracers are array arguments (not static leaves, keyed by identity): one entry
    assert len(svi._jitted) == 1


def test_batches_kept_for_a_replay_are_bounded(monkeypatch):
    """The batches since the last check are kept (to replay a non-finite step on its own
    batch), about ``_KEPT_BYTES`` of them at most: large batches are checked sooner."""
    import scgjax.infer.svi as svi_module

    monkeypatch.setattr(svi_module, "_KEPT_BYTES", 3 * X.nbytes)  # 3 batches
    svi = make_svi()
    drawn: list[int] = []

    def batches(step):
        drawn.append(step)
        return X.at[2].set(jnp.nan) if step == 7 else shifted(step)

    with pytest.raises(NonFiniteError, match=r"step 7\b") as info:
        svi.run(jax.random.key(0), 20, batches=batches, progress_bar=False, log_every=100)
    assert info.value.site == "x" and info.value.result.losses.shape == (7,)
    # checked after steps 0, 3, 6 and 9 (3 batches kept each time), not only after the last
    assert max(drawn) == 9
