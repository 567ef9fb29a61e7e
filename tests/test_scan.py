"""sg.scan: sites inside a compiled loop, credited per step by the loop's data flow.

Exact references are sums over every path, computed in plain JAX (no scgjax)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.objectives.bounds import bound_plates
from tests.models import (
    SCAN_YS,
    bern_logp,
    scan_chain_guide,
    scan_chain_model,
    scan_chain_paths,
)
from tests.stats import assert_unbiased, grad_samples, mean_and_se

T, E = 6, 3
XS = jnp.linspace(-1.0, 1.0, T)


def episodes(estimator=None, episodes_plate=True, linked=True):
    """A batch of ``E`` episodes of ``T`` binary choices: the carry counts the choices made
    (``linked``; else it ignores them), each step earns a reward that depends on the choice and
    the carry."""
    w = sg.param("w", jnp.array([0.3, -0.2]))

    def step(state, x):
        a = sg.sample("a", dist.Bernoulli(logits=w[0] + w[1] * state + x), estimator=estimator)
        sg.factor("r", (a - 0.5) * (state + x) + 0.1 * a)
        return state + (a if linked else 0.5), a

    if not episodes_plate:
        return sg.scan(step, jnp.zeros(()), xs=XS)
    with sg.plate("episodes", E):
        return sg.scan(step, jnp.zeros(E), xs=XS)


def episodes_python_loop(estimator=None):
    """The same program, written as a Python loop (one site per step)."""
    w = sg.param("w", jnp.array([0.3, -0.2]))
    with sg.plate("episodes", E):
        state = jnp.zeros(E)
        for t in range(T):
            a = sg.sample(f"a{t}", dist.Bernoulli(logits=w[0] + w[1] * state + XS[t]),
                          estimator=estimator)
            sg.factor(f"r{t}", (a - 0.5) * (state + XS[t]) + 0.1 * a)
            state = state + a


def all_paths(n: int) -> jax.Array:
    """The ``2^n`` binary paths, one per row."""
    return jnp.array(list(itertools.product([0.0, 1.0], repeat=n)))


def exact_return(w, linked=True):
    """E[sum of rewards] of the ``E`` episodes, by enumerating the 2^T paths (vectorised over
    the paths)."""
    paths = all_paths(T)
    state, lp, r = jnp.zeros(len(paths)), 0.0, 0.0
    for t in range(T):
        a = paths[:, t]
        lp = lp + bern_logp(a, w[0] + w[1] * state + XS[t])
        r = r + (a - 0.5) * (state + XS[t]) + 0.1 * a
        state = state + (a if linked else 0.5)
    return E * jnp.sum(jnp.exp(lp) * r)


@pytest.fixture(scope="module")
def params():
    return sg.init_params(0, episodes)


@pytest.mark.parametrize("estimator,k", [(sg.ScoreFunction(), 20), (sg.RLOO(), 20),
                                         (sg.DisARM(), 20)])
def test_expectation_gradient_is_exact_on_average(params, estimator, k):
    obj = sg.Expectation(num_particles=k)
    g = grad_samples(lambda key, p: obj.loss(key, p, episodes, estimator), params, 400)
    exact = jax.grad(lambda p: exact_return(p["w"]))(params)
    assert_unbiased(g, exact)


def test_loss_value_is_the_expected_return(params):
    obj = sg.Expectation(num_particles=50)
    keys = jax.random.split(jax.random.key(1), 200)
    values = jax.jit(jax.vmap(lambda key: -obj.loss(key, params, episodes)))(keys)
    mean, se = mean_and_se(values)
    assert abs(mean - exact_return(params["w"])) < 5 * se


def test_credit_follows_the_carry():
    """Rewards-to-go when the carry links the steps, the step alone when it does not, the
    later steps alone for a cost that only sees earlier choices."""
    linked = sg.graph(episodes)
    assert linked.time_credit("a", "r", "time") == {0, 1}
    assert linked.credit["a"] == (("r", (frozenset({0, 1}), True)),)
    unlinked = sg.graph(lambda: episodes(linked=False))
    assert unlinked.credit["a"] == (("r", (True, True)),)

    def delayed():
        def step(prev, x):
            a = sg.sample("a", dist.Bernoulli(logits=x))
            sg.factor("r", prev * 1.0)  # the previous step's choice only
            return a * 1.0, None
        sg.scan(step, 0.0, xs=XS)

    assert sg.graph(delayed).credit["a"] == (("r", (frozenset({1}),)),)


def test_same_estimator_distribution_as_the_python_loop(params):
    """The loop and the unrolled program give the same gradient distribution: the same mean
    and the same variance (rewards-to-go in both), within sampling error."""
    obj = sg.Expectation(num_particles=8)
    n = 600
    g_scan = grad_samples(lambda key, p: obj.loss(key, p, episodes), params, n)["w"]
    g_loop = grad_samples(lambda key, p: obj.loss(key, p, episodes_python_loop), params, n,
                          seed=1)["w"]
    (m1, s1), (m2, s2) = mean_and_se(g_scan), mean_and_se(g_loop)
    assert np.all(np.abs(m1 - m2) < 5 * np.hypot(s1, s2))
    ratio = np.var(np.asarray(g_scan), 0) / np.var(np.asarray(g_loop), 0)
    assert np.all((ratio > 0.75) & (ratio < 1.33)), ratio


def reinforce_reference(key, w, linked=True, whole_return=False):
    """Plain-JAX REINFORCE for ``episodes`` (one particle, no baseline): each step's score
    times the rewards-to-go (``linked``), its own reward (the carry ignores the choices: the
    per-step estimator) or the whole return."""
    keys = jax.random.split(key, T)

    def surrogate(w):
        state, logq, rewards = jnp.zeros(E), [], []
        for t in range(T):
            logits = w[0] + w[1] * state + XS[t]
            a = jax.random.bernoulli(keys[t], jax.nn.sigmoid(logits), (E,)) * 1.0
            logq.append(bern_logp(a, logits))
            rewards.append((a - 0.5) * (state + XS[t]) + 0.1 * a)
            state = state + (a if linked else 0.5)
        logq, rewards = jnp.stack(logq), jnp.stack(rewards)
        if whole_return:
            credit = jnp.broadcast_to(rewards.sum(0), rewards.shape)
        elif linked:
            credit = jnp.flip(jnp.cumsum(jnp.flip(rewards, 0), 0), 0)
        else:
            credit = rewards
        return jnp.sum(logq * jax.lax.stop_gradient(credit))
    return jax.grad(surrogate)(w)


@pytest.mark.parametrize("linked", [True, False], ids=["rewards-to-go", "per-step"])
def test_variance_equals_the_hand_written_reference(params, linked):
    """The loop's estimator has the variance of the hand-written REINFORCE that credits
    each step with the rewards-to-go where the carry links the steps, and with its own reward
    where it does not."""
    n = 3000
    program = lambda estimator=None: episodes(estimator, linked=linked)  # noqa: E731
    obj = sg.Expectation(num_particles=1)
    g_scan = np.asarray(grad_samples(lambda k, p: obj.loss(k, p, program, sg.ScoreFunction()),
                                     params, n)["w"])
    keys = jax.random.split(jax.random.key(9), n)
    g_ref = np.asarray(jax.jit(jax.vmap(lambda k: reinforce_reference(
        k, params["w"], linked)))(keys))
    ratio = np.var(g_scan, 0) / np.var(g_ref, 0)
    assert np.all((ratio > 0.85) & (ratio < 1.18)), ratio
    (m1, s1), (m2, s2) = mean_and_se(g_scan), mean_and_se(g_ref)
    assert np.all(np.abs(m1 - m2) < 5 * np.hypot(s1, s2))


def test_per_step_credit_has_less_variance_than_the_whole_return(params):
    """Against a REINFORCE estimator crediting each step with the episode's whole return (what
    a plate would not do, what a loop without time structure would): the loop's
    rewards-to-go credit has lower variance here, and both are unbiased."""
    obj = sg.Expectation(num_particles=1)
    g_scan = np.asarray(grad_samples(lambda key, p: obj.loss(key, p, episodes,
                                                              sg.ScoreFunction()),
                                     params, 2000)["w"])

    keys = jax.random.split(jax.random.key(5), 2000)
    g_whole = np.asarray(jax.jit(jax.vmap(lambda k: reinforce_reference(
        k, params["w"], whole_return=True)))(keys))
    exact = np.asarray(jax.grad(lambda p: exact_return(p["w"]))(params)["w"])
    for g in (g_scan, g_whole):
        m, se = mean_and_se(g)
        assert np.all(np.abs(m - exact) < 5 * se)
    assert np.all(np.var(g_scan, 0) < 0.8 * np.var(g_whole, 0))


def test_elbo_with_model_and_guide_loops_is_exact_on_average():
    ys = jnp.asarray(SCAN_YS)
    params = sg.init_params(0, scan_chain_model, scan_chain_guide, ys)

    def exact_elbo(v):
        lq, lp = scan_chain_paths(ys, v)
        return jnp.sum(jnp.exp(lq) * (lp - lq))

    obj = sg.ELBO(num_particles=10)
    g = grad_samples(lambda key, p: obj.loss(key, p, scan_chain_model, scan_chain_guide, ys),
                     params, 300)
    assert_unbiased(g, {"v": jax.grad(exact_elbo)(params["v"])})


def test_iwae_bound_per_sequence_with_time_inside():
    """IWAE's bound factorises over the plate of sequences, not over time; with many
    particles it approaches log p(y), computed exactly."""
    ys = jnp.asarray(SCAN_YS)
    ys2 = jnp.stack([ys, -ys], axis=1)  # (T, 2): the loop's xs, one column per sequence

    def model2(ys2):
        with sg.plate("seqs", 2):
            scan_chain_model(ys2)

    def guide2(ys2):
        with sg.plate("seqs", 2):
            scan_chain_guide(ys2)

    params = sg.init_params(0, model2, guide2, ys2)
    assert bound_plates(sg.graph(model2, guide2, ys2, params=params)) == ("seqs",)
    log_p = sum(jax.scipy.special.logsumexp(scan_chain_paths(c, params["v"])[1])
                for c in (ys, -ys))
    obj = sg.IWAE(num_particles=2000)
    bounds = jax.jit(jax.vmap(lambda k: -obj.loss(k, params, model2, guide2, ys2)))(
        jax.random.split(jax.random.key(0), 20))
    mean, se = mean_and_se(bounds)
    assert mean <= log_p + 3 * se
    assert log_p - mean < 0.05


def test_dice_hessian_through_the_loop():
    """The DiCE surrogate's Hessian is unbiased through the loop too."""
    t_small = 3
    xs = XS[:t_small]

    def program():
        w = sg.param("w", jnp.array([0.3, -0.2]))

        def step(state, x):
            a = sg.sample("a", dist.Bernoulli(logits=w[0] + w[1] * state + x),
                          estimator=sg.ScoreFunction())
            sg.factor("r", (a - 0.5) * (state + x) + 0.1 * a)
            return state + a, None
        sg.scan(step, 0.0, xs=xs)

    def exact(w):
        paths = all_paths(t_small)
        state, lp, r = jnp.zeros(len(paths)), 0.0, 0.0
        for t in range(t_small):
            a = paths[:, t]
            lp = lp + bern_logp(a, w[0] + w[1] * state + xs[t])
            r = r + (a - 0.5) * (state + xs[t]) + 0.1 * a
            state = state + a
        return jnp.sum(jnp.exp(lp) * r)

    params = sg.init_params(0, program)
    obj = sg.Expectation(num_particles=10)
    keys = jax.random.split(jax.random.key(3), 2000)
    hess = jax.jit(jax.vmap(lambda k: jax.hessian(
        lambda w: -obj.loss(k, {"w": w}, program))(params["w"])))(keys)
    assert_unbiased({"h": hess}, {"h": jax.hessian(exact)(params["w"])})


