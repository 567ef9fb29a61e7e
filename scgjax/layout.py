"""Array layouts of per-element quantities: a site's own batch layout and the canonical one.

A site's log-density has the site's batch shape, its plate dims at the negative positions its
plates declare and other dims (a block, e.g. a ``.expand`` that no plate names) wherever the
distribution puts them. Credit assignment compares the elements of *different* sites, so the
surrogate works in one **canonical layout**: one axis per plate of the program, in the program's
plate order, size 1 where the site is not in that plate, and every undeclared dim summed.

    to_canonical:    batch layout (*batch)            ->  canonical (*plates)
    to_value:        canonical (K, *plates)           ->  value layout (K, *batch', *event')
    from_value:      value layout (K, *batch', ...)   ->  canonical (K, *plates)

``batch'``/``event'`` are the site's batch/event shapes with size 1 along the undeclared and
event dims, so ``to_value(x)`` broadcasts against the site's values; ``from_value`` is its
exact inverse (``from_value(to_value(x)) == x``), used to bring a baseline given per element of
the site back to the learning signal's layout. :func:`reduce_to` sums a canonical array over the
plates an element is not credited along.

Example:
    >>> import jax.numpy as jnp
    >>> layout = SiteLayout(batch_shape=(3, 2), event_ndim=0, plate_dims={"data": -2},
    ...                     plate_order=("time", "data"))
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> layout.to_canonical(x).shape        # the block dim -1 summed, a size-1 "time" axis
    (1, 3)
    >>> v = layout.to_value(layout.to_canonical(x)[None])
    >>> v.shape, layout.from_value(v).shape
    ((1, 3, 1), (1, 1, 3))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["SiteLayout", "canonical_shape", "reduce_to"]


@dataclasses.dataclass(frozen=True)
class SiteLayout:
    """Where a site's per-element arrays live.

    Attributes:
        batch_shape: the site's batch shape.
        event_ndim: the number of its event dims.
        plate_dims: ``{plate name: dim}`` for the plates the site is in (negative dims of the
            batch shape).
        plate_order: every plate of the program, in canonical order.
    """

    batch_shape: tuple[int, ...]
    event_ndim: int
    plate_dims: Mapping[str, int]
    plate_order: tuple[str, ...]

    @classmethod
    def of_message(cls, msg: Mapping, plate_order: tuple[str, ...]) -> SiteLayout:
        """The layout of a sample site's message."""
        fn = msg["fn"]
        return cls(tuple(fn.batch_shape), len(fn.event_shape),
                   {f.name: f.dim for f in msg["cond_indep_stack"]}, tuple(plate_order))

    @property
    def _axes(self) -> dict[str, int]:
        """Positive batch axis of each of the site's plates."""
        n = len(self.batch_shape)
        return {p: n + d for p, d in self.plate_dims.items()}

    @property
    def _mine(self) -> list[str]:
        """The site's plates in canonical order."""
        return [p for p in self.plate_order if p in self.plate_dims]

    def to_canonical(self, x: Any) -> jax.Array:
        """A per-element array of the site (broadcastable to its batch shape) in the canonical
        layout: undeclared dims summed, plate axes moved to canonical order, size-1 axes for
        the plates the site is not in. No particle axis."""
        batch = self.batch_shape
        if jnp.shape(x) != batch:
            x = jnp.broadcast_to(x, batch)
        axes = self._axes
        block = tuple(a for a in range(len(batch)) if a not in axes.values())
        if block:
            x = x.sum(axis=block)
        kept = sorted(axes, key=axes.get)  # the remaining axes, in their current order
        order = [kept.index(p) for p in self._mine]
        if order != sorted(order):
            x = jnp.transpose(x, order)
        shape = canonical_shape(self.plate_order, dict(zip(self._mine, x.shape, strict=True)))
        return x if x.shape == shape else jnp.reshape(x, shape)

    def to_value(self, x: jax.Array, event: bool = True) -> jax.Array:
        """``(K, *plates)`` to ``(K, *batch', *event')`` (see the module docstring); without
        ``event``, no trailing event axes."""
        k = x.shape[0]
        mine = self._mine
        x = x.reshape((k, *(x.shape[1 + i] for i, p in enumerate(self.plate_order)
                           if p in self.plate_dims)))
        in_batch = sorted(mine, key=self.plate_dims.get)  # plates in batch-dim order
        x = jnp.transpose(x, (0, *(1 + mine.index(p) for p in in_batch)))
        return x.reshape((k, *self._value_shape(dict(zip(in_batch, x.shape[1:], strict=True))),
                          *((1,) * self.event_ndim if event else ())))

    def from_value(self, x: jax.Array) -> jax.Array:
        """The inverse of :meth:`to_value`: ``(K, *batch')`` (optionally with size-1 event
        axes) to ``(K, *plates)``. ``x`` must have size 1 along the undeclared dims."""
        k, n = x.shape[0], len(self.batch_shape)
        x = x.reshape(x.shape[:1 + n])  # drop the size-1 event axes
        axes = self._axes
        in_batch = sorted(axes, key=axes.get)
        x = x.reshape((k, *(x.shape[1 + axes[p]] for p in in_batch)))  # drop the block dims
        mine = self._mine
        x = jnp.transpose(x, (0, *(1 + in_batch.index(p) for p in mine)))
        return x.reshape((k, *canonical_shape(self.plate_order,
                                              dict(zip(mine, x.shape[1:], strict=True)))))

    def _value_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        shape = [1] * len(self.batch_shape)
        for p, a in self._axes.items():
            shape[a] = sizes[p]
        return tuple(shape)


