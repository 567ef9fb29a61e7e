"""Checkpoint and resume (sg.Checkpoints, SVI.run(checkpoint=...)): a resumed run is bit for bit
an uninterrupted one, also after the training process is killed mid-run."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist

DATA = jnp.array([0.3, 1.2, -0.4, 0.9, 2.1, 0.0])


def model(x):
    loc = sg.sample("loc", dist.Normal(0.0, 3.0))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=sg.param("w", 0.1)))
        sg.sample("x", dist.Normal(loc + z, 1.0), obs=x)


def guide(x):
    sg.sample("loc", dist.Normal(sg.param("m", 0.0), sg.param("s", 1.0,
                                                               constraint=dist.constraints.positive)))
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Bernoulli(logits=sg.param("v", jnp.zeros(x.shape[0]))),
                  estimator=sg.ScoreFunction(baseline=sg.baselines.MovingAverage(0.9)))


def svi():
    return sg.SVI(model, guide, optax.adam(0.05), sg.ELBO(num_particles=2))


def assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path):
    key = jax.random.key(0)
    whole = svi().run(key, 30, DATA, progress_bar=False)
    folder = tmp_path / "run"
    part = svi().run(key, 12, DATA, progress_bar=False, checkpoint=sg.Checkpoints(folder, 5))
    assert sg.Checkpoints(folder).latest_step() == 12
    assert part.state.estimator_state  # a moving-average baseline is restored too
    resumed = svi().run(jax.random.key(99), 30, DATA, progress_bar=False,
                        checkpoint=sg.Checkpoints(folder, 5))
    assert_same(resumed.state, whole.state)
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    assert sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) == [20, 25, 30]


@pytest.mark.parametrize("kind", ["callable", "iterable"])
def test_resumed_batches_continue_where_they_stopped(tmp_path, kind):
    batches = [DATA + 0.1 * i for i in range(20)]

    def source():
        return (lambda step: batches[step]) if kind == "callable" else iter(batches)

    key = jax.random.key(1)
    whole = svi().run(key, 20, batches=source(), progress_bar=False)
    svi().run(key, 7, batches=source(), progress_bar=False, checkpoint=tmp_path)
    resumed = svi().run(key, 20, batches=source(), progress_bar=False, checkpoint=tmp_path)
    assert_same(resumed.state, whole.state)
    np.testing.assert_array_equal(resumed.losses, whole.losses)


def test_errors(tmp_path):
    run = svi().run(jax.random.key(0), 4, DATA, progress_bar=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="state= and a checkpoint"):
        svi().run(None, 6, DATA, progress_bar=False, state=run.state, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="beyond num_steps=2"):
        svi().run(jax.random.key(0), 2, DATA, progress_bar=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="every"):
        sg.Checkpoints(tmp_path, every=0)


TRAIN = textwrap.dedent("""
    import sys, jax
    sys.path.insert(0, {root!r})
    from tests.test_checkpoint import DATA, svi
    import scgjax as sg
    svi().run(jax.random.key(3), 100_000, DATA, progress_bar=False,
              checkpoint=sg.Checkpoints({folder!r}, every=1, keep=2))
""")


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    """A training process saving at every step is killed (SIGTERM) once it has saved a few
    checkpoints, most likely in the middle of a save; the run resumes from the latest
    complete one and ends bit for bit where an uninterrupted run does."""
    folder = str(tmp_path / "run")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", TRAIN.format(root=root, folder=folder)],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                steps = sg.Checkpoints(folder).latest_step() if os.path.isdir(folder) else None
            except OSError:  # a step folder pruned by the writer while orbax listed them
                steps = None
            if steps is not None and steps >= 5:
                break
            assert proc.poll() is None, "the training process stopped by itself"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = sg.Checkpoints(folder).latest_step()
    assert done is not None and done >= 5
    total = done + 6
    resumed = svi().run(None, total, DATA, progress_bar=False, checkpoint=folder)
    whole = svi().run(jax.random.key(3), total, DATA, progress_bar=False)
    assert_same(resumed.state, whole.state)
    np.testing.assert_array_equal(resumed.losses, whole.losses)