def test_handlers_see_the_stacked_sites():
    def program(data=None):
        def step(c, x):
            z = sg.sample("z", dist.Normal(c, 1.0))
            sg.sample("y", dist.Normal(z, 1.0), obs=x)
            sg.deterministic("d", z * 2.0)
            return z, z
        return sg.scan(step, 0.0, xs=data)

    data = jnp.arange(4.0)
    tr = sg.handlers.trace(sg.handlers.seed(program, 0)).get_trace(data)
    assert tr["z"]["value"].shape == (4,) and tr["d"]["value"].shape == (4,)
    assert tr["z"]["fn"].batch_shape == (4,)
    assert bool(jnp.all(tr["y"]["value"] == data))
    assert len(set(np.asarray(tr["z"]["value"]).tolist())) == 4  # a fresh key per step
    again = sg.handlers.trace(sg.handlers.seed(program, 0)).get_trace(data)
    assert bool(jnp.all(again["z"]["value"] == tr["z"]["value"]))
    # substitute / condition with one value per step
    z = jnp.array([1.0, 2.0, 3.0, 4.0])
    sub = sg.handlers.trace(sg.handlers.seed(sg.handlers.substitute(program, {"z": z}), 0))
    assert bool(jnp.all(sub.get_trace(data)["z"]["value"] == z))
    cond = sg.handlers.trace(sg.handlers.seed(sg.handlers.condition(program, {"z": z}), 0))
    assert cond.get_trace(data)["z"]["is_observed"]
    with pytest.raises(sg.SiteError, match="'z'.*leading axis of size 4"):
        sg.handlers.seed(sg.handlers.substitute(program, {"z": jnp.ones(3)}), 0)(data)
    # replay, block, scale and mask
    replayed = sg.handlers.trace(sg.handlers.seed(sg.handlers.replay(program, tr), 1))
    assert bool(jnp.all(replayed.get_trace(data)["z"]["value"] == tr["z"]["value"]))
    blocked = sg.handlers.trace(sg.handlers.block(sg.handlers.seed(program, 0), hide=["z"]))
    assert "z" not in blocked.get_trace(data) and "y" in blocked.get_trace(data)
    scaled = sg.handlers.trace(sg.handlers.seed(sg.handlers.scale(program, jnp.arange(
        1.0, 5.0)), 0)).get_trace(data)
    assert scaled["y"]["scale"].shape == (4,)
    masked = sg.handlers.trace(sg.handlers.seed(sg.handlers.mask(
        program, jnp.array([True, False, True, True])), 0)).get_trace(data)
    assert masked["y"]["mask"].tolist() == [True, False, True, True]


