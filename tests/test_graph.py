"""The stochastic computation graph: nodes, data-flow edges, credit sets, rendering."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import scgjax as sg
from scgjax import dist
from tests import models
from tests.models import bern_logp
from tests.stats import assert_unbiased, grad_samples


def test_sigmoid_belief_network_credit_sets():
    g = sg.graph(models.sbn_model, models.sbn_guide, models.SBN_X,
                 params=models.sbn_init())
    all_terms = {"log p(h3)", "log p(h2)", "log p(h1)", "log p(x)",
                 "-log q(h1)", "-log q(h2)", "-log q(h3)"}
    assert set(g.costs) == all_terms
    assert set(g.credited_costs("h1")) == all_terms
    assert set(g.credited_costs("h2")) == {"log p(h3)", "log p(h2)", "log p(h1)",
                                           "-log q(h2)", "-log q(h3)"}
    assert set(g.credited_costs("h3")) == {"log p(h3)", "log p(h2)", "-log q(h3)"}
    assert g.parents == {"h1": frozenset(), "h2": {"h1"}, "h3": {"h2"}}
    assert g.cost_inputs["log p(x)"] == {"h1"}
    assert all(node.plates == ("data",) and node.score for node in g.nodes.values())
    assert all(type(node.estimator) is sg.ScoreFunction for node in g.nodes.values())


def test_to_dot_shows_credit_plates_and_blocks():
    g = sg.graph(models.sbn_model, models.sbn_guide, models.SBN_X,
                 params=models.sbn_init())
    dot = g.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert "plate data (6)" in dot
    ids = {line.split()[0]: line for line in dot.splitlines() if "label=" in line}
    credit = [line for line in dot.splitlines() if "dashed" in line]
    assert len(credit) == 7 + 5 + 3  # one dashed edge per (node, credited cost)
    assert any("doublecircle" in line and "h2" in line for line in ids.values())

    def block_model():
        sg.sample("z", dist.Normal(jnp.zeros(3), 1.0))  # batch dim without a plate

    block_graph = sg.graph(block_model)
    assert block_graph.nodes["z"].unplated_dims == (-1,)
    assert "block dims" in block_graph.to_dot()


def test_default_estimators():
    def guide():
        sg.sample("c", dist.Normal(0.0, 1.0))
        sg.sample("d", dist.Bernoulli(logits=0.0))

    model = guide
    one = sg.graph(model, guide)
    assert type(one.nodes["c"].estimator) is sg.Pathwise and not one.nodes["c"].score
    assert one.nodes["d"].estimator == sg.ScoreFunction(sg.baselines.MovingAverage(0.9))
    two = sg.graph(model, guide, num_particles=2)
    assert type(two.nodes["d"].estimator) is sg.RLOO


def test_causality_from_data_flow_not_program_order():
    def program():
        a = sg.sample("a", dist.Bernoulli(logits=0.0))
        b = sg.sample("b", dist.Bernoulli(logits=0.0))
        sg.factor("only_b", b * 2.0)   # after a in program order, but independent of it
        sg.factor("both", a * b)

    g = sg.graph(program)
    assert g.credited_costs("a") == ("both",)
    assert g.credited_costs("b") == ("only_b", "both")


N_LINK = 3


def linked_program():
    """z[n] in a plate; a global v depends on all z; costs in the plate depend on v.

    The path z[m] -> v -> c[n] leaves the plate, so every z[m] must be credited with every
    c[n]: per-element credit along 'data' would be biased here.
    """
    t = sg.param("t", jnp.array([0.4, -0.3, 0.2]))
    with sg.plate("data", N_LINK):
        z = sg.sample("z", dist.Bernoulli(logits=t), estimator=sg.ScoreFunction())
    v = sg.sample("v", dist.Bernoulli(logits=1.5 * z.sum() - 2.0), estimator=sg.ScoreFunction())
    with sg.plate("data", N_LINK):
        sg.factor("c", (jnp.arange(N_LINK) + 1.0) * v + 0.5 * z)


def linked_exact(params):
    t = params["t"]
    total = 0.0
    for bits in range(2 ** (N_LINK + 1)):
        z = jnp.array([(bits >> i) & 1 for i in range(N_LINK)], jnp.float32)
        v = float((bits >> N_LINK) & 1)
        logp = bern_logp(z, t).sum() + bern_logp(v, 1.5 * z.sum() - 2.0)
        total = total + jnp.exp(logp) * jnp.sum((jnp.arange(N_LINK) + 1.0) * v + 0.5 * z)
    return total


def test_credit_through_a_node_outside_the_plate():
    g = sg.graph(linked_program)
    assert g.shared_plates("z", "c") == ()
    assert g.shared_plates("v", "c") == ()
    params = sg.init_params(0, linked_program)
    exact = jax.grad(linked_exact)(params)
    loss = lambda key, p: sg.Expectation().loss(key, p, linked_program)
    assert_unbiased(grad_samples(loss, params, 20000), exact)


def test_per_element_credit_within_a_plate():
    def program():
        with sg.plate("data", 4):
            z = sg.sample("z", dist.Bernoulli(logits=0.0))
            sg.factor("c", z)

    g = sg.graph(program)
    assert g.shared_plates("z", "c") == ("data",)
