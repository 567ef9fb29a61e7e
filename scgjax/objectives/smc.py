"""Auto-encoding sequential Monte Carlo: the SMC bound as an objective over ``sg.scan`` programs.

For a model ``p(x_{1:T}, z_{1:T})`` and a guide ``q(z_t | z_{<t}, x)`` written as one
``sg.scan`` each (the same loop name), ``K`` particles are propagated through the steps: at
step ``t`` each particle proposes ``z_t^k`` from the guide's step, is weighted by

    log w_t^k = log p(x_t, z_t^k | z_{t-1}^k) - log q(z_t^k | z_{t-1}^k, x),

and when the effective sample size of the accumulated weights falls below ``ess_threshold *
K`` the particles are resampled (their carries, model's and guide's, replaced by their
ancestors'). The estimate of the marginal likelihood is the product, over the resampling steps
and the last one, of the mean accumulated weight,

    log Z_hat = sum_{r} [logsumexp_k W_r^k - log K],

an unbiased estimate of ``p(x)``, so ``E[log Z_hat] <= log p(x)`` (Jensen): the SMC bound of
auto-encoding SMC (Le et al., ICLR 2018), FIVO (Maddison et al., NeurIPS 2017) and variational
SMC (Naesseth et al., AISTATS 2018). Without resampling (``resample=None``, or ``T = 1``) it is
the IWAE bound. Its gap grows with ``T`` far more slowly than IWAE's: resampling keeps the
particles where the weight is (``examples/smc_state_space.py``: at ``K = 32`` and ``T = 300``
a gap of 1.8 nats against IWAE's 19.8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scgjax import control_flow, handlers, primitives, stepped_prng
from scgjax.errors import SiteError
from scgjax.estimators.base import PARTICLE_AXIS, Estimator, magic_box
from scgjax.estimators.pathwise import Pathwise
from scgjax.estimators.score_function import ScoreFunction
from scgjax.objectives import program
from scgjax.objectives.base import Objective
from scgjax.primitives import Message, Messenger
from scgjax.tracegraph import site_cost, site_log_prob

__all__ = ["SMC"]

RESAMPLERS = ("systematic", "multinomial")


class SMC(Objective):
    """The SMC bound ``E[log Z_hat]`` of auto-encoding SMC (Le et al. 2018; FIVO, Maddison et
    al. 2017; variational SMC, Naesseth et al. 2018), for a model and a guide that each run one
    ``sg.scan`` loop of the same name.

    ``log Z_hat = sum_r [logsumexp_k W_r^k - log K]`` over the steps ``r`` where the particles
    are resampled and the last step, ``W_r^k`` the particle's log-weight accumulated since the
    previous resampling (see the module). Computed in log space, per element of the plates
    around the loop (a batch of independent sequences: each resamples on its own). With
    ``resample=None`` (or ``T = 1``) it equals ``sg.IWAE``'s bound for the same key.

    Args:
        num_particles: ``K``.
        resample: ``"systematic"`` (one uniform per resampling; lower variance),
            ``"multinomial"``, or ``None`` (never: the IWAE bound).
        ess_threshold: resample when the effective sample size ``(sum w)^2 / sum w^2`` of the
            accumulated weights is below ``ess_threshold * K``; ``1.0`` resamples at every
            step (unless the weights are all equal), ``0.5`` is FIVO's choice.
        resample_grad: also add the score term of the resampling (multinomial only): each
            ancestor index's ``log`` probability (its normalised weight) times the log-weight
            increments after it.

    Gradient (the loss is ``-log Z_hat``): pathwise through reparameterised proposals
    (``Pathwise()``, the default where the distribution has ``rsample``) and through the
    densities; for a score-function site (``ScoreFunction()``, the default of discrete sites)
    ``sum_{t,k} grad log q(z_t^k) R_t`` with ``R_t = sum_{s >= t} (log Z_hat increments)``: the
    increments before step ``t`` do not depend on ``z_t`` and are left out. The resampling's
    own score term is **dropped by default**, as AESMC and FIVO do: its variance is high, and
    the gradient is then **biased** (it misses ``E[log Z_hat grad log P(ancestors)]``);
    ``resample_grad=True`` adds it, credited with the increments after each resampling only.
    Other estimators (leave-one-out, baselines' signals, DisARM, enumeration, relaxations,
    STL, DReG) raise a :class:`~scgjax.errors.SiteError` naming the site.

    The programs: every latent site of the guide is inside the loop (a latent outside it
    would not follow its particle's ancestry: carry it instead); costs after the loop may not
    depend on the loop's latents; with plates around the loop, every leaf of each carry starts
    with those plates' axes (the batch of sequences), so that each sequence resamples its own.
    After the loop each particle's programs go on with its own final carry; the stacked
    values they see are the draws of its own steps, which resampling has not made one path.

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> ys = jnp.array([0.3, -0.2, 0.5, 0.1])
        >>> def model(ys):
        ...     def step(z, y):
        ...         z = sg.sample("z", dist.Normal(0.9 * z, 1.0))
        ...         sg.sample("y", dist.Normal(z, 0.5), obs=y)
        ...         return z, None
        ...     sg.scan(step, 0.0, xs=ys)
        >>> def guide(ys):
        ...     gain = sg.param("gain", 0.5)
        ...     def step(z, y):
        ...         return sg.sample("z", dist.Normal(0.9 * z + gain * y, 0.8)), None
        ...     sg.scan(step, 0.0, xs=ys)
        >>> params = sg.init_params(0, model, guide, ys)
        >>> loss = sg.SMC(num_particles=16).loss(jax.random.key(0), params, model, guide, ys)
        >>> bool(jnp.isfinite(loss))
        True
    """

    kind = program.GUIDED
    multi_sample_bound = True

    def __init__(self, num_particles: int = 2, resample: str | None = "systematic",
                 ess_threshold: float = 0.5, resample_grad: bool = False):
        super().__init__(num_particles)
        if resample is not None and resample not in RESAMPLERS:
            raise ValueError(f"SMC resample must be one of {RESAMPLERS} or None, got "
                             f"{resample!r}")
        if isinstance(ess_threshold, bool) or not isinstance(
                ess_threshold, (int, float, np.floating)) or not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"SMC ess_threshold must be a number in [0, 1], got "
                             f"{ess_threshold!r}")
        if not isinstance(resample_grad, bool):
            raise TypeError(f"SMC resample_grad must be a bool, got {resample_grad!r}")
        if resample_grad and resample != "multinomial":
            raise ValueError("SMC resample_grad=True needs resample='multinomial': the score "
                             "term uses each ancestor's probability, a product of categorical "
                             f"draws only for multinomial resampling (got {resample!r})")
        self.resample = resample
        self.ess_threshold = float(ess_threshold)
        self.resample_grad = resample_grad

    def __repr__(self) -> str:
        return (f"SMC(num_particles={self.num_particles}, resample={self.resample!r}, "
                f"ess_threshold={self.ess_threshold}, resample_grad={self.resample_grad})")

    def default_estimator(self, fn: Any, num_particles: int) -> Any:
        """Pathwise where the distribution has ``rsample``, else the score function."""
        return Pathwise() if fn.has_rsample else ScoreFunction()

    def loss_with_state(self, rng_key: Any, params: dict, state: dict | None, *fns_and_args,
                        **kwargs) -> tuple[jax.Array, tuple[dict, dict]]:
        """``(-log Z_hat with its score terms, (state, metrics))``."""
        model, guide = self._programs(fns_and_args[:2])
        args = fns_and_args[2:]
        key = handlers.as_prng_key(rng_key)
        structure = self.structure(key, params, model, guide, *args, **kwargs)
        loop, score_sites = _check_structure(structure)
        k = self.num_particles
        resample_key = stepped_prng.fold_in(key, 2)

        static: dict = {}

        def one_particle(particle_key: jax.Array) -> dict:
            out, static["scale"] = _run_particle(self, loop, score_sites, particle_key,
                                                 resample_key, params, model, guide, args,
                                                 kwargs)
            return out

        if k == 1:
            out = jax.tree.map(lambda x: x[None], one_particle(key))
        else:
            out = jax.vmap(one_particle, axis_name=PARTICLE_AXIS)(stepped_prng.split(key, k))
        delta = out["delta"][0]  # (T, *outer): the same in every particle
        scale = static["scale"]
        log_z = delta.sum(0)
        bound = scale * log_z.sum() + out["fixed"][0]
        # R_t = sum_{s >= t} delta_s: what the choices of step t can change
        to_go = jnp.flip(jnp.cumsum(jnp.flip(delta, 0), 0), 0)
        signal = jax.lax.stop_gradient(scale * to_go)
        surrogate = bound
        if score_sites:
            surrogate = surrogate + ((magic_box(out["score_log_q"]) - 1.0) * signal[None]).sum()
        if self.resample_grad:
            after = signal - jax.lax.stop_gradient(scale * delta)  # sum_{s > t}
            surrogate = surrogate + ((magic_box(out["ancestor_log_prob"]) - 1.0)
                                     * after[None]).sum()
        metrics = {"objective": jax.lax.stop_gradient(bound),
                   "resampled": jnp.mean(out["resampled"][0].astype(jnp.float32))}
        return -surrogate, (dict(state or {}), metrics)

    def loss(self, rng_key: Any, params: dict, model: Callable, guide: Callable, *args: Any,
             **kwargs: Any) -> jax.Array:
        """``-log Z_hat`` (with the score terms, value 0); ``jax.grad`` of it estimates
        ``-grad E[log Z_hat]`` (see the class for what is dropped)."""
        return super().loss(rng_key, params, model, guide, *args, **kwargs)


# -- the programs' structure -------------------------------------------------------------------


def _check_structure(structure: program.Structure) -> tuple[str, tuple[str, ...]]:
    """The loop's name and the score-function sites; a :class:`SiteError` for what SMC cannot
    serve."""
    scg = structure.scg
    if structure.marginals:
        raise SiteError(structure.marginals[0].sites[0], "is summed out in the model; SMC does "
                        "not combine with model-side enumeration: use sg.ELBO or sg.IWAE")
    if not scg.nodes:
        raise TypeError("SMC needs a guide that samples latent sites inside an sg.scan loop; "
                        "this guide samples none")
    loops = set()
    for name, node in scg.nodes.items():
        mine = [p for p in node.plates if scg.plates[p].time]
        if not mine:
            raise SiteError(name, "is a latent site outside sg.scan; SMC resamples the "
                            "particles of the loop's steps, and a latent sampled outside the "
                            "loop would not follow its particle's ancestry: sample it inside "
                            "the loop (and carry it), or make it a param")
        loops.update(mine)
    if len(loops) > 1:
        raise SiteError(sorted(loops)[1], f"is a second sg.scan loop with latent sites "
                        f"({sorted(loops)}); SMC runs one loop")
    loop = loops.pop()
    for name in scg.nodes:
        for c in scg.credited_costs(name):
            if loop not in scg.costs[c].plates:
                raise SiteError(scg.costs[c].site, f"is a cost after the sg.scan loop "
                                f"'{loop}' that depends "
                                f"on its latent '{name}'; SMC weighs the particles step by "
                                "step inside the loop: observe it inside the loop")
    score = []
    for name, node in scg.nodes.items():
        est = node.estimator
        if _is_pathwise(est):
            continue
        if type(est) is ScoreFunction and est.baseline is None:
            score.append(name)
            continue
        raise SiteError(name, f"uses {type(est).__name__}, which SMC does not serve: its "
                        "signal is the SMC bound shared by all particles; use Pathwise() for "
                        "a reparameterisable site and ScoreFunction() otherwise")
    return loop, tuple(score)


def _is_pathwise(est: Estimator) -> bool:
    """A reparameterised estimator that draws from the site's own distribution (no learning
    signal, no relaxation, no stopped density)."""
    return (est.reparameterised and not est.uses_signal and not est.stops_own_density
            and not est.enumerates
            and type(est).transform_fn is Estimator.transform_fn)


# -- one particle ------------------------------------------------------------------------------


class _loop_requests(Messenger):
    """Ask the loop ``loop`` for a runner and each site's log-density inside the step; in the
    model, set the loop's latent sites to the guide's values at the current step."""

    scan_role = "step"

    def __init__(self, fn: Callable | None, loop: str, runner: Callable,
                 current: dict | None = None):
        super().__init__(fn)
        self.loop = loop
        self.runner = runner
        self.current = current
        self._step: Any = None

    def for_step(self, step: Any) -> _loop_requests:
        return handlers.at_step(self, step)

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "scan" and msg["name"] == self.loop:
            msg["kwargs"]["runner"] = self.runner
            msg["kwargs"]["step_log_prob"] = site_log_prob
            return
        if (self.current is None or self.current.get("values") is None or self._step is None
                or msg["type"] != "sample" or msg["is_observed"]):
            return  # (the loop's abstract runs before the steps: nothing to set)
        if msg["name"] not in self.current["values"]:
            raise SiteError(msg["name"], f"is a latent site of the model's sg.scan "
                            f"'{self.loop}' that the guide's step does not sample")
        msg["value"] = self.current["values"][msg["name"]]
        msg["in_support"] = True


def _run_particle(smc: SMC, loop: str, score_sites: tuple[str, ...], particle_key: jax.Array,
                  resample_key: jax.Array, params: dict, model: Callable, guide: Callable,
                  args: tuple, kwargs: dict) -> tuple[dict, float]:
    """One particle's part (inside the particles' ``vmap``): the guide runs up to its loop,
    whose runner runs the model (on a handler stack of its own) up to the model's loop, whose
    runner runs both steps side by side; then the model finishes, then the guide."""
    plate_sizes: dict[str, tuple] = {}
    current: dict = {"values": None}
    result: dict = {}

    def joint(body, init, steps, xs, sites):
        final_m, final_g, outputs_m, outputs_g, result["particle"] = _smc_loop(
            smc, loop, score_sites, result["guide_loop"], (body, init, steps, xs, sites),
            current, resample_key)
        result["guide_outputs"] = final_g, outputs_g
        return final_m, outputs_m

    model_fn = _loop_requests(handlers.substitute_unconstrained(model, params), loop, joint,
                              current)
    model_fn = handlers.seed(handlers.same_plate_sizes(model_fn, plate_sizes, "model"),
                             stepped_prng.fold_in(particle_key, 1))

    def run_model(body, init, steps, xs, sites):
        result["guide_loop"] = body, init, steps, xs, sites
        saved = list(primitives._HANDLER_STACK)
        primitives._HANDLER_STACK.clear()
        try:
            result["model_trace"] = handlers.trace(model_fn).get_trace(*args, **kwargs)
        finally:
            primitives._HANDLER_STACK[:] = saved
        if "particle" not in result:
            raise SiteError(loop, "is the loop of the guide's latent sites, but the model runs "
                            "no sg.scan of that name")
        return result["guide_outputs"]

    guide_fn = _loop_requests(handlers.substitute_unconstrained(guide, params), loop, run_model)
    with program.estimate(num_particles=smc.num_particles, default=smc.default_estimator):
        handlers.seed(handlers.same_plate_sizes(guide_fn, plate_sizes, "guide"),
                      particle_key)(*args, **kwargs)
    if "model_trace" not in result:
        raise SiteError(loop, "is the loop of the model's latent sites, but the guide runs no "
                        "sg.scan of that name")
    model_tr = result["model_trace"]
    out = result["particle"]
    fixed, scales = 0.0, set()
    for name, msg in model_tr.items():
        if msg["type"] != "sample":
            continue
        in_loop = any(f.time for f in msg["cond_indep_stack"])
        if in_loop:
            if msg.get("mask") is not None:
                raise SiteError(name, "is masked (sg.handlers.mask); SMC does not support "
                                "masks on the loop's sites yet")
            scale = msg.get("scale")
            if scale is not None and not isinstance(scale, (int, float)):
                raise SiteError(name, "has a scale that is an array; SMC supports a constant "
                                "scale only (a sub-sampling ratio)")
            scales.add(1.0 if scale is None else float(scale))
        elif msg["is_observed"]:
            fixed = fixed + site_cost(msg).sum()  # costs with no latent: the same in every path
    if len(scales) > 1:
        raise SiteError(loop, f"has sites of different scales {sorted(scales)}; SMC needs one "
                        "(the sub-sampling ratio of the plates around the loop)")
    out["fixed"] = jnp.asarray(fixed, jnp.float32)
    return out, scales.pop() if scales else 1.0


def _smc_loop(smc: SMC, loop: str, score_sites: tuple[str, ...], guide_loop: tuple,
              model_loop: tuple, current: dict, resample_key: jax.Array
              ) -> tuple[Any, Any, Any, Any, dict]:
    """The guide's and the model's steps side by side in one ``lax.scan``, the particles
    weighted and resampled at each step. Returns the model's and the guide's final carries
    and ``(ys, arrays)``, and this particle's per-step arrays."""
    body_g, init_g, steps_g, xs_g, sites_g = guide_loop
    body_m, init_m, steps_m, xs_m, sites_m = model_loop
    length = int(steps_m["index"].shape[0])
    if int(steps_g["index"].shape[0]) != length:
        raise SiteError(loop, f"has {steps_g['index'].shape[0]} steps in the guide and "
                        f"{length} in the model")
    outer = _outer_frames()
    shape = _outer_shape(outer)
    k = smc.num_particles
    particles = _Particles(k)
    uniforms = _uniforms(smc, particles, resample_key, length, shape)  # before the loop

    try:  # the guide's input-only work (its draws' noise) for all steps before the loop
        in_g, run_g = control_flow.split_step(body_g, init_g, (steps_g, xs_g))
    except Exception:  # noqa: BLE001 -- nothing to split off, or the split does not apply
        in_g, run_g = (steps_g, xs_g), body_g

    def step(carry, inputs):
        cg, cm, log_w = carry
        r_g, in_m, u, t = inputs
        cg, out_g = run_g(cg, r_g)
        latent = [n for n, m in sites_g.items() if m["type"] == "sample" and not m["is_observed"]]
        current["values"] = {n: out_g[1][n]["value"] for n in latent}
        cm, out_m = body_m(cm, in_m)
        log_q = {n: _onto(out_g[1][n]["step_log_prob"], sites_g[n], outer, shape)
                 for n in latent}
        log_p = sum(_onto(out_m[1][n]["step_log_prob"], m, outer, shape)
                    for n, m in sites_m.items() if m["type"] == "sample")
        log_w = log_w + log_p - sum(log_q.values())
        score_log_q = sum((log_q[n] for n in score_sites), jnp.zeros(shape))
        delta, ancestor, ancestor_log_prob, resampled, log_w = _resample(
            smc, particles, log_w, u, t == length - 1)
        if smc.resample is not None:  # (without, every particle is its own ancestor)
            # one resampling of a leaf that the model's carry shares with the guide's (the
            # model's step returns the guide's draw: the same traced array)
            cg, cm = _follow((cg, cm), ancestor, particles, shape, loop)
        per_step = {"delta": delta, "score_log_q": score_log_q,
                    "ancestor_log_prob": ancestor_log_prob, "resampled": resampled}
        return (cg, cm, log_w), (out_g, out_m, per_step)

    init = (init_g, init_m, jnp.zeros(shape))
    # (the guide's step only: hoisting the joint step's input-only work, as sg.scan does,
    # measured 1.9x slower, K = 256, T = 1,000: the resampling's per-particle constants became
    # (K, T, K) arrays)
    (final_g, final_m, _), (outputs_g, outputs_m, per_step) = jax.lax.scan(
        step, init, (in_g, (steps_m, xs_m), uniforms, jnp.arange(length)))
    return final_m, final_g, outputs_m, outputs_g, per_step


