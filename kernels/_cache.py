"""Per-device caches of constant tables (DFT cos/sin) shared by the kernels.

Under torch.compile the op bodies run on fake/functional tensors: tables built then belong
to the trace and must never be cached (a later eager call would get a fake tensor).
"""
from __future__ import annotations

from typing import Callable

import torch

_TABLES: dict = {}
_MAX_ENTRIES = 64


def is_traced(t: torch.Tensor) -> bool:
    """True for the fake/functional tensors torch.compile traces with."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, FunctionalTensor) or is_fake(t)


def cached(key: tuple, like: torch.Tensor, build: Callable[[torch.device], tuple]) -> tuple:
    """build(device) once per (key, device); rebuilt (not cached) while tracing."""
    if is_traced(like):
        return build(like.device)
    full_key = (*key, str(like.device))
    tables = _TABLES.get(full_key)
    if tables is None:
        if len(_TABLES) >= _MAX_ENTRIES:
            _TABLES.clear()
        tables = _TABLES[full_key] = build(like.device)
    return tables
