"""Stochastic variational inference: a jitted training step with optax, like NumPyro's SVI."""

from __future__ import annotations

import inspect
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scgjax import handlers
from scgjax.diagnostics import explain_nonfinite
from scgjax.errors import NonFiniteError, SiteError
from scgjax.infer.checkpoint import Checkpoints
from scgjax.objectives import Objective, program
from scgjax.objectives.program import SINGLE, site_log_prob
from scgjax.parallel import replicate_for
from scgjax.params import (
    _first_nonfinite,
    _param_messages,
    cached_build,
    constrain_params,
    init_params,
    split_static,
    strong_types,
)

#: what ``SVI.run(..., batches=...)`` accepts: an iterable of each step's positional arguments
#: (a tuple, or one argument such as an array), or ``batches(step) -> arguments``
Batches = Iterable[Any] | Callable[[int], Any]

__all__ = ["SVI", "SVIState", "SVIRunResult"]


class ProgressBar(Protocol):
    """What :meth:`SVI.run` needs of a progress bar passed as ``progress_bar=`` (a tqdm bar
    has it)."""

    def update(self, n: int) -> Any: ...

    def set_postfix_str(self, s: str) -> Any: ...


class SVIState(NamedTuple):
    """Everything that changes during training, as one pytree."""

    params: dict
    opt_state: Any
    estimator_state: dict
    rng_key: jax.Array


