"""Beyond one device: data-parallel training on JAX's own SPMD partitioner.

Nothing here adds a code path to the training step. ``sg.SVI``'s step is one ``jax.jit``; give
it data whose leading axis (the data plate) is split over a :class:`jax.sharding.Mesh` and a
state replicated on the same mesh, and XLA partitions the step: each device runs the model and
the guide on its slice of the plate, and the gradients (sums over the plate) are all-reduced,
parameter-sized, once per step. The numbers are those of the single-device step, to float
rounding (sums are taken in another order).

- :func:`device_mesh` builds a mesh of all devices (1-D ``"data"`` by default);
- :func:`shard_data` splits arrays' leading axis over a mesh axis (``local=True``: each
  process holds its own part, for multi-host runs);
- :func:`replicate` puts a pytree (an :class:`~scgjax.infer.svi.SVIState`, params) on every
  device of a mesh; ``SVI.init`` and ``SVI.run`` do it themselves when an argument is sharded;
- :func:`shard_particles` splits an objective's ``K`` particles over a mesh axis;
- :func:`collectives` lists the cross-device communication of a compiled step, to check that
  the data stay where they are.

Sub-sampling plates stay consistent: their indices come from the step's key, which is
replicated, so every device (and every process) draws the same subsample, the one the
single-device step draws.

Layer: above the objectives (it wraps one), below ``infer`` (``SVI`` asks it where the data
live).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scgjax.objectives.base import Objective

__all__ = ["collectives", "data_mesh", "device_mesh", "replicate", "replicate_for",
           "shard_data", "shard_particles"]


def device_mesh(axes: Mapping[str, int] | None = None, *, devices: Any = None,
                **sizes: int) -> Mesh:
    """A mesh of ``devices`` (default: all of them, every process's) with named axes.

    ``device_mesh()`` is 1-D, axis ``"data"`` over every device; ``device_mesh(data=2,
    particle=4)`` (or ``device_mesh({"data": 2, "particle": 4})``) is 2 x 4; one size may be
    ``-1``, the devices left over. The axes are automatic (GSPMD), as scgjax's step expects; a
    mesh from ``jax.make_mesh`` (explicit axes by default) is converted where scgjax takes one.

    Example:
        >>> import scgjax as sg
        >>> mesh = sg.device_mesh()
        >>> mesh.axis_names, mesh.size == len(jax.devices())
        (('data',), True)
    """
    axes = dict(axes or {}, **sizes) or {"data": -1}
    devices = list(jax.devices() if devices is None else devices)
    names, shape = tuple(axes), [int(s) for s in axes.values()]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1 or any(s < 1 and s != -1 for s in shape):
        raise ValueError(f"device_mesh: sizes must be ints >= 1, with at most one -1, got {axes}")
    if free:
        rest = math.prod(s for s in shape if s != -1)
        if len(devices) % rest:
            raise ValueError(f"device_mesh: {len(devices)} devices do not divide into {axes}")
        shape[free[0]] = len(devices) // rest
    if math.prod(shape) != len(devices):
        raise ValueError(f"device_mesh: {axes} needs {math.prod(shape)} devices, there are "
                         f"{len(devices)} (pass devices=... or a size of -1)")
    return Mesh(np.array(devices, dtype=object).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))


def _auto(mesh: Mesh | None, axis: str) -> Mesh:
    """``mesh`` with automatic axes (a new 1-D mesh named ``axis`` when ``None``)."""
    if mesh is None:
        return device_mesh({axis: -1})
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. sg.device_mesh()), got "
                        f"{type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has axes {mesh.axis_names}, not {axis!r}: pass axis=... or a "
                         f"mesh with an axis named {axis!r}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same global value in every process) placed with ``sharding``."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_data(tree: Any, mesh: Mesh | None = None, axis: str = "data", *,
               local: bool = False) -> Any:
    """Split the leading axis (the data plate) of every array in ``tree`` over ``mesh``'s
    ``axis``; the other axes, and other mesh axes, are replicated. 0-d arrays are replicated;
    leaves that are not arrays (ints, strings: static arguments of ``sg.SVI``) are kept.

    ``mesh`` defaults to :func:`device_mesh` (all devices, 1-D, named ``axis``). The leading
    size must be a multiple of the axis's size (pad the data and mask the padding with
    ``sg.handlers.mask`` otherwise). Returns ``jax.Array``\\ s with a ``NamedSharding``:
    pass them to ``svi.update``/``svi.run`` as usual, and the jitted step is partitioned
    (``SVI`` replicates its state on the same mesh).

    Multi-host (``jax.distributed.initialize``): by default ``tree`` holds the whole data, the
    same in every process, and each process keeps its devices' slices; with ``local=True``
    ``tree`` holds this process's rows only, and the global array is the processes' rows
    concatenated in process order (``jax.make_array_from_process_local_data``).

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> x = sg.shard_data(jnp.ones((8 * len(jax.devices()), 3)))  # 8 rows per device
        >>> x.sharding.spec == jax.sharding.PartitionSpec("data")
        True
    """
    mesh = _auto(mesh, axis)
    size = mesh.shape[axis]

    def place(path: Any, x: Any) -> Any:
        if not _is_array(x):
            return x
        if x.ndim == 0:
            return _put(x, NamedSharding(mesh, P()))
        sharding = NamedSharding(mesh, P(axis))
        if local:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        if x.shape[0] % size:
            where = jax.tree_util.keystr(path) or "the array"
            raise ValueError(f"shard_data: {where} has {x.shape[0]} rows, not a multiple of the "
                             f"{size} devices of mesh axis {axis!r}: pad it (and mask the "
                             "padding with sg.handlers.mask) or choose a batch size that "
                             "divides")
        return _put(x, sharding)

    return jax.tree_util.tree_map_with_path(place, tree)


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
    """Every array of ``tree`` (an ``SVIState``, params, PRNG keys included) replicated on all
    devices of ``mesh`` (default: :func:`device_mesh`); other leaves are kept.

    ``sg.SVI`` does this to its state when an argument is sharded (:func:`replicate_for`);
    call it yourself for a state that you pass to ``svi.update`` after it lived on one device
    (an earlier single-device run, a state restored by hand). In a multi-host run every
    process must pass the same values.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> params = sg.replicate({"w": jnp.zeros(3)})
        >>> params["w"].sharding.is_fully_replicated
        True
    """
    mesh = _auto(mesh, mesh.axis_names[0] if mesh is not None else "data")
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _put(x, sharding) if _is_array(x) else x, tree)


def data_mesh(tree: Any) -> Mesh | None:
    """The mesh of the first array of ``tree`` that is split over more than one device (a
    ``NamedSharding``), else ``None``: where :class:`~scgjax.SVI` puts its state."""
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            sharding = x.sharding
            if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
                return sharding.mesh
    return None


def replicate_for(state: Any, args: tuple, kwargs: dict) -> Any:
    """``state`` replicated on the mesh of the arguments' sharded arrays, unchanged when none
    is sharded (:func:`data_mesh`) or when it already lives on that mesh's devices."""
    mesh = data_mesh((args, kwargs))
    if mesh is None:
        return state
    devices = set(mesh.devices.flat)
    on_mesh = all(not isinstance(x, jax.Array) or x.sharding.device_set == devices
                  for x in jax.tree.leaves(state))
    return state if on_mesh else replicate(state, mesh)


