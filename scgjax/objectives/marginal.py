"""Exact marginalisation of a model's discrete sites (``infer={"enumerate": "parallel"}``).

A latent site of the model marked ``infer={"enumerate": "parallel"}`` that the guide does not
sample is summed out. The model runs once per joint value of the marginalised sites (a ``vmap``
over configurations, as for ``sg.Enumerate``; every element of a site set to the configuration's
value), and the costs that depend on them (their own log-densities, the log-densities and factors
their values reach, :attr:`scgjax.tracegraph.Marginal.costs`) are replaced by one cost per
element ``n`` of the sites' plates,

    M[n] = logsumexp_config  sum_{c depends on z}  c(config) summed onto n,

the log of the marginal density of everything the sites touch (Pyro's and NumPyro's
``TraceEnum_ELBO`` for one group of sites that share their plates; Obermeyer et al. 2019 for the
general case). Within a plate the sum is per element and the elements multiply; the costs'
other plates are summed inside the ``log``. Sampled guide sites upstream of those costs are
credited with ``M`` (its DiCE box is theirs): a global latent's learning signal includes the
marginal of the local terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from scgjax.dist import joint_support
from scgjax.errors import SiteError
from scgjax.estimators.enumerate import check_joint_support
from scgjax.layout import reduce_to
from scgjax.objectives.checks import check_enumerated_batch
from scgjax.primitives import Message, Messenger
from scgjax.tracegraph import Marginal

__all__ = ["MAX_CONFIGS", "collapse", "marginalise", "wants_enumeration"]

#: the most joint values of the marginalised sites an objective enumerates
MAX_CONFIGS = 2**16


def wants_enumeration(msg: Message) -> bool:
    """A latent sample site marked ``infer={"enumerate": "parallel"}``."""
    return (msg["type"] == "sample" and not msg["is_observed"]
            and (msg.get("infer") or {}).get("enumerate") == "parallel")


class marginalise(Messenger):
    """Set each of the model's sites to be summed out (marked for enumeration, not sampled
    by the guide) to the support value that ``enum_index`` picks (the first one without it)."""

    scan_role = "step"

    def __init__(self, fn: Callable | None = None, guide_trace: dict | None = None,
                 enum_index: dict | None = None):
        super().__init__(fn)
        self.guide_trace = guide_trace or {}
        self.enum_index = enum_index or {}

    def process_message(self, msg: Message) -> None:
        if not wants_enumeration(msg) or msg["name"] in self.guide_trace:
            return
        fn = msg["fn"]
        if not getattr(fn.support, "is_discrete", False):
            raise SiteError(msg["name"], f"is marked infer={{'enumerate': 'parallel'}}, but its "
                            f"{type(fn).__name__} distribution is not discrete with a finite "
                            "support: only discrete sites can be summed out")
        check_joint_support(msg["name"], fn, "is summed out (infer={'enumerate': 'parallel'})")
        check_enumerated_batch(msg, "is summed out (infer={'enumerate': 'parallel'})")
        support = joint_support(fn, self.enum_index.get(msg["name"], 0))
        msg["value"] = jnp.broadcast_to(support, (*fn.batch_shape, *fn.event_shape))
        msg["marginalised"] = True
        msg["in_support"] = True


def check_budget(marginal: Marginal, max_configs: int = MAX_CONFIGS) -> None:
    """The joint support of the marginalised sites must fit the budget."""
    n = math.prod(marginal.sizes)
    if n > max_configs:
        raise SiteError(marginal.sites[0], f"is summed out jointly with {list(marginal.sites)}: "
                        f"{n} joint values, more than the budget of {max_configs}")


def collapse(marginal: Marginal, costs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Replace the costs of ``marginal`` (arrays ``(K, configs, *plates)``) by their
    per-element log-sum-exp over the configurations (``(K, *plates)``); every other cost is the
    same in every configuration and keeps the first. With a scale ``s`` (sub-sampling), the
    sum is ``s * logsumexp(sum_c c / s)``: each element's marginal, weighted like its costs."""
    out = {c: v[:, 0] for c, v in costs.items() if c not in marginal.costs}
    total = None
    for c in marginal.costs:
        x = costs[c]
        k, n = x.shape[:2]
        x = reduce_to(x.reshape((k * n, *x.shape[2:])), marginal.keep)
        x = x.reshape((k, n, *x.shape[1:]))
        total = x if total is None else total + x
    # the costs are scaled (a sub-sampled plate): the log of the sum is of the unscaled ones
    s = marginal.scale
    out[marginal.id] = s * jax.nn.logsumexp(total / s if s != 1.0 else total, axis=1)
    return out
