"""Draws from a trained program, and its data's log marginal likelihood by importance sampling.

:class:`Predictive` is NumPyro's ``Predictive`` (``numpyro/infer/util.py``) for scgjax programs:
the model run ``num_samples`` times, each run vectorised with ``jax.vmap`` (in chunks of
``batch_size`` under ``jax.lax.map`` when memory is short), with its latents drawn from the
prior (no guide), from the guide at trained params (posterior predictive) or taken from given
``posterior_samples``; sites whose ``obs`` the caller passes as ``None`` are drawn anew.

:func:`log_marginal_likelihood` is the importance-sampled estimate of ``log p(x)``
(Burda, Grosse & Salakhutdinov, ICLR 2016): with ``K`` guide particles
``z_k ~ q(z | x)`` and ``log w_k = log p(x, z_k) - log q(z_k | x)``,

    L_K = log (1/K) sum_k w_k,      E[L_K] <= log p(x),   L_K -> log p(x) as K -> infinity,

per element of the plates the bound factorises along (``sg.IWAE(K)``'s bound), for ``K`` in
the thousands: the particles go in chunks of ``C`` (``jax.lax.map``), chunk ``j`` gives
``sg.IWAE(C)``'s per-element bound ``L^(j)``, and ``L_K = logsumexp_j (L^(j) + log C_j) - log K``
combines them exactly (a remainder chunk included), so memory is that of ``C`` particles.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scgjax import handlers
from scgjax.errors import SiteError
from scgjax.layout import reduce_to
from scgjax.objectives.bounds import bound_layout, bound_plates, importance_log_weights
from scgjax.objectives.checks import check_num_particles
from scgjax.objectives.iwae import IWAE
from scgjax.params import cached_build, split_static
from scgjax.primitives import Message, Messenger

__all__ = ["Predictive", "log_marginal_likelihood"]


def _positive_int(what: str, value: Any, allow_none: bool = True) -> int | None:
    """``value`` as a Python int >= 1 (``None`` passes when allowed); a ``TypeError`` else."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise TypeError(f"{what} must be {'None or ' if allow_none else ''}an int >= 1, got "
                        f"{value!r}")
    return int(value)


