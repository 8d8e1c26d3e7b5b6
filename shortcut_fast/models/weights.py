"""Loading weights from a local state-dict file. Nothing here ever downloads.

Accepted files: anything `torch.load(..., weights_only=True)` reads that is a state dict,
possibly wrapped in a dict under "state_dict", "model" or "model_state_dict" (training
checkpoints). Key prefixes added by wrappers ("module." from DataParallel, "_orig_mod." from
torch.compile, "net." of the timm/torchvision bridge) are reconciled with the model's keys.

The linear head is the only part allowed to differ: a head of another shape (another
number of classes) is dropped with a warning and keeps its fresh initialization. A 3-channel
input convolution loaded into a 1-channel model is summed over its input channels (as timm
does). Any other missing, unexpected or mis-shaped key is an error.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Union

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint object."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path!r} is not a plain state dict: entries {bad[:5]} are not tensors "
            f"(expected a state dict, or one under one of the keys {list(_WRAPPER_KEYS)})"
        )
    return {str(k): v for k, v in obj.items()}


def _align_prefixes(state: dict[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """Strip or add a wrapper prefix so that the most checkpoint keys match the model's."""
    model_keys = set(model_keys)
    candidates = [state]
    for prefix in _STRIP_PREFIXES:
        for sd in list(candidates):
            if all(k.startswith(prefix) for k in sd):
                candidates.append({k[len(prefix):]: v for k, v in sd.items()})
    top = {k.split(".", 1)[0] for k in model_keys if "." in k}
    if len(top) == 1:  # a wrapper such as the bridge's "net."
        prefix = top.pop() + "."
        candidates += [{prefix + k: v for k, v in sd.items()} for sd in list(candidates)]
    return max(candidates, key=lambda sd: len(model_keys.intersection(sd)))


def _head_prefix(model: nn.Module) -> str | None:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return None
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    return None


def _fmt(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys)} in total)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read_state(path, what: str) -> dict[str, torch.Tensor]:
    """The state dict in the local file `path` (read with weights_only=True); `what` names the
    setting in errors."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{what} must be the path of a local weights file, got {path!r} "
            "(shortcut-fast never downloads weights)"
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} weights file not found: {path!r} (weights are never downloaded; "
            "save a state dict there first)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; torch's message spans many lines
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"could not read {path!r} with torch.load(weights_only=True), which loads tensors only (save "
            f"model.state_dict(), not the model): {first}") from exc
    return _unwrap(obj, path)


def load_weights(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load the local weights file `path` into `model` in place, strictly: every key of the
    model must be in the file with its shape and the file must hold no other key (wrapper
    prefixes such as "module." are reconciled). For a user's own trained model (--weights);
    load_pretrained is the loose variant for fine-tuning from another task."""
    own = model.state_dict()
    state = _align_prefixes(_read_state(path, "weights"), own.keys())
    path = os.fspath(path)
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = [f"{name}: {_fmt(keys)}" for name, keys in (("shape mismatch in", mismatched),
                                                            ("missing keys", missing),
                                                            ("unexpected keys", unexpected)) if keys]
        raise ValueError(f"{path!r} does not fit the model (another architecture or options?): {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load the local state-dict file `path` into `model` in place and return `model`."""
    obj = _read_state(path, "pretrained")
    path = os.fspath(path)
    own = model.state_dict()
    state = _align_prefixes(obj, own.keys())
    head = _head_prefix(model)

    def is_head(key: str) -> bool:
        return head is not None and key.startswith(head)

    mismatched, dropped, adapted = [], [], []
    for key in list(state):
        if key not in own or state[key].shape == own[key].shape:
            continue
        src, dst = state[key], own[key]
        if is_head(key):
            dropped.append(f"{key} {tuple(src.shape)} vs {tuple(dst.shape)}")
            del state[key]
        elif (src.dim() == 4 and dst.dim() == 4 and src.shape[1] == 3 and dst.shape[1] == 1
              and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]):
            adapted.append(key)
            state[key] = src.sum(dim=1, keepdim=True)
        else:
            mismatched.append(f"{key} {tuple(src.shape)} vs {tuple(dst.shape)}")
    if mismatched:
        raise ValueError(f"{path!r} does not fit the model: shape mismatch in {_fmt(mismatched)}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    missing_body = [k for k in missing if not is_head(k)]
    if missing_body or unexpected:
        raise ValueError(
            f"{path!r} does not fit the model (another architecture or options?): "
            f"missing keys: {_fmt(missing_body) or 'none'}; "
            f"unexpected keys: {_fmt(unexpected) or 'none'}"
        )
    if dropped:
        warnings.warn(f"{path!r}: the head does not fit ({_fmt(dropped)}); it is not loaded "
                      "and keeps its fresh initialization", stacklevel=2)
    elif missing:
        warnings.warn(f"{path!r} has no weights for {_fmt(missing)}; they keep their "
                      "fresh initialization", stacklevel=2)
    if adapted:
        warnings.warn(f"{path!r}: summed the 3 input channels of {_fmt(adapted)} for a "
                      "1-channel model", stacklevel=2)
    model.load_state_dict(state, strict=False)
    return model
