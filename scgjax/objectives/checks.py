"""Checks of a program against an objective, run once per trace (never in the jitted step).

Each raises a :class:`~scgjax.errors.SiteError` naming the site, or warns about an argument
that would be silently ignored: a latent the guide does not sample, a guide whose support is
not inside the model's, an enumerated batch dim no plate declares, a params key no program
declares, an ``estimator=`` the objective ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import biject_to

from scgjax import handlers
from scgjax.dist import innermost
from scgjax.errors import SiteError
from scgjax.primitives import Message
from scgjax.tracegraph import GUIDED, is_latent


def is_delta(fn: Any) -> bool:
    """Whether ``fn`` is a point mass (possibly wrapped)."""
    return type(innermost(fn)).__name__ == "Delta"


def check_enumerated_batch(msg: Message, what: str = "uses Enumerate") -> None:
    """Enumeration sets every element of a site to one support value per configuration, which
    is exact only along plates (element ``n`` of a cost depends on element ``n`` alone): a batch
    dimension of size > 1 that no plate declares would be enumerated jointly as if all its
    elements were equal, a wrong number. Refuse it, naming the site."""
    batch = tuple(msg["fn"].batch_shape)
    dims = {f.dim for f in msg["cond_indep_stack"]}
    free = [d for d in range(-len(batch), 0) if d not in dims and batch[d] > 1]
    if free:
        raise SiteError(
            msg["name"], f"{what}, but its batch shape {batch} has dim {free[0]} (size "
            f"{batch[free[0]]}) that no plate declares; enumeration is exact per plate element "
            "only: declare that dim with sg.plate",
        )


def check_guided(model_tr: dict, guide_tr: dict) -> None:
    for name, msg in guide_tr.items():
        if msg["type"] != "sample":
            continue
        if msg["is_observed"]:
            raise SiteError(name, "is observed in the guide; observe data in the model only")
        other = model_tr.get(name)
        if other is None or other["type"] != "sample":
            raise SiteError(name, "is sampled by the guide, but the model has no such site")
        if other["is_observed"]:
            raise SiteError(name, "is sampled by the guide, but the model observes it")
        check_supports(name, msg["fn"], other["fn"])
        if msg.get("in_support") and msg["fn"].support is other["fn"].support:
            other["in_support"] = True  # replayed from the same support: no check needed
    for name, msg in model_tr.items():
        if is_latent(msg) and name not in guide_tr and not msg.get("marginalised"):
            raise SiteError(
                name, "is a latent site of the model that the guide does not sample; add it "
                "to the guide, observe it in the model, or (a discrete site) sum it out with "
                "infer={'enumerate': 'parallel'}"
            )


_UNCONSTRAINED_PROBES = (-7.0, -1.5, -0.3, 0.0, 0.4, 2.0, 6.0)
_MAX_ENUMERATED = 4096
_INTEGER_PROBES = (0, 1, 2, 3, 5, 10, 100)


def check_supports(name: str, guide_fn: Any, model_fn: Any) -> None:
    """The guide's values of site ``name`` must lie in the model site's support.

    A discrete model site with a continuous guide site, or a continuous model site whose
    support does not contain the guide's (a positive model site, a real-valued guide), gives a
    finite or infinite number in numpyro and Pyro and never an error; here it is a
    :class:`~scgjax.errors.SiteError`. The check is on the distributions, once per trace: points
    of the guide's support (``biject_to(support)`` of a few unconstrained values, or every value
    of a finite support) must satisfy the model's support, wherever that can be decided
    without the program's values (supports with traced bounds are not checked).
    """
    g, m = guide_fn.support, model_fn.support
    if g is m:  # one constraint object (e.g. constraints.real): nothing to check
        return
    if m.is_discrete and not g.is_discrete:
        raise SiteError(
            name, f"is discrete in the model ({type(model_fn).__name__}, support {m}) but "
            f"continuous in the guide ({type(guide_fn).__name__}, support {g}); give the guide a "
            "distribution on the model's support (or relax both with sg.GumbelSoftmax)",
        )
    with jax.ensure_compile_time_eval():  # concrete even while a jitted step is traced
        points = _support_points(guide_fn)
        if points is None:
            return
        try:
            inside = m(points)
        except Exception:  # e.g. event shapes that do not match: the value check reports those
            return
    if isinstance(inside, jax.core.Tracer):
        return
    if not np.all(np.asarray(inside)):
        raise SiteError(
            name, f"has support {g} in the guide ({type(guide_fn).__name__}), which is not "
            f"contained in the model's support {m} ({type(model_fn).__name__}): the guide would "
            "propose values the model cannot score. Use a guide distribution on the model's "
            "support (for a positive site, e.g. LogNormal or a TransformedDistribution)",
        )


def _support_points(fn: Any) -> jax.Array | None:
    """A few points of ``fn``'s support (values of ``fn``'s event shape), or ``None``."""
    support = fn.support
    event = tuple(fn.event_shape)
    try:
        if support.is_discrete:
            if not getattr(fn, "has_enumerate_support", False):
                # e.g. a Poisson, or a Bernoulli inside .to_event: the probe integers that lie
                # in the guide's own support
                probes = jnp.broadcast_to(
                    jnp.asarray(_INTEGER_PROBES).reshape((-1,) + (1,) * len(event)),
                    (len(_INTEGER_PROBES), *event))
                inside = np.asarray(support(probes)).reshape(len(_INTEGER_PROBES), -1).all(1)
                return probes[inside] if inside.any() else None
            values = fn.enumerate_support(expand=False)
            if isinstance(values, jax.core.Tracer) or values.size > _MAX_ENUMERATED:
                return None
            return values
        transform = biject_to(support)
        shape = transform.inverse_shape(event)
        points = jnp.stack([transform(jnp.full(shape, u)) for u in _UNCONSTRAINED_PROBES])
    except Exception:  # supports with traced parameters, or no bijection: not checked
        return None
    return None if isinstance(points, jax.core.Tracer) else points


def check_num_particles(num_particles: Any) -> int:
    """``num_particles`` as a Python int: it must be an integer (a Python or numpy int, not a
    bool or a float) of at least 1; a ``TypeError`` or ``ValueError`` that says so otherwise.

    Example:
        >>> import numpy as np
        >>> check_num_particles(np.int64(4))
        4
    """
    if isinstance(num_particles, (bool, np.bool_)) or not isinstance(
            num_particles, (int, np.integer)):
        raise TypeError(f"num_particles must be an int >= 1, got {type(num_particles).__name__} "
                        f"{num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be an int >= 1, got {num_particles!r}")
    return int(num_particles)


def check_params_used(params: Mapping, traces: dict) -> None:
    """Warn about each key of ``params`` that no program declares: not an ``sg.param`` /
    ``sg.module`` site, nor ``"<site>$<key>"`` of a sample site's estimator (a missing param
    is already an error, raised by ``substitute_unconstrained``)."""
    declared = {n for tr in traces.values() for n, m in tr.items() if m["type"] == "param"}
    samples = {n for tr in traces.values() for n, m in tr.items() if m["type"] == "sample"}
    for key in params:
        if key in declared:
            continue
        if isinstance(key, str) and "$" in key and key.split("$", 1)[0] in samples:
            continue
        close = handlers.closest_name(key, sorted(declared))
        handlers.warn_user(
            f"site '{key}' is a key of params but no param of the program"
            + (f" (did you mean '{close}'?)" if close else "")
            + ": it is ignored and gets no gradient")


def check_estimators_used(kind: str, traces: dict) -> None:
    """Warn about each ``estimator=`` that the objective ignores: on an observed site (it is a
    cost, not a random choice), or on a latent site of the model of a guided objective (the
    guide's site is the random choice; its estimator is used)."""
    for role, tr in traces.items():
        for name, msg in tr.items():
            if msg["type"] != "sample" or msg.get("estimator") is None:
                continue
            if msg["is_observed"] and not msg.get("is_factor"):
                handlers.warn_user(
                    f"site '{name}' is observed in the {role}, so its estimator "
                    f"{msg['estimator']!r} is ignored (estimators apply to latent sites only)")
            elif (role == "model" and kind == GUIDED
                  and msg["estimator"] != traces["guide"].get(name, {}).get("estimator")):
                handlers.warn_user(
                    f"site '{name}' has estimator {msg['estimator']!r} in the model, which is "
                    "ignored: the guide samples this site, and the guide's estimator is used "
                    "(give estimator= in the guide)")
