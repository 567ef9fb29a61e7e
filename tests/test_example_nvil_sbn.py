"""Tests of ``examples/nvil_sbn.py``: NVIL on a three-layer sigmoid belief network.

A smoke run of ``main(argv)`` on the tiny synthetic gzipped-IDX MNIST of
``tests/test_examples.py`` (no network, no real data); the credit sets of the stochastic
computation graph against Schulman's thesis (§5.10, eq. 43), read from that run's graph; and
a measurement that can fail: on a small fixed SBN, NVIL's learned baselines, trained for a few
hundred steps with the program's parameters frozen, cut the variance of the guide's gradient
far below that of no baseline, and well below that of their running means alone (the
input-dependent networks matter).
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from tests.test_examples import _load, _offline, data_dir  # noqa: F401  (fixtures: by name)

PNGS = ("training.png", "variance.png", "sbn_graph.png")
STEPS = 20


@pytest.fixture(scope="module")
def smoke(data_dir, tmp_path_factory) -> tuple[dict, Path, str]:  # noqa: F811
    """One small run of ``main``, shared by the tests that read it: its results, output folder
    and printed text. Only the ``nvil`` variant trains (each variant costs a few compilations);
    the guide without baselines still runs, for the variance at the same parameters."""
    nvil = _load("nvil_sbn")
    out = tmp_path_factory.mktemp("nvil")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = nvil.main(["--steps", str(STEPS), "--batch-size", "16", "--layers", "6-4-3",
                            "--baseline-hidden", "8", "--checkpoints", "1",
                            "--variance-samples", "8", "--variants", "nvil",
                            "--no-progress", "--data-dir", str(data_dir), "--out", str(out)])
    return result, out, printed.getvalue()


def test_nvil_sbn_smoke(smoke):
    result, out, printed = smoke
    for name in PNGS:
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, name
    dot = (out / "sbn_graph.dot").read_text()
    assert dot.startswith("digraph") and all(f"{h}\\n" in dot for h in ("h1", "h2", "h3"))
    assert result["paths"]["graph_dot"] == out / "sbn_graph.dot"
    assert result["credit_matches_thesis"] and "h1 yes, h2 yes, h3 yes" in printed
    assert "summary" in printed and "ms/step" in printed and "IDX files in" in printed
    assert list(result["runs"]) == ["nvil"] and result["variants"] == ["nvil"]
    for name, run in result["runs"].items():
        assert run.elbo_per_step.shape == (STEPS,) and np.all(np.isfinite(run.elbo_per_step))
        for value in (run.train_elbo, run.test_elbo):
            assert math.isfinite(value) and -800 < value < 0, (name, value)
        assert run.checkpoints == [0, STEPS]
        assert len(run.variance) == 2 and all(v > 0 and math.isfinite(v) for v in run.variance)
        assert run.seconds_per_step > 0
    run = result["runs"]["nvil"]
    assert len(run.variance_no_baseline) == 2
    assert all(v > 0 and math.isfinite(v) for v in run.variance_no_baseline)
    assert result["variance_ratio"] == run.variance[-1] / run.variance_no_baseline[-1]
    assert set(run.layer_variance[-1]) == {"h1", "h2", "h3"}
    assert {"h1$baseline", "h2$baseline", "h3$baseline"} <= set(run.params)  # trained too


def test_credit_sets_are_the_thesis_ones(smoke):
    """h1 is credited with every cost, h2 with r2 + r3, h3 with r3 (thesis eq. 43), per image:
    read from the graph of the smoke run's nvil guide."""
    nvil = _load("nvil_sbn")
    graph = smoke[0]["graph"]
    r1 = {"log p(x)", "-log q(h1)"}
    r2 = {"log p(h1)", "-log q(h2)"}
    r3 = {"log p(h2)", "log p(h3)", "-log q(h3)"}
    credit = {n: set(graph.credited_costs(n)) for n in graph.nodes}
    assert credit == {"h1": r1 | r2 | r3, "h2": r2 | r3, "h3": r3}
    assert {n: frozenset(c) for n, c in credit.items()} == nvil.THESIS_CREDIT
    assert smoke[0]["credit"] == nvil.credit_sets(graph)
    assert graph.parents == {"h1": frozenset(), "h2": {"h1"}, "h3": {"h2"}}
    assert all(graph.nodes[n].plates == ("data",) and graph.nodes[n].score for n in credit)
    assert all(graph.shared_plates(n, c) == ("data",) for n in credit for c in credit[n])
    # Each variant's estimator (the credit does not depend on it).
    x = jnp.zeros((2, 784))
    for variant, baseline in {"nvil": sg.baselines.Neural, "average": sg.baselines.MovingAverage,
                              "none": type(None)}.items():
        estimator = nvil.make_estimators(variant, 4)("h2", x)
        assert isinstance(estimator, sg.ScoreFunction)
        assert isinstance(estimator.baseline, baseline), variant


