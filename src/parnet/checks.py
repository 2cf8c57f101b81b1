"""Argument checks shared by the client calls and the server's command line: each raises a
``TypeError`` or ``ValueError`` that names the call and the argument, before anything is sent."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any


def port(value: Any, what: str) -> int:
    """``value`` as a TCP port number (1-65535); ``what`` names it in the error."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{what}: port {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}: the port must be an int, got {type(value).__name__}")
    if not 1 <= value <= 65535:
        raise ValueError(f"{what}: port {value} is out of range (1-65535)")
    return value


def seconds(
    value: Any, what: str, *, none_ok: bool = True, negative_ok: bool = False, zero_ok: bool = True
) -> float | None:
    """``value`` as a number of seconds (``None`` passes when ``none_ok``)."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{what} must be a number of seconds{' or None' if none_ok else ''}, got {value!r}"
        )
    v = float(value)
    if math.isnan(v) or (v < 0 and not negative_ok) or (v == 0 and not zero_ok):
        bound = "a number" if negative_ok else ("> 0" if not zero_ok else ">= 0")
        raise ValueError(f"{what} must be {bound}, got {value!r}")
    return v


def function(value: Any, what: str) -> Any:
    """``value`` if it is callable."""
    if not callable(value):
        raise TypeError(f"{what} must be callable, got {type(value).__name__} {value!r:.60}")
    return value
