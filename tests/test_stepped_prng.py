"""Stepped keys (``scgjax.stepped_prng``, the keys ``sg.scan`` gives the sites of its body):
their streams are standard normal / uniform, independent across steps, across sites, and of
the keys split or folded from them; the same key gives the same draws; and ``sg.scan``'s
draws are these streams (the same as drawing each step's key directly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.stepped_prng import step_keys

T = 4000


def _normals(keys: jax.Array) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(jax.vmap(lambda k: jax.random.normal(k, ()))))(keys),
                      np.float64)


def _corr_bound(n: int) -> float:
    return 4.0 / np.sqrt(n)  # 4 standard errors of a correlation near 0


def test_streams_are_standard_normal_and_independent():
    """Two sites' streams over T steps: mean, variance, lag-1 and cross correlations within 4
    standard errors; the hashed keys of split / fold_in give streams uncorrelated with them."""
    keys = step_keys(jax.random.key(0), T, (2,))
    x = _normals(keys)
    assert x.shape == (T, 2)
    assert np.all(np.abs(x.mean(0)) < 4 / np.sqrt(T))
    assert np.all(np.abs(x.var(0) - 1) < 4 * np.sqrt(2 / T))
    bound = _corr_bound(T)
    for s in range(2):
        assert abs(np.corrcoef(x[:-1, s], x[1:, s])[0, 1]) < bound
    assert abs(np.corrcoef(x[:, 0], x[:, 1])[0, 1]) < bound
    split = _normals(jax.vmap(jax.vmap(lambda k: jax.random.split(k)[0]))(keys))
    folded = _normals(jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 7)))(keys))
    for other in (split, folded):
        assert abs(np.corrcoef(x[:, 0], other[:, 0])[0, 1]) < bound
        assert np.all(np.abs(other.mean(0)) < 4 / np.sqrt(T))
    # a stepped key's split keys are stepped keys at step 0
    assert jax.random.split(keys[5, 0]).dtype == keys.dtype


def test_bits_are_uniform_at_every_width():
    key = step_keys(jax.random.key(1), 3)[2]
    n = 20000
    for dtype in (jnp.uint8, jnp.uint16, jnp.uint32):
        bits = np.asarray(jax.random.bits(key, (n,), dtype=dtype), np.float64)
        top = np.iinfo(dtype).max + 1.0
        u = bits / top
        assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n), dtype
    u = np.asarray(jax.random.uniform(key, (n,)), np.float64)
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    chi2 = np.sum((counts - n / 20) ** 2 / (n / 20))
    assert chi2 < 19 + 4 * np.sqrt(2 * 19)  # 19 degrees of freedom, 4 standard deviations
    with jax.enable_x64(True):
        b64 = jax.random.bits(key, (4,), dtype=jnp.uint64)
    assert b64.dtype == jnp.uint64


def test_deterministic_and_distinct_per_step():
    a = _normals(step_keys(jax.random.key(3), 10, (1,)))
    b = _normals(step_keys(jax.random.key(3), 10, (1,)))
    c = _normals(step_keys(jax.random.key(4), 10, (1,)))
    assert np.array_equal(a, b)
    assert not np.any(a == c)
    assert len(np.unique(a)) == a.size
    # a stepped key can seed the keys of an inner loop
    inner = step_keys(step_keys(jax.random.key(3), 2)[1], 5)
    assert inner.shape == (5,) and len(np.unique(_normals(inner[:, None]))) == 5


def test_scan_sites_draw_from_stepped_streams():
    """A site in ``sg.scan``: its draws over 4000 steps are standard normal and not
    autocorrelated, a second site's are independent of it, and a site drawing a vector uses
    distinct counters for its elements."""
    def program():
        def step(c, _):
            a = sg.sample("a", dist.Normal(0.0, 1.0))
            b = sg.sample("b", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
            return c, (a, b)

        return sg.scan(step, 0.0, length=T)[1]

    a, b = jax.jit(lambda k: sg.handlers.seed(program, k)())(jax.random.key(5))
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    bound = _corr_bound(T)
    assert abs(a.mean()) < 4 / np.sqrt(T) and abs(a.var() - 1) < 4 * np.sqrt(2 / T)
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < bound
    assert abs(np.corrcoef(a, b[:, 0])[0, 1]) < bound
    assert abs(np.corrcoef(b[:, 0], b[:, 1])[0, 1]) < bound
    assert abs(np.corrcoef(b[:-1, 2], b[1:, 2])[0, 1]) < bound


def test_too_many_words_refused():
    key = step_keys(jax.random.key(0), 1)[0]
    with pytest.raises(NotImplementedError, match="2\\*\\*32"):
        jax.jit(lambda k: jax.random.bits(k, (2**16, 2**16))).lower(key)


def test_hash_is_threefry2x32():
    """The written-out hash gives the words of JAX's threefry2x32 primitive."""
    from jax.extend import random as jex_random

    from scgjax.stepped_prng import _threefry

    words = jax.random.bits(jax.random.key(6), (4, 1000), dtype=jnp.uint32)
    expected = jex_random.threefry2x32_p.bind(*words)
    got = jax.jit(_threefry)(*words)
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(np.asarray(e), np.asarray(g))


