# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Beyond the ELBO: IWAE, reweighted wake-sleep, wake-sleep, amortised wake-sleep
#
# One model, four ways to learn it, each checked against the exact answer. The model is
# linear-Gaussian, so everything is analytic:
#
# $$z_n \sim \mathcal N(0, 1), \qquad x_n \mid z_n \sim \mathcal N(a z_n + b, 1), \qquad
# p_\theta(x_n) = \mathcal N(x_n;\, b,\, a^2 + 1),$$
#
# and the exact posterior is $p(z_n \mid x_n) = \mathcal N\big(\tfrac{a (x_n - b)}{a^2+1},
# \tfrac{1}{a^2+1}\big)$. The guide is amortised and linear,
# $q_\phi(z_n \mid x_n) = \mathcal N(c\, x_n + d,\, 0.8^2)$.
#
# - **IWAE** (Burda et al. 2016) maximises $\mathcal L_K = \mathbb E\big[\log \tfrac1K
#   \sum_k w_k\big]$, $w_k = p(x, z_k) / q(z_k \mid x)$: $\mathcal L_1$ is the ELBO and
#   $\mathcal L_K \uparrow \log p(x)$.
# - **RWS** (Bornschein & Bengio 2015; Le et al. 2019) follows $\sum_k \hat w_k \nabla_\theta
#   \log p_\theta(x, z_k)$ for the model (wake-θ) and $\sum_k \hat w_k \nabla_\phi \log
#   q_\phi(z_k \mid x)$ for the guide (wake-φ), or $\nabla_\phi \log q_\phi(z' \mid x')$ on a
#   dream $(z', x') \sim p_\theta$ (sleep-φ).
# - **Wake-sleep** (Hinton et al. 1995) is wake-θ with one guide sample and sleep-φ.
# - **Amortised wake-sleep** (Wenliang et al. 2020) needs no guide: it regresses
#   $\log p_\theta(x_n, z_n)$ of dreams on $x_n$ with kernel ridge regression; the
#   regression's gradient in $\theta$ estimates $\nabla_\theta \log p_\theta(x)$.
#
# Set `SCGJAX_NOTEBOOK_QUICK=1` to run everything with fewer samples and steps (CI does).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import scgjax as sg
from scgjax import dist

QUICK = os.environ.get("SCGJAX_NOTEBOOK_QUICK") == "1"
REPEATS = 100 if QUICK else 2000  # gradient samples per estimate
STEPS = 150 if QUICK else 600  # training steps
X = jnp.array([0.3, 1.7, -0.4, 2.2, 1.1])


def model(x):
    a = sg.param("a", 0.5)
    b = sg.param("b", 0.2)
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(a * z + b, 1.0), obs=x)


def guide(x):
    c = sg.param("c", 0.1)
    d = sg.param("d", -0.3)
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Normal(c * x + d, 0.8))


def log_evidence(p, x):
    return jnp.sum(dist.Normal(p["b"], jnp.sqrt(p["a"] ** 2 + 1.0)).log_prob(x))


params = sg.init_params(0, model, guide, X)
print("log p(X) =", float(log_evidence(params, X)))
print("who owns which param:", sg.param_labels(model, guide, X))

# %% [markdown]
# ## IWAE: the bound tightens with K
#
# `sg.IWAE(num_particles=K).loss` is $-\hat{\mathcal L}_K$, computed per data point with a
# stable `logsumexp` over the K particles (a `vmap`).

