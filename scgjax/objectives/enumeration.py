"""Parallel enumeration: evaluate the program at every joint value of the enumerated sites.

For enumerated sites ``e_1..e_m`` with supports of sizes ``S_1..S_m``, the program runs once
per configuration (a flat index over the ``S_1 * ... * S_m`` joint values, vectorised with
``vmap``), with every element of ``e_i`` set to the configuration's value. Each cost ``c`` is
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
from scgjax.tracegraph import Structure


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


def collapse(structure: Structure, enumerated: tuple[str, ...], enum_logq: dict,
             logq: dict, costs: dict, extras: dict) -> tuple[dict, dict, dict]:
    """Sum the configuration axis (axis 1) out of every array, weighting the costs.

    ``enum_logq[e]`` is ``log q(e = v)`` per particle, configuration and plate element.
    Arrays of the score nodes (not downstream of any enumerated site, so the same in every
    configuration) keep the first configuration.
    """
    scg = structure.scg
    logq = {n: v for n, v in logq.items() if n not in enumerated}
    sizes = support_sizes(structure, enumerated)
    weighted = {}
    for cid, cost in costs.items():
        weight = jnp.ones(())
        for e, size in zip(enumerated, sizes, strict=True):
            if set(scg.nodes[e].plates) <= set(scg.costs[cid].plates):
                weight = weight * jnp.exp(enum_logq[e])
            else:
                weight = weight / size
        weighted[cid] = jnp.sum(weight * cost, axis=1)
    first = lambda tree: jax.tree.map(lambda x: x[:, 0], tree)
    return first(logq), weighted, first(extras)
