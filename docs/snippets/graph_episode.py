import jax.numpy as jnp
import scgjax as sg
from scgjax import dist

def episode():                       # one program, no guide: sg.Expectation
    w = sg.param("w", jnp.zeros(2))  # the policy's weights
    state = 0.0
    for t in range(3):
        a = sg.sample(f"a{t}", dist.Bernoulli(logits=w[0] + w[1] * state))
        sg.factor(f"r{t}", (a - 0.5) * (state - 1.0))   # reward of step t
        state = state + a

g = sg.graph(episode)
print(g)
