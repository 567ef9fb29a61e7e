"""``infer_discrete``: draw a model's summed-out sites from their exact posterior, or their MAP.

After training with sites marked ``infer={"enumerate": "parallel"}`` (summed out by the
objectives), :func:`infer_discrete` gives their values given everything else: for each element
``n`` of the sites' plates, the posterior over their joint values is

    p(z[n] = v | x, rest)  proportional to  exp(sum_{c depends on z} c(v)[n]),

the same sums the objectives' marginal ``log sum_z p`` adds up (:mod:`scgjax.objectives.marginal`).
``temperature=1`` samples it, ``temperature=0`` takes its mode (MAP), any other temperature
samples ``p^(1/T)``. For a chain of such sites inside ``sg.scan`` (a hidden Markov model) the
mode of the whole path is found by the Viterbi algorithm (max-product) and a path is drawn by
forward-filter backward-sample, from the same step tables the forward algorithm sums. NumPyro's
``infer_discrete`` is the reference for the interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scgjax import handlers, primitives
from scgjax.dist import joint_support_values
from scgjax.layout import SiteLayout, reduce_to
from scgjax.objectives import enumeration
from scgjax.objectives.marginal import (
    check_budget,
    marginalise,
    over_configs,
    step_tables,
)
from scgjax.tracegraph import GUIDED, build, is_marginalised, mark_sources, site_cost

__all__ = ["infer_discrete"]


def infer_discrete(model: Callable, temperature: float = 1.0, rng_key: Any = None
                   ) -> Callable:
    """``model`` with its summed-out sites drawn from their exact posterior given the rest.

    The returned function runs ``model(*args, **kwargs)`` once more, with each site marked
    ``infer={"enumerate": "parallel"}`` set to a draw from ``p(z | everything else)``
    (``temperature=1``), its mode (``temperature=0``) or a draw at another temperature; an
    outer ``sg.handlers.trace`` records the values. The other sites' values must come from
    handlers *inside* ``model`` (``sg.handlers.replay(model, guide_trace)`` for a guide's
    latents, ``sg.handlers.substitute_unconstrained(model, params)`` for trained params):
    the posterior is computed from ``model`` on its own, vectorised over the joint values of
    the sites (for a loop's sites, over pairs of consecutive values: O(T S^2)).

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def mixture(x):
        ...     with sg.plate("data", 3):
        ...         z = sg.sample("z", dist.Bernoulli(probs=0.5), infer={"enumerate": "parallel"})
        ...         sg.sample("x", dist.Normal(4.0 * z - 2.0, 1.0), obs=x)
        >>> serve = sg.infer_discrete(mixture, temperature=0)
        >>> tr = sg.handlers.trace(serve).get_trace(jnp.array([-2.1, 1.8, 2.5]))
        >>> tr["z"]["value"].tolist()
        [0, 1, 1]
    """
    if not callable(model):
        raise TypeError(f"infer_discrete needs the model, a function; got {type(model).__name__}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"infer_discrete's temperature must be a number >= 0, got "
                         f"{temperature!r}")
    key = handlers.as_prng_key(0 if rng_key is None else rng_key)
    key_model, key_draw = jax.random.split(key)

    def serve(*args: Any, **kwargs: Any) -> Any:
        with _isolated():
            values = _posterior_values(model, key_model, key_draw, float(temperature), args,
                                       kwargs)
        return handlers.substitute(model, values)(*args, **kwargs)

    return serve


class _isolated:
    """Run with no handler active (the model carries its own): the posterior is computed from
    the model alone; the caller's handlers see only the final run."""

    def __enter__(self) -> None:
        self.saved = list(primitives._HANDLER_STACK)
        primitives._HANDLER_STACK.clear()

    def __exit__(self, *exc: Any) -> None:
        primitives._HANDLER_STACK[:] = self.saved


def _decode_chain(marginal: Any, logits: jax.Array, order: tuple[str, ...], temperature: float,
                  key: jax.Array) -> jax.Array:
    """The joint value index of a loop's sites at every step (canonical layout, time axis
    included): Viterbi (``temperature=0``: max-product forward pass, back-pointers) or
    forward-filter backward-sample of ``p^(1/temperature)``."""
    table, axis = step_tables(marginal, logits[None], order)
    table = table[:, 0]  # (T, prev, cur, *other axes)
    if temperature == 0:
        def forward(delta, step_table):
            scores = delta[:, None] + step_table
            return jnp.max(scores, axis=0), jnp.argmax(scores, axis=0)

        delta, pointers = jax.lax.scan(forward, table[0, 0], table[1:])
        last = jnp.argmax(delta, axis=0)

        def back(cur, pointer):
            prev = jnp.take_along_axis(pointer, cur[None], axis=0)[0]
            return prev, cur

        first, path = jax.lax.scan(back, last, pointers, reverse=True)
        states = jnp.concatenate([first[None], path], axis=0)
    else:
        table = table / temperature

        def filter_(alpha, step_table):
            new = jax.nn.logsumexp(alpha[:, None] + step_table, axis=0)
            return new, alpha

        last_alpha, alphas = jax.lax.scan(filter_, table[0, 0], table[1:])
        keys = jax.random.split(key, table.shape[0])
        last = jax.random.categorical(keys[-1], last_alpha, axis=0)

        def sample(cur, inputs):
            alpha, step_table, k = inputs  # alpha_{t-1}, C_t
            scores = alpha + jnp.take_along_axis(step_table, cur[None, None], axis=1)[:, 0]
            return jax.random.categorical(k, scores, axis=0), cur

        first, path = jax.lax.scan(sample, last, (alphas, table[1:], keys[:-1]), reverse=True)
        states = jnp.concatenate([first[None], path], axis=0)
    return jnp.moveaxis(states, 0, axis - 2)  # back to the canonical axes


def _posterior_values(model: Callable, key_model: jax.Array, key_draw: jax.Array,
                      temperature: float, args: tuple, kwargs: dict) -> dict[str, jax.Array]:
    def run(enum_index: dict | None, mark: bool) -> dict:
        fn = handlers.seed(marginalise(model, None, enum_index), key_model)
        if not mark:
            return handlers.trace(fn).get_trace(*args, **kwargs)
        with mark_sources(only=is_marginalised):
            return handlers.trace(fn).get_trace(*args, **kwargs)

    structure = build(GUIDED, lambda: {"guide": {}, "model": run(None, True)}, 1)
    order = structure.plate_order
    tr = run(None, False)
    values = {}
    for group, marginal in enumerate(structure.marginals):  # independent: one at a time
        check_budget(marginal)

        def log_joint(index: dict, marginal=marginal) -> jax.Array:
            """Per element of the sites' plates (the other groups at their first value)."""
            tr = run(index, False)
            total = 0.0
            for cid, _, site, sign in structure.costs:
                if cid in marginal.costs:
                    msg = tr[site]
                    cost = SiteLayout.of_message(msg, order).to_canonical(site_cost(msg, sign))
                    total = total + reduce_to(cost[None], marginal.keep)[0]
            return total / marginal.scale

        logits = over_configs(marginal, log_joint)
        key = jax.random.fold_in(key_draw, group)
        if marginal.loop is not None:
            chosen = _decode_chain(marginal, logits, order, temperature, key)
        elif temperature == 0:
            chosen = jnp.argmax(logits, axis=0)
        else:
            chosen = jax.random.categorical(key, logits / temperature, axis=0)
        for site, index in zip(marginal.sites,
                               enumeration.config_indices(chosen, marginal.sizes), strict=True):
            msg = tr[site]
            layout = SiteLayout.of_message(msg, order)
            index = layout.to_value(index[None], event=False)[0]  # the site's batch layout
            index = jnp.broadcast_to(index, tuple(msg["fn"].batch_shape))
            values[site] = joint_support_values(msg["fn"], index)
    return values
