"""Pyro's conjugate-model convergence tests for ``TraceGraph_ELBO``, ported to scgjax.

Ported from pyro-ppl/pyro (``tests/integration_tests/test_tracegraph_elbo.py``,
``tests/integration_tests/test_conjugate_gaussian_models.py`` and the conjugate classes of
``tests/infer/test_inference.py``; ``LogNormalNormalTests`` from an older ``test_inference.py``).
Each test trains a guide whose family contains the exact posterior, from a start a few tenths
away, and asserts that the learned variational parameters reach the exact posterior.

How Pyro's settings map to scgjax:

- a guide site with ``has_rsample=False`` (Pyro's ``fakes.Nonreparameterized*``) is a site with
  ``estimator=sg.ScoreFunction(baseline=...)`` (or ``sg.RLOO()`` with ``K >= 2``);
- Pyro's ``use_decaying_avg_baseline`` is ``sg.baselines.MovingAverage(0.9)`` (Pyro's average is
  kept per element and not bias-corrected; ours is one scalar per site, bias-corrected);
- Pyro's ``nn_baseline`` and trained ``baseline_value`` (a module trained on the squared error
  to the downstream cost) are ``sg.baselines.Neural(flax_module, inputs=...)``;
- Pyro's sequential ``for i in pyro.plate(...)`` is a Python loop (scgjax finds the per-site
  credit from the data flow; the sites get distinct names as in Pyro);
- ``pyro.optim.Adam({"lr": lr, "betas": (b1, 0.999)})`` is ``optax.adam(lr, b1=b1)``, per-param
  learning rates ``optax.multi_transform``.

Tolerances are Pyro's (same error measure: a sum of squared errors or a sum of absolute errors
over the elements of the parameter) unless a comment says otherwise; every test also asserts
that the starting point is outside its tolerance, so a sign error, a dropped cost or a wrong
credit assignment, which leave the parameters where they start or push them away, cannot pass.
Step counts and learning rates are Pyro's unless a comment says otherwise. Seeds are fixed. The
training loop is one ``jax.lax.scan`` over ``svi.update`` (one compilation per test).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scgjax as sg
from scgjax import dist
from scgjax.dist import constraints

MovingAverage = sg.baselines.MovingAverage


def decaying():
    """Pyro's ``use_decaying_avg_baseline=True`` (decay ``baseline_beta=0.9``)."""
    return sg.ScoreFunction(baseline=MovingAverage(0.9))


def fit(model, guide, optimizer, num_steps, seed=0, objective=None, args=()):
    """Train with ``sg.SVI`` for ``num_steps`` steps (one scan, one compilation) and return
    the constrained params; every loss on the way must be finite."""
    objective = sg.ELBO() if objective is None else objective
    svi = sg.SVI(model, guide, optimizer, objective)
    state = svi.init(jax.random.key(seed), *args)

    @jax.jit
    def train(state):
        def step(s, _):
            return svi.update(s, *args)

        return jax.lax.scan(step, state, None, length=num_steps)

    state, losses = train(state)
    assert np.all(np.isfinite(np.asarray(losses))), "a non-finite loss during training"
    return {k: np.asarray(v) for k, v in
            sg.constrain_params(state.params, model, guide, *args).items()
            if not isinstance(v, dict)}


def initial(model, guide, args=()):
    """The constrained params before training."""
    params = sg.init_params(0, model, guide, *args)
    return {k: np.asarray(v) for k, v in
            sg.constrain_params(params, model, guide, *args).items()
            if not isinstance(v, dict)}


def sq_error(value, target):
    """Pyro's ``param_mse``: the *sum* of squared errors over the elements."""
    return float(np.sum((np.asarray(value, np.float64) - np.asarray(target)) ** 2))


def abs_error(value, target):
    """Pyro's ``param_abs_error``: the sum of absolute errors over the elements."""
    return float(np.sum(np.abs(np.asarray(value, np.float64) - np.asarray(target))))


# Where the guide family contains the exact posterior, log p(x, z) - log q(z) = log p(x) for
# every z: a score-function gradient with a baseline that has learnt log p(x) is then exactly 0
# at the optimum, and the nonreparameterised tests below that use one reach the posterior to
# within 0.5% of Pyro's tolerance on seeds 0-4. Those use a tenth of Pyro's tolerance (TIGHT),
# which also catches an estimator with a noise floor at the optimum (e.g. one that keeps the
# direct derivative of -log q(z) in the surrogate: 10-100% of Pyro's tolerance on seeds 0-4).
TIGHT = 0.1