class SVIRunResult(NamedTuple):
    """What :meth:`SVI.run` returns: final params and state, and the per-step history.

    ``losses`` is the loss of every step (float32, shape ``(num_steps,)``). ``metrics`` maps
    each metric of the objective (``"loss"``, ``"objective"``, ...) to a numpy array of shape
    ``(num_steps,)`` when the metric is a scalar; a metric that is not a scalar (e.g.
    ``"learning_signals"`` of an objective with ``record_signals = True``) is kept at the last
    step only, as its value there (numpy leaves). The history lives on the host: its size is
    a few bytes per step, whatever the length of the run.
    """

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

    Nothing non-finite passes silently: :meth:`init` and :meth:`run` check their array
    arguments for NaN and inf (naming the site that receives them), and :meth:`run` stops at
    the first step whose loss is not finite with a :class:`~scgjax.errors.NonFiniteError`
    that names the step and the first non-finite quantity and carries the last good state.

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
        if isinstance(objective, type) and issubclass(objective, Objective):
            prefix = "sg." if objective.__module__.startswith("scgjax") else ""
            raise TypeError(f"objective is the class {objective.__name__}, not an objective: "
                            f"pass an instance, e.g. {prefix}{objective.__name__}() (with its "
                            "options, such as num_particles=...)")
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an scgjax objective, got {objective!r}")
        if objective.kind == SINGLE and guide is not None:
            raise TypeError(f"{type(objective).__name__} takes a single program: pass "
                            "guide=None")
        if objective.kind != SINGLE and guide is None:
            raise TypeError(f"{type(objective).__name__} needs a guide")
        _check_optimizer(optimizer)
        self.model = model
        self.guide = guide
        self.optimizer = optimizer
        self.objective = objective
        self.programs = (model,) if guide is None else (model, guide)
        # the jitted step per static signature of the arguments (their tree structure and
        # non-array leaves): ``step(state, arrays) -> (state, metrics)``
        self._jitted: dict = {}
        # the same steps by the types of the positional arguments, when each is one array
        # and there are no keyword arguments: a dispatch that flattens nothing
        self._by_types: dict[tuple[type, ...], Callable] = {}

    def init(self, rng_key: Any, *args, init_params_: dict | None = None, **kwargs
             ) -> SVIState:
        """Initial params (``sg.init_params``), optimiser state and estimator state.

        Array arguments holding NaN or inf are an error naming the site that receives them
        (see :meth:`run`)."""
        self._check_numpyro_keywords(kwargs)
        key = handlers.as_prng_key(rng_key)
        self._check_arguments(key, init_params_, args, kwargs)
        state = self._init(key, args, kwargs, init_params_)
        if not self.objective.init_state_checks_data:  # else init_state's run checked them
            self._check_data(state.params, args, kwargs)
        return replicate_for(state, args, kwargs)  # on the mesh of sharded data, if any

    def _check_data(self, params: dict, args: tuple, kwargs: dict) -> None:
        """Run the program(s) once, un-jitted, on the concrete arguments, so that every
        observed value is checked against its site's support (inside the jitted step the data
        are tracers and cannot be checked). Skipped when anything is traced."""
        leaves = jax.tree.leaves((params, args, kwargs))
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return
        program.run(self.objective.kind, jax.random.key(0), params, self.programs, args,
                    kwargs, self.objective.num_particles,
                    default=self.objective.default_estimator)

    def _init(self, key: jax.Array, args: tuple, kwargs: dict, params: dict | None
              ) -> SVIState:
        key_init, key_state, key_run = jax.random.split(key, 3)
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
        """One jitted training step; returns the new state and the loss before the step.

        The step is compiled once per static signature of the arguments (their tree structure
        and non-array leaves) and reused for arrays of the same shapes; when every argument is
        one array, finding it costs a dictionary look-up (no flattening)."""
        if not kwargs:
            step = self._by_types.get(tuple(map(type, args)))
            if step is not None:
                state, metrics = step(state, list(args))
                return state, metrics["loss"]
        state, metrics = self._update(state, args, kwargs)
        return state, metrics["loss"]

    def _update(self, state: SVIState, args: tuple, kwargs: dict) -> tuple[SVIState, dict]:
        if not kwargs:
            step = self._by_types.get(tuple(map(type, args)))
            if step is not None:
                return step(state, list(args))
        step, arrays = self._compiled(args, kwargs)
        return step(state, arrays)

    def _compiled(self, args: tuple, kwargs: dict) -> tuple[Callable, list]:
        """The jitted step for these arguments' static signature, and their array leaves.

        Array leaves (``jax.Array``, ``np.ndarray``) are the step's inputs; any other leaf
        (an int, a string, a function) is static: part of the cache key, by value (with its
        type, so that ``1``, ``1.0`` and ``True`` differ) or, when unhashable, by identity."""
        leaves, treedef = jax.tree.flatten((args, kwargs))
        dynamic = [_is_array(x) for x in leaves]
        static = tuple(None if d else (type(x), x) for x, d in zip(leaves, dynamic,
                                                                     strict=True))
        try:
            key = (treedef, static)
            hash(key)
        except TypeError:
            key = (treedef, tuple(None if s is None else (s[0], id(s[1])) for s in static))
        step = self._jitted.get(key)
        if step is None:
            def step(state: SVIState, arrays: list) -> tuple[SVIState, dict]:
                it = iter(arrays)
                a, kw = jax.tree.unflatten(treedef, [next(it) if s is None else s[1]
                                                     for s in static])
                return self._step(state, a, kw)

            step = self._jitted[key] = jax.jit(step)
        types = tuple(map(type, args))
        if not kwargs and all(t in _ARRAY_TYPES for t in types):
            # each positional argument is an array of a type whose values all are (a leaf):
            # the types say it all
            self._by_types[types] = step
        return step, [x for x, d in zip(leaves, dynamic, strict=True) if d]

    def get_params(self, state: SVIState, *args, **kwargs) -> dict:
        """The *constrained* params of ``state`` (what ``sg.param`` returns inside the
        programs; ``state.params`` holds unconstrained values), like numpyro's
        ``SVI.get_params``. ``args``/``kwargs`` are the programs' arguments.

        Example:
            >>> import jax, optax, scgjax as sg
            >>> from scgjax import dist
            >>> def model():
            ...     sg.sample("x", dist.Normal(0.0, 1.0), obs=0.5)
            >>> def guide():
            ...     sg.param("s", 2.0, dist.constraints.positive)
            >>> svi = sg.SVI(model, guide, optax.adam(0.1), sg.ELBO())
            >>> state = svi.init(0)
            >>> round(float(state.params["s"]), 4), round(float(svi.get_params(state)["s"]), 4)
            (0.6931, 2.0)
        """
        return constrain_params(state.params, self.model, self.guide, *args, **kwargs)

    def _check_numpyro_keywords(self, kwargs: dict) -> None:
        """numpyro's keyword names would otherwise reach the programs as their arguments."""
        renamed = {"init_params": "init_params_ (SVI.init) or state= (SVI.run)",
                   "init_state": "state=", "progress": "progress_bar="}
        for name, ours in renamed.items():
            if name in kwargs and not any(_accepts_keyword(f, name) for f in self.programs):
                raise TypeError(f"SVI got the keyword {name}=, which the programs do not take "
                                f"(numpyro's name?); scgjax's is {ours}")

    def evaluate(self, state: SVIState, *args, **kwargs) -> jax.Array:
        """The objective's loss at the current params (a fresh key; no update)."""
        key = jax.random.fold_in(state.rng_key, 1)
        return self.objective.loss_with_state(key, state.params, state.estimator_state,
                                              *self.programs, *args, **kwargs)[0]

    def run(self, rng_key: Any, num_steps: int, *args, batches: Batches | None = None,
            progress_bar: bool | ProgressBar = True, state: SVIState | None = None,
            log_every: int | None = None, stop_on_nonfinite: bool = True,
            checkpoint: Checkpoints | str | os.PathLike | None = None, **kwargs
            ) -> SVIRunResult:
        """Run ``num_steps`` steps; show a progress bar with the running objective.

        Returns the final params and state, the loss of every step and the history of the
        objective's metrics (:class:`SVIRunResult`; kept on the host, a few bytes per step).

        Every step gets the same ``*args`` and ``**kwargs``, unless ``batches=`` gives each
        step its own positional arguments (mini-batches); ``kwargs`` stay fixed. ``batches``
        is either

        - an iterable (a list, a generator, an array iterated along its first axis, ...)
          yielding one item per step, or
        - a callable, ``batches(step)`` with ``step`` counting from 0 in this run;

        an item is the step's positional arguments: a tuple, or any other value (an array)
        meaning that one argument. Giving both ``*args`` and ``batches`` is a ``TypeError``.
        A finite iterable must last ``num_steps`` steps: one that runs out is a ``ValueError``
        naming the step (before training when its length is known; wrap a list in
        ``itertools.cycle`` to repeat it). Batches of the same shapes reuse one compiled
        step (an incomplete last batch compiles another). The initial params and the checks of
        the arguments below use the first batch only; the others go straight to the step.

        Non-finite values are reported, never trained on silently:

        - array arguments holding NaN or inf are a :class:`~scgjax.errors.SiteError` naming the
          site that receives them (its observed value or log-density is then not finite), or a
          warning naming the argument when no site's log-density receives them;
        - with ``stop_on_nonfinite`` (the default), the run stops at the first step whose loss
          (or whose updated params or estimator state) is not finite, with a
          :class:`~scgjax.errors.NonFiniteError` naming the step and the first non-finite
          quantity (:func:`scgjax.diagnostics.explain_nonfinite` at that step's params and
          key). ``err.state`` is the last good state, the one before that step (the estimator
          state, such as a moving-average baseline, is not poisoned), and ``err.result`` the
          history of the steps before it. The losses are checked every ``log_every`` steps
          (no extra synchronisation per step); on a failure the steps since the last check
          are replayed, deterministically and on their own batches, to find the first bad
          one (the batches since the last check are kept for that, up to about 64 MiB of
          them: large batches are checked more often).

        ``stop_on_nonfinite=False`` keeps training whatever the loss.

        ``checkpoint`` (a :class:`~scgjax.infer.checkpoint.Checkpoints`, or a directory) saves
        the state every ``Checkpoints.every`` steps and after the last one (states checked
        finite first), with orbax. When the directory already holds a checkpoint, the run
        resumes from the latest one: its state (so ``rng_key`` is not used), its step (the
        run goes on to ``num_steps`` in all; ``batches(step)`` gets the step counted from the
        start of the whole run, and an iterable of batches is advanced past the steps done)
        and its history (``losses`` covers every step). The result is bit for bit that of a
        run that was never interrupted.

        ``progress_bar`` is ``True`` (a tqdm bar of this run's steps, when tqdm is installed),
        ``False``, or a bar made by the caller (anything with tqdm's ``update(n)`` and
        ``set_postfix_str(s)``): the run advances it by its steps and leaves it open, so that
        one bar can follow several runs (training in segments, with evaluations between).

        With ``state=`` (to resume), ``rng_key`` is not used (it may be ``None``): the state
        carries its own key, so a resumed run continues the same random stream.

        The metrics reach the host every ``log_every`` steps (default: a hundredth of the run):
        stacked on the device, up to 128 steps per array, and fetched with one
        ``jax.device_get``, so that the history holds no device memory and no step waits for
        its own transfer.

        Example: mini-batches of 100 of 1,000 points, from a function of the step (a
        ``subsample_size`` plate scales their log-likelihood to the whole data set).

            >>> import jax, jax.numpy as jnp, optax, scgjax as sg
            >>> from scgjax import dist
            >>> data = 2.0 + jax.random.normal(jax.random.key(0), (1000,))
            >>> def model(x):
            ...     z = sg.sample("z", dist.Normal(0.0, 10.0))
            ...     with sg.plate("data", 1000, subsample_size=x.shape[0]):
            ...         sg.sample("x", dist.Normal(z, 1.0), obs=x)
            >>> def guide(x):
            ...     sg.sample("z", dist.Normal(sg.param("m", 0.0), 0.03))
            >>> def batch(step):
            ...     key = jax.random.fold_in(jax.random.key(1), step)
            ...     return data[jax.random.choice(key, 1000, (100,), replace=False)]
            >>> svi = sg.SVI(model, guide, optax.adam(0.05), sg.ELBO())
            >>> result = svi.run(jax.random.key(2), 400, batches=batch, progress_bar=False)
            >>> abs(float(result.params["m"]) - float(data.mean())) < 0.1
            True

        The same with an iterable: the data cut into 10 batches, repeated (``itertools.cycle``),
        each item one positional argument; ``result.losses`` has one loss per step.

            >>> import itertools
            >>> epochs = itertools.cycle(data.reshape(10, 100))
            >>> result = svi.run(jax.random.key(2), 400, batches=epochs, progress_bar=False)
            >>> abs(float(result.params["m"]) - float(data.mean())) < 0.1, result.losses.shape
            (True, (400,))
        """
        self._check_numpyro_keywords(kwargs)
        num_steps = _check_count(num_steps, "num_steps", 0)
        if log_every is not None:
            log_every = _check_count(log_every, "log_every", 1)
        source = None
        if batches is not None:
            if args:
                raise TypeError(
                    f"SVI.run got {len(args)} positional argument{'s' if len(args) > 1 else ''}"
                    " for the programs and batches=: with batches=, each step's positional "
                    "arguments come from batches (keyword arguments stay fixed); pass one or "
                    "the other")
            source = _BatchSource(batches, num_steps)
            if num_steps > 0 or state is None:  # the first batch: the initial params, checks
                args = source(0)
        resumed = state is not None
        saves = None
        if checkpoint is not None:
            saves = checkpoint if isinstance(checkpoint, Checkpoints) else Checkpoints(
                checkpoint)
            if rng_key is None and state is None and saves.latest_step() is not None:
                rng_key = 0  # the state comes from the checkpoint: any key builds its template
        if state is None:
            key = handlers.as_prng_key(rng_key)
            self._check_arguments(key, None, args, kwargs)
            state = self._init(key, args, kwargs, None)
            if not self.objective.init_state_checks_data:
                self._check_data(state.params, args, kwargs)
        elif source is None or num_steps > 0:  # (resuming for no step: no batch to check)
            self._check_arguments(state.rng_key, state.params, args, kwargs)
            self._check_data(state.params, args, kwargs)
        start, save_every = 0, num_steps + 1
        history = _History(num_steps)
        if saves is not None:
            save_every = saves.interval(num_steps)
            start, state = _resume(saves, state, resumed, num_steps, history)
            if source is not None and source._it is not None:
                for j in range(1, start):  # the iterable's batches of the steps done
                    source(j)
            if start and source is not None and start < num_steps:
                args = source(start)
        state = replicate_for(state, args, kwargs)  # on the mesh of sharded data, if any
        own_bar = isinstance(progress_bar, (bool, np.bool_))
        bar = _progress(num_steps, bool(progress_bar)) if own_bar else progress_bar
        shown = start  # steps shown on the bar
        if bar is not None and start:
            bar.update(start)
        every = log_every or max(1, num_steps // 100)
        good, good_step = state, start  # the last state known to be finite, and its step
        # each step's arguments since ``good_step`` (to replay them after a non-finite loss)
        recent: list[tuple] = []
        keep = stop_on_nonfinite and source is not None
        # at most about _KEPT_BYTES of them: a check comes sooner when batches are large
        keep_for = num_steps
        if keep:
            size = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(args))
            keep_for = max(1, _KEPT_BYTES // max(1, size))
        step_args = args
        try:
            for i in range(start, num_steps):
                if i > start and source is not None:
                    step_args = source(i)
                if keep:
                    recent.append(step_args)
                state, metrics = self._update(state, step_args, kwargs)
                history.append(metrics)
                save = (i + 1) % save_every == 0 or (saves is not None and i == num_steps - 1)
                if i % every == 0 or i == num_steps - 1 or len(recent) >= keep_for or save:
                    losses = history.flush()
                    if stop_on_nonfinite:
                        if not (np.isfinite(losses[good_step:i + 1]).all()
                                and bool(_all_finite(state))):
                            args_at = ((lambda j: args) if source is None else
                                       (lambda j, start=good_step: recent[j - start]))
                            raise self._nonfinite_error(good, good_step, i + 1, history, args_at,
                                                        kwargs)
                        good, good_step = state, i + 1
                        recent.clear()
                    if save:
                        saves.save(i + 1, state, history.result(i + 1, scalars_only=True))
                    if bar is not None:
                        running = float(np.mean(losses[max(0, i + 1 - every):i + 1]))
                        bar.set_postfix_str(f"objective {-running:.4g}")
                        bar.update(i + 1 - shown)
                        shown = i + 1
        finally:  # an error (batches that run out, a non-finite loss) closes it too
            if bar is not None and own_bar:
                bar.close()
            if saves is not None and saves is not checkpoint:  # made here from a path
                saves.close()
        metric_arrays = history.result(num_steps)
        losses = np.empty(num_steps, dtype=np.float32)
        losses[:] = metric_arrays.get("loss", losses)
        return SVIRunResult(state.params, state, losses, metric_arrays)

    def _nonfinite_error(self, good: SVIState, good_step: int, end: int, history: _History,
                         args_at: Callable[[int], tuple], kwargs: dict) -> NonFiniteError:
        """The error of :meth:`run` when a step in ``[good_step, end)`` was not finite.

        Replays the steps from ``good`` (the state before ``good_step``) with the same
        compiled step, on each step's arguments (``args_at(step)``), until one has a
        non-finite loss or leaves non-finite params or estimator state, then explains that
        step at the state before it, with its key."""
        finite = np.isfinite(history.flush()[good_step:end])
        # the first step with a non-finite loss, or the last one (the state went bad)
        noted = good_step + (int(np.argmin(finite)) if not finite.all() else len(finite) - 1)
        state, bad, loss, after = good, noted, float("nan"), None
        for j in range(good_step, noted + 1):
            new, metrics = self._update(state, args_at(j), kwargs)
            loss = float(metrics["loss"])
            if not np.isfinite(loss) or not bool(_all_finite(new)) or j == noted:
                bad, after = j, new
                break
            state = new
        args = args_at(bad)
        step_key = jax.random.split(state.rng_key)[1]
        try:
            explanation = explain_nonfinite(
                self.objective, state.params, step_key, *self.programs, *args,
                estimator_state=state.estimator_state, **kwargs)
            first = explanation.first
        except Exception as e:  # noqa: BLE001 -- the error must carry the state regardless
            explanation, first = None, None
            unexplained = f"; re-evaluating it failed ({type(e).__name__}: {e})"
        else:
            unexplained = ("; every quantity of the step (its loss, log-densities, gradient) "
                           "is finite when it is re-evaluated, so "
                           + ("the optimiser's update overflowed: lower the learning rate"
                              if np.isfinite(loss) else
                              "the computation is not reproducible (non-deterministic)"))
        entry = _first_nonfinite_entry(after) if after is not None else None
        updated = None if entry is None else entry[0]
        if np.isfinite(loss) and updated is not None:
            head = (f"SVI.run: step {bad} made {updated} non-finite (its loss, "
                    f"{loss + 0.0:.6g}, was finite)")
        else:
            head = f"SVI.run: the loss became non-finite ({loss}) at step {bad}"
        cause = unexplained if first is None else \
            f"; the first non-finite quantity at that step: {first}"
        metrics = history.result(bad, scalars_only=True)
        result = SVIRunResult(state.params, state, metrics.get(
            "loss", np.empty(0, np.float32)).astype(np.float32), metrics)
        site = first.site if first is not None else None if entry is None else entry[1]
        message = (
            f"{head} (counting from 0 in this run){cause}. Training stopped: err.state is "
            f"the last good state (before step {bad}) and err.result the history of the "
            f"{bad} step{'' if bad == 1 else 's'} before it; print(err.explanation) lists every "
            "non-finite quantity. "
            "Fix the cause (a smaller learning rate, a constraint on a param, a guarded "
            "factor, ...) and resume with svi.run(..., state=err.state), or pass "
            "stop_on_nonfinite=False to train on regardless"
        )
        return NonFiniteError(message, site=site, step=bad, state=state, result=result,
                              explanation=explanation)

    def _check_arguments(self, key: jax.Array, params: dict | None, args: tuple,
                         kwargs: dict) -> None:
        """Raise if an array argument holds NaN or inf (see :meth:`run`)."""
        bad = _first_nonfinite_argument(args, kwargs)
        if bad is None:
            return
        label, text = bad
        found = _site_receiving_nonfinite(self.model, self.guide, key, params, args, kwargs)
        fix = ("remove or impute the NaN/inf entries of the data (or leave them out with "
               "sg.handlers.mask) before training")
        at = "the initial params" if params is None else "the current params"
        if found is None:
            warnings.warn(f"SVI: {label} holds a non-finite value ({text}), but no site's "
                          f"log-density is non-finite at {at}: make sure the program "
                          "handles it", stacklevel=3)
            return
        site, role, observed = found
        if observed:
            raise SiteError(site, f"has a non-finite observed value: {label} holds a "
                            f"non-finite value ({text}); {fix}")
        raise SiteError(site, f"has a non-finite log-density in the {role} at {at}, and "
                        f"{label} holds a non-finite value ({text}); {fix}")


def _accepts_keyword(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True  # cannot tell: let it through
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_count(value: Any, what: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` (numpy integers accepted), else a clear error."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an int, got the bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        hint = ""
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            hint = f"; pass {what}={int(value)}"
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})"
                        f"{hint}") from None
    if n < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {n}")
    return n


def _check_optimizer(optimizer: Any) -> None:
    """An optax ``GradientTransformation`` (or anything with ``init`` and ``update``)."""
    if isinstance(optimizer, optax.GradientTransformation) or (
            callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))):
        return
    hint = ""
    if callable(optimizer):
        name = getattr(optimizer, "__name__", type(optimizer).__name__)
        module = getattr(optimizer, "__module__", "") or ""
        prefix = "optax." if module.startswith("optax") else ""
        try:
            first = next(iter(inspect.signature(optimizer).parameters), "")
        except (TypeError, ValueError):
            first = "..."
        hint = f"; did you mean {prefix}{name}({first})?"
    raise TypeError("optimizer must be an optax.GradientTransformation, such as "
                    f"optax.adam(1e-3), got {optimizer!r}{hint}")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (one device scalar)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _first_nonfinite_entry(state: SVIState) -> tuple[str, str | None] | None:
    """``("param 'x'", "x")`` or ``("the estimator state of site 'z'", "z")``: the first
    non-finite entry of a state's params and estimator state, and its name (else the
    optimiser's state, with no name)."""
    for what, tree in (("param '{}'", state.params),
                       ("the estimator state of site '{}'", state.estimator_state)):
        for name, value in tree.items():
            if not bool(_all_finite(value)):
                return what.format(name), name
    if not bool(_all_finite(state.opt_state)):
        return "the optimiser's state", None
    return None


def _first_nonfinite_argument(args: tuple, kwargs: dict) -> tuple[str, str] | None:
    """``(label, text)`` of the first array argument (or float) holding NaN or inf, e.g.
    ``("positional argument 0", "nan at index (3,)")``; integer and boolean arrays, keys and
    tracers are skipped."""
    leaves = jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
    for path, leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            continue
        if isinstance(leaf, (np.ndarray, jax.Array, np.generic)):
            if not jnp.issubdtype(leaf.dtype, jnp.inexact):
                continue
        elif not isinstance(leaf, float):
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # multi-host:
            a = np.stack([np.asarray(s.data) for s in leaf.addressable_shards])  # our rows
        else:
            a = np.asarray(leaf)
        if np.isfinite(a).all():
            continue
        text = _first_nonfinite(a)
        first, rest = path[1], path[2:]
        label = (f"positional argument {first.idx}" if path[0].idx == 0
                 else f"keyword argument {first.key!r}")
        if rest:
            label += f" (at {jax.tree_util.keystr(rest)})"
        return label, text
    return None


def _site_receiving_nonfinite(model: Callable, guide: Callable | None, key: jax.Array,
                              params: dict | None, args: tuple, kwargs: dict
                              ) -> tuple[str, str, bool] | None:
    """``(site, role, observed)``: the first sample site, in program order (the guide's
    first), whose log-density is not finite when the programs run once (jitted) at
    ``params`` (``None``: the initial values) with these arguments, preferring a site whose
    observed value is itself not finite; ``None`` if every log-density is finite."""
    arrays, rebuild = split_static((args, kwargs))

    def build() -> tuple[Callable, list]:
        sites: list[tuple[str, str, bool]] = []  # (name, role, observed), filled when traced

        @jax.jit
        def flags(key, params, arrays):
            a, kw = rebuild(arrays)
            _, traces = _param_messages(key, model, guide, params, a, kw)
            roles = ("guide", "model") if guide is not None else ("program",)
            out = []
            sites.clear()
            for role, tr in zip(roles, traces, strict=True):
                for name, msg in tr.items():
                    if msg["type"] != "sample":
                        continue
                    observed = msg["is_observed"] and not msg.get("is_factor")
                    lp_bad = ~jnp.all(jnp.isfinite(site_log_prob(msg)))
                    value = msg["value"]
                    obs_bad = jnp.array(False)
                    if observed and jnp.issubdtype(jnp.result_type(value), jnp.inexact):
                        obs_bad = lp_bad & ~jnp.all(jnp.isfinite(value))
                    sites.append((name, role, bool(observed)))
                    out.append((lp_bad, obs_bad))
            return out

        return flags, sites

    # cached: a program that handles non-finite arguments itself is checked on every run
    flags, sites = cached_build(("nonfinite_sites", model, guide, rebuild.signature), build)
    result = jax.device_get(flags(key, params, arrays))
    for (name, role, _), (_, obs_bad) in zip(sites, result, strict=True):
        if obs_bad:
            return name, role, True
    for (name, role, _), (lp_bad, _) in zip(sites, result, strict=True):
        if lp_bad:
            return name, role, False
    return None


#: the types whose every value is an array argument (``jax.Array`` subclasses, keys
#: included, and ``np.ndarray``); a tracer is one too, by ``isinstance`` only
_ARRAY_TYPES: set[type] = set()


def _is_array(x: Any) -> bool:
    """Whether ``x`` is an array argument (``jax.Array``, tracers included, or
    ``np.ndarray``): an input of the jitted step; other leaves are static."""
    cls = type(x)
    if cls in _ARRAY_TYPES:
        return True
    if issubclass(cls, (jax.Array, np.ndarray)):
        _ARRAY_TYPES.add(cls)
        return True
    return isinstance(x, (jax.Array, np.ndarray))


def _resume(saves: Checkpoints, state: SVIState, given: bool, num_steps: int,
            history: _History) -> tuple[int, SVIState]:
    """``(step, state)`` to start from: the latest checkpoint's (its history loaded into
    ``history``), or ``(0, state)`` when there is none."""
    latest = saves.latest_step()
    if latest is None:
        return 0, state
    if given:
        raise ValueError(f"SVI.run got state= and a checkpoint directory that already holds a "
                         f"checkpoint (step {latest}, {saves.directory}): resume from the "
                         "checkpoint (drop state=) or use an empty directory")
    if latest > num_steps:
        raise ValueError(f"SVI.run: the latest checkpoint in {saves.directory} is at step "
                         f"{latest}, beyond num_steps={num_steps}")
    state, step, metrics = saves.restore(state, latest)
    history.preload(metrics, step)
    return step, state


class _BatchSource:
    """Each step's positional arguments from ``SVI.run(..., batches=...)`` (see there)."""

    def __init__(self, batches: Batches, num_steps: int):
        self.num_steps = num_steps
        self._fn: Callable[[int], Any] | None = None
        self._it: Iterator[Any] | None = None
        if callable(batches):
            self._fn = batches
            return
        try:
            self._it = iter(batches)
        except TypeError:
            raise TypeError("batches must be an iterable of each step's positional arguments "
                            "(a tuple, or one argument such as an array) or a callable "
                            f"batches(step), got {type(batches).__name__}") from None
        try:
            size = len(batches)  # type: ignore[arg-type]
        except TypeError:
            return  # an iterator: how long it lasts is found out step by step
        if size < num_steps:
            raise ValueError(f"batches has {size} item{'' if size == 1 else 's'} but "
                             f"num_steps={num_steps}: pass num_steps={size}, more batches, or "
                             "itertools.cycle(batches) to repeat them")

    def __call__(self, step: int) -> tuple:
        if self._fn is not None:
            item = self._fn(step)
        else:
            try:
                item = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                raise ValueError(
                    f"SVI.run: batches ran out at step {step} (counting from 0 in this run): "
                    f"it yielded {step} batch{'' if step == 1 else 'es'} for num_steps="
                    f"{self.num_steps}; pass num_steps={step}, a longer iterable, or "
                    "itertools.cycle(...) of a list of batches to repeat them") from None
        return item if isinstance(item, tuple) else (item,)


#: the most steps whose metrics are stacked into one device array before their transfer
_CHUNK = 128
#: about the most bytes of batches that SVI.run keeps to replay the steps since its last
#: check of the losses (it checks sooner rather than keep more)
_KEPT_BYTES = 64 * 2**20


@jax.jit
def _stack_chunk(chunk: list[dict]) -> dict:
    """One array per scalar metric, stacked over the steps of ``chunk``."""
    return {k: jnp.stack([m[k] for m in chunk]) for k in chunk[0]}


class _History:
    """The metrics of :meth:`SVI.run`'s steps, kept on the host.

    Scalar metrics go to numpy arrays of the run's length; every ``_CHUNK`` steps those not
    yet moved are stacked on the device (one asynchronous call, padded to a power of two so
    that few sizes compile) and :meth:`flush` moves the stacked chunks to the host in one
    ``jax.device_get``. A metric that is not a scalar is kept at the last step only."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.done = 0  # steps whose metrics are on the host
        self.scalars: list[str] | None = None  # the names of the scalar metrics
        self.pending: list[dict] = []  # scalar metrics of the steps not yet stacked
        self.stacked: list[tuple[int, dict]] = []  # (steps, device arrays), not yet fetched
        self.host: dict[str, np.ndarray] = {}
        self.last: dict[str, Any] = {}  # the non-scalar metrics of the last step

    def append(self, metrics: dict) -> None:
        if self.scalars is None:
            self.scalars = [k for k, v in metrics.items()
                            if isinstance(v, jax.Array) and v.ndim == 0]
        scalars = self.scalars
        self.pending.append({k: metrics[k] for k in scalars})
        if len(scalars) < len(metrics):
            self.last = {k: v for k, v in metrics.items() if k not in scalars}
        if len(self.pending) == _CHUNK:
            self._stack()

    def preload(self, metrics: dict[str, np.ndarray], steps: int) -> None:
        """The scalar metrics of the first ``steps`` steps (a resumed run's)."""
        for name, values in metrics.items():
            self.host[name] = np.empty(self.num_steps, values.dtype)
            self.host[name][:steps] = values[:steps]
        self.done = steps

    def _stack(self) -> None:
        n = len(self.pending)
        if n:
            size = 1 << (n - 1).bit_length()  # the next power of two
            chunk = self.pending + [self.pending[-1]] * (size - n)
            self.stacked.append((n, _stack_chunk(chunk)))
            self.pending = []

    def flush(self) -> np.ndarray:
        """Move every step's metrics to the host; return the losses so far."""
        self._stack()
        if self.stacked:
            fetched = jax.device_get([arrays for _, arrays in self.stacked])
            for (n, _), arrays in zip(self.stacked, fetched, strict=True):
                for name, values in arrays.items():
                    if name not in self.host:
                        self.host[name] = np.empty(self.num_steps, values.dtype)
                    self.host[name][self.done:self.done + n] = values[:n]
                self.done += n
            self.stacked = []
        return self.host.get("loss", np.empty(self.num_steps, np.float32))[:self.done]

    def result(self, steps: int, *, scalars_only: bool = False) -> dict[str, Any]:
        """The metrics of the first ``steps`` steps (see :class:`SVIRunResult`)."""
        self.flush()
        if self.scalars is None:
            return {}
        out: dict[str, Any] = {k: v if steps == len(v) else v[:steps].copy()
                               for k, v in self.host.items()}
        if not scalars_only:
            out.update(jax.device_get(self.last))
        return out


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="svi", dynamic_ncols=True)
