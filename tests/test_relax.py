"""REBAR and RELAX: unbiasedness against exact gradients by enumeration (logits exactly 0
among the cases, a plate, ELBO and Expectation; Bernoulli sites, Categorical sites of 5
classes for RELAX and one-hot categorical sites of 5 classes for REBAR), the variance on
Tucker et al.'s toy problem (and categorical versions) after training the control variate,
and the errors."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from tests import models
from tests.stats import assert_unbiased

NUM_SAMPLES = 4000


class ElementCV(nn.Module):
    """A control variate applied to each element of ``z`` (and its input) separately."""

    @nn.compact
    def __call__(self, z, x=None):
        h = z[..., None] if x is None else jnp.stack([z, x], -1)
        return nn.Dense(1)(nn.tanh(nn.Dense(8)(h)))[..., 0]


class BlockCV(nn.Module):
    """A control variate of a whole event block ``z`` (no plate): one value."""

    @nn.compact
    def __call__(self, z):
        return nn.Dense(1)(nn.tanh(nn.Dense(8)(z)))


# Compiling dominates these tests (the samples take a fraction of a second): XLA's backend
# optimisations off compile about 3x faster, as in test_sharding.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _samples(objective, program_args, params, num_samples=NUM_SAMPLES, seed=0,
             compiler_options=None):
    loss = lambda k, p: objective.loss(k, p, *program_args)  # noqa: E731
    grad = lambda k: jax.tree.map(jnp.negative, jax.grad(loss, argnums=1)(k, params))  # noqa: E731
    g = jax.jit(jax.vmap(grad), compiler_options=compiler_options)(
        jax.random.split(jax.random.key(seed), num_samples))
    return {n: v for n, v in g.items() if "$" not in n}


def _program_params(tree: dict) -> dict:
    return {n: v for n, v in tree.items() if "$" not in n}


# --- Expectation, an event block of three Bernoullis, a nonlinear cost, a logit exactly 0 --

W = jnp.array([1.0, -2.0, 0.5])


def block_program(estimator):
    eta = sg.param("eta", jnp.array([0.0, 1.0, -1.5]))
    z = sg.sample("z", dist.Bernoulli(logits=eta).to_event(1), estimator=estimator)
    sg.factor("f", jnp.sin(z @ W) + 2.0 * z[0] * z[1])


def block_exact(p):
    z = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))
    lq = models.bern_logp(z, p["eta"]).sum(-1)
    return jnp.sum(jnp.exp(lq) * (jnp.sin(z @ W) + 2.0 * z[:, 0] * z[:, 1]))


@pytest.mark.parametrize("estimator,k", [(sg.REBAR(relaxation="first_order"), 2),
                                         (sg.REBAR(), 1), (sg.REBAR(), 3),
                                         (sg.RELAX(BlockCV()), 1), (sg.RELAX(BlockCV()), 3)],
                         ids=["rebar-first-order-k2", "rebar-k1", "rebar-k3", "relax-k1",
                              "relax-k3"])
def test_unbiased_expectation_block(estimator, k):
    program = functools.partial(block_program, estimator)
    params = sg.init_params(0, program)
    if "z$eta" in params:  # a control variate that is far from 0: its part must cancel
        params["z$eta"], params["z$log_temperature"] = jnp.float32(0.7), jnp.float32(-1.0)
    exact = jax.grad(block_exact)(_program_params(params))
    assert_unbiased(_samples(sg.Expectation(num_particles=k), (program,), params), exact)


# --- ELBO, one Bernoulli per data point in a plate (logits exactly 0 at x = 0 offsets) -----

def mixture_model_of_a_real_bit(x):
    """:func:`models.mixture_model` with the component's mean linear in the bit (the same at 0
    and 1), so that exact REBAR can put the relaxed bit in its place (an index cannot take it)."""
    mu = sg.param("mu", jnp.array([-1.0, 1.0]))
    prior = sg.param("prior_logit", jnp.array(0.0))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=prior))
        sg.sample("x", dist.Normal(mu[0] + (mu[1] - mu[0]) * z, 1.0), obs=x)


@pytest.mark.parametrize("estimator", [sg.REBAR(temperature_init=0.3, eta_init=0.8),
                                       sg.REBAR(temperature_init=0.3, eta_init=0.8,
                                                relaxation="first_order"),
                                       sg.RELAX(ElementCV(), inputs=models.MIX_X)],
                         ids=["rebar", "rebar-first-order", "relax-inputs"])
def test_unbiased_elbo_plate(estimator):
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=estimator)
    model = mixture_model_of_a_real_bit
    params = sg.init_params(0, model, guide, x)
    assert float(params["b"]) == 0.0
    exact = jax.grad(models.mixture_exact)(_program_params(params), x)
    samples = _samples(sg.ELBO(num_particles=2), (model, guide, x), params)
    assert_unbiased(samples, exact)
    assert_unbiased({n: samples[n] for n in ("a", "b")}, {n: exact[n] for n in ("a", "b")})


# --- RELAX on Categorical sites: a plate of two 5-class sites, one with logits exactly 0 ----

CAT_LOGITS = jnp.array([[0.0, 0.0, 0.0, 0.0, 0.0], [1.2, -0.4, 0.3, -1.5, 0.6]])
CAT_F = jnp.array([[1.0, -2.0, 0.5, 3.0, -1.0], [2.0, 0.0, -3.0, 1.5, 4.0]])


class SoftmaxCV(nn.Module):
    """The authors' control variate for a Categorical (BackpropThroughTheVoidRL): the relaxed
    sample ``softmax(z / lambda)``, ``lambda`` learned (``log lambda`` from 0), into a network;
    one value per plate element."""

    @nn.compact
    def __call__(self, z):  # (..., C) -> (...)
        log_t = self.param("log_temperature", nn.initializers.zeros, ())
        h = jax.nn.softmax(z / jnp.exp(log_t), axis=-1)
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(h)))[..., 0]


def cat_program(estimator):
    with sg.plate("n", 2):
        z = sg.sample("z", dist.Categorical(logits=sg.param("l", CAT_LOGITS)),
                      estimator=estimator)
        sg.factor("f", CAT_F[jnp.arange(2), z])


def _softmax_grad(logits, h):
    """``d/d logits sum_c softmax(logits)_c h_c`` (rows independent), in numpy (no compile)."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p * (h - np.sum(p * h, -1, keepdims=True))