def _map(single: Callable, key: jax.Array, samples: dict, n: int,
         batch_size: int | None) -> dict:
    """``single(key_i, samples_i)`` for ``i < n`` with ``key_i = split(key, n)[i]`` (the key
    itself when ``n == 1``, as NumPyro does): one ``vmap``, or ``lax.map`` over chunks of
    ``batch_size`` with a ``vmap`` inside each (NumPyro's ``soft_vmap``: the last chunk is
    padded with repeated inputs, whose outputs are dropped, so one body is compiled)."""
    keys = key[None] if n == 1 else jax.random.split(key, n)
    if batch_size is None or batch_size >= n:
        return jax.vmap(single)(keys, samples)
    chunks = -(-n // batch_size)
    index = (jnp.arange(chunks * batch_size) % n).reshape(chunks, batch_size)
    out = jax.lax.map(lambda i: jax.vmap(single)(*jax.tree.map(lambda x: x[i],
                                                               (keys, samples))), index)
    return jax.tree.map(lambda y: y.reshape(chunks * batch_size, *y.shape[2:])[:n], out)


class Predictive:
    """Samples of a model's sites: prior predictive, posterior predictive from a guide, or the
    model run at given posterior samples (NumPyro's ``Predictive``, the same semantics).

    ``Predictive(model, guide, params, num_samples)(rng_key, *args, **kwargs)`` returns a dict
    from site names to arrays with a leading axis of ``num_samples`` (more axes with
    ``batch_ndims``):

    * no guide, no ``posterior_samples``: ``num_samples`` runs of ``model`` at ``params``,
      every latent drawn from the prior;
    * ``guide``: for each sample, the guide runs at ``params`` and the model runs with its
      latent sites set to the guide's values (the guide's sub-sampled plates too, so the model
      sees the guide's elements); ``z ~ q(z | x)``, then the rest ``~ p(. | z)``;
    * ``posterior_samples`` (a dict of arrays with leading sample axes, e.g. from MCMC or an
      earlier ``Predictive``): the model runs once per sample with those sites set to them.

    Observed sites: as in NumPyro, a site is drawn anew when its ``obs`` is ``None``, so a model
    written ``sg.sample("y", ..., obs=y)`` predicts ``y`` when called with ``y=None`` (the model
    must accept it); an ``obs`` that is given stays observed and is returned as it is (repeated
    along the sample axis). ``params`` are scgjax's *unconstrained* values, as
    ``sg.init_params`` and ``sg.SVI`` hold them (``None``: every param at its initial value);
    a param the programs declare and ``params`` lacks is an error. ``sg.scan`` sites come with
    their time axis, ``(num_samples, T, ...)``, and a posterior sample of one needs it too.

    Returned sites (``return_sites=None``, NumPyro's rule): every sample site of the model not
    in the posterior samples (for a guide: not sampled by the guide), observed sites and
    factors included, and every deterministic site. A list names the sites to return (any
    site of the model: latent, observed, deterministic, param, plate); a name that is no site
    of the model is a :class:`~scgjax.errors.SiteError` naming it (NumPyro drops it silently).

    The samples are one ``jax.vmap`` over ``num_samples`` runs; ``batch_size=B`` runs them in
    chunks of ``B`` (``jax.lax.map`` over chunks, a ``vmap`` inside each; the last chunk padded,
    as NumPyro's ``soft_vmap`` does) with the same per-sample keys, hence the same draws as
    one ``vmap`` with a ``B``-th of the memory; ``parallel=False`` is ``batch_size=1``
    (NumPyro's default, one run at a time; scgjax's default is ``parallel=True``). Sample ``i``
    uses ``jax.random.split(key, num_samples)[i]`` (with a guide, ``key`` is first split into
    the model's and the guide's, as in NumPyro). The call is jitted, compiled once per model,
    guide, ``num_samples``, ``batch_size``, ``return_sites``, names of the posterior samples
    and non-array arguments (``params`` and the samples are arrays: new values do not
    recompile).

    Differences from NumPyro: the second positional argument is the guide (NumPyro's is
    ``posterior_samples``; give it by keyword); ``params`` are unconstrained; a posterior
    sample of a site that the model observes (its ``obs`` given) is ignored with a warning, as
    is one of a name that is no site of the model (NumPyro substitutes the first and ignores
    the second silently); deterministic sites in ``posterior_samples`` are recomputed (NumPyro's
    default, ``condition_deterministic=False``; not configurable). ``batch_ndims`` counts the
    leading sample axes of ``posterior_samples`` (``(chains, draws, ...)``: 2); batched params
    (NumPyro's ``batch_ndims=1`` with a guide) and ``infer_discrete=True`` are not supported:
    for the latter, run ``sg.infer_discrete`` on the model.

    Args:
        model: the model, a function of ``(*args, **kwargs)``.
        guide: the guide, or ``None``.
        params: the programs' unconstrained params (``sg.init_params``, an ``sg.SVI`` state's
            ``params``; not ``svi.get_params(state)``, which is constrained), or ``None``.
        num_samples: the number of samples (with ``posterior_samples``: their number, which
            it overrides with a warning if they differ).
        return_sites: the names of the sites to return, or ``None`` (see above).
        posterior_samples: a dict from site names to arrays with ``batch_ndims`` leading
            sample axes, or ``None``. Not together with a guide.
        batch_size: the chunk size of the vectorised runs, or ``None`` (all at once).
        parallel: ``False`` runs one sample at a time (``batch_size=1``).
        batch_ndims: the number of leading sample axes of ``posterior_samples`` (default 1).
        infer_discrete: must be ``False`` (see above).

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def model(y=None):
        ...     mu = sg.sample("mu", dist.Normal(0.0, 1.0))
        ...     with sg.plate("data", 3):
        ...         sg.sample("y", dist.Normal(mu, 0.5), obs=y)
        >>> def guide(y=None):
        ...     sg.sample("mu", dist.Normal(sg.param("m", 1.0), 0.1))
        >>> params = sg.init_params(0, model, guide, jnp.zeros(3))
        >>> draws = sg.Predictive(model, guide, params, num_samples=1000)(jax.random.key(1))
        >>> sorted(draws), draws["y"].shape
        (['y'], (1000, 3))
        >>> bool(abs(draws["y"].mean() - 1.0) < 0.1)  # y ~ N(mu, 0.5), mu ~ q = N(1, 0.1)
        True
        >>> prior = sg.Predictive(model, num_samples=4, return_sites=["mu"])(jax.random.key(2))
        >>> prior["mu"].shape
        (4,)
    """

    def __init__(self, model: Callable, guide: Callable | None = None,
                 params: Mapping | None = None, num_samples: int | None = None,
                 return_sites: Any = None, *, posterior_samples: Mapping | None = None,
                 batch_size: int | None = None, parallel: bool = True,
                 batch_ndims: int | None = None, infer_discrete: bool = False):
        if not callable(model):
            raise TypeError(f"Predictive needs the model, a function; got "
                            f"{type(model).__name__}")
        if guide is not None and not callable(guide):
            hint = ""
            if isinstance(guide, Mapping):
                hint = ("; posterior samples go by keyword, posterior_samples={...} (NumPyro's "
                        "second argument is posterior_samples, scgjax's is the guide)")
            raise TypeError(f"Predictive's guide must be a function or None, got "
                            f"{type(guide).__name__}{hint}")
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict from param names to unconstrained values "
                            f"(as sg.init_params returns), got {type(params).__name__}")
        if posterior_samples is not None and not isinstance(posterior_samples, Mapping):
            raise TypeError(f"posterior_samples must be a dict from site names to arrays, got "
                            f"{type(posterior_samples).__name__}")
        if posterior_samples is not None and guide is not None:
            raise ValueError("Only one of guide or posterior_samples can be provided, not both")
        if infer_discrete:
            raise NotImplementedError("Predictive(infer_discrete=True) is not supported: wrap "
                                      "the model in sg.infer_discrete(model, rng_key=...) and "
                                      "give Predictive the posterior samples of the rest")
        num_samples = _positive_int("num_samples", num_samples)
        batch_size = _positive_int("batch_size", batch_size)
        if batch_ndims is not None and (isinstance(batch_ndims, bool) or not isinstance(
                batch_ndims, (int, np.integer)) or batch_ndims < 0):
            raise TypeError(f"batch_ndims must be None or an int >= 0, got {batch_ndims!r}")
        if return_sites is not None:
            if isinstance(return_sites, str):
                raise TypeError(f"return_sites is a list of site names, got the string "
                                f"{return_sites!r}; write return_sites=[{return_sites!r}]")
            if not isinstance(return_sites, (list, tuple, set, frozenset)) or not all(
                    isinstance(s, str) for s in return_sites):
                raise TypeError(f"return_sites must be a list of site names (str), got "
                                f"{return_sites!r}")
            return_sites = tuple(dict.fromkeys(return_sites))

        if posterior_samples is not None:
            b = 1 if batch_ndims is None else int(batch_ndims)
            batch_shape = _sample_shape(posterior_samples, b)
            if batch_shape is not None:
                size = math.prod(batch_shape)
                if num_samples is not None and num_samples != size:
                    handlers.warn_user(f"the posterior samples hold {size} samples, not "
                                       f"num_samples={num_samples}: Predictive uses {size}")
                num_samples = size
        else:
            b = 0 if guide is not None else 1
            if batch_ndims is not None and int(batch_ndims) != b and guide is not None:
                raise NotImplementedError(
                    f"Predictive with a guide and batch_ndims={batch_ndims}: batched params "
                    "are not supported (batch_ndims applies to posterior_samples)")
            b = b if batch_ndims is None else int(batch_ndims)
            batch_shape = None
        if num_samples is None:
            raise ValueError("Either posterior_samples or num_samples must be specified" if
                             posterior_samples is None else
                             "No sample sites in posterior samples to infer num_samples")
        if batch_shape is None:
            batch_shape = (1,) * (b - 1) + (num_samples,)

        self.model = model
        self.guide = guide
        self.params = params
        self.num_samples = num_samples
        self.return_sites = return_sites
        self.posterior_samples = {} if posterior_samples is None else dict(posterior_samples)
        self.batch_size = 1 if not parallel else batch_size
        self.batch_ndims = b
        self._batch_shape = tuple(batch_shape)

    def __repr__(self) -> str:
        source = ("guide" if self.guide is not None else
                  "posterior_samples" if self.posterior_samples else "prior")
        chunk = "" if self.batch_size is None else f", batch_size={self.batch_size}"
        return f"Predictive({source}, num_samples={self.num_samples}{chunk})"

    def __call__(self, rng_key: Any, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        """``{site: samples}``, each with the leading sample axes (see the class)."""
        key = handlers.as_prng_key(rng_key)
        arrays, rebuild = split_static((args, kwargs))
        config = (self.model, self.guide, self.num_samples, self.batch_size, self.return_sites,
                  frozenset(self.posterior_samples))
        # one compiled function per configuration and non-array arguments, shared by every
        # Predictive built alike (a Predictive is often made afresh for each call)
        run = cached_build(("Predictive", *config, rebuild.signature),
                           lambda: jax.jit(_build_predictive(*config, rebuild)))
        samples = jax.tree.map(
            lambda v: jnp.reshape(v, (self.num_samples, *jnp.shape(v)[self.batch_ndims:])),
            self.posterior_samples)
        out = run(key, self.params, samples, arrays)
        return jax.tree.map(lambda v: jnp.reshape(v, self._batch_shape + v.shape[1:]), out)


def _build_predictive(model: Callable, guide: Callable | None, n: int, chunk: int | None,
                      return_sites: tuple | None, given: frozenset, rebuild: Callable
                      ) -> Callable:
    """``run(key, params, samples, arrays)`` of :class:`Predictive` (to be jitted)."""

    def run(key: jax.Array, params: Mapping | None, samples: dict, arrays: list) -> dict:
        args, kwargs = rebuild(arrays)
        if guide is not None:
            key, guide_key = jax.random.split(key)
            samples = _map(lambda k, _: _guide_values(guide, k, params, args, kwargs),
                           guide_key, {}, n, chunk)

        def one(k: jax.Array, sample: dict) -> dict:
            fn = model if params is None else handlers.substitute_unconstrained(model, params)
            fn = handlers.substitute(fn, substitute_fn=lambda msg: sample.get(msg["name"]))
            tr = handlers.trace(handlers.seed(fn, k)).get_trace(*args, **kwargs)
            if given:
                _check_given(given, tr)
            sites = _chosen_sites(tr, sample, return_sites)
            return {name: tr[name]["value"] for name in sites}

        return _map(one, key, samples, n, chunk)

    return run


def _sample_shape(samples: Mapping, batch_ndims: int) -> tuple[int, ...] | None:
    """The leading ``batch_ndims`` axes shared by every posterior sample (``None`` for no
    samples); a :class:`~scgjax.errors.SiteError` naming the first site that differs."""
    shape = first = None
    for name, value in samples.items():
        if not isinstance(name, str):
            raise TypeError(f"the keys of posterior_samples must be site names (str), got "
                            f"{name!r}")
        for leaf in jax.tree.leaves(value):
            lead = tuple(np.shape(leaf))
            if len(lead) < batch_ndims:
                raise SiteError(name, f"has posterior samples of shape {lead}, with fewer "
                                f"than batch_ndims={batch_ndims} leading sample axes")
            lead = lead[:batch_ndims]
            if shape is None:
                shape, first = lead, name
            elif lead != shape:
                raise SiteError(name, f"has posterior samples with leading (sample) shape "
                                f"{lead}, but site '{first}' has {shape}: every posterior "
                                f"sample needs the same {batch_ndims} leading sample axes")
    return shape


def _guide_values(guide: Callable, key: jax.Array, params: Mapping | None, args: tuple,
                  kwargs: dict) -> dict:
    """One run of the guide: the values of its latent sites and of its sub-sampled plates
    (the model then sees the same elements)."""
    tr = handlers.trace_program(guide, key, params, *args, **kwargs)
    out = {}
    for name, msg in tr.items():
        if msg["type"] == "sample" and not msg["is_observed"]:
            out[name] = msg["value"]
        elif msg["type"] == "plate" and msg["args"][1] not in (None, msg["args"][0]):
            out[name] = msg["value"]
    return out


def _check_given(given: set, tr: dict) -> None:
    """Warn about the posterior samples the model cannot use: names that are no site of it,
    or sites it observes (their ``obs`` given)."""
    for name in sorted(given):
        msg = tr.get(name)
        if msg is None:
            close = handlers.closest_name(name, [n for n, m in tr.items()
                                                 if m["type"] != "plate"])
            handlers.warn_user(f"site '{name}' is in posterior_samples but is not a site of the "
                               "model" + (f" (did you mean '{close}'?)" if close else "")
                               + ": its samples are ignored")
        elif msg["type"] == "sample" and msg["is_observed"] and not msg.get("is_factor"):
            handlers.warn_user(f"site '{name}' is in posterior_samples but the model observes "
                               "it (its obs is given): its samples are ignored; pass obs=None "
                               "to the model to set it from the samples")


def _chosen_sites(tr: dict, samples: Mapping, return_sites: tuple | None) -> list[str]:
    """The sites to return: ``return_sites`` (each must be a site of the model), or NumPyro's
    default, the sample sites not in ``samples`` and the deterministic sites."""
    if return_sites is None:
        return [name for name, msg in tr.items()
                if (msg["type"] == "sample" and name not in samples)
                or msg["type"] == "deterministic"]
    for name in return_sites:
        if name not in tr:
            close = handlers.closest_name(name, tr)
            raise SiteError(name, "is in return_sites but is not a site of the model"
                            + (f" (did you mean '{close}'?)" if close else "")
                            + f"; its sites are {sorted(tr)}")
    return list(return_sites)


# --- the log marginal likelihood -----------------------------------------------------------


class _default_estimators(Messenger):
    """Give every latent site of the guide the objective's default estimator (drop the
    ``estimator=`` and ``infer={"enumerate": ...}`` the guide chose for training): the weights
    must use the guide's own distribution (not a relaxation of it), each particle drawn
    independently (not in antithetic pairs) and sampled (not enumerated)."""

    scan_role = "step"

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["estimator"] = None
            if msg.get("infer"):
                msg["infer"] = {k: v for k, v in msg["infer"].items() if k != "enumerate"}


def log_marginal_likelihood(rng_key: Any, params: Mapping, model: Callable, guide: Callable,
                            *args: Any, num_particles: int, chunk_size: int | None = None,
                            per_element: bool = False, **kwargs: Any) -> jax.Array:
    """The importance-sampled estimate ``L_K`` of ``log p(x)`` with ``K`` guide particles.

    ``L_K = log (1/K) sum_k w_k``, ``log w_k = log p(x, z_k) - log q(z_k | x)``,
    ``z_k ~ q(z | x)`` independently: ``sg.IWAE(num_particles=K)``'s bound, computed per
    element of the plates it factorises along (every plate that holds all the guide's latents,
    e.g. the data plate of a VAE; sites summed out in the model with
    ``infer={"enumerate": "parallel"}`` are summed exactly). ``E[L_K] <= log p(x)`` and
    ``L_K`` increases to ``log p(x)`` as ``K`` grows (Burda et al. 2016); ``exp(L_K)`` is an
    unbiased estimate of ``p(x)``.

    The ``K`` particles go in chunks of ``C = chunk_size`` (``jax.lax.map`` over the
    ``K // C`` full chunks, then one chunk of the remainder), each chunk ``sg.IWAE(C)``'s
    evaluation with a key of its own (``jax.random.split(rng_key, number of chunks)``), and

        L_K = logsumexp_j (L^(j) + log C_j) - log K

    combines the chunks' per-element bounds ``L^(j)`` exactly: only ``C`` particles are live at
    once, whatever ``K``. ``chunk_size=None`` (or ``>= K``) evaluates all ``K`` at once with
    ``rng_key``: the particles and the bound of ``-sg.IWAE(K).loss(rng_key, params, model,
    guide, *args)``.
    Jitted, compiled once per model, guide, ``K``, ``C`` and non-array arguments.

    The guide's latents are drawn from its own distributions whatever estimators it names for
    training (a relaxation, antithetic pairs or enumeration would change or correlate the
    weights); ``params`` are the unconstrained values (``sg.init_params``, ``state.params``).

    Args:
        rng_key: a PRNG key or an int seed.
        params: the programs' unconstrained params.
        model, guide: the programs; ``*args`` and ``**kwargs`` are passed to both.
        num_particles: ``K``.
        chunk_size: ``C``, the particles evaluated at once, or ``None`` for all of them.
        per_element: return one estimate per element of the bound's plates (for a
            sub-sampled plate, of the elements drawn, unscaled), an array with the plates'
            axes in batch order (e.g. ``(N,)`` for a data plate of ``N``); a cost that no
            latent reaches and that lies outside those plates (a global prior term) belongs
            to no element, and is then an error naming its site.

    Returns:
        The estimate for the whole data set (a scalar: the per-element estimates summed,
        scaled by ``N / B`` for sub-sampled plates, plus the costs no latent reaches), or the
        per-element estimates.

    Example: a conjugate model, where ``p(x) = N(x | 0, 2)``.

        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def model(x):
        ...     with sg.plate("data", 2):
        ...         z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...         sg.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     with sg.plate("data", 2):
        ...         sg.sample("z", dist.Normal(0.4 * x, 0.9))
        >>> x = jnp.array([0.5, -1.0])
        >>> lml = sg.log_marginal_likelihood(0, {}, model, guide, x, num_particles=3000,
        ...                                  chunk_size=1000, per_element=True)
        >>> exact = dist.Normal(0.0, jnp.sqrt(2.0)).log_prob(x)
        >>> bool(jnp.all(jnp.abs(lml - exact) < 0.01))
        True
    """
    key = handlers.as_prng_key(rng_key)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict from param names to unconstrained values (as "
                        f"sg.init_params returns), got {type(params).__name__}; the order is "
                        "log_marginal_likelihood(rng_key, params, model, guide, *args)")
    for role, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"log_marginal_likelihood's {role} must be a function, got "
                            f"{type(fn).__name__}; the order is "
                            "log_marginal_likelihood(rng_key, params, model, guide, *args)")
    k = check_num_particles(num_particles)
    chunk = _positive_int("chunk_size", chunk_size)
    chunk = k if chunk is None else min(chunk, k)
    arrays, rebuild = split_static((args, kwargs))
    run = cached_build(("log_marginal_likelihood", model, guide, k, chunk, bool(per_element),
                        rebuild.signature),
                       lambda: jax.jit(_build_estimate(model, guide, k, chunk,
                                                       bool(per_element), rebuild)))
    return run(key, params, arrays)


