"""Baselines for the score-function estimator: user-supplied values and NVIL's neural baseline.

Checked against exact gradients by enumeration (unbiasedness), by construction (the layout of
per-element baselines, the separation of the baseline's training term from the objective) and
by measurement (a trained neural baseline lowers the gradient variance on the SBN).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
import scgjax.diagnostics
from scgjax import dist
from scgjax.estimators.base import Estimator, ScoreContext
from tests import models
from tests.stats import assert_unbiased, grad_samples

# --- networks and programs -----------------------------------------------------------------


class MLP(nn.Module):
    """``(batch, d) -> (batch,)``: NVIL's baseline network (one tanh hidden layer)."""

    hidden: int = 16

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(self.hidden)(x)))[..., 0]


class Identity(nn.Module):
    """Returns its inputs (plus a parameter of value 0), to check layouts exactly."""

    @nn.compact
    def __call__(self, x):
        return x + self.param("zero", nn.initializers.zeros, ())


def neural(inputs, **kw):
    return sg.ScoreFunction(baseline=sg.baselines.Neural(MLP(), inputs=inputs, **kw))


def sbn_guide(x, make_estimator):
    """models.sbn_guide with one estimator per layer, built from the layer's inputs (x for h1,
    [x, h1] for h2, [x, h2] for h3: NVIL's per-layer baselines, which differ per particle)."""
    d = models.SBN_DIMS
    p = models._p
    with sg.plate("data", x.shape[0]):
        h1 = sg.sample("h1", dist.Bernoulli(
            logits=x @ p("q_V1", (d["x"], d["h1"])) + p("q_c1", (d["h1"],))).to_event(1),
            estimator=make_estimator("h1", x))
        h2 = sg.sample("h2", dist.Bernoulli(
            logits=h1 @ p("q_V2", (d["h1"], d["h2"])) + p("q_c2", (d["h2"],))).to_event(1),
            estimator=make_estimator("h2", jnp.concatenate([x, h1], -1)))
        sg.sample("h3", dist.Bernoulli(
            logits=h2 @ p("q_V3", (d["h2"], d["h3"])) + p("q_c3", (d["h3"],))).to_event(1),
            estimator=make_estimator("h3", jnp.concatenate([x, h2], -1)))


def sbn_baseline_params(seed=0):
    """The three MLP baselines' parameters for sbn_guide (as sg.init_params would make them,
    without tracing the programs once more)."""
    d = models.SBN_DIMS
    widths = {"h1": d["x"], "h2": d["x"] + d["h1"], "h3": d["x"] + d["h2"]}
    keys = jax.random.split(jax.random.key(seed), 3)
    return {f"{site}$baseline": MLP().init(key, jnp.zeros((models.SBN_X.shape[0], w)))["params"]
            for (site, w), key in zip(widths.items(), keys, strict=True)}


def elbo_samples(objective, params, model, guide, *args, num_samples=4000, state=None):
    loss = lambda key, p: objective.loss_with_state(key, p, state, model, guide, *args)[0]
    return grad_samples(loss, params, num_samples)


def program_part(tree):
    return {k: v for k, v in tree.items() if "$" not in k}


def guide_variance(samples):
    """Total variance of the guide's parameters' gradient estimates (sum over elements)."""
    return sum(float(np.var(np.asarray(v), axis=0, ddof=1).sum())
               for k, v in samples.items() if k.startswith("q_"))


def mixture_with(estimator):
    return functools.partial(models.mixture_guide, estimator=estimator)


# --- tests ---------------------------------------------------------------------------------


def test_trained_neural_baseline_is_unbiased_and_lowers_the_variance_on_the_sbn():
    # NVIL's per-layer baselines (inputs x, [x, h1], [x, h2]), trained by SVI on the
    # baselines' parameters only (the program's stay fixed).
    x = models.SBN_X
    k = 1
    guide = functools.partial(sbn_guide, make_estimator=lambda name, inp: neural(inp))
    params = {**models.sbn_init(), **sbn_baseline_params()}

    def label(name, leaf):
        return "train" if "$" in name else "freeze"

    labels = lambda p: {n: jax.tree.map(functools.partial(label, n), v) for n, v in p.items()}
    opt = optax.multi_transform({"train": optax.adam(3e-3), "freeze": optax.set_to_zero()},
                                labels)
    svi = sg.SVI(models.sbn_model, guide, opt, sg.ELBO(num_particles=k))
    state = svi.init(0, x, init_params_=params)
    result = svi.run(1, 1000, x, state=state, progress_bar=False)
    for name, value in models.sbn_init().items():
        np.testing.assert_array_equal(result.params[name], value)

    # No baseline: the same network with all weights 0 predicts b = 0 exactly (and the same
    # compiled gradient serves both measurements).
    zero = jax.tree.map(jnp.zeros_like, result.params)
    untrained = {**result.params, **{n: v for n, v in zero.items() if "$" in n}}
    loss = lambda key, p: sg.ELBO(num_particles=k).loss(key, p, models.sbn_model, guide, x)
    sample = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None)))
    keys = jax.random.split(jax.random.key(0), 2000)
    nvil, none = sample(keys, result.params), sample(keys, untrained)
    exact = jax.grad(models.sbn_exact)(models.sbn_init(), x)
    flip = lambda g: jax.tree.map(jnp.negative, program_part(g))  # loss -> objective gradient
    assert_unbiased(flip(nvil), exact)
    assert_unbiased(flip(none), exact)
    var_nvil, var_none = guide_variance(nvil), guide_variance(none)
    # measured (seeded, summed over the guide's parameters): 513.3 without a baseline,
    # 52.4 with the trained NVIL baselines
    assert var_nvil < 0.25 * var_none, (var_nvil, var_none)


