"""Argument checks the methods share: a number where a number belongs."""

from __future__ import annotations

import math
import numbers

from twa_kernels.errors import InvalidArgumentError, InvalidTypeError


def real(name: str, value: object, *, finite: bool = True) -> float:
    """`value` as a float, or a named error: InvalidTypeError for anything but a real number
    (a bool, None or a string included), InvalidArgumentError for NaN (and, when `finite`,
    an infinity), which every range check would otherwise let through or misreport."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise InvalidArgumentError(f"{name} must be a finite number, got {number}")
    return number