def check(name, error, before, prec):
    """``error < prec`` (Pyro's ``assert_equal(0.0, error, prec=prec)``), after checking that
    the starting point ``before`` is well outside the tolerance (so the test can fail)."""
    assert before > 1.5 * prec, f"{name}: the start ({before:.4g}) is already within {prec}"
    assert error < prec, f"{name}: error {error:.4g} >= {prec} (start {before:.4g})"


# --------------------------------------------------------------------------------------------
# Normal-normal with a plate (test_tracegraph_elbo.py::NormalNormalTests)
# --------------------------------------------------------------------------------------------

LAM0 = np.array([0.1, 0.1])  # prior precision
LOC0 = np.array([0.0, 0.5])  # prior mean
LAM = np.array([6.0, 4.0])  # observation precision
NN_DATA = np.array([[-0.1, 0.3], [0.0, 0.4], [0.2, 0.5], [0.1, 0.7]])
NN_LAM_N = LAM0 + len(NN_DATA) * LAM
NN_LOG_SIG_N = -0.5 * np.log(NN_LAM_N)
NN_LOC_N = NN_DATA.sum(0) * LAM / NN_LAM_N + LOC0 * LAM0 / NN_LAM_N


def normal_normal(estimator):
    def model():
        with sg.plate("plate", 2):
            loc = sg.sample("loc_latent", dist.Normal(LOC0, LAM0 ** -0.5))
            for i, x in enumerate(NN_DATA):  # Pyro's list of observations
                sg.sample(f"obs_{i}", dist.Normal(loc, LAM ** -0.5), obs=x)

    def guide():
        loc_q = sg.param("loc_q", jnp.asarray(NN_LOC_N + 0.334, jnp.float32))
        log_sig_q = sg.param("log_sig_q", jnp.asarray(NN_LOG_SIG_N - 0.29, jnp.float32))
        with sg.plate("plate", 2):
            sg.sample("loc_latent", dist.Normal(loc_q, jnp.exp(log_sig_q)), estimator=estimator)

    return model, guide


def _normal_normal_test(estimator, num_steps, prec, num_particles=1, seed=0):
    model, guide = normal_normal(estimator)
    start = initial(model, guide)
    p = fit(model, guide, optax.adam(0.0015, b1=0.97), num_steps, seed,
            sg.ELBO(num_particles=num_particles))
    check("loc_q", sq_error(p["loc_q"], NN_LOC_N), sq_error(start["loc_q"], NN_LOC_N), prec)
    check("log_sig_q", sq_error(p["log_sig_q"], NN_LOG_SIG_N),
          sq_error(start["log_sig_q"], NN_LOG_SIG_N), prec)


def test_normal_normal_reparameterized():
    _normal_normal_test(None, 1500, 0.02)  # Pyro: 1500 steps, prec 0.02


@pytest.mark.parametrize(
    "estimator,num_particles",
    [(sg.ScoreFunction(), 1), (decaying(), 1), (sg.RLOO(), 2)],
    ids=["no_baseline", "moving_average", "rloo_k2"],
)
def test_normal_normal_nonreparameterized(estimator, num_particles):
    # Pyro: NonreparameterizedNormal without a baseline, 5000 steps, prec 0.05 (same here).
    _normal_normal_test(estimator, 5000, 0.05, num_particles)


# --------------------------------------------------------------------------------------------
# Normal-normal with .to_event(1) and a data plate (test_inference.py::NormalNormalTests)
# --------------------------------------------------------------------------------------------

def normal_normal_event(estimator):
    def model():
        loc = sg.sample("loc_latent", dist.Normal(LOC0, LAM0 ** -0.5).to_event(1))
        with sg.plate("data", len(NN_DATA)):
            sg.sample("obs", dist.Normal(loc, LAM ** -0.5).to_event(1), obs=NN_DATA)

    def guide():
        loc_q = sg.param("loc_q", jnp.asarray(NN_LOC_N + 0.134, jnp.float32))
        log_sig_q = sg.param("log_sig_q", jnp.asarray(NN_LOG_SIG_N - 0.14, jnp.float32))
        sg.sample("loc_latent", dist.Normal(loc_q, jnp.exp(log_sig_q)).to_event(1),
                  estimator=estimator)

    return model, guide