def test_neural_baseline_on_a_site_outside_every_plate():
    # c is in no plate, the program has one: its signal is (K, 1); the network maps the
    # data summary (2,) to (1,), a trailing size-1 axis that is dropped.
    x = models.GL_X

    def guide(x):
        summary = jnp.stack([x.mean(), x.std()])
        c = sg.sample("c", dist.Bernoulli(logits=sg.param("phi", jnp.array(-0.4))),
                      estimator=sg.ScoreFunction(
                          baseline=sg.baselines.Neural(nn.Dense(1), inputs=summary)))
        m = sg.param("m", jnp.zeros(x.shape[0]))
        a = sg.param("shift", jnp.array(0.5))
        s = sg.param("log_s", jnp.array(-0.5))
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Normal(m + a * c, jnp.exp(s)))

    params = sg.init_params(0, models.global_local_model, guide, x)
    assert params["c$baseline"]["kernel"].shape == (2, 1)
    exact = jax.grad(models.global_local_exact)(program_part(params), x)
    samples = elbo_samples(sg.ELBO(), params, models.global_local_model, guide, x)
    assert_unbiased(program_part(samples), exact)


@pytest.mark.parametrize("value", [-3.0, np.linspace(-5.0, 3.0, models.MIX_N)],
                         ids=["scalar", "per-element"])
def test_constant_baseline_is_unbiased(value):
    x = models.MIX_X
    guide = mixture_with(sg.ScoreFunction(
        baseline=sg.baselines.Constant(jnp.asarray(value, jnp.float32))))
    params = sg.init_params(0, models.mixture_model, guide, x)
    exact = jax.grad(models.mixture_exact)(params, x)
    assert_unbiased(elbo_samples(sg.ELBO(), params, models.mixture_model, guide, x), exact)


@pytest.mark.parametrize("outer_first", [True, False], ids=["a-outer", "b-outer"])
@pytest.mark.parametrize("kind", ["constant", "neural"])
def test_per_element_baselines_are_laid_out_like_the_site(kind, outer_first):
    # A site z in two plates; its batch layout (b, a) need not be the canonical plate order.
    # Each element's cost is z * R + C + u with distinct offsets C and u ~ N(0, 1) drawn per
    # particle before z; a baseline C + u (so the network's inputs differ per particle), given
    # in the site's layout, leaves exactly the gradient of the cost z * R without baseline,
    # sample for sample. A transposed or shuffled layout, or mixed particles, would not.
    na, nb = 2, 3
    r = jnp.arange(1.0, 1.0 + na * nb).reshape(nb, na)
    c = 100.0 * jnp.arange(na * nb, dtype=jnp.float32).reshape(nb, na)

    def program(offset, estimator):
        theta = sg.param("theta", jnp.linspace(-1.0, 1.0, na * nb).reshape(nb, na))
        u = sg.sample("u", dist.Normal(0.0, 1.0))
        pa = sg.plate("a", na, dim=-1)
        pb = sg.plate("b", nb, dim=-2)
        first, second = (pa, pb) if outer_first else (pb, pa)
        with first, second:
            if offset is None:  # the reference: cost z * R, no baseline
                z = sg.sample("z", dist.Bernoulli(logits=theta), estimator=sg.ScoreFunction())
                sg.factor("cost", z * r)
            else:
                z = sg.sample("z", dist.Bernoulli(logits=theta), estimator=estimator(offset + u))
                sg.factor("cost", z * r + offset + u)

    def with_baseline(value):
        if kind == "constant":
            return sg.ScoreFunction(baseline=sg.baselines.Constant(value))
        return sg.ScoreFunction(baseline=sg.baselines.Neural(Identity(), inputs=value))

    fn = functools.partial(program, c, with_baseline)
    plain = functools.partial(program, None, None)
    params = sg.init_params(0, fn)
    obj = sg.Expectation(num_particles=2)
    keys = jax.random.split(jax.random.key(0), 8)
    ours = jax.vmap(lambda key: jax.grad(obj.loss, argnums=1)(key, params, fn))(keys)
    reference = jax.vmap(lambda key: jax.grad(obj.loss, argnums=1)(
        key, program_part(params), plain))(keys)
    np.testing.assert_allclose(ours["theta"], reference["theta"], rtol=1e-4, atol=1e-3)


