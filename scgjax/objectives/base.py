"""What all objectives share: particles, the traced structure, the state, the loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from scgjax import handlers
from scgjax.errors import SiteError
from scgjax.estimators import default_estimator
from scgjax.estimators.base import PARTICLE_AXIS
from scgjax.objectives import enumeration, program
from scgjax.objectives.surrogate import dice_surrogate


class Evaluation(NamedTuple):
    """The particles of one objective evaluation, before they are assembled into a loss.

    ``logq`` (signal-using nodes) and ``costs`` hold ``(K, *plates)`` arrays in the canonical
    plate layout; ``extras`` each node's values and collected arrays; ``signal_grads`` the
    ``dQ/dw`` of the nodes whose estimator asked for it.
    """

    structure: program.Structure
    logq: dict
    costs: dict
    extras: dict
    signal_grads: dict


class Objective:
    """Base class: a surrogate loss built from the traced program's SCG.

    Subclasses set ``kind`` (``program.GUIDED`` or ``program.SINGLE``). ``loss`` returns minus
    the surrogate: its value is minus the objective estimate and ``jax.grad`` of it is the
    gradient estimate. ``loss_with_state`` also threads the estimators' state (moving-average
    baselines, ...) and returns metrics.
    """

    kind: str = program.GUIDED
    #: also return each node's learning signal ``Q_w`` as ``metrics["learning_signals"]``
    #: (for diagnostics; off in training, where metrics are kept for every step)
    record_signals: bool = False

    def __init__(self, num_particles: int = 1):
        # an int >= 1 (numpy ints too, stored as a Python int; not a bool or a float)
        self.num_particles = program.check_num_particles(num_particles)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"

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
        """Initial estimator state, one entry per score-estimated site."""
        scg = self.structure(rng_key, params, *fns_and_args, **kwargs).scg
        return {n: node.estimator.init_state() for n, node in scg.nodes.items()
                if node.estimator.uses_signal}

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
        surrogate, per_particle, new_state = dice_surrogate(
            evaluation.structure, evaluation.logq, evaluation.costs, evaluation.extras,
            evaluation.signal_grads, params, state, signals=signals)
        metrics = {"objective": per_particle.mean()}
        if signals is not None:
            metrics["learning_signals"] = signals
        return -surrogate, (new_state, metrics)

    def evaluate(self, rng_key: Any, params: dict, *fns_and_args, **kwargs) -> Evaluation:
        """Trace the program, run its ``K`` particles (``vmap``; enumerated sites summed out)
        and return their per-element arrays (see :class:`Evaluation`)."""
        structure = self.structure(rng_key, params, *fns_and_args, **kwargs)
        n = 1 if self.kind == program.SINGLE else 2
        programs, args = fns_and_args[:n], fns_and_args[n:]
        key = handlers.as_prng_key(rng_key)

        keys = key[None] if self.num_particles == 1 else jax.random.split(
            key, self.num_particles)
        scg = structure.scg
        probed = [n for n, node in scg.nodes.items() if node.estimator.needs_signal_grad]
        for n in probed:
            if not jnp.issubdtype(scg.nodes[n].value_dtype, jnp.floating):
                raise SiteError(
                    n, f"uses {type(scg.nodes[n].estimator).__name__}, which differentiates the "
                    f"costs with respect to the value, but the value is "
                    f"{scg.nodes[n].value_dtype}; the estimator must sample floats",
                )

        enumerated = enumeration.enumerated_nodes(structure)
        enumeration.check(structure, enumerated)
        sizes = enumeration.support_sizes(structure, enumerated)

        def particles(probes):
            def one_config(particle_key, particle_probes, config):
                index = dict(zip(enumerated, enumeration.config_indices(config, sizes),
                                 strict=True))
                traces = program.run(self.kind, particle_key, params, programs, args, kwargs,
                                     self.num_particles, probes=particle_probes,
                                     enum_index=index, default=self.default_estimator)
                return program.particle_arrays(structure, traces)

            def one_particle(particle_key, particle_probes):
                if not enumerated:
                    return one_config(particle_key, particle_probes, None)
                configs = jnp.arange(enumeration.num_configs(sizes))
                return jax.vmap(one_config, in_axes=(None, None, 0))(
                    particle_key, particle_probes, configs)

            arrays = jax.vmap(one_particle, axis_name=PARTICLE_AXIS)(keys, probes)
            if not enumerated:
                return arrays
            logq, costs, extras = arrays
            enum_logq = {e: logq[e] for e in enumerated}
            return enumeration.collapse(structure, enumerated, enum_logq, logq, costs, extras)

        signal_grads: dict = {}
        if probed:
            zeros = {n: jnp.zeros((self.num_particles, *scg.nodes[n].value_shape),
                                  scg.nodes[n].value_dtype) for n in probed}
            (logq, costs, extras), pullback = jax.vjp(particles, zeros)
            for n in probed:  # d(costs credited to n)/d(value of n), in every particle
                credited = set(scg.credited_costs(n))
                cotangent = (jax.tree.map(jnp.zeros_like, logq),
                             {c: jnp.ones_like(v) if c in credited else jnp.zeros_like(v)
                              for c, v in costs.items()},
                             jax.tree.map(jnp.zeros_like, extras))
                signal_grads[n] = jax.lax.stop_gradient(pullback(cotangent)[0][n])
        else:
            logq, costs, extras = particles({})
        return Evaluation(structure, logq, costs, extras, signal_grads)

    def loss(self, rng_key: Any, params: dict, *fns_and_args, **kwargs) -> jax.Array:
        """Minus the surrogate objective (see the class docstring)."""
        return self.loss_with_state(rng_key, params, None, *fns_and_args, **kwargs)[0]
