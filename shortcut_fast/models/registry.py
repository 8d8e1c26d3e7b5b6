"""Model names -> builders: `build_model` and `list_models`."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from torch import nn

from shortcut_fast.validate import check_int

from .bridges import build_timm, build_torchvision
from .resnet import resnet18, resnet20
from .small import mlp, small_cnn
from .vgg import vgg11, vgg16
from .vit import vit_tiny
from .weights import load_pretrained

_COMMON = ("num_classes", "in_channels", "image_size")


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    description: str
    fixed: dict[str, Any] = field(default_factory=dict)  # options an alias pins

    def options(self) -> list[str]:
        params = inspect.signature(self.builder).parameters
        return [n for n in params if n not in _COMMON and n not in self.fixed]


_MODELS: dict[str, _Entry] = {
    "resnet18": _Entry(resnet18, "CIFAR ResNet-18 (3x3 stem, no max-pool, 4x2 BasicBlocks, "
                                 "512-d features); options: width=64"),
    "resnet20": _Entry(resnet20, "CIFAR ResNet-20 of He et al. (16-32-64, 3x3 BasicBlocks, "
                                 "64-d features); options: width=16, shortcut='A'|'B'"),
    "vgg11": _Entry(vgg11, "VGG-11 with BatchNorm for 32x32, global pool + linear head; "
                           "options: width=64"),
    "vgg16": _Entry(vgg16, "VGG-16 with BatchNorm for 32x32, global pool + linear head; "
                           "options: width=64"),
    "small-cnn": _Entry(small_cnn, "DeNetDM shallow C-CIFAR10 branch: 3 conv5x5 (32-64-64) + BN, "
                                   "2 max-pools, 64-d features; options: width=32, padding=0"),
    "mlp": _Entry(mlp, "MLP on flattened images, ReLU; options: depth=3 (linear layers incl. "
                       "head), width=100"),
    "mlp3": _Entry(mlp, "DeNetDM Colored MNIST shallow branch: MLP with 3 linear layers, "
                        "width 100", {"depth": 3}),
    "mlp5": _Entry(mlp, "DeNetDM Colored MNIST deep branch: MLP with 5 linear layers, "
                        "width 100", {"depth": 5}),
    "vit-tiny": _Entry(vit_tiny, "tiny pre-LN ViT with class token; options: patch=4, dim=192, "
                                 "depth=6, heads=3, mlp_ratio=4.0"),
}

_BRIDGES = {
    "timm:": (build_timm, "timm:NAME", "any timm model, e.g. timm:resnet18 (random init; "
              "pretrained=PATH loads a local file); options go to timm.create_model, plus "
              "normalize=None|'imagenet'|(mean, std) and blocks=[names]"),
    "tv:": (build_torchvision, "tv:NAME", "any torchvision classification model, e.g. "
            "tv:resnet18 (weights=None; pretrained=PATH loads a local file); options go to "
            "torchvision.models.get_model, plus normalize and blocks"),
}


def list_models() -> dict[str, str]:
    """Model name -> one-line description (bridges appear as "timm:NAME" and "tv:NAME")."""
    out = {name: entry.description for name, entry in _MODELS.items()}
    out.update({label: text for _, label, text in _BRIDGES.values()})
    return out


def _unknown_name(name: str) -> ValueError:
    valid = ", ".join(list(_MODELS) + [label for _, label, _ in _BRIDGES.values()])
    return ValueError(f"unknown model {name!r}; valid names: {valid}")


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32,
                pretrained: Optional[Union[str, os.PathLike]] = None, **options) -> nn.Module:
    """Build model `name` for (N, in_channels, image_size, image_size) images in [0, 1].

    `options` are the model's own (see `list_models()`); unknown ones are an error.
    `pretrained` is the path of a local state-dict file (never downloaded); a head of another
    shape is dropped with a warning. The returned module records its arguments in
    `model.build_config` so that a checkpoint can be rebuilt.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    check_int("num_classes", num_classes)
    check_int("in_channels", in_channels)
    check_int("image_size", image_size)
    common = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)

    prefix = next((p for p in _BRIDGES if name.startswith(p)), None)
    if prefix is not None:
        library_name = name[len(prefix):]
        if not library_name:
            raise ValueError(f"{name!r}: give a model name after {prefix!r}, e.g. {prefix}resnet18")
        try:
            model = _BRIDGES[prefix][0](library_name, **common, **options)
        except TypeError as exc:  # the library rejected an option
            raise ValueError(f"bad options {sorted(options)} for {name!r}: {exc}") from exc
    else:
        entry = _MODELS.get(name)
        if entry is None:
            raise _unknown_name(name)
        valid = entry.options()
        bad = sorted(set(options) - set(valid))
        if bad:
            pinned = [k for k in bad if k in entry.fixed]
            pins = ", ".join(f"{k}={entry.fixed[k]}" for k in pinned)
            why = f" ({name} pins {pins})" if pinned else ""
            raise ValueError(
                f"unknown option(s) {', '.join(bad)} for model {name!r}{why}; "
                f"valid options: {', '.join(valid) or 'none'}"
            )
        model = entry.builder(**common, **entry.fixed, **options)
    model.build_config = dict(name=name, **common, **options)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def model_option_names(name: str) -> list[str] | None:
    """The options model `name` accepts (None for timm:/tv: models, which pass any through)."""
    if any(name.startswith(p) for p in _BRIDGES):
        return None
    entry = _MODELS.get(name)
    if entry is None:
        raise _unknown_name(name)
    return entry.options()


def model_from_checkpoint(path: Union[str, os.PathLike], map_location="cpu", *,
                          what: str = "--checkpoint") -> nn.Module:
    """Rebuild a model from a checkpoint written by shortcut_fast.train (its `model_config`
    records the build_model arguments) and load its weights. The file is read with
    weights_only=True (a .pt never runs code); anything else is refused naming the file."""
    from shortcut_fast.run_folder import load_state_file

    state = load_state_file(path, map_location=map_location, what=what)
    config = state.get("model_config") if isinstance(state, dict) else None
    if not config or not isinstance(state.get("model"), dict):
        raise ValueError(f"{what} {str(path)!r} is not a checkpoint written by shortcut-fast train (it has no "
                         f"model_config); build the model with build_model(...) and load its weights instead")
    config = dict(config)
    model = build_model(config.pop("name"), **config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{what} {str(path)!r}: its weights do not fit its own model_config ({first})") from None
    return model


def check_model_fits(model: nn.Module, *, num_classes: int, in_channels: int, image_size: int,
                     source: str = "the model") -> None:
    """Refuse a model built for other data: a 10-class head on 4-class data would report a
    meaningless accuracy (and the converse crashes deep inside the loss)."""
    built = getattr(model, "build_config", None) or {}
    wanted = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    head = getattr(model, "head", None)
    if built.get("num_classes") is None and isinstance(head, nn.Linear):
        built = {**built, "num_classes": head.out_features}
    bad = [f"{k} {built[k]} (the data has {v})" for k, v in wanted.items()
           if built.get(k) is not None and built[k] != v]
    if bad:
        raise ValueError(f"{source} was built for other data: " + ", ".join(bad)
                         + "; use a checkpoint trained on this dataset or choose the matching --data")
