"""Sticking the landing (STL): the pathwise gradient without the score of the guide's own
density (Roeder, Wu & Duvenaud, NeurIPS 2017)."""

from __future__ import annotations

import dataclasses

from scgjax.estimators.pathwise import Pathwise


@dataclasses.dataclass(frozen=True)
class STL(Pathwise):
    """Pathwise through ``w = g(eps; phi)``, with the site's own ``-log q_phi(w)`` taken at
    gradient-stopped distribution parameters.

    The pathwise gradient of ``E_q[log p(x, w) - log q_phi(w)]`` is

        E[(grad_w log p(x, w) - grad_w log q_phi(w)) dw/dphi]  -  E[grad_phi log q_phi(w)|_w],

    and the last term, the score of ``q`` at a fixed ``w``, has mean zero (Roeder et al. 2017):
    STL drops it. The estimate stays unbiased (first order) and its variance vanishes when
    ``q`` is the exact posterior, where ``log p(x, w) - log q(w)`` is constant in ``w``. Per
    site and per plate element: only the site's own density is detached (its parameters may
    depend on other sites; the path through its value is kept).

    Under a multi-sample bound (``sg.IWAE``) the dropped term does not have mean zero, so STL
    is refused there with an error naming the site; it is for ``sg.ELBO``.

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> model = lambda: sg.sample("x", dist.Normal(sg.sample("z", dist.Normal(0., 1.)), 1.),
        ...                           obs=1.0)
        >>> def guide():   # at the exact posterior N(1/2, 1/2)
        ...     sg.sample("z", dist.Normal(sg.param("m", 0.5), jnp.sqrt(0.5)), estimator=STL())
        >>> grad = jax.grad(sg.ELBO().loss, argnums=1)
        >>> [float(grad(jax.random.key(k), {"m": jnp.array(0.5)}, model, guide)["m"])
        ...  for k in range(2)]
        [0.0, 0.0]
    """

    stops_own_density = True

    def bound_refusal(self) -> str:
        return ("uses STL, which drops the score of the guide's own density: under a "
                "multi-sample bound that term does not have mean zero, so the gradient would "
                "be biased; use Pathwise() there")
