"""The one exception type users see as a one-line error (no traceback unless debug=true), and the two
ways a library's message becomes one line. Imports nothing of the project: every room may use it."""

from __future__ import annotations


class OutlierHydraError(Exception):
    """Bad input: a config key, a file or a model the run cannot use. The message names it."""


def one_line(exc: BaseException) -> str:
    """The whole message on one line, whatever a library put in it."""
    return " ".join(str(exc).split())


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The message's first non-empty line (a library's summary, without its traceback-like detail),
    or the exception's type name when it has no message; cut to `limit` characters if given."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:limit] if limit is not None else text
