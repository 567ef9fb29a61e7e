import jax, jax.numpy as jnp, optax
import scgjax as sg
from scgjax import dist              # numpyro.distributions, re-exported

def model(x):                        # p(z) p(x | z): two clusters
    mu = sg.param("mu", jnp.array([-1.0, 1.0]))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=0.0))
        sg.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0), obs=x)

def guide(x):                        # q(z | x): logistic regression on x
    a, b = sg.param("a", 0.5), sg.param("b", 0.0)
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Bernoulli(logits=a * x + b),
                  estimator=sg.RLOO())

# 200 points from two clusters with means -2 and 3
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
z_true = jax.random.bernoulli(k1, 0.5, (200,))
x = jnp.where(z_true, 3.0, -2.0) + jax.random.normal(k2, (200,))

svi = sg.SVI(model, guide, optax.adam(0.05), sg.ELBO(num_particles=4))
result = svi.run(k3, 1000, x, progress_bar=False)

elbo = -result.losses                # the loss is minus the ELBO estimate
print(f"ELBO {elbo[:100].mean():.1f} (first 100 steps)"
      f" -> {elbo[-100:].mean():.1f} (last 100)")
print("cluster means:", result.params["mu"])

g = sg.graph(model, guide, x, num_particles=4)   # who is credited with what
print(g)