def test_loss_jits_twice_and_vmaps(params):
    obj = sg.Expectation(num_particles=4)
    loss = jax.jit(lambda k, p: obj.loss(k, p, episodes))
    a, b = loss(jax.random.key(0), params), loss(jax.random.key(0), params)
    assert float(a) == float(b)
    losses = jax.vmap(lambda k: obj.loss(k, params, episodes))(jax.random.split(
        jax.random.key(0), 3))
    assert losses.shape == (3,) and bool(jnp.all(jnp.isfinite(losses)))


def test_errors_name_the_site_or_the_loop():
    def raw():
        def step(c, _):
            return c + sg.sample("x", dist.Normal(0.0, 1.0)), None
        jax.lax.scan(step, 0.0, None, length=3)

    with pytest.raises(sg.SiteError, match="'x'.*sg.scan"):
        sg.handlers.trace(sg.handlers.seed(raw, 0)).get_trace()

    def nested():
        def inner(c, _):
            return c, None

        def outer(c, _):
            sg.scan(inner, c, length=2, name="inner")
            return c, None
        sg.scan(outer, 0.0, length=2)

    with pytest.raises(sg.SiteError, match="'inner'.*nested"):
        sg.handlers.seed(nested, 0)()

    def twice():
        sg.scan(lambda c, _: (c + sg.sample("a", dist.Normal(0.0, 1.0)), None), 0.0, length=2)
        sg.scan(lambda c, _: (c + sg.sample("b", dist.Normal(0.0, 1.0)), None), 0.0, length=2)

    with pytest.raises(sg.SiteError, match="'time'.*name="):
        sg.handlers.trace(sg.handlers.seed(twice, 0)).get_trace()
    with pytest.raises(sg.SiteError, match="neither xs nor length"):
        sg.scan(lambda c, x: (c, x), 0.0)

    def enumerated():
        def step(c, _):
            a = sg.sample("a", dist.Bernoulli(logits=0.0), estimator=sg.Enumerate())
            sg.factor("f", c * a)
            return c + a, None
        sg.scan(step, 0.0, length=2)

    with pytest.raises(sg.SiteError, match="'a' is enumerated inside sg.scan 'time'.*'f'"):
        sg.Expectation().loss(0, {}, enumerated)


