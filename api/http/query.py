"""Strict parsers for query-string values: a bad value is a 400 that names it, never a 500.

``int()`` and ``float()`` accept more than a URL should carry (``"²"``,
``"1_000"``, ``" 7 "``, 4,000-digit numbers, ``"nan"``), and an integer that
reaches SQL must fit the column: SQLite stops at 2**63 - 1, PostgreSQL's
``INTEGER`` at 2**31 - 1. Every integer read from a query goes through
:func:`strict_int` with the bounds of where it is used.
"""

from __future__ import annotations

import math
import re

from taskvision.errors import BadRequestError

# The largest value of a 4-byte SQL INTEGER (PostgreSQL's INTEGER; versions, counts).
INT32_MAX = 2**31 - 1

_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,3})?")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def strict_int(raw: str, *, name: str, low: int, high: int, code: str = "invalid_query") -> int:
    """An integer written with ASCII digits only, between ``low`` and ``high`` inclusive."""
    if not _DIGITS.fullmatch(raw):
        raise BadRequestError(
            f"'{name}' must be a whole number written with the digits 0-9, not {raw[:40]!r}.", code=code
        )
    value = int(raw) if len(raw) <= 18 else None  # never convert a number of unbounded length
    if value is None or not low <= value <= high:
        shown = raw if len(raw) <= 24 else f"{raw[:12]}...({len(raw)} digits)"
        raise BadRequestError(f"'{name}' must be between {low} and {high}, not {shown}.", code=code)
    return value


def strict_float(raw: str, *, name: str, code: str = "invalid_query") -> float:
    """A finite decimal number (``12``, ``-0.5``, ``1e3``)."""
    if not _DECIMAL.fullmatch(raw.strip()):
        raise BadRequestError(f"'{name}' must be a number, not {raw[:40]!r}.", code=code)
    value = float(raw)
    if not math.isfinite(value):
        raise BadRequestError(f"'{name}' must be a finite number, not {raw[:40]!r}.", code=code)
    return value


def strict_bool(raw: str, *, name: str, code: str = "invalid_query") -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequestError(f"'{name}' must be true or false, not {raw[:40]!r}.", code=code)
