"""Tests of ``examples/hmm.py``: the returns load from the file inside ``vega_datasets`` (no
network), the model's loss (its regimes summed out inside ``sg.scan``) equals a plain-JAX forward
algorithm at random params, ``sg.infer_discrete``'s decoding, the plain-JAX Viterbi,
forward-backward and forward algorithm match a brute force over every path of a short series,
and a smoke run of ``main`` writes the plots.

The example is loaded from its file path, as in ``tests/test_examples.py``.
"""

from __future__ import annotations

import functools
import math
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from tests.test_examples import _load

pytest.importorskip("vega_datasets")


@pytest.fixture(scope="module")
def hmm():
    return _load("hmm")


def test_returns_load_from_the_package_without_network(hmm, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("hmm tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    data = hmm.load_returns()
    assert data.symbols == ("AAPL", "AMZN", "IBM", "MSFT")
    assert data.returns.shape == (122, 4) and data.returns.dtype == np.float32
    assert str(data.dates[0])[:7] == "2000-02" and str(data.dates[-1])[:7] == "2010-03"
    source = Path(data.source)
    assert source.is_file() and source.name == "stocks.csv"
    assert "vega_datasets" in source.parts  # the file inside the installed package
    # not centred: MSFT closed at 39.81 in January 2000 and 36.35 in February
    msft = data.symbols.index("MSFT")
    assert data.returns[0, msft] == pytest.approx(math.log(36.35 / 39.81), abs=1e-6)
    with pytest.raises(ValueError, match="lack some"):
        hmm.load_returns(["GOOG"])  # from August 2004 only
    with pytest.raises(ValueError, match="unknown"):
        hmm.load_returns(["XYZ"])


def _random_params(hmm, returns, num_regimes, seed):
    """Unconstrained params of the model's shapes, drawn at random (scales 0.5-2 times the
    data's), and the model and guide for ``num_regimes``."""
    model = functools.partial(hmm.model, num_regimes=num_regimes)
    guide = functools.partial(hmm.guide, num_regimes=num_regimes)
    params = sg.init_params(0, model, guide, returns)
    keys = jax.random.split(jax.random.key(seed), len(params))
    params = {name: jax.random.normal(k, v.shape) for k, (name, v) in
              zip(keys, sorted(params.items()), strict=True)}
    params["loc"] = 0.1 * params["loc"]
    params["scale"] = jnp.log(jnp.std(returns, 0))[:, None] + 0.5 * params["scale"]
    return model, guide, params


@pytest.mark.parametrize("num_regimes", [2, 3])
def test_loss_is_the_forward_algorithm_at_random_params(hmm, num_regimes):
    returns = jnp.asarray(hmm.load_returns(("AAPL", "IBM", "MSFT")).returns[:40])
    model, guide, params = _random_params(hmm, returns, num_regimes, seed=num_regimes)
    assert params["trans_logits"].shape == (3, num_regimes, num_regimes)

    def exact(unconstrained):
        p = sg.constrain_params(unconstrained, model, guide, returns)
        return jnp.sum(hmm.forward_loglik(*hmm.hmm_tables(p, returns)))

    loss, grad = jax.jit(jax.value_and_grad(lambda p: sg.ELBO().loss(
        jax.random.key(0), p, model, guide, returns)))(params)
    value, exact_grad = jax.jit(jax.value_and_grad(exact))(params)
    np.testing.assert_allclose(-loss, value, rtol=1e-5)
    for name, g in exact_grad.items():
        np.testing.assert_allclose(-grad[name], g, rtol=1e-3,
                                   atol=1e-4 * float(jnp.abs(g).max()), err_msg=name)
    # the sum is per stock: one marginal cost in the stocks plate, summed over time inside
    scg = sg.graph(model, guide, returns, params=params)
    assert scg.costs["log sum_{z} p"].plates == ("stocks",)


@pytest.mark.parametrize("num_regimes", [2, 3])
def test_decode_by_infer_discrete_is_the_brute_force_map_path(hmm, num_regimes):
    """``decode`` (``sg.infer_discrete``, temperature 0) at random params on 6 months of three
    stocks: the most probable path of each, by listing all of them."""
    returns = jnp.asarray(hmm.load_returns(("AAPL", "IBM", "MSFT")).returns[24:30])
    model, guide, params = _random_params(hmm, returns, num_regimes, seed=10 + num_regimes)
    path = jax.jit(functools.partial(hmm.decode, num_regimes=num_regimes))(
        params, returns, jax.random.key(0))
    assert path.shape == (6, 3)
    constrained = sg.constrain_params(params, model, guide, returns)
    log_init, log_trans, log_emit = (np.asarray(t, np.float64) for t in
                                     hmm.hmm_tables(constrained, returns))
    joints = hmm.path_log_joint(*hmm.hmm_tables(constrained, returns), path)
    for s in range(3):
        best, best_joint, _ = hmm.brute_force_viterbi(log_init[s], log_trans[s], log_emit[:, s])
        np.testing.assert_array_equal(path[:, s], best)
        np.testing.assert_allclose(joints[s], best_joint, rtol=1e-5)


def _random_tables(num_steps, num_series, num_regimes, seed):
    rng = np.random.default_rng(seed)
    log_init = np.log(rng.dirichlet(np.ones(num_regimes), size=num_series))
    log_trans = np.log(rng.dirichlet(np.ones(num_regimes), size=(num_series, num_regimes)))
    log_emit = rng.normal(0.0, 2.0, size=(num_steps, num_series, num_regimes))
    return log_init, log_trans, log_emit


@pytest.mark.parametrize("num_regimes", [2, 3])
def test_viterbi_forward_backward_and_forward_match_brute_force(hmm, num_regimes):
    num_steps, num_series = 7, 3
    tables = _random_tables(num_steps, num_series, num_regimes, seed=num_regimes)
    jitted = jax.jit(lambda *t: (hmm.viterbi(*t), hmm.posterior_marginals(*t),
                                 hmm.forward_loglik(*t)))
    (path, logjoint), marginals, loglik = jitted(*(jnp.asarray(t, jnp.float32) for t in tables))
    assert path.shape == (num_steps, num_series) and marginals.shape == (
        num_steps, num_series, num_regimes)
    log_init, log_trans, log_emit = tables
    for s in range(num_series):
        best, best_joint, evidence = hmm.brute_force_viterbi(log_init[s], log_trans[s],
                                                             log_emit[:, s])
        np.testing.assert_array_equal(path[:, s], best)
        np.testing.assert_allclose(logjoint[s], best_joint, rtol=1e-5)
        np.testing.assert_allclose(loglik[s], evidence, rtol=1e-5)
        # p(z_t = k | r) by listing every path
        paths = np.stack(np.meshgrid(*[np.arange(num_regimes)] * num_steps, indexing="ij"),
                         axis=-1).reshape(-1, num_steps)
        joint = (log_init[s][paths[:, 0]] + log_emit[np.arange(num_steps), s][
            np.arange(num_steps), paths].sum(1)
            + log_trans[s][paths[:, :-1], paths[:, 1:]].sum(1))
        weights = np.exp(joint - evidence)
        expected = np.stack([np.bincount(paths[:, t], weights, minlength=num_regimes)
                             for t in range(num_steps)])
        np.testing.assert_allclose(marginals[:, s], expected, atol=1e-5)


def test_sorting_the_regimes_keeps_the_likelihood(hmm):
    returns = jnp.asarray(hmm.load_returns(("AMZN", "IBM")).returns[:30])
    model, guide, params = _random_params(hmm, returns, 3, seed=5)
    constrained = {k: np.asarray(v) for k, v in
                   sg.constrain_params(params, model, guide, returns).items()}
    ordered = hmm.sort_regimes(constrained)
    assert np.all(np.diff(ordered["scale"], axis=-1) > 0)
    assert not np.all(np.diff(constrained["scale"], axis=-1) > 0)  # some were out of order
    before, after = (hmm.forward_loglik(*hmm.hmm_tables(p, returns))
                     for p in (constrained, ordered))
    np.testing.assert_allclose(before, after, rtol=1e-6)


def test_flags_are_checked(hmm):
    for argv in (["--steps", "0"], ["--lr", "0"], ["--symbols", ","], ["--regimes", "1"]):
        with pytest.raises(SystemExit):
            hmm.parse(argv)
    assert hmm.parse([]).steps == 1500 and hmm.parse(["--quick"]).steps < 1500
    assert hmm.parse(["--quick", "--steps", "7"]).steps == 7
    assert hmm.parse(["--symbols", "ibm,msft"]).symbols == ("IBM", "MSFT")


@pytest.fixture
def fast_compile():
    """XLA's optimisations off: a smoke run's programs compile faster."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_main_smoke(hmm, tmp_path, capsys, fast_compile):
    result = hmm.main(["--quick", "--steps", "60", "--symbols", "IBM,MSFT", "--no-progress",
                       "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "forward algorithm" in out and "stocks.csv" in out and "BIC" in out
    for name in ("regimes.png", "transitions.png", "loglik.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 1000, path
    num_steps = result["data"].returns.shape[0]
    assert result["losses"].shape == (60,) and np.all(np.isfinite(result["losses"]))
    assert abs(result["elbo_loglik"] - result["loglik"]) < 1e-4 * abs(result["loglik"])
    assert result["loglik"] > result["baseline"] + 10  # the regimes explain the crashes
    assert -result["losses"][-1] > -result["losses"][0]
    assert result["viterbi"].shape == (num_steps, 2) and result["months_differ"] == 0
    assert result["draw_frequency"].shape == result["posterior"].shape == (num_steps, 2, 2)
    assert result["worst_se"] < 6
    np.testing.assert_allclose(result["posterior"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(result["trans"].sum(-1), 1.0, atol=1e-5)
    assert np.all(np.diff(result["params"]["scale"], axis=-1) > 0)  # sorted: calm first
