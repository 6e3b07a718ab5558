"""The one check of a numeric argument that the math modules (mgda, ppo) share."""

from __future__ import annotations

import math
from typing import Any


def finite_number(value: Any, name: str, minimum: float | None = None) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite number (and
    >= ``minimum`` when one is given)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a number, got {value!r}") from error
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {number}")
    return number
