"""CIFAR-style ResNets: ResNet-18 (4 stages, projection shortcuts) and ResNet-20 of He et al.

Both are `CifarResNet`: a 3x3 stride-1 stem (no max-pool, since 32x32 inputs are already
small), stages of `BasicBlock`s (the first block of every stage after the first halves the
resolution), global average pooling and a linear head.

Block names: "stem", then "layer<s>.<b>" for block b of stage s, e.g. resnet20 has
"stem", "layer1.0", "layer1.1", "layer1.2", "layer2.0", ..., "layer3.2".
Inside a block: conv1, bn1, act1, conv2, bn2, shortcut, act2 (act2's output is the block's).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast.validate import check_int

from .base import Classifier, ConvBNAct, init_conv_weights

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample spatially, zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        # pad symmetrically in the channel dimension, as in the original CIFAR ResNets
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016).

    shortcut: "A" zero-pads channels (parameter-free; the CIFAR ResNet-20 of the paper),
    "B" uses a 1x1 conv + BN projection (the usual CIFAR ResNet-18). Either is used only
    when the shape changes; otherwise the shortcut is the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 shortcut: str = "B") -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet with a CIFAR stem; `widths[i]` channels and `depths[i]` blocks in stage i+1."""

    def __init__(self, widths: Sequence[int], depths: Sequence[int], *, num_classes: int,
                 in_channels: int = 3, shortcut: str = "B") -> None:
        super().__init__(in_channels=in_channels, image_size=None)
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths and depths must be equally long, got {widths}, {depths}")
        self.stem = ConvBNAct(in_channels, widths[0], 3)
        self.block_names = ["stem"]
        self._stages: list[str] = []
        previous = widths[0]
        for s, (width, depth) in enumerate(zip(widths, depths), start=1):
            blocks = []
            for b in range(depth):
                stride = 2 if (b == 0 and s > 1) else 1
                blocks.append(BasicBlock(previous, width, stride, shortcut))
                previous = width
                self.block_names.append(f"layer{s}.{b}")
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
            self._stages.append(f"layer{s}")
        self.head = nn.Linear(previous, num_classes)
        init_conv_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)
        for name in self._stages:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def resnet18(*, num_classes: int, in_channels: int = 3, image_size: int = 32,
             width: int = 64) -> CifarResNet:
    """CIFAR ResNet-18: stages of 2 blocks with width, 2, 4, 8 x width channels."""
    del image_size  # any size works: global average pooling
    w = check_int("width", width)
    return CifarResNet((w, 2 * w, 4 * w, 8 * w), (2, 2, 2, 2), num_classes=num_classes,
                       in_channels=in_channels, shortcut="B")


def resnet20(*, num_classes: int, in_channels: int = 3, image_size: int = 32,
             width: int = 16, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016): 3 stages of 3 blocks, 16-32-64 channels."""
    del image_size
    w = check_int("width", width)
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    return CifarResNet((w, 2 * w, 4 * w), (3, 3, 3), num_classes=num_classes,
                       in_channels=in_channels, shortcut=shortcut)