def _outer_frames() -> list[primitives.CondIndepFrame]:
    """The frames of the plates open around the loop (the active handlers at its call)."""
    return [h._frame for h in primitives._HANDLER_STACK
            if isinstance(h, primitives.plate) and h._frame is not None]


def _outer_shape(frames: list) -> tuple[int, ...]:
    if not frames:
        return ()
    ndim = -min(f.dim for f in frames)
    shape = [1] * ndim
    for f in frames:
        shape[ndim + f.dim] = f.size
    return tuple(shape)


def _onto(log_prob: jax.Array, msg: Message, outer: list, shape: tuple[int, ...]) -> jax.Array:
    """A step site's log-density (its batch shape) summed onto the plates around the loop."""
    names = {f.name for f in outer}
    lp = jnp.broadcast_to(log_prob, tuple(msg["fn"].batch_shape))
    keep = {lp.ndim + f.dim for f in msg["cond_indep_stack"] if f.name in names}
    lp = jnp.sum(lp, axis=tuple(i for i in range(lp.ndim) if i not in keep), keepdims=True)
    lp = lp.reshape(lp.shape[lp.ndim - len(shape):]) if shape else lp.reshape(())
    return jnp.broadcast_to(lp, shape)


class _Particles:
    """The particles' axis seen from one particle: the ``vmap`` axis, or nothing at K = 1."""

    def __init__(self, k: int):
        self.k = k

    def gather(self, x: jax.Array) -> jax.Array:
        """Every particle's ``x``, ``(K, ...)``: the same array in every particle."""
        return x[None] if self.k == 1 else jax.lax.all_gather(x, PARTICLE_AXIS)

    def me(self) -> jax.Array:
        return jnp.zeros((), jnp.int32) if self.k == 1 else jax.lax.axis_index(PARTICLE_AXIS)


