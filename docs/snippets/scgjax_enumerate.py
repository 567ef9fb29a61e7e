import jax, jax.numpy as jnp, optax
import scgjax as sg
from scgjax import dist

def model(x):
    mu = sg.param("mu", jnp.array([-1.0, 1.0]))
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=0.0),
                      infer={"enumerate": "parallel"})
        sg.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0),
                  obs=x)

def guide(x):
    pass                             # nothing left to sample

k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
z_true = jax.random.bernoulli(k1, 0.5, (200,))
x = jnp.where(z_true, 3.0, -2.0) + jax.random.normal(k2, (200,))

optimizer = optax.adam(0.05)
svi = sg.SVI(model, guide, optimizer, sg.ELBO())
result = svi.run(k3, 1000, x, progress_bar=False)
print("cluster means:", result.params["mu"])
print("log p(x):", -result.losses[-1])