def _images(n: int, seed: int) -> jax.Array:
    """Binary digit-like blobs (a random rectangle per image), ``(n, 784)`` float32."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 28, 28)) < 0.05).astype(np.float32)
    for img in images:
        r, c = rng.integers(2, 16, size=2)
        h, w = rng.integers(4, 11, size=2)
        img[r:r + h, c:c + w] = rng.random((h, w)) < 0.9
    return jnp.asarray(images.reshape(n, 784))


def test_learned_baselines_reduce_the_gradient_variance():
    """Train only NVIL's baselines (the program's parameters frozen), then compare, at the
    same parameters and batch, the variance of the guide's gradient with the learned baselines
    ``c_l + b_l(h_{l-1})``, with the running means ``c_l`` alone (the networks zeroed) and
    with no baseline (networks and running means zeroed: ``b_l = 0`` exactly).

    The decoder's bias starts at the logit of the mean image, as in the example, so that the
    images differ in ``log p(x | h1)`` by tens of nats: an input-dependent ``b1(x)`` can
    learn that, a running mean cannot.
    """
    nvil = _load("nvil_sbn")
    layers, steps, samples = (8, 6, 4), 300, 384
    x = _images(32, seed=3)
    mean = np.clip(np.asarray(x).mean(0), 0.02, 0.98)
    model, guide = nvil.build(layers, nvil.make_estimators("nvil", 16),
                              np.log(mean) - np.log1p(-mean))
    params = jax.jit(lambda: sg.init_params(0, model, guide, x))()  # faster than op by op
    labels = {k: jax.tree.map(lambda _, k=k: "train" if "$" in k else "freeze", v)
              for k, v in params.items()}
    optimiser = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()},
                                      labels)
    svi = sg.SVI(model, guide, optimiser, sg.ELBO())
    state = nvil.warm_start(svi.init(1, x, init_params_=params), sg.ELBO(), model, guide, x,
                            jax.random.key(9))
    state = svi.run(1, steps, x, state=state, progress_bar=False).state
    for k, v in params.items():
        if "$" not in k:  # the program did not move
            jax.tree.map(np.testing.assert_array_equal, state.params[k], v)
    trained = nvil.measurement_state("nvil", state.estimator_state)  # unnormalised
    no_nets = {k: jax.tree.map(jnp.zeros_like, v) if "$" in k else v
               for k, v in state.params.items()}
    no_baseline = jax.tree.map(jnp.zeros_like, trained)

    meter = nvil.VarianceMeter(model, guide, x, samples)
    assert meter.num_samples == samples
    key = jax.random.key(2)
    per_layer = {"nvil": meter(key, state.params, trained),
                 "centring only": meter(key, no_nets, trained),
                 "none": meter(key, no_nets, no_baseline)}
    variance = {name: sum(v.values()) for name, v in per_layer.items()}
    # measured (seeded; sums over the guide's parameters): nvil 5.5e5, centring only 4.7e6,
    # none 3.6e8 (ratios 0.0015 and 0.12)
    assert variance["nvil"] < 0.01 * variance["none"], variance
    assert variance["nvil"] < 0.3 * variance["centring only"], variance
