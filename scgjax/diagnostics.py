"""Diagnostics of gradient estimators: per-parameter variance and signal-to-noise ratio,
estimators compared by measured variance, non-finite values explained.

:func:`gradient_variance` draws many independent gradient estimates of an objective (one per
random key, vectorised with ``jax.vmap`` and accumulated chunk by chunk with ``jax.lax.scan``,
so memory stays bounded) and reports, for every parameter element, the mean, the variance and
the signal-to-noise ratio ``|mean| / std`` of the estimate (Roberts & Tedrake 2009; Rainforth
et al. 2018 use the SNR to compare estimators), together with the variance of every
score-estimated site's learning signal ``Q_w`` (the quantity a baseline tries to centre).

:func:`compare_estimators` measures, site by site, what each candidate estimator gives: the
total variance of the gradient and the time per step at the current params, and recommends
the one of least variance x time (work-normalised variance) per site, as an assignment for
``sg.handlers.assign_estimators``.

:func:`explain_nonfinite` re-evaluates an objective at given params and key and lists, in the
order they are computed, the quantities that are NaN or infinite (params, each site's
log-density, factors, estimator terms, estimator state, the loss, its gradient): what
:meth:`scgjax.SVI.run` reports when a step's loss stops being finite.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scgjax import handlers, provenance, tracegraph
from scgjax.errors import SiteError
from scgjax.estimators.score_function import ScoreFunction
from scgjax.objectives.base import Objective
from scgjax.objectives.surrogate import dice_surrogate
from scgjax.params import _estimator_params, _param_messages, cached_build, split_static
from scgjax.primitives import check_estimator

__all__ = ["CandidateMeasurement", "EstimatorComparison", "GradientVariance",
           "NonFiniteExplanation", "NonFiniteQuantity", "compare_estimators",
           "explain_nonfinite", "gradient_variance"]


class GradientVariance(NamedTuple):
    """What :func:`gradient_variance` returns.

    Attributes:
        mean: per-element mean of the gradient estimate of the loss (a pytree like ``params``).
        variance: per-element variance of one estimate (``ddof=1``), same pytree.
        snr: ``|mean| / sqrt(variance)``, same pytree (``inf`` where the variance is 0 and the
            mean is not, ``nan`` where both are 0).
        signal_variance: per score-estimated site, the variance of its learning signal ``Q_w``
            over keys and particles (``ddof=1``), averaged over its plate elements.
        num_samples: the number of gradient estimates.
    """

    mean: Any
    variance: Any
    snr: Any
    signal_variance: dict[str, float]
    num_samples: int

    def summary(self) -> str:
        """A readable table: one row per parameter leaf (``|mean|``, variance and SNR averaged
        over its elements; the SNR over its finite values), then the learning-signal variance
        of every site."""
        rows = [("parameter", "shape", "mean |g|", "variance", "snr")]
        leaves = jax.tree_util.tree_flatten_with_path(self.mean)[0]
        variances = jax.tree.leaves(self.variance)
        snrs = jax.tree.leaves(self.snr)
        for (path, m), v, s in zip(leaves, variances, snrs, strict=True):
            rows.append((_path_name(path), str(tuple(np.shape(m))),
                         f"{np.mean(np.abs(m)):.4g}", f"{np.mean(v):.4g}",
                         f"{_average(s):.4g}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"gradient of the loss over {self.num_samples} samples "
                 "(per leaf: averages over elements)"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(r, widths, strict=True))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.signal_variance:
            lines.append("learning-signal variance per site:")
            width = max(len(n) for n in self.signal_variance)
            lines.extend(f"  {n.ljust(width)}  {v:.4g}" for n, v in self.signal_variance.items())
        return "\n".join(lines)


def _average(x: Any) -> float:
    """Mean of the finite elements (``inf`` if there are none but infinite ones, else nan)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    finite = x[np.isfinite(x)]
    if finite.size:
        return float(finite.mean())
    return float("inf") if np.isinf(x).any() else float("nan")


def _path_name(path: tuple) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


class _Moments(NamedTuple):
    """Count, mean and sum of squared deviations of a sample."""

    n: jax.Array
    mean: jax.Array
    m2: jax.Array


def _chunk_moments(x: jax.Array, mask: jax.Array) -> _Moments:
    """:class:`_Moments` of ``x`` over its leading axis, where ``mask`` (leading axis) is
    true."""
    w = mask.reshape((-1,) + (1,) * (x.ndim - 1))
    x = jnp.where(w, x, 0.0)
    n = mask.sum().astype(x.dtype)
    mean = x.sum(0) / n
    m2 = jnp.where(w, (x - mean) ** 2, 0.0).sum(0)
    return _Moments(n, mean, m2)


def _pool(m: _Moments) -> _Moments:
    """Chan, Golub & LeVeque (1979): the moments of the union of disjoint samples, from the
    moments of each (stacked along the leading axis)."""
    n = m.n.sum()
    w = (m.n / n).reshape((-1,) + (1,) * (m.mean.ndim - 1))
    mean = (w * m.mean).sum(0)
    spread = (m.n.reshape(w.shape) * (m.mean - mean) ** 2).sum(0)
    return _Moments(n, mean, m.m2.sum(0) + spread)


