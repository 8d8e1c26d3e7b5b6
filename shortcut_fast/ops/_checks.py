"""Argument checks at the API boundary: messages name the argument, the expected and the
received value."""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from shortcut_fast.validate import check_int  # noqa: F401  (re-exported for the ops)

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


def _tracing() -> bool:
    # Value checks read data (a device sync, and a data-dependent branch that
    # torch.compile cannot trace); under compilation only shapes and dtypes are checked.
    return torch.compiler.is_compiling()


def check_finite(name: str, value: torch.Tensor) -> None:
    """Reject NaN/Inf, which would silently poison sums and rankings."""
    if _tracing():
        return
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise_nonfinite(name, int((~torch.isfinite(value)).sum()))


def raise_nonfinite(name: str, bad: int) -> None:
    """check_finite's error, for checks that counted on the device (nonfinite_count)."""
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf values (pass allow_nonfinite=True to accept them)")


# Device-side conditions: 0-d tensors, no host sync. A caller checking several inputs stacks
# them and reads them once (all_true); a loop adds counts up and reads them after the loop.

def is_finite(value: torch.Tensor) -> torch.Tensor:
    """0-d bool: value holds no NaN/Inf (True for integer tensors)."""
    if not value.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=value.device)
    return torch.isfinite(value).all()


def nonfinite_count(value: torch.Tensor) -> torch.Tensor:
    """0-d int64: how many NaN/Inf values `value` holds."""
    if not value.is_floating_point():
        return torch.zeros((), dtype=torch.int64, device=value.device)
    return (~torch.isfinite(value)).sum()


def in_range(values: torch.Tensor, high: int) -> torch.Tensor:
    """0-d bool: every value lies in [0, high) (True when empty)."""
    return ((values >= 0) & (values < high)).all()


def all_true(*conditions: torch.Tensor) -> bool:
    """Every 0-d bool condition holds, read with one host sync. True under compilation,
    where data-dependent checks are skipped."""
    if _tracing() or not conditions:
        return True
    return bool(torch.stack([c.to(conditions[0].device) for c in conditions]).all())


def check_labels(name: str, labels: torch.Tensor, length: int, num_classes: int, device: torch.device, *,
                 values: bool = True) -> None:
    """Shape, dtype and device of labels and, with values=True, their range (a host sync;
    callers checking several inputs pass values=False and fold in_range into all_true)."""
    check_tensor(name, labels, ndim=1, shape_doc=f"({length},)", dtypes=(torch.int64,), device=device)
    if labels.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got shape {tuple(labels.shape)}")
    if values and labels.numel() and not _tracing():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), got values in [{lo}, {hi}]")


# Outputs below this size are never checked against the free memory (no system call on
# the common path); above it, a request that cannot fit fails before anything is allocated.
_CHECK_FITS_ABOVE = 1 << 28


def available_bytes(device: torch.device | str) -> int | None:
    """Memory a new tensor on `device` can take now (None: unknown, e.g. meta)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks the caching allocator holds but does not use are free for torch
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_output_fits(op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device, instead: str) -> None:
    """Fail fast, before allocating, when the (shape, dtype) output of `op` cannot fit in the
    memory of `device`; `instead` says which streaming form to use."""
    if _tracing():
        return
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes <= _CHECK_FITS_ABOVE:
        return
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise ValueError(f"{op} would return a {tuple(shape)} {str(dtype).replace('torch.', '')} tensor of "
                         f"{nbytes / 1e9:,.1f} GB, more than the {available / 1e9:,.1f} GB available on "
                         f"{torch.device(device)}; {instead}")
