"""Argument checks shared by every layer (the lowest module: it imports nothing of ours)."""
from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as an int if it is an integer >= minimum (numpy integers too, never bools),
    else a ValueError naming `name` and what was expected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