def gradient_variance(objective: Objective, params: dict, rng_key: Any,
                      *programs_and_args: Any, num_samples: int = 1000,
                      state: dict | None = None, chunk_size: int = 256,
                      with_signals: bool = True, **kwargs: Any) -> GradientVariance:
    """Mean, variance and SNR of the gradient estimate, per parameter element.

    Draws ``num_samples`` independent estimates ``g_s = grad_params loss(key_s, params)`` of
    ``objective.loss_with_state`` (keys ``jax.random.split(rng_key, num_samples)``), in chunks
    of ``chunk_size`` keys (``vmap`` within a chunk, ``lax.scan`` over the chunks, moments
    pooled; all jitted, memory bounded by the chunk), and returns per element

        mean = (1/S) sum_s g_s,   variance = (1/(S-1)) sum_s (g_s - mean)^2,
        snr = |mean| / sqrt(variance),

    plus, per score-estimated site ``w`` (when ``with_signals``), the variance of its
    learning signal ``Q_w`` over keys and particles, averaged over its plate elements (the
    objective's ``metrics["learning_signals"]``). The gradient is that of the *loss* (minus
    the objective), so
    ``mean`` estimates minus the objective's gradient. Estimator parameters (e.g. a neural
    baseline's ``"<site>$baseline"``) are included. ``state`` is the estimators' state (e.g.
    ``SVIState.estimator_state``; ``None``: the initial state), the same for every sample.

    Call it like the objective's loss: ``gradient_variance(obj, params, key, model, guide,
    *args, **kwargs)`` for guided objectives (``sg.ELBO``), ``gradient_variance(obj, params,
    key, fn, *args, **kwargs)`` for single programs (``sg.Expectation``).

    Example:
        >>> import jax, scgjax as sg
        >>> from scgjax import dist
        >>> def episode():
        ...     a = sg.sample("a", dist.Bernoulli(logits=sg.param("theta", 0.0)),
        ...                   estimator=sg.ScoreFunction())
        ...     sg.factor("reward", a)
        >>> params = sg.init_params(0, episode)
        >>> gv = sg.diagnostics.gradient_variance(sg.Expectation(), params, 0, episode,
        ...                                       num_samples=2000)
        >>> abs(float(gv.mean["theta"]) + 0.25) < 0.03  # exact gradient of the loss: -0.25
        True
        >>> round(float(gv.variance["theta"]), 2), round(gv.signal_variance["a"], 2)
        (0.06, 0.25)
        >>> print(gv.summary())  # doctest: +ELLIPSIS
        gradient of the loss over 2000 samples (per leaf: averages over elements)
        parameter  shape  mean |g|  variance    snr
        ...
        theta      ()     0.2...
        learning-signal variance per site:
          a  0.25...
    """
    programs, args = _split_programs(objective, programs_and_args, "gradient_variance")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    arrays, rebuild = split_static((args, kwargs))
    run = _variance_runner(objective, programs, rebuild, with_signals)

    chunk = min(chunk_size, num_samples)
    n_chunks = -(-num_samples // chunk)
    keys = jax.random.split(handlers.as_prng_key(rng_key), num_samples)
    pad = n_chunks * chunk - num_samples
    keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (pad,))]) if pad else keys
    mask = jnp.arange(n_chunks * chunk) < num_samples
    keys = keys.reshape(n_chunks, chunk)
    mask = mask.reshape(n_chunks, chunk)
    g_stats, s_stats = run(keys, mask, params, state, arrays)
    is_stats = lambda x: isinstance(x, _Moments)
    mean = jax.tree.map(lambda s: s.mean, g_stats, is_leaf=is_stats)
    var = jax.tree.map(lambda s: s.m2 / (s.n - 1.0), g_stats, is_leaf=is_stats)
    snr = jax.tree.map(lambda m, v: jnp.abs(m) / jnp.sqrt(v), mean, var)
    signal_variance = {w: float(jnp.mean(s.m2 / (s.n - 1.0))) for w, s in s_stats.items()}
    return GradientVariance(mean, var, snr, signal_variance, num_samples)


def _variance_runner(objective: Objective, programs: tuple, rebuild: Callable,
                     with_signals: bool) -> Callable:
    """The jitted ``run(keys, mask, params, state, arrays)`` of :func:`gradient_variance`.

    Built once per objective configuration, programs, non-array arguments and
    ``with_signals`` (a small cache), so that repeated calls (e.g. at checkpoints of a
    training run) reuse one compiled function instead of tracing and compiling anew. The key
    holds the objective's attributes, so an objective changed in place gets a new runner;
    arguments that cannot be hashed skip the cache.
    """
    try:
        config = tuple(sorted(vars(objective).items()))
    except TypeError:  # attributes that cannot be compared: a fresh runner
        return _build_variance_runner(objective, programs, rebuild, with_signals)
    key = ("gradient_variance", type(objective), config, programs, rebuild.signature,
           with_signals)
    return cached_build(key, lambda: _build_variance_runner(objective, programs, rebuild,
                                                            with_signals))


def _build_variance_runner(objective: Objective, programs: tuple, rebuild: Callable,
                           with_signals: bool) -> Callable:
    """The jitted runner of :func:`_variance_runner`."""
    estimate = _estimate_fn(objective, programs, rebuild, with_signals)
    is_stats = lambda x: isinstance(x, _Moments)

    @jax.jit
    def run(keys, mask, params, state, arrays):
        k = objective.num_particles
        batched = jax.vmap(estimate, in_axes=(0, None, None, None))

        def one_chunk(carry, xs):
            chunk_keys, chunk_mask = xs
            grads, signals = batched(chunk_keys, params, state, arrays)
            g_stats = jax.tree.map(lambda g: _chunk_moments(g, chunk_mask), grads)
            s_stats = {w: _chunk_moments(q.reshape(-1, *q.shape[2:]), jnp.repeat(chunk_mask, k))
                       for w, q in signals.items()}
            return carry, (g_stats, s_stats)

        per_chunk = jax.lax.scan(one_chunk, None, (keys, mask))[1]
        return jax.tree.map(_pool, per_chunk, is_leaf=is_stats)

    return run


def _estimate_fn(objective: Objective, programs: tuple, rebuild: Callable,
                 with_signals: bool) -> Callable:
    """One gradient estimate of the loss and the learning signals, for one key.

    The signals come from ``metrics["learning_signals"]``: the objective records them
    (``record_signals = True``, set here on a shallow copy).
    """
    recording = copy.copy(objective)
    recording.record_signals = with_signals

    def estimate(key, params, state, arrays):
        args, kwargs = rebuild(arrays)

        def loss(p):
            return recording.loss_with_state(key, p, state, *programs, *args, **kwargs)

        grads, (_, metrics) = jax.grad(loss, has_aux=True)(params)
        if not with_signals:
            return grads, {}
        return grads, jax.tree.map(jax.lax.stop_gradient, dict(metrics["learning_signals"]))

    return estimate


# --- comparing estimators ------------------------------------------------------------------

#: the criteria of :func:`compare_estimators`: what each minimises
CRITERIA = {"work": "variance x time per step", "variance": "variance"}


