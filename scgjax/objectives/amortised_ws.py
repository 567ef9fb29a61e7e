"""Amortised learning by wake-sleep (Wenliang, Moskovitz, Kanagawa and Sahani, ICML 2020).

Maximum likelihood for a latent-variable model ``p_theta(x) = int p_theta(x, z) dz`` needs
``grad log p_theta(x) = E_{p_theta(z | x)}[grad log p_theta(x, z)]``, a conditional expectation
given ``x``. Least-squares regression estimates conditional expectations, so the gradient can be
learned from samples of the model itself, with no guide and no assumption on the latents
(continuous, discrete, structured):

1. *sleep*: draw ``(z_n, x_n) ~ p_theta``, ``n = 1..S`` (no gradient through the sampling);
2. targets ``f_n = log p_theta(x_n, z_n)`` (differentiable in ``theta``);
3. kernel ridge regression from ``x`` to ``f``:
   ``fhat(x) = k(x, X) (K + lambda I)^{-1} f`` with ``K = k(X, X)``, here the Gaussian kernel
   ``k(x, x') = exp(-||x - x'||^2 / (2 h^2))``, ``h`` by the median heuristic;
4. *wake*: the loss is ``-mean_m fhat(x_m)`` over the real data ``x_m``.

``fhat`` is linear in ``f``, so ``grad_theta fhat(x) = k(x, X) (K + lambda I)^{-1} grad_theta f``
is the kernel regression of ``grad log p_theta(x_n, z_n)`` on ``x_n``: a consistent estimate of
``grad log p_theta(x)`` as ``S`` grows. The authors' code is ``KernelWakeSleep.py`` in
github.com/kevin-w-li/al-ws.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

from scgjax import handlers
from scgjax.errors import ScgjaxError, SiteError
from scgjax.objectives import program
from scgjax.objectives.base import Objective
from scgjax.objectives.sleep import sample_sites, trace_program, unobserve
from scgjax.primitives import Message

__all__ = ["AmortisedWakeSleep"]


def _data_axis(msg: Message, plate: str, ndim_batch: int) -> int:
    frame = next(f for f in msg["cond_indep_stack"] if f.name == plate)
    return ndim_batch + frame.dim


def _features(msg: Message, plate: str) -> jax.Array:
    """The site's value as ``(N, D)`` floats, one row per element of the data plate."""
    fn = msg["fn"]
    shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
    value = jnp.broadcast_to(msg["value"], shape)
    axis = _data_axis(msg, plate, len(fn.batch_shape))
    value = jnp.moveaxis(value, axis, 0)
    return value.reshape(value.shape[0], -1).astype(jnp.result_type(float))


def _per_element_log_density(msg: Message, plate: str) -> jax.Array:
    """The site's log-density summed over everything but the data plate: shape ``(N,)``."""
    fn = msg["fn"]
    lp = fn.log_prob(msg["value"])
    lp = jnp.broadcast_to(lp, tuple(fn.batch_shape))
    if msg["mask"] is not None:
        lp = jnp.where(msg["mask"], lp, 0.0)
    if msg["scale"] is not None:
        lp = lp * msg["scale"]
    axis = _data_axis(msg, plate, lp.ndim)
    lp = jnp.moveaxis(lp, axis, 0)
    return lp.reshape(lp.shape[0], -1).sum(-1)


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    d = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(d, 0.0)


def _median_bandwidth(sq: jax.Array) -> jax.Array:
    """Median of the pairwise distances (off the diagonal); the mean of them if the median is
    zero (e.g. discrete data with many ties), and 1 if every point is the same."""
    n = sq.shape[0]
    rows, cols = jnp.triu_indices(n, k=1)
    dist = jnp.sqrt(sq[rows, cols])
    h = jnp.median(dist)
    h = jnp.where(h > 0, h, dist.mean())
    return jnp.where(h > 0, h, 1.0)


