"""A site's learning signal at other values of the site: the program run again.

Some estimators need the costs downstream of a site at values other than the one drawn:
measure-valued derivatives (:class:`~scgjax.estimators.MeasureValued`) at the values of the
weak derivative's two parts, REBAR (:class:`~scgjax.estimators.REBAR`) at the relaxed value
``sigmoid(z / lambda)``. For a site ``w`` whose estimator sets ``needs_signal_at``, the
objective hands it ``ctx.signal_at``, the function

    values (K, *value_shape)  ->  Q_w(values) (K, *plates),

the learning signal (the costs credited to ``w``, element by element through plates, as
:func:`scgjax.objectives.surrogate.learning_signal` sums them) with ``w``'s value replaced by
``values`` in every particle. It runs the program again with the same keys (the particles'
other draws are the same: common random numbers; sites below ``w`` draw from their new
conditional with the same key) and the program's parameters held fixed (gradient stopped); it
is differentiable in ``values``. Each call is one more run of every particle.

All elements of ``w`` change at once, so ``Q_w`` at element ``n`` is the signal of changing
element ``n`` only when every cost credited to ``w`` is credited element by element along all of
``w``'s plates: a cost outside one of them (a sum over the plate, say) would see every element
changed. That, and a site in an ``sg.scan`` loop (a step's value changes the costs of later
steps), is refused with an error naming the site (:func:`check_signal_at`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from scgjax.errors import SiteError
from scgjax.objectives.surrogate import learning_signal
from scgjax.scg import SCG
from scgjax.tracegraph import Structure

__all__ = ["check_signal_at", "signal_evaluators"]

Particles = Callable[[dict], tuple[dict, dict, dict]]


def signal_evaluators(structure: Structure, rerun: Particles, extras: dict
                      ) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """``{site: signal_at}`` for every node whose estimator sets ``needs_signal_at``.

    ``rerun(probes)`` runs the particles with ``probes[site]`` added to the site's drawn value
    (:meth:`scgjax.objectives.base.Objective._particles`, built with the program's parameters
    gradient-stopped); ``extras[site]["value"]`` is the drawn value, ``(K, *value_shape)``.
    """
    scg = structure.scg
    nodes = [n for n, node in scg.nodes.items() if node.estimator.needs_signal_at]
    check_signal_at(scg, nodes)
    out = {}
    for n in nodes:
        drawn = jax.lax.stop_gradient(extras[n]["value"])

        def signal_at(values: jax.Array, n: str = n, drawn: jax.Array = drawn) -> jax.Array:
            probe = values.astype(drawn.dtype) - drawn
            logq, costs, _ = rerun({n: probe})
            return learning_signal(scg, n, costs, logq[n])

        out[n] = signal_at
    return out


def check_signal_at(scg: SCG, nodes: list[str]) -> None:
    """Raise a :class:`SiteError` naming the site where changing all of a site's elements at
    once would not give each element's own signal: a cost credited to it outside one of its
    plates, or a site in an ``sg.scan`` loop."""
    for w in nodes:
        node = scg.nodes[w]
        name = type(node.estimator).__name__
        if any(scg.plates[p].time for p in node.plates):
            raise SiteError(w, f"uses {name}, which evaluates the costs downstream of the site "
                            "at other values of it; in an sg.scan loop a step's value also "
                            "changes later steps' costs, which it cannot separate: use RLOO() "
                            "or ScoreFunction() there")
        for cid in scg.credited_costs(w):
            outside = [p for p in node.plates if p not in scg.shared_plates(w, cid)]
            if outside:
                raise SiteError(w, f"uses {name}, which evaluates the costs downstream of the "
                                f"site at other values of all its elements at once, but the "
                                f"cost '{scg.costs[cid].site}' depends on every element of the "
                                f"plate '{outside[0]}' (it is outside that plate, or credited "
                                "across it): use RLOO() or ScoreFunction()")