def cat_exact_grad(params):
    return {"l": _softmax_grad(np.asarray(params["l"], np.float64), np.asarray(CAT_F))}


CAT_X = jnp.array([0.3, 2.1])
CAT_MU = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0])
CAT_PRIOR = jnp.log(jnp.array([0.1, 0.3, 0.2, 0.25, 0.15]))


def cat_model():
    with sg.plate("n", 2):
        z = sg.sample("z", dist.Categorical(logits=CAT_PRIOR))
        sg.sample("x", dist.Normal(CAT_MU[z], 1.0), obs=CAT_X)


def cat_guide(estimator):
    with sg.plate("n", 2):
        sg.sample("z", dist.Categorical(logits=sg.param("l", CAT_LOGITS)), estimator=estimator)


def cat_elbo_exact_grad(params):
    """``E_q[log p(x, z) - log q(z)]`` per element is ``sum_c q_c h_c`` with ``h = lp - log q``;
    its gradient is that of ``sum_c q_c h_c`` at ``h`` fixed (``E_q[d log q] = 0``)."""
    logits = np.asarray(params["l"], np.float64)
    lq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    lp = (np.asarray(CAT_PRIOR, np.float64) - 0.5 * (np.asarray(CAT_X)[:, None]
          - np.asarray(CAT_MU)) ** 2 - 0.5 * np.log(2 * np.pi))
    return {"l": _softmax_grad(logits, lp - lq)}


def _moved(cv: dict, seed: int = 3) -> dict:
    """The control variate's params far from their initial values (so that a part of its
    term that did not cancel would show as a bias)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + 1.5 * rng.normal(size=np.shape(x))
                        .astype(np.float32), cv)


@pytest.mark.parametrize("k,elbo", [(1, False), (3, True)], ids=["expectation-k1", "elbo-k3"])
def test_categorical_unbiased_plate(k, elbo):
    """5 classes, logits exactly 0 in the first plate element; the leave-one-out baseline at
    K = 3; under ELBO the site's own -log q is among its costs."""
    estimator = sg.RELAX(SoftmaxCV())
    if elbo:
        guide = functools.partial(cat_guide, estimator)
        args, objective, exact = (cat_model, guide), sg.ELBO(num_particles=k), cat_elbo_exact_grad
        params = sg.init_params(0, cat_model, guide)
    else:
        program = functools.partial(cat_program, estimator)
        args, objective, exact = (program,), sg.Expectation(num_particles=k), cat_exact_grad
        params = sg.init_params(0, program)
    params["z$control_variate"] = _moved(params["z$control_variate"])
    assert_unbiased(_samples(objective, args, params, compiler_options=FAST_COMPILE),
                    exact(params))


