"""DReG, the doubly reparameterised gradient of the multi-sample bound (Tucker, Lawson, Gu &
Maddison, ICLR 2019)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from scgjax.estimators.pathwise import Pathwise


@dataclasses.dataclass(frozen=True)
class DReG(Pathwise):
    """The doubly reparameterised gradient of ``sg.IWAE``'s bound for a reparameterised guide
    site ``z = g(eps; phi)``.

    IWAE's gradient in the guide's parameters is ``sum_k w^_k (d log w_k/dz_k dz_k/dphi -
    d log q_phi(z_k)/dphi)`` with self-normalised weights ``w^_k``; the score term's mean equals
    that of ``sum_k (w^_k^2 - w^_k) d log w_k/dz_k dz_k/dphi`` (a second reparameterisation), so

        grad_phi L_K  =  E[ sum_k w^_k^2  (d log w_k / d z_k)  dz_k / dphi ],

    whose signal-to-noise ratio does not fall as ``K`` grows (standard IWAE's does, Rainforth
    et al. 2018). Per plate element of the bound, like IWAE. The model's parameters keep IWAE's
    gradient. ``d log w_k / d z_k`` is the derivative of the costs downstream of ``z`` with
    respect to its value (one extra backward pass); the site's own density is taken at
    gradient-stopped parameters.

    For ``sg.IWAE`` only: under another objective it is an error naming the site. Refused too
    when the site's value feeds the distribution of another reparameterised site (the path
    through that site's value would be lost); score-estimated sites (VIMCO) may sit upstream or
    downstream of it.

    Example:
        >>> import jax, jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def model():
        ...     z = sg.sample("z", dist.Normal(0.0, 1.0))
        ...     sg.sample("x", dist.Normal(z, 1.0), obs=1.0)
        >>> guide = lambda: sg.sample("z", dist.Normal(sg.param("m", 0.0), 1.0), estimator=DReG())
        >>> g = jax.grad(sg.IWAE(num_particles=8).loss, argnums=1)(
        ...     jax.random.key(0), {"m": jnp.array(0.0)}, model, guide)
        >>> bool(g["m"] < 0)   # the posterior mean is 1/2: m goes up
        True
    """

    needs_signal_grad = True
    stops_own_density = True
    bound_signal = "doubly_reparameterised"
    needs_bound = True

    def sample(self, rng_key: jax.Array, fn: Any) -> jax.Array:
        """The reparameterised draw, with its path stopped: it reaches the guide's parameters
        through the DReG term only (:meth:`collect` draws it again, differentiably)."""
        return jax.lax.stop_gradient(fn.rsample(rng_key))

    def collect(self, msg: dict) -> jax.Array:
        """The same draw as :meth:`sample` (same key), differentiable in the parameters."""
        return msg["fn"].rsample(msg["kwargs"]["rng_key"])

    def bound_refusal(self) -> str:
        return ("uses DReG, the doubly reparameterised gradient of the IWAE bound (alpha = 0); "
                "use Pathwise() here")
