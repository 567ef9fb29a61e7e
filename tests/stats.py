"""Statistical assertions for estimator tests: bounds from the standard error, with power."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Z = 5.0  # |mean - exact| <= Z * SE per element: a false alarm has probability ~6e-7


def mean_and_se(samples):
    """Per-element mean and standard error of the mean over the leading axis."""
    samples = np.asarray(samples, dtype=np.float64)
    n = samples.shape[0]
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(n)


def assert_unbiased(samples: dict, exact: dict, z: float = Z, min_power: float = 3.0) -> None:
    """Every element's sample mean is within ``z`` standard errors of the exact value.

    To make sure the test can fail, at least one element per leaf must have
    ``|exact| > min_power * z * SE``: a sign error there would be caught.
    """
    flat_s, _ = jax.tree.flatten(samples)
    flat_e, _ = jax.tree.flatten(exact)
    assert len(flat_s) == len(flat_e)
    for s, e in zip(flat_s, flat_e, strict=True):
        e = np.asarray(e, dtype=np.float64)
        mean, se = mean_and_se(s)
        err = np.abs(mean - e)
        bound = z * se + 1e-5 * (1.0 + np.abs(e))
        assert np.all(err <= bound), (
            f"biased: mean {mean}, exact {e}, |error|/SE {err / np.maximum(se, 1e-12)}"
        )
    powerful = [np.any(np.abs(np.asarray(e)) > min_power * z * mean_and_se(s)[1])
                for s, e in zip(flat_s, flat_e, strict=True)]
    assert any(powerful), "the test has no power: the exact gradient is within the noise"


def grad_samples(loss, params, num_samples: int, seed: int = 0):
    """``num_samples`` independent gradient estimates of ``loss(key, params)``, jitted and
    vmapped over keys; returns minus the loss gradient (the objective's gradient)."""
    keys = jax.random.split(jax.random.key(seed), num_samples)
    g = jax.jit(jax.vmap(lambda k: jax.grad(loss, argnums=1)(k, params)))(keys)
    return jax.tree.map(lambda x: -x, g)


def variance(samples) -> dict:
    """Per-leaf per-element variance over the leading axis."""
    return jax.tree.map(lambda x: jnp.var(x, axis=0), samples)