def _uniforms(smc: SMC, particles: _Particles, key: jax.Array, length: int,
              shape: tuple[int, ...]) -> jax.Array:
    """The resampling's uniforms of every step, drawn at once before the loop (a hash per step
    inside the loop costs about as much as a small step on CPU), ``(T, elements)``: per step
    one per element of the outer plates, the same in every particle (systematic), or this
    particle's column of ``K`` per element (multinomial: the ``K`` drawn from the same key in
    every particle, this one taken here, once, rather than at every step)."""
    elements = math.prod(shape)
    if smc.resample != "multinomial":
        return jax.random.uniform(key, (length, elements))
    every = jax.random.uniform(key, (length, smc.num_particles, elements))
    return jnp.take(every, particles.me(), axis=1)


def _resample(smc: SMC, particles: _Particles, log_w: jax.Array, u: jax.Array,
              last: jax.Array) -> tuple[jax.Array, ...]:
    """``(delta log Z, ancestor, its log-probability, resampled, new log-weight)`` of this
    particle, per element of the outer plates."""
    k = smc.num_particles
    every = particles.gather(log_w)  # (K, *outer)
    total = jax.nn.logsumexp(every, axis=0)
    me = particles.me()
    mine = jnp.broadcast_to(me, log_w.shape)
    if smc.resample is None:
        delta = jnp.where(last, total - math.log(k), 0.0)
        return delta, mine, jnp.zeros_like(log_w), jnp.zeros(log_w.shape, bool), log_w
    ess = jnp.exp(2.0 * total - jax.nn.logsumexp(2.0 * every, axis=0))
    do = jax.lax.stop_gradient(ess < smc.ess_threshold * k) & ~last
    log_norm = every - total
    position = (me + u) / k if smc.resample != "multinomial" else u
    drawn = _ancestor(position, jax.lax.stop_gradient(log_norm))  # (*outer)
    ancestor = jnp.where(do, drawn, mine)
    chosen = jnp.take_along_axis(log_norm, ancestor[None], axis=0)[0]
    ancestor_log_prob = jnp.where(do, chosen, 0.0)
    delta = jnp.where(do | last, total - math.log(k), 0.0)
    return delta, ancestor, ancestor_log_prob, do, jnp.where(do, 0.0, log_w)