@pytest.mark.parametrize(
    "estimator,objective,num_steps,lr,tight",
    [
        # Pyro: Trace_ELBO, reparameterised, 5000 steps at lr 0.001
        (None, sg.ELBO(), 5000, 0.001, 1.0),
        # Pyro: Trace_ELBO, nonreparameterised, 15000 steps at lr 0.001 without a baseline;
        # here a moving-average baseline and 5000 steps at lr 0.002
        (decaying(), sg.ELBO(), 5000, 0.002, TIGHT),
        # Pyro: RenyiELBO(alpha=0, num_particles=3) (the IWAE bound), 2500 steps
        (None, sg.IWAE(num_particles=3), 2500, 0.001, 1.0),
        # Pyro: ReweightedWakeSleep(num_particles=3), 2500 / 7500 steps
        (None, sg.RWS(num_particles=3), 2500, 0.001, 1.0),
    ],
    ids=["elbo_reparameterized", "elbo_nonreparameterized", "iwae_k3", "rws_k3"],
)
def test_normal_normal_event(estimator, objective, num_steps, lr, tight):
    model, guide = normal_normal_event(estimator)
    start = initial(model, guide)
    p = fit(model, guide, optax.adam(lr), num_steps, 0, objective)
    # Pyro: prec 0.05 on the sums of squared errors. The start is 2 * 0.134^2 = 0.036 and
    # 2 * 0.14^2 = 0.039 away, inside Pyro's 0.05: a test that cannot fail. Here 0.005 (a tenth
    # of Pyro's), which the start is 7x outside of; TIGHT times that with a baseline.
    check("loc_q", sq_error(p["loc_q"], NN_LOC_N), sq_error(start["loc_q"], NN_LOC_N),
          0.005 * tight)
    check("log_sig_q", sq_error(p["log_sig_q"], NN_LOG_SIG_N),
          sq_error(start["log_sig_q"], NN_LOG_SIG_N), 0.005 * tight)


# --------------------------------------------------------------------------------------------
# Normal-normal-normal (test_tracegraph_elbo.py::NormalNormalNormalTests)
# --------------------------------------------------------------------------------------------

NNN_DATA = NN_DATA
# loc_prime ~ N(loc0, 1/lam0), loc ~ N(loc_prime, 1/lam0): marginally loc ~ N(loc0, 2/lam0).
# (Pyro's targets use the prior precision lam0 instead of lam0 / 2, 0.1% off; these are exact.)
NNN_LAM_N = LAM0 / 2 + len(NNN_DATA) * LAM
NNN_LOG_SIG_N = -0.5 * np.log(NNN_LAM_N)
NNN_LOC_N = NNN_DATA.sum(0) * LAM / NNN_LAM_N + LOC0 * (LAM0 / 2) / NNN_LAM_N
# loc_prime | loc ~ N((loc0 + loc) / 2, 1 / (2 lam0)): kappa 0.5, offset loc0 / 2.
NNN_TARGETS = {
    "loc_q": NNN_LOC_N,
    "log_sig_q": NNN_LOG_SIG_N,
    "loc_q_prime": 0.5 * LOC0,
    "kappa_q": np.array([0.5]),
    "log_sig_q_prime": -0.5 * np.log(2.0 * LAM0),
}


