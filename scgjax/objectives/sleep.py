"""Sleep: draws ``(z, x) ~ p_theta`` from a model whose data sites are sampled, not observed.

Wake-sleep style objectives (``sg.WakeSleep``, ``sg.RWS(sleep_phi=...)``,
``sg.AmortisedWakeSleep``) learn from *dreams*: the model run forwards, its observed sites
sampled like latents. :class:`unobserve` does that to a program; :func:`dream` returns one such
joint sample with no gradient through it; :func:`sleep_guide_log_density` scores the dreamt
latents under the guide given the dreamt data (the sleep-phi objective of Hinton et al. 1995).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from scgjax import handlers
from scgjax.errors import ScgjaxError, SiteError
from scgjax.primitives import Message, Messenger
from scgjax.tracegraph import site_log_prob

__all__ = ["dream", "sleep_guide_log_density", "trace_program", "unobserve"]

#: ``sleep_args(observations, *args) -> args``: the guide's positional arguments for a dream
SleepArgs = Callable[..., tuple]


class unobserve(Messenger):
    """Turn observed sample sites (not factors) into latent ones: their value is sampled.

    The site keeps ``was_observed=True`` so that callers can tell the dreamt data from the
    dreamt latents.
    """

    scan_role = "step"

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "sample" and msg["is_observed"] and not msg.get("is_factor"):
            msg["value"] = None
            msg["is_observed"] = False
            msg["was_observed"] = True


def trace_program(fn: Callable, rng_key: jax.Array, params: dict, args: tuple, kwargs: dict,
                  wrap: Callable[[Callable], Callable] | None = None) -> dict:
    """The trace of ``fn(*args, **kwargs)`` at ``params`` (unconstrained), seeded with
    ``rng_key``; ``wrap`` adds handlers inside the substitution (e.g. :class:`unobserve`)."""
    return handlers.trace_program(fn if wrap is None else wrap(fn), rng_key, params, *args,
                                  **kwargs)


def sample_sites(tr: dict) -> dict[str, Message]:
    """The trace's sample sites (factors included), in program order."""
    return {n: m for n, m in tr.items() if m["type"] == "sample"}


def dream(model: Callable, rng_key: jax.Array, params: dict, args: tuple, kwargs: dict,
          objective: str) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(observations, latents)``: one joint sample ``(x, z) ~ p_theta`` of the model run on
    ``args`` with its observed sites sampled, as ``{site: value}`` dicts with
    ``stop_gradient`` on every value. A model with a factor, which cannot be sampled, or with
    no observed site, is an error naming ``objective``."""
    tr = trace_program(model, rng_key, params, args, kwargs, wrap=unobserve)
    observations, latents = {}, {}
    for name, msg in sample_sites(tr).items():
        if msg.get("is_factor"):
            raise SiteError(name, f"is a factor; {objective} samples the model's data in its "
                            "sleep phase and needs a normalised model")
        target = observations if msg.get("was_observed") else latents
        target[name] = jax.lax.stop_gradient(msg["value"])
    if not observations:
        raise ScgjaxError(f"{objective} samples the model's data in its sleep phase, but the "
                          "model observes no site (sg.sample(..., obs=x))")
    return observations, latents


def default_sleep_args(observations: dict[str, jax.Array], *args) -> tuple:
    """The guide's arguments for a dream: the model's only observed site's dreamt value in
    place of the first argument, which must have its shape (``obs=x`` for the data ``x``)."""
    if len(observations) != 1 or not args or not hasattr(args[0], "shape"):
        raise ScgjaxError(
            "the sleep phase gives the guide the model's dreamt data; by default the model "
            "observes one site whose value replaces the first argument, but the model observes "
            f"{sorted(observations)} and its first argument is "
            f"{type(args[0]).__name__ if args else 'missing'}: pass "
            "sleep_args=lambda observations, *args: (...) returning the guide's arguments")
    ((name, value),) = observations.items()
    if jnp.shape(value) != jnp.shape(args[0]):
        raise SiteError(
            name, f"is dreamt with shape {jnp.shape(value)}, but the first argument it should "
            f"replace has shape {jnp.shape(args[0])}; pass sleep_args=lambda observations, "
            "*args: (...) returning the guide's arguments for a dream")
    if jnp.issubdtype(jnp.result_type(args[0]), jnp.floating):
        value = value.astype(jnp.result_type(args[0]))
    return (value, *args[1:])


def sleep_guide_log_density(model: Callable, guide: Callable, rng_key: jax.Array, params: dict,
                            args: tuple, kwargs: dict, sleep_args: SleepArgs | None,
                            objective: str) -> jax.Array:
    """``log q_phi(z | x)`` at a dream ``(x, z) ~ p_theta`` (:func:`dream`), summed over the
    guide's sites (with their ``scale`` and ``mask``): the sleep-phi objective, whose
    ``phi``-gradient ascends ``E_{p_theta(x, z)}[log q_phi(z | x)]``, i.e. descends
    ``E_{p_theta(x)} KL(p_theta(z | x) || q_phi(z | x))``. No gradient reaches ``theta``.

    ``sleep_args(observations, *args)`` gives the guide's positional arguments for the dream
    (default: :func:`default_sleep_args`); keyword arguments are passed unchanged.
    """
    key_model, key_guide = jax.random.split(rng_key)
    observations, latents = dream(model, key_model, params, args, kwargs, objective)
    guide_args = (sleep_args or default_sleep_args)(observations, *args)
    conditioned = trace_program(guide, key_guide, params, tuple(guide_args), kwargs,
                                wrap=lambda fn: handlers.condition(fn, latents))
    total = jnp.zeros(())
    for name, msg in sample_sites(conditioned).items():
        if name not in latents:
            raise SiteError(name, f"is sampled by the guide, but the model's dream (the sleep "
                            f"phase of {objective}) has no such latent")
        lp = site_log_prob(msg)
        if msg.get("scale") is not None:
            lp = lp * msg["scale"]
        total = total + lp.sum()
    return total

