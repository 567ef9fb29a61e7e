"""Stepped keys: the PRNG keys that ``sg.scan`` gives the sites of its body, one counter-mode
threefry stream per site across the steps of the loop.

A stepped key is a threefry key ``(k0, k1)`` and a step ``t``. Its random bits of shape ``S``
are ``threefry2x32((k0, k1), (t, i))`` for ``i = 0 .. |S| - 1`` (the high and low words of
the counter; ``x ^ y`` of the hash's two words for 32 bits, as JAX's partitionable threefry
does): a site's draws of all the steps are one stream of one key, at distinct counters. Drawn
for all steps at once (``sg.scan`` hoists the draws out of the loop), they cost one hash per
32-bit word, as a single ``jax.random.normal(key, (T, *S))`` does, where a key split per step
and then drawn from costs two (the split's and the draw's).

The hash is threefry2x32 written out as its 20 rounds of elementwise ``jnp`` operations (the
same words as ``jax.extend.random.threefry2x32_p``), not that primitive: on the CPU the
primitive is a loop of 5 iterations, whose state holds every key word at the shape of the
draw, so a draw from ``(K, T)`` stepped keys read and wrote ``(K, T)`` key arrays at each
iteration and cost as much as a split and a draw. Written out, XLA fuses the hash with the
broadcasts that make the keys, and a site's draws of all steps cost what one draw of the
whole ``(T, ...)`` array from one key does (``bench/bench_smc.py``).

``split`` and ``fold_in`` of a stepped key first hash its step into a plain threefry key,
``threefry2x32((k0, k1), (2^31 + t, 0))`` (a counter that no draw reaches while ``t < 2^31``),
then split or fold that key as JAX's partitionable threefry does (the counters ``(0, i)``,
``(0, value)``; with the same written-out hash); the keys they return are stepped keys at
step 0, whose bits are those of the plain threefry key. So a key a site derives from its
stepped key is as independent of the stream as a split key is, and deriving it costs no loop.

:func:`split` and :func:`fold_in` are ``jax.random.split`` and ``jax.random.fold_in`` with the
same written-out hash for threefry keys (the same keys as JAX's partitionable threefry, JAX's
default): the handlers derive each particle's and each site's keys with them, so that those
keys cost no CPU loop either.

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = jax.random.key(0)
    >>> keys = step_keys(base, 4)            # the keys of steps 0 .. 3
    >>> draws = jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys)
    >>> draws.shape, bool(jnp.all(draws[0] != draws[1]))
    ((4, 2), True)
    >>> bool(jnp.all(jax.random.normal(keys[0], (2,)) == draws[0]))   # a key, its stream
    True
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

__all__ = ["STEPPED", "fold_in", "split", "step_keys"]

_UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}
_DERIVE = np.uint32(2**31)  # the high counter word of the key that split / fold_in hash to
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _threefry(k0: jax.Array, k1: jax.Array, hi: jax.Array, lo: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """threefry2x32 of the counters ``(hi, lo)`` under the key ``(k0, k1)`` (Salmon et al.,
    SC 2011; 20 rounds, key injected every 4): elementwise, the operands broadcast."""
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = hi + ks[0], lo + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _plain(data: jax.Array) -> jax.Array:
    """The threefry key data ``(..., 2)`` that ``split`` and ``fold_in`` start from."""
    k0, k1, t = data[..., 0], data[..., 1], data[..., 2]
    x, y = _threefry(k0, k1, _DERIVE | t, jnp.zeros_like(t))
    return jnp.stack([x, y], axis=-1)


def _stepped(threefry_data: jax.Array) -> jax.Array:
    """Plain threefry key data ``(..., 2)`` as stepped key data at step 0, ``(..., 3)``."""
    zero = jnp.zeros(threefry_data.shape[:-1] + (1,), np.uint32)
    return jnp.concatenate([threefry_data, zero], axis=-1)


def _seed(seed: jax.Array) -> jax.Array:
    return _stepped(jex_random.threefry_prng_impl.seed(seed))


def _index(shape: tuple[int, ...]) -> jax.Array:
    """``0 .. |shape| - 1`` as ``uint32``, in ``shape``."""
    if math.prod(shape) >= 2**32:
        raise NotImplementedError("a stepped key draws fewer than 2**32 words at a time")
    return jax.lax.iota(np.uint32, math.prod(shape)).reshape(shape)


def _split_words(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """JAX's partitionable threefry split of the key words ``(2,)``: the counters ``(0, i)``,
    ``(*shape, 2)``."""
    index = _index(shape)
    x, y = _threefry(words[0], words[1], jnp.zeros_like(index), index)
    return jnp.stack([x, y], axis=-1)


def _fold_in_words(words: jax.Array, value: Any) -> jax.Array:
    """JAX's threefry fold_in of the key words ``(2,)``: the counter ``(0, value)``."""
    x, y = _threefry(words[0], words[1], np.uint32(0), jnp.asarray(value).astype(np.uint32))
    return jnp.stack([x, y], axis=-1)


