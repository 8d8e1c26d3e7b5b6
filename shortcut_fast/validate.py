"""Argument checks shared by every layer (the lowest module: it imports nothing of ours)."""
from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as an int if it is an integer >= minimum (numpy integers too, never bools),
    else a ValueError naming `name` and what was expected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def nested_diff(old: dict, new: dict, changed: str = "{key}: {old} -> {new}", prefix: str = "") -> list[str]:
    """One line per (nested) setting that differs, `changed` filled with the dotted key and
    both values shortened (JSON, at most 60 characters); a missing key shows as <unset>.
    The run folder says `epochs: 4 -> 6`; the distributed check names the ranks."""
    import json

    def short(v) -> str:
        text = json.dumps(v) if not isinstance(v, str) else repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += nested_diff(a, b, changed, name + ".")
        elif a != b:
            out.append(changed.format(key=name, old=short(a), new=short(b)))
    return out
