"""Tests of ``examples/policy_gradient.py``: the gridworld, the credit scgjax derives for the two
ways of writing an episode, unbiasedness and variance of both gradient estimators against the
exact policy gradient (all action sequences enumerated), and a smoke run of ``main``.

The example is loaded from its file path, as in ``tests/test_examples.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from tests.stats import assert_unbiased, grad_samples
from tests.test_examples import _load

UP, RIGHT, DOWN, LEFT = range(4)
HORIZON = 6  # 4^6 = 4096 action sequences: enumerated exactly
BATCH = 2
NUM_SAMPLES = 6000


@pytest.fixture(scope="module")
def pg():
    return _load("policy_gradient")


@pytest.fixture(scope="module")
def env(pg):
    return pg.GridWorld()


def enumerate_episodes(env, logits, horizon):
    """Every action sequence of length ``horizon`` (``4^horizon``): its probability under
    ``softmax(logits)`` and its rewards ``(4^horizon, horizon)``, by running the tables."""
    seqs = jnp.stack(jnp.meshgrid(*[jnp.arange(4)] * horizon, indexing="ij"), -1)
    seqs = seqs.reshape(-1, horizon)
    log_policy = jax.nn.log_softmax(logits, axis=-1)
    s = jnp.full((seqs.shape[0],), env.start)
    logp, rewards = jnp.zeros(seqs.shape[0]), []
    for t in range(horizon):
        logp = logp + log_policy[s, seqs[:, t]]
        s, r = env.step(s, seqs[:, t])
        rewards.append(r)
    return jnp.exp(logp), jnp.stack(rewards, 1)


def enumerated_return(env, logits, horizon):
    """The exact expected return, by enumeration."""
    probs, rewards = enumerate_episodes(env, logits, horizon)
    return jnp.sum(probs * rewards.sum(1))


# --- (1) the environment -----------------------------------------------------------------


def test_transitions_and_rewards_by_hand(pg, env):
    # . . . . .      states row-major: S = 5, pit X = 7 and 16, goal G = 9, wall # = 12
    # S . X . G
    # . . # . .
    # . X . . .
    # . . . . .
    assert (env.height, env.width, env.num_states, env.start) == (5, 5, 25, 5)
    cases = [  # (state, action, next state, reward)
        (5, UP, 0, -0.1),      # a plain move
        (5, LEFT, 5, -0.1),    # off the grid: stay, pay the step
        (5, RIGHT, 6, -0.1),
        (6, RIGHT, 5, -1.0),   # into the pit: back to the start
        (15, RIGHT, 5, -1.0),  # the other pit
        (11, RIGHT, 11, -0.1),  # into the wall: stay
        (17, UP, 17, -0.1),    # the wall from below
        (8, RIGHT, 5, 1.0),    # into the goal: +1, back to the start
        (4, DOWN, 5, 1.0),     # the goal from above
        (14, UP, 5, 1.0),      # ... and from below
        (24, DOWN, 24, -0.1),  # bottom-right corner
        (0, UP, 0, -0.1),
    ]
    for s, a, s_next, r in cases:
        assert env.next_state[s, a] == s_next, (s, a)
        assert env.reward[s, a] == pytest.approx(r), (s, a)
    # the traced step is the same table lookup, vectorised
    s = jnp.array([c[0] for c in cases])
    a = jnp.array([c[1] for c in cases])
    s_next, r = env.step(s, a)
    np.testing.assert_array_equal(s_next, [c[2] for c in cases])
    np.testing.assert_allclose(r, [c[3] for c in cases], rtol=1e-6)
    for bad in (("S.", "."), ("..", ".."), ("SS",), ("S?",)):
        with pytest.raises(ValueError):
            pg.GridWorld(bad)


def test_episode_program_writes_the_rewards_of_the_detour(pg, env):
    # right, up, right, right, down, right: around the pit into the goal, then up again
    actions = [RIGHT, UP, RIGHT, RIGHT, DOWN, RIGHT, UP]
    fn = functools.partial(pg.episode, env, len(actions), 1, True)
    data = {f"a{t}": jnp.array([a]) for t, a in enumerate(actions)}
    tr = sg.handlers.trace(sg.handlers.seed(sg.handlers.substitute(fn, data), 0)).get_trace()
    rewards = [float(tr[f"r{t}"]["fn"].log_prob(tr[f"r{t}"]["value"])[0])
               for t in range(len(actions))]
    np.testing.assert_allclose(rewards, [-0.1] * 5 + [1.0, -0.1], rtol=1e-6)
    whole = functools.partial(pg.episode, env, len(actions), 1, False)
    tr = sg.handlers.trace(sg.handlers.seed(sg.handlers.substitute(whole, data), 0)).get_trace()
    assert float(tr["return"]["fn"].log_prob(tr["return"]["value"])[0]) == pytest.approx(0.4)


def test_exact_return_and_optimum_against_enumeration(pg, env):
    logits = 0.7 * jax.random.normal(jax.random.key(3), (env.num_states, 4))

    @jax.jit
    def both(logits):
        probs, rewards = enumerate_episodes(env, logits, HORIZON)
        by_sequences = lambda lg: enumerated_return(env, lg, HORIZON)
        by_states = lambda lg: pg.exact_return(env, lg, HORIZON)
        return (probs, rewards.sum(1), by_states(logits), by_sequences(logits),
                jax.grad(by_states)(logits), jax.grad(by_sequences)(logits))

    probs, returns, exact, enumerated, grad_exact, grad_enumerated = both(logits)
    assert probs.shape == (4**HORIZON,)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(exact, enumerated, rtol=1e-5)
    np.testing.assert_allclose(grad_exact, grad_enumerated, atol=1e-5)
    assert np.abs(grad_exact).max() > 0.01
    # deterministic transitions: the best policy's return is the best action sequence's
    assert pg.optimal_return(env, HORIZON) == pytest.approx(float(returns.max()))
    assert pg.optimal_return(env, HORIZON) == pytest.approx(0.5)  # the detour, once
    assert pg.optimal_return(env, 20) == pytest.approx(3 * 0.5 - 0.2)  # three laps
    uniform = jnp.zeros((env.num_states, 4))
    assert float(jax.jit(pg.exact_return, static_argnums=(0, 2))(env, uniform, 20)) == \
        pytest.approx(-3.177, abs=1e-3)
    occupancy = pg.occupancy(env, uniform, 20)
    np.testing.assert_allclose(occupancy.sum(1), 1.0, rtol=1e-5)  # a distribution per step


# --- (2) credit assignment from data flow ------------------------------------------------


def test_credit_is_rewards_to_go_per_step_and_the_whole_return_otherwise(pg, env):
    per_step = sg.graph(functools.partial(pg.episode, env, HORIZON, 3, True))
    for t in range(HORIZON):
        assert per_step.credited_costs(f"a{t}") == tuple(f"r{u}" for u in range(t, HORIZON))
    # element by element: episode n's action only with episode n's rewards
    assert per_step.nodes["a3"].plates == ("episodes",)
    assert per_step.shared_plates("a3", "r5") == ("episodes",)
    whole = sg.graph(functools.partial(pg.episode, env, HORIZON, 3, False))
    assert tuple(whole.costs) == ("return",)
    for t in range(HORIZON):
        assert whole.credited_costs(f"a{t}") == ("return",)
    assert whole.shared_plates("a3", "return") == ("episodes",)


# --- (3), (4) unbiased against the exact gradient; lower variance per step ----------------


@pytest.fixture(scope="module")
def instance(pg, env):
    """Random logits, the exact gradient of the mean return, and gradient samples of both
    programs with the score function and a moving-average baseline already at ``E[G_t]`` (per
    step) or ``E[R]`` (whole return): the best constant baselines, in use."""
    logits = 0.5 * jax.random.normal(jax.random.key(0), (env.num_states, 4))
    params = {"logits": logits}

    @jax.jit
    def exact_quantities(logits):
        probs, rewards = enumerate_episodes(env, logits, HORIZON)
        to_go = jnp.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]  # G_t, per sequence
        grad = jax.grad(lambda lg: enumerated_return(env, lg, HORIZON))(logits)
        return grad, probs @ to_go

    exact, expected_to_go = exact_quantities(logits)
    expected_to_go = np.asarray(expected_to_go)
    objective = sg.Expectation()
    samples = {}
    for name, per_step in pg.VARIANTS.items():
        fn = functools.partial(pg.episode, env, HORIZON, BATCH, per_step,
                               estimator=pg.make_estimator("score"))
        state = objective.init_state(0, params, fn)
        assert set(state) == {f"a{t}" for t in range(HORIZON)}
        # a MovingAverage state whose bias-corrected mean is the exact expected signal (the
        # factors are divided by B, so the signal of one element is G_t / B)
        state = {site: {"mean": jnp.float32(expected_to_go[int(site[1:]) if per_step else 0]
                                            / BATCH),
                        "steps": jnp.int32(1000)} for site in state}
        loss = lambda key, p, fn=fn, state=state: objective.loss_with_state(
            key, p, state, fn)[0]
        samples[name] = grad_samples(loss, params, NUM_SAMPLES, seed=1)["logits"]
    visits = np.asarray(pg.occupancy(env, logits, HORIZON)).sum(0)  # per episode and state
    return {"exact": exact, "samples": samples, "params": params, "visits": visits}


#: the fewest expected visits of a state over a test's episodes for its logits' gradient to be
#: compared: below, a sample may hold no visit at all (its standard error then reads 0)
MIN_VISITS = 30


def assert_unbiased_where_visited(samples, instance, episodes):
    """``assert_unbiased`` on the logits of the states visited at least ``MIN_VISITS`` times
    in expectation over ``episodes`` episodes; a rarely visited state's few nonzero samples
    give no usable standard error (a state visited about 4 times in 12,000 episodes, the
    pit-side corner, is visited 0 times in one of some 100 runs)."""
    rows = instance["visits"] * episodes >= MIN_VISITS
    assert rows.sum() >= 8  # most reachable states are compared
    assert_unbiased({"logits": np.asarray(samples)[:, rows]},
                    {"logits": np.asarray(instance["exact"])[rows]})


@pytest.mark.parametrize("variant", ["rewards-to-go", "whole return"])
def test_both_estimators_are_unbiased(instance, variant):
    assert_unbiased_where_visited(instance["samples"][variant], instance, NUM_SAMPLES * BATCH)


def test_rewards_to_go_has_lower_gradient_variance(instance):
    per_step = np.var(np.asarray(instance["samples"]["rewards-to-go"]), axis=0)
    whole = np.var(np.asarray(instance["samples"]["whole return"]), axis=0)
    # both with the best constant baselines (E[G_t], E[R]); measured with T = 6, B = 2: whole /
    # per-step = 1.53 in total and 1.60 on the start state's logits (1.54, 1.64 with other
    # keys; the start state is where every time step can be)
    assert whole.sum() > 1.3 * per_step.sum(), (whole.sum(), per_step.sum())
    assert whole[5].sum() > 1.3 * per_step[5].sum(), (whole[5].sum(), per_step[5].sum())


# --- (5) the script -----------------------------------------------------------------------


def test_flags_are_checked(pg):
    for argv in (["--steps", "0"], ["--lr", "0"], ["--seeds", "a,b"], ["--checkpoints", "1"],
                 ["--estimator", "rloo", "--num-particles", "1"], ["--variance-samples", "1"]):
        with pytest.raises(SystemExit):
            pg.parse(argv)
    assert pg.parse(["--estimator", "rloo"]).num_particles == 2
    assert pg.parse(["--seed", "7"]).seeds == [7]


def test_main_smoke(pg, tmp_path, capsys):
    result = pg.main(["--steps", "12", "--seeds", "0,1", "--batch-size", "2", "--horizon", "2",
                      "--eval-every", "4", "--checkpoints", "3", "--variance-samples", "16",
                      "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ms/step" in out and "a1 is credited with r1" in out
    for name in ("returns.png", "variance.png", "policy.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 1000, path
    dot = (tmp_path / "graph.dot").read_text()
    assert dot.startswith("digraph") and '"r1"' in dot and "dashed" in dot
    assert result["credited"] == {"rewards-to-go": ("r1",), "whole return": ("return",)}
    assert result["optimal_return"] == pytest.approx(-0.2)  # the goal is 6 moves away
    assert set(result["variants"]) == {"rewards-to-go", "whole return"}
    for name, r in result["variants"].items():
        np.testing.assert_array_equal(r["eval_steps"], [0, 4, 8, 12])
        assert r["returns"].shape == (2, 4) and np.all(np.isfinite(r["returns"])), name
        # every run starts from the uniform policy
        np.testing.assert_allclose(r["returns"][:, 0], result["uniform_return"], rtol=1e-5)
        np.testing.assert_array_equal(r["variance_steps"], [0, 6, 12])
        assert r["variances"].shape == (2, 3) and np.all(r["variances"] > 0), name
        assert np.all(np.isfinite(r["variances"]))
        assert math.isfinite(r["final_return"]) and math.isfinite(r["variance_ratio"])
        assert r["ms_per_step"] > 0
        assert set(r["signal_variance"]["initial"]) == {"a0", "a1"}
    assert result["variants"]["rewards-to-go"]["variance_ratio"] == pytest.approx(1.0)


# --- (6) the long-horizon version: the episode in sg.scan -------------------------------------


def test_scan_credit_is_rewards_to_go_from_the_loops_data_flow(pg, env):
    per_step = sg.graph(functools.partial(pg.episode_scan, env, HORIZON, 3, True))
    # one site and one cost with a time axis, not one per step
    assert set(per_step.nodes) == {"a"} and tuple(per_step.costs) == ("r",)
    assert per_step.nodes["a"].plates == ("time", "episodes")
    # step s of a reaches step t of r at t - s = 0 (the body) and t - s > 0 (the carry)
    assert per_step.time_credit("a", "r", "time") == {0, 1}
    assert per_step.credited_costs("a") == ("r",)
    assert "episodes" in per_step.shared_plates("a", "r")
    whole = sg.graph(functools.partial(pg.episode_scan, env, HORIZON, 3, False))
    assert tuple(whole.costs) == ("return",)
    assert whole.credited_costs("a") == ("return",)
    assert whole.shared_plates("a", "return") == ("episodes",)


def test_scan_episode_writes_the_same_rewards_as_the_loop(pg, env):
    actions = [RIGHT, UP, RIGHT, RIGHT, DOWN, RIGHT, UP]
    fn = functools.partial(pg.episode_scan, env, len(actions), 1, True)
    data = {"a": jnp.array(actions)[:, None]}  # (T, B): one entry per step
    tr = sg.handlers.trace(sg.handlers.seed(sg.handlers.substitute(fn, data), 0)).get_trace()
    rewards = tr["r"]["fn"].log_prob(tr["r"]["value"])
    assert rewards.shape == (len(actions), 1)
    np.testing.assert_allclose(rewards[:, 0], [-0.1] * 5 + [1.0, -0.1], rtol=1e-6)
    whole = functools.partial(pg.episode_scan, env, len(actions), 1, False)
    tr = sg.handlers.trace(sg.handlers.seed(sg.handlers.substitute(whole, data), 0)).get_trace()
    assert float(tr["return"]["fn"].log_prob(tr["return"]["value"])[0]) == pytest.approx(0.4)


@pytest.fixture(scope="module")
def scan_samples(pg, env, instance):
    """Gradient samples of both sg.scan programs with RLOO (K = 2, the --scan default) at the
    logits of ``instance``."""
    objective = sg.Expectation(num_particles=2)
    samples = {}
    for name, per_step in pg.VARIANTS.items():
        fn = functools.partial(pg.episode_scan, env, HORIZON, BATCH, per_step,
                               estimator=sg.RLOO())
        loss = lambda key, p, fn=fn: objective.loss(key, p, fn)
        samples[name] = grad_samples(loss, instance["params"], NUM_SAMPLES // 2,
                                     seed=2)["logits"]
    return samples


@pytest.mark.parametrize("variant", ["rewards-to-go", "whole return"])
def test_scan_estimators_are_unbiased(instance, scan_samples, variant):
    # NUM_SAMPLES / 2 samples of K = 2 particles of BATCH episodes
    assert_unbiased_where_visited(scan_samples[variant], instance, NUM_SAMPLES * BATCH)


def test_scan_rewards_to_go_has_lower_gradient_variance(scan_samples):
    per_step = np.var(np.asarray(scan_samples["rewards-to-go"]), axis=0).sum()
    whole = np.var(np.asarray(scan_samples["whole return"]), axis=0).sum()
    assert whole > 1.3 * per_step, (whole, per_step)


def test_scan_flags(pg):
    args = pg.parse(["--scan"])
    assert (args.horizon, args.estimator, args.num_particles) == (200, "rloo", 2)
    assert args.loop_horizons == [10, 20, 50] and max(args.scan_horizons) >= 500
    quick = pg.parse(["--scan", "--quick", "--horizon", "30"])
    assert quick.horizon == 30 and quick.steps < 200 and quick.seeds == [0]
    assert pg.parse([]).horizon == 20 and pg.parse([]).loop_horizons is None
    assert pg.parse(["--quick"]).horizon == 6
    for argv in (["--loop-horizons", "5"], ["--scan", "--scan-horizons", "0,5"],
                 ["--scan", "--variance-horizons", "x"], ["--scan", "--compile-repeats", "0"]):
        with pytest.raises(SystemExit):
            pg.parse(argv)


def test_main_scan_smoke(pg, tmp_path, capsys):
    # --quick also turns XLA's optimisations off while it runs, and restores them
    before = jax.config.read("jax_disable_most_optimizations")
    result = pg.main(["--scan", "--quick", "--estimator", "score", "--steps", "8",
                      "--horizon", "12", "--loop-horizons", "3", "--scan-horizons", "3,30",
                      "--variance-horizons", "12", "--variance-samples", "16",
                      "--eval-every", "4", "--no-progress", "--out", str(tmp_path)])
    assert jax.config.read("jax_disable_most_optimizations") == before
    out = capsys.readouterr().out
    assert "trace" in out and "compile" in out and "ms/step" in out
    for name in ("scan_compile.png", "scan_training.png", "scan_policy.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 1000, path
    assert (tmp_path / "scan_graph.dot").read_text().startswith("digraph")
    assert result["time_credit"] == {0, 1}
    assert result["credited"] == {"rewards-to-go": ("r",), "whole return": ("return",)}
    assert set(result["timings"]["Python loop"]) == {3}
    assert set(result["timings"]["sg.scan"]) == {3, 30}
    for by_t in result["timings"].values():
        for trace, xla, call in by_t.values():
            assert trace > 0 and xla > 0 and call > 0
    assert set(result["variance_by_horizon"]["whole return"]) == {12}
    for name, r in result["variants"].items():
        np.testing.assert_array_equal(r["eval_steps"], [0, 4, 8])
        assert np.all(np.isfinite(r["returns"])) and np.all(r["variances"] > 0), name
        np.testing.assert_allclose(r["returns"][:, 0], result["uniform_return"], rtol=1e-5)
