"""Training: SVI with optax."""

from scgjax.infer.svi import SVI, SVIRunResult, SVIState

__all__ = ["SVI", "SVIRunResult", "SVIState"]
