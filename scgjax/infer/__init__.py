"""Training and inference: SVI with optax; infer_discrete."""

from scgjax.infer.discrete import infer_discrete
from scgjax.infer.svi import SVI, SVIRunResult, SVIState

__all__ = ["SVI", "SVIRunResult", "SVIState", "infer_discrete"]