class BaselineNet(nn.Module):
    """Pyro's ``VanillaBaselineNN(2, 5)``: Linear(2, 5), sigmoid, Linear(5, 2)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.sigmoid(nn.Dense(5)(x)))


def normal_normal_normal(repa1, repa2, use_nn_baseline, use_decaying_avg_baseline):
    def estimator(reparameterised, nn_input=None):
        if reparameterised:
            return None
        if nn_input is not None and use_nn_baseline:
            # Pyro adds the decaying average to the network's output when both are asked
            # for; Neural(normalise=True) likewise trains the net on Q minus a running mean.
            return sg.ScoreFunction(baseline=sg.baselines.Neural(
                BaselineNet(), inputs=nn_input, normalise=use_decaying_avg_baseline))
        if use_decaying_avg_baseline:
            return decaying()
        return sg.ScoreFunction()

    def model():
        with sg.plate("plate", 2):
            loc_prime = sg.sample("loc_latent_prime", dist.Normal(LOC0, LAM0 ** -0.5))
            loc = sg.sample("loc_latent", dist.Normal(loc_prime, LAM0 ** -0.5))
            with sg.plate("data", len(NNN_DATA)):
                sg.sample("obs", dist.Normal(loc, LAM ** -0.5), obs=NNN_DATA)

    def guide():  # the exact posterior is not mean field
        loc_q = sg.param("loc_q", jnp.asarray(NN_LOC_N + 0.334, jnp.float32))
        log_sig_q = sg.param("log_sig_q", jnp.asarray(NN_LOG_SIG_N - 0.29, jnp.float32))
        loc_q_prime = sg.param("loc_q_prime", jnp.array([-0.34, 0.52]))
        kappa_q = sg.param("kappa_q", jnp.array([0.74]))
        log_sig_q_prime = sg.param("log_sig_q_prime",
                                   jnp.asarray(-0.5 * np.log(1.2 * LAM0), jnp.float32))
        with sg.plate("plate", 2):
            loc = sg.sample("loc_latent", dist.Normal(loc_q, jnp.exp(log_sig_q)),
                            estimator=estimator(repa2))
            sg.sample("loc_latent_prime",
                      dist.Normal(kappa_q * loc + loc_q_prime, jnp.exp(log_sig_q_prime)),
                      estimator=estimator(repa1, nn_input=loc))

    return model, guide


@pytest.mark.parametrize(
    "repa1,repa2,num_steps,prec,use_nn_baseline,use_decaying_avg_baseline",
    [
        (True, True, 3000, 0.02, False, False),
        (False, False, 3000, 0.04, True, True),
        (True, False, 4000, 0.04, False, True),
        (False, True, 4000, 0.04, True, False),
    ],
    ids=["reparameterized", "both_baselines", "decaying_baseline", "nn_baseline"],
)
def test_normal_normal_normal(repa1, repa2, num_steps, prec, use_nn_baseline,
                              use_decaying_avg_baseline):
    # Pyro's step counts and tolerances (sums of squared errors); its lr argument is unused,
    # every case runs at lr 0.0015, betas (0.97, 0.999), as here.
    model, guide = normal_normal_normal(repa1, repa2, use_nn_baseline,
                                        use_decaying_avg_baseline)
    start = initial(model, guide)
    p = fit(model, guide, optax.adam(0.0015, b1=0.97), num_steps, 0)
    for name, target in NNN_TARGETS.items():
        before = sq_error(start[name], target)
        # Pyro's tolerance, or a quarter of the starting error if that is smaller: kappa starts
        # 0.24 away (0.058, within 1.5 x Pyro's 0.04) and is checked at 0.014.
        tol = min(prec, before / 4)
        check(name, sq_error(p[name], target), before, tol)


# --------------------------------------------------------------------------------------------
# Bernoulli-beta and exponential-gamma (test_tracegraph_elbo.py)
# --------------------------------------------------------------------------------------------

BB_DATA = np.array([0.0, 1.0, 1.0, 1.0])
BB_LOG_ALPHA_N = math.log(1.0 + BB_DATA.sum())
BB_LOG_BETA_N = math.log(1.0 + len(BB_DATA) - BB_DATA.sum())


def bernoulli_beta(estimator):
    def model():
        p = sg.sample("p_latent", dist.Beta(1.0, 1.0))
        with sg.plate("data", len(BB_DATA)):
            sg.sample("obs", dist.Bernoulli(probs=p), obs=BB_DATA)

    def guide():
        alpha_q_log = sg.param("alpha_q_log", jnp.array(BB_LOG_ALPHA_N + 0.17, jnp.float32))
        beta_q_log = sg.param("beta_q_log", jnp.array(BB_LOG_BETA_N - 0.143, jnp.float32))
        sg.sample("p_latent", dist.Beta(jnp.exp(alpha_q_log), jnp.exp(beta_q_log)),
                  estimator=estimator)
        with sg.plate("data", len(BB_DATA)):
            pass

    return model, guide


@pytest.mark.parametrize(
    "estimator,b1", [(None, 0.92), (decaying(), 0.95)],
    ids=["reparameterized", "nonreparameterized"],
)
def test_bernoulli_beta(estimator, b1):
    # Pyro: 3000 steps at lr 0.0007; abs errors 0.03 (alpha) and 0.04 (beta). Same here.
    model, guide = bernoulli_beta(estimator)
    start = initial(model, guide)
    p = fit(model, guide, optax.adam(0.0007, b1=b1), 3000, 0)
    check("alpha_q_log", abs_error(p["alpha_q_log"], BB_LOG_ALPHA_N),
          abs_error(start["alpha_q_log"], BB_LOG_ALPHA_N), 0.03)
    check("beta_q_log", abs_error(p["beta_q_log"], BB_LOG_BETA_N),
          abs_error(start["beta_q_log"], BB_LOG_BETA_N), 0.04)


EG_DATA = np.array([3.0, 2.0])
EG_LOG_ALPHA_N = math.log(1.0 + len(EG_DATA))
EG_LOG_BETA_N = math.log(1.0 + EG_DATA.sum())


def exponential_gamma(estimator):
    def model():
        lam = sg.sample("lambda_latent", dist.Gamma(1.0, 1.0))
        with sg.plate("data", len(EG_DATA)):
            sg.sample("obs", dist.Exponential(lam), obs=EG_DATA)

    def guide():
        alpha_q_log = sg.param("alpha_q_log", jnp.array(EG_LOG_ALPHA_N + 0.17, jnp.float32))
        beta_q_log = sg.param("beta_q_log", jnp.array(EG_LOG_BETA_N - 0.143, jnp.float32))
        sg.sample("lambda_latent", dist.Gamma(jnp.exp(alpha_q_log), jnp.exp(beta_q_log)),
                  estimator=estimator)

    return model, guide


@pytest.mark.parametrize(
    "estimator,b1,tight", [(None, 0.90, 1.0), (decaying(), 0.95, TIGHT)],
    ids=["reparameterized", "nonreparameterized"],
)
def test_exponential_gamma(estimator, b1, tight):
    # Pyro: 8000 steps at lr 0.0007; abs errors 0.04. Same here (TIGHT x with a baseline).
    model, guide = exponential_gamma(estimator)
    start = initial(model, guide)
    p = fit(model, guide, optax.adam(0.0007, b1=b1), 8000, 0)
    check("alpha_q_log", abs_error(p["alpha_q_log"], EG_LOG_ALPHA_N),
          abs_error(start["alpha_q_log"], EG_LOG_ALPHA_N), 0.04 * tight)
    check("beta_q_log", abs_error(p["beta_q_log"], EG_LOG_BETA_N),
          abs_error(start["beta_q_log"], EG_LOG_BETA_N), 0.04 * tight)


# --------------------------------------------------------------------------------------------
# Poisson-gamma (test_inference.py::PoissonGammaTests) and log-normal-normal (older
# test_inference.py::LogNormalNormalTests)
# --------------------------------------------------------------------------------------------

PG_DATA = np.array([1.0, 2.0, 3.0])
PG_ALPHA_N = 1.0 + PG_DATA.sum()
PG_BETA_N = 1.0 + len(PG_DATA)


def poisson_gamma(estimator):
    def model():
        lam = sg.sample("lambda_latent", dist.Gamma(1.0, 1.0))
        with sg.plate("data", len(PG_DATA)):
            sg.sample("obs", dist.Poisson(lam), obs=PG_DATA)

    def guide():
        alpha_q = sg.param("alpha_q", PG_ALPHA_N + math.exp(0.17), constraints.positive)
        beta_q = sg.param("beta_q", PG_BETA_N / math.exp(0.143), constraints.positive)
        sg.sample("lambda_latent", dist.Gamma(alpha_q, beta_q), estimator=estimator)

    return model, guide


@pytest.mark.parametrize(
    "estimator,num_steps,lr,tight",
    [(None, 10000, 0.0002, 1.0), (decaying(), 10000, 0.0005, TIGHT)],
    ids=["reparameterized", "nonreparameterized"],
)
def test_poisson_gamma(estimator, num_steps, lr, tight):
    # Pyro: Trace_ELBO, lr 0.0002, betas (0.97, 0.999), 10000 (reparameterised) / 25000
    # (nonreparameterised, no baseline) steps; abs errors 0.2 (alpha) and 0.15 (beta).
    # Nonreparameterised here: a moving-average baseline and 10000 steps at lr 0.0005, and
    # TIGHT x Pyro's tolerances.
    model, guide = poisson_gamma(estimator)
    start = initial(model, guide)
    p = fit(model, guide, optax.adam(lr, b1=0.97), num_steps, 0)
    check("alpha_q", abs_error(p["alpha_q"], PG_ALPHA_N),
          abs_error(start["alpha_q"], PG_ALPHA_N), 0.2 * tight)
    check("beta_q", abs_error(p["beta_q"], PG_BETA_N), abs_error(start["beta_q"], PG_BETA_N),
          0.15 * tight)


LN_MU0, LN_TAU0, LN_TAU = 1.0, 1.0, 2.5
LN_DATA = np.array([1.5, 2.2])
LN_TAU_N = LN_TAU0 + len(LN_DATA) * LN_TAU
LN_MU_N = (LN_MU0 * LN_TAU0 + LN_TAU * np.log(LN_DATA).sum()) / LN_TAU_N
LN_LOG_MU_N, LN_LOG_TAU_N = math.log(LN_MU_N), math.log(LN_TAU_N)


def lognormal_normal(estimator):
    def model():
        mu = sg.sample("mu_latent", dist.Normal(LN_MU0, LN_TAU0 ** -0.5))
        with sg.plate("data", len(LN_DATA)):
            sg.sample("obs", dist.LogNormal(mu, LN_TAU ** -0.5), obs=LN_DATA)

    def guide():
        mu_q_log = sg.param("mu_q_log", jnp.array(LN_LOG_MU_N + 0.17, jnp.float32))
        tau_q_log = sg.param("tau_q_log", jnp.array(LN_LOG_TAU_N - 0.143, jnp.float32))
        sg.sample("mu_latent", dist.Normal(jnp.exp(mu_q_log), jnp.exp(tau_q_log) ** -0.5),
                  estimator=estimator)

    return model, guide


@pytest.mark.parametrize(
    "estimator,tight", [(None, 1.0), (decaying(), TIGHT)],
    ids=["reparameterized", "nonreparameterized"],
)
def test_lognormal_normal(estimator, tight):
    # Pyro: lr 0.0005, betas (0.96, 0.999), 12000 / 15000 steps; abs errors 0.07. Here 6000
    # steps at lr 0.001 (the nonreparameterised guide with a moving-average baseline, and
    # TIGHT x Pyro's tolerance).
    model, guide = lognormal_normal(estimator)
    start = initial(model, guide)
    p = fit(model, guide, optax.adam(0.001, b1=0.96), 6000, 0)
    check("mu_q_log", abs_error(p["mu_q_log"], LN_LOG_MU_N),
          abs_error(start["mu_q_log"], LN_LOG_MU_N), 0.07 * tight)
    check("tau_q_log", abs_error(p["tau_q_log"], LN_LOG_TAU_N),
          abs_error(start["tau_q_log"], LN_LOG_TAU_N), 0.07 * tight)


# --------------------------------------------------------------------------------------------
# Rao-Blackwellisation through plates (test_tracegraph_elbo.py::RaoBlackwellizationTests)
# --------------------------------------------------------------------------------------------

N_OUTER = N_INNER = 3
RB_DATA = (np.array([-0.1, 0.3]) + np.asarray(jax.random.normal(
    jax.random.key(0), (N_OUTER, N_INNER, 2))) / np.sqrt(LAM)).astype(np.float32)
RB_LAM_N = LAM0 + N_OUTER * N_INNER * LAM
RB_LOG_SIG_N = -0.5 * np.log(RB_LAM_N)
RB_LOC_N = RB_DATA.astype(np.float64).sum((0, 1)) * LAM / RB_LAM_N + LOC0 * LAM0 / RB_LAM_N


def test_nested_sequential_plates_in_elbo():
    # Pyro: test_nested_iplate_in_elbo; nested sequential plates are Python loops here.
    def model():
        loc = sg.sample("loc_latent", dist.Normal(LOC0, LAM0 ** -0.5).to_event(1))
        for i in range(N_OUTER):
            for j in range(N_INNER):
                sg.sample(f"obs_{i}_{j}", dist.Normal(loc, LAM ** -0.5).to_event(1),
                          obs=RB_DATA[i, j])

    def guide():
        loc_q = sg.param("loc_q", jnp.asarray(RB_LOC_N + 0.234, jnp.float32))
        log_sig_q = sg.param("log_sig_q", jnp.asarray(RB_LOG_SIG_N - 0.27, jnp.float32))
        sg.sample("loc_latent", dist.Normal(loc_q, jnp.exp(log_sig_q)).to_event(1),
                  estimator=decaying())

    # Pyro checks the dependency graph (9 edges into the observations): here, the latent is
    # credited with its own two log-densities and the 9 observations.
    credited = set(sg.graph(model, guide).credited_costs("loc_latent"))
    assert credited == ({f"log p(obs_{i}_{j})" for i in range(3) for j in range(3)}
                        | {"log p(loc_latent)", "-log q(loc_latent)"})

    start = initial(model, guide)
    # Pyro: 4000 steps at lr 0.0008, betas (0.96, 0.999); prec 0.04 (sums of squared errors).
    # Here 3000 steps at lr 0.002 and the same tolerance.
    p = fit(model, guide, optax.adam(0.002, b1=0.96), 3000, 0)
    check("loc_q", sq_error(p["loc_q"], RB_LOC_N), sq_error(start["loc_q"], RB_LOC_N), 0.04)
    check("log_sig_q", sq_error(p["log_sig_q"], RB_LOG_SIG_N),
          sq_error(start["log_sig_q"], RB_LOG_SIG_N), 0.04)


def test_plate_in_elbo_with_superfluous_rvs():
    # Pyro: _test_plate_in_elbo(n_superfluous_top=1, n_superfluous_bottom=1, n_steps=2000,
    # lr=0.0113) (Adam, betas (0.95, 0.999), lr 0.010 for the baselines): a plate inside a
    # sequential plate, and superfluous latents z before and after the observations that
    # nothing depends on, each with a trained linear baseline.
    data = RB_DATA.reshape(9, 2)
    chunks = [data[0:4], data[4:7], data[7:9]]
    n_top, n_bottom = 1, 1

    def model():
        loc = sg.sample("loc_latent", dist.Normal(LOC0, LAM0 ** -0.5).to_event(1))
        for i in range(3):
            x_i = chunks[i]
            with sg.plate(f"inner_{i}", len(x_i)):
                for k in range(n_top):
                    z = sg.sample(f"z_{i}_{k}", dist.Normal(0.0, 1.0))
                    assert z.shape == (4 - i,)
                sg.sample(f"obs_{i}", dist.Normal(loc, LAM ** -0.5).to_event(1), obs=x_i)
                for k in range(n_top, n_top + n_bottom):
                    z = sg.sample(f"z_{i}_{k}", dist.Normal(0.0, 1.0))
                    assert z.shape == (4 - i,)

    def guide():
        loc_q = sg.param("loc_q", jnp.asarray(RB_LOC_N + 0.094, jnp.float32))
        log_sig_q = sg.param("log_sig_q", jnp.asarray(RB_LOG_SIG_N - 0.07, jnp.float32))
        loc = sg.sample(
            "loc_latent", dist.Normal(loc_q, jnp.exp(log_sig_q)).to_event(1),
            estimator=sg.ScoreFunction(baseline=sg.baselines.Neural(
                nn.Dense(1), inputs=jnp.ones(1))))  # Pyro: Linear(1, 1) applied to ones(1)
        for i in range(3):
            with sg.plate(f"inner_{i}", 4 - i):
                for k in range(n_top + n_bottom):
                    mean_i = sg.param(f"mean_{i}_{k}", 0.5 * jnp.ones(4 - i))
                    z = sg.sample(
                        f"z_{i}_{k}", dist.Normal(mean_i, 1.0),
                        estimator=sg.ScoreFunction(baseline=sg.baselines.Neural(
                            nn.Dense(4 - i), inputs=loc)))  # Pyro: Linear(2, 4 - i)(loc)
                    assert z.shape == (4 - i,)

    # Credit: each z only with its own log p - log q; loc with the observations and itself.
    g = sg.graph(model, guide)
    assert set(g.credited_costs("z_1_0")) == {"log p(z_1_0)", "-log q(z_1_0)"}
    assert set(g.credited_costs("loc_latent")) == (
        {f"log p(obs_{i})" for i in range(3)} | {"log p(loc_latent)", "-log q(loc_latent)"})

    def labels(params):
        return {k: "baseline" if "baseline" in k else "other" for k in params}

    optimizer = optax.multi_transform(
        {"baseline": optax.adam(0.010, b1=0.95), "other": optax.adam(0.0113, b1=0.95)}, labels)
    start = initial(model, guide)
    # Pyro: 2000 steps. The baselines start untrained (the loc's predicts ~0 for a signal of
    # about -20 nats) and the guide first drifts away (log-scale error up to ~0.5) until they
    # have learnt it; at 2000 steps it is still on its way back on 3 of seeds 0-4, while at
    # 3000 every seed is within 0.002 (the gradient at the exact posterior with an exact
    # baseline is exactly 0: no noise floor).
    p = fit(model, guide, optimizer, 3000, 0)
    # Pyro's tolerances: abs errors 0.04 (loc) and 0.05 (log scale). Here 0.01 for both, which
    # also catches a score estimator that keeps the direct derivative of -log q(loc) (a noise
    # floor: final errors 0.02-0.07 on seeds 0-4). The superfluous means: Pyro's 0.04 on the max
    # over i of their sums of squares (each starts at 0.25 * (4 - i) >= 0.5).
    check("loc_q", abs_error(p["loc_q"], RB_LOC_N), abs_error(start["loc_q"], RB_LOC_N), 0.01)
    check("log_sig_q", abs_error(p["log_sig_q"], RB_LOG_SIG_N),
          abs_error(start["log_sig_q"], RB_LOG_SIG_N), 0.01)
    for k in range(n_top + n_bottom):
        errors = [sq_error(p[f"mean_{i}_{k}"], 0.0) for i in range(3)]
        before = min(sq_error(start[f"mean_{i}_{k}"], 0.0) for i in range(3))
        check(f"mean_*_{k}", max(errors), before, 0.04)


# --------------------------------------------------------------------------------------------
# Gaussian chain (test_conjugate_gaussian_models.py::GaussianChainTests)
# --------------------------------------------------------------------------------------------

CHAIN_LOC0 = 0.2
CHAIN_DATA = np.array([-0.1, 0.03, 0.20, 0.10])


def chain_targets(n):
    """The exact posterior of the chain ``z_1 -> ... -> z_n -> data``, as Pyro's guide
    parameterises it: ``z_k | z_{k+1} ~ N(kappa_k z_{k+1} + mu_k, 1 / lambda_post_k)``."""
    lambdas = [1.5 * (k + 1) / n for k in range(n + 1)]
    marginal = [lambdas[0]]  # the prior (marginal) precision of z_k
    for k in range(1, n):
        marginal.append(lambdas[k] * marginal[k - 1] / (lambdas[k] + marginal[k - 1]))
    post = [None] + [lambdas[k] + marginal[k - 1] for k in range(1, n)]
    post.append(len(CHAIN_DATA) * lambdas[n] + marginal[n - 1])
    kappas = [None] + [lambdas[k] / post[k] for k in range(1, n)]
    mus = [None] + [CHAIN_LOC0 * marginal[k - 1] / post[k] for k in range(1, n)]
    mus.append((CHAIN_DATA.sum() * lambdas[n] + CHAIN_LOC0 * marginal[n - 1]) / post[n])
    return lambdas, post, kappas, mus


def gaussian_chain(n, reparameterized, difficulty, seed):
    lambdas, post, kappas, mus = chain_targets(n)
    rng = np.random.RandomState(seed)
    while True:  # Pyro's reparameterisation mask: about 30% of the nodes, at least one
        mask = rng.binomial(1, 0.3, size=n)
        if 0.5 < mask.sum() < 0.4 * n:
            break
    offsets = difficulty * (0.1 * rng.randn(3, n + 1) - 0.53)

    def model():
        mean = CHAIN_LOC0
        for k in range(1, n + 1):
            mean = sg.sample(f"loc_latent_{k}", dist.Normal(mean, lambdas[k - 1] ** -0.5))
        with sg.plate("data", len(CHAIN_DATA)):
            sg.sample("obs", dist.Normal(mean, lambdas[n] ** -0.5), obs=CHAIN_DATA)

    def guide():
        previous = None
        for k in reversed(range(1, n + 1)):
            loc_q = sg.param(f"loc_q_{k}", jnp.float32(mus[k] + offsets[0, k]))
            log_sig_q = sg.param(f"log_sig_q_{k}",
                                 jnp.float32(-0.5 * math.log(post[k]) + offsets[1, k]))
            if k == n:
                mean = loc_q
            else:
                kappa_q = sg.param(f"kappa_q_{k}", jnp.float32(kappas[k] + offsets[2, k]))
                mean = kappa_q * previous + loc_q
            reparam = reparameterized or mask[k - 1] == 1
            previous = sg.sample(f"loc_latent_{k}", dist.Normal(mean, jnp.exp(log_sig_q)),
                                 estimator=None if reparam else decaying())

    targets = {f"loc_q_{k}": mus[k] for k in range(1, n + 1)}
    targets.update({f"log_sig_q_{k}": -0.5 * math.log(post[k]) for k in range(1, n + 1)})
    targets.update({f"kappa_q_{k}": kappas[k] for k in range(1, n)})
    return model, guide, targets


@pytest.mark.parametrize(
    "n,reparameterized,num_steps,lr,prec,difficulty",
    [
        (3, True, 1100, 0.0058, 0.03, 1.0),
        (8, True, 1100, 0.0059, 0.03, 1.0),
        (3, False, 1700, 0.0049, 0.04, 0.6),
        (5, False, 1000, 0.0061, 0.06, 0.6),
        (7, False, 1800, 0.0035, 0.05, 0.6),  # skipped on Pyro's CI as slow; cheap here
    ],
    ids=["reparameterized_n3", "reparameterized_n8", "nonreparameterized_n3",
         "nonreparameterized_n5", "nonreparameterized_n7"],
)
def test_gaussian_chain(n, reparameterized, num_steps, lr, prec, difficulty):
    # Pyro's step counts, learning rates (betas (0.95, 0.999)) and tolerances: the max over
    # the chain of the squared error of each kind of parameter (loc, log scale, kappa).
    model, guide, targets = gaussian_chain(n, reparameterized, difficulty, seed=0)
    start = initial(model, guide)
    p = fit(model, guide, optax.adam(lr, b1=0.95), num_steps, 0)
    for kind in ("loc_q", "log_sig_q", "kappa_q"):
        names = [k for k in targets if k.startswith(kind + "_")]
        error = max(sq_error(p[k], targets[k]) for k in names)
        before = max(sq_error(start[k], targets[k]) for k in names)
        check(kind, error, before, prec)