class AmortisedWakeSleep(Objective):
    """Amortised learning by wake-sleep (Wenliang et al., ICML 2020) for a model alone.

    Use with ``guide=None``: ``sg.SVI(model, None, optax.adam(1e-2), AmortisedWakeSleep(200))``
    or ``loss(rng_key, params, model, x, *args)``. Each evaluation

    1. runs the model *without its observations* (they are sampled like latents) on a dummy
       data array of ``num_sleep`` rows: ``(z_n, x_n) ~ p_theta``, ``n = 1..S``, with
       ``stop_gradient`` on every sampled value;
    2. re-runs it conditioned on those values: ``f_n = log p_theta(x_n, z_n)``, the joint
       log-density of every sample site, summed per element of the data plate
       (differentiable in ``theta``);
    3. fits kernel ridge regression ``fhat(x) = k(x, X) (K + lambda I)^{-1} f`` with the
       Gaussian kernel ``k(x, x') = exp(-||x - x'||^2 / (2 h^2))`` (Cholesky solve);
    4. returns ``-mean_m fhat(x_m)`` over the real data's rows ``x_m``.

    Its gradient estimates ``-mean_m grad_theta log p_theta(x_m)``; its *value* is a
    regression surrogate, not ``-log p(x)``. Metrics: ``surrogate`` (``mean_m fhat(x_m)``),
    ``mean_log_joint`` (``mean_n f_n``) and ``bandwidth`` (``h``).

    Assumptions on the model (checked, with clear errors):

    - its first argument is the data array; its leading axis is the data plate (whose size the
      model takes from that array's ``shape[0]``): the sleep run passes
      ``zeros((num_sleep, *x.shape[1:]))`` in its place;
    - it observes its data with ``obs=`` inside that plate (several observed sites are
      concatenated into one feature vector per row), and every sample site lies in the plate
      (no global latents: the rows must be i.i.d. draws of ``p_theta(x)``); no factors (the
      sleep run cannot sample from an unnormalised model) and no subsampling of the plate;
    - ``data_plate`` names the plate; by default, the only plate that holds every sample site.

    Args:
        num_sleep: number ``S`` of sleep samples.
        kernel: ``"gaussian"`` (the only kernel so far).
        ridge: ``lambda``, added to the kernel matrix's diagonal.
        bandwidth: the kernel's ``h``; ``None`` for the median heuristic (the median pairwise
            distance between the sleep samples' ``x``).
        data_plate: the name of the data plate (see above).
    """

    kind = program.SINGLE

    def __init__(self, num_sleep: int = 200, kernel: str = "gaussian", ridge: float = 1e-3,
                 bandwidth: float | None = None, data_plate: str | None = None):
        super().__init__(num_particles=1)
        if not isinstance(num_sleep, int) or num_sleep < 2:
            raise ValueError(f"num_sleep must be an int >= 2, got {num_sleep!r}")
        if kernel != "gaussian":
            raise ValueError(f"kernel must be 'gaussian', got {kernel!r}")
        if not ridge > 0:
            raise ValueError(f"ridge must be positive, got {ridge!r}")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive or None, got {bandwidth!r}")
        self.num_sleep = num_sleep
        self.kernel = kernel
        self.ridge = float(ridge)
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.data_plate = data_plate

    def __repr__(self) -> str:
        return (f"AmortisedWakeSleep(num_sleep={self.num_sleep}, kernel={self.kernel!r}, "
                f"ridge={self.ridge}, bandwidth={self.bandwidth})")

    def init_state(self, rng_key: Any, params: dict, *fns_and_args, **kwargs) -> dict:
        """No state: every step draws fresh sleep samples."""
        self._programs(fns_and_args[:1])
        return {}

    # -- the model's runs ------------------------------------------------------------------

    def _find_plate(self, tr: dict) -> str:
        sites = sample_sites(tr)
        factors = [n for n, m in sites.items() if m.get("is_factor")]
        if factors:
            raise SiteError(factors[0], "is a factor; AmortisedWakeSleep samples the model's "
                            "data in its sleep phase and needs a normalised model")
        observed = [n for n, m in sites.items() if m["is_observed"]]
        if not observed:
            raise ScgjaxError(
                "AmortisedWakeSleep needs a model that observes its data (sg.sample(..., "
                "obs=x) inside a data plate); this model has no observed site")
        if self.data_plate is not None:
            name = self.data_plate
        else:
            common = set.intersection(*({f.name for f in m["cond_indep_stack"]}
                                        for m in sites.values()))
            if len(common) != 1:
                raise ScgjaxError(
                    "AmortisedWakeSleep needs every sample site inside one data plate; the "
                    f"plates that hold every site are {sorted(common)}"
                    + ("" if not common else ": pass data_plate=..."))
            name = common.pop()
        for n, m in sites.items():
            frames = [f for f in m["cond_indep_stack"] if f.name == name]
            if not frames:
                raise SiteError(n, f"is outside the data plate '{name}'; AmortisedWakeSleep "
                                "needs every sample site in it (no global latents)")
            if frames[0].size != frames[0].full_size:
                raise SiteError(n, f"is in the data plate '{name}', which subsamples; "
                                "AmortisedWakeSleep does not support subsampling")
        return name

    def loss_with_state(self, rng_key: Any, params: dict, state: dict | None, *fns_and_args,
                        **kwargs) -> tuple[jax.Array, tuple[dict, dict]]:
        """``(loss, (state, metrics))``: see the class docstring."""
        (model,) = self._programs(fns_and_args[:1])
        args = fns_and_args[1:]
        if not args or not hasattr(args[0], "shape") or jnp.ndim(args[0]) < 1:
            raise TypeError("AmortisedWakeSleep needs the data array, with the data plate "
                            "along its leading axis, as the model's first argument")
        key = handlers.as_prng_key(rng_key)
        key_wake, key_sleep = jax.random.split(key)
        x = args[0]

        # wake: the real data's features (latents drawn only to run the model)
        wake_tr = trace_program(model, key_wake, params, args, kwargs)
        plate = self._find_plate(wake_tr)
        observed = [n for n, m in sample_sites(wake_tr).items() if m["is_observed"]]
        x_real = jax.lax.stop_gradient(
            jnp.concatenate([_features(wake_tr[n], plate) for n in observed], axis=1))

        # sleep: (z_n, x_n) ~ p_theta, observed sites sampled, no gradient through sampling
        dummy = (jnp.zeros((self.num_sleep, *jnp.shape(x)[1:]), jnp.result_type(x)),
                 *args[1:])
        sleep_tr = trace_program(model, key_sleep, params, dummy, kwargs, wrap=unobserve)
        sites = sample_sites(sleep_tr)
        for n, m in sites.items():
            frame = next((f for f in m["cond_indep_stack"] if f.name == plate), None)
            if frame is None or frame.size != self.num_sleep:
                raise SiteError(
                    n, f"has no data plate '{plate}' of size num_sleep={self.num_sleep} when "
                    "the model's first argument has that many rows; the model must take its "
                    "data plate's size from its first argument's leading dimension")
        values = {n: jax.lax.stop_gradient(m["value"]) for n, m in sites.items()}
        x_sleep = jnp.concatenate(
            [_features({**sites[n], "value": values[n]}, plate) for n in observed], axis=1)

        # targets: f_n = log p_theta(x_n, z_n), differentiable in theta
        cond_tr = trace_program(model, key_sleep, params, dummy, kwargs,
                              wrap=lambda fn: handlers.condition(fn, values))
        f = sum(_per_element_log_density(m, plate) for m in sample_sites(cond_tr).values())

        # kernel ridge regression from x to f, evaluated at the real data
        sq = _sq_dists(x_sleep, x_sleep)
        h = (_median_bandwidth(sq) if self.bandwidth is None
             else jnp.asarray(self.bandwidth, sq.dtype))
        h = jax.lax.stop_gradient(h)
        gram = jnp.exp(-sq / (2.0 * h**2)) + self.ridge * jnp.eye(self.num_sleep, dtype=sq.dtype)
        alpha = cho_solve(cho_factor(gram, lower=True), f)
        k_real = jnp.exp(-_sq_dists(x_real, x_sleep) / (2.0 * h**2))
        fhat = k_real @ alpha
        surrogate = fhat.mean()
        metrics = {"surrogate": surrogate, "mean_log_joint": f.mean(), "bandwidth": h}
        return -surrogate, ({} if state is None else state, metrics)

    def loss(self, rng_key: Any, params: dict, *fns_and_args, **kwargs) -> jax.Array:
        """``-mean_m fhat(x_m)``: its gradient estimates ``-mean_m grad log p_theta(x_m)``."""
        return self.loss_with_state(rng_key, params, None, *fns_and_args, **kwargs)[0]
