"""Exact marginalisation of a model's discrete sites (``infer={"enumerate": "parallel"}``).

A latent site of the model marked ``infer={"enumerate": "parallel"}`` that the guide does not
sample is summed out. The model runs once per joint value of the marginalised sites (a ``vmap``
over configurations, as for ``sg.Enumerate``; every element of a site set to the configuration's
value), and the costs that depend on them (their own log-densities, the log-densities and factors
their values reach, :attr:`scgjax.tracegraph.Marginal.costs`) are replaced by one cost per
element ``n`` of the sites' plates,

    M[n] = logsumexp_config  sum_{c depends on z}  c(config) summed onto n,

the log of the marginal density of everything the sites touch (Pyro's and NumPyro's
``TraceEnum_ELBO`` for one group of sites that share their plates; Obermeyer et al. 2019 for the
general case). Within a plate the sum is per element and the elements multiply; the costs'
other plates are summed inside the ``log``. Sampled guide sites upstream of those costs are
credited with ``M`` (its DiCE box is theirs): a global latent's learning signal includes the
marginal of the local terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from scgjax.control_flow import Transition
from scgjax.dist import joint_support
from scgjax.errors import SiteError
from scgjax.estimators.enumerate import check_joint_support
from scgjax.handlers import at_step
from scgjax.layout import reduce_to
from scgjax.objectives.checks import check_enumerated_batch
from scgjax.objectives.enumeration import group_runs, local_runs
from scgjax.primitives import Message, Messenger
from scgjax.tracegraph import Marginal, density

__all__ = ["MAX_CONFIGS", "StepPair", "collapse", "config_index", "marginalise", "num_configs",
           "over_configs", "over_runs", "presum", "run_index", "runs", "step_tables",
           "wants_enumeration"]

#: the most joint values of the marginalised sites an objective enumerates
MAX_CONFIGS = 2**16


def wants_enumeration(msg: Message) -> bool:
    """A latent sample site marked ``infer={"enumerate": "parallel"}``."""
    return (msg["type"] == "sample" and not msg["is_observed"]
            and (msg.get("infer") or {}).get("enumerate") == "parallel")


class StepPair(NamedTuple):
    """The run of a loop's summed-out sites at one pair of consecutive joint values: every
    step takes the value ``cur`` after a step at ``prev`` (the loop runs at a
    :class:`~scgjax.control_flow.Transition`), so step ``t``'s costs are ``C_t[prev, cur]``."""

    loop: str
    sites: tuple[str, ...]
    sizes: tuple[int, ...]
    prev: Any
    cur: Any


class marginalise(Messenger):
    """Set each of the model's sites to be summed out (marked for enumeration, not sampled
    by the guide) to the support value that ``enum_index`` picks (the first one without it);
    a :class:`StepPair` runs the sites' loop at that transition."""

    scan_role = "step"

    def __init__(self, fn: Callable | None = None, guide_trace: dict | None = None,
                 enum_index: dict | None = None):
        super().__init__(fn)
        self.guide_trace = guide_trace or {}
        self.enum_index = enum_index or {}
        self.loops = {v.loop: v for v in self.enum_index.values() if isinstance(v, StepPair)}
        self._step: Any = None

    def for_step(self, step: Any) -> marginalise:
        return at_step(self, step)

    def _index(self, name: str) -> Any:
        """The support index of site ``name`` here (for a :class:`StepPair`, from the step's
        joint value)."""
        index = self.enum_index.get(name, 0)
        if not isinstance(index, StepPair):
            return index
        step = self._step
        joint = index.cur if step is None or step.choice is None else step.choice
        return jnp.unravel_index(joint, index.sizes)[index.sites.index(name)]

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "scan" and msg["name"] in self.loops:
            pair = self.loops[msg["name"]]
            msg["kwargs"]["transition"] = Transition(math.prod(pair.sizes), pair.prev, pair.cur)
            msg["kwargs"]["step_log_prob"] = density  # each site's density inside the step
            return
        if not wants_enumeration(msg) or msg["name"] in self.guide_trace:
            return
        fn = msg["fn"]
        if not getattr(fn.support, "is_discrete", False):
            raise SiteError(msg["name"], f"is marked infer={{'enumerate': 'parallel'}}, but its "
                            f"{type(fn).__name__} distribution is not discrete with a finite "
                            "support: only discrete sites can be summed out")
        check_joint_support(msg["name"], fn, "is summed out (infer={'enumerate': 'parallel'})")
        check_enumerated_batch(msg, "is summed out (infer={'enumerate': 'parallel'})")
        support = joint_support(fn, self._index(msg["name"]))
        msg["value"] = jnp.broadcast_to(support, (*fn.batch_shape, *fn.event_shape))
        msg["marginalised"] = True
        msg["in_support"] = True


