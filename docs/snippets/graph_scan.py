import jax.numpy as jnp
import scgjax as sg
from scgjax import dist

def episodes(xs):
    w = sg.param("w", jnp.zeros(2))
    def step(state, x):              # one step: an action and its reward
        a = sg.sample("a", dist.Bernoulli(logits=w[0] + w[1] * state + x))
        sg.factor("reward", (a - 0.5) * (state + x))
        return state + a, a          # the carry links the steps
    with sg.plate("episodes", 16):   # a batch of 16 episodes
        sg.scan(step, jnp.zeros(16), xs=xs)   # T steps, one lax.scan

xs = jnp.linspace(-1.0, 1.0, 500)
g = sg.graph(episodes, None, xs)     # no guide: None
print(g)
print("lags:", sorted(g.time_credit("a", "reward", "time")))