def test_training_term_trains_only_the_baseline_and_the_score_term_only_the_program():
    # A hand-built context: log q and the inputs depend on the program's parameter theta,
    # the baseline's prediction on psi.
    k, n, d = 3, 5, 2
    module = MLP()
    inputs0 = jax.random.normal(jax.random.key(1), (n, d))
    psi = module.init(jax.random.key(2), inputs0)["params"]
    signal = jax.random.normal(jax.random.key(3), (k, n)) * 3.0 + 1.0
    values = jax.random.bernoulli(jax.random.key(4), 0.5, (k, n)).astype(jnp.float32)
    est = sg.ScoreFunction(baseline=sg.baselines.Neural(module, inputs=inputs0))

    def ctx(theta, psi):
        inputs = jnp.broadcast_to(inputs0 * theta, (k, n, d))
        return ScoreContext(
            name="w", log_prob=models.bern_logp(values, theta * jnp.ones((k, n))),
            learning_signal=signal, state={}, num_particles=k, value=values,
            collected={"inputs": inputs, "batch_shape": jnp.zeros((k, n, 0))},
            params={"baseline": psi}, to_value_layout=lambda x: x)

    def mse(theta, psi):  # what the training term minimises (the surrogate is maximised)
        pred = jax.vmap(lambda x: module.apply({"params": psi}, x))(
            jnp.broadcast_to(inputs0 * theta, (k, n, d)))
        return jnp.mean((signal - pred) ** 2)

    @jax.jit
    def parts(theta, psi):
        train = lambda t, p: est.baseline.training_term(ctx(t, p))
        score = lambda t, p: Estimator.surrogate_term(est, ctx(t, p))[0]
        pred = est.baseline.predict(ctx(theta, psi))
        return (train(theta, psi), score(theta, psi), jax.grad(train, (0, 1))(theta, psi),
                jax.grad(score, (0, 1))(theta, psi), jax.grad(mse, 1)(theta, psi), pred)

    theta = jnp.array(0.7)
    train, score, d_train, d_score, d_mse, pred = parts(theta, psi)
    assert float(train) == 0.0 and float(score) == 0.0  # values 0
    assert float(d_train[0]) == 0.0  # the program gets nothing from the training term
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(d_score[1]))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 d_train[1], jax.tree.map(lambda g: -g, d_mse))
    # the score term's gradient: -(1/K) sum b * d log q / d theta, b the prediction
    dlogq = values - jax.nn.sigmoid(theta)
    np.testing.assert_allclose(float(d_score[0]), float(-(pred * dlogq).sum() / k), rtol=1e-5)


def test_end_to_end_neural_equals_a_constant_at_its_prediction_and_trains_on_the_signal():
    x = jnp.asarray(models.MIX_X)
    inputs = x[:, None]
    guide = mixture_with(neural(inputs))
    params = sg.init_params(0, models.mixture_model, guide, x)
    pred = MLP().apply({"params": params["z$baseline"]}, inputs)
    fixed = mixture_with(sg.ScoreFunction(sg.baselines.Constant(pred)))
    plain = mixture_with(sg.ScoreFunction())
    obj = sg.ELBO(num_particles=2)

    @jax.jit
    def run(key, params):
        grad = jax.value_and_grad(obj.loss, argnums=1)
        loss, grads = grad(key, params, models.mixture_model, guide, x)
        loss_fixed, grads_fixed = grad(key, program_part(params), models.mixture_model,
                                       fixed, x)
        loss_plain = obj.loss(key, program_part(params), models.mixture_model, plain, x)
        recording = sg.ELBO(num_particles=2)
        recording.record_signals = True
        _, (_, metrics) = recording.loss_with_state(key, params, None, models.mixture_model,
                                                    guide, x)
        return loss, grads, loss_fixed, grads_fixed, loss_plain, metrics["learning_signals"]["z"]

    loss, grads, loss_fixed, grads_fixed, loss_plain, signal = run(jax.random.key(7), params)
    # the program's gradient is that of a Constant baseline at the network's prediction
    for name in program_part(params):
        np.testing.assert_allclose(grads[name], grads_fixed[name], rtol=1e-5, atol=1e-5)
    # psi's gradient is that of the regression loss mean((Q - b_psi(x))^2) on this sample
    assert signal.shape == (2, models.MIX_N)

    def mse(psi):
        return jnp.mean((signal - MLP().apply({"params": psi}, inputs)) ** 2)

    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 grads["z$baseline"], jax.grad(mse)(params["z$baseline"]))
    # every added term has value 0: the loss is the plain ELBO estimate
    np.testing.assert_allclose([loss, loss_fixed], [loss_plain, loss_plain], rtol=1e-6)


