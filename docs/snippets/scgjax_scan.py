import jax, jax.numpy as jnp, optax
import scgjax as sg
from scgjax import dist

def model(ys):                       # a random walk observed in noise
    def step(z, y):
        z = sg.sample("z", dist.Normal(z, 0.3))
        sg.sample("y", dist.Normal(z, 0.5), obs=y)
        return z, None
    sg.scan(step, 0.0, ys)

def guide(ys):                       # Markov: z_t | z_{t-1}, y_t
    gain = sg.param("gain", 0.5)
    scale = sg.param("scale", 0.3,
                     constraint=dist.constraints.positive)
    def step(z, y):
        z = sg.sample("z", dist.Normal(z + gain * (y - z), scale))
        return z, None
    sg.scan(step, 0.0, ys)

k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
walk = jnp.cumsum(0.3 * jax.random.normal(k1, (100,)))
ys = walk + 0.5 * jax.random.normal(k2, (100,))

optimizer = optax.adam(0.02)
svi = sg.SVI(model, guide, optimizer, sg.ELBO())
result = svi.run(k3, 2000, ys, progress_bar=False)
params = svi.get_params(result.state, ys)   # result.params: unconstrained
print("gain, scale:", params["gain"], params["scale"])
