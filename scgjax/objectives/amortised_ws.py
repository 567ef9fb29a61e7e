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
4. *wake*: the loss is ``-sum_m fhat(x_m)`` over the real data ``x_m``: like every other
   objective's, it estimates the objective of the whole data set (a sum over the data plate).

``fhat`` is linear in ``f``, so ``grad_theta fhat(x) = k(x, X) (K + lambda I)^{-1} grad_theta f``
is the kernel regression of ``grad log p_theta(x_n, z_n)`` on ``x_n``: a consistent estimate of
``grad log p_theta(x)`` as ``S`` grows. The authors' code is ``KernelWakeSleep.py`` in
github.com/kevin-w-li/al-ws.

A Normal likelihood's scale can be the exception (``scale_at_data=True``, opt-in): its part
of the gradient is then taken from the exponential-family form evaluated at the data (the authors'
``KRR_2`` for that part only), since plain regression hardly sees how far the data lie from
the model's means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as nd
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


def _rows(msg: Message, plate: str, array: Any) -> jax.Array:
    """``array``, broadcast to the site's ``batch_shape + event_shape``, as ``(N, D)`` floats:
    one row per element of the data plate, everything else flattened in a fixed order."""
    fn = msg["fn"]
    shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
    value = jnp.broadcast_to(array, shape)
    axis = _data_axis(msg, plate, len(fn.batch_shape))
    value = jnp.moveaxis(value, axis, 0)
    return value.reshape(value.shape[0], -1).astype(jnp.result_type(float))


def _features(msg: Message, plate: str) -> jax.Array:
    """The site's value as ``(N, D)`` floats, one row per element of the data plate."""
    return _rows(msg, plate, msg["value"])


def _normal_core(msg: Message) -> nd.Normal | None:
    """The ``Normal`` under the site's ``.to_event`` and ``.expand`` wrappers, if that is all
    the site's distribution is (and the site is neither masked nor scaled by an array);
    ``None`` otherwise."""
    fn = msg["fn"]
    while type(fn) in (nd.Independent, nd.ExpandedDistribution):
        fn = fn.base_dist
    if type(fn) is not nd.Normal or msg["mask"] is not None:
        return None
    if msg["scale"] is not None and jnp.ndim(msg["scale"]) != 0:
        return None
    return fn


def _stop_scale_log_density(msg: Message, plate: str, core: nd.Normal) -> jax.Array:
    """The site's log-density per element of the data plate, ``(N,)``, with the gradient
    through the Normal's scale stopped (the value is unchanged)."""
    fn = msg["fn"]
    lp = nd.Normal(core.loc, jax.lax.stop_gradient(core.scale)).log_prob(msg["value"])
    lp = jnp.broadcast_to(lp, tuple(fn.batch_shape) + tuple(fn.event_shape))
    if msg["scale"] is not None:
        lp = lp * msg["scale"]
    axis = _data_axis(msg, plate, len(fn.batch_shape))
    lp = jnp.moveaxis(lp, axis, 0)
    return lp.reshape(lp.shape[0], -1).sum(-1)


