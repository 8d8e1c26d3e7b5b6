"""timm and torchvision classifiers behind the project model interface.

`build_timm("NAME", ...)` and `build_torchvision("NAME", ...)` return a `BridgedModel`:
the library's model is its child `net` (so its own state dict keys appear under "net."),
`head` is the library model's final nn.Linear, `features(x)` its input, and `block_names`
are qualified names such as "net.layer1" (from timm's `feature_info` when the model has
one, else found by `discover_blocks`). Weights are never downloaded: the library model is
always created with pretrained=False / weights=None; `build_model(..., pretrained=PATH)`
loads a local file afterwards. timm and torchvision are imported only here, when a bridged
model is built.
"""
from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# containers whose children are a model's stages or blocks, most specific first
_BLOCK_CONTAINERS = ("encoder.layers", "trunk_output", "stages", "blocks", "layers", "features")


def import_optional(module: str, package: Optional[str] = None):
    """Import `module` or raise an ImportError that says how to install its package."""
    package = package or module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{package} is needed for this model but cannot be imported ({exc}); install it "
            f"with `pip install {package}` or `pip install shortcut-fast[models]`"
        ) from exc


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is captured."""


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers are not saved in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel() or not bool((std_t > 0).all()):
            raise ValueError(
                f"normalize needs equally long mean and positive std, got {mean}, {std}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _make_normalize(normalize, in_channels: int) -> nn.Module:
    if normalize is None or normalize is False:
        return nn.Identity()
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        mean, std = normalize
    else:
        raise ValueError(f"normalize must be None, 'imagenet' or (mean, std), got {normalize!r}")
    module = Normalize(mean, std)
    if module.mean.numel() != in_channels:
        raise ValueError(
            f"normalize has {module.mean.numel()} channel(s) but the model takes "
            f"{in_channels}; pass normalize=(mean, std) with {in_channels} values each"
        )
    return module


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def discover_blocks(net: nn.Module, prefix: str = "") -> list[str]:
    """Guess the block names of a library model that does not declare them.

    Rules, first match wins: children of top-level "layer<k>" stages (ResNets); else the
    children of the first container among encoder.layers (torchvision ViT), trunk_output
    (RegNet), stages, blocks, layers, features (VGG, ConvNeXt, EfficientNet, Swin ...),
    keeping only the pooling layers when that container holds bare layers (VGG: the ends
    of its stages); else the top-level children that have parameters.
    """
    children = dict(net.named_children())
    stages = [n for n in children if re.fullmatch(r"layer\d+", n)]
    if stages:
        return [f"{prefix}{s}.{b}" for s in stages for b, _ in children[s].named_children()]
    modules = dict(net.named_modules())
    for path in _BLOCK_CONTAINERS:
        container = modules.get(path)
        if container is None or _is_leaf(container):
            continue
        kids = list(container.named_children())
        if all(_is_leaf(m) for _, m in kids):
            pools = [(n, m) for n, m in kids if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
            kids = pools or kids
        return [f"{prefix}{path}.{n}" for n, _ in kids]
    return [f"{prefix}{n}" for n, m in children.items()
            if next(m.parameters(), None) is not None]


def _qualified_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")  # pragma: no cover - internal invariant


class BridgedModel(nn.Module):
    """A timm or torchvision classifier with `features`, `head` and `block_names`.

    `forward(x)` is the library model's own forward (after the optional normalization);
    `features(x)` is the input of its final linear layer, so `head(features(x))` equals
    `forward(x)`; for timm this is `forward_head(forward_features(x), pre_logits=True)`.
    """

    def __init__(self, net: nn.Module, *, source: str, head_name: str,
                 block_names: Sequence[str], normalize: nn.Module) -> None:
        super().__init__()
        self.source = source
        self.input_norm = normalize
        self.net = net
        self._head_name = head_name
        self.block_names = list(block_names)

    @property
    def head(self) -> nn.Linear:
        # a property, not a second registration: the state dict keeps the library's keys
        return self.net.get_submodule(self._head_name)

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        if self.source == "timm":
            return self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return head_input(self.net, self.head, x)


def head_input(model: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run `model(x)` up to `head` and return the head's input (the head is not run)."""
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0])
        raise _StopForward

    handle = head.register_forward_pre_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the head {head} was not called in the forward pass")
    return captured[0]


def _check_linear_head(head, num_classes: int, what: str) -> nn.Linear:
    if not isinstance(head, nn.Linear) or head.out_features != num_classes:
        raise ValueError(
            f"{what}: its classifier is {head!r}, not an nn.Linear with {num_classes} outputs; "
            "only models with a final linear layer can be bridged"
        )
    return head