def test_reverse_loop_credits_the_earlier_indices():
    """``reverse=True`` runs from the last step to the first: a choice reaches the costs of
    the steps *before* it in index order (lags {-1, 0}), and the gradient stays exact."""
    def program():
        w = sg.param("w", jnp.array([0.3, -0.2]))

        def step(state, x):
            a = sg.sample("a", dist.Bernoulli(logits=w[0] + w[1] * state + x))
            sg.factor("r", (a - 0.5) * (state + x) + 0.1 * a)
            return state + a, None
        sg.scan(step, 0.0, xs=XS, reverse=True)

    def exact(w):
        paths = all_paths(T)
        state, lp, r = jnp.zeros(len(paths)), 0.0, 0.0
        for i, t in enumerate(range(T - 1, -1, -1)):
            a = paths[:, i]
            lp = lp + bern_logp(a, w[0] + w[1] * state + XS[t])
            r = r + (a - 0.5) * (state + XS[t]) + 0.1 * a
            state = state + a
        return jnp.sum(jnp.exp(lp) * r)

    assert sg.graph(program).time_credit("a", "r", "time") == {-1, 0}
    params = sg.init_params(0, program)
    obj = sg.Expectation(num_particles=20)
    g = grad_samples(lambda key, p: obj.loss(key, p, program), params, 400)
    assert_unbiased(g, jax.grad(lambda p: exact(p["w"]))(params))