@dataclasses.dataclass(frozen=True)
class CandidateMeasurement:
    """One candidate estimator at one site, measured by :func:`compare_estimators`.

    Attributes:
        site: the site whose estimator was varied.
        estimator: the candidate (an estimator instance).
        variance: the total variance of one gradient estimate of the loss, ``sum_i
            Var[g_i]`` over every element ``i`` of the program's params (the trace of the
            gradient's covariance; estimator params such as ``"<site>$alpha"`` excluded).
        variance_se: its standard error, from the spread of the total variance between
            ``num_groups`` independent groups of samples (batch means).
        site_variance: the same sum over the params upstream of the site only (those its
            log-density depends on, e.g. an encoder's); ``nan`` where they could not be found.
        time_per_step: seconds per jitted gradient step (loss, gradient and estimator-state
            update), the median of ``timing_steps`` calls after compilation; ``nan`` when not
            timed (``criterion="variance"``).
        refused: why the estimator cannot serve the site (the estimator's error), or ``None``;
            the other fields are then ``nan``.
    """

    site: str
    estimator: Any
    variance: float
    variance_se: float
    site_variance: float
    time_per_step: float
    refused: str | None = None

    @property
    def work(self) -> float:
        """``variance * time_per_step``: the work-normalised variance (the variance of an
        estimator given one second of compute, times one second)."""
        return self.variance * self.time_per_step


@dataclasses.dataclass(frozen=True)
class EstimatorComparison:
    """What :func:`compare_estimators` returns.

    Attributes:
        measurements: one :class:`CandidateMeasurement` per site and candidate, in the order
            given.
        assignment: the recommended estimator per site, ``{site: estimator}``, ready for
            ``sg.handlers.assign_estimators(guide, comparison.assignment)``.
        criterion: ``"work"`` (the recommendation minimises variance x time per step) or
            ``"variance"``.
        variance_of: ``"total"`` (the criterion uses :attr:`CandidateMeasurement.variance`)
            or ``"site"`` (:attr:`CandidateMeasurement.site_variance`).
        site_params: per site, the params upstream of it (those ``site_variance`` sums over).
        num_samples: gradient estimates per candidate.
        objective: a description of the objective, e.g. ``"ELBO(num_particles=2)"``.
    """

    measurements: tuple[CandidateMeasurement, ...]
    assignment: dict[str, Any]
    criterion: str
    variance_of: str
    site_params: dict[str, tuple[str, ...]]
    num_samples: int
    objective: str

    def score(self, m: CandidateMeasurement) -> float:
        """The criterion's value for ``m`` (lower is better; ``inf`` if refused)."""
        return _score(m, self.criterion, self.variance_of)

    def recommend(self, criterion: str | None = None, variance_of: str | None = None
                  ) -> dict[str, Any]:
        """The best candidate per site under another criterion (default: this comparison's),
        from the same measurements; ``"work"`` needs them timed (``criterion="work"`` in
        :func:`compare_estimators`)."""
        criterion = self.criterion if criterion is None else criterion
        variance_of = self.variance_of if variance_of is None else variance_of
        _check_criterion(criterion, variance_of)
        if criterion == "work" and not any(np.isfinite(m.time_per_step)
                                           for m in self.measurements):
            raise ValueError("the candidates were not timed: call compare_estimators with "
                             "criterion='work' to rank them by variance x time")
        return _recommend(self.measurements, criterion, variance_of)

    def for_site(self, site: str) -> tuple[CandidateMeasurement, ...]:
        """The measurements of ``site``'s candidates."""
        return tuple(m for m in self.measurements if m.site == site)

    def summary(self) -> str:
        """A table: per site and candidate the total variance of the gradient (± its standard
        error), the variance of the site's upstream params, the time per step, variance x
        time, and the criterion relative to the site's best; ``*`` marks the recommendation.
        """
        timed = any(np.isfinite(m.time_per_step) for m in self.measurements)
        header = ("site", "estimator", "variance", "± se", "site var", "ms/step",
                  "var x s", "rel", "")
        rows: list[tuple[str, ...]] = [header]
        refused: list[str] = []
        for site in dict.fromkeys(m.site for m in self.measurements):
            ms = self.for_site(site)
            best = min(self.score(m) for m in ms)
            for m in ms:
                name = repr(m.estimator)
                if m.refused is not None:
                    rows.append((site, name, "refused", "", "", "", "", "", ""))
                    refused.append(f"  {site} {name}: {m.refused}")
                    continue
                score = self.score(m)
                rel = score / best if best > 0 else (1.0 if score == best else float("inf"))
                chosen = "*" if m.estimator is self.assignment.get(site) else ""
                rows.append((site, name, f"{m.variance:.4g}", f"{m.variance_se:.2g}",
                             f"{m.site_variance:.4g}",
                             f"{1e3 * m.time_per_step:.3g}" if timed else "-",
                             f"{m.work:.4g}" if timed else "-", f"{rel:.3g}", chosen))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"estimator comparison: {self.objective}, {self.num_samples} gradient "
                 "samples per candidate",
                 f"* minimises {CRITERIA[self.criterion]}"
                 + (" (the site's params)" if self.variance_of == "site" else "")
                 + "; rel: relative to the site's best"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(r, widths, strict=True)))
                         .rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths).rstrip())
        if refused:
            lines.append("refused:")
            lines.extend(refused)
        return "\n".join(lines)


def _score(m: CandidateMeasurement, criterion: str, variance_of: str) -> float:
    if m.refused is not None:
        return float("inf")
    v = m.variance if variance_of == "total" else m.site_variance
    return v * m.time_per_step if criterion == "work" else v


def _recommend(measurements: Any, criterion: str, variance_of: str) -> dict[str, Any]:
    """Per site, the candidate of least :func:`_score` (the first of equals)."""
    chosen: dict[str, Any] = {}
    for site in dict.fromkeys(m.site for m in measurements):
        ms = [m for m in measurements if m.site == site and m.refused is None]
        if not ms:
            raise SiteError(site, "has no candidate that can serve it in compare_estimators: "
                            + "; ".join(m.refused or "" for m in measurements
                                        if m.site == site))
        chosen[site] = min(ms, key=lambda m: _score(m, criterion, variance_of)).estimator
    return chosen