def _normal_scale_at_data(x: jax.Array, loc: jax.Array, scale: jax.Array,
                          weights: jax.Array, factor: Any = None) -> jax.Array:
    """A term of value 0 whose gradient is that of
    ``t = sum_mn a_mn log N(x_m; loc_n, scale_n)`` through ``scale`` only (``loc`` and the
    weights ``a`` held fixed).

    ``x`` ``(M, D)`` are the data's rows, ``loc`` and ``scale`` ``(S, D)`` the dreams'
    likelihood parameters, ``weights`` ``(M, S)``. The term is
    ``sum_nd stop_gradient(g_nd) (log scale_nd - stop_gradient(log scale_nd))`` with the
    exact ``g_nd = d t / d log scale_nd = sum_m a_mn ((x_md - loc_nd)^2 / scale_nd^2 - 1)``,
    from the data's weighted moments: ``g = P (a^T x^2 - 2 loc (a^T x) + loc^2 a^T 1) -
    a^T 1`` (``P = scale^-2``; two ``S x M`` by ``M x D`` products, no ``M x S x D`` array).

    Its value is 0 by construction, not computed from ``t``: on jaxlib 0.10.2's CPU backend
    the earlier form, ``(x^2) P^T - 2 x (loc P)^T + ...``, read garbage (values of 1e30 or
    NaN, nondeterministically, its gradient still right) whenever ``scale`` was a broadcast
    scalar (a shared noise scale): the YNNPACK fusion (``ynn_fusion``) of a dot with a
    broadcast operand. That made the loss non-finite in some runs (bench notes). The moments'
    products here have no broadcast operand (tested against the direct sum under ``jit``)."""
    loc, weights = jax.lax.stop_gradient(loc), jax.lax.stop_gradient(weights)
    log_scale = jnp.log(scale)
    mass = weights.sum(0)[:, None]  # (S, 1): sum_m a_mn
    first, second = weights.T @ x, weights.T @ (x * x)  # (S, D): sum_m a_mn x_m, x_m^2
    grad = jnp.exp(-2.0 * log_scale) * (second - 2.0 * loc * first + loc * loc * mass) - mass
    if factor is not None:
        grad = grad * factor
    grad = jax.lax.stop_gradient(grad)
    return jnp.sum(grad * (log_scale - jax.lax.stop_gradient(log_scale)))


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


def _kernel_ridge(sq: jax.Array, f: jax.Array, h: jax.Array, ridge: jax.Array,
                  sq_query: jax.Array) -> jax.Array:
    """``fhat(query) = mean(f) + k(query, X) (K + ridge I)^{-1} (f - mean(f))`` for the
    Gaussian kernel of bandwidth ``h``, from squared distances (Cholesky solve). Centring the
    targets shrinks towards their mean rather than towards zero."""
    gram = jnp.exp(-sq / (2.0 * h**2)) + ridge * jnp.eye(sq.shape[0], dtype=sq.dtype)
    centre = f.mean()
    alpha = cho_solve(cho_factor(gram, lower=True), f - centre)
    return centre + jnp.exp(-sq_query / (2.0 * h**2)) @ alpha


def _kernel_ridge_weights(sq: jax.Array, h: jax.Array, ridge: jax.Array,
                          sq_query: jax.Array) -> jax.Array:
    """``(M, S)`` weights ``a`` with ``fhat(query_m) = sum_n a_mn f_n`` for the centred
    regression of :func:`_kernel_ridge`: ``a = w + (1 - w 1) 1^T / S``,
    ``w = k(query, X) (K + ridge I)^{-1}``. Row ``m`` is the kernel estimate of the
    conditional distribution of the dreams' latents given ``x = query_m`` (a conditional mean
    embedding): ``sum_n a_mn g(z_n)`` estimates ``E[g(z) | x = query_m]`` for any ``g``."""
    gram = jnp.exp(-sq / (2.0 * h**2)) + ridge * jnp.eye(sq.shape[0], dtype=sq.dtype)
    w = cho_solve(cho_factor(gram, lower=True), jnp.exp(-sq_query / (2.0 * h**2)).T).T
    return w + (1.0 - w.sum(1, keepdims=True)) / sq.shape[0]


def _random_slopes(targets: Callable[[dict], jax.Array], params: dict, rng_key: jax.Array,
                   num_directions: int = 4) -> jax.Array:
    """``(num_directions, S)``: the targets' derivatives ``v . grad_theta f_n`` along random
    unit-variance directions ``v`` in parameter space (forward mode, no gradient), what the
    regression must predict for the gradient to be right."""
    leaves, treedef = jax.tree.flatten(params)

    def slope(key):
        keys = jax.random.split(key, len(leaves))
        v = jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                                         for k, x in zip(keys, leaves, strict=True)])
        return jax.jvp(targets, (params,), (v,))[1]

    return jax.lax.stop_gradient(jax.vmap(slope)(jax.random.split(rng_key, num_directions)))