def canonical_shape(plate_order: tuple[str, ...], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """One axis per plate of ``plate_order``: ``sizes[p]`` for the plates in ``sizes``, else 1."""
    return tuple(sizes.get(p, 1) for p in plate_order)


def reduce_to(x: jax.Array, keep: tuple[bool | frozenset[int], ...]) -> jax.Array:
    """Sum ``x`` (``(K, *plates)``, canonical) over the plate axes not in ``keep``, keeping
    dims: the elements a node is *not* credited along are added up.

    An entry of ``keep`` is ``True`` (element by element), ``False`` (the sum of all elements)
    or, along a loop's time axis, the set of lags ``L`` (signs of ``t - s``) of the elements
    ``t`` of ``x`` that element ``s`` of the result adds up: ``{0, 1}`` the reverse cumulative
    sum (rewards-to-go, ``sum_{t >= s} x_t``), ``{1}`` the strictly later ones, ``{-1, 0}`` the
    cumulative sum, ``{-1, 1}`` all but ``s``. Each is O(T).

    Example:
        >>> reduce_to(jnp.ones((2, 3, 4)), (True, False)).shape
        (2, 3, 1)
        >>> reduce_to(jnp.arange(4.0)[None], (frozenset({0, 1}),)).tolist()
        [[6.0, 6.0, 5.0, 3.0]]
    """
    axes = tuple(i + 1 for i, k in enumerate(keep) if k is False and x.shape[i + 1] > 1)
    out = x.sum(axis=axes, keepdims=True) if axes else x
    for i, lags in enumerate(keep):
        if not isinstance(lags, bool) and x.shape[i + 1] > 1:
            out = _lagged_sum(out, i + 1, lags)
    return out


def _lagged_sum(x: jax.Array, axis: int, lags: frozenset[int]) -> jax.Array:
    """``out_s = sum_{t : sign(t - s) in lags} x_t`` along ``axis``."""
    if lags == {0, 1}:
        return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis), axis)
    if lags == {-1, 0}:
        return jnp.cumsum(x, axis)
    out = jnp.zeros_like(x)
    if 1 in lags:  # the strictly later elements
        out = out + jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis), axis) - x
    if -1 in lags:  # the strictly earlier ones
        out = out + jnp.cumsum(x, axis) - x
    if 0 in lags:
        out = out + x
    return out
