"""Training and inference: SVI with optax; infer_discrete."""

from scgjax.infer.checkpoint import Checkpoints
from scgjax.infer.discrete import infer_discrete
from scgjax.infer.predictive import Predictive, log_marginal_likelihood
from scgjax.infer.svi import SVI, SVIRunResult, SVIState

__all__ = ["Checkpoints", "Predictive", "SVI", "SVIRunResult", "SVIState", "infer_discrete",
           "log_marginal_likelihood"]
