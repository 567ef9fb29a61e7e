"""Errors that scgjax raises for a user's mistakes, each naming the site it is about."""

from __future__ import annotations


class ScgjaxError(Exception):
    """Base class of the errors scgjax raises for invalid programs or arguments."""


class SiteError(ScgjaxError, ValueError):
    """A problem with one named site (sample, param, plate, factor) of a program.

    Example:
        >>> str(SiteError("z", "is sampled twice"))
        "site 'z' is sampled twice"
    """

    def __init__(self, site: str, problem: str):
        self.site = site
        super().__init__(f"site '{site}' {problem}")


class NonFiniteError(ScgjaxError, FloatingPointError):
    """A quantity that must be finite (a loss, a log-density, a param) became NaN or inf.

    :meth:`scgjax.SVI.run` raises it at the first step whose loss is not finite, naming that
    step and the first non-finite quantity; the attributes let a user inspect or resume.

    Attributes:
        site: the site, param or estimator term found first (its name), or ``None``.
        step: the index of the failing step within the run, or ``None``.
        state: the last good ``SVIState`` (before that step), or ``None``.
        result: the ``SVIRunResult`` of the steps before it, or ``None``.
        explanation: what :func:`scgjax.diagnostics.explain_nonfinite` found, or ``None``.

    Example:
        >>> err = NonFiniteError("the loss is nan", site="z", step=3)
        >>> err.site, err.step, str(err)
        ('z', 3, 'the loss is nan')
    """

    def __init__(self, message: str, *, site: str | None = None, step: int | None = None,
                 state: object = None, result: object = None, explanation: object = None):
        super().__init__(message)
        self.site = site
        self.step = step
        self.state = state
        self.result = result
        self.explanation = explanation
