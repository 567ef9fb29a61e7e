"""Stochastic variational inference: a jitted training step with optax, like NumPyro's SVI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from scgjax import handlers
from scgjax.objectives import Objective
from scgjax.objectives.program import SINGLE
from scgjax.params import init_params, split_static, strong_types

__all__ = ["SVI", "SVIState", "SVIRunResult"]


class SVIState(NamedTuple):
    """Everything that changes during training, as one pytree."""

    params: dict
    opt_state: Any
    estimator_state: dict
    rng_key: jax.Array


class SVIRunResult(NamedTuple):
    """What :meth:`SVI.run` returns: final params and state, and the per-step history."""

    params: dict
    state: SVIState
    losses: np.ndarray
    metrics: dict[str, np.ndarray]


class SVI:
    """Train ``model`` (and ``guide``) by following an objective's gradient with optax.

    ``objective`` is e.g. ``sg.ELBO(num_particles=K)`` or, with ``guide=None``,
    ``sg.Expectation()``. :meth:`init` builds the state, :meth:`update` is one jitted step
    (``value_and_grad`` of the objective's loss, an optax update, and the estimators' state,
    such as moving-average baselines, threaded through), :meth:`run` loops with a progress bar.
    Arguments that are not arrays (ints, strings, functions) are treated as static.

    Example:
        >>> import jax, optax, scgjax as sg
        >>> from scgjax import dist
        >>> def model(x):
        ...     z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...     sg.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
        >>> svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
        >>> result = svi.run(jax.random.key(0), 300, 2.0, progress_bar=False)
        >>> abs(float(result.params["m"]) - 1.0) < 0.2  # exact posterior mean: 1.0
        True
    """

    def __init__(self, model: Callable, guide: Callable | None,
                 optimizer: optax.GradientTransformation, objective: Objective):
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an scgjax objective, got {objective!r}")
        if objective.kind == SINGLE and guide is not None:
            raise TypeError(f"{type(objective).__name__} takes a single program: pass "
                            "guide=None")
        if objective.kind != SINGLE and guide is None:
            raise TypeError(f"{type(objective).__name__} needs a guide")
        self.model = model
        self.guide = guide
        self.optimizer = optimizer
        self.objective = objective
        self.programs = (model,) if guide is None else (model, guide)
        self._jitted: dict = {}

    def init(self, rng_key: Any, *args, init_params_: dict | None = None, **kwargs
             ) -> SVIState:
        """Initial params (``sg.init_params``), optimiser state and estimator state."""
        key = handlers.as_prng_key(rng_key)
        key_init, key_state, key_run = jax.random.split(key, 3)
        params = init_params_
        if params is None:
            params = init_params(key_init, self.model, self.guide, *args, **kwargs)
        est_state = self.objective.init_state(key_state, params, *self.programs, *args,
                                              **kwargs)
        params, est_state = strong_types((params, est_state))
        return SVIState(params, self.optimizer.init(params), est_state, key_run)

    def _step(self, state: SVIState, args: tuple, kwargs: dict) -> tuple[SVIState, dict]:
        key, step_key = jax.random.split(state.rng_key)

        def loss_fn(params):
            return self.objective.loss_with_state(step_key, params, state.estimator_state,
                                                  *self.programs, *args, **kwargs)

        (loss, (est_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return SVIState(params, opt_state, est_state, key), {"loss": loss, **metrics}

    def update(self, state: SVIState, *args, **kwargs) -> tuple[SVIState, jax.Array]:
        """One jitted training step; returns the new state and the loss before the step."""
        state, metrics = self._update(state, args, kwargs)
        return state, metrics["loss"]

    def _update(self, state: SVIState, args: tuple, kwargs: dict) -> tuple[SVIState, dict]:
        arrays, rebuild = split_static((args, kwargs))
        static_key = _static_key(rebuild([None] * len(arrays)))
        step = self._jitted.get(static_key)
        if step is None:
            def step(state, arrays):
                a, kw = rebuild(arrays)
                return self._step(state, a, kw)

            step = self._jitted[static_key] = jax.jit(step)
        return step(state, arrays)

    def evaluate(self, state: SVIState, *args, **kwargs) -> jax.Array:
        """The objective's loss at the current params (a fresh key; no update)."""
        key = jax.random.fold_in(state.rng_key, 1)
        return self.objective.loss_with_state(key, state.params, state.estimator_state,
                                              *self.programs, *args, **kwargs)[0]

    def run(self, rng_key: Any, num_steps: int, *args, progress_bar: bool = True,
            state: SVIState | None = None, log_every: int | None = None, **kwargs
            ) -> SVIRunResult:
        """Run ``num_steps`` steps; show a progress bar with the running objective.

        Returns the final params and state, the loss of every step and the history of the
        objective's metrics.
        """
        if state is None:
            state = self.init(rng_key, *args, **kwargs)
        losses = np.empty(num_steps, dtype=np.float32)
        history: dict[str, list] = {}
        bar = _progress(num_steps, progress_bar)
        every = log_every or max(1, num_steps // 100)
        for i in range(num_steps):
            state, metrics = self._update(state, args, kwargs)
            for name, value in metrics.items():
                history.setdefault(name, []).append(value)
            if bar is not None and (i % every == 0 or i == num_steps - 1):
                running = float(np.mean(jax.device_get(history["loss"][-every:])))
                bar.set_postfix_str(f"objective {-running:.4g}")
                bar.update(i + 1 - bar.n)
        if bar is not None:
            bar.close()
        metric_arrays = {k: np.asarray(jax.device_get(v)) for k, v in history.items()}
        losses[:] = metric_arrays.get("loss", losses)
        return SVIRunResult(state.params, state, losses, metric_arrays)


def _static_key(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    try:
        hash(tuple(leaves))
        return treedef, tuple(leaves)
    except TypeError:
        return treedef, tuple(id(x) for x in leaves)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="svi", dynamic_ncols=True)