def check_budget(marginal: Marginal, max_configs: int = MAX_CONFIGS) -> None:
    """The joint support of the marginalised sites must fit the budget."""
    n = num_configs(marginal)
    if n > max_configs:
        raise SiteError(marginal.sites[0], f"is summed out jointly with {list(marginal.sites)}: "
                        f"{n} joint values, more than the budget of {max_configs}")


def num_configs(marginal: Marginal) -> int:
    """How many runs of the model the sum takes: the joint values of the sites, or their
    pairs (every step's previous and current value) for a loop's sites."""
    n = math.prod(marginal.sizes)
    return n * n if marginal.loop is not None else n


def config_index(marginal: Marginal, config: Any) -> dict[str, Any]:
    """Each site's support index in configuration ``config``; for a loop's sites the
    :class:`StepPair` ``(prev, cur) = divmod(config, n)`` of ``n`` joint values."""
    if marginal.loop is None:
        return dict(zip(marginal.sites, jnp.unravel_index(config, marginal.sizes), strict=True))
    n = math.prod(marginal.sizes)
    return _pair(marginal, config // n, config % n)


def _pair(marginal: Marginal, prev: Any, cur: Any) -> dict[str, StepPair]:
    pair = StepPair(marginal.loop, marginal.sites, marginal.sizes, prev, cur)
    return dict.fromkeys(marginal.sites, pair)


def over_configs(marginal: Marginal, fn: Callable[[dict], Any]) -> Any:
    """``fn(index)`` at every configuration of ``marginal``'s sites, stacked on a leading axis
    of :func:`num_configs` (``index``: :func:`config_index`). For a loop's sites the runs are a
    ``vmap`` over ``prev`` around one over ``cur``: what depends on one of them only (a
    transition's row, an emission) is computed once per value, not once per pair."""
    n = math.prod(marginal.sizes)
    values = jnp.arange(n)
    if marginal.loop is None:
        return jax.vmap(lambda c: fn(config_index(marginal, c)))(values)
    out = jax.vmap(lambda p: jax.vmap(lambda c: fn(_pair(marginal, p, c)))(values))(values)
    return jax.tree.map(lambda x: x.reshape((n * n, *x.shape[2:])), out)


def over_runs(marginals: tuple[Marginal, ...], fn: Callable[[dict], Any]) -> Any:
    """``fn(index)`` at every run of every group (:func:`runs` in all, on a leading axis; the
    groups' runs one after another, each with the other groups at their first value)."""
    if all(m.loop is None for m in marginals):  # one vmap over all runs
        return jax.vmap(lambda r: fn(run_index(marginals, r)))(jnp.arange(runs(marginals)))
    first = {}
    for m in marginals:
        first.update(config_index(m, 0))
    blocks = [over_configs(m, lambda index: fn({**first, **index})) for m in marginals]
    return jax.tree.map(lambda *b: jnp.concatenate(b), *blocks)


def runs(marginals: tuple[Marginal, ...]) -> int:
    """How many runs of the model all the groups take: their counts add up (each group is
    summed with the others at their first value)."""
    return sum(num_configs(m) for m in marginals)


def run_index(marginals: tuple[Marginal, ...], run: jax.Array) -> dict[str, Any]:
    """The support index of every summed-out site in run ``run`` (traced): the runs of group
    ``g`` go through its configurations, every other group stays at its first value."""
    index: dict[str, Any] = {}
    for m, local in zip(marginals, local_runs(run, [num_configs(m) for m in marginals]),
                        strict=True):
        index.update(config_index(m, local))
    return index


def presum(marginals: tuple[Marginal, ...], costs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One run's costs (one particle's, canonical layout) with each group's costs replaced by
    their sum reduced to the group's plates (:attr:`Marginal.keep`), divided by its scale,
    under the group's id: done inside the runs' ``vmap``, so that only the sum is stacked
    over the runs, and each term of it varies only with what it depends on."""
    out = dict(costs)
    for m in marginals:
        total = None
        for c in m.costs:
            x = reduce_to(out.pop(c)[None], m.keep)[0]
            total = x if total is None else total + x
        out[m.id] = total / m.scale if m.scale != 1.0 else total
    return out


def collapse(marginals: tuple[Marginal, ...], costs: dict[str, jax.Array],
             plate_order: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """Every group's summed costs (``(K, runs, *plates)`` under the group's id, from
    :func:`presum`; its own runs) replaced by its marginal; the other costs are the same in
    every run and keep the first."""
    out = {c: v[:, 0] for c, v in costs.items() if c not in {m.id for m in marginals}}
    for m, runs_of_m in zip(marginals, group_runs([num_configs(m) for m in marginals]),
                            strict=True):
        total = costs[m.id][:, runs_of_m]
        out[m.id] = m.scale * (_forward(m, total, plate_order) if m.loop is not None
                               else jax.nn.logsumexp(total, axis=1))
    return out


def _forward(marginal: Marginal, total: jax.Array, plate_order: tuple[str, ...]) -> jax.Array:
    """The forward algorithm over the loop's steps, from the runs at every pair of values.

    The run at pair ``(prev, cur)`` (:class:`StepPair`) gives every step's costs at
    ``(z_{t-1}, z_t) = (prev, cur)``: the ``S^2`` runs give every step's table
    ``C_t[prev, cur]``. Then ``alpha_0 = C_0[., cur]``, ``alpha_t[cur] = logsumexp_prev(
    alpha_{t-1}[prev] + C_t[prev, cur])``, and the marginal is ``logsumexp(alpha_{T-1})``:
    O(T S^2), one ``lax.scan``. Returns it with a size-1 time axis in the plates' layout.
    """
    table, axis = step_tables(marginal, total, plate_order)

    def forward(alpha, step_table):
        alpha = jax.nn.logsumexp(alpha[:, :, None] + step_table, axis=1)
        return alpha, None

    alpha, _ = jax.lax.scan(forward, table[0, :, 0], table[1:])  # (K, cur, ...)
    return jnp.expand_dims(jax.nn.logsumexp(alpha, axis=1), axis - 1)


def step_tables(marginal: Marginal, total: jax.Array, plate_order: tuple[str, ...]
                ) -> tuple[jax.Array, int]:
    """``(C, axis)``: from the summed costs of the runs at every pair of values (``(K, S*S,
    *axes)``), each step's table ``C[t, k, prev, cur, *other axes]``, and the position of the
    time axis in ``(K, *axes)`` plus one. Step 0 does not depend on ``prev``."""
    k, s = total.shape[0], math.prod(marginal.sizes)
    axis = 2 + list(plate_order).index(marginal.loop)  # the time axis, after K and configs
    x = total.reshape((k, s, s, *total.shape[2:]))
    return jnp.moveaxis(x, axis + 1, 0), axis  # (T, K, prev, cur, *other axes)
