"""No gradient through the sampling of a site."""

from __future__ import annotations

import dataclasses

from scgjax.estimators.base import Estimator


@dataclasses.dataclass(frozen=True)
class Detached(Estimator):
    """Sample the site with its gradient stopped and add no score term.

    The objective's gradient then ignores how the site's distribution shapes its samples:
    what the wake phases of reweighted wake-sleep need (their gradients are expectations
    under self-normalised importance weights, not derivatives of an expectation). Under
    ``sg.ELBO`` this would be a biased gradient, so only objectives that ask for it use it.

    Example:
        >>> import scgjax as sg
        >>> Detached().score, Detached().reparameterised
        (False, False)
    """

    score = False
    importance_weighted = True