# --- REBAR on one-hot categorical sites: the relaxed value on the simplex -------------------

def one_hot_program(estimator):
    """A nonlinear cost of the one-hot value (it accepts a point of the simplex)."""
    with sg.plate("n", 2):
        b = sg.sample("z", dist.OneHotCategorical(logits=sg.param("l", CAT_LOGITS)),
                      estimator=estimator)
        h = jnp.sum(b * CAT_F, axis=-1)
        sg.factor("f", jnp.sin(h) + 0.5 * h**2)


def one_hot_exact_grad(params):
    h = np.asarray(CAT_F, np.float64)
    return {"l": _softmax_grad(np.asarray(params["l"], np.float64), np.sin(h) + 0.5 * h**2)}


def one_hot_model():
    with sg.plate("n", 2):
        b = sg.sample("z", dist.OneHotCategorical(logits=CAT_PRIOR))
        sg.sample("x", dist.Normal(b @ CAT_MU, 1.0), obs=CAT_X)


def one_hot_guide(estimator):
    with sg.plate("n", 2):
        sg.sample("z", dist.OneHotCategorical(logits=sg.param("l", CAT_LOGITS)),
                  estimator=estimator)


@pytest.mark.parametrize("k,elbo,relaxation", [(1, False, "exact"), (3, False, "exact"),
                                               (2, True, "exact"), (2, False, "first_order"),
                                               (2, False, "relax")],
                         ids=["expectation-k1", "expectation-k3", "elbo-k2", "first-order-k2",
                              "relax-k2"])
def test_rebar_one_hot_unbiased_plate(k, elbo, relaxation):
    """5 classes, logits exactly 0 in the first plate element; the control variate far from 0
    (scale 0.7, temperature e^-1, or RELAX's network moved), so a part of it that did not
    cancel would show; under ELBO the site's own -log q (linear in b) and the model's x take
    the relaxed value too (the same exact gradient as the index-valued model above)."""
    estimator = (sg.RELAX(SoftmaxCV()) if relaxation == "relax" else
                 sg.REBAR(temperature_init=math.exp(-1.0), eta_init=0.7, relaxation=relaxation))
    if elbo:
        guide = functools.partial(one_hot_guide, estimator)
        args, objective, exact = ((one_hot_model, guide), sg.ELBO(num_particles=k),
                                  cat_elbo_exact_grad)
        params = sg.init_params(0, one_hot_model, guide)
    else:
        program = functools.partial(one_hot_program, estimator)
        args, objective, exact = (program,), sg.Expectation(num_particles=k), one_hot_exact_grad
        params = sg.init_params(0, program)
    if relaxation == "relax":
        params["z$control_variate"] = _moved(params["z$control_variate"])
    else:
        assert sorted(n for n in params if "$" in n) == ["z$eta", "z$log_temperature"]
    assert_unbiased(_samples(objective, args, params, compiler_options=FAST_COMPILE),
                    exact(params))


# --- Tucker et al.'s toy problem: f(b) = (b - t)^2, one Bernoulli with logit theta ----------

T = 0.45


def toy(estimator):
    theta = sg.param("theta", jnp.array(0.0))
    b = sg.sample("b", dist.Bernoulli(logits=theta), estimator=estimator)
    sg.factor("f", -((b - T) ** 2))


def _train_control_variate(estimator, k, steps=500, lr=0.02, toy=toy):
    """Adam on the estimator's parameters only (theta fixed at 0), by the variance term."""
    program, objective = functools.partial(toy, estimator), sg.Expectation(num_particles=k)
    params = sg.init_params(0, program)
    cv = {n: v for n, v in params.items() if "$" in n}
    opt = optax.adam(lr)

    def step(carry, key):
        cv, state = carry
        g = jax.grad(objective.loss, argnums=1)(key, {**params, **cv}, program)
        updates, state = opt.update({n: g[n] for n in cv}, state)
        return (optax.apply_updates(cv, updates), state), None

    (cv, _), _ = jax.jit(lambda c: jax.lax.scan(
        step, c, jax.random.split(jax.random.key(1), steps)))((cv, opt.init(cv)))
    return program, objective, {**params, **cv}


