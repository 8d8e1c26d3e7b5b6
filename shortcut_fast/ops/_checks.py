"""Argument checks at the API boundary: messages name the argument, the expected and the
received value."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    shape_doc: str | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        doc = shape_doc or f"{ndim} dimensions"
        raise ValueError(f"{name} must have shape {doc}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {value.device}")
    return value


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _tracing() -> bool:
    # Value checks read data (a device sync, and a data-dependent branch that
    # torch.compile cannot trace); under compilation only shapes and dtypes are checked.
    return torch.compiler.is_compiling()


def check_finite(name: str, value: torch.Tensor) -> None:
    """Reject NaN/Inf, which would silently poison sums and rankings."""
    if _tracing():
        return
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf values (pass allow_nonfinite=True to accept them)")


def check_labels(name: str, labels: torch.Tensor, length: int, num_classes: int, device: torch.device) -> None:
    check_tensor(name, labels, ndim=1, shape_doc=f"({length},)", dtypes=(torch.int64,), device=device)
    if labels.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got shape {tuple(labels.shape)}")
    if labels.numel() and not _tracing():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), got values in [{lo}, {hi}]")
