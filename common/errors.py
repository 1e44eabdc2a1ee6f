"""Errors about the caller's arguments, worded in Python terms, so that a command line can name its flags.

The library names an argument by its keyword (a config field or a keyword argument, e.g. ``store_format``)
in one of two forms: leading the message, as its subject (``steps must lie in [0, 999], got [5000]``), or
as a call writes it, ``keyword=VALUE`` (``pass resume=True``; ``VALUE`` in capitals is a placeholder, a
quoted one a literal). An exception's ``options`` lists the keywords its message names in those forms;
``pipeline`` (``cli_support.in_flags``) turns exactly those into its flags (``--steps``, ``--resume``).
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)

__all__ = ["OptionError", "naming"]


class OptionError(ValueError):
    """An argument has a bad value, or a needed one is missing. ``option``: its keyword; ``options``:
    every keyword the message names (``option`` first)."""

    def __init__(self, message: str, option: str, *others: str) -> None:
        super().__init__(message)
        self.option = option
        self.options = (option, *others)


def naming(exc: E, *options: str) -> E:
    """``exc``, recording that its message names the keywords ``options`` (a remedy such as
    ``skip_bad=True`` in an error about data): for exceptions that are not an :class:`OptionError`."""
    exc.options = (*getattr(exc, "options", ()), *options)  # type: ignore[attr-defined]
    return exc
