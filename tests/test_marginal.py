"""Model-side enumeration: ``infer={"enumerate": "parallel"}`` sums a discrete site out exactly.

Exact references are closed forms in plain JAX (a Gaussian mixture's log-likelihood) and sums
over the guide's discrete values."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from tests.stats import assert_unbiased, grad_samples, mean_and_se

N = 20
X = np.asarray(jax.random.normal(jax.random.key(1), (N,)) * 2.0, dtype=np.float32)
ENUM = {"enumerate": "parallel"}


def mixture(x, shift=0.0, subsample=None):
    w = sg.param("w", jnp.array([0.2, -0.1, 0.3]))
    mu = sg.param("mu", jnp.array([-2.0, 0.0, 2.5]))
    with sg.plate("data", N, subsample_size=subsample) as idx:
        z = sg.sample("z", dist.Categorical(logits=w), infer=ENUM)
        sg.sample("x", dist.Normal(mu[z] + shift, 1.0), obs=jnp.asarray(x)[idx])


def no_guide(x):
    pass


def mixture_log_lik(w, mu, x, shift=0.0):
    """sum_n log sum_k softmax(w)_k N(x_n | mu_k + shift, 1), in closed form."""
    lw = jax.nn.log_softmax(w)
    return jnp.sum(jax.nn.logsumexp(lw + dist.Normal(mu + shift, 1.0).log_prob(x[:, None]),
                                    axis=-1))


def test_mixture_log_likelihood_and_gradient_are_exact():
    params = sg.init_params(0, mixture, no_guide, X)
    exact = lambda p: mixture_log_lik(p["w"], p["mu"], X)  # noqa: E731
    for obj in (sg.ELBO(), sg.IWAE(num_particles=3), sg.RWS(num_particles=2)):
        loss, grad = jax.value_and_grad(obj.loss, argnums=1)(jax.random.key(0), params,
                                                             mixture, no_guide, X)
        np.testing.assert_allclose(-loss, exact(params), rtol=1e-6)
        if not isinstance(obj, sg.RWS):  # RWS: the wake-theta gradient, the same here
            for k, v in jax.grad(exact)(params).items():
                np.testing.assert_allclose(-grad[k], v, rtol=1e-5, atol=1e-5)


def test_graph_shows_the_marginal_cost():
    scg = sg.graph(mixture, no_guide, X)
    assert list(scg.costs) == ["log sum_{z} p"]
    assert scg.costs["log sum_{z} p"].plates == ("data",)


@pytest.mark.parametrize("estimator", [sg.ScoreFunction(), sg.RLOO()])
def test_global_sampled_latent_with_local_sums_is_unbiased(estimator):
    """A discrete global latent sampled by the guide (score function) is credited with the
    marginal of the local terms: unbiased against the exact sum over its two values."""
    def model(x):
        g = sg.sample("g", dist.Bernoulli(probs=0.4))
        mixture(x, shift=g)

    def guide(x):
        sg.sample("g", dist.Bernoulli(logits=sg.param("v", 0.3)), estimator=estimator)

    params = sg.init_params(0, model, guide, X)

    def exact(p):
        total = 0.0
        for g in (0.0, 1.0):
            lq = dist.Bernoulli(logits=p["v"]).log_prob(g)
            lp = dist.Bernoulli(probs=0.4).log_prob(g)
            total = total + jnp.exp(lq) * (lp + mixture_log_lik(p["w"], p["mu"], X, g) - lq)
        return total

    obj = sg.ELBO(num_particles=4)
    assert "log sum_{z} p" in sg.graph(model, guide, X, params=params,
                                       num_particles=4).credited_costs("g")
    g = grad_samples(lambda k, p: obj.loss(k, p, model, guide, X), params, 1000)
    assert_unbiased(g, jax.grad(exact)(params))


def test_global_pathwise_latent_with_local_sums_is_unbiased():
    """A continuous global shift, pathwise: the gradient matches the exact ELBO, computed by
    quadrature over the shift."""
    def model(x):
        m = sg.sample("m", dist.Normal(0.0, 1.0))
        mixture(x, shift=m)

    def guide(x):
        sg.sample("m", dist.Normal(sg.param("loc", 0.2), 0.3))

    params = sg.init_params(0, model, guide, X)
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    nodes, weights = jnp.asarray(nodes), jnp.asarray(weights / weights.sum())

    def exact(p):
        m = p["loc"] + 0.3 * nodes
        lik = jax.vmap(lambda s: mixture_log_lik(p["w"], p["mu"], X, s))(m)
        entropy = 0.5 * jnp.log(2 * jnp.pi * jnp.e * 0.09)
        return jnp.sum(weights * (lik + dist.Normal(0.0, 1.0).log_prob(m))) + entropy

    g = grad_samples(lambda k, p: sg.ELBO(num_particles=4).loss(k, p, model, guide, X),
                     params, 400)
    assert_unbiased(g, jax.grad(exact)(params))


def test_subsampled_plate_is_unbiased_for_the_whole_data_set():
    """Each element's marginal is scaled by N / B outside the log: the loss is unbiased for
    the full log-likelihood."""
    params = sg.init_params(0, mixture, no_guide, X)
    loss = jax.jit(jax.vmap(lambda k: -sg.ELBO().loss(k, params, lambda x: mixture(
        x, subsample=5), no_guide, X)))
    values = loss(jax.random.split(jax.random.key(2), 4000))
    mean, se = mean_and_se(values)
    exact = mixture_log_lik(params["w"], params["mu"], X)
    assert abs(mean - exact) < 5 * se
    assert se < 0.05 * abs(exact)  # the check has power


def test_expectation_enumerates_the_marked_site():
    def program(estimator=None, infer=None):
        z = sg.sample("z", dist.Categorical(logits=sg.param("w", jnp.array([0.1, 0.5, -0.2]))),
                      estimator=estimator, infer=infer)
        sg.factor("f", (z - 1.0) ** 2)

    params = sg.init_params(0, program)
    marked = jax.value_and_grad(sg.Expectation().loss, argnums=1)(
        jax.random.key(0), params, lambda: program(infer=ENUM))
    enumerated = jax.value_and_grad(sg.Expectation().loss, argnums=1)(
        jax.random.key(0), params, lambda: program(estimator=sg.Enumerate()))
    np.testing.assert_allclose(marked[0], enumerated[0])
    np.testing.assert_allclose(marked[1]["w"], enumerated[1]["w"])


def test_errors_name_the_site():
    def continuous(x):
        sg.sample("c", dist.Normal(0.0, 1.0), infer=ENUM)

    with pytest.raises(sg.SiteError, match="'c'.*not discrete"):
        sg.ELBO().loss(0, {}, continuous, no_guide, X)

    def vector(x):
        sg.sample("v", dist.Bernoulli(logits=jnp.zeros(20)).to_event(1), infer=ENUM)

    with pytest.raises(sg.SiteError, match="'v'.*1048576 values.*budget of 65536"):
        sg.ELBO().loss(0, {}, vector, no_guide, X)

    def linked(x):
        with sg.plate("data", N):
            z = sg.sample("z", dist.Bernoulli(logits=0.0), infer=ENUM)
        sg.factor("total", jnp.sum(z) * 1.0)

    with pytest.raises(sg.SiteError, match="'z'.*'total'.*links the plate"):
        sg.ELBO().loss(0, {}, linked, no_guide, X)

    def two_plates(x):
        with sg.plate("a", 2):
            za = sg.sample("za", dist.Bernoulli(logits=0.0), infer=ENUM)
        with sg.plate("b", 3):
            zb = sg.sample("zb", dist.Bernoulli(logits=0.0), infer=ENUM)
        sg.factor("tie", jnp.sum(za) * jnp.sum(zb) * 1.0)

    with pytest.raises(sg.SiteError, match="'zb'.*share their plates"):
        sg.ELBO().loss(0, {}, two_plates, no_guide, X)

    def many(x):
        k = [sg.sample(f"k{i}", dist.Categorical(logits=jnp.zeros(50)), infer=ENUM)
             for i in range(3)]
        sg.factor("tie", (k[0] + k[1] + k[2]) * 1.0)

    with pytest.raises(sg.SiteError, match="125000 joint values.*budget of 65536"):
        sg.ELBO().loss(0, {}, many, no_guide, X)

    with pytest.raises(sg.SiteError, match="'z'.*infer"):
        sg.sample("z", dist.Bernoulli(logits=0.0), infer="parallel")
    with pytest.raises(sg.SiteError, match="'z'.*'sequential'"):
        sg.sample("z", dist.Bernoulli(logits=0.0), infer={"enumerate": "sequential"})
    with pytest.warns(UserWarning, match="'z'.*'collapse'"):
        sg.handlers.seed(lambda: sg.sample("z", dist.Bernoulli(logits=0.0),
                                           infer={"collapse": True}), 0)()

    def unmarked(x):
        sg.sample("u", dist.Bernoulli(logits=0.0))

    with pytest.raises(sg.SiteError, match="'u'.*infer=\\{'enumerate': 'parallel'\\}"):
        sg.ELBO().loss(0, {}, unmarked, no_guide, X)


D = 10
W = np.linspace(-1.0, 1.5, D).astype(np.float32)
ALL_BITS = np.array(list(itertools.product([0.0, 1.0], repeat=D)), dtype=np.float32)


def bits_model(x):
    logits = sg.param("logits", jnp.linspace(-0.5, 0.5, D))
    z = sg.sample("z", dist.Bernoulli(logits=logits).to_event(1), infer=ENUM)
    sg.sample("x", dist.Normal(jnp.dot(z, W), 1.0), obs=x)


def test_vector_valued_site_is_summed_out_exactly():
    """D = 10 bits as one event (``.to_event(1)``): the 1024 joint values are summed out
    (NumPyro and Pyro refuse vector-valued enumerated sites)."""
    x = jnp.array(1.3)
    params = sg.init_params(0, bits_model, no_guide, x)

    def exact(p):
        lp = jnp.sum(ALL_BITS * p["logits"] - jax.nn.softplus(p["logits"]), axis=1)
        return jax.nn.logsumexp(lp + dist.Normal(ALL_BITS @ W, 1.0).log_prob(x))

    loss, grad = jax.value_and_grad(sg.ELBO().loss, argnums=1)(jax.random.key(0), params,
                                                               bits_model, no_guide, x)
    np.testing.assert_allclose(-loss, exact(params), rtol=1e-5)
    np.testing.assert_allclose(-grad["logits"], jax.grad(exact)(params)["logits"], rtol=1e-4,
                               atol=1e-6)


def test_guide_enumerates_a_vector_valued_site_exactly():
    """The guide's Enumerate lists a ``.to_event`` site's joint support too: the ELBO and its
    gradient are exact sums over the 2^4 values."""
    d = 4
    bits = jnp.array(list(itertools.product([0.0, 1.0], repeat=d)))
    w = jnp.array([0.5, -1.0, 2.0, 0.3])

    def model(x):
        z = sg.sample("z", dist.Bernoulli(logits=jnp.zeros(d)).to_event(1))
        sg.sample("x", dist.Normal(jnp.dot(z, w), 1.0), obs=x)

    def guide(x):
        q = sg.param("q", jnp.array([0.2, -0.3, 0.4, 0.1]))
        sg.sample("z", dist.Bernoulli(logits=q).to_event(1), estimator=sg.Enumerate())

    def exact(p, x):
        lq = jnp.sum(bits * p["q"] - jax.nn.softplus(p["q"]), axis=1)
        lp = d * jnp.log(0.5) + dist.Normal(bits @ w, 1.0).log_prob(x)
        return jnp.sum(jnp.exp(lq) * (lp - lq))

    x = jnp.array(0.7)
    params = sg.init_params(0, model, guide, x)
    loss, grad = jax.value_and_grad(sg.ELBO().loss, argnums=1)(jax.random.key(0), params,
                                                               model, guide, x)
    np.testing.assert_allclose(-loss, exact(params, x), rtol=1e-5)
    np.testing.assert_allclose(-grad["q"], jax.grad(exact)(params, x)["q"], rtol=1e-4,
                               atol=1e-6)


def exact_posterior(p, x):
    """p(z_n = k | x_n) of the mixture, (N, 3)."""
    lw = jax.nn.log_softmax(p["w"])
    return jax.nn.softmax(lw + dist.Normal(p["mu"], 1.0).log_prob(x[:, None]), axis=-1)


def test_infer_discrete_draws_the_exact_posterior_and_its_mode():
    params = sg.init_params(0, mixture, no_guide, X)
    trained = sg.handlers.substitute_unconstrained(mixture, params)
    post = np.asarray(exact_posterior(params, jnp.asarray(X)))

    def draw(key):
        serve = sg.infer_discrete(trained, temperature=1, rng_key=key)
        return sg.handlers.trace(serve).get_trace(X)["z"]["value"]

    n = 4000
    draws = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(3), n))
    freq = np.stack([np.mean(np.asarray(draws) == k, axis=0) for k in range(3)], axis=1)
    se = np.sqrt(post * (1 - post) / n)
    assert np.all(np.abs(freq - post) <= 5 * se + 1e-3)
    assert np.any((post > 0.2) & (post < 0.8))  # the draws are not all certain
    tr = sg.handlers.trace(sg.infer_discrete(trained, temperature=0)).get_trace(X)
    assert np.array_equal(np.asarray(tr["z"]["value"]), post.argmax(1))
    assert bool(jnp.all(tr["x"]["value"] == X))  # the rest of the model ran as it was


def test_infer_discrete_given_a_guide_and_a_vector_site():
    """The posterior given the guide's global latent (replayed), over the 8 joint values of
    a 3-bit site."""
    w = jnp.array([1.0, -2.0, 0.5])
    bits = jnp.array(list(itertools.product([0, 1], repeat=3)), dtype=jnp.float32)

    def model(x):
        m = sg.sample("m", dist.Normal(0.0, 1.0))
        z = sg.sample("z", dist.Bernoulli(logits=jnp.zeros(3)).to_event(1), infer=ENUM)
        sg.sample("x", dist.Normal(jnp.dot(z, w) + m, 0.5), obs=x)

    def guide(x):
        sg.sample("m", dist.Normal(0.3, 0.1))

    x = jnp.array(-1.2)
    guide_tr = sg.handlers.trace(sg.handlers.seed(guide, 0)).get_trace(x)
    m = guide_tr["m"]["value"]
    serve = sg.infer_discrete(sg.handlers.replay(model, guide_tr), temperature=0)
    tr = sg.handlers.trace(serve).get_trace(x)
    best = bits[jnp.argmax(dist.Normal(bits @ w + m, 0.5).log_prob(x))]
    assert tr["z"]["value"].tolist() == best.astype(int).tolist()
    assert float(tr["m"]["value"]) == float(m)


def test_infer_discrete_errors():
    with pytest.raises(ValueError, match="temperature"):
        sg.infer_discrete(mixture, temperature=-1)


HMM_S = 3


def hmm(ys, reverse=False):
    """A hidden Markov model with Gaussian emissions, the states summed out inside sg.scan;
    ``ys`` is ``(T,)`` or ``(T, B)`` (then a plate of ``B`` sequences)."""
    trans = sg.param("trans", jnp.eye(HMM_S) * 2.0 + 0.1)
    init = sg.param("init", jnp.zeros(HMM_S))
    locs = sg.param("locs", jnp.array([-2.0, 0.0, 2.0]))

    def step(prev, y):
        logits = jnp.where((prev < 0)[..., None], init, trans[jnp.maximum(prev, 0)])
        z = sg.sample("z", dist.Categorical(logits=logits), infer=ENUM)
        sg.sample("y", dist.Normal(locs[z], 1.0), obs=y)
        return z, None

    start = jnp.full(jnp.shape(ys)[1:], -1)
    if jnp.ndim(ys) == 1:
        sg.scan(step, start, xs=ys, reverse=reverse)
    else:
        with sg.plate("seqs", ys.shape[1]):
            sg.scan(step, start, xs=ys, reverse=reverse)


def hmm_forward(p, ys, shift=0.0):
    """log p(y_{1:T}) by the forward algorithm in plain JAX (emission means ``locs +
    shift[t]``)."""
    log_trans = jax.nn.log_softmax(p["trans"], -1)
    emit = dist.Normal(p["locs"] + jnp.reshape(shift, (-1, 1)), 1.0).log_prob(ys[:, None])

    def step(alpha, e):
        return jax.nn.logsumexp(alpha[:, None] + log_trans, 0) + e, None

    alpha, _ = jax.lax.scan(step, jax.nn.log_softmax(p["init"]) + emit[0], emit[1:])
    return jax.nn.logsumexp(alpha)


def test_hmm_states_are_summed_out_by_the_forward_algorithm():
    """T = 1,000 steps, S = 3 states: the loss and its gradient equal a plain-JAX forward
    algorithm to float precision (the joint sum would have 3^1000 terms)."""
    ys = jax.random.normal(jax.random.key(0), (1000,)) * 2.0
    params = sg.init_params(0, hmm, no_guide, ys)
    loss, grad = jax.jit(jax.value_and_grad(lambda p: sg.ELBO().loss(
        jax.random.key(0), p, hmm, no_guide, ys)))(params)
    exact, exact_grad = jax.value_and_grad(hmm_forward)(params, ys)
    np.testing.assert_allclose(-loss, exact, rtol=2e-5)
    for k, v in exact_grad.items():
        np.testing.assert_allclose(-grad[k], v, rtol=1e-3, atol=1e-3 * float(jnp.abs(v).max()))


def test_hmm_per_sequence_in_a_plate():
    ys = jax.random.normal(jax.random.key(1), (20, 2)) * 2.0
    params = sg.init_params(0, hmm, no_guide, ys)
    loss = sg.ELBO().loss(jax.random.key(0), params, hmm, no_guide, ys)
    exact = hmm_forward(params, ys[:, 0]) + hmm_forward(params, ys[:, 1])
    np.testing.assert_allclose(-loss, exact, rtol=1e-5)
    assert sg.graph(hmm, no_guide, ys, params=params).costs["log sum_{z} p"].plates == ("seqs",)


def shifted_hmm(ys, carry):
    """The HMM with emission means ``locs[z] + shift_t``, the shift carried by the loop:
    ``"count"``: a step counter (the carry each step passes on depends on the one it gets, so
    the steps run in sequence), ``"last"``: the previous observation (it varies per step but
    does not depend on the carry: the steps run as one vmap)."""
    trans = sg.param("trans", jnp.eye(HMM_S) * 2.0 + 0.1)
    init = sg.param("init", jnp.zeros(HMM_S))
    locs = sg.param("locs", jnp.array([-2.0, 0.0, 2.0]))

    def step(state, y):
        prev, extra = state
        logits = jnp.where(prev < 0, init, trans[jnp.maximum(prev, 0)])
        z = sg.sample("z", dist.Categorical(logits=logits), infer=ENUM)
        shift = 0.01 * extra if carry == "count" else 0.5 * extra
        sg.sample("y", dist.Normal(locs[z] + shift, 1.0), obs=y)
        return (z, extra + 1.0 if carry == "count" else y), None

    sg.scan(step, (jnp.array(-1), jnp.array(0.0)), xs=ys)


@pytest.mark.parametrize("carry", ["count", "last"])
@pytest.mark.parametrize("horizon", [1, 40])
def test_hmm_whose_carry_holds_more_than_the_state(carry, horizon):
    ys = jax.random.normal(jax.random.key(2), (horizon,)) * 2.0
    model = lambda ys: shifted_hmm(ys, carry)  # noqa: E731
    params = sg.init_params(0, model, no_guide, ys)
    loss, grad = jax.jit(jax.value_and_grad(lambda p: sg.ELBO().loss(
        jax.random.key(0), p, model, no_guide, ys)))(params)
    shift = (0.01 * jnp.arange(horizon) if carry == "count"
             else 0.5 * jnp.concatenate([jnp.zeros(1), ys[:-1]]))
    exact, exact_grad = jax.value_and_grad(hmm_forward)(params, ys, shift)
    np.testing.assert_allclose(-loss, exact, rtol=1e-5)
    for k, v in exact_grad.items():
        np.testing.assert_allclose(-grad[k], v, rtol=1e-4, atol=1e-4 * float(jnp.abs(v).max()))


def test_loops_the_forward_algorithm_cannot_sum_are_refused():
    ys = jnp.ones(5)
    params = sg.init_params(0, hmm, no_guide, ys)
    with pytest.raises(sg.SiteError, match="'z'.*reverse loop"):
        sg.ELBO().loss(0, params, lambda ys: hmm(ys, reverse=True), no_guide, ys)

    def counting(ys):
        def step(count, y):
            z = sg.sample("z", dist.Bernoulli(logits=0.1 * count), infer=ENUM)
            sg.sample("y", dist.Normal(z * 1.0, 1.0), obs=y)
            return count + z, None
        sg.scan(step, 0, xs=ys)

    with pytest.raises(sg.SiteError, match="'z'.*two steps or more.*first-order Markov"):
        sg.ELBO().loss(0, {}, counting, no_guide, ys)

    def final(ys):
        def step(prev, y):
            z = sg.sample("z", dist.Bernoulli(logits=0.1 * prev), infer=ENUM)
            return z, None
        last, _ = sg.scan(step, 0, xs=ys)
        sg.factor("end", last * 1.0)

    with pytest.raises(sg.SiteError, match="'z'.*'end' after the loop"):
        sg.ELBO().loss(0, {}, final, no_guide, ys)


def hmm_viterbi(p, ys):
    """The most probable state path, by the Viterbi algorithm in plain JAX."""
    log_trans = jax.nn.log_softmax(p["trans"], -1)
    emit = dist.Normal(p["locs"], 1.0).log_prob(ys[:, None])

    def step(delta, e):
        scores = delta[:, None] + log_trans
        return scores.max(0) + e, scores.argmax(0)

    delta, pointers = jax.lax.scan(step, jax.nn.log_softmax(p["init"]) + emit[0], emit[1:])
    path = [int(delta.argmax())]
    for pointer in np.asarray(pointers)[::-1]:
        path.append(int(pointer[path[-1]]))
    return path[::-1]


def hmm_smoothed(p, ys):
    """p(z_t = s | y_{1:T}) by forward-backward in plain JAX, (T, S)."""
    log_trans = jax.nn.log_softmax(p["trans"], -1)
    emit = dist.Normal(p["locs"], 1.0).log_prob(ys[:, None])

    def fwd(alpha, e):
        new = jax.nn.logsumexp(alpha[:, None] + log_trans, 0) + e
        return new, new

    _, alphas = jax.lax.scan(fwd, jax.nn.log_softmax(p["init"]) + emit[0], emit[1:])
    alphas = jnp.concatenate([(jax.nn.log_softmax(p["init"]) + emit[0])[None], alphas])

    def bwd(beta, e):
        new = jax.nn.logsumexp(log_trans + (e + beta)[None, :], 1)
        return new, new

    _, betas = jax.lax.scan(bwd, jnp.zeros(HMM_S), emit[1:], reverse=True)
    betas = jnp.concatenate([betas, jnp.zeros((1, HMM_S))])
    return jax.nn.softmax(alphas + betas, axis=1)


def test_infer_discrete_decodes_an_hmm():
    """Viterbi (temperature 0) equals a plain-JAX Viterbi; forward-filter backward-sample
    draws (temperature 1) have the exact smoothed marginals within standard errors."""
    ys = jax.random.normal(jax.random.key(2), (30,)) * 2.0
    params = sg.init_params(0, hmm, no_guide, ys)
    trained = sg.handlers.substitute_unconstrained(hmm, params)
    tr = sg.handlers.trace(sg.infer_discrete(trained, temperature=0)).get_trace(ys)
    assert tr["z"]["value"].tolist() == hmm_viterbi(params, ys)

    def draw(key):
        return sg.handlers.trace(sg.infer_discrete(trained, 1, key)).get_trace(ys)["z"]["value"]

    n = 3000
    draws = np.asarray(jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(4), n)))
    smoothed = np.asarray(hmm_smoothed(params, ys))
    freq = np.stack([np.mean(draws == s, axis=0) for s in range(HMM_S)], axis=1)
    se = np.sqrt(smoothed * (1 - smoothed) / n)
    assert np.all(np.abs(freq - smoothed) <= 5 * se + 2e-3)
    assert np.any((smoothed > 0.2) & (smoothed < 0.8))


def test_independent_sites_are_summed_apart():
    """Sites that no cost ties together are summed group by group: 3 sites of 50 values take
    150 runs of the model (not 125,000), in different plates too, exactly."""
    def model(x):
        for i in range(3):
            k = sg.sample(f"k{i}", dist.Categorical(logits=jnp.linspace(0.0, 1.0, 50)),
                          infer=ENUM)
            sg.sample(f"x{i}", dist.Normal(k / 10.0, 1.0), obs=x[i])
        with sg.plate("a", 2):
            za = sg.sample("za", dist.Bernoulli(logits=0.3), infer=ENUM)
            sg.sample("xa", dist.Normal(za * 1.0, 1.0), obs=x[3:5])

    x = jnp.array([1.0, 2.5, -0.5, 0.7, 0.2])
    scg = sg.graph(model, no_guide, x)
    assert len([c for c in scg.costs if c.startswith("log sum")]) == 4

    def exact(x):
        lk = jax.nn.log_softmax(jnp.linspace(0.0, 1.0, 50))
        ks = jnp.arange(50) / 10.0
        total = sum(jax.nn.logsumexp(lk + dist.Normal(ks, 1.0).log_prob(x[i])) for i in range(3))
        lz = jnp.array([jax.nn.log_sigmoid(-0.3), jax.nn.log_sigmoid(0.3)])
        for xa in x[3:5]:
            total = total + jax.nn.logsumexp(lz + dist.Normal(jnp.array([0.0, 1.0]), 1.0)
                                             .log_prob(xa))
        return total

    loss = sg.ELBO().loss(jax.random.key(0), {}, model, no_guide, x)
    np.testing.assert_allclose(-loss, exact(x), rtol=1e-5)
    tr = sg.handlers.trace(sg.infer_discrete(model, temperature=0)).get_trace(x)
    lk = jax.nn.log_softmax(jnp.linspace(0.0, 1.0, 50))
    for i in range(3):
        best = jnp.argmax(lk + dist.Normal(jnp.arange(50) / 10.0, 1.0).log_prob(x[i]))
        assert int(tr[f"k{i}"]["value"]) == int(best)
