"""The core's passes over a program: the model and the guide run at most twice per trace (one
traced pass for the structure, one for the particles), and the graph layer's single pass finds
the same graph as the data flow says."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.layout import SiteLayout


def counted_pair():
    calls = {"model": 0, "guide": 0}

    def model(x):
        calls["model"] += 1
        mu = sg.sample("mu", dist.Normal(0.0, 1.0))
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Bernoulli(logits=mu))
            sg.sample("x", dist.Normal(mu + z, 1.0), obs=x)

    def guide(x):
        calls["guide"] += 1
        mu = sg.sample("mu", dist.Normal(sg.param("m", 0.0), 1.0))
        with sg.plate("data", x.shape[0]):
            sg.sample("z", dist.Bernoulli(logits=sg.param("l", jnp.zeros(x.shape[0])) + mu))

    return model, guide, calls


@pytest.mark.parametrize("objective", [sg.ELBO(num_particles=1), sg.ELBO(num_particles=4),
                                       sg.IWAE(num_particles=3), sg.RWS(num_particles=3)])
def test_model_and_guide_run_twice_per_trace(objective):
    model, guide, calls = counted_pair()
    x = jnp.linspace(-1.0, 1.0, 5)
    params = sg.init_params(0, model, guide, x)
    calls.update(model=0, guide=0)
    grad = jax.jit(jax.grad(objective.loss, argnums=1), static_argnums=(2, 3))
    grad(jax.random.key(0), params, model, guide, x)
    assert calls == {"model": 2, "guide": 2}


def test_svi_step_traces_the_programs_twice():
    model, guide, calls = counted_pair()
    x = jnp.linspace(-1.0, 1.0, 5)
    svi = sg.SVI(model, guide, optax.adam(1e-2), sg.ELBO(num_particles=2))
    state = svi.init(0, x)
    calls.update(model=0, guide=0)
    state, _ = svi.update(state, x)
    assert calls == {"model": 2, "guide": 2}
    state, _ = svi.update(state, x)  # compiled: no Python run at all
    assert calls == {"model": 2, "guide": 2}


def test_single_particle_runs_without_the_particle_vmap_and_gives_the_same_loss():
    """K = 1 calls the particle directly; its loss and gradient are the vmapped ones."""
    model, guide, _ = counted_pair()
    x = jnp.linspace(-1.0, 1.0, 5)
    params = sg.init_params(0, model, guide, x)
    key = jax.random.key(3)
    elbo = sg.ELBO(num_particles=1)
    direct = jax.value_and_grad(elbo.loss, argnums=1)(key, params, model, guide, x)
    ev = elbo.evaluate(key, params, model, guide, x)  # arrays keep their particle axis
    assert all(v.shape[0] == 1 for v in jax.tree.leaves((ev.logq, ev.costs)))
    loss = float(direct[0])
    assert np.isfinite(loss)
    # against a hand-written ELBO estimate at the same key: the guide's draws
    tr_guide = sg.handlers.trace_program(guide, key, params, x)
    mu, z = tr_guide["mu"]["value"], tr_guide["z"]["value"]
    m, lg = params["m"], params["l"]
    logq = dist.Normal(m, 1.0).log_prob(mu) + dist.Bernoulli(logits=lg + mu).log_prob(z).sum()
    logp = (dist.Normal(0.0, 1.0).log_prob(mu) + dist.Bernoulli(logits=mu).log_prob(z).sum()
            + dist.Normal(mu + z, 1.0).log_prob(x).sum())
    np.testing.assert_allclose(-loss, logp - logq, rtol=1e-5)


def test_graph_from_one_pass_follows_the_data_flow():
    def guide():
        a = sg.sample("a", dist.Normal(0.0, 1.0))
        b = sg.sample("b", dist.Bernoulli(logits=a))
        sg.sample("c", dist.Normal(jnp.sin(b * 1.0), 1.0))

    def model():
        a = sg.sample("a", dist.Normal(0.0, 1.0))
        sg.sample("b", dist.Bernoulli(logits=0.0))
        c = sg.sample("c", dist.Normal(0.0, 1.0))
        sg.factor("r", a * c)

    g = sg.graph(model, guide)
    assert g.parents == {"a": frozenset(), "b": frozenset({"a"}), "c": frozenset({"b"})}
    assert g.cost_inputs["r"] == frozenset({"a", "c"})
    assert g.cost_inputs["log p(b)"] == frozenset({"b"})
    assert g.cost_inputs["-log q(c)"] == frozenset({"b", "c"})
    assert g.credited_costs("b") == ("log p(b)", "log p(c)", "r", "-log q(b)", "-log q(c)")


@pytest.mark.parametrize("batch, plate_dims, order", [
    ((4, 3), {"data": -2}, ("data",)),
    ((2, 4, 3), {"data": -2, "time": -3}, ("data", "time")),
    ((3, 1, 2), {"b": -1, "a": -3}, ("a", "c", "b")),
    ((), {}, ("a",)),
])
def test_layout_from_value_inverts_to_value(batch, plate_dims, order):
    layout = SiteLayout(batch, 1, plate_dims, order)
    canonical = layout.to_canonical(jnp.ones(batch))
    x = jax.random.normal(jax.random.key(0), (3, *canonical.shape))
    value = layout.to_value(x)
    assert value.ndim == 1 + len(batch) + 1
    np.testing.assert_array_equal(layout.from_value(value), x)
    # and to_canonical sums the undeclared dims exactly
    y = jax.random.normal(jax.random.key(1), batch)
    block = tuple(a for a in range(len(batch)) if a - len(batch) not in plate_dims.values())
    assert np.isclose(float(layout.to_canonical(y).sum()), float(y.sum()), atol=1e-5)
    assert layout.to_canonical(y).size == int(np.prod([batch[a] for a in range(len(batch))
                                                       if a not in block]))


@pytest.mark.parametrize("objective, chunked", [
    (sg.ELBO(num_particles=8), sg.ELBO(num_particles=8, particle_chunk=2)),
    (sg.IWAE(num_particles=6), sg.IWAE(num_particles=6, particle_chunk=3)),
    (sg.RWS(num_particles=4), sg.RWS(num_particles=4, particle_chunk=1)),
])
def test_particle_chunks_give_the_same_loss_and_gradient(objective, chunked):
    model, guide, _ = counted_pair()
    x = jnp.linspace(-1.0, 1.0, 5)
    params = sg.init_params(0, model, guide, x)
    key = jax.random.key(7)
    full = jax.value_and_grad(objective.loss, argnums=1)(key, params, model, guide, x)
    blocks = jax.value_and_grad(chunked.loss, argnums=1)(key, params, model, guide, x)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(blocks), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "particle_chunk" in repr(chunked)


def test_particle_chunk_is_checked_and_refused_by_coupled_particles():
    with pytest.raises(ValueError, match="must divide num_particles=6"):
        sg.ELBO(num_particles=6, particle_chunk=4)
    with pytest.raises(TypeError, match="particle_chunk must be None or an int"):
        sg.ELBO(num_particles=6, particle_chunk=2.0)
    model, guide, _ = counted_pair()
    x = jnp.zeros(3)

    def disarm_guide(x):
        with sg.plate("data", 3):
            sg.sample("z", dist.Bernoulli(logits=sg.param("l", jnp.zeros(3))),
                      estimator=sg.DisARM())
        sg.sample("mu", dist.Normal(sg.param("m", 0.0), 1.0))

    params = sg.init_params(0, model, disarm_guide, x)
    with pytest.raises(sg.SiteError, match="'z' uses DisARM, which couples the particles"):
        sg.ELBO(num_particles=4, particle_chunk=2).loss(0, params, model, disarm_guide, x)


def _guards(loss, *args) -> int:
    """``select_n`` equations in the jaxpr: numpyro's support checks ``where(ok, lp, -inf)``."""
    return str(jax.make_jaxpr(loss)(*args)).count("select_n")


