"""Two silent plate faults (issue 10, part 5): one subsample per plate and run; no grid made
by a plate broadcasting against a dimension that no plate declares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist

DATA = jnp.arange(10.0)


def entered_twice(pl, seen: dict, role: str):
    """A program that enters the plate object ``pl`` twice, recording its indices."""

    def program():
        with pl as i:
            seen[f"{role} 1"] = i
            sg.sample("a", dist.Normal(DATA[i], 1.0))
        with pl as i:
            seen[f"{role} 2"] = i
            sg.sample("b", dist.Normal(DATA[i], 1.0))

    return program


def test_a_plate_entered_twice_keeps_one_subsample():
    pl = sg.plate("p", 10, subsample_size=3)
    seen = {}
    guide, model = entered_twice(pl, seen, "guide"), entered_twice(pl, seen, "model")
    guide_tr = sg.handlers.trace(sg.handlers.seed(guide, 0)).get_trace()
    sg.handlers.trace(sg.handlers.replay(model, guide_tr)).get_trace()
    first = np.asarray(seen["guide 1"])
    assert len(seen) == 4
    for where, indices in seen.items():
        np.testing.assert_array_equal(np.asarray(indices), first, err_msg=where)
    # different seeds still draw different subsamples
    draws = set()
    for s in range(6):
        sg.handlers.seed(guide, s)()
        draws.add(tuple(np.asarray(seen["guide 1"]).tolist()))
    assert len(draws) > 1


def test_model_and_guide_score_the_same_points_in_an_objective():
    pl = sg.plate("p", 10, subsample_size=4)
    guide, model = entered_twice(pl, {}, "guide"), entered_twice(pl, {}, "model")
    # model = guide on the same points: the ELBO is exactly 0 on every sample (before the fix
    # the model scored the second block at the first block's points)
    for seed in range(3):
        loss = sg.ELBO().loss(jax.random.key(seed), {}, model, guide)
        assert abs(float(loss)) < 1e-4


def test_plate_broadcasting_against_an_undeclared_dim_is_an_error():
    def program():
        with sg.plate("data", 5):
            sg.sample("z", dist.Bernoulli(probs=jnp.full((1,), 0.3)).expand_by([5]))

    with pytest.raises(sg.SiteError, match=r"'z'.*\(5, 1\).*dim -2.*'data'.*\(5, 5\)"):
        sg.handlers.trace(sg.handlers.seed(program, 0)).get_trace()


def test_undeclared_dim_right_of_a_plate_is_a_block():
    # as in Pyro's check_site_shape: e.g. a global latent of another plate broadcast over data
    def program():
        with sg.plate("components", 2, dim=-1):
            p = sg.sample("p", dist.Beta(1.1, 1.1))
        with sg.plate("data", 5, dim=-2):
            return sg.sample("obs", dist.Bernoulli(probs=p), obs=jnp.ones((5, 2)))

    tr = sg.handlers.trace(sg.handlers.seed(program, 0)).get_trace()
    assert tr["obs"]["fn"].batch_shape == (5, 2)


def test_factor_broadcasting_against_a_plate_is_an_error():
    def program():
        with sg.plate("data", 4):
            sg.factor("f", jnp.zeros((3, 1)))

    with pytest.raises(sg.SiteError, match="'f'"):
        sg.handlers.trace(program).get_trace()


@pytest.mark.parametrize("shape", [(), (1,), (5,), (3, 5)])
def test_documented_shapes_still_work(shape):
    # broadcasting a scalar or size-1 site, a full plate dim, and an undeclared block to the
    # left of a full plate dim (one block per plate element) are all fine
    def program():
        with sg.plate("data", 5):
            return sg.sample("z", dist.Normal(jnp.zeros(shape), 1.0))

    z = sg.handlers.seed(program, 0)()
    assert z.shape[-1] == 5


def test_plates_nested_in_another_order_in_the_guide_are_an_error():
    # the guide's value would be replayed transposed into the model
    def model():
        with sg.plate("a", 3), sg.plate("b", 3):
            sg.sample("z", dist.Normal(jnp.arange(3.0), 1.0))

    def guide():
        with sg.plate("b", 3), sg.plate("a", 3):
            sg.sample("z", dist.Normal(sg.param("m", jnp.zeros((3, 3))), 1.0))

    with pytest.raises(sg.SiteError, match="'z' sits in plate 'a' at dim -1.*dim -2"):
        sg.ELBO().loss(0, sg.init_params(0, model, guide), model, guide)
