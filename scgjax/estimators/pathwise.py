"""The pathwise (reparameterisation) estimator (Kingma & Welling 2014; Rezende et al. 2014)."""

from __future__ import annotations

import dataclasses
from typing import Any

from scgjax.errors import SiteError
from scgjax.estimators.base import Estimator


@dataclasses.dataclass(frozen=True)
class Pathwise(Estimator):
    """Differentiate through the sample: ``w = g(eps; phi)``, ``grad E f(w) = E grad f(g(eps))``.

    Unbiased; requires a reparameterisable distribution (``fn.has_rsample``): asking for it on
    one that is not (e.g. a Bernoulli) is an error naming the site. The site adds no score term.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> sg.Pathwise().validate("z", dist.Normal(0.0, 1.0), 1)
    """

    reparameterised = True
    score = False

    def validate(self, name: str, fn: Any, num_particles: int) -> None:
        if not fn.has_rsample:
            raise SiteError(
                name,
                f"uses {type(self).__name__}, but {type(fn).__name__} cannot be reparameterised "
                "(has_rsample is False); use a score-function estimator such as "
                "sg.ScoreFunction() or sg.RLOO()",
            )