def _check_criterion(criterion: str, variance_of: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
    if variance_of not in ("total", "site"):
        raise ValueError(f"variance_of must be 'total' or 'site', got {variance_of!r}")


def compare_estimators(objective: Objective, params: dict, rng_key: Any,
                       *programs_and_args: Any, candidates: dict[str, Any],
                       assignment: dict[str, Any] | None = None, state: dict | None = None,
                       criterion: str = "work", variance_of: str = "total",
                       num_samples: int = 1000, num_groups: int = 10,
                       warmup_steps: int = 0, warmup_learning_rate: float = 1e-2,
                       timing_steps: int = 50, skip_refused: bool = False,
                       **kwargs: Any) -> EstimatorComparison:
    """Measure each candidate estimator of each site at the current params; recommend one per
    site.

    For every site ``w`` in ``candidates`` and every candidate estimator ``e`` of it, the
    site's estimator is set to ``e`` (``sg.handlers.assign_estimators`` on the sampling
    program: the guide, or the single program) while every other site keeps its own (the
    one written at its ``sg.sample``, the objective's default, or ``assignment[site]``), and

    - the **variance** of one gradient estimate ``g`` of the loss is estimated from
      ``num_samples`` independent estimates (one jitted step per key, compiled once per
      candidate, moments accumulated as in :func:`gradient_variance`, memory: one gradient)
      as the trace of its covariance over the program's params,
      ``V(e) = sum_i Var[g_i]`` (estimator params ``"<site>$..."`` excluded), with a standard
      error from ``num_groups`` groups of samples (batch means); ``site_variance`` is the
      same sum over the params upstream of ``w`` (those that ``log q(w)`` depends on by data
      flow, e.g. an encoder's), whose gradient carries ``w``'s score term;
    - the **time per step** ``T(e)`` is the median time of ``timing_steps`` calls of that
      jitted step (loss, gradient, estimator-state update; already compiled), taken after
      all the variance measurements, round-robin over the candidates of every site, five
      calls at a time, so that a load that drifts affects them alike. Timings are
      indicative: they depend on the machine, its load and the backend, and for small
      programs mostly measure dispatch overhead.

    The recommendation per site minimises, over its candidates,

        criterion="work":      V(e) * T(e)     (work-normalised variance)
        criterion="variance":  V(e)            (nothing is timed)

    ``V * T`` is the variance of the average of the gradient estimates one can compute in a
    fixed time (``1 / T`` of them per second, each of variance ``V``): the efficiency of a
    simulation estimator (Glynn & Whitt, "The asymptotic efficiency of simulation
    estimators", Operations Research 1992), so an estimator that halves the variance at twice
    the cost per step is no better. ``variance_of="site"`` uses ``site_variance`` instead of
    ``V``. Selecting among estimators, or combining them, by their measured variance is what
    Geffner & Domke, "Using large ensembles of control variates for variational inference"
    (NeurIPS 2018) do for control variates.

    Every candidate sees the same keys (common random numbers), so candidates that draw
    their samples alike (the score function, RLOO, DCV) are compared on the same draws. The
    varied site's estimator state (a moving average, ...) starts from its initial value, and
    its estimator params (``"<site>$alpha"``, a neural baseline) from ``params`` where they
    are there with the same shapes, else from their initial values: a learned control variate
    at its initial value is measured untrained. ``warmup_steps > 0`` first runs that many
    steps at the fixed ``params`` that update the site's estimator state and train its
    estimator params alone (Adam, ``warmup_learning_rate``), as training would. ``state`` is
    the estimator state of the other sites (e.g. ``SVIState.estimator_state``; ``None``:
    their initial state).

    Args:
        objective: an objective instance (``sg.ELBO(num_particles=2)``, ...); its number of
            particles is every candidate's (to compare K, call once per objective).
        params: the params at which to measure, unconstrained as ``sg.init_params`` returns
            them (e.g. an ``SVIState``'s ``params``).
        rng_key: a key or an int seed.
        *programs_and_args: ``model, guide, *args`` for guided objectives, ``fn, *args`` for
            ``sg.Expectation``, as for the objective's loss.
        candidates: ``{site: [estimator, ...]}``: the latent sites of the sampling program
            and the estimators to try at each.
        assignment: estimators of other sites (``{site: estimator}``), kept fixed.
        state: the other sites' estimator state.
        criterion: ``"work"`` or ``"variance"``.
        variance_of: ``"total"`` or ``"site"``: which variance the criterion uses.
        num_samples: gradient estimates per candidate (rounded down to a multiple of
            ``num_groups``).
        num_groups: groups for the standard error (at least 2).
        warmup_steps: estimator-only training steps before measuring (0: none).
        warmup_learning_rate: Adam's learning rate for them.
        timing_steps: timed steps per candidate (``criterion="work"``).
        skip_refused: record a candidate that cannot serve its site as refused (its reason in
            :meth:`EstimatorComparison.summary`) instead of raising.
        **kwargs: keyword arguments of the programs.

    Returns:
        an :class:`EstimatorComparison`: ``.summary()`` is the table,
        ``.assignment`` the recommended ``{site: estimator}``.

    Raises:
        SiteError: a site of ``candidates`` that is not a latent site of the sampling
            program, or (unless ``skip_refused``) a candidate that cannot serve its site
            (e.g. DisARM on a Normal site, or with an odd number of particles): the
            estimator's own error, naming the site and the candidate.
        ValueError, TypeError: malformed arguments.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def program():
        ...     logits = sg.param("logits", jnp.array([0.0, 0.5, -1.0]))
        ...     with sg.plate("n", 3):
        ...         z = sg.sample("z", dist.Bernoulli(logits=logits))
        ...         sg.factor("f", 3.0 + 2.0 * z)
        >>> params = sg.init_params(0, program)
        >>> result = sg.diagnostics.compare_estimators(
        ...     sg.Expectation(num_particles=2), params, 0, program,
        ...     candidates={"z": [sg.ScoreFunction(), sg.RLOO(), sg.DisARM()]},
        ...     criterion="variance", num_samples=1000)
        >>> result.assignment
        {'z': DisARM()}
        >>> print(result.summary())  # doctest: +ELLIPSIS
        estimator comparison: Expectation(num_particles=2), 1000 gradient samples per candidate
        * minimises variance; rel: relative to the site's best
        site  estimator                     variance    ± se  site var  ms/step  var x s   rel
        ----  ----------------------------  --------  ------  --------  -------  -------  ----  -
        z     ScoreFunction(baseline=None)     5.6...
        z     RLOO()                          0.73...
        z     DisARM()                        0.20...     1  *
    """
    programs, args = _split_programs(objective, programs_and_args, "compare_estimators")
    _check_comparison_arguments(candidates, assignment, criterion, variance_of, num_samples,
                                num_groups, warmup_steps, timing_steps)
    key = handlers.as_prng_key(rng_key)
    init_key, warmup_key, variance_key = jax.random.split(key, 3)
    assignment = dict(assignment or {})
    arrays, rebuild = split_static((args, kwargs))
    described = f"{type(objective).__name__}(num_particles={objective.num_particles})"
    measured = [n for n in params if "$" not in n]  # the program's params
    _check_sites(objective, programs, params, init_key, args, kwargs, candidates, assignment)

    measurements: list[CandidateMeasurement] = []
    steps: list[tuple[int, Callable[[int], Any]]] = []  # (measurement, its jitted step)
    site_params: dict[str, tuple[str, ...]] = {}
    for site, ests in candidates.items():
        upstream: tuple[str, ...] | None = None
        traced = False
        for est in ests:
            progs = _with_estimators(objective, programs, {**assignment, site: est})
            try:
                p, s = _candidate_params_and_state(objective, progs, params, state, site,
                                                   init_key, args, kwargs, warmup_steps > 0)
                if not traced:
                    upstream = _upstream_params(objective, programs, assignment, site, p,
                                                init_key, measured, args, kwargs)
                    traced = True
                    if upstream is not None:
                        site_params[site] = upstream
                    elif variance_of == "site":
                        raise ValueError(f"variance_of='site': the params upstream of site "
                                         f"{site!r} could not be found; use 'total'")
                learns = (jax.tree.leaves(s.get(site))  # the site's state or own params
                          or any(n.startswith(f"{site}$") for n in p))
                if warmup_steps and learns:
                    p, s = _warmup(objective, progs, rebuild, arrays, p, s, site,
                                   warmup_steps, warmup_learning_rate, warmup_key)
                total, se, at_site, run_step = _measure(
                    objective, progs, rebuild, arrays, p, s, variance_key, num_samples,
                    num_groups, measured, upstream)
            except SiteError as e:
                if e.site != site:
                    raise
                if not skip_refused:
                    raise SiteError(site, f"cannot use the candidate {est!r} under "
                                    f"{described} (compare_estimators): {e}") from e
                nan = float("nan")
                measurements.append(CandidateMeasurement(site, est, nan, nan, nan, nan, str(e)))
                continue
            measurements.append(CandidateMeasurement(site, est, total, se, at_site,
                                                     float("nan")))
            steps.append((len(measurements) - 1, run_step))

    if criterion == "work":  # timed round-robin: a drifting load affects every candidate
        seconds = _interleaved_times([f for _, f in steps], timing_steps)
        for (i, _), t in zip(steps, seconds, strict=True):
            measurements[i] = dataclasses.replace(measurements[i], time_per_step=t)
    chosen = _recommend(measurements, criterion, variance_of)
    group = num_samples // num_groups
    return EstimatorComparison(tuple(measurements), chosen, criterion, variance_of,
                               site_params, group * num_groups, described)


def _check_comparison_arguments(candidates: Any, assignment: Any, criterion: str,
                                variance_of: str, num_samples: int, num_groups: int,
                                warmup_steps: int, timing_steps: int) -> None:
    if not isinstance(candidates, dict) or not candidates:
        raise TypeError("candidates must be a non-empty dict {site: [estimator, ...]}, got "
                        f"{candidates!r}")
    for site, ests in candidates.items():
        if not isinstance(site, str):
            raise TypeError(f"candidates' keys must be site names, got {site!r}")
        if not isinstance(ests, (list, tuple)) or not ests:
            raise TypeError(f"candidates[{site!r}] must be a non-empty list of estimators, "
                            f"got {ests!r}")
        for est in ests:
            check_estimator(site, est)
            if est is None:
                raise SiteError(site, "was given the candidate None in compare_estimators; "
                                "give estimator instances, e.g. sg.RLOO()")
    if assignment is not None and not isinstance(assignment, dict):
        raise TypeError(f"assignment must be a dict {{site: estimator}}, got {assignment!r}")
    _check_criterion(criterion, variance_of)
    for name, value, least in (("num_groups", num_groups, 2),
                               ("warmup_steps", warmup_steps, 0),
                               ("timing_steps", timing_steps, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if not isinstance(num_samples, int) or num_samples < 2 * num_groups:
        raise ValueError(f"num_samples must be an int >= 2 * num_groups = {2 * num_groups}, "
                         f"got {num_samples!r}")


def _with_estimators(objective: Objective, programs: tuple, estimators: dict) -> tuple:
    """The programs with ``estimators`` assigned in the sampling program (the last one: the
    guide, or the single program)."""
    return (*programs[:-1], handlers.assign_estimators(programs[-1], estimators))


def _check_sites(objective: Objective, programs: tuple, params: dict, key: jax.Array,
                 args: tuple, kwargs: dict, candidates: dict, assignment: dict) -> None:
    """Every site of ``candidates`` and ``assignment`` is a latent site of the sampling
    program (a :class:`SiteError` naming it, and listing the sites, else)."""
    role = tracegraph.sampling_role(objective.kind)
    structure = objective.structure(key, params, *programs, *args, **kwargs)
    latent = [n for n, node in structure.scg.nodes.items() if node.role == role]
    for site in [*candidates, *assignment]:
        if site not in latent:
            raise SiteError(site, f"is not a latent site of the {role} (compare_estimators "
                            f"was given candidates for it); its latent sites are {latent}")


def _candidate_params_and_state(objective: Objective, programs: tuple, params: dict,
                                state: dict | None, site: str, key: jax.Array, args: tuple,
                                kwargs: dict, initial_state: bool) -> tuple[dict, dict]:
    """``params`` with the estimator params of the programs (the site's, ``"<site>$..."``: from
    ``params`` where they match in structure and shapes, else initial) and the estimator
    state (the site's initial, the others' from ``state`` where given; with
    ``initial_state``, every entry, else only those given)."""
    init = _estimator_params_at(key, programs, params, args, kwargs)
    out = {n: v for n, v in params.items() if not n.startswith(f"{site}$")}
    for n, v in init.items():
        if n.startswith(f"{site}$"):
            out[n] = params[n] if n in params and _same_shapes(params[n], v) else v
        elif n not in out:  # an estimator param of another site's assignment
            out[n] = v
    given = {n: v for n, v in (state or {}).items() if n != site}
    if not initial_state:  # missing entries start from their initial state anyway
        return out, given
    # objective.init_state without running the programs: the estimators of the traced graph
    role = tracegraph.sampling_role(objective.kind)
    nodes = objective.structure(key, out, *programs, *args, **kwargs).scg.nodes
    initial = {n: node.estimator.init_state() for n, node in nodes.items()
               if node.role == role and node.estimator.uses_signal}
    return out, {**initial, **{n: v for n, v in given.items() if n in initial}}


def _estimator_params_at(key: jax.Array, programs: tuple, params: dict, args: tuple,
                         kwargs: dict) -> dict[str, Any]:
    """The initial estimator params (``"<site>$<key>"``) of the programs, as
    ``sg.init_params(key, *programs, ...)`` would give them, without initialising the
    programs' own params (the programs run at ``params``)."""
    model, guide = programs if len(programs) == 2 else (programs[0], None)
    arrays, rebuild = split_static((args, kwargs))

    @jax.jit
    def run(key, params, arrays):
        a, kw = rebuild(arrays)
        _, traces = _param_messages(key, model, guide, params, a, kw)
        return _estimator_params(jax.random.fold_in(key, 2), traces)

    return run(key, {n: v for n, v in params.items() if "$" not in n}, arrays)


def _same_shapes(a: Any, b: Any) -> bool:
    shapes = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), t)
    try:
        return jax.tree.structure(a) == jax.tree.structure(b) and shapes(a) == shapes(b)
    except TypeError:
        return False


def _upstream_params(objective: Objective, programs: tuple, assignment: dict, site: str,
                     params: dict, key: jax.Array, measured: list[str], args: tuple,
                     kwargs: dict) -> tuple[str, ...] | None:
    """The params of ``measured`` that ``log q(site)`` depends on (its data flow, traced:
    :func:`scgjax.provenance.dependencies`; nothing runs): those upstream of the site.
    ``None`` if the objective cannot take the site's score (e.g. one that refuses the score
    function)."""
    progs = _with_estimators(objective, programs, {**assignment, site: ScoreFunction()})
    leaves, treedef = jax.tree.flatten({n: params[n] for n in measured})
    owner = [n for n in measured for _ in jax.tree.leaves(params[n])]

    def log_q(*leaves: Any) -> jax.Array:
        p = {**params, **jax.tree.unflatten(treedef, leaves)}
        return jnp.sum(objective.evaluate(key, p, *progs, *args, **kwargs).logq[site])

    try:
        deps = provenance.dependencies(log_q, *leaves)[0]
    except (SiteError, KeyError):
        return None
    return tuple(dict.fromkeys(owner[i] for i in sorted(deps)))


def _warmup(objective: Objective, programs: tuple, rebuild: Callable, arrays: list,
            params: dict, state: dict, site: str, steps: int, learning_rate: float,
            key: jax.Array) -> tuple[dict, dict]:
    """``steps`` steps at fixed program params that update the estimator state and train
    the site's estimator params (Adam), as :class:`scgjax.SVI` steps would."""
    own = sorted(n for n in params if n.startswith(f"{site}$"))
    optimiser = optax.adam(learning_rate)

    @jax.jit
    def run(params, state, keys, arrays):
        a, kw = rebuild(arrays)

        def step(carry, k):
            trained, s, opt_state = carry

            def loss(trained):
                return objective.loss_with_state(k, {**params, **trained}, s, *programs,
                                                 *a, **kw)

            grads, (new_s, _) = jax.grad(loss, has_aux=True)(trained)
            updates, opt_state = optimiser.update(grads, opt_state, trained)
            return (optax.apply_updates(trained, updates), new_s, opt_state), None

        trained = {n: params[n] for n in own}
        carry = (trained, state, optimiser.init(trained))
        trained, state, _ = jax.lax.scan(step, carry, keys)[0]
        return {**params, **trained}, state

    return run(params, state, jax.random.split(key, steps), arrays)


@jax.jit
def _accumulate(moments: _Moments, g: Any) -> _Moments:
    """Welford's update of per-element moments with one more sample ``g``."""
    n = moments.n + 1.0
    delta = jax.tree.map(lambda x, m: x - m, g, moments.mean)
    mean = jax.tree.map(lambda m, d: m + d / n, moments.mean, delta)
    m2 = jax.tree.map(lambda s, x, m, d: s + d * (x - m), moments.m2, g, mean, delta)
    return _Moments(n, mean, m2)


def _measure(objective: Objective, programs: tuple, rebuild: Callable, arrays: list,
             params: dict, state: dict, key: jax.Array, num_samples: int, num_groups: int,
             measured: list[str], upstream: tuple[str, ...] | None
             ) -> tuple[float, float, float, Callable[[int], Any]]:
    """``(total variance, its standard error, variance of the upstream params, step)`` from
    ``num_groups`` groups of ``num_samples // num_groups`` gradient estimates (the keys
    ``jax.random.split(key, n)`` in consecutive groups), one jitted step each (compiled
    once); ``step(i)`` runs that step again with the ``i``-th key (modulo ``n``), for
    timing."""

    @jax.jit
    def step(keys, i, params, state, arrays):
        a, kw = rebuild(arrays)
        loss = lambda p: objective.loss_with_state(keys[i], p, state, *programs, *a, **kw)
        grads, (new_state, _) = jax.grad(loss, has_aux=True)(params)
        return {n: grads[n] for n in measured}, new_state  # the step's work, state included

    group = num_samples // num_groups
    keys = jax.random.split(key, group * num_groups)
    zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32),
                         {n: params[n] for n in measured})
    per_group = []
    for b in range(num_groups):
        moments = _Moments(np.zeros((), np.float32), zeros, zeros)
        for i in range(b * group, (b + 1) * group):
            moments = _accumulate(moments, step(keys, i, params, state, arrays)[0])
        per_group.append(moments)

    # per group and element: n, mean, m2, in float64 on the host
    per_group = [(float(m.n), {n: [np.asarray(x, np.float64) for x in jax.tree.leaves(m.mean[n])]
                               for n in measured},
                  {n: [np.asarray(x, np.float64) for x in jax.tree.leaves(m.m2[n])]
                   for n in measured}) for m in per_group]

    def total(n: float, m2: dict, names: Any) -> float:
        return float(sum(np.sum(x) for name in names for x in m2[name]) / (n - 1.0))

    # pooled (Chan, Golub & LeVeque 1979, as _pool): m2 = sum_b m2_b + sum_b n_b (mean_b -
    # mean)^2 with mean = sum_b n_b mean_b / n
    n_all = sum(g[0] for g in per_group)
    pooled = {}
    for name in measured:
        pooled[name] = []
        for i in range(len(per_group[0][1][name])):
            mean = sum(g[0] * g[1][name][i] for g in per_group) / n_all
            pooled[name].append(sum(g[2][name][i] + g[0] * (g[1][name][i] - mean) ** 2
                                    for g in per_group))
    totals = np.array([total(g[0], g[2], measured) for g in per_group])
    se = float(totals.std(ddof=1) / np.sqrt(num_groups))
    at_site = float("nan") if upstream is None else total(n_all, pooled, upstream)
    run_step = lambda i: step(keys, i % len(keys), params, state, arrays)  # noqa: E731
    return total(n_all, pooled, measured), se, at_site, run_step