def test_plates_inside_the_body():
    """The body opens the plate (each step, E agents): credit is per agent and rewards-to-go
    in time, and the gradient is exact on average."""
    def program():
        w = sg.param("w", jnp.array([0.3, -0.2]))

        def step(state, x):
            with sg.plate("agents", E):
                a = sg.sample("a", dist.Bernoulli(logits=w[0] + w[1] * state + x))
                sg.factor("r", (a - 0.5) * (state + x) + 0.1 * a)
            return state + a, None
        sg.scan(step, jnp.zeros(E), xs=XS)

    scg = sg.graph(program)
    assert scg.credit["a"] == (("r", (frozenset({0, 1}), True)),)
    assert scg.nodes["a"].batch_shape == (T, E)
    params = sg.init_params(0, program)
    obj = sg.Expectation(num_particles=20)
    g = grad_samples(lambda key, p: obj.loss(key, p, program), params, 400)
    assert_unbiased(g, jax.grad(lambda p: exact_return(p["w"]))(params))


def test_split_step_passes_step_invariant_work_as_constants():
    """``control_flow.split_step``: the input-only work of a step is done for all steps before
    the loop, and what it computes from constants alone (a parameter's transform) enters the
    loop once instead of as a ``(T, ...)`` array; the split step gives ``f``'s values."""
    from scgjax.control_flow import hoisted_scan, split_step

    scale = jnp.asarray(0.7)

    def f(total, inputs):
        key, x = inputs
        noise = jax.random.normal(key, (3,))  # per step: hoisted
        spread = jnp.exp(scale) * 2.0  # the same at every step: a constant of the loop
        return total * spread + noise.sum() + x, noise  # (spread meets the carry)

    length = 6
    xs = (jax.random.split(jax.random.key(0), length), jnp.arange(length, dtype=jnp.float32))
    residuals, step = split_step(f, 0.0, xs)
    assert residuals and all(jnp.shape(r)[0] == length for r in residuals)
    assert not any(jnp.shape(r) == (length,) and jnp.allclose(r, 2.0 * jnp.exp(scale))
                   for r in residuals)  # the spread is not among the per-step residuals
    expected = jax.lax.scan(f, 0.0, xs)
    got = hoisted_scan(f, 0.0, xs, length)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)
    np.testing.assert_allclose(jax.lax.scan(step, 0.0, residuals)[0], expected[0], rtol=1e-6)


