"""What all objectives share: particles, the traced structure, the state, the loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scgjax import handlers, stepped_prng
from scgjax.errors import SiteError
from scgjax.estimators import default_estimator
from scgjax.estimators.base import PARTICLE_AXIS
from scgjax.objectives import enumeration, program
from scgjax.objectives import marginal as marginalisation
from scgjax.objectives import rerun as rerun_signals
from scgjax.objectives.surrogate import dice_surrogate
from scgjax.scg import SCG


class Evaluation(NamedTuple):
    """The particles of one objective evaluation, before they are assembled into a loss.

    ``logq`` (signal-using nodes) and ``costs`` hold ``(K, *plates)`` arrays in the canonical
    plate layout; ``extras`` each node's values and collected arrays; ``signal_grads`` the
    ``dQ/dw`` of the nodes whose estimator asked for it; ``signal_at`` their ``Q_w`` as a
    function of their values (:mod:`scgjax.objectives.rerun`), for those that asked for it.
    """

    structure: program.Structure
    logq: dict
    costs: dict
    extras: dict
    signal_grads: dict
    signal_at: dict = {}


class Objective:
    """Base class: a surrogate loss built from the traced program's SCG.

    Subclasses set ``kind`` (``program.GUIDED`` or ``program.SINGLE``). ``loss`` returns minus
    the surrogate: its value is minus the objective estimate and ``jax.grad`` of it is the
    gradient estimate. ``loss_with_state`` also threads the estimators' state (moving-average
    baselines, ...) and returns metrics.

    ``particle_chunk=B`` runs the ``K`` particles in blocks of ``B`` (``jax.lax.map`` over
    blocks, a ``vmap`` inside each), so that only ``B`` particles' intermediates are live at
    once: the same numbers (the particle keys do not change), less memory for large ``K``, a
    sequential loop over ``K / B`` blocks. ``B`` must divide ``K``; estimators that couple the
    particles inside the ``vmap`` (DisARM's antithetic pairs) refuse it.
    """

    kind: str = program.GUIDED
    #: a multi-sample bound (``sg.IWAE``): estimators with ``needs_bound`` may serve it
    multi_sample_bound: bool = False
    #: :meth:`init_state` runs the programs on the concrete arguments (``sg.SVI`` then needs
    #: no separate run to check the data)
    init_state_checks_data: bool = True
    #: also return each node's learning signal ``Q_w`` as ``metrics["learning_signals"]``
    #: (for diagnostics; off in training, where metrics are kept for every step)
    record_signals: bool = False

    def __init__(self, num_particles: int = 1, particle_chunk: int | None = None):
        # an int >= 1 (numpy ints too, stored as a Python int; not a bool or a float)
        self.num_particles = program.check_num_particles(num_particles)
        self.particle_chunk = _check_chunk(particle_chunk, self.num_particles)

    def __repr__(self) -> str:
        chunk = "" if self.particle_chunk is None else f", particle_chunk={self.particle_chunk}"
        return f"{type(self).__name__}(num_particles={self.num_particles}{chunk})"

    def default_estimator(self, fn: Any, num_particles: int) -> Any:
        """The estimator of a sampled site that names none (DESIGN §3 defaults)."""
        return default_estimator(fn, num_particles)

    def _programs(self, fns: tuple) -> tuple:
        want = 1 if self.kind == program.SINGLE else 2
        if len(fns) != want or not all(callable(f) for f in fns):
            names = "fn" if want == 1 else "model, guide"
            raise TypeError(f"{type(self).__name__} expects {names} after params")
        return fns

    def structure(self, rng_key: Any, params: dict, *fns_and_args, **kwargs
                  ) -> program.Structure:
        """The traced structure (SCG and layout); nothing runs."""
        n = 1 if self.kind == program.SINGLE else 2
        programs = self._programs(fns_and_args[:n])
        key = handlers.as_prng_key(rng_key)
        return program.analyse(self.kind, key, params, programs, fns_and_args[n:], kwargs,
                               self.num_particles, self.default_estimator)

    def init_state(self, rng_key: Any, params: dict, *fns_and_args, **kwargs) -> dict:
        """Initial estimator state, one entry per site whose estimator uses its learning
        signal. The program(s) run once (un-jitted when the arguments are concrete, so that
        their observed values are checked: ``init_state_checks_data``)."""
        n = 1 if self.kind == program.SINGLE else 2
        programs = self._programs(fns_and_args[:n])
        traces = program.run(self.kind, handlers.as_prng_key(rng_key), params, programs,
                             fns_and_args[n:], kwargs, self.num_particles,
                             default=self.default_estimator)
        sampled = traces[program.sampling_role(self.kind)]
        return {name: msg["estimator"].init_state() for name, msg in sampled.items()
                if msg["type"] == "sample" and not msg["is_observed"]
                and msg["estimator"].uses_signal}

    def loss_with_state(self, rng_key: Any, params: dict, state: dict | None, *fns_and_args,
                        **kwargs) -> tuple[jax.Array, tuple[dict, dict]]:
        """``(loss, (new_state, metrics))``; ``state=None`` starts from the initial state."""
        evaluation = self.evaluate(rng_key, params, *fns_and_args, **kwargs)
        return self.assemble(evaluation, params, state or {})

    def assemble(self, evaluation: Evaluation, params: dict, state: dict
                 ) -> tuple[jax.Array, tuple[dict, dict]]:
        """The loss from the particles' arrays: minus the DiCE surrogate (what objectives with
        another estimate of their objective, such as a multi-sample bound, override)."""
        signals: dict | None = {} if self.record_signals else None
        surrogate, estimate, new_state = dice_surrogate(
            evaluation.structure, evaluation.logq, evaluation.costs, evaluation.extras,
            evaluation.signal_grads, params, state, signals=signals,
            signal_at=evaluation.signal_at)
        metrics = {"objective": estimate}
        if signals is not None:
            metrics["learning_signals"] = signals
        return -surrogate, (new_state, metrics)

    def evaluate(self, rng_key: Any, params: dict, *fns_and_args, **kwargs) -> Evaluation:
        """Trace the program, run its ``K`` particles (``vmap``; enumerated sites summed out)
        and return their per-element arrays (see :class:`Evaluation`)."""
        structure = self.structure(rng_key, params, *fns_and_args, **kwargs)
        self._check_bound_estimators(structure.scg)
        n = 1 if self.kind == program.SINGLE else 2
        particles = self._particles(structure, handlers.as_prng_key(rng_key), params,
                                    fns_and_args[:n], fns_and_args[n:], kwargs)
        evaluation = self._evaluate_particles(structure, particles,
                                              _probed_nodes(structure.scg))
        if not any(node.estimator.needs_signal_at for node in structure.scg.nodes.values()):
            return evaluation
        # the same particles, the program's parameters fixed: Q_w at other values of w
        rerun = self._particles(structure, handlers.as_prng_key(rng_key),
                                jax.lax.stop_gradient(params), fns_and_args[:n],
                                fns_and_args[n:], kwargs)
        return evaluation._replace(signal_at=rerun_signals.signal_evaluators(
            structure, rerun, evaluation.extras))

    def _evaluate_particles(self, structure: program.Structure, particles: Callable,
                            probed: list[str]) -> Evaluation:
        """The particles' arrays, with ``dQ/dw`` of the ``probed`` nodes (one ``vjp``)."""
        if not probed:
            return Evaluation(structure, *particles({}), {})
        nodes = structure.scg.nodes
        zeros = {n: jnp.zeros((self.num_particles, *nodes[n].value_shape), nodes[n].value_dtype)
                 for n in probed}
        (logq, costs, extras), pullback = jax.vjp(particles, zeros)
        signal_grads = {}
        for n in probed:  # d(costs credited to n)/d(value of n), in every particle
            credited = set(structure.scg.credited_costs(n))
            cotangent = (jax.tree.map(jnp.zeros_like, logq),
                         {c: jnp.ones_like(v) if c in credited else jnp.zeros_like(v)
                          for c, v in costs.items()},
                         jax.tree.map(jnp.zeros_like, extras))
            signal_grads[n] = jax.lax.stop_gradient(pullback(cotangent)[0][n])
        return Evaluation(structure, logq, costs, extras, signal_grads)

    def _check_bound_estimators(self, scg: SCG) -> None:
        """Estimators defined by a multi-sample bound (``needs_bound``) only serve one."""
        if self.multi_sample_bound:
            return
        for name, node in scg.nodes.items():
            if node.estimator.needs_bound:
                raise SiteError(name, f"uses {type(node.estimator).__name__}, which is defined "
                                f"for a multi-sample bound (sg.IWAE) only; {type(self).__name__} "
                                "would get no gradient through it: use sg.STL() or "
                                "sg.Pathwise() here")

    def _particles(self, structure: program.Structure, key: jax.Array, params: dict,
                   programs: tuple, args: tuple, kwargs: dict) -> Callable:
        """``particles(probes) -> (logq, costs, extras)`` of the ``K`` particles, each
        ``(K, ...)``: one ``vmap`` over particles (none at ``K = 1``, where the particle runs
        directly: the same numbers, a smaller program), and inside it one over the joint
        configurations of the enumerated sites, which are then summed out."""
        k = self.num_particles
        enumerated = enumeration.enumerated_nodes(structure)
        enumeration.check(structure, enumerated)
        marginals = structure.marginals
        if marginals and enumerated:
            raise SiteError(enumerated[0], f"uses Enumerate in the guide while the model sums "
                            f"out {list(marginals[0].sites)}; combining the two is not supported "
                            "yet: sample this site, or sum it out in the model too")
        for marginal in marginals:
            marginalisation.check_budget(marginal)
        summed = bool(enumerated or marginals)
        grouped = enumeration.groups(structure, enumerated)
        configs = enumeration.runs(structure, grouped) if enumerated else 1

        def one_config(particle_key, particle_probes, index):
            traces = program.run(self.kind, particle_key, params, programs, args, kwargs, k,
                                 probes=particle_probes, enum_index=index,
                                 default=self.default_estimator)
            return program.particle_arrays(structure, traces)

        def one_particle(particle_key, particle_probes):
            if not summed:
                return one_config(particle_key, particle_probes, None)
            if marginals:
                def presummed(index):
                    logq, costs, extras = one_config(particle_key, particle_probes, index)
                    return logq, marginalisation.presum(marginals, costs), extras

                return marginalisation.over_runs(marginals, presummed)
            return jax.vmap(lambda config: one_config(
                particle_key, particle_probes, enumeration.run_index(structure, grouped, config)
            ))(jnp.arange(configs))

        chunk = self.particle_chunk
        if chunk is not None and chunk < k:
            _check_chunkable(structure.scg, chunk)

        def particles(probes):
            if k == 1:
                first = jax.tree.map(lambda x: x[0], probes)
                arrays = jax.tree.map(lambda x: x[None], one_particle(key, first))
            elif chunk is not None and chunk < k:
                arrays = jax.lax.map(lambda kp: one_particle(*kp),
                                     (stepped_prng.split(key, k), probes), batch_size=chunk)
            else:
                keys = stepped_prng.split(key, k)
                arrays = jax.vmap(one_particle, axis_name=PARTICLE_AXIS)(keys, probes)
            if not summed:
                return arrays
            logq, costs, extras = arrays
            if marginals:  # the nodes do not depend on the summed-out sites
                first = lambda tree: jax.tree.map(lambda x: x[:, 0], tree)  # noqa: E731
                return first(logq), marginalisation.collapse(marginals, costs,
                                                              structure.plate_order), first(extras)
            return enumeration.collapse(structure, grouped, {e: logq[e] for e in enumerated},
                                        logq, costs, extras)

        return particles

    def loss(self, rng_key: Any, params: dict, *fns_and_args, **kwargs) -> jax.Array:
        """Minus the surrogate objective (see the class docstring)."""
        return self.loss_with_state(rng_key, params, None, *fns_and_args, **kwargs)[0]


def _probed_nodes(scg: SCG) -> list[str]:
    """The nodes whose estimator asks for ``dQ/dw``; their values must be floats."""
    probed = [n for n, node in scg.nodes.items() if node.estimator.needs_signal_grad]
    for n in probed:
        if not jnp.issubdtype(scg.nodes[n].value_dtype, jnp.floating):
            raise SiteError(
                n, f"uses {type(scg.nodes[n].estimator).__name__}, which differentiates the "
                f"costs with respect to the value, but the value is "
                f"{scg.nodes[n].value_dtype}; the estimator must sample floats",
            )
    return probed


def _check_chunk(chunk: Any, num_particles: int) -> int | None:
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise TypeError(f"particle_chunk must be None or an int >= 1, got {chunk!r}")
    if num_particles % int(chunk):
        raise ValueError(f"particle_chunk={chunk} must divide num_particles={num_particles}")
    return int(chunk)


def _check_chunkable(scg: SCG, chunk: int) -> None:
    for name, node in scg.nodes.items():
        if node.estimator.couples_particles:
            raise SiteError(name, f"uses {type(node.estimator).__name__}, which couples the "
                            "particles inside their vmap; it cannot run in blocks of "
                            f"particle_chunk={chunk}: use particle_chunk=None")