def _select_kernel(sq: jax.Array, slopes: jax.Array, num_train: int, base: jax.Array,
                   scales: tuple[float, ...], ridges: tuple[float, ...]
                   ) -> tuple[jax.Array, jax.Array]:
    """``(h, ridge)`` from the grid ``base * scales`` x ``ridges`` whose regressions, fitted on
    the first ``num_train`` dreams, best predict the held-out rows of ``slopes`` (squared
    error relative to each row's variance, summed over rows; every candidate at once, no
    gradient)."""
    hs = jnp.repeat(base * jnp.asarray(scales, sq.dtype), len(ridges))
    lams = jnp.tile(jnp.asarray(ridges, sq.dtype), len(scales))
    train, held = slice(0, num_train), slice(num_train, None)

    def held_out_error(h, lam):
        def one(y):
            pred = _kernel_ridge(sq[train, train], y[train], h, lam, sq[held, train])
            return jnp.mean((pred - y[held]) ** 2) / (jnp.var(y) + 1e-30)
        return jax.vmap(one)(slopes).sum()

    errors = jax.vmap(held_out_error)(hs, lams)
    best = jnp.argmin(jnp.where(jnp.isnan(errors), jnp.inf, errors))  # a failed solve loses
    return hs[best], lams[best]


def _check_num_sleep(num_sleep: Any) -> None:
    if not isinstance(num_sleep, int) or num_sleep < 2:
        raise ValueError(f"num_sleep must be an int >= 2, got {num_sleep!r}")


def _check_kernel(kernel: Any) -> None:
    if kernel != "gaussian":
        raise ValueError(f"kernel must be 'gaussian', got {kernel!r}")


