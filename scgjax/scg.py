"""The stochastic computation graph (SCG) of a traced program, and its rendering.

An SCG (Schulman et al. 2015) has *stochastic nodes* (the random choices that are sampled),
*cost nodes* (terms of the objective: log-densities, minus guide log-densities, factors) and the
data-flow edges between them. Objectives use it for credit assignment: a stochastic node ``w``
is credited with the costs *downstream* of it, i.e. the costs that a value computed from ``w``
reaches, directly or through the distributions of other stochastic nodes:

    credit(w) = { c : inputs(c) ∩ ({w} ∪ descendants(w)) ≠ ∅ }.

Within plates the credit is per element (see :mod:`scgjax.objectives.surrogate`); this module
records which plates each node and cost lives in, and dimensions of a node's batch shape that no
plate declares (those are treated as one block, which is correct but loses structure: the graph
view marks them so a user can replace a ``.to_event`` by a plate).

Example:
    >>> import scgjax as sg
    >>> from scgjax import dist
    >>> def guide():
    ...     a = sg.sample("a", dist.Bernoulli(logits=0.0))
    ...     sg.sample("b", dist.Bernoulli(logits=a * 1.0))
    >>> def model():
    ...     a = sg.sample("a", dist.Bernoulli(logits=0.0))
    ...     b = sg.sample("b", dist.Bernoulli(logits=0.0))
    >>> g = sg.graph(model, guide)
    >>> g.credited_costs("b")
    ('log p(b)', '-log q(b)')
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from scgjax.dist import innermost, joint_support_size
from scgjax.errors import SiteError
from scgjax.layout import SiteLayout
from scgjax.primitives import Message

__all__ = ["ALL_LAGS", "CostNode", "Plate", "SCG", "StochasticNode", "axis_credit",
           "compose_lags", "node_from_message"]


@dataclasses.dataclass(frozen=True)
class Plate:
    """A plate of the program: ``size`` elements carried (the subsample), of ``full_size``.

    ``time`` marks the time axis of an ``sg.scan`` loop: its elements are steps, which the
    loop's carry may link (credit along it follows :attr:`SCG.time_lags`)."""

    name: str
    size: int
    full_size: int
    time: bool = False


#: every element of a cost is credited to every element of a node: no structure along an axis
ALL_LAGS = frozenset({-1, 0, 1})


def compose_lags(first: frozenset[int], then: frozenset[int]) -> frozenset[int]:
    """The lags (signs of ``t - s``) of a path ``s -> u -> t`` whose two edges have lags
    ``first`` and ``then``: an earlier-then-later path may land anywhere.

    Example:
        >>> sorted(compose_lags(frozenset({0, 1}), frozenset({1}))), sorted(
        ...     compose_lags(frozenset({1}), frozenset({-1})))
        ([1], [-1, 0, 1])
    """
    out: set[int] = set()
    for a in first:
        for b in then:
            out |= ALL_LAGS if a * b < 0 else {a + b if a * b == 0 else a}
    return frozenset(out)


def axis_credit(lags: frozenset[int]) -> bool | frozenset[int]:
    """How a node is credited along one canonical axis: ``True`` element by element (a shared
    plate, or a step that reaches only its own step), ``False`` with the sum of every element,
    else the lags of the cost's elements that it reaches (see :func:`scgjax.layout.reduce_to`)."""
    return True if lags == {0} else False if lags == ALL_LAGS else lags


def _mirror(credit: bool | frozenset[int]) -> bool | frozenset[int]:
    return credit if isinstance(credit, bool) else frozenset(-lag for lag in credit)