def _ancestor(position: jax.Array, log_norm: jax.Array) -> jax.Array:
    """This particle's ancestor index per element, drawn from the normalised weights
    (``log_norm``, ``(K, *outer)``, the same in every particle) by inverting their cumulative
    sum at ``position`` (``(elements,)`` in ``[0, 1)``: ``(k + u) / K`` for particle ``k``
    (systematic), or its own uniform (multinomial)). Each particle searches for its own
    position only: under the particles' ``vmap`` that is one ``(K,)`` search per element,
    O(K log K), with no ``(K, K)`` array and no gather of the ``K`` drawn indices."""
    k = log_norm.shape[0]
    flat = log_norm.reshape((k, -1))
    cum = jnp.cumsum(jnp.exp(flat), axis=0)
    if flat.shape[1] == 1:  # one sequence: a search of a (K,) array, not of a (K, 1) column
        found = jnp.searchsorted(cum[:, 0], position.reshape(()) * cum[-1, 0])
    else:
        found = jax.vmap(jnp.searchsorted, in_axes=(1, 0))(cum, position * cum[-1])
    return jnp.minimum(found, k - 1).reshape(log_norm.shape[1:])


def _follow(carry: Any, ancestor: jax.Array, particles: _Particles, shape: tuple[int, ...],
            loop: str) -> Any:
    """Each element's carry replaced by its ancestor particle's. A leaf that occurs more than
    once in ``carry`` (the same array object: the model's carry holding the guide's draw) is
    resampled once, so that the forward pass gathers it once and the backward pass
    scatter-adds its cotangents once."""
    done: dict[int, tuple[Any, jax.Array]] = {}

    def leaf(x):
        seen = done.get(id(x))
        if seen is not None:
            return seen[1]
        done[id(x)] = x, resampled(x)  # (x kept alive: its id stays unique)
        return done[id(x)][1]

    def resampled(x):
        x = jnp.asarray(x)
        if tuple(x.shape[:len(shape)]) != shape:
            raise SiteError(loop, f"has a carry leaf of shape {x.shape} inside plates of shape "
                            f"{shape}; SMC resamples each sequence of the batch on its own, so "
                            "every leaf of the carry must start with the plates' axes")
        every = particles.gather(x)  # (K, *outer, ...)
        index = ancestor.reshape((1, *shape) + (1,) * (x.ndim - len(shape)))
        index = jnp.broadcast_to(index, (1, *x.shape))
        return jnp.take_along_axis(every, index, axis=0)[0]

    return jax.tree.map(leaf, carry)