def _kernel_candidates(ridge: Any, bandwidth_scales: Any, num_heldout: Any
                       ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(ridges, scales)``: the candidate ``lambda``s and bandwidth multiples, checked
    positive; several of them need ``num_heldout > 0`` held-out dreams to choose between."""
    ridges = tuple(ridge) if isinstance(ridge, Sequence) else (ridge,)
    scales = tuple(bandwidth_scales)
    if not ridges or not all(r > 0 for r in ridges):
        raise ValueError(f"ridge must be positive (or positive candidates), got {ridge!r}")
    if not scales or not all(s > 0 for s in scales):
        raise ValueError(f"bandwidth_scales must be positive, got {bandwidth_scales!r}")
    if not isinstance(num_heldout, int) or num_heldout < 0:
        raise ValueError(f"num_heldout must be an int >= 0, got {num_heldout!r}")
    if num_heldout == 0 and len(ridges) * len(scales) > 1:
        raise ValueError("several ridge or bandwidth_scales candidates need held-out sleep "
                         "samples to choose between them: pass num_heldout > 0")
    return ridges, scales


def _check_bandwidth(bandwidth: Any) -> None:
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive or None, got {bandwidth!r}")


def _check_normalised_and_observed(sites: dict[str, Message]) -> None:
    """No factor (the sleep run samples the model) and at least one observed site."""
    factors = [n for n, m in sites.items() if m.get("is_factor")]
    if factors:
        raise SiteError(factors[0], "is a factor; AmortisedWakeSleep samples the model's "
                        "data in its sleep phase and needs a normalised model")
    if not any(m["is_observed"] for m in sites.values()):
        raise ScgjaxError(
            "AmortisedWakeSleep needs a model that observes its data (sg.sample(..., "
            "obs=x) inside a data plate); this model has no observed site")


def _common_plate(sites: dict[str, Message]) -> str:
    """The only plate that holds every sample site (an error if there is not exactly one)."""
    common = set.intersection(*({f.name for f in m["cond_indep_stack"]}
                                for m in sites.values()))
    if len(common) != 1:
        raise ScgjaxError(
            "AmortisedWakeSleep needs every sample site inside one data plate; the "
            f"plates that hold every site are {sorted(common)}"
            + ("" if not common else ": pass data_plate=..."))
    return common.pop()


def _check_sites_in_plate(sites: dict[str, Message], name: str) -> None:
    """Every sample site lies in the data plate ``name``, which does not subsample."""
    for n, m in sites.items():
        frames = [f for f in m["cond_indep_stack"] if f.name == name]
        if not frames:
            raise SiteError(n, f"is outside the data plate '{name}'; AmortisedWakeSleep "
                            "needs every sample site in it (no global latents)")
        if frames[0].size != frames[0].full_size:
            raise SiteError(n, f"is in the data plate '{name}', which subsamples; "
                            "AmortisedWakeSleep does not support subsampling")


def _check_data_argument(args: tuple) -> None:
    """The model's first argument must be the data array (data plate along its first axis)."""
    if not args or not hasattr(args[0], "shape") or jnp.ndim(args[0]) < 1:
        raise TypeError("AmortisedWakeSleep needs the data array, with the data plate "
                        "along its leading axis, as the model's first argument")


def _check_sleep_plate(sites: dict[str, Message], plate: str, total: int) -> None:
    """Every site of the sleep run lies in a data plate of ``total`` rows: the model must size
    its data plate by its first argument."""
    for n, m in sites.items():
        frame = next((f for f in m["cond_indep_stack"] if f.name == plate), None)
        if frame is None or frame.size != total:
            raise SiteError(
                n, f"has no data plate '{plate}' of size num_sleep + num_heldout={total} when "
                "the model's first argument has that many rows; the model must take its "
                "data plate's size from its first argument's leading dimension")


def _observed_features(sites: dict[str, Message], observed: list[str], plate: str
                       ) -> jax.Array:
    """``(N, D)``: the observed sites' values, one row per element of the data plate, their
    features concatenated, gradient stopped."""
    return jax.lax.stop_gradient(
        jnp.concatenate([_features(sites[n], plate) for n in observed], axis=1))


def _log_joint(model: Callable, rng_key: jax.Array, params: dict, model_args: tuple,
               kwargs: dict, given: dict[str, jax.Array], plate: str) -> jax.Array:
    """``log p_theta`` of the model run on ``model_args`` with the sites of ``given`` set to
    their values, summed per element of the data plate: ``(N,)``, differentiable in
    ``params``."""
    return _split_log_joint(model, rng_key, params, model_args, kwargs, given, plate, ())[0]


#: ``{site: (loc, scale, factor)}``: an observed Normal site's parameters as ``(N, D)`` rows and
#: its scalar ``scale`` handler factor (or ``None``)
NormalRows = dict[str, tuple[jax.Array, jax.Array, Any]]


def _split_log_joint(model: Callable, rng_key: jax.Array, params: dict, model_args: tuple,
                     kwargs: dict, given: dict[str, jax.Array], plate: str,
                     split: Sequence[str]) -> tuple[jax.Array, NormalRows]:
    """``(f, normals)``: ``f`` as :func:`_log_joint`, except that the gradient through the
    scale of every site of ``split`` whose distribution is a Normal (see :func:`_normal_core`)
    is stopped; ``normals`` holds those sites' ``loc`` and ``scale`` rows (differentiable)."""
    tr = trace_program(model, rng_key, params, model_args, kwargs,
                       wrap=lambda fn: handlers.condition(fn, given))
    f, normals = 0.0, {}
    for name, msg in sample_sites(tr).items():
        core = _normal_core(msg) if name in split else None
        if core is None:
            f = f + _per_element_log_density(msg, plate)
            continue
        f = f + _stop_scale_log_density(msg, plate, core)
        normals[name] = (_rows(msg, plate, core.loc), _rows(msg, plate, core.scale),
                         msg["scale"])
    return f, normals


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
    3. fits kernel ridge regression ``fhat(x) = fbar + k(x, X) (K + lambda I)^{-1} (f - fbar)``
       (``fbar = mean_n f_n``) with the Gaussian kernel
       ``k(x, x') = exp(-||x - x'||^2 / (2 h^2))`` (Cholesky solve);
    4. returns ``-sum_m fhat(x_m)`` over the real data's rows ``x_m``.

    Its gradient estimates ``-sum_m grad_theta log p_theta(x_m) = -grad_theta log p_theta(X)``,
    the scale of every other objective's gradient (``sg.ELBO``'s sums over the data plate too),
    so switching objectives needs no change of learning rate; its *value* is a regression
    surrogate, not ``-log p(X)``. Metrics: ``surrogate`` (``sum_m fhat(x_m)``),
    ``mean_log_joint`` (``mean_n f_n``), ``bandwidth`` (``h``) and ``ridge`` (``lambda``).

    A Normal likelihood's scale (``scale_at_data=True``, opt-in). For an observed site
    ``x | z ~ N(mu_theta(z), s_theta(z)^2)`` (a ``Normal``, possibly under ``.to_event`` and
    ``.expand``), the dreams' ``d f_n / d log s = ||x_n - mu(z_n)||^2 / s^2 - D`` is a
    ``chi^2_D - D`` variable whatever the data, so its regression on ``x`` stays near zero:
    plain regression cannot learn ``s`` (it drifts). The exact gradient is a posterior
    expectation of the sufficient statistics ``(x, x^2)`` against the natural parameters
    ``(mu / s^2, -1 / (2 s^2))`` and the log-normaliser ``mu^2 / (2 s^2) + log s``; for a shared
    ``s``,
    ``d log p(x) / d log s = E_{p(z | x)}[||x - mu(z)||^2] / s^2 - D``.
    So the gradient through ``s`` alone is taken at the data, with the regression's weights
    ``a_mn`` (``fhat(x_m) = sum_n a_mn f_n``) as the posterior estimate (the authors' ``KRR_2``
    for this part): ``f_n`` has the gradient through ``s`` stopped and the surrogate gains
    ``sum_m sum_n a_mn log N(x_m; mu(z_n), s(z_n)^2)`` with ``mu`` held fixed (value removed,
    gradient kept), whose ``log s`` gradient is
    ``sum_m (sum_n a_mn ||x_m - mu(z_n)||^2 / s^2 - D)``. The means', the prior's and every
    other parameter's gradients stay those of the plain regression, which fits a generator
    better than the evaluation at the data. Both parts are consistent as ``S`` grows. The
    term's value is 0 (the surrogate's value is the plain regression's); its gradient is
    computed from the data's weighted moments ``sum_m a_mn x_m`` and ``sum_m a_mn x_m^2``:
    two ``S x M`` by ``M x D`` products per Normal site (``M`` data rows). Sites of other
    distributions (or masked ones) are regressed as they are; ``scale_at_data=False`` (the
    default) gives the plain regression of everything. On the Gabor ring of
    ``examples/amortised_ws.py`` (half the median bandwidth, its default since) it learns
    ``sigma`` (0.052 against the data's 0.05 after 1000 steps, where plain regression has
    collapsed it) and the held-out log p reaches 387.0-390.8 against 399.4-399.6 for the true
    parameters (seeds 0-2, with a decaying rate; plain regression: 339 after 500 steps, 247
    after 1000). It is not the default here: where the posterior is sharper than the
    kernel's weights resolve, the estimate is biased up (``bench/notes/amortised_ws.md``).

    With ``joint_at_data=True`` step 4 instead evaluates the joint of every dream's latents at
    the real observations, ``fhat(x_m) = sum_n a_mn log p_theta(x_m, z_n)``, with the
    regression's weights ``a_mn`` (``fhat(x) = sum_n a_n(x) f_n`` above): only the expectation
    over ``z`` is regressed, not the dependence on ``x`` (for an exponential-family likelihood,
    the authors' KRR_2). It sees a likelihood's noise scale, which plain regression hardly
    does, but spreads the posterior estimate when few dreams lie near ``x_m``, and costs
    ``M x S`` evaluations of the model's densities per step (``M`` data rows). Not the
    default (``scale_at_data`` takes only the scale's gradient this way): measurements and
    discussion in ``bench/notes/amortised_ws.md``.

    The kernel is chosen by the median heuristic (``bandwidth=None``) or fixed, or, with
    ``num_heldout > 0``, on held-out sleep samples as the authors do (with ``num_heldout=0``
    a single ``bandwidth_scales`` entry multiplies the base bandwidth): ``num_heldout`` more
    dreams are drawn, every ``h = h0 * s`` (``s`` in ``bandwidth_scales``, ``h0`` the median
    or the given bandwidth) and ``lambda`` in ``ridge`` is fitted on the first ``num_sleep``
    and scored by its squared error on the held-out dreams; the best pair is refitted on all
    ``num_sleep + num_heldout`` dreams. What is scored is the regression of what the gradient
    needs, ``grad_theta f_n``, projected on 4 random directions in parameter space (one
    forward-mode pass each): the regression of ``f`` itself can prefer predicting its mean
    when ``f`` varies mostly with ``z`` given ``x``, which leaves the gradient wrong.

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
        ridge: ``lambda``, added to the kernel matrix's diagonal; a sequence of candidates
            with ``num_heldout > 0``.
        bandwidth: the kernel's ``h``; ``None`` for the median heuristic (the median pairwise
            distance between the sleep samples' ``x``).
        data_plate: the name of the data plate (see above).
        num_heldout: held-out sleep samples for choosing ``h`` and ``lambda`` (0: no choice).
        bandwidth_scales: the candidate multiples of the base bandwidth.
        joint_at_data: evaluate the dreams' joint at the real observations (see above).
        scale_at_data: take the gradient through the scale of every observed Normal site at
            the data (see above); ``False``: plain regression of it, as before.

    Example (data of scale 2 under ``x = a z + 0.5 e``, ``a = 1``: ``a`` should grow):
        >>> import jax, scgjax as sg
        >>> from scgjax import dist
        >>> def model(x):
        ...     a = sg.param("a", 1.0)
        ...     with sg.plate("data", x.shape[0]):
        ...         z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...         sg.sample("x", dist.Normal(a * z, 0.5), obs=x)
        >>> x = 2.0 * jax.random.normal(jax.random.key(0), (50,))
        >>> params = sg.init_params(0, model, None, x)
        >>> objective = sg.AmortisedWakeSleep(num_sleep=200)
        >>> grad = jax.grad(objective.loss, argnums=1)
        >>> keys = jax.random.split(jax.random.key(1), 8)
        >>> grads = jax.vmap(lambda key: grad(key, params, model, x))(keys)
        >>> bool(grads["a"].mean() < 0)  # the loss falls as a grows
        True

    A learned noise scale (the same data, ``s = 0.5``: ``s`` should grow):
        >>> def noisy(x):
        ...     log_s = sg.param("log_s", jnp.log(0.5))
        ...     with sg.plate("data", x.shape[0]):
        ...         z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...         sg.sample("x", dist.Normal(z, jnp.exp(log_s)), obs=x)
        >>> import jax.numpy as jnp
        >>> params = sg.init_params(0, noisy, None, x)
        >>> at_data = sg.AmortisedWakeSleep(num_sleep=200, scale_at_data=True)
        >>> g = jax.grad(at_data.loss, argnums=1)(jax.random.key(2), params, noisy, x)
        >>> bool(g["log_s"] < 0)  # the loss falls as s grows
        True
    """

    kind = program.SINGLE

    def __init__(self, num_sleep: int = 200, kernel: str = "gaussian",
                 ridge: float | Sequence[float] = 1e-3, bandwidth: float | None = None,
                 data_plate: str | None = None, num_heldout: int = 0,
                 bandwidth_scales: Sequence[float] = (1.0,), joint_at_data: bool = False,
                 scale_at_data: bool = False):
        super().__init__(num_particles=1)
        _check_num_sleep(num_sleep)
        _check_kernel(kernel)
        ridges, scales = _kernel_candidates(ridge, bandwidth_scales, num_heldout)
        _check_bandwidth(bandwidth)
        self.num_sleep = num_sleep
        self.kernel = kernel
        self.ridge = tuple(float(r) for r in ridges)
        self.bandwidth_scales = tuple(float(v) for v in scales)
        self.num_heldout = num_heldout
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.data_plate = data_plate
        self.joint_at_data = bool(joint_at_data)
        self.scale_at_data = bool(scale_at_data)

    def __repr__(self) -> str:
        return (f"AmortisedWakeSleep(num_sleep={self.num_sleep}, kernel={self.kernel!r}, "
                f"ridge={self.ridge}, bandwidth={self.bandwidth}, num_heldout={self.num_heldout}, "
                f"joint_at_data={self.joint_at_data}, scale_at_data={self.scale_at_data})")

    init_state_checks_data = False

    def init_state(self, rng_key: Any, params: dict, *fns_and_args, **kwargs) -> dict:
        """No state: every step draws fresh sleep samples."""
        self._programs(fns_and_args[:1])
        return {}

    # -- the model's runs ------------------------------------------------------------------

    def _find_plate(self, tr: dict) -> str:
        """The data plate's name (``data_plate``, else the only plate holding every site),
        after checking that the model fits the assumptions of the class docstring."""
        sites = sample_sites(tr)
        _check_normalised_and_observed(sites)
        name = self.data_plate if self.data_plate is not None else _common_plate(sites)
        _check_sites_in_plate(sites, name)
        return name

    def loss_with_state(self, rng_key: Any, params: dict, state: dict | None,
                        *fns_and_args: Any, **kwargs: Any
                        ) -> tuple[jax.Array, tuple[dict, dict[str, jax.Array]]]:
        """``(loss, (state, metrics))``: see the class docstring."""
        (model,) = self._programs(fns_and_args[:1])
        args = fns_and_args[1:]
        _check_data_argument(args)
        key_wake, key_sleep = jax.random.split(handlers.as_prng_key(rng_key))
        plate, observed, rows_real = self._wake(model, key_wake, params, args, kwargs)
        x_real = jnp.concatenate([rows_real[n] for n in observed], axis=1)
        sleep_args, values, x_sleep = self._sleep(model, key_sleep, params, args, kwargs, plate,
                                                  observed)
        split = observed if self.scale_at_data and not self.joint_at_data else ()

        def run(p: dict) -> tuple[jax.Array, NormalRows]:
            """``f_n = log p_theta(x_n, z_n)``, differentiable in ``theta`` (but through the
            scales of the observed Normal sites in ``split``), and those sites' rows."""
            return _split_log_joint(model, key_sleep, p, sleep_args, kwargs, values, plate,
                                    split)

        def targets(p: dict) -> jax.Array:
            return run(p)[0]

        f, normals = run(params)
        sq, sq_query = _sq_dists(x_sleep, x_sleep), _sq_dists(x_real, x_sleep)
        h, ridge = self._choose_kernel(sq, targets, params, key_sleep)
        if normals:
            weights = jax.lax.stop_gradient(_kernel_ridge_weights(sq, h, ridge, sq_query))
            scale_term = sum(_normal_scale_at_data(rows_real[n], loc, scale, weights, factor)
                             for n, (loc, scale, factor) in normals.items())
        else:
            scale_term = 0.0
        if self.joint_at_data:
            weights = jax.lax.stop_gradient(_kernel_ridge_weights(sq, h, ridge, sq_query))
            latents = {n: v for n, v in values.items() if n not in observed}

            def joint_at(row: jax.Array) -> jax.Array:
                """``log p_theta(x_m, z_n)`` for every dream ``n``: the model run on copies of
                data row ``m`` with the dreams' latents."""
                data = jnp.broadcast_to(row[None], sleep_args[0].shape)
                return _log_joint(model, key_sleep, params, (data, *args[1:]), kwargs, latents,
                                  plate)

            fhat = jnp.sum(weights * jax.vmap(joint_at)(args[0]), axis=1)
        else:
            fhat = _kernel_ridge(sq, f, h, ridge, sq_query)
        # the whole data set, as every objective's (the plate is full); the scale term's
        # value is 0, its gradient that of the Normal sites' scales
        surrogate = fhat.sum() + scale_term
        metrics = {"surrogate": surrogate, "mean_log_joint": f.mean(), "bandwidth": h,
                   "ridge": ridge}
        return -surrogate, ({} if state is None else state, metrics)

    def _wake(self, model: Callable, rng_key: jax.Array, params: dict, args: tuple,
              kwargs: dict) -> tuple[str, list[str], dict[str, jax.Array]]:
        """``(plate, observed, rows)``: the model run on the real data (its latents drawn
        only to run it), its data plate, its observed sites and each one's data as ``(M,
        D)`` rows (gradient stopped)."""
        wake_tr = trace_program(model, rng_key, params, args, kwargs)
        plate = self._find_plate(wake_tr)
        sites = sample_sites(wake_tr)
        observed = [n for n, m in sites.items() if m["is_observed"]]
        return plate, observed, {n: _observed_features(sites, [n], plate) for n in observed}

    def _sleep(self, model: Callable, rng_key: jax.Array, params: dict, args: tuple,
               kwargs: dict, plate: str, observed: list[str]
               ) -> tuple[tuple, dict[str, jax.Array], jax.Array]:
        """``(sleep_args, values, x_sleep)``: ``(z_n, x_n) ~ p_theta`` for ``num_sleep +
        num_heldout`` rows, the model run with its observed sites sampled on a dummy data
        array (``sleep_args``), every value gradient-stopped."""
        x = args[0]
        total = self.num_sleep + self.num_heldout
        sleep_args = (jnp.zeros((total, *jnp.shape(x)[1:]), jnp.result_type(x)), *args[1:])
        sleep_tr = trace_program(model, rng_key, params, sleep_args, kwargs, wrap=unobserve)
        sites = sample_sites(sleep_tr)
        _check_sleep_plate(sites, plate, total)
        values = {n: jax.lax.stop_gradient(m["value"]) for n, m in sites.items()}
        return sleep_args, values, _observed_features(sites, observed, plate)

    def _choose_kernel(self, sq: jax.Array, targets: Callable[[dict], jax.Array],
                       params: dict, rng_key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(h, lambda)``: the fixed or median bandwidth and the first ridge, or, with held-out
        dreams, the pair of the candidates that best predicts the targets' slopes."""
        h = (_median_bandwidth(sq[:self.num_sleep, :self.num_sleep]) if self.bandwidth is None
             else jnp.asarray(self.bandwidth, sq.dtype))
        h, ridge = jax.lax.stop_gradient(h), jnp.asarray(self.ridge[0], sq.dtype)
        if not self.num_heldout:  # one candidate: the base bandwidth times its one multiple
            return h * self.bandwidth_scales[0], ridge
        slopes = _random_slopes(targets, params, jax.random.fold_in(rng_key, 1))
        h, ridge = _select_kernel(sq, slopes, self.num_sleep, h, self.bandwidth_scales,
                                  self.ridge)
        return h, ridge

    def loss(self, rng_key: Any, params: dict, *fns_and_args: Any, **kwargs: Any) -> jax.Array:
        """``-sum_m fhat(x_m)``: its gradient estimates ``-sum_m grad log p_theta(x_m)``."""
        return self.loss_with_state(rng_key, params, None, *fns_and_args, **kwargs)[0]
