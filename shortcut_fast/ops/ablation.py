"""Masked channel ablation: many modified copies of one cached activation, and per-group
outcomes of the resulting logits in one reduction (docs/experiments.md#spurious-memorization).

channel_ablate(act, mask, replacement)[v] is act with every channel c where mask[v, c] is
True replaced: by replacement[c] (one value per channel: "zero" / "mean" modes) or by
replacement[..., c, ...] (a full activation of act's shape: "noise" / "rewind" modes). A
mask row with no True is the unmodified baseline; a row with several True ablates a set.
The kernels see act as (P, C, S): P = product of the dims before the channel axis, S =
product of those after. The op copies values, so every backend is bit-identical.

group_outcomes(logits, labels, groups, G) reduces (V, B, L) logits to per-(variant, group)
correct counts (argmax, first maximum on ties, equals label) and summed cross-entropy.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from shortcut_fast.backends import compiled_op, define_op, dispatch, triton_kernel
from shortcut_fast.ops._checks import (FLOAT_DTYPES, all_true, check_finite, check_int, check_labels,
                                       check_output_fits, check_tensor, in_range, is_finite)

__all__ = ["channel_ablate", "channel_ablate_reference", "channel_masks", "group_outcomes",
           "group_outcomes_reference"]

_TRITON_NO_F64 = "the triton kernels support float16/bfloat16/float32 only; float64 input needs torch/cpp/cuda"


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Masks


def channel_masks(C: int, channels, *, device=None) -> torch.Tensor:
    """One mask row per entry of `channels`: (V, C) bool.

    channels: a sequence whose entries are channel indices (one-hot rows) or sequences of
    indices (channel sets; an empty set is the unmodified baseline), or a 1-D int tensor.
    Negative indices are rejected (they are almost always a bug in a sweep).
    """
    check_int("C", C)
    if isinstance(channels, torch.Tensor):
        if channels.dim() != 1 or channels.dtype.is_floating_point or channels.dtype == torch.bool:
            raise ValueError(f"channels must be a 1-D integer tensor or a sequence, got {channels.dtype} "
                             f"tensor of shape {tuple(channels.shape)}")
        channels = channels.tolist()
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise TypeError(f"channels must be a sequence of channel indices or of channel sets, "
                        f"got {type(channels).__name__}")
    rows, cols = [], []
    for v, entry in enumerate(channels):
        members = [entry] if not isinstance(entry, (Sequence, set, frozenset, torch.Tensor)) else list(
            entry.tolist() if isinstance(entry, torch.Tensor) else entry)
        for c in members:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"channels[{v}] must be an int channel index or a set of them, got {c!r}")
            if not 0 <= c < C:
                raise ValueError(f"channels[{v}] holds channel {c}, outside [0, {C}) (C={C})")
            rows.append(v)
            cols.append(c)
    mask = torch.zeros(len(channels), C, dtype=torch.bool)
    if rows:
        mask[torch.tensor(rows), torch.tensor(cols)] = True
    return mask.to(device) if device is not None else mask


# ---------------------------------------------------------------------------------------
# References


def channel_ablate_reference(act: torch.Tensor, mask: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ground truth on the kernel layout: act (P, C, S), mask (V, C) bool,
    replacement (C,) or (P, C, S) in act's dtype -> (V, P, C, S)."""
    rep = replacement[None, None, :, None] if replacement.dim() == 1 else replacement[None]
    return torch.where(mask[:, None, :, None], rep, act[None])


