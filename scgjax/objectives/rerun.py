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

All elements of ``w`` change at once. Along a plate of ``w`` where a cost credited to it is
not per element (a cost outside the plate, or credited across it), ``Q_w`` at element ``n`` then
sees every element changed: ``signal_at.coupled`` marks those plates (one bool per canonical
plate axis). An estimator that needs each element's own signal runs those elements one at a
time (``runs_coupled_elements``, :class:`~scgjax.estimators.MeasureValued`); for the others
(REBAR's per-element control variate) such a plate is refused with an error naming the site
(:func:`check_signal_at`), and so is a site in an ``sg.scan`` loop (a step's value also changes
later steps' costs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from scgjax.errors import SiteError
from scgjax.objectives.surrogate import learning_signal
from scgjax.provenance import dependencies
from scgjax.scg import SCG
from scgjax.tracegraph import Structure

__all__ = ["check_differentiable", "check_signal_at", "coupled_plates", "signal_evaluators"]

Particles = Callable[[dict], tuple[dict, dict, dict]]


def signal_evaluators(structure: Structure, rerun: Particles, extras: dict
                      ) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """``{site: signal_at}`` for every node whose estimator sets ``needs_signal_at``.

    ``rerun(probes)`` runs the particles with ``probes[site]`` added to the site's drawn value
    (:meth:`scgjax.objectives.base.Objective._particles`, built with the program's parameters
    gradient-stopped); ``extras[site]["value"]`` is the drawn value, ``(K, *value_shape)``.
    """
    scg = structure.scg
    out = {}
    for n in [n for n, node in scg.nodes.items() if node.estimator.needs_signal_at]:
        drawn = jax.lax.stop_gradient(extras[n]["value"])
        checked: list[bool] = []

        def signal_at(values: jax.Array, n: str = n, drawn: jax.Array = drawn,
                      checked: list[bool] = checked) -> jax.Array:
            if not checked:  # on the first call (tracing): an objective that never calls it
                check_signal_at(scg, [n])  # (a bound refusing the estimator) is not held up
                if scg.nodes[n].estimator.differentiates_signal_at:
                    check_differentiable(scg, n, rerun, drawn)
                checked.append(True)
            probe = values.astype(drawn.dtype) - drawn
            logq, costs, _ = rerun({n: probe})
            return learning_signal(scg, n, costs, logq[n])

        coupled = coupled_plates(scg, n)
        signal_at.coupled = tuple(p in coupled for p in structure.plate_order)
        out[n] = signal_at
    return out


def coupled_plates(scg: SCG, w: str) -> tuple[str, ...]:
    """The plates of node ``w`` along which a cost credited to it is not credited element by
    element (it depends on every element of the plate at once)."""
    node = scg.nodes[w]
    return tuple(p for p in node.plates
                 if any(p not in scg.shared_plates(w, cid) for cid in scg.credited_costs(w)))


def check_differentiable(scg: SCG, w: str, rerun: Particles, drawn: jax.Array) -> None:
    """Raise a :class:`SiteError` naming the site and a cost where the cost depends on ``w``'s
    value (it is credited to ``w``) but not differentiably: through an index, a comparison, or
    a site below ``w`` whose draw carries no gradient. An estimator that differentiates
    ``signal_at`` at real values (REBAR's relaxation) would then differentiate a function with
    jumps, a biased gradient. Read from the data flow of the costs' tangents (nothing runs)."""
    credited = set(scg.credited_costs(w))
    zero = jnp.zeros(drawn.shape, jnp.result_type(float))

    def tangents(t: jax.Array) -> dict:
        return jax.jvp(lambda probe: rerun({w: probe})[1], (zero,), (t,))[1]

    shapes = jax.eval_shape(tangents, zero)
    names = jax.tree_util.tree_structure(shapes).unflatten(range(len(jax.tree.leaves(shapes))))
    deps = dependencies(tangents, zero)
    for cid in sorted(credited):
        if cid in names and not deps[names[cid]]:
            raise SiteError(w, f"uses {type(scg.nodes[w].estimator).__name__}, which "
                            "differentiates the costs at a relaxed (real) value of the site, "
                            f"but the cost '{scg.costs[cid].site}' depends on its value without "
                            "a gradient (through an index, a comparison or a draw below it "
                            "that carries none): the relaxed control variate would have jumps, "
                            "a biased gradient. Use the value as a real number there, or "
                            "REBAR(relaxation='first_order'), sg.RELAX(...) or "
                            "sg.MeasureValued()")


def check_signal_at(scg: SCG, nodes: list[str]) -> None:
    """Raise a :class:`SiteError` naming the site where changing all of a site's elements at
    once would not give each element's own signal and its estimator does not run them one at
    a time (a plate of :func:`coupled_plates`), or where the site is in an ``sg.scan`` loop."""
    for w in nodes:
        node = scg.nodes[w]
        name = type(node.estimator).__name__
        if any(scg.plates[p].time for p in node.plates):
            raise SiteError(w, f"uses {name}, which evaluates the costs downstream of the site "
                            "at other values of it; in an sg.scan loop a step's value also "
                            "changes later steps' costs, which it cannot separate: use RLOO() "
                            "or ScoreFunction() there")
        if node.estimator.runs_coupled_elements:
            continue
        for cid in scg.credited_costs(w):
            outside = [p for p in node.plates if p not in scg.shared_plates(w, cid)]
            if outside:
                raise SiteError(w, f"uses {name}, which evaluates the costs downstream of the "
                                f"site at other values of all its elements at once, but the "
                                f"cost '{scg.costs[cid].site}' depends on every element of the "
                                f"plate '{outside[0]}' (it is outside that plate, or credited "
                                "across it): use sg.MeasureValued(), RLOO() or ScoreFunction()")