def test_draws_of_all_steps_compile_to_no_loop():
    """A site's draws of all steps from its stepped keys, per particle: one fused hash, no
    ``while`` loop over arrays of the draws' shape in the compiled program (the CPU's lowering
    of the threefry primitive is a loop whose state holds every key word at that shape; the
    particles' keys, split from one key, are such loops over ``(8,)`` arrays)."""
    def draws(key):
        keys = jax.vmap(lambda k: step_keys(k, 50, (1,))[:, 0])(jax.random.split(key, 8))
        return jax.vmap(jax.vmap(lambda k: jax.random.normal(k, ())))(keys)

    hlo = jax.jit(draws).lower(jax.random.key(0)).compile().as_text()
    loops = [line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line]
    assert loops  # (the particles' keys)
    assert not [state for state in loops if "[8,50" in state or "[50" in state], loops


def test_split_and_fold_in_are_threefrys_of_the_plain_key():
    """A stepped key's split and fold_in are JAX's partitionable threefry split and fold_in of
    its plain key (the step hashed in), written out."""
    from scgjax.stepped_prng import _plain

    key = step_keys(jax.random.key(8), 3)[2]
    plain = jax.random.wrap_key_data(_plain(jax.random.key_data(key)))
    with jax.threefry_partitionable(True):
        split = jax.random.key_data(jax.random.split(plain, (2, 3)))
        folded = jax.random.key_data(jax.random.fold_in(plain, 12345))
    assert np.array_equal(jax.random.key_data(jax.random.split(key, (2, 3)))[..., :2], split)
    assert np.array_equal(jax.random.key_data(jax.random.fold_in(key, 12345))[..., :2], folded)


def test_written_out_split_and_fold_in_give_jaxs_keys():
    """``stepped_prng.split`` / ``fold_in`` of a threefry key: the keys of ``jax.random``'s, for
    shapes, under ``vmap`` and jit, with traced data; another implementation falls back."""
    from scgjax.stepped_prng import fold_in, split

    keys = jax.random.split(jax.random.key(11), 5)
    words = jax.random.key_data

    def same(a, b):
        return np.array_equal(np.asarray(words(a)), np.asarray(words(b)))

    for num in (2, 7, (3, 2), ()):
        assert same(jax.vmap(lambda k, n=num: split(k, n))(keys),
                    jax.vmap(lambda k, n=num: jax.random.split(k, n))(keys))
    data = jnp.arange(5, dtype=jnp.uint32) * 1000003
    assert same(jax.jit(jax.vmap(fold_in))(keys, data), jax.vmap(jax.random.fold_in)(keys, data))
    assert same(fold_in(keys[0], 0x9E3779B9), jax.random.fold_in(keys[0], 0x9E3779B9))
    with jax.threefry_partitionable(False):  # JAX's other split: the fallback
        assert same(split(keys[0], 4), jax.random.split(keys[0], 4))
    raw = jax.random.PRNGKey(2)  # a legacy uint32 key: jax.random's, raw keys back
    assert np.array_equal(split(raw, 3), jax.random.split(raw, 3))
    assert np.array_equal(fold_in(raw, 4), jax.random.fold_in(raw, 4))
    rbg = jax.random.key(0, impl="rbg")
    assert same(split(rbg, 3), jax.random.split(rbg, 3))
    assert same(fold_in(rbg, 5), jax.random.fold_in(rbg, 5))


def test_written_out_split_and_fold_in_refuse_a_key_array_as_jax_does():
    """A key array (not one key) is refused as ``jax.random.split`` / ``fold_in`` refuse it,
    not split from its first key's words."""
    from scgjax.stepped_prng import fold_in, split

    keys = jax.random.split(jax.random.key(1), 3)
    with pytest.raises(ValueError, match="single key"):
        split(keys, 2)
    with pytest.raises(ValueError, match="single key"):
        fold_in(keys, 1)