def _build_estimate(model: Callable, guide: Callable, k: int, chunk: int, per_element: bool,
                    rebuild: Callable) -> Callable:
    """``run(key, params, arrays)`` of :func:`log_marginal_likelihood` (to be jitted)."""
    sampler = _default_estimators(guide)
    full, rest = divmod(k, chunk)
    found: dict[str, Any] = {}

    def one_chunk(size: int, key: jax.Array, params: Mapping, args: tuple, kwargs: dict
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(L^(c), elementwise constant, constant, bound)`` of ``size`` particles: IWAE's
        bound per element of the bound's plates (canonical layout), the costs that no latent
        reaches per element and in all, and IWAE's bound for the whole data set."""
        evaluation = IWAE(size).evaluate(key, params, model, sampler, *args, **kwargs)
        scg = evaluation.structure.scg
        _, per, bound, ratio = importance_log_weights(evaluation)
        keep, _ = bound_layout(scg)
        shared = set(bound_plates(scg))
        element = jnp.zeros(per.shape)
        constant = jnp.zeros(())
        outside = []
        for cid, cost in evaluation.costs.items():
            if scg.upstream(cid):
                continue
            constant = constant + cost.reshape(size, -1).sum(axis=1).mean()
            if shared <= set(scg.costs[cid].plates):
                element = element + reduce_to(cost, keep).mean(axis=0)
            else:
                outside.append(scg.costs[cid].site)
        found.update(scg=scg, outside=outside, ratio=ratio)
        return per, element / ratio, constant, bound

    def run(key: jax.Array, params: Mapping, arrays: list) -> jax.Array:
        args, kwargs = rebuild(arrays)
        if full == 1 and not rest:  # one chunk: IWAE(K) itself, with rng_key
            per, element, constant, bound = one_chunk(k, key, params, args, kwargs)
        else:
            keys = jax.random.split(key, full + bool(rest))
            if full == 1:
                parts = jax.tree.map(lambda x: x[None],
                                     one_chunk(chunk, keys[0], params, args, kwargs))
            else:
                parts = jax.lax.map(lambda kc: one_chunk(chunk, kc, params, args, kwargs),
                                    keys[:full])
            lse = parts[0] + math.log(chunk)  # L^(j) + log C_j
            element, constant = parts[1][0], parts[2][0]
            if rest:
                last = one_chunk(rest, keys[-1], params, args, kwargs)[0] + math.log(rest)
                lse = jnp.concatenate([lse, last[None]])
            per = jax.nn.logsumexp(lse, axis=0) - math.log(k)
            bound = found["ratio"] * per.sum() + constant
        if not per_element:
            return bound
        if found["outside"]:
            site = found["outside"][0]
            plates = bound_plates(found["scg"])
            raise SiteError(site, f"is a cost that no latent reaches, outside the plates "
                            f"{list(plates)} of the per-element estimates: it belongs to no "
                            "element; use per_element=False (the total includes it)")
        return _batch_order(per + element, found["scg"], model, guide, key, params, args,
                            kwargs)

    return run


def _batch_order(per: jax.Array, scg: Any, model: Callable, guide: Callable, key: jax.Array,
                 params: Mapping, args: tuple, kwargs: dict) -> jax.Array:
    """The per-element estimates (canonical layout, size 1 off the bound's plates) with one
    axis per plate of the bound, in batch order (the plate at the most negative dim first)."""
    plates = bound_plates(scg)
    mask = scg.plate_mask(plates)
    per = per.reshape(tuple(n for n, kept in zip(per.shape, mask, strict=True) if kept))
    if len(plates) < 2:
        return per
    dims: dict[str, int] = {}
    for node in scg.nodes.values():
        dims.update(zip(node.plates, node.plate_dims, strict=True))
    if not set(plates) <= set(dims):  # no latent in them: read the dims from a trace

        def record(key: jax.Array) -> int:
            for tr in handlers.trace_guided(model, guide, key, params, *args, **kwargs):
                for msg in tr.values():
                    for frame in msg.get("cond_indep_stack", ()):
                        dims.setdefault(frame.name, frame.dim)
            return 0

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            jax.eval_shape(record, key)
    order = sorted(range(len(plates)), key=lambda i: dims[plates[i]])
    return jnp.transpose(per, order)
