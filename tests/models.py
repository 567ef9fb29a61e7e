"""Test models with exact objectives computed by enumeration in plain JAX (no scgjax)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import scgjax as sg
from scgjax import dist


def bern_logp(value, logits):
    """Exact Bernoulli log-pmf in plain JAX (right gradient at logits 0)."""
    return value * logits - jax.nn.softplus(logits)


def normal_logp(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)


# --- two-component mixture with a per-data-point discrete latent in a plate ----------------

MIX_N = 64
MIX_X = np.asarray(jax.random.normal(jax.random.key(11), (MIX_N,)) * 2.0, dtype=np.float32)


def mixture_model(x, estimator=None):
    mu = sg.param("mu", jnp.array([-1.0, 1.0]))
    prior = sg.param("prior_logit", jnp.array(0.0))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=prior))
        sg.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0), obs=x)


def mixture_guide(x, estimator=None):
    a = sg.param("a", jnp.array(0.5))
    b = sg.param("b", jnp.array(0.0))  # exactly 0: the numpyro logits trap
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Bernoulli(logits=a * x + b), estimator=estimator)


def mixture_exact(params, x):
    logits = params["a"] * x + params["b"]
    total = 0.0
    for z in (0, 1):
        lq = bern_logp(z, logits)
        lp = bern_logp(z, params["prior_logit"]) + normal_logp(x, params["mu"][z], 1.0)
        total = total + jnp.exp(lq) * (lp - lq)
    return total.sum()


# --- 3-layer sigmoid belief network (Schulman's thesis §5.10, NVIL) -------------------------

SBN_DIMS = {"x": 4, "h1": 3, "h2": 2, "h3": 2}
SBN_X = np.asarray(
    jax.random.bernoulli(jax.random.key(5), 0.4, (6, SBN_DIMS["x"])), dtype=np.float32
)


def sbn_init(seed: int = 0) -> dict:
    d = SBN_DIMS
    shapes = {
        "p_b3": (d["h3"],), "p_W3": (d["h3"], d["h2"]), "p_b2": (d["h2"],),
        "p_W2": (d["h2"], d["h1"]), "p_b1": (d["h1"],), "p_W1": (d["h1"], d["x"]),
        "p_b0": (d["x"],), "q_V1": (d["x"], d["h1"]), "q_c1": (d["h1"],),
        "q_V2": (d["h1"], d["h2"]), "q_c2": (d["h2"],), "q_V3": (d["h2"], d["h3"]),
        "q_c3": (d["h3"],),
    }
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    params = {n: 0.8 * jax.random.normal(k, s) for (n, s), k in zip(shapes.items(), keys,
                                                                      strict=True)}
    params["q_c1"] = jnp.zeros_like(params["q_c1"])  # logits exactly 0 where x == 0
    return params


def _p(name, shape):
    return sg.param(name, jnp.zeros(shape))


def sbn_model(x):
    d = SBN_DIMS
    with sg.plate("data", x.shape[0]):
        h3 = sg.sample("h3", dist.Bernoulli(logits=_p("p_b3", (d["h3"],))).to_event(1))
        h2 = sg.sample("h2", dist.Bernoulli(
            logits=h3 @ _p("p_W3", (d["h3"], d["h2"])) + _p("p_b2", (d["h2"],))).to_event(1))
        h1 = sg.sample("h1", dist.Bernoulli(
            logits=h2 @ _p("p_W2", (d["h2"], d["h1"])) + _p("p_b1", (d["h1"],))).to_event(1))
        sg.sample("x", dist.Bernoulli(
            logits=h1 @ _p("p_W1", (d["h1"], d["x"])) + _p("p_b0", (d["x"],))).to_event(1),
            obs=x)


def sbn_guide(x, estimator=None):
    d = SBN_DIMS
    with sg.plate("data", x.shape[0]):
        h1 = sg.sample("h1", dist.Bernoulli(
            logits=x @ _p("q_V1", (d["x"], d["h1"])) + _p("q_c1", (d["h1"],))).to_event(1),
            estimator=estimator)
        h2 = sg.sample("h2", dist.Bernoulli(
            logits=h1 @ _p("q_V2", (d["h1"], d["h2"])) + _p("q_c2", (d["h2"],))).to_event(1),
            estimator=estimator)
        sg.sample("h3", dist.Bernoulli(
            logits=h2 @ _p("q_V3", (d["h2"], d["h3"])) + _p("q_c3", (d["h3"],))).to_event(1),
            estimator=estimator)


def _configs(n):
    return jnp.array(list(itertools.product([0.0, 1.0], repeat=n)))


def sbn_exact(params, x):
    """The ELBO by enumerating all (h1, h2, h3) for every data point."""
    d = SBN_DIMS
    i1, i2, i3 = (a.reshape(-1) for a in jnp.meshgrid(
        jnp.arange(2 ** d["h1"]), jnp.arange(2 ** d["h2"]), jnp.arange(2 ** d["h3"]),
        indexing="ij"))
    c1, c2, c3 = _configs(d["h1"])[i1], _configs(d["h2"])[i2], _configs(d["h3"])[i3]
    p = params

    def lp(v, logits):
        return bern_logp(v, logits).sum(-1)

    def per_point(xn):
        lq = (lp(c1, xn @ p["q_V1"] + p["q_c1"]) + lp(c2, c1 @ p["q_V2"] + p["q_c2"])
              + lp(c3, c2 @ p["q_V3"] + p["q_c3"]))
        lj = (lp(c3, p["p_b3"]) + lp(c2, c3 @ p["p_W3"] + p["p_b2"])
              + lp(c1, c2 @ p["p_W2"] + p["p_b1"]) + lp(xn, c1 @ p["p_W1"] + p["p_b0"]))
        return jnp.sum(jnp.exp(lq) * (lj - lq))

    return jax.vmap(per_point)(x).sum()


# --- a global discrete latent with local reparameterised latents ---------------------------

GL_N = 16
GL_X = np.asarray(jax.random.normal(jax.random.key(3), (GL_N,)) + 1.5, dtype=np.float32)


def global_local_model(x):
    mu = sg.param("mu", jnp.array([0.0, 2.0]))
    c = sg.sample("c", dist.Bernoulli(logits=sg.param("pc", jnp.array(0.3))))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(mu[c.astype(jnp.int32)], 1.0))
        sg.sample("x", dist.Normal(z, 1.0), obs=x)


def global_local_guide(x):
    c = sg.sample("c", dist.Bernoulli(logits=sg.param("phi", jnp.array(-0.4))))
    m = sg.param("m", jnp.zeros(x.shape[0]))
    a = sg.param("shift", jnp.array(0.5))
    s = sg.param("log_s", jnp.array(-0.5))
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Normal(m + a * c, jnp.exp(s)))


def global_local_exact(params, x):
    p = params
    total = 0.0
    s = jnp.exp(p["log_s"])
    for c in (0, 1):
        lq_c = bern_logp(c, p["phi"])
        m = p["m"] + p["shift"] * c
        e_lik = -0.5 * jnp.log(2 * jnp.pi) - 0.5 * ((x - m) ** 2 + s**2)
        e_prior = -0.5 * jnp.log(2 * jnp.pi) - 0.5 * ((m - p["mu"][c]) ** 2 + s**2)
        entropy = 0.5 * jnp.log(2 * jnp.pi * jnp.e * s**2)
        inner = bern_logp(c, p["pc"]) - lq_c + jnp.sum(e_lik + e_prior + entropy)
        total = total + jnp.exp(lq_c) * inner
    return total


# --- a sequential decision program: one action and one reward per step --------------------

SEQ_T = 6


def _reward(t, s, a):
    return (a - 0.5) * (0.6 - 0.25 * t) + 0.3 * s - 0.1 * a * s


def episode(per_step_rewards: bool = True, estimator=None):
    theta = sg.param("theta", jnp.linspace(-0.5, 0.5, SEQ_T))
    w = sg.param("w", jnp.array(0.2))
    s = jnp.array(0.0)
    ret = 0.0
    for t in range(SEQ_T):
        a = sg.sample(f"a{t}", dist.Bernoulli(logits=theta[t] + w * s), estimator=estimator)
        r = _reward(t, s, a)
        if per_step_rewards:
            sg.factor(f"r{t}", r)
        else:
            ret = ret + r
        s = s + a
    if not per_step_rewards:
        sg.factor("return", ret)


def episode_exact(params):
    actions = _configs(SEQ_T)  # (2^T, T)
    s = jnp.zeros(actions.shape[0])
    logp = 0.0
    ret = 0.0
    for t in range(SEQ_T):
        a = actions[:, t]
        logp = logp + bern_logp(a, params["theta"][t] + params["w"] * s)
        ret = ret + _reward(t, s, a)
        s = s + a
    return jnp.sum(jnp.exp(logp) * ret)


def normal_plate_model(x):
    """``z_n ~ N(0, 1)``, ``x_n ~ N(z_n, 1)`` observed, per element of ``plate("data")``."""
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(z, 1.0), obs=x)


def normal_plate_guide(estimator=None):
    """The mean-field guide ``z_n ~ N(m_n, s_n)`` of :func:`normal_plate_model`, with
    ``estimator`` on ``z``."""
    def guide(x):
        m = sg.param("m", jnp.zeros(x.shape[0]))
        s = sg.param("s", jnp.ones(x.shape[0]), constraint=dist.constraints.positive)
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Normal(m, s), estimator=estimator)
    return guide


# --- a chain of binary latents written with sg.scan (model and guide), and its exact paths --

SCAN_YS = np.array([0.5, -1.0, 1.5, 0.2, -0.3, 1.0], dtype=np.float32)


def scan_chain_model(ys):
    """``z_t ~ Bernoulli(logits = +-1 by z_{t-1})``, ``y_t ~ Normal(2 z_t - 1, 1)``."""
    def step(prev, y):
        z = sg.sample("z", dist.Bernoulli(logits=jnp.where(prev > 0, 1.0, -1.0)))
        sg.sample("y", dist.Normal(2.0 * z - 1.0, 1.0), obs=y)
        return z * 1.0, None
    sg.scan(step, jnp.zeros(jnp.shape(ys)[1:]), xs=ys)


def scan_chain_guide(ys, estimator=None):
    """``q(z_t | z_{t-1}, y_t) = Bernoulli(logits = v0 + v1 y_t + v2 z_{t-1})``."""
    v = sg.param("v", jnp.array([0.2, 0.5, -0.3]))

    def step(prev, y):
        z = sg.sample("z", dist.Bernoulli(logits=v[0] + v[1] * y + v[2] * prev),
                      estimator=estimator(prev, y) if callable(estimator) else estimator)
        return z * 1.0, None
    sg.scan(step, jnp.zeros(jnp.shape(ys)[1:]), xs=ys)


def scan_chain_paths(ys, v):
    """``(log q, log p)`` of every path ``z_{1:T}`` of the chain (``2^T`` rows, vectorised)."""
    paths = jnp.array(list(itertools.product([0.0, 1.0], repeat=len(ys))))
    prev, lq, lp = jnp.zeros(len(paths)), 0.0, 0.0
    for t in range(len(ys)):
        z = paths[:, t]
        lq = lq + bern_logp(z, v[0] + v[1] * ys[t] + v[2] * prev)
        lp = lp + bern_logp(z, jnp.where(prev > 0, 1.0, -1.0)) + normal_logp(
            ys[t], 2.0 * z - 1.0, 1.0)
        prev = z
    return lq, lp


# --- a 2-bit event block per element of a data plate (the DCV and RODEO tests) -------------


def block_model(x, y):
    a = sg.param("A", jnp.array([[1.5, -1.0, 0.5], [-0.5, 2.0, 1.0]]))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=jnp.zeros(2)).to_event(1))
        sg.sample("y", dist.Normal(jnp.tanh(z @ a) * 2.0, 1.0).to_event(1), obs=y)


def block_guide(x, y, estimator=None):
    v = sg.param("V", jnp.array([[0.8, -0.4], [0.0, 0.6], [-0.5, 0.3]]))
    d = sg.param("d", jnp.zeros(2))
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Bernoulli(logits=x @ v + d).to_event(1), estimator=estimator)


def block_exact(p, x, y):
    """The ELBO of :func:`block_model` / :func:`block_guide`, the 4 values of each block
    enumerated."""
    z = _configs(2)  # (4, 2)
    lq = bern_logp(z[:, None], x @ p["V"] + p["d"]).sum(-1)  # (4, N)
    lp = (bern_logp(z, 0.0).sum(-1)[:, None]
          + normal_logp(y, jnp.tanh(z @ p["A"])[:, None] * 2.0, 1.0).sum(-1))
    return jnp.sum(jnp.exp(lq) * (lp - lq))