# -- particles -------------------------------------------------------------------------------


class _ShardedParticles:
    """Mixed in before an objective's class by :func:`shard_particles`: constrains the
    particle arrays (leading axis ``K``) to be split over a mesh axis."""

    _particle_mesh: Mesh
    _particle_axis: str

    def __repr__(self) -> str:
        return (f"sg.shard_particles({super().__repr__()}, axis={self._particle_axis!r}, "
                f"devices={self._particle_mesh.shape[self._particle_axis]})")

    def _particles(self, *args: Any, **kwargs: Any) -> Any:
        run = super()._particles(*args, **kwargs)  # type: ignore[misc]
        self._particles_used = True
        mesh, axis = self._particle_mesh, self._particle_axis

        def constrain(tree: Any) -> Any:
            def one(x: jax.Array) -> jax.Array:
                if getattr(x, "ndim", 0) == 0:
                    return x
                spec = P(axis, *([P.UNCONSTRAINED] * (x.ndim - 1)))
                return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
            return jax.tree.map(one, tree)

        def particles(probes: dict) -> Any:
            return constrain(run(constrain(probes)))

        return particles

    def loss_with_state(self, *args: Any, **kwargs: Any) -> Any:
        self._particles_used = False
        out = super().loss_with_state(*args, **kwargs)  # type: ignore[misc]
        if not self._particles_used:
            raise TypeError(f"shard_particles: {type(self).__name__} does not run its "
                            "particles through the objectives' shared particle vmap (sg.SMC "
                            "resamples them together, sg.AmortisedWakeSleep has none), so "
                            "they cannot be split over devices: shard the data instead")
        return out


