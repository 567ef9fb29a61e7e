"""Checkpoints of a training run, with orbax: save every N steps, resume from the latest.

:class:`Checkpoints` is what ``SVI.run(..., checkpoint=...)`` saves to and resumes from. Each
checkpoint holds the whole :class:`~scgjax.infer.svi.SVIState` (params, optimiser state,
estimator state such as baselines, DCV's coefficients or NVIL's networks, and the typed PRNG
key, stored as its key data and implementation), the number of steps done, and the history of
the scalar metrics so far. Saves go through orbax's ``CheckpointManager``: a checkpoint is
written to a temporary directory and renamed once complete, so a run killed mid-save leaves no
checkpoint that is ever loaded, and loses at most the steps since the last complete one.
Arrays are restored with the shardings of the state they are restored into (a sharded state
restores onto the same mesh).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

__all__ = ["Checkpoints"]


class Checkpoints:
    """A directory of checkpoints of one training run (orbax ``CheckpointManager``).

    Args:
        directory: where the checkpoints go (created if missing); one sub-directory per saved
            step.
        every: save after every ``every`` steps (and after the last step of a run); ``None``:
            a tenth of the run.
        keep: how many of the latest checkpoints to keep (older ones are deleted).

    ``SVI.run(rng_key, num_steps, *args, checkpoint=Checkpoints(path, every=500))`` saves as it
    goes; run again with the same ``checkpoint``, it resumes from the latest checkpoint (its
    state, its step, its history) and gives the very same result, bit for bit, as a run that
    was never interrupted. A path may be given instead of a ``Checkpoints``.

    Example:
        >>> import tempfile, jax, optax, scgjax as sg
        >>> from scgjax import dist
        >>> def model():
        ...     z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...     sg.sample("x", dist.Normal(z, 1.0), obs=1.0)
        >>> def guide():
        ...     sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
        >>> svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
        >>> folder = tempfile.mkdtemp()
        >>> first = svi.run(jax.random.key(0), 20, progress_bar=False,
        ...                 checkpoint=sg.Checkpoints(folder, every=10))
        >>> sg.Checkpoints(folder).latest_step()
        20
        >>> more = svi.run(jax.random.key(0), 30, progress_bar=False, checkpoint=folder)
        >>> more.losses.shape, bool((more.losses[:20] == first.losses).all())
        ((30,), True)
    """

    def __init__(self, directory: str | os.PathLike, every: int | None = None, keep: int = 3):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ValueError(f"Checkpoints every must be None or an int >= 1, got {every!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpoints keep must be an int >= 1, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = every
        self.keep = keep
        self._manager: Any = None

    def __repr__(self) -> str:
        return f"Checkpoints({self.directory!r}, every={self.every}, keep={self.keep})"

    @property
    def manager(self) -> Any:
        """The orbax ``CheckpointManager`` (made on first use)."""
        if self._manager is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                   enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def interval(self, num_steps: int) -> int:
        """Steps between saves in a run of ``num_steps`` steps."""
        return self.every if self.every is not None else max(1, num_steps // 10)

    def latest_step(self) -> int | None:
        """The step of the latest complete checkpoint, or ``None``."""
        if not os.path.isdir(self.directory):
            return None
        return self.manager.latest_step()

    def save(self, step: int, state: Any, history: dict[str, np.ndarray]) -> None:
        """Save ``state`` after ``step`` steps, with the scalar metrics of those steps."""
        import orbax.checkpoint as ocp

        tree, keys = _without_keys(state)
        metrics = {k: np.asarray(v[:step]).tolist() for k, v in history.items()}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            meta=ocp.args.JsonSave({"step": step, "keys": keys, "metrics": metrics,
                                    "dtypes": {k: str(np.asarray(v).dtype)
                                               for k, v in history.items()}})))
        self.manager.wait_until_finished()

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, int, dict]:
        """``(state, step, metrics)`` of the checkpoint at ``step`` (default: the latest),
        restored into the structure, dtypes and shardings of ``like`` (a fresh state)."""
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        tree, _ = _without_keys(like)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        state = _with_keys(restored["state"], like, meta["keys"])
        metrics = {k: np.asarray(v, dtype=meta["dtypes"][k]) for k, v in meta["metrics"].items()}
        return state, int(meta["step"]), metrics

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _without_keys(tree: Any) -> tuple[Any, list[str | None]]:
    """The tree with each typed PRNG key replaced by its key data, and each leaf's key
    implementation (``None`` for other leaves), in leaf order."""
    leaves, treedef = jax.tree.flatten(tree)
    impls = [str(jax.random.key_impl(x)) if _is_key(x) else None for x in leaves]
    data = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, data), impls


def _with_keys(tree: Any, like: Any, impls: list[str | None]) -> Any:
    """The inverse of :func:`_without_keys`, in the structure of ``like``."""
    leaves = jax.tree.leaves(tree)
    treedef = jax.tree.structure(like)
    out = [jax.random.wrap_key_data(x, impl=impl) if impl is not None else x
           for x, impl in zip(leaves, impls, strict=True)]
    return jax.tree.unflatten(treedef, out)