def _split(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return _stepped(_split_words(_plain(data), shape))


def _fold_in(data: jax.Array, value: jax.Array) -> jax.Array:
    return _stepped(_fold_in_words(_plain(data), value))


def _random_bits(data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    x, y = _threefry(data[0], data[1], data[2], _index(shape))
    dtype = _UINT[bit_width]
    if bit_width == 64:
        return (x.astype(dtype) << dtype(32)) | y.astype(dtype)
    return (x ^ y).astype(dtype)


#: the PRNG implementation of stepped keys (key data ``(k0, k1, t)``, three ``uint32``)
STEPPED = jex_random.define_prng_impl(
    key_shape=(3,), seed=_seed, split=_split, random_bits=_random_bits, fold_in=_fold_in,
    name="scgjax_stepped", tag="stp")


def step_keys(key: jax.Array, length: int, shape: tuple[int, ...] = ()) -> jax.Array:
    """Stepped keys ``(length, *shape)``: for each of the ``prod(shape)`` streams a threefry
    key split from ``key`` (one hash each, not one per step), at the steps ``0 .. length - 1``.

    Example:
        >>> step_keys(jax.random.key(1), 5, (2,)).shape
        (5, 2)
    """
    # (*shape, 2): the threefry words (a stepped key splits into stepped keys at step 0)
    bases = jax.random.key_data(split(key, shape))[..., :2]
    bases = jnp.broadcast_to(bases, (length, *bases.shape))
    steps = jnp.broadcast_to(jnp.arange(length, dtype=np.uint32).reshape(
        (length,) + (1,) * (len(shape) + 1)), (length, *shape, 1))
    return jax.random.wrap_key_data(jnp.concatenate([bases, steps], axis=-1), impl=STEPPED)


def _written_out(key: jax.Array) -> bool:
    """Whether :func:`split` and :func:`fold_in` of ``key`` can use the written-out hash and
    give JAX's keys: a single typed threefry key with JAX's partitionable threefry (the
    default). A key array falls back to ``jax.random``, which refuses it ("use jax.vmap")."""
    return (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and jnp.ndim(key) == 0
            and str(jax.random.key_impl(key)) == "threefry2x32"
            and bool(jax.config.jax_threefry_partitionable))


def split(key: jax.Array, num: int | tuple[int, ...] = 2) -> jax.Array:
    """``jax.random.split(key, num)``, the same keys, with the hash written out for a
    threefry key (as for a stepped key): no CPU threefry loop, so that the keys that handlers
    derive per particle and per site fuse with their use. Falls back to ``jax.random.split``
    for other implementations, or with ``jax_threefry_partitionable`` off.

    Example:
        >>> key = jax.random.key(3)
        >>> bool((jax.random.key_data(split(key, 4))
        ...       == jax.random.key_data(jax.random.split(key, 4))).all())
        True
    """
    shape = (int(num),) if np.ndim(num) == 0 else tuple(num)
    if not _written_out(key):
        return jax.random.split(key, shape)
    return jax.random.wrap_key_data(_split_words(jax.random.key_data(key), shape))


def fold_in(key: jax.Array, data: Any) -> jax.Array:
    """``jax.random.fold_in(key, data)``, the same key, written out as :func:`split` is.

    Example:
        >>> key = jax.random.key(3)
        >>> bool((jax.random.key_data(fold_in(key, 7))
        ...       == jax.random.key_data(jax.random.fold_in(key, 7))).all())
        True
    """
    if not _written_out(key):
        return jax.random.fold_in(key, data)
    return jax.random.wrap_key_data(_fold_in_words(jax.random.key_data(key), jnp.uint32(data)))