def _create(factory: Callable, optional: dict, **kwargs) -> nn.Module:
    """Call factory(**kwargs, **optional), dropping optional keyword arguments it rejects."""
    optional = dict(optional)
    while True:
        try:
            return factory(**kwargs, **optional)
        except TypeError as exc:
            rejected = [k for k in optional if f"'{k}'" in str(exc)]
            if not rejected:
                raise
            for k in rejected:
                del optional[k]


def _unknown(kind: str, name: str, known: Sequence[str], listing: str) -> ValueError:
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return ValueError(f"unknown {kind} model {name!r}{hint} (all names: {listing})")


def _resolve_blocks(net: nn.Module, blocks: Optional[Sequence[str]], found: list[str]) -> list[str]:
    if blocks is None:
        return found
    names = [b if b.startswith("net.") else f"net.{b}" for b in blocks]
    for b in names:
        try:
            net.get_submodule(b[len("net."):])
        except AttributeError:
            raise ValueError(f"blocks: the model has no submodule {b!r}") from None
    return names


def build_timm(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32,
               normalize: Union[None, str, Sequence] = None,
               blocks: Optional[Sequence[str]] = None, **timm_kwargs) -> BridgedModel:
    """Any timm model, randomly initialized (`timm_kwargs` go to timm.create_model).

    timm models that take an input size (ViTs) are built for `image_size`.
    """
    timm = import_optional("timm")
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "timm.list_models()")
    for reserved in ("pretrained", "num_classes", "in_chans"):
        if reserved in timm_kwargs:
            raise ValueError(
                f"option {reserved!r} is set by build_model; do not pass it for timm:{name}")
    optional = {} if "img_size" in timm_kwargs else {"img_size": image_size}
    net = _create(timm.create_model, optional, model_name=name, pretrained=False,
                  num_classes=num_classes, in_chans=in_channels, **timm_kwargs)
    head = _check_linear_head(net.get_classifier(), num_classes, f"timm:{name}")
    found = []
    for info in getattr(net, "feature_info", None) or []:
        module = info.get("module") if isinstance(info, dict) else None
        if module:
            try:
                net.get_submodule(module)
            except AttributeError:
                continue
            found.append(f"net.{module}")
    found = found or discover_blocks(net, prefix="net.")
    return BridgedModel(net, source="timm", head_name=_qualified_name(net, head),
                        block_names=_resolve_blocks(net, blocks, found),
                        normalize=_make_normalize(normalize, in_channels))


def _replace_input_conv(net: nn.Module, in_channels: int, what: str) -> None:
    """Swap the first 3-channel Conv2d for one taking `in_channels` channels."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size,
                            stride=module.stride, padding=module.padding,
                            dilation=module.dilation, groups=1, bias=module.bias is not None,
                            padding_mode=module.padding_mode)
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name), child, new)
            return
    raise ValueError(
        f"{what}: found no 3-channel input convolution to adapt to {in_channels} channels")


def build_torchvision(name: str, *, num_classes: int, in_channels: int = 3,
                      image_size: int = 32, normalize: Union[None, str, Sequence] = None,
                      blocks: Optional[Sequence[str]] = None, **tv_kwargs) -> BridgedModel:
    """Any torchvision classification model, randomly initialized (weights=None).

    in_channels != 3 replaces the first convolution; models that take an image size
    (torchvision ViTs) are built for `image_size`.
    """
    tv_models = import_optional("torchvision.models", "torchvision")
    known = tv_models.list_models(module=tv_models)
    if name not in known:
        raise _unknown("torchvision", name, known, ", ".join(known))
    for reserved in ("weights", "num_classes"):
        if reserved in tv_kwargs:
            raise ValueError(
                f"option {reserved!r} is set by build_model; do not pass it for tv:{name}")
    optional = {} if "image_size" in tv_kwargs else {"image_size": image_size}
    net = _create(tv_models.get_model, optional, name=name, weights=None,
                  num_classes=num_classes, **tv_kwargs)
    if in_channels != 3:
        _replace_input_conv(net, in_channels, f"tv:{name}")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    head = _check_linear_head(linears[-1] if linears else None, num_classes, f"tv:{name}")
    return BridgedModel(net, source="torchvision", head_name=_qualified_name(net, head),
                        block_names=_resolve_blocks(net, blocks, discover_blocks(net, "net.")),
                        normalize=_make_normalize(normalize, in_channels))