@dataclasses.dataclass(frozen=True)
class StochasticNode:
    """A sampled random choice of the program (a guide site, for guided objectives)."""

    name: str
    role: str
    distribution: str
    reparameterisable: bool
    discrete: bool
    estimator: Any
    plates: tuple[str, ...]
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    unplated_dims: tuple[int, ...]
    plate_dims: tuple[int, ...] = ()
    value_dtype: Any = None
    support_size: int | None = None

    @property
    def value_shape(self) -> tuple[int, ...]:
        return self.batch_shape + self.event_shape

    def layout(self, plate_order: tuple[str, ...]) -> SiteLayout:
        """The node's :class:`~scgjax.layout.SiteLayout` in a program with ``plate_order``."""
        return SiteLayout(self.batch_shape, len(self.event_shape),
                          dict(zip(self.plates, self.plate_dims, strict=True)), plate_order)

    @property
    def score(self) -> bool:
        """Whether the node's log-density enters the surrogate (score-function family)."""
        return bool(getattr(self.estimator, "score", False))


@dataclasses.dataclass(frozen=True)
class CostNode:
    """A term of the objective: ``sign * scale * log_prob`` of a site, or a factor."""

    id: str
    site: str
    role: str
    kind: str
    sign: float
    plates: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SCG:
    """A stochastic computation graph with its data-flow edges and credit assignment.

    Attributes:
        nodes: the stochastic nodes, in program order.
        costs: the cost nodes, in program order.
        plates: the plates, in order of first appearance.
        parents: for each node, the stochastic nodes its distribution depends on.
        cost_inputs: for each cost, the stochastic nodes its value depends on directly.
        time_lags: for a node ``w`` and a node or cost ``v`` in the same ``sg.scan`` loop,
            the signs of ``t - s`` at which ``v``'s step ``t`` depends directly on ``w``'s step
            ``s``: ``0`` within a step, ``1`` through the carry (``-1`` in a reverse loop).
            A pair that is missing has no time structure (every step reaches every step).
    """

    nodes: Mapping[str, StochasticNode]
    costs: Mapping[str, CostNode]
    plates: Mapping[str, Plate]
    parents: Mapping[str, frozenset[str]]
    cost_inputs: Mapping[str, frozenset[str]]
    time_lags: Mapping[tuple[str, str], frozenset[int]] = dataclasses.field(
        default_factory=dict)

    @functools.cached_property
    def _descendants(self) -> dict[str, frozenset[str]]:
        children = {n: [c for c in self.nodes if n in self.parents[c]] for n in self.nodes}
        out: dict[str, frozenset[str]] = {}
        for name in self.nodes:
            seen: set[str] = set()
            todo = list(children[name])
            while todo:
                n = todo.pop()
                if n not in seen:
                    seen.add(n)
                    todo.extend(children[n])
            out[name] = frozenset(seen)
        return out

    def descendants(self, name: str) -> frozenset[str]:
        """Stochastic nodes reachable from node ``name`` through distributions."""
        return self._descendants[name]

    @functools.cached_property
    def _credited(self) -> dict[str, tuple[str, ...]]:
        out = {}
        for name in self.nodes:
            reach = self.descendants(name) | {name}
            out[name] = tuple(c for c, ins in self.cost_inputs.items() if ins & reach)
        return out

    @functools.cached_property
    def _upstream(self) -> dict[str, tuple[str, ...]]:
        return {c: tuple(n for n in self.nodes if c in self._credited[n])
                for c in self.cost_inputs}

    def credited_costs(self, name: str) -> tuple[str, ...]:
        """The costs downstream of node ``name`` (what its score is multiplied by)."""
        if name not in self.nodes:
            raise SiteError(name, "is not a stochastic node of this graph (its nodes are "
                            f"{sorted(self.nodes)}); the costs are {sorted(self.cost_inputs)}")
        return self._credited[name]

    def upstream(self, cost_id: str) -> tuple[str, ...]:
        """The stochastic nodes that cost ``cost_id`` is downstream of."""
        if cost_id not in self.cost_inputs:
            raise SiteError(cost_id, "is not a cost of this graph (its costs are "
                            f"{sorted(self.cost_inputs)})")
        return self._upstream[cost_id]

    def shared_plates(self, name: str, cost_id: str) -> tuple[str, ...]:
        """The plates along which node ``name`` is credited with cost ``cost_id`` element by
        element: plates of both, and of every stochastic node on a path between them (a
        path through a node outside a plate links every element of it to every other)."""
        keep = set(self.nodes[name].plates) & set(self.costs[cost_id].plates)
        inputs = self.cost_inputs[cost_id]
        for v in self.descendants(name):
            if v in inputs or self.descendants(v) & inputs:
                keep &= set(self.nodes[v].plates)
        return tuple(p for p in self.plates if p in keep)

    def _lags(self, source: str, target: str, axis: str) -> frozenset[int]:
        """The direct edge's lags along time axis ``axis`` (``ALL_LAGS`` unless both ends
        are steps of that loop)."""
        ends = [self.nodes[source].plates,
                self.nodes[target].plates if target in self.nodes else self.costs[target].plates]
        if not all(axis in plates for plates in ends):
            return ALL_LAGS
        return self.time_lags.get((source, target), ALL_LAGS)

    def time_credit(self, name: str, cost_id: str, axis: str) -> frozenset[int]:
        """The signs of ``t - s`` at which node ``name``'s step ``s`` reaches step ``t`` of cost
        ``cost_id`` along the time axis ``axis``, over every path of the data flow (through
        the distributions of other nodes, composed with :func:`compose_lags`)."""
        reach: dict[str, frozenset[int]] = {}
        todo = [(c, self._lags(name, c, axis)) for c in self.nodes if name in self.parents[c]]
        while todo:
            v, lags = todo.pop()
            if lags <= reach.get(v, frozenset()):
                continue
            reach[v] = reach.get(v, frozenset()) | lags
            todo.extend((c, compose_lags(reach[v], self._lags(v, c, axis)))
                        for c in self.nodes if v in self.parents[c])
        inputs = self.cost_inputs[cost_id]
        out = self._lags(name, cost_id, axis) if name in inputs else frozenset()
        for v, lags in reach.items():
            if v in inputs:
                out |= compose_lags(lags, self._lags(v, cost_id, axis))
        return out

    def axis_credits(self, name: str, cost_id: str) -> tuple[bool | frozenset[int], ...]:
        """How node ``name`` is credited with cost ``cost_id`` along each canonical axis
        (:func:`axis_credit`): per element along the plates they share
        (:meth:`shared_plates`), by the reachable steps along a loop's time axis."""
        shared = self.shared_plates(name, cost_id)
        out = []
        for p, plate in self.plates.items():
            if plate.time and p in self.nodes[name].plates and p in self.costs[cost_id].plates:
                out.append(axis_credit(self.time_credit(name, cost_id, p)))
            else:
                out.append(p in shared and not plate.time)
        return tuple(out)

    @functools.cached_property
    def credit(self) -> dict[str, tuple[tuple[str, tuple[bool | frozenset[int], ...]], ...]]:
        """The credit table, computed once per graph: for each node, ``(cost id, keep)`` for
        every cost it is credited with, ``keep`` how along each canonical axis
        (:meth:`axis_credits`; :func:`scgjax.layout.reduce_to` applies it)."""
        return {w: tuple((c, self.axis_credits(w, c)) for c in self._credited[w])
                for w in self.nodes}

    @functools.cached_property
    def boxes(self) -> dict[str, tuple[tuple[str, tuple[bool | frozenset[int], ...]], ...]]:
        """For each cost, the score nodes upstream of it with their ``keep`` masks seen from
        the cost (along a time axis, the steps of the node that reach the cost's step): the
        DiCE box of the cost is ``box(sum_w reduce_to(log q(w), keep))``."""
        return {c: tuple((w, tuple(_mirror(k) for k in dict(self.credit[w])[c]))
                         for w in self._upstream[c] if self.nodes[w].score)
                for c in self.cost_inputs}

    def plate_mask(self, plates: tuple[str, ...]) -> tuple[bool, ...]:
        """Which canonical plate axes a site in ``plates`` occupies."""
        return tuple(p in plates for p in self.plates)

    def to_dot(self) -> str:
        """Graphviz source: stochastic nodes (circles; double for score-estimated), costs
        (boxes), data-flow edges (solid), plates (clusters) and, for every score-estimated
        node, dashed blue edges to the costs it is credited with."""
        lines = ["digraph scg {", "  rankdir=TB;", '  node [fontname="Helvetica"];']
        ids = {n: f"n{i}" for i, n in enumerate(self.nodes)}
        ids.update({c: f"c{i}" for i, c in enumerate(self.costs)})

        def label(text: str) -> str:
            return text.replace('"', r"\"")

        def node_line(key: str) -> str:
            if key in self.nodes:
                node = self.nodes[key]
                est = type(node.estimator).__name__ if node.estimator is not None else "-"
                block = f"\\nblock dims {node.unplated_dims}" if node.unplated_dims else ""
                shape = "doublecircle" if node.score else "circle"
                return (f'{ids[key]} [shape={shape}, label="{label(key)}\\n'
                        f'{node.distribution}\\n[{est}]{block}"];')
            return f'{ids[key]} [shape=box, style=filled, fillcolor="#eeeeee", ' \
                   f'label="{label(key)}"];'

        def plates_of(key: str) -> tuple[str, ...]:
            return self.nodes[key].plates if key in self.nodes else self.costs[key].plates

        groups: dict[tuple[str, ...], list[str]] = {}
        for key in [*self.nodes, *self.costs]:
            groups.setdefault(plates_of(key), []).append(key)
        for i, (plates, keys) in enumerate(groups.items()):
            if plates:
                sizes = ", ".join(f"loop {p} ({self.plates[p].size} steps)"
                                  if self.plates[p].time else f"plate {p} ({self.plates[p].size})"
                                  for p in plates)
                lines.append(f"  subgraph cluster_{i} {{")
                lines.append(f'    label="{label(sizes)}"; style=rounded;')
                lines.extend(f"    {node_line(k)}" for k in keys)
                lines.append("  }")
            else:
                lines.extend(f"  {node_line(k)}" for k in keys)
        for child, parents in self.parents.items():
            lines.extend(f"  {ids[p]} -> {ids[child]};" for p in parents)
        for cost, inputs in self.cost_inputs.items():
            lines.extend(f"  {ids[n]} -> {ids[cost]};" for n in inputs)
        for name, node in self.nodes.items():
            if node.score:
                lines.extend(
                    f'  {ids[name]} -> {ids[c]} [style=dashed, color="#1f77b4", '
                    f"constraint=false];"
                    for c in self.credited_costs(name)
                )
        lines.append("}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        rows = [f"SCG with {len(self.nodes)} stochastic nodes, {len(self.costs)} costs"]
        for name, node in self.nodes.items():
            est = type(node.estimator).__name__ if node.estimator is not None else "-"
            plates = f" in {list(node.plates)}" if node.plates else ""
            rows.append(f"  {name}: {node.distribution}{plates} [{est}] credited with "
                        f"{list(self.credited_costs(name))}")
        return "\n".join(rows)


def node_from_message(msg: Message, role: str) -> StochasticNode:
    """The python-only description of a sampled site (no arrays, safe to keep after tracing)."""
    fn = msg["fn"]
    frames = msg["cond_indep_stack"]
    batch = tuple(fn.batch_shape)
    plated = {len(batch) + f.dim for f in frames}
    return StochasticNode(
        name=msg["name"],
        role=role,
        distribution=type(fn).__name__ if type(fn).__name__ not in (
            "ExpandedDistribution", "Independent", "StackedSteps") else _describe(fn),
        reparameterisable=bool(fn.has_rsample),
        discrete=bool(getattr(fn.support, "is_discrete", False)),
        estimator=msg.get("estimator"),
        plates=tuple(f.name for f in frames),
        batch_shape=batch,
        event_shape=tuple(fn.event_shape),
        unplated_dims=tuple(d - len(batch) for d in range(len(batch)) if d not in plated),
        plate_dims=tuple(f.dim for f in frames),
        value_dtype=jnp.result_type(msg["value"]),
        support_size=joint_support_size(fn),
    )


def _describe(fn: Any) -> str:
    return type(innermost(fn)).__name__ + (".to_event" if fn.event_shape else "")
