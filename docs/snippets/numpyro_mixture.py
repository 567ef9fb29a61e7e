import jax, jax.numpy as jnp, optax
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, TraceGraph_ELBO
from numpyro.optim import optax_to_numpyro

def model(x):
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(logits=0.0))
        numpyro.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0),
                       obs=x)

def guide(x):
    a, b = numpyro.param("a", 0.5), numpyro.param("b", 0.0)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=a * x + b))

k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
z_true = jax.random.bernoulli(k1, 0.5, (200,))
x = jnp.where(z_true, 3.0, -2.0) + jax.random.normal(k2, (200,))

optimizer = optax_to_numpyro(optax.adam(0.05))
svi = SVI(model, guide, optimizer, TraceGraph_ELBO(num_particles=4))
result = svi.run(k3, 1000, x, progress_bar=False)
print("cluster means:", result.params["mu"])
