import jax.numpy as jnp
import scgjax as sg
from scgjax import dist

def model(x):
    s = sg.sample("s", dist.Bernoulli(probs=0.5))         # global
    with sg.plate("data", x.shape[0]):
        z = sg.sample("z", dist.Bernoulli(probs=0.5))     # local
        sg.sample("x", dist.Normal(2.0 * z - 1.0, 1.0 + s), obs=x)

def guide(x):
    p = sg.param("p", 0.5, constraint=dist.constraints.unit_interval)
    a, b = sg.param("a", 0.5), sg.param("b", 0.0)
    s = sg.sample("s", dist.Bernoulli(probs=p))
    with sg.plate("data", x.shape[0]):
        sg.sample("z", dist.Bernoulli(logits=a * x + b * s))

x = jnp.array([-1.2, 0.3, 2.1, 0.8, -0.4, 1.7])
g = sg.graph(model, guide, x, num_particles=2)
print(g)
print("z, log p(x) share:", g.shared_plates("z", "log p(x)"))
print("s, log p(x) share:", g.shared_plates("s", "log p(x)"))
