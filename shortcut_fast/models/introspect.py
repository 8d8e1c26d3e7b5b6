"""Addressing a model's layers by name: blocks, block outputs, features and head.

These work on every model `build_model` returns (they declare `block_names`, `features`
and `head`) and, as a fallback, on plain timm / torchvision modules.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .bridges import _StopForward, discover_blocks, head_input


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """`model.get_submodule(name)`, with an error that lists the valid names."""
    if not isinstance(name, str):
        raise TypeError(f"module name must be a str, got {type(name).__name__}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    names = [n for n, _ in model.named_modules() if n]
    shown = names if len(names) <= 60 else [n for n in names if n.count(".") <= 1][:60]
    more = "" if len(shown) == len(names) else f" ... ({len(names)} modules in total)"
    blocks = getattr(model, "block_names", None)
    block_text = f"blocks: {', '.join(blocks)}; " if blocks else ""
    raise ValueError(
        f"{type(model).__name__} has no submodule {name!r}; {block_text}"
        f"modules: {', '.join(shown)}{more}"
    )


def model_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the model's blocks, in forward order."""
    names = getattr(model, "block_names", None)
    if names is None:
        feature_info = getattr(model, "feature_info", None)  # a plain timm model
        if isinstance(feature_info, list) and feature_info:
            names = [info["module"] for info in feature_info
                     if isinstance(info, dict) and info.get("module")]
        else:
            names = discover_blocks(model)
    return list(names)


def pool_block_output(t: torch.Tensor) -> torch.Tensor:
    """Spatial (N, C, H, W) or token (N, T, D) average; 2-D outputs as they are."""
    if t.dim() == 4:  # (N, C, H, W): spatial average
        return t.mean(dim=(2, 3))
    if t.dim() == 3:  # (N, T, D) tokens: average over tokens
        return t.mean(dim=1)
    if t.dim() == 2:
        return t
    raise ValueError(f"cannot pool a block output of shape {tuple(t.shape)}")


def block_outputs(model: nn.Module, x: torch.Tensor, names: Optional[Sequence[str]] = None,
                  *, pool: bool = True) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules (default: `model_blocks(model)`) for input `x`.

    Captured with forward hooks on one forward pass, which stops as soon as every output
    is captured (so probing early blocks costs only the early layers). pool=True averages
    4-D outputs over space ((N, C, H, W) -> (N, C), channels first assumed) and 3-D token
    outputs over tokens ((N, T, D) -> (N, D)); 2-D outputs are returned as they are. A
    module called twice in one forward gives its first output. The model's train/eval
    mode and the autograd mode are the caller's.
    """
    names = list(model_blocks(model) if names is None else names)
    if not names:
        raise ValueError("no block names given")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names in {names}")
    modules = {n: get_submodule(model, n) for n in names}
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _args, output):
            if name in captured:
                return
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"output of {name!r} is a {type(output).__name__}, not a tensor")
            captured[name] = pool_block_output(output) if pool else output
            if len(captured) == len(names):
                raise _StopForward
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        model(x)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in captured]
    if missing:
        raise RuntimeError(f"these modules were not called in the forward pass: {missing}")
    return {n: captured[n] for n in names}


def features_and_head(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """(features_fn, head): the penultimate representation and the final linear layer.

    `head(features_fn(x))` equals `model(x)`. Models without `features` and `head`
    (plain library modules) fall back to their last nn.Linear and a hook on its input.
    """
    head = getattr(model, "head", None)
    features = getattr(model, "features", None)
    if isinstance(head, nn.Linear) and callable(features) and not isinstance(features, nn.Module):
        return features, head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no linear head (no nn.Linear found)")
    last = linears[-1]
    return (lambda x: head_input(model, last, x)), last
