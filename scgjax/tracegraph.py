"""The graph layer: from the traces of a program to its stochastic computation graph.

Objectives run programs (with their estimators, see :mod:`scgjax.objectives.program`); this
layer reads what a run leaves behind. Two shapes of program are supported:

- **guided** (``ELBO``, ...): the guide samples the latent sites, the model is replayed at the
  guide's values. Stochastic nodes are the guide's latent sites; costs are every model site's
  log-density (latent, observed, factors) and minus every guide site's log-density.
- **single** (``Expectation``): one program samples its latents; costs are its observed sites
  and factors (the objective is ``E[sum of factors and observed log-densities]``).

:func:`build` traces the programs **once** to a jaxpr (nothing is computed), with the sampled
values marked as named sources (:class:`mark_sources`, :func:`scgjax.provenance.source`). That
one pass gives both the sites (nodes, costs, plates) and the data flow from every sampled value
to every log-density, hence the graph's edges and the credit of every node
(:attr:`scgjax.scg.SCG.credit`, computed once per graph). It happens while an objective is
being traced, so a jitted step does none of this work.

Each cost is ``sign * scale * mask * log_prob`` of a site (:func:`site_cost`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from scgjax.dist import (
    MaskedDistribution,
    check_traced_values,
    log_prob_in_support,
    wrapper_chain,
)
from scgjax.errors import SiteError
from scgjax.primitives import Message, Messenger
from scgjax.provenance import source, source_lags
from scgjax.scg import SCG, CostNode, Plate, node_from_message

__all__ = ["GUIDED", "SINGLE", "Marginal", "Structure", "build", "cost_sites", "density",
           "is_latent", "is_marginalised", "mark_sources", "sampling_role", "site_cost",
           "site_log_prob", "tied_groups"]

GUIDED = "guided"
SINGLE = "single"

Traces = dict[str, dict[str, Message]]


def sampling_role(kind: str) -> str:
    """The role of the program whose latent sites are the stochastic nodes."""
    return "program" if kind == SINGLE else "guide"


def is_latent(msg: Message) -> bool:
    """A sample site that is not observed (factors are observed)."""
    return msg["type"] == "sample" and not msg["is_observed"]


def is_marginalised(msg: Message) -> bool:
    """A model's latent site that an objective sums out (``infer={"enumerate": "parallel"}``,
    not sampled by the guide): it is set to each support value in turn, never sampled."""
    return bool(msg.get("marginalised"))


def site_log_prob(msg: Message) -> jax.Array:
    """``log fn(value)`` of a sample site, broadcast to its batch shape, 0 where masked.

    A site whose message says ``in_support`` (its value was drawn from its distribution, or
    from one with the very same support) skips numpyro's support check; an observed value is
    always checked (``-inf`` outside the support), also when traced: new data may reach a
    jitted step every call. A site of an ``sg.scan`` loop may carry its density computed
    inside the steps (``step_log_prob``, :func:`density` at each step)."""
    lp = msg["step_log_prob"] if "step_log_prob" in msg else density(msg)
    lp = jnp.broadcast_to(lp, tuple(msg["fn"].batch_shape))
    if msg.get("mask") is not None:
        lp = jnp.where(msg["mask"], lp, 0.0)
    return lp


def density(msg: Message) -> jax.Array:
    """``log fn(value)`` of a sample site as its distribution gives it (not masked), with the
    support checks of :func:`site_log_prob`."""
    if msg.get("in_support"):
        return log_prob_in_support(msg["fn"], msg["value"])
    if msg["is_observed"]:  # data: checked against the support in the jitted step too
        with check_traced_values():
            return msg["fn"].log_prob(msg["value"])
    return msg["fn"].log_prob(msg["value"])


def site_cost(msg: Message, sign: float = 1.0, log_prob: jax.Array | None = None
              ) -> jax.Array:
    """``sign * scale * mask * log_prob``: the cost of a sample site, per element of its batch
    shape (``log_prob``, if given, is the site's :func:`site_log_prob`, computed once).

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> prog = sg.handlers.scale(lambda: sg.sample("x", dist.Normal(0.0, 1.0), obs=0.0), 2.0)
        >>> tr = sg.handlers.trace(prog).get_trace()
        >>> round(float(site_cost(tr["x"], -1.0)), 4)   # -2 * log N(0 | 0, 1)
        1.8379
    """
    lp = site_log_prob(msg) if log_prob is None else log_prob
    if msg.get("scale") is not None:
        lp = lp * msg["scale"]
    return lp if sign == 1.0 else -lp if sign == -1.0 else sign * lp


def cost_sites(kind: str, traces: Traces) -> list[tuple[str, str, str, float]]:
    """``(cost id, role, site name, sign)`` for every cost of the traces, in program order."""
    out = []
    if kind == SINGLE:
        for name, msg in traces["program"].items():
            if msg["type"] == "sample" and msg["is_observed"]:
                out.append((_cost_id(name, msg), "program", name, 1.0))
        return out
    for name, msg in traces["model"].items():
        if msg["type"] == "sample":
            out.append((_cost_id(name, msg), "model", name, 1.0))
    for name, msg in traces["guide"].items():
        if msg["type"] == "sample":
            out.append((f"-log q({name})", "guide", name, -1.0))
    return out


def _cost_id(name: str, msg: Message) -> str:
    return name if msg.get("is_factor") else f"log p({name})"


class mark_sources(Messenger):
    """Mark the value of every latent sample site as the named source of its site
    (:func:`scgjax.provenance.source`). Install it *outside* the ``trace`` of the sampling
    program, so that the trace and everything downstream see the marked value. Inside an
    ``sg.scan`` loop it marks each step's value (a per-step source). ``only`` restricts it to
    the sites it accepts (the model's marginalised sites, whose values are choices too)."""

    scan_role = "step"

    def __init__(self, fn: Callable | None = None,
                 only: Callable[[Message], bool] = is_latent):
        super().__init__(fn)
        self.only = only

    def postprocess_message(self, msg: Message) -> None:
        if is_latent(msg) and self.only(msg):
            msg["value"] = source(msg["value"], msg["name"])


@dataclasses.dataclass(frozen=True)
class Marginal:
    """The model's sites that are summed out, and the costs their sum replaces.

    Attributes:
        id: the id of the cost ``log sum_z prod_c exp(c)`` that replaces ``costs`` in the graph.
        sites: the marginalised sites (enumerated jointly).
        sizes: their support sizes.
        costs: the ids of the costs that depend on them (their own log-density included).
        keep: the canonical plate axes of the sites (the sum is per element of those).
        scale: the sites' scale (sub-sampling ratio, ``sg.handlers.scale``): the log of the
            sum is taken of the unscaled costs, then scaled.
        loop: the ``sg.scan`` loop the sites are in, summed over the steps by the forward
            algorithm, or ``None``.
    """

    id: str
    sites: tuple[str, ...]
    sizes: tuple[int, ...]
    costs: tuple[str, ...]
    keep: tuple[bool, ...]
    scale: float = 1.0
    #: the ``sg.scan`` loop the sites are in (summed by the forward algorithm), or ``None``
    loop: str | None = None


@dataclasses.dataclass(frozen=True)
class Structure:
    """Everything static an objective needs: the graph and where each cost comes from."""

    kind: str
    scg: SCG
    costs: tuple[tuple[str, str, str, float], ...]
    num_particles: int
    #: the ``sg.param``/``sg.module`` names that both the model and the guide use
    shared_params: tuple[str, ...] = ()
    #: the model's sites that are summed out, in groups that no cost ties together
    marginals: tuple[Marginal, ...] = ()

    @property
    def plate_order(self) -> tuple[str, ...]:
        return tuple(self.scg.plates)


def build(kind: str, run_marked: Callable[[], Traces], num_particles: int) -> Structure:
    """The :class:`Structure` of the programs that ``run_marked()`` runs.

    ``run_marked()`` runs them once and returns their traces by role (``guide``/``model`` or
    ``program``), with the sampling role's latent values marked (:class:`mark_sources`). It is
    traced to a jaxpr, not computed.
    """
    role = sampling_role(kind)
    found: dict = {}

    def analysis_pass() -> dict[tuple[str, str], jax.Array]:
        traces = run_marked()
        sampled = {n: m for n, m in traces[role].items() if is_latent(m)}
        costs = cost_sites(kind, traces)
        found.update(
            marginalised={n: m for r, tr in traces.items() if r != role
                          for n, m in tr.items() if is_marginalised(m)},
            nodes={n: node_from_message(m, role) for n, m in sampled.items()},
            costs=costs,
            plates=_plates(traces),
            shared_params=_shared_params(traces),
            cost_plates={cid: tuple(f.name for f in traces[r][s]["cond_indep_stack"])
                         for cid, r, s, _ in costs},
        )
        # each site's density once: a guide node's log q is also its cost -log q
        sites = [(role, n) for n in sampled] + [(r, s) for _, r, s, _ in costs]
        return {site: site_log_prob(traces[site[0]][site[1]]) for site in dict.fromkeys(sites)}

    distances = source_lags(analysis_pass, distance=True)
    nodes, costs = found["nodes"], found["costs"]
    sites = list(dict.fromkeys([(role, n) for n in nodes] + [(r, s) for _, r, s, _ in costs]))
    # outputs are flattened in the sorted order of the dict's keys (pytree order)
    distance_of = dict(zip(sorted(sites), distances, strict=True))
    of_site = {site: {w: frozenset((d > 0) - (d < 0) for d in ds) for w, ds in deps.items()}
               for site, deps in distance_of.items()}
    # A node's density depends on its own value (lag 0); a step of a loop may also depend on
    # the node's earlier steps, through the carry: a self-edge with the other lags.
    looped = {n: of_site[role, n].get(n, frozenset()) - {0} if any(
        found["plates"][p].time for p in nodes[n].plates) else frozenset() for n in nodes}
    parents = {n: frozenset(w for w in of_site[role, n] if w != n or looped[n])
               for n in nodes}
    cost_inputs = {cid: frozenset(of_site[r, s]) for cid, r, s, _ in costs}
    # lags along a loop's time axis, for the edges of data flow between two of its steps
    time_lags = {(w, n): looped[n] if w == n else lags for n in nodes
                 for w, lags in of_site[role, n].items() if w in parents[n]}
    time_lags.update({(w, cid): lags for cid, r, s, _ in costs
                      for w, lags in of_site[r, s].items()})
    cost_nodes = {
        cid: CostNode(cid, site, r, _cost_kind(cid, r, site), sign, found["cost_plates"][cid])
        for cid, r, site, sign in costs
    }
    cost_distances = {cid: distance_of[r, s] for cid, r, s, _ in costs}
    marginals = tuple(_marginal(group, cost_nodes, cost_inputs, found["plates"], cost_distances)
                      for group in _tied(found["marginalised"], cost_inputs))
    for marginal in marginals:  # each group's costs become one cost: log sum_z p
        merged = frozenset().union(*(cost_inputs.pop(c) for c in marginal.costs))
        cost_inputs[marginal.id] = merged - set(marginal.sites)
        for c in marginal.costs:
            del cost_nodes[c]
        plates = tuple(f.name for f in found["marginalised"][marginal.sites[0]][
            "cond_indep_stack"] if f.name != marginal.loop)
        cost_nodes[marginal.id] = CostNode(marginal.id, marginal.sites[0], "model", "marginal",
                                           1.0, plates)
    scg = SCG(nodes=nodes, costs=cost_nodes, plates=found["plates"], parents=parents,
              cost_inputs=cost_inputs, time_lags=time_lags)
    return Structure(kind=kind, scg=scg, costs=tuple(costs), num_particles=num_particles,
                     shared_params=found["shared_params"], marginals=marginals)


def tied_groups(names: list[str] | tuple[str, ...], links: Iterable[Iterable[str]]
                ) -> list[list[str]]:
    """``names`` split into the groups that ``links`` tie together (each link, a set of names,
    puts the ones it holds in one group), each group in the order of ``names``.

    Example:
        >>> tied_groups(["a", "b", "c", "d"], [{"a", "c"}, {"c", "x"}])
        [['a', 'c'], ['b'], ['d']]
    """
    group = {n: n for n in names}

    def root(n: str) -> str:
        while group[n] != n:
            n = group[n]
        return n

    for link in links:
        tied = [n for n in names if n in link]
        for n in tied[1:]:
            group[root(n)] = root(tied[0])
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(root(n), []).append(n)
    return list(out.values())


def _tied(sites: dict[str, Message], cost_inputs: dict[str, frozenset[str]]
          ) -> list[dict[str, Message]]:
    """The summed-out sites in groups that a cost ties together (a cost that depends on two
    sites puts them in one group): each group is summed on its own, so independent sites add
    their supports' sizes instead of multiplying them."""
    return [{n: sites[n] for n in g} for g in tied_groups(list(sites), cost_inputs.values())]


def _marginal(sites: dict[str, Message], cost_nodes: dict[str, CostNode],
              cost_inputs: dict[str, frozenset[str]], plates: dict[str, Plate],
              distances: dict[str, dict[str, frozenset[int]]]) -> Marginal:
    """The :class:`Marginal` of the model's marginalised ``sites``; a :class:`SiteError` where
    the sum cannot be exact per plate element."""
    names = tuple(sites)
    site_plates = {n: {f.name for f in m["cond_indep_stack"]} for n, m in sites.items()}
    first = names[0]
    for n in names[1:]:
        if site_plates[n] != site_plates[first]:
            raise SiteError(n, f"is summed out (infer={{'enumerate': 'parallel'}}) in plates "
                            f"{sorted(site_plates[n])}, and '{first}' in "
                            f"{sorted(site_plates[first])}; sites summed out together must share "
                            "their plates")
    loops = [p for p in site_plates[first] if plates[p].time]
    costs = tuple(c for c, ins in cost_inputs.items() if ins & set(names))
    if loops:
        _check_markov(first, loops[0], names, costs, cost_nodes, distances)
    for c in costs:
        missing = site_plates[first] - set(cost_nodes[c].plates)
        if missing:
            raise SiteError(first, f"is summed out per element of plate '{sorted(missing)[0]}', "
                            f"but the cost '{c}' depends on it outside that plate (it links the "
                            "plate's elements): the sum would not be exact")
    scales = set()
    for n, m in sites.items():
        masked = m.get("mask") is not None or any(
            isinstance(d, MaskedDistribution) for d in wrapper_chain(m["fn"]))
        if masked:
            raise SiteError(n, "is summed out (infer={'enumerate': 'parallel'}) but masked; "
                            "masked sites cannot be summed out yet")
        scale = 1.0 if m.get("scale") is None else m["scale"]
        if not isinstance(scale, (int, float)):
            raise SiteError(n, "is summed out (infer={'enumerate': 'parallel'}) under a scale "
                            "that is an array; only a constant scale (a sub-sampling ratio, "
                            "sg.handlers.scale with a number) is supported")
        scales.add(float(scale))
    if len(scales) > 1:
        raise SiteError(first, f"is summed out with sites of other scales {sorted(scales)}")
    sizes = tuple(_support_size_of(n, m) for n, m in sites.items())
    label = ", ".join(names)
    return Marginal(id=f"log sum_{{{label}}} p", sites=names, sizes=sizes, costs=costs,
                    keep=tuple(p in site_plates[first] for p in plates), scale=scales.pop(),
                    loop=loops[0] if loops else None)


def _check_markov(site: str, loop: str, names: tuple[str, ...], costs: tuple[str, ...],
                  cost_nodes: dict[str, CostNode],
                  distances: dict[str, dict[str, frozenset[int]]]) -> None:
    """The forward algorithm needs a first-order Markov chain: every cost that depends on the
    summed-out sites is a cost of the loop's steps and reaches back exactly one step (the
    carry keeps nothing older), in a forward loop."""
    for c in costs:
        if loop not in cost_nodes[c].plates:
            raise SiteError(site, f"is summed out inside sg.scan '{loop}', but the cost '{c}' "
                            "after the loop depends on it (through the final carry or the "
                            "stacked values): the forward algorithm cannot sum that out")
        reach = frozenset().union(*(distances[c].get(n, frozenset()) for n in names))
        if not reach <= {0, 1}:
            why = ("a reverse loop" if reach & {-1, -2} else
                   "its value reaches two steps or more later (the carry keeps it)")
            raise SiteError(site, f"is summed out inside sg.scan '{loop}', but for the cost "
                            f"'{c}' {why}: the forward algorithm needs a forward loop whose "
                            "carry keeps only the last step's value (first-order Markov)")


def _support_size_of(name: str, msg: Message) -> int:
    size = node_from_message(msg, "model").support_size
    if size is None:
        raise SiteError(name, f"is marked infer={{'enumerate': 'parallel'}} but its "
                        f"{type(msg['fn']).__name__} distribution has no finite support to sum "
                        "over (a discrete distribution with enumerate_support, event shape ())")
    return size


def _cost_kind(cid: str, role: str, site: str) -> str:
    if cid == site:
        return "factor"
    return "-log q" if role == "guide" else "log p"


def _shared_params(traces: Traces) -> tuple[str, ...]:
    """The param sites of every trace, when there are several (model and guide)."""
    names = [{n for n, m in tr.items() if m["type"] == "param"} for tr in traces.values()]
    if len(names) < 2:
        return ()
    return tuple(sorted(set.intersection(*names)))


def _plates(traces: Traces) -> dict[str, Plate]:
    plates: dict[str, Plate] = {}
    for tr in traces.values():
        for msg in tr.values():
            for f in msg.get("cond_indep_stack", ()):
                known = plates.setdefault(f.name, Plate(f.name, f.size, f.full_size, f.time))
                if known.time != f.time:
                    raise SiteError(f.name, "names both a plate and an sg.scan loop; give them "
                                    "different names")
                if known.time and known.size != f.size:
                    raise SiteError(f.name, f"is an sg.scan loop of {known.size} steps in one "
                                    f"program and {f.size} in the other; a loop's name must "
                                    "always have the same length")
                if known.full_size != f.full_size:
                    raise SiteError(
                        f.name, f"is a plate used with sizes {known.full_size} and "
                        f"{f.full_size}; a plate name must always have the same size",
                    )
                if known.size != f.size:
                    raise SiteError(
                        f.name, f"is a plate of size {f.full_size} subsampled to {known.size} "
                        f"and to {f.size} elements; a plate must be subsampled the same way "
                        "wherever it is used",
                    )
    return plates
