"""Checks of single values (numbers, switch fractions, step counts), with no other dependency, so
that every module of the runtime can use them. Each raises :class:`InputError` with one line."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from artrt.errors import InputError

MAX_STEPS = 1000  # one step per training timestep at most


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite float in ``[minimum, maximum]``; bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            raise InputError(f"{name} must be >= {minimum:g}, got {value:g}")
        if minimum is None:
            raise InputError(f"{name} must be <= {maximum:g}, got {value:g}")
        raise InputError(f"{name} must be in [{minimum:g}, {maximum:g}], got {value:g}")
    return value


def check_switch(value: Any) -> float:
    """The fraction of the schedule the composition expert runs, in [0, 1]."""
    return check_float("switch", value, 0.0, 1.0)


def check_steps(value: Any) -> int:
    return check_int("steps", value, 1, MAX_STEPS)


