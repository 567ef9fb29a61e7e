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