_SHARDED_CLASSES: dict[type, type] = {}


def shard_particles(objective: Objective, mesh: Mesh | None = None,
                    axis: str = "particle") -> Objective:
    """A copy of ``objective`` whose ``K`` particles are split over ``mesh``'s ``axis``.

    The particles are one ``vmap`` (axis name ``"particle"``); the copy constrains its inputs
    and outputs, shape ``(K, ...)``, to be sharded along their leading axis
    (``jax.lax.with_sharding_constraint``, the other axes left to XLA), so each device runs
    ``K / n`` particles and the estimators that couple them (leave-one-out, VIMCO, DisARM's
    pairs) read the others' values through XLA's collectives. The keys, hence the numbers, are
    those of the unsplit objective. ``K`` must be a multiple of the axis's size.

    Use one mesh for the data and the particles, e.g. ``mesh = sg.device_mesh(data=2,
    particle=4)``, ``sg.shard_data(x, mesh)`` and ``sg.shard_particles(sg.ELBO(num_particles=8),
    mesh)``. Objectives that run their particles elsewhere (``sg.SMC``, whose particles
    resample together; ``sg.AmortisedWakeSleep``, which has none) raise a ``TypeError`` when
    traced; ``particle_chunk`` (a sequential loop over blocks) does not combine with it.

    Example:
        >>> import scgjax as sg
        >>> k = 2 * len(jax.devices())
        >>> sg.shard_particles(sg.ELBO(num_particles=k)).num_particles == k
        True
    """
    if isinstance(objective, type) or not isinstance(objective, Objective):
        raise TypeError(f"shard_particles takes an objective instance (e.g. "
                        f"sg.ELBO(num_particles=8)), got {objective!r}")
    mesh = _auto(mesh, axis)
    n = mesh.shape[axis]
    k = objective.num_particles
    if k % n:
        raise ValueError(f"shard_particles: num_particles={k} is not a multiple of the {n} "
                         f"devices of mesh axis {axis!r}")
    if objective.particle_chunk is not None and objective.particle_chunk < k:
        raise ValueError(f"shard_particles: {objective!r} runs its particles in blocks "
                         "(particle_chunk), one block after another; split them over devices "
                         "or run them in blocks, not both")
    cls = type(objective)
    if isinstance(objective, _ShardedParticles):
        cls = cls.__mro__[2]  # (sharded class, mixin, the objective's own class, ...)
    sharded = _SHARDED_CLASSES.get(cls)
    if sharded is None:
        sharded = _SHARDED_CLASSES[cls] = type(cls.__name__, (_ShardedParticles, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__})
    out = copy.copy(objective)
    out.__class__ = sharded
    out._particle_mesh, out._particle_axis = mesh, axis
    return out


# -- inspecting a compiled step --------------------------------------------------------------

_COLLECTIVE = re.compile(r"=\s*(\([^()]*\)|[a-z][a-z0-9]*\[[0-9,]*\]\S*)\s+(all-gather|all-reduce|"
                         r"all-to-all|collective-permute|reduce-scatter|collective-broadcast)"
                         r"(?:-start)?\(")
_SHAPE = re.compile(r"[a-z][a-z0-9]*\[([0-9,]*)\]")


def collectives(compiled: Any) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The cross-device collectives of a compiled computation, in program order: ``(op,
    shapes)`` with ``op`` such as ``"all-reduce"`` or ``"all-gather"`` and the shapes of its
    results (one per array that it combines).

    ``compiled`` is a ``jax.stages.Compiled`` or its ``as_text()``; for an SVI step,
    ``jax.jit(svi.update).lower(state, *args).compile()``. A data-parallel step should show
    all-reduces of parameter-sized arrays (the gradients) and nothing data-sized.

    Example:
        >>> text = "%ar = (f32[3]{0}, f32[]) all-reduce(%a, %b), replica_groups={}"
        >>> collectives(text)
        [('all-reduce', [(3,), ()])]
        >>> collectives("%ag = f32[64,3]{1,0} all-gather(f32[8,3]{1,0} %x), dimensions={0}")
        [('all-gather', [(64, 3)])]
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    out = []
    for match in _COLLECTIVE.finditer(text):
        shapes = [tuple(int(d) for d in dims.split(",") if d)
                  for dims in _SHAPE.findall(match.group(1))]
        out.append((match.group(2), shapes))
    return out