def group_outcomes_reference(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                             num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ground truth: logits (V, B, L) -> correct (V, G) int64, loss (V, G)."""
    V, B, L = logits.shape
    lf = logits.to(_loss_dtype(logits))
    per_sample = F.cross_entropy(lf.reshape(V * B, L), labels.repeat(V), reduction="none").view(V, B)
    hit = (lf.argmax(-1) == labels).long()  # torch.argmax returns the first maximum
    correct = torch.zeros(V, num_groups, dtype=torch.int64, device=logits.device).index_add_(1, groups, hit)
    loss = torch.zeros(V, num_groups, dtype=lf.dtype, device=logits.device).index_add_(1, groups, per_sample)
    return correct, loss


# ---------------------------------------------------------------------------------------
# Argument handling


def _split_shape(shape: torch.Size, axis: int) -> tuple[int, int, int]:
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _prepare_ablation(act, mask, replacement, channel_axis):
    check_tensor("act", act, dtypes=FLOAT_DTYPES)
    if act.dim() < 2:
        raise ValueError(f"act must have at least 2 dimensions (a batch and a channel axis), got shape "
                         f"{tuple(act.shape)}")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int) or not -act.dim() <= channel_axis < act.dim():
        raise ValueError(f"channel_axis must be an int in [{-act.dim()}, {act.dim()}) for act of shape "
                         f"{tuple(act.shape)}, got {channel_axis!r}")
    axis = channel_axis % act.dim()
    P, C, S = _split_shape(act.shape, axis)

    check_tensor("mask", mask, dtypes=(torch.bool,))
    if mask.dim() == 1:
        mask = mask[None]
    if mask.dim() != 2 or mask.shape[1] != C:
        raise ValueError(f"mask must have shape (V, C) with C = {C} (act's channel count along axis {axis}), "
                         f"got shape {tuple(mask.shape)}")
    # from shapes alone, before any copy below
    check_output_fits("channel_ablate", (mask.shape[0], *act.shape), act.dtype, act.device,
                      "pass fewer mask rows per call (shortcut_fast.channel_ablation_sweep takes them in chunks "
                      "of max_bytes)")
    mask = mask.to(act.device).contiguous()

    if not isinstance(replacement, torch.Tensor):
        if isinstance(replacement, bool) or not isinstance(replacement, (int, float)):
            raise TypeError(f"replacement must be a float, a 0-d / (C,) tensor or a tensor of act's shape, "
                            f"got {type(replacement).__name__}")
        replacement = torch.full((C,), float(replacement), dtype=act.dtype, device=act.device)
    elif replacement.dim() == 0:
        replacement = replacement.to(device=act.device, dtype=act.dtype).expand(C).contiguous()
    elif tuple(replacement.shape) == (C,):  # act has rank >= 2: never ambiguous with act's shape
        replacement = replacement.to(device=act.device, dtype=act.dtype).contiguous()
    elif replacement.shape == act.shape:
        if replacement.device != act.device:
            raise ValueError(f"replacement must be on {act.device} (like act), got {replacement.device}")
        replacement = replacement.to(act.dtype).reshape(P, C, S).contiguous()
    else:
        raise ValueError(f"replacement must have shape ({C},) (one value per channel) or act's shape "
                         f"{tuple(act.shape)} (a full replacement activation), got shape {tuple(replacement.shape)}")
    if replacement.dtype not in FLOAT_DTYPES:
        raise TypeError(f"replacement must be floating point, got {replacement.dtype}")
    return act.reshape(P, C, S).contiguous(), mask, replacement


def _check_groups(groups, length: int, num_groups: int, device, *, values: bool = True) -> None:
    check_tensor("groups", groups, ndim=1, shape_doc=f"({length},)", dtypes=(torch.int64,), device=device)
    if groups.shape[0] != length:
        raise ValueError(f"groups must have shape ({length},) like labels, got shape {tuple(groups.shape)}")
    if values and groups.numel() and not torch.compiler.is_compiling():
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"groups must lie in [0, {num_groups}) (num_groups={num_groups}), got values in "
                             f"[{lo}, {hi}]")


def _unsupported(x: torch.Tensor) -> dict:
    return {"triton": _TRITON_NO_F64} if x.dtype == torch.float64 else {}


# ---------------------------------------------------------------------------------------
# Public ops


def channel_ablate(act: torch.Tensor, mask: torch.Tensor, replacement=0.0, *, channel_axis: int = 1,
                   backend: str = "auto") -> torch.Tensor:
    """Expand act into one copy per mask row with the masked channels replaced.

    act: any float tensor of rank >= 2 with channels on `channel_axis` ((B, C, H, W) and
    (B, C): 1; ViT tokens (B, T, C): -1). mask: (V, C) bool (a (C,) mask means V = 1).
    replacement: a float or 0-d tensor (same value for every channel), (C,) (one value per
    channel) or act's shape (a full activation), cast to act's dtype.
    Returns (V, *act.shape) in act's dtype: out[v] = where(mask[v] on the channel axis,
    replacement, act).
    """
    act3, mask, rep = _prepare_ablation(act, mask, replacement, channel_axis)
    V = mask.shape[0]
    run = dispatch("channel_ablate", backend, act.device, _CHANNEL_ABLATE, unsupported=_unsupported(act))
    return run(act3, mask, rep).reshape(V, *act.shape)


# Masked channel expansion: act (P,C,S), mask (V,C) bool, replacement (C,) or (P,C,S), act's dtype ->
# (V,P,C,S) with out[v,p,c,s] = mask[v,c] ? replacement[c] (or [p,c,s]) : act[p,c,s].
@define_op("channel_ablate(Tensor act, Tensor mask, Tensor replacement) -> Tensor")
def _channel_ablate_fake(act, mask, replacement):
    return act.new_empty((mask.shape[0], *act.shape))


_CHANNEL_ABLATE = {
    "torch": channel_ablate_reference,
    "cpp": compiled_op("channel_ablate"),
    "cuda": compiled_op("channel_ablate"),
    "triton": triton_kernel("ablation", "channel_ablate_triton"),
}


def group_outcomes(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int, *,
                   backend: str = "auto", allow_nonfinite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(variant, group) outcomes of classifier logits.

    logits: (V, B, L) or (B, L) (V = 1) float; labels: (B,) int64 in [0, L); groups: (B,)
    int64 in [0, num_groups). Returns correct (V, G) int64 (argmax, first maximum on ties,
    equals the label) and loss (V, G) summed cross-entropy, float32 (float64 for float64
    logits); a group with no samples gets zeros. Computed in float32 for half inputs.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() == 2:
        logits = logits[None]
    if logits.dim() != 3 or logits.shape[2] < 1:
        raise ValueError(f"logits must have shape (V, B, L) or (B, L) with L >= 1, got shape {tuple(logits.shape)}")
    check_int("num_groups", num_groups)
    V, B, L = logits.shape
    check_labels("labels", labels, B, L, logits.device, values=False)
    _check_groups(groups, B, num_groups, logits.device, values=False)
    # The value checks in one reduction and one host sync; the detailed checks (and their
    # messages) run only when it fails.
    ok = [in_range(labels, L), in_range(groups, num_groups)] + ([] if allow_nonfinite else [is_finite(logits)])
    if not all_true(*ok):
        check_labels("labels", labels, B, L, logits.device)
        _check_groups(groups, B, num_groups, logits.device)
        if not allow_nonfinite:
            check_finite("logits", logits)
    return _group_outcomes_unchecked(logits, labels, groups, num_groups, backend=backend)


def _group_outcomes_unchecked(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int, *,
                              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """group_outcomes without its input checks (no host sync), for loops whose caller checked
    labels and groups once up front and counts NaN/Inf logits on the device (nonfinite_count)
    to read them once at the end. logits must be (V, B, L)."""
    run = dispatch("group_outcomes", backend, logits.device, _GROUP_OUTCOMES, unsupported=_unsupported(logits))
    return run(logits.contiguous(), labels.contiguous(), groups.contiguous(), num_groups)


# Per-(variant, group) outcomes of classifier logits (V,B,L), labels (B,) and groups (B,) int64 ->
# (correct (V,G) int64: argmax (first maximum) == label; loss (V,G): summed cross-entropy,
# float64 for float64 logits, else float32).
@define_op("group_outcomes(Tensor logits, Tensor labels, Tensor groups, int num_groups) -> (Tensor, Tensor)")
def _group_outcomes_fake(logits, labels, groups, num_groups):
    V = logits.shape[0]
    return (logits.new_empty((V, num_groups), dtype=torch.int64),
            logits.new_empty((V, num_groups), dtype=_loss_dtype(logits)))


_GROUP_OUTCOMES = {
    "torch": group_outcomes_reference,
    "cpp": compiled_op("group_outcomes"),
    "cuda": compiled_op("group_outcomes"),
    "triton": triton_kernel("ablation", "group_outcomes_triton"),
}