def _steps_programs(global_latent: bool):
    """A model and guide whose steps' input-only work uses the data (shared by the particles),
    the steps' own draws (batched inputs) and, with ``global_latent``, a per-particle global
    ``g`` (a batched constant of the hoisted work; else ``g`` is a param)."""

    def global_value(name, loc):
        if global_latent:
            return sg.sample(name, dist.Normal(loc, 1.0))
        return sg.param(f"{name}_param", 0.4)

    def model(ys):
        g = global_value("g", 0.0)
        s = sg.param("s", 0.3)

        def step(z, y):
            z = sg.sample("z", dist.Normal(0.8 * z + g * y, jnp.exp(s)))
            sg.sample("y", dist.Normal(z, 1.0), obs=y)
            return z, None

        sg.scan(step, 0.0, xs=ys)

    def guide(ys):
        g = global_value("g", sg.param("loc", 0.1))
        a, b = sg.param("a", 0.5), sg.param("b", 0.2)

        def step(z, y):
            return sg.sample("z", dist.Normal(a * z + b * y + 0.1 * g, 0.9)), None

        sg.scan(step, 0.0, xs=ys)

    return model, guide


def _drawn_layouts(hlo: str) -> set[str]:
    """The shapes and layouts of the (K, T) standard normals of the compiled program: what the
    fusions computing an inverse error function (``jax.random.normal``'s) return."""
    import re

    computations = re.split(r"\n(?=\S)", hlo)
    fused = {c.split(" ", 1)[0].lstrip("%") for c in computations if "erf_inv" in c}
    found = re.findall(r"= (f32\[\d+,\d+\]\{[\d,]+\}) fusion\([^\n]*calls=%([\w.]+)", hlo)
    return {shape for shape, called in found if called in fused}


@pytest.mark.parametrize("objective", [sg.IWAE(16), sg.SMC(16)], ids=["iwae", "smc"])
def test_hoisted_work_runs_with_the_steps_major_under_the_particles_vmap(objective,
                                                                           monkeypatch):
    """Under the particles' ``vmap`` the hoisted work of a step runs on ``(T, K)`` arrays (the
    particles minor, as the loop reads them): the compiled loss draws its normals as
    ``f32[T, K]{1,0}``, where the plain ``vmap`` over the steps (the rule off) draws them with
    the steps minor, which XLA's CPU loops do not vectorise at T = 10. The values and
    gradients are the plain ``vmap``'s, to float rounding; with batched constants (IWAE: a
    per-particle global) and shared data."""
    from jax.extend import core as jex_core

    from scgjax import control_flow

    length, k = 10, 16
    ys = jnp.sin(jnp.arange(length, dtype=jnp.float32))
    params = {"s": jnp.asarray(0.3), "loc": jnp.asarray(0.1), "a": jnp.asarray(0.5),
              "b": jnp.asarray(0.2)}
    key = jax.random.key(4)
    model, guide = _steps_programs(global_latent=isinstance(objective, sg.IWAE))
    if not isinstance(objective, sg.IWAE):  # (SMC: no latent outside the loop)
        params = {"g_param": jnp.asarray(0.4), **params}

    def loss(p):
        return objective.loss(key, p, model, guide, ys)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert _drawn_layouts(jax.jit(loss).lower(params).compile().as_text()) == {
        f"f32[{length},{k}]{{1,0}}"}  # the normals: drawn steps-major

    def plain(known, inputs):
        return list(jax.vmap(jex_core.jaxpr_as_fun(known))(*inputs))

    monkeypatch.setattr(control_flow, "_each_step", plain)

    def loss_plain(p):  # (a function of its own: jit's cache holds loss's trace)
        return objective.loss(key, p, model, guide, ys)

    value_plain, grads_plain = jax.jit(jax.value_and_grad(loss_plain))(params)
    steps_minor = {f"f32[{k},{length}]{{1,0}}", f"f32[{length},{k}]{{0,1}}"}
    plain_layouts = _drawn_layouts(jax.jit(loss_plain).lower(params).compile().as_text())
    assert plain_layouts and plain_layouts <= steps_minor  # (the layout this avoids)
    np.testing.assert_allclose(value, value_plain, rtol=1e-6)
    for name in params:
        np.testing.assert_allclose(grads[name], grads_plain[name], rtol=1e-5, atol=1e-6)
