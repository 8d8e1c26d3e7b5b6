"""The interface every project model implements, and the small layers they share.

A project model is a `Classifier`: `features(x)` gives the (N, F) penultimate
representation, `head` is an `nn.Linear(F, num_classes)` and `forward(x)` is exactly
`head(features(x))`, so experiments can work on features and the linear head separately
(importance scores, shared heads, per-channel ablation). `block_names` lists, in forward
order, the qualified names of the submodules whose outputs are the model's "blocks".

Activations are never computed in place: forward hooks on any submodule (block outputs,
ablation) must see tensors that are not overwritten later in the forward pass.
"""
from __future__ import annotations

import abc
from typing import Optional

import torch
from torch import nn


class Classifier(nn.Module, abc.ABC):
    """Base class: `forward(x) = head(features(x))`; subclasses set `head` and `block_names`."""

    head: nn.Linear
    block_names: list[str]

    def __init__(self, *, in_channels: int, image_size: Optional[int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        # Models that need a fixed input size (MLP, ViT) set image_size; convnets keep
        # None and accept any size their pooling allows.
        self.image_size = image_size

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) penultimate representation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def num_features(self) -> int:
        """Width F of the penultimate representation."""
        return self.head.in_features

    def _check_input(self, x: torch.Tensor) -> None:
        """Reject inputs of the wrong rank, channel count or (for fixed-size models) size."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: x must have shape (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"{type(self).__name__} was built for {self.image_size}x{self.image_size} "
                f"images, got {tuple(x.shape)}"
            )


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> ReLU, with children named `conv`, `bn`, `act`.

    The names let experiments address the pre-BN output ("<unit>.conv"), the post-BN
    output ("<unit>.bn") or the post-activation output ("<unit>") of the same unit.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
        stride: int = 1, padding: Optional[int] = None,
    ) -> None:
        if padding is None:
            padding = kernel_size // 2
        super().__init__()
        # bias is redundant before BatchNorm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()


class LinearAct(nn.Sequential):
    """Linear -> ReLU, with children named `linear` and `act`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.ReLU()


def init_conv_weights(module: nn.Module) -> None:
    """He (fan-out) init for convolutions, unit/zero BatchNorm; Linear keeps torch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