def _theta_grads(program, objective, params, n=20000):
    keys = jax.random.split(jax.random.key(7), n)
    g = jax.jit(jax.vmap(
        lambda key: -jax.grad(objective.loss, argnums=1)(key, params, program)["theta"]))(keys)
    g = np.asarray(g, np.float64)
    sq = ((g - g.mean(0)) ** 2).reshape(n, -1).sum(-1)  # the trace for a vector of logits
    return g, sq.mean(), sq.std() / np.sqrt(n)  # samples, variance, its standard error


def test_variance_ordering_on_the_toy_problem():
    exact = 0.25 * (T**2 - (1 - T) ** 2)  # d/d theta E[-(b - t)^2] at theta = 0
    sf = _theta_grads(functools.partial(toy, sg.ScoreFunction()), sg.Expectation(), {"theta":
                                                                                      0.0})
    rloo = _theta_grads(functools.partial(toy, sg.RLOO()), sg.Expectation(num_particles=2),
                        {"theta": 0.0})
    first_order = _theta_grads(*_train_control_variate(sg.REBAR(relaxation="first_order"), 2))
    # the paper's REBAR: f(sigma(z / lambda)) is a weak control variate here, so it takes
    # longer training to show (eta 1.2, lambda 12.7 after these steps at K = 1)
    rebar = _theta_grads(*_train_control_variate(sg.REBAR(), 1, steps=2000, lr=0.05))
    rebar2 = _theta_grads(*_train_control_variate(sg.REBAR(), 2, steps=2000, lr=0.05))
    relax = _theta_grads(*_train_control_variate(sg.RELAX(ElementCV()), 1))
    print(f"variance: SF (K=1) {sf[1]:.3e}, RLOO (K=2) {rloo[1]:.3e}, REBAR (K=1) {rebar[1]:.3e}, "
          f"REBAR (K=2) {rebar2[1]:.3e}, first-order REBAR (K=2) {first_order[1]:.3e}, "
          f"RELAX (K=1) {relax[1]:.3e}")
    for g, _, _ in (sf, rloo, rebar, rebar2, first_order, relax):
        assert_unbiased({"theta": g}, {"theta": np.float64(exact)}, min_power=0.0)

    def below(a, b, z=4.0):  # var(a) < var(b) by more than z standard errors of the difference
        assert a[1] + z * np.hypot(a[2], b[2]) < b[1], (a[1], b[1])

    below(relax, rebar)  # RELAX below REBAR below the score function, one sample each
    below(rebar, sf)
    below(rebar2, rloo)  # and at K = 2 REBAR (its c(z~) centred too) below RLOO
    # first-order REBAR with K = 2 against the score function averaged over two samples
    below(first_order, (None, sf[1] / 2, sf[2] / 2))
    below(relax, rloo)  # one relaxed sample beats the leave-one-out pair


# --- a categorical version of the toy problem: f(b) = (t_b - 0.45)^2, 5 classes, logits 0 -----

T5 = jnp.linspace(0.0, 1.0, 5)


def cat_toy(estimator):
    theta = sg.param("theta", jnp.zeros(5))
    b = sg.sample("b", dist.Categorical(logits=theta), estimator=estimator)
    sg.factor("f", -((T5[b] - T) ** 2))


