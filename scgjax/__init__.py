"""scgjax: stochastic computation graphs in JAX.

Write a model and a guide as Python functions with :func:`sample`, :func:`param`,
:class:`plate`, :func:`factor`; pick a gradient estimator per random choice; train with an
objective (:class:`ELBO`, :class:`IWAE`, :class:`SMC`, :class:`RWS`, :class:`WakeSleep`,
:class:`AmortisedWakeSleep`, :class:`Expectation`) and optax through :class:`SVI`. The surrogate
loss credits each random choice only with the costs downstream of it, element by element
through plates, and is unbiased for gradients of any order (DiCE).
"""

from scgjax import baselines, diagnostics, dist, handlers
from scgjax.control_flow import scan
from scgjax.errors import NonFiniteError, ScgjaxError, SiteError
from scgjax.estimators import (
    ARM,
    DCV,
    REBAR,
    RELAX,
    RLOO,
    RODEO,
    STL,
    VIMCO,
    DisARM,
    DReG,
    Enumerate,
    Estimator,
    GumbelSoftmax,
    MeasureValued,
    Pathwise,
    ScoreFunction,
    StraightThrough,
    SumAndSample,
    UnorderedSet,
)
from scgjax.infer import (
    SVI,
    Checkpoints,
    Predictive,
    SVIRunResult,
    SVIState,
    infer_discrete,
    log_marginal_likelihood,
)
from scgjax.objectives import (
    ELBO,
    IWAE,
    RWS,
    SMC,
    AmortisedWakeSleep,
    Expectation,
    Objective,
    RenyiELBO,
    WakeSleep,
    graph,
)
from scgjax.parallel import device_mesh, replicate, shard_data, shard_particles
from scgjax.params import constrain_params, init_params, param_labels
from scgjax.primitives import deterministic, factor, module, param, plate, sample
from scgjax.scg import SCG

__version__ = "0.1.0"

__all__ = [
    "ARM",
    "Checkpoints",
    "AmortisedWakeSleep",
    "DCV",
    "DReG",
    "DisARM",
    "ELBO",
    "Enumerate",
    "Estimator",
    "Expectation",
    "GumbelSoftmax",
    "IWAE",
    "MeasureValued",
    "NonFiniteError",
    "Objective",
    "Pathwise",
    "Predictive",
    "REBAR",
    "RELAX",
    "RLOO",
    "RODEO",
    "RWS",
    "RenyiELBO",
    "SCG",
    "SMC",
    "STL",
    "SVI",
    "SVIRunResult",
    "SVIState",
    "ScgjaxError",
    "ScoreFunction",
    "SiteError",
    "StraightThrough",
    "SumAndSample",
    "UnorderedSet",
    "VIMCO",
    "WakeSleep",
    "baselines",
    "constrain_params",
    "deterministic",
    "device_mesh",
    "diagnostics",
    "dist",
    "factor",
    "graph",
    "handlers",
    "infer_discrete",
    "init_params",
    "log_marginal_likelihood",
    "module",
    "param",
    "param_labels",
    "plate",
    "replicate",
    "sample",
    "scan",
    "shard_data",
    "shard_particles",
]
