"""Parallel enumeration: evaluate the program at every joint value of the enumerated sites.

For enumerated sites ``e_1..e_m`` with supports of sizes ``S_1..S_m``, the program runs once
per configuration (a flat index over the ``S_1 * ... * S_m`` joint values, vectorised with
``vmap``), with every element of ``e_i`` set to the configuration's value. Sites that no cost
ties together are enumerated in separate groups (:func:`groups`), each with the others at their
first value, so their sizes add. Each cost ``c`` is
then replaced by its exact expectation over the enumerated sites,

    c  <-  sum_config  prod_i w_i(c, config) * c(config),

where ``w_i = q(e_i[n] = v_i)`` of the cost's own plate element ``n`` when ``c`` lies in all of
``e_i``'s plates, and ``1 / S_i`` when ``c`` is not downstream of ``e_i`` (it is then the same in
every configuration, and only needs weights that sum to one). Anything else is refused at
tracing time with an error naming the sites.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.tracegraph import Structure, tied_groups


def enumerated_nodes(structure: Structure) -> tuple[str, ...]:
    """The stochastic nodes whose estimator enumerates, in program order."""
    return tuple(n for n, node in structure.scg.nodes.items()
                 if node.estimator.enumerates)


def check(structure: Structure, enumerated: tuple[str, ...]) -> None:
    """Refuse the programs that parallel enumeration cannot make exact."""
    scg = structure.scg
    for e in enumerated:
        plates = set(scg.nodes[e].plates)
        loops = [i for i, p in enumerate(scg.plates) if p in plates and scg.plates[p].time]
        for c in scg.credited_costs(e) if loops else ():
            if any(scg.axis_credits(e, c)[i] is not True for i in loops):
                loop = list(scg.plates)[loops[0]]
                raise SiteError(
                    e, f"is enumerated inside sg.scan '{loop}', but its value reaches the cost "
                    f"'{c}' of other steps (through the carry, or outside the loop): each step "
                    "can only be summed on its own when it reaches its own step's costs. Use a "
                    "sampling estimator (sg.RLOO(), sg.ScoreFunction(), ...)")
        for w in scg.descendants(e):
            if scg.nodes[w].estimator.uses_signal:
                raise SiteError(
                    w, f"is score-estimated and depends on the enumerated site '{e}'; give it "
                    "Pathwise (if reparameterisable) or Enumerate as well",
                )
        for c in scg.credited_costs(e):
            if not plates <= set(scg.shared_plates(e, c)):
                raise SiteError(
                    e, f"is enumerated, but the cost '{c}' downstream of it links different "
                    "elements of its plates; enumeration per element would be wrong there",
                )


def support_sizes(structure: Structure, enumerated: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(structure.scg.nodes[e].support_size for e in enumerated)


def config_indices(config: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """The per-site support indices of a flat configuration index."""
    return tuple(jnp.unravel_index(config, sizes)) if sizes else ()


def num_configs(sizes: tuple[int, ...]) -> int:
    return math.prod(sizes)


def groups(structure: Structure, enumerated: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The enumerated sites in groups that a cost ties together (a cost downstream of two
    sites puts them in one group). Each group is enumerated jointly, with the other groups at
    their first value: independent sites add their supports' sizes instead of multiplying
    them."""
    credited = [set(structure.scg.credited_costs(e)) for e in enumerated]
    costs = set().union(*credited)
    links = [{e for e, c in zip(enumerated, credited, strict=True) if cost in c}
             for cost in costs]
    return tuple(tuple(g) for g in tied_groups(enumerated, links))


def runs(structure: Structure, grouped: tuple[tuple[str, ...], ...]) -> int:
    """How many runs of the program the groups take (their joint sizes add up)."""
    return sum(num_configs(support_sizes(structure, g)) for g in grouped)


def run_index(structure: Structure, grouped: tuple[tuple[str, ...], ...], run: jax.Array
              ) -> dict[str, jax.Array]:
    """The support index of every enumerated site in run ``run`` (traced): the runs of a group
    go through its joint values, the other groups stay at their first value."""
    sizes = [support_sizes(structure, g) for g in grouped]
    index: dict[str, jax.Array] = {}
    for g, s, local in zip(grouped, sizes, local_runs(run, [num_configs(x) for x in sizes]),
                           strict=True):
        index.update(zip(g, config_indices(local, s), strict=True))
    return index


def group_runs(counts: list[int]) -> list[slice]:
    """The runs of each group along the runs axis: groups of ``counts`` runs, one after the
    other (each group's runs with the other groups at their first value)."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [slice(a, a + n) for a, n in zip(starts, counts, strict=True)]


def local_runs(run: jax.Array, counts: list[int]) -> list[jax.Array]:
    """For each group, the index of run ``run`` (traced) among the group's runs
    (:func:`group_runs`), or 0 when the run is another group's."""
    return [jnp.where((run >= r.start) & (run < r.stop), run - r.start, 0)
            for r in group_runs(counts)]


def collapse(structure: Structure, grouped: tuple[tuple[str, ...], ...], enum_logq: dict,
             logq: dict, costs: dict, extras: dict) -> tuple[dict, dict, dict]:
    """Sum the runs axis (axis 1) out of every array, weighting the costs.

    ``enum_logq[e]`` is ``log q(e = v)`` per particle, run and plate element. A cost downstream
    of a group's sites is the sum over that group's runs, weighted by ``q`` of its sites; any
    other cost, and the arrays of the score nodes (not downstream of any enumerated site), are
    the same in every run and keep the first.
    """
    scg = structure.scg
    enumerated = [e for g in grouped for e in g]
    logq = {n: v for n, v in logq.items() if n not in enumerated}
    first = lambda tree: jax.tree.map(lambda x: x[:, 0], tree)  # noqa: E731
    weighted = first(costs)
    sizes = [support_sizes(structure, g) for g in grouped]
    for g, group_sizes, mine in zip(grouped, sizes, group_runs([num_configs(x) for x in sizes]),
                                    strict=True):
        downstream = set().union(*(scg.credited_costs(e) for e in g))
        for cid in downstream:
            weight = jnp.ones(())
            for e, size in zip(g, group_sizes, strict=True):
                if set(scg.nodes[e].plates) <= set(scg.costs[cid].plates):
                    weight = weight * jnp.exp(enum_logq[e][:, mine])
                else:
                    weight = weight / size
            weighted[cid] = jnp.sum(weight * costs[cid][:, mine], axis=1)
    return first(logq), weighted, first(extras)