def _interleaved_times(steps: list[Callable[[int], Any]], num_steps: int, burst: int = 5
                       ) -> list[float]:
    """Median seconds per call of each (compiled) ``step(i)``: ``num_steps`` calls each, in
    rounds that run every step ``burst`` times in turn, one after the other."""
    times: list[list[float]] = [[] for _ in steps]
    for f in steps:  # warm: caches, allocations
        jax.block_until_ready(f(0))
    for r in range(-(-num_steps // burst)):
        for f, t in zip(steps, times, strict=True):
            for i in range(r * burst, min((r + 1) * burst, num_steps)):
                start = time.perf_counter()
                jax.block_until_ready(f(i))
                t.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


# --- non-finite values ---------------------------------------------------------------------

#: what each kind of :class:`NonFiniteQuantity` is called in a message
_KIND_PHRASES = {
    "param": "param '{name}'",
    "estimator state": "the estimator state of site '{name}'",
    "log-density": "the log-density of site '{name}' in the {role}",
    "factor": "factor '{name}'",
    "learning signal": "the learning signal of site '{name}'",
    "estimator term": "the estimator term of site '{name}' (its baseline or control variate)",
    "updated estimator state": "the updated estimator state of site '{name}'",
    "metric": "metric '{name}'",
    "loss": "the loss",
    "gradient": "the gradient of param '{name}'",
}


@dataclasses.dataclass(frozen=True)
class NonFiniteQuantity:
    """One NaN or infinite quantity found by :func:`explain_nonfinite`.

    Attributes:
        kind: ``"param"``, ``"estimator state"``, ``"log-density"``, ``"factor"``,
            ``"learning signal"``, ``"estimator term"``, ``"updated estimator state"``,
            ``"metric"``, ``"loss"`` or ``"gradient"``.
        name: the param's, site's, factor's or metric's name (``"loss"`` for the loss).
        role: ``"guide"``, ``"model"`` or ``"program"`` for log-densities and factors, else
            ``None``.
        value: its first non-finite value (``nan``, ``inf`` or ``-inf``).
        where: where that value is: ``"particle 0, data[3]"`` for per-particle arrays (the
            plates' indices), a pytree path and index for params and state, ``""`` for a
            scalar.
    """

    kind: str
    name: str
    role: str | None
    value: float
    where: str = ""

    @property
    def site(self) -> str | None:
        """The site or param it is about (``None`` for the loss and metrics)."""
        return None if self.kind in ("loss", "metric") else self.name

    def describe(self) -> str:
        """What it is, e.g. ``"the log-density of site 'z' in the guide"``."""
        return _KIND_PHRASES[self.kind].format(name=self.name, role=self.role)

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"{self.describe()} is {self.value}{where}"


@dataclasses.dataclass(frozen=True)
class NonFiniteExplanation:
    """What :func:`explain_nonfinite` returns: the non-finite quantities in the order they are
    computed, and the loss.

    Attributes:
        quantities: every :class:`NonFiniteQuantity` found, params first, then the
            estimator state given, each site's log-density (the guide's, then the model's),
            factors, the estimator terms, the updated state, metrics, the loss and its
            gradient.
        loss: the loss at those params and that key.
    """

    quantities: tuple[NonFiniteQuantity, ...]
    loss: float

    @property
    def first(self) -> NonFiniteQuantity | None:
        """The first non-finite quantity (the likeliest cause), or ``None``."""
        return self.quantities[0] if self.quantities else None

    @property
    def site(self) -> str | None:
        """The site or param of :attr:`first`, or ``None``."""
        return None if self.first is None else self.first.site

    def __str__(self) -> str:
        if not self.quantities:
            return f"every quantity is finite (loss {self.loss:.6g})"
        shown = 20
        lines = [f"{len(self.quantities)} non-finite quantities, in the order they are "
                 "computed (the first is the likeliest cause):"]
        lines += [f"  {q}" for q in self.quantities[:shown]]
        if len(self.quantities) > shown:
            lines.append(f"  ... and {len(self.quantities) - shown} more")
        return "\n".join(lines)


def _split_programs(objective: Objective, programs_and_args: tuple, what: str
                    ) -> tuple[tuple, tuple]:
    """``(programs, args)``: the objective's one or two programs, then the arguments."""
    if isinstance(objective, type) and issubclass(objective, Objective):
        raise TypeError(f"{what} needs an objective instance, e.g. {objective.__name__}(), not "
                        f"the class {objective.__name__}")
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an scgjax objective, got {objective!r}")
    n_programs = 1 if objective.kind == tracegraph.SINGLE else 2
    programs = tuple(programs_and_args[:n_programs])
    if len(programs) != n_programs or not all(callable(f) for f in programs):
        names = "fn" if n_programs == 1 else "model, guide"
        raise TypeError(f"{what} with {type(objective).__name__} expects {names} after "
                        "rng_key")
    return programs, tuple(programs_and_args[n_programs:])


def _first_bad(x: Any) -> tuple[float, tuple[int, ...]] | None:
    """``(value, index)`` of the first NaN or inf of a floating-point array, else ``None``."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return None
    a = np.asarray(x)
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return (float(a[index]) if np.isrealobj(a) else float("nan")), index


def _tree_findings(kind: str, name: str, tree: Any) -> list[NonFiniteQuantity]:
    """The first non-finite element of ``tree`` (a param's value, a state entry), if any."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        bad = _first_bad(leaf)
        if bad is not None:
            value, index = bad
            where = jax.tree_util.keystr(path)
            if index:
                where = f"{where} index {index}".strip()
            return [NonFiniteQuantity(kind, name, None, value, where)]
    return []


def _particle_where(index: tuple[int, ...], shape: tuple[int, ...],
                    plate_order: tuple[str, ...]) -> str:
    """``"particle 0, data[3]"`` for an index into a ``(K, *plates)`` array (no particle when
    ``K = 1``)."""
    if len(shape) != 1 + len(plate_order):
        return f"index {index}"
    parts = [f"particle {index[0]}"] if shape[0] > 1 else []  # none to tell apart if K = 1
    parts += [f"{p}[{i}]" for p, i, n in zip(plate_order, index[1:], shape[1:], strict=True)
              if n > 1]
    return ", ".join(parts)


def _array_findings(kind: str, name: str, role: str | None, x: Any,
                    plate_order: tuple[str, ...]) -> list[NonFiniteQuantity]:
    bad = _first_bad(x)
    if bad is None:
        return []
    value, index = bad
    return [NonFiniteQuantity(kind, name, role, value,
                              _particle_where(index, np.shape(x), plate_order))]


def explain_nonfinite(objective: Objective, params: dict, rng_key: Any,
                      *programs_and_args: Any, estimator_state: dict | None = None,
                      **kwargs: Any) -> NonFiniteExplanation:
    """Which quantities of one evaluation of ``objective`` are NaN or infinite, in order.

    Re-evaluates the objective at ``params`` with ``rng_key`` (one jitted evaluation, the
    same particles as ``objective.loss_with_state(rng_key, params, estimator_state, ...)``)
    and lists every non-finite quantity, in the order they are computed: the params (by
    name), the estimator state given, each site's log-density (``log q`` of the guide's
    sites, then ``log p`` of the model's, factors, in program order; for a single program its
    sampled sites' and then its costs), the estimators' learning signals ``Q_w`` and terms
    (baselines, control variates: the surrogate minus its costs' part), the updated
    estimator state, the objective's metrics, the loss and the gradient of the loss with
    respect to each param. The first one is the likeliest cause: a NaN that starts in a
    guide's log-density spreads to every cost, signal and gradient downstream.

    Call it like the objective's loss: ``explain_nonfinite(obj, params, key, model, guide,
    *args, **kwargs)`` for guided objectives (``sg.ELBO``), ``explain_nonfinite(obj, params,
    key, fn, *args, **kwargs)`` for single programs (``sg.Expectation``).
    :meth:`scgjax.SVI.run` calls it, with the key of the step whose loss was not finite
    (``jax.random.split(state.rng_key)[1]``), to name the cause in its error.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def program():
        ...     z = sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0))
        ...     sg.factor("penalty", jnp.log(z - 10.0))  # nan: z < 10
        >>> params = sg.init_params(0, program)
        >>> found = sg.diagnostics.explain_nonfinite(sg.Expectation(), params, 0, program)
        >>> found.first.kind, found.site
        ('factor', 'penalty')
        >>> print(found)
        3 non-finite quantities, in the order they are computed (the first is the likeliest cause):
          factor 'penalty' is nan
          metric 'objective' is nan
          the loss is nan
    """
    programs, args = _split_programs(objective, programs_and_args, "explain_nonfinite")
    key = handlers.as_prng_key(rng_key)
    arrays, rebuild = split_static((args, kwargs))
    recording = copy.copy(objective)
    recording.record_signals = True
    # objectives whose loss is the DiCE surrogate of Objective.assemble: their estimator
    # terms can be taken site by site
    dice = (type(objective).assemble is Objective.assemble
            and type(objective).loss_with_state is Objective.loss_with_state)
    found: dict[str, Any] = {}

    def evaluate(params, state, key, arrays):
        a, kw = rebuild(arrays)
        ev = recording.evaluate(key, params, *programs, *a, **kw)
        found["structure"] = ev.structure
        out: dict[str, Any] = {"costs": ev.costs, "logq": ev.logq, "signals": {},
                               "terms": {}, "costs_total": jnp.zeros(())}
        if dice:
            for w in ev.logq:  # the surrogate with only w's box: its costs' part + w's term
                signals: dict = {}
                surrogate, estimate, _ = dice_surrogate(
                    ev.structure, {w: ev.logq[w]}, ev.costs, ev.extras, ev.signal_grads,
                    params, state or {}, signals=signals, signal_at=ev.signal_at)
                out["signals"][w] = signals[w]
                out["terms"][w] = surrogate - estimate
                out["costs_total"] = estimate

        def loss_fn(p):
            return recording.loss_with_state(key, p, state, *programs, *a, **kw)

        (loss, (new_state, metrics)), grads = jax.value_and_grad(
            loss_fn, has_aux=True, allow_int=True)(params)
        metrics = dict(metrics)
        recorded = metrics.pop("learning_signals", {})
        if not dice:
            out["signals"] = dict(recorded)
        out.update(loss=loss, new_state=new_state, metrics=metrics, grads=grads)
        return out

    values = jax.device_get(jax.jit(evaluate)(params, estimator_state, key, arrays))
    structure = found["structure"]
    order = structure.plate_order
    q: list[NonFiniteQuantity] = []
    for name, value in params.items():
        q += _tree_findings("param", name, value)
    for name, value in (estimator_state or {}).items():
        q += _tree_findings("estimator state", name, value)
    role = tracegraph.sampling_role(structure.kind)
    if structure.kind == tracegraph.SINGLE:  # the program's own sampled sites first
        for name, logq in values["logq"].items():
            q += _array_findings("log-density", name, role, logq, order)
    costs = sorted(structure.costs, key=lambda c: c[1] != "guide")  # the guide's first
    for cid, r, site, sign in costs:
        kind = "factor" if cid == site else "log-density"
        q += _array_findings(kind, site, r, sign * values["costs"][cid], order)
    for name, signal in values["signals"].items():
        q += _array_findings("learning signal", name, None, signal, order)
    if _first_bad(values["costs_total"]) is None:  # else every term is nan with the costs
        for name, term in values["terms"].items():
            q += _array_findings("estimator term", name, None, term, order)
    for name, value in values["new_state"].items():
        q += _tree_findings("updated estimator state", name, value)
    for name, value in values["metrics"].items():
        q += _tree_findings("metric", name, value)
    q += _tree_findings("loss", "loss", values["loss"])
    for name, value in values["grads"].items():
        q += _tree_findings("gradient", name, value)
    return NonFiniteExplanation(tuple(q), float(values["loss"]))