# %%
ks = [1, 5, 50] if QUICK else [1, 2, 5, 10, 50, 200]
keys = jax.random.split(jax.random.key(0), REPEATS // 4)
bounds = []
for k in ks:
    loss = jax.jit(jax.vmap(lambda key, k=k: sg.IWAE(num_particles=k).loss(
        key, params, model, guide, X)))
    bounds.append(-float(loss(keys).mean()))
exact = float(log_evidence(params, X))
plt.figure(figsize=(5, 3))
plt.semilogx(ks, bounds, "o-", label=r"$\mathcal{L}_K$ (IWAE)")
plt.axhline(exact, color="k", ls="--", label=r"$\log p(X)$")
plt.xlabel("K")
plt.ylabel("nats")
plt.legend()
plt.tight_layout()
plt.show()
for k, v in zip(ks, bounds, strict=True):
    print(f"K={k:4d}: L_K = {v:.3f}   (log p(X) = {exact:.3f})")

# %% [markdown]
# ## RWS: the wake-θ gradient approaches $\nabla_\theta \log p(x)$
#
# Self-normalised importance weights make wake-θ biased for finite K, consistent as
# $K \to \infty$. We average `REPEATS` gradient estimates and compare them with the exact
# gradient of the log evidence.

# %%
exact_grad = jax.grad(log_evidence)(params, X)


def mean_wake_theta(k):
    keys = jax.random.split(jax.random.key(k), REPEATS)
    g = jax.jit(jax.vmap(lambda key: jax.grad(sg.RWS(num_particles=k).loss, argnums=1)(
        key, params, model, guide, X)))(keys)
    return np.array([-float(g["a"].mean()), -float(g["b"].mean())])


target = np.array([float(exact_grad["a"]), float(exact_grad["b"])])
errors = {k: float(np.linalg.norm(mean_wake_theta(k) - target) / np.linalg.norm(target))
          for k in ((1, 10, 100) if QUICK else (1, 3, 10, 30, 100))}
plt.figure(figsize=(5, 3))
plt.loglog(list(errors), list(errors.values()), "o-")
plt.xlabel("K")
plt.ylabel("relative error of wake-θ")
plt.tight_layout()
plt.show()
print(errors)

# %% [markdown]
# ## Wake-φ, sleep-φ and wake-sleep move the guide to the exact posterior
#
# With the model frozen (`optax.multi_transform` with `sg.param_labels`), the guide's update
# alone is trained; we track $\mathrm{KL}(q_\phi(z \mid X) \,\|\, p(z \mid X))$, which is
# analytic. Sleep-φ fits $q$ to the model's posterior averaged over its own dreams; since
# the guide family contains the exact posterior for every $x$, it reaches it:
# $c = a/(a^2+1) = 0.4$, $d = -ab/(a^2+1) = -0.08$.

# %%
def kl_to_posterior(p, a=0.5, b=0.2):
    mean, var = a * (X - b) / (a**2 + 1), 1 / (a**2 + 1)
    q_mean, q_var = p["c"] * X + p["d"], 0.8**2
    return jnp.sum(0.5 * (q_var / var + (q_mean - mean) ** 2 / var - 1 + jnp.log(var / q_var)))


labels = sg.param_labels(model, guide, X)
frozen_model = optax.multi_transform(
    {"guide": optax.adam(0.03), "model": optax.set_to_zero()}, labels)
objectives = {
    "RWS wake-φ (K=10)": sg.RWS(num_particles=10),
    "RWS sleep-φ (K=10)": sg.RWS(num_particles=10, sleep_phi=1.0),
    "wake-sleep": sg.WakeSleep(),
}
plt.figure(figsize=(5, 3))
for name, objective in objectives.items():
    svi = sg.SVI(model, guide, frozen_model, objective)
    state = svi.init(jax.random.key(0), X)
    kls = [float(kl_to_posterior(state.params))]
    for _ in range(STEPS // 25):
        state = svi.run(None, 25, X, state=state, progress_bar=False).state
        kls.append(float(kl_to_posterior(state.params)))
    plt.semilogy(np.arange(len(kls)) * 25, kls, label=name)
    print(f"{name:>20}: KL {kls[0]:.3f} -> {kls[-1]:.4f}; c = {float(state.params['c']):.3f},"
          f" d = {float(state.params['d']):.3f}")
plt.xlabel("step")
plt.ylabel("KL(q || posterior)")
plt.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Amortised wake-sleep: a gradient with no guide at all
#
# `sg.AmortisedWakeSleep(num_sleep=S)` draws $S$ dreams, regresses their log-joint on $x$ by
# kernel ridge regression (Gaussian kernel, median-heuristic bandwidth, Cholesky solve) and
# returns minus the regression's mean over the data. Its gradient's error against the exact
# $\nabla_\theta \log p(X)$ falls as $S$ grows.

# %%
def aws_model(x):
    a = sg.param("a", 1.5)
    b = sg.param("b", 0.3)
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        sg.sample("x", dist.Normal(a * z + b, 0.5), obs=x)


data = 1.0 + jax.random.normal(jax.random.key(1), (100,))
aws_params = sg.init_params(0, aws_model, None, data)
true = jax.grad(lambda p: dist.Normal(p["b"], jnp.sqrt(p["a"] ** 2 + 0.25)).log_prob(
    data).mean())(aws_params)
true = np.array([float(true["a"]), float(true["b"])])
sizes = (50, 200) if QUICK else (50, 200, 1000)
aws_errors = {}
for s in sizes:
    grad = jax.jit(jax.grad(lambda p, key, s=s: sg.AmortisedWakeSleep(s).loss(
        key, p, aws_model, data)))
    errs = []
    for i in range(3 if QUICK else 6):
        g = grad(aws_params, jax.random.key(i))
        g = -np.array([float(g["a"]), float(g["b"])])
        errs.append(np.linalg.norm(g - true) / np.linalg.norm(true))
    aws_errors[s] = float(np.mean(errs))
plt.figure(figsize=(5, 3))
plt.loglog(list(aws_errors), list(aws_errors.values()), "o-")
plt.xlabel("sleep samples S")
plt.ylabel("relative gradient error")
plt.tight_layout()
plt.show()
print(aws_errors)
