"""compare_estimators: measured variances against exact ones on a toy Bernoulli problem, the
recommendation against the known ordering (DisARM < RLOO < score function without a
baseline), errors that name the site, and the assignment plugged back into a program."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scgjax as sg
import scgjax.diagnostics
from scgjax import dist
from tests import models

compare_estimators = scgjax.diagnostics.compare_estimators

LOGITS = jnp.array([0.0, 0.4, -0.8, 1.5])  # 0 among them: the numpyro logits trap
F0, W = 3.0, 2.0  # f(z) = F0 + w z per element: an offset that a baseline removes
K = 2
NUM_SAMPLES = 1000


def program(estimator=None):
    logits = sg.param("logits", LOGITS)
    w = sg.param("w", jnp.array(W))  # downstream of z: not one of z's params
    with sg.plate("n", LOGITS.shape[0]):
        z = sg.sample("z", dist.Bernoulli(logits=logits), estimator=estimator)
        sg.factor("f", F0 + w * z)


def exact_variances(name: str) -> tuple[float, float]:
    """Exact ``(variance of the logits' gradient, of w's)`` of one gradient estimate with
    K = 2, summed over the plate, by enumerating each element's two (or paired) outcomes.

    Per element, ``p = sigmoid(l)``, ``f1 - f0 = W``, exact gradient ``m = p (1 - p) W``:
    score function ``(1/K) sum_k f(z_k)(z_k - p)``; RLOO ``(f(z_1) - f(z_2))(z_1 - z_2)/2``
    (``W/2`` when the two differ, probability ``2p(1-p)``); DisARM ``W sigma(|l|)/2`` when the
    antithetic pair differ (probability ``2 min(p, 1-p)``). ``w``'s gradient is the mean of
    ``z`` over the particles: ``p(1-p)/2`` per element for independent draws,
    ``min(p, 1-p) |1 - 2p| / 2`` for an antithetic pair.
    """
    p = 1.0 / (1.0 + np.exp(-np.asarray(LOGITS, dtype=np.float64)))
    f1 = F0 + W
    m = p * (1 - p) * W
    lo = np.minimum(p, 1 - p)
    if name == "score":
        second = p * f1**2 * (1 - p) ** 2 + (1 - p) * F0**2 * p**2
        v_logits = (second - m**2) / K
    elif name == "rloo":
        v_logits = W**2 * p * (1 - p) / 2 - m**2
    else:  # disarm
        v_logits = W**2 * np.maximum(p, 1 - p) ** 2 * 2 * lo / 4 - m**2
    v_w = p * (1 - p) / 2 if name != "disarm" else lo * np.abs(1 - 2 * p) / 2
    return float(v_logits.sum()), float(v_w.sum())


CANDIDATES = {"score": sg.ScoreFunction(), "rloo": sg.RLOO(), "disarm": sg.DisARM()}


@pytest.fixture(scope="module")
def comparison():
    params = sg.init_params(0, program)
    return compare_estimators(
        sg.Expectation(num_particles=K), params, 1, program,
        candidates={"z": [*CANDIDATES.values(), sg.Pathwise()]}, num_samples=NUM_SAMPLES,
        num_groups=20, skip_refused=True)


def test_variances_match_the_exact_ones_and_the_ordering(comparison):
    ms = {name: m for name, m in zip(CANDIDATES, comparison.for_site("z"), strict=False)}
    assert comparison.site_params == {"z": ("logits",)}  # w is downstream of z
    for name, m in ms.items():
        v_logits, v_w = exact_variances(name)
        # exact by enumeration, within 5 standard errors (from the spread of 20 groups of 50)
        assert abs(m.variance - (v_logits + v_w)) < 5 * m.variance_se + 1e-6, (name, m)
        assert abs(m.site_variance - v_logits) < 5 * m.variance_se + 1e-6, (name, m)
        assert 0 < m.variance_se < 0.5 * m.variance
    exact = {name: sum(exact_variances(name)) for name in CANDIDATES}
    assert exact["disarm"] < exact["rloo"] / 2 and exact["rloo"] < exact["score"] / 3
    # the recommendation by variance is the known-lowest-variance estimator
    assert comparison.recommend("variance") == {"z": CANDIDATES["disarm"]}
    assert comparison.recommend("variance", "site") == {"z": CANDIDATES["disarm"]}


def test_work_criterion_is_variance_times_time(comparison):
    ms = comparison.for_site("z")
    timed = [m for m in ms if m.refused is None]
    assert len(timed) == 3
    for m in timed:
        assert 0 < m.time_per_step < 1.0
        assert m.work == pytest.approx(m.variance * m.time_per_step)
        assert comparison.score(m) == m.work
    best = min(timed, key=lambda m: m.variance * m.time_per_step)
    assert comparison.criterion == "work"
    assert comparison.assignment == {"z": best.estimator}
    table = comparison.summary()
    assert "variance x time" in table and "refused" in table and "Pathwise" in table
    assert sum(line.rstrip().endswith("*") for line in table.splitlines()) == 1


def test_refused_candidate_names_the_site_and_the_estimator():
    params = sg.init_params(0, program)
    obj = sg.Expectation(num_particles=K)
    with pytest.raises(sg.SiteError, match=r"site 'z' cannot use the candidate Pathwise\(\)"
                       r".*cannot be reparameterised"):
        compare_estimators(obj, params, 0, program, candidates={"z": [sg.Pathwise()]})
    with pytest.raises(sg.SiteError, match="site 'z' has no candidate that can serve it"):
        compare_estimators(obj, params, 0, program, candidates={"z": [sg.Pathwise()]},
                           skip_refused=True)
    # DisARM needs an even number of particles: its own error, with the context
    with pytest.raises(sg.SiteError, match=r"'z' cannot use the candidate DisARM\(\) under "
                       r"Expectation\(num_particles=1\)"):
        compare_estimators(sg.Expectation(), params, 0, program,
                           candidates={"z": [sg.DisARM()]})


def test_unknown_site_and_bad_arguments_are_errors():
    params = sg.init_params(0, program)
    obj = sg.Expectation(num_particles=K)
    with pytest.raises(sg.SiteError, match=r"site 'zz' is not a latent site.*\['z'\]"):
        compare_estimators(obj, params, 0, program, candidates={"zz": [sg.RLOO()]})
    with pytest.raises(sg.SiteError, match="site 'q'"):
        compare_estimators(obj, params, 0, program, candidates={"z": [sg.RLOO()]},
                           assignment={"q": sg.RLOO()})
    with pytest.raises(sg.SiteError, match="site 'z'.*class RLOO"):
        compare_estimators(obj, params, 0, program, candidates={"z": [sg.RLOO]})
    with pytest.raises(TypeError, match="non-empty list"):
        compare_estimators(obj, params, 0, program, candidates={"z": sg.RLOO()})
    with pytest.raises(ValueError, match="criterion"):
        compare_estimators(obj, params, 0, program, candidates={"z": [sg.RLOO()]},
                           criterion="speed")


def test_guided_comparison_with_estimator_params_plugs_into_the_guide():
    """ELBO on a mixture (model and guide): DCV's ``z$alpha`` is trained by the warm-up and
    left out of the variance; the assignment plugs into assign_estimators and runs."""
    x = models.MIX_X
    guide = functools.partial(models.mixture_guide, estimator=None)
    params = sg.init_params(0, models.mixture_model, guide, x)  # the default: RLOO, no alpha
    obj = sg.ELBO(num_particles=K)
    dcv = sg.DCV()
    result = compare_estimators(obj, params, 0, models.mixture_model, guide, x,
                                candidates={"z": [dcv]}, criterion="variance",
                                num_samples=200, warmup_steps=10)
    assert result.site_params == {"z": ("a", "b")}  # the guide's params, not the model's
    (m,) = result.for_site("z")
    assert m.variance > m.site_variance > 0 and np.isnan(m.time_per_step)
    assert result.assignment == {"z": dcv}
    with pytest.raises(ValueError, match="not timed"):
        result.recommend("work")
    assigned = sg.handlers.assign_estimators(guide, result.assignment)
    assert sg.graph(models.mixture_model, assigned, x, num_particles=K).nodes["z"].estimator \
        is dcv
    trained = sg.init_params(0, models.mixture_model, assigned, x)
    assert set(trained) == {*params, "z$alpha"}
    grads = jax.jit(jax.grad(lambda p: obj.loss(jax.random.key(0), p, models.mixture_model,
                                                assigned, x)))(trained)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_binary_vae_example_compares_at_an_even_k(capsys):
    """``--compare-estimators`` in the binary VAE example compares DisARM too: an odd K is
    refused before training starts."""
    from tests.test_examples import _load

    bvae = _load("binary_vae_mnist")
    assert set(bvae.COMPARED) <= set(bvae.ESTIMATORS)
    with pytest.raises(SystemExit) as info:
        bvae.main(["--compare-estimators", "--estimator", "score", "--no-progress"])
    assert info.value.code == 2
    assert "even --num-particles >= 2" in capsys.readouterr().err