def test_sampled_values_skip_the_support_check_and_data_keep_it():
    """Guide draws (and model sites replayed from the same support) lie in the support by
    construction: their densities skip numpyro's check (half a small step's CPU time); an
    observed value in a jitted step keeps it, so bad data give -inf, not a wrong number."""
    guide = lambda x: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))

    def latent_only(x):
        sg.sample("z", dist.Normal(0.0, 1.0))

    def with_data(x):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        with sg.plate("data", x.shape[0]):
            sg.sample("x", dist.Exponential(jnp.exp(z)), obs=x)

    x = jnp.array([0.5, 1.0, 2.0])
    params = {"m": jnp.zeros(())}
    elbo = sg.ELBO()
    loss = lambda model: (lambda p, x: elbo.loss(jax.random.key(0), p, model, guide, x))
    assert _guards(loss(latent_only), params, x) == 0
    assert _guards(loss(with_data), params, x) >= 1
    bad = jax.jit(loss(with_data))(params, jnp.array([0.5, -1.0, 2.0]))  # -1: not positive
    assert bool(jnp.isinf(bad))


def test_observed_bernoulli_data_are_checked_inside_the_jitted_step():
    """New data reach a jitted step every call (``SVI.run(batches=...)``): an observed value
    outside the support gives -inf there too, for scgjax's own Bernoulli as for numpyro's."""
    def model(x):
        z = sg.sample("z", dist.Normal(0.0, 1.0))
        with sg.plate("data", x.shape[0]):
            sg.sample("x", dist.Bernoulli(logits=z), obs=x)

    guide = lambda x: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
    step = jax.jit(lambda p, x: sg.ELBO().loss(jax.random.key(0), p, model, guide, x))
    params = {"m": jnp.zeros(())}
    assert bool(jnp.isfinite(step(params, jnp.array([0.0, 1.0, 1.0]))))
    assert bool(jnp.isinf(step(params, jnp.array([0.0, 2.0, 1.0]))))