def test_normalised_neural_baseline_is_a_scaled_unbiased_estimator():
    # With running mean c and variance v of Q - b_psi(x) (from earlier steps), the score
    # term uses (Q - b_psi(x) - c) / max(1, sqrt(v)): the guide's gradient (score term plus
    # the zero-mean pathwise term of -log q) is the exact one divided by max(1, sqrt(v)) = 2
    # here; the model's is unchanged.
    x = jnp.asarray(models.MIX_X)
    guide = mixture_with(neural(x[:, None], normalise=True, decay=0.5))
    params = sg.init_params(0, models.mixture_model, guide, x)
    c, v = -3.0, 4.0  # steps = 1, decay 0.5: bias correction 1 - 0.5 = 0.5
    state = {"z": {"mean": jnp.float32(0.5 * c), "square": jnp.float32(0.5 * (v + c**2)),
                   "steps": jnp.int32(1)}}
    exact = jax.grad(models.mixture_exact)(program_part(params), x)
    scaled = {k: g / 2.0 if k in ("a", "b") else g for k, g in exact.items()}
    samples = elbo_samples(sg.ELBO(), params, models.mixture_model, guide, x, state=state)
    assert_unbiased(program_part(samples), scaled)


def test_normalised_neural_baseline_first_step_centres_on_the_batch():
    # Before any running mean exists, b_psi is trained on Q - mean(Q - b_psi), not on the raw
    # signal Q (which would be one huge gradient for Adam to remember).
    x = jnp.asarray(models.MIX_X)
    inputs = x[:, None]
    guide = mixture_with(neural(inputs, normalise=True))
    params = sg.init_params(0, models.mixture_model, guide, x)
    obj = sg.ELBO(num_particles=2)
    obj.record_signals = True
    state = obj.init_state(0, params, models.mixture_model, guide, x)
    loss = lambda p, k: obj.loss_with_state(k, p, state, models.mixture_model, guide, x)
    (_, (_, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params, jax.random.key(3))
    signal = metrics["learning_signals"]["z"]

    def mse(psi, centre):
        pred = MLP().apply({"params": psi}, inputs)
        c = jnp.mean(signal - pred) if centre else 0.0
        return jnp.mean((signal - jax.lax.stop_gradient(c) - pred) ** 2)

    psi = params["z$baseline"]
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 grads["z$baseline"], jax.grad(mse)(psi, True))
    raw = jax.grad(mse)(psi, False)  # the gradient on the raw signal is much larger
    assert float(jnp.abs(raw["Dense_0"]["bias"]).max()) > 3 * float(
        jnp.abs(grads["z$baseline"]["Dense_0"]["bias"]).max())


def test_normalised_neural_baseline_trains_and_stays_finite():
    x = jnp.asarray(models.MIX_X)
    guide = mixture_with(neural(x[:, None], normalise=True))
    svi = sg.SVI(models.mixture_model, guide, optax.adam(1e-2), sg.ELBO())
    steps = 300
    result = svi.run(0, steps, x, progress_bar=False)
    assert np.all(np.isfinite(result.losses))
    leaves = jax.tree.leaves((result.params, result.state.estimator_state))
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    st = result.state.estimator_state["z"]
    assert int(st["steps"]) == steps and float(st["square"]) > 0.0
    assert result.losses[-50:].mean() < result.losses[:50].mean()  # it learns


def test_errors_are_explicit():
    with pytest.raises(TypeError, match="inputs"):
        sg.baselines.Neural(MLP())
    with pytest.raises(ValueError, match="decay"):
        sg.baselines.Neural(MLP(), inputs=jnp.ones((2, 2)), decay=1.0)
    x = jnp.asarray(models.MIX_X)
    params = {"mu": jnp.array([-1.0, 1.0]), "prior_logit": jnp.array(0.0),
              "a": jnp.array(0.5), "b": jnp.array(0.0)}
    loss = lambda guide: jax.eval_shape(  # errors raised while tracing
        lambda p: sg.ELBO().loss(0, p, models.mixture_model, guide, x), params)
    with pytest.raises(KeyError, match=r"z\$baseline"):  # params without the baseline's
        loss(mixture_with(neural(x[:, None])))
    with pytest.raises(ValueError, match="plate elements"):
        loss(mixture_with(sg.ScoreFunction(baseline=sg.baselines.Constant(jnp.zeros(3)))))
