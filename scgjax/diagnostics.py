"""Diagnostics of gradient estimators: per-parameter variance and signal-to-noise ratio.

:func:`gradient_variance` draws many independent gradient estimates of an objective (one per
random key, vectorised with ``jax.vmap`` and accumulated chunk by chunk with ``jax.lax.scan``,
so memory stays bounded) and reports, for every parameter element, the mean, the variance and
the signal-to-noise ratio ``|mean| / std`` of the estimate (Roberts & Tedrake 2009; Rainforth
et al. 2018 use the SNR to compare estimators), together with the variance of every
score-estimated site's learning signal ``Q_w`` (the quantity a baseline tries to centre).

:func:`explain_nonfinite` re-evaluates an objective at given params and key and lists, in the
order they are computed, the quantities that are NaN or infinite (params, each site's
log-density, factors, estimator terms, estimator state, the loss, its gradient): what
:meth:`scgjax.SVI.run` reports when a step's loss stops being finite.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scgjax import handlers, tracegraph
from scgjax.objectives.base import Objective
from scgjax.objectives.surrogate import dice_surrogate
from scgjax.params import cached_build, split_static

__all__ = ["GradientVariance", "NonFiniteExplanation", "NonFiniteQuantity", "explain_nonfinite",
           "gradient_variance"]


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
                    params, state or {}, signals=signals)
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
