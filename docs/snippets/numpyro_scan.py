import jax, jax.numpy as jnp, optax
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro

def model(ys):                       # a random walk observed in noise
    def step(z, y):
        z = numpyro.sample("z", dist.Normal(z, 0.3))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=y)
        return z, None
    scan(step, 0.0, ys)

def guide(ys):                       # Markov: z_t | z_{t-1}, y_t
    gain = numpyro.param("gain", 0.5)
    scale = numpyro.param("scale", 0.3,
                          constraint=dist.constraints.positive)
    def step(z, y):
        z = numpyro.sample("z", dist.Normal(z + gain * (y - z), scale))
        return z, None
    scan(step, 0.0, ys)

k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
walk = jnp.cumsum(0.3 * jax.random.normal(k1, (100,)))
ys = walk + 0.5 * jax.random.normal(k2, (100,))

optimizer = optax_to_numpyro(optax.adam(0.02))
svi = SVI(model, guide, optimizer, Trace_ELBO())
result = svi.run(k3, 2000, ys, progress_bar=False)
params = result.params
print("gain, scale:", params["gain"], params["scale"])