def test_categorical_variance_below_the_score_function_after_training():
    """The plain score function's variance (trace over the 5 logits) exactly by enumeration;
    RELAX's sampled at its initial and at its trained control variate. One scan (one compiled
    gradient) does all: batches of samples at the initial params, Adam steps on the batch-mean
    variance gradient, batches at the trained params."""
    p, f = np.full(5, 0.2), -((np.asarray(T5, np.float64) - T) ** 2)
    s2 = np.sum((np.eye(5) - p) ** 2, -1)  # |d log p(b) / d theta|^2 per class b
    exact = _softmax_grad(np.zeros(5), f)
    sf = float(np.sum(p * f**2 * s2) - np.sum(exact**2))

    program, objective = functools.partial(cat_toy, sg.RELAX(SoftmaxCV())), sg.Expectation()
    params = sg.init_params(0, program)
    opt, batch, measure, train = optax.adam(0.03), 100, 100, 150

    def step(carry, inputs):
        cv, state = carry
        key, training = inputs
        g = jax.vmap(lambda k: jax.grad(objective.loss, argnums=1)(
            k, {**params, "b$control_variate": cv}, program))(jax.random.split(key, batch))
        updates, new_state = opt.update(jax.tree.map(lambda x: x.mean(0),
                                                     g["b$control_variate"]), state)
        new = (optax.apply_updates(cv, updates), new_state)
        carry = jax.tree.map(lambda a, b: jnp.where(training, a, b), new, carry)
        return carry, -g["theta"]

    flags = jnp.arange(2 * measure + train)
    flags = (flags >= measure) & (flags < measure + train)
    keys = jax.random.split(jax.random.key(1), flags.shape[0])
    cv = params["b$control_variate"]
    _, g = jax.jit(lambda c: jax.lax.scan(step, c, (keys, flags)),
                   compiler_options=FAST_COMPILE)((cv, opt.init(cv)))
    g = np.asarray(g, np.float64)
    out = []
    for samples in (g[:measure].reshape(-1, 5), g[measure + train:].reshape(-1, 5)):
        assert_unbiased({"theta": samples}, {"theta": exact}, min_power=0.0)
        sq = ((samples - samples.mean(0)) ** 2).sum(-1)
        out.append((sq.mean(), sq.std() / np.sqrt(sq.shape[0])))
    (v0, se0), (v1, se1) = out
    c = np.sum(p * f * s2) / np.sum(p * s2)  # the constant baseline of least variance
    best_constant = float(np.sum(p * (f - c) ** 2 * s2) - np.sum(exact**2))
    print(f"variance (trace): SF {sf:.3e}, SF with the best constant baseline "
          f"{best_constant:.3e}, RELAX initial {v0:.3e} +- {se0:.1e}, trained {v1:.3e} +- "
          f"{se1:.1e}")
    assert v1 + 4 * np.hypot(se0, se1) < v0
    assert v1 + 4 * se1 < sf
    assert v1 + 4 * se1 < best_constant  # the relaxed sample is used, not only a constant


def one_hot_toy(estimator):
    theta = sg.param("theta", jnp.zeros(5))
    b = sg.sample("b", dist.OneHotCategorical(logits=theta), estimator=estimator)
    sg.factor("f", -((b @ T5 - T) ** 2))


def test_rebar_one_hot_variance_below_the_score_function_and_rloo():
    """The categorical toy problem written with one-hot values: REBAR's control variate
    ``f(softmax(z / lambda))`` trained (its ``eta`` and ``lambda``) lowers the variance (trace
    over the 5 logits) below the plain score function's, exact by enumeration, at K = 1, and
    below RLOO's at K = 2."""
    p, f = np.full(5, 0.2), -((np.asarray(T5, np.float64) - T) ** 2)
    s2 = np.sum((np.eye(5) - p) ** 2, -1)
    exact = _softmax_grad(np.zeros(5), f)
    sf = float(np.sum(p * f**2 * s2) - np.sum(exact**2))
    rloo = _theta_grads(functools.partial(one_hot_toy, sg.RLOO()),
                        sg.Expectation(num_particles=2), {"theta": jnp.zeros(5)})
    rebar = [_theta_grads(*_train_control_variate(sg.REBAR(), k, steps=2000, lr=0.05,
                                                  toy=one_hot_toy)) for k in (1, 2)]
    print(f"variance (trace): SF (K=1) {sf:.3e}, RLOO (K=2) {rloo[1]:.3e}, REBAR (K=1) "
          f"{rebar[0][1]:.3e} +- {rebar[0][2]:.1e}, REBAR (K=2) {rebar[1][1]:.3e} +- "
          f"{rebar[1][2]:.1e}")
    for g, _, _ in (rloo, *rebar):
        assert_unbiased({"theta": g}, {"theta": exact}, min_power=0.0)
    assert rebar[0][1] + 4 * rebar[0][2] < sf
    assert rebar[1][1] + 4 * np.hypot(rebar[1][2], rloo[2]) < rloo[1]


# --- errors -----------------------------------------------------------------------------------

