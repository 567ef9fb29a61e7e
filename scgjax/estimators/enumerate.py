"""Exact enumeration of a finite support instead of sampling."""

from __future__ import annotations

import dataclasses
from typing import Any

from scgjax.dist import MAX_JOINT_SUPPORT, joint_support_size
from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator


@dataclasses.dataclass(frozen=True)
class Enumerate(Estimator):
    """Replace sampling by the exact sum over the site's finite support.

    ``E_q(e)[f(e, ...)] = sum_v q(e = v) f(v, ...)``: the program is evaluated for every value
    of the support at once (a ``vmap``, no Python loop), with all elements of the site's
    plates set to the same value ``v``, and every cost is weighted by ``q(e[n] = v)`` of its
    own plate element ``n`` (plates make that exact: element ``n`` of a cost only depends on
    ``e[n]``). Several enumerated sites are enumerated jointly (their weights multiply), and
    sampled sites elsewhere keep their own estimators: the result is exact in the enumerated
    sites and unbiased overall.

    Requires a distribution with a finite support (``Bernoulli``, ``Categorical``, ...; a
    ``.to_event`` of one is enumerated over its joint support, ``2^D`` values for ``D`` bits,
    up to :data:`scgjax.dist.MAX_JOINT_SUPPORT` per event); costs downstream
    of the site must lie in all of its plates, and score-estimated sites must not depend on it
    (use ``Pathwise`` or ``Enumerate`` for those): each is an error naming the site.

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def program():
        ...     z = sg.sample("z", dist.Bernoulli(logits=sg.param("l", 0.0)),
        ...                   estimator=sg.Enumerate())
        ...     sg.factor("f", 3.0 * z)
        >>> params = sg.init_params(0, program)
        >>> float(sg.Expectation().loss(jax.random.key(0), params, program))  # -E[3z], exact
        -1.5
    """

    score = False
    enumerates = True

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        check_joint_support(name, fn, "uses Enumerate")


def check_joint_support(name: str, fn: Any, what: str) -> int:
    """The number of values of one event of site ``name``'s ``fn``
    (:func:`scgjax.dist.joint_support_size`); a :class:`SiteError` when it has none or more
    than :data:`scgjax.dist.MAX_JOINT_SUPPORT`."""
    size = joint_support_size(fn)
    if size is None:
        raise SiteError(name, f"{what}, but {type(fn).__name__} has no finite support to list "
                        "(a discrete distribution such as Bernoulli or Categorical, possibly "
                        ".to_event)")
    if size > MAX_JOINT_SUPPORT:
        raise SiteError(name, f"{what}, but one event of it has {size} values (event shape "
                        f"{tuple(fn.event_shape)}), more than the budget of {MAX_JOINT_SUPPORT}: "
                        "declare some of its dims with sg.plate (enumerated per element)")
    return size