def test_categorical_errors():
    def program(estimator, event=False, normal=False):
        fn = dist.Categorical(logits=sg.param("l", jnp.zeros((2, 3))))
        fn = dist.Normal(jnp.zeros(2), 1.0) if normal else fn.to_event(1) if event else fn
        with sg.plate("n", 2) if not event else contextlib.nullcontext():
            c = sg.sample("c", fn, estimator=estimator)
        sg.factor("f", jnp.sum(c).astype(jnp.float32))

    cases = [(sg.REBAR(), {}, "class index.*dist.OneHotCategorical.*sg.RELAX"),
             (sg.REBAR(), {"normal": True}, "needs a Bernoulli, a OneHotCategorical site"),
             (sg.RELAX(SoftmaxCV()), {"event": True}, r"Categorical under \.to_event.*sg.plate"),
             (sg.RELAX(SoftmaxCV()), {"normal": True}, "a OneHotCategorical or a Categorical site")]
    for estimator, kwargs, match in cases:
        fn = functools.partial(program, estimator, **kwargs)
        with pytest.raises(sg.SiteError, match="'c'.*" + match) as info:
            sg.Expectation(num_particles=2).loss(0, {"l": jnp.zeros((2, 3))}, fn)
        assert info.value.site == "c"


@pytest.mark.parametrize("estimator", [sg.REBAR(), sg.RELAX(ElementCV())], ids=["rebar", "relax"])
def test_error_under_iwae(estimator):
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=estimator)
    params = sg.init_params(0, models.mixture_model, guide, x)
    with pytest.raises(sg.SiteError, match="'z'.*multi-sample bound") as info:
        sg.IWAE(num_particles=2).loss(0, params, models.mixture_model, guide, x)
    assert info.value.site == "z"


def test_rebar_errors():
    program = functools.partial(toy, sg.REBAR(relaxation="first_order"))
    params = sg.init_params(0, program)
    assert sorted(params) == ["b$eta", "b$log_temperature", "theta"]
    with pytest.raises(sg.SiteError, match="'b'.*num_particles >= 2"):
        sg.Expectation(num_particles=1).loss(0, params, program)
    with pytest.raises(sg.SiteError, match=r"'b'.*b\$eta.*sg.init_params"):
        sg.Expectation(num_particles=2).loss(0, {"theta": jnp.zeros(())}, program)
    with pytest.raises(ValueError, match="temperature_init"):
        sg.REBAR(temperature_init=0.0)
    with pytest.raises(ValueError, match="relaxation"):
        sg.REBAR(relaxation="second_order")

    def summed():  # exact REBAR changes every element at once: a cost over the plate is refused
        theta = sg.param("theta", jnp.zeros(3))
        with sg.plate("n", 3):
            b = sg.sample("b", dist.Bernoulli(logits=theta), estimator=sg.REBAR())
        sg.factor("f", -jnp.sum(b) ** 2)

    with pytest.raises(sg.SiteError, match="'b'.*plate 'n'"):
        sg.Expectation().loss(0, sg.init_params(0, summed), summed)


def test_exact_rebar_refuses_a_cost_that_takes_the_bit_as_an_index():
    """models.mixture_model picks the component's mean by ``mu[z.astype(int)]``: at a relaxed
    value the index jumps, so the relaxed control variate would bias the gradient."""
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=sg.REBAR())
    params = sg.init_params(0, models.mixture_model, guide, x)
    with pytest.raises(sg.SiteError, match="'z'.*cost 'x'.*without a gradient") as info:
        sg.ELBO(num_particles=2).loss(0, params, models.mixture_model, guide, x)
    assert info.value.site == "z"
    first_order = functools.partial(models.mixture_guide,
                                    estimator=sg.REBAR(relaxation="first_order"))
    assert jnp.isfinite(sg.ELBO(num_particles=2).loss(0, params, models.mixture_model,
                                                      first_order, x))
    with pytest.raises(TypeError, match="instance"):
        sg.RELAX(ElementCV)


def test_variance_term_changes_no_value_and_trains_only_its_parameters():
    program = functools.partial(toy, sg.RELAX(ElementCV()))
    params = sg.init_params(0, program)
    objective = sg.Expectation(num_particles=2)
    loss, grads = jax.value_and_grad(objective.loss, argnums=1)(0, params, program)
    plain = sg.Expectation(num_particles=2).loss(0, {"theta": params["theta"]},
                                                 functools.partial(toy, sg.RLOO()))
    assert float(loss) == pytest.approx(float(plain))
    cv_grads = jax.tree.leaves(grads["b$control_variate"])
    assert any(float(jnp.abs(g).sum()) > 0 for g in cv_grads)
