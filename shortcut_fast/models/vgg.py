"""VGG-11 and VGG-16 with BatchNorm, adapted to 32x32 inputs (CIFAR style).

The conv stack is the one of Simonyan & Zisserman (configurations A and D) with BatchNorm
after every conv; the three large fully connected layers are replaced by global average
pooling and one linear head. At 32x32 the five max-pools leave a 1x1 map, so the pooling is
exact; the pools use ceil_mode so that sizes that are not multiples of 32 (e.g. 28x28) still
work (28 -> 14 -> 7 -> 4 -> 2 -> 1).

Block names: "conv1" ... "convK" in forward order (K = 8 for vgg11, 13 for vgg16); each is a
conv-BN-ReLU unit with children conv, bn, act. The max-pools are "pool1" ... "pool5".
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from shortcut_fast.validate import check_int

from .base import Classifier, ConvBNAct, init_conv_weights

# channel counts for width 64; "M" is a 2x2 max-pool
CONFIGS: dict[str, Sequence[Union[int, str]]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(Classifier):
    """VGG-BN conv stack, global average pooling, linear head."""

    def __init__(self, config: Sequence[Union[int, str]], *, num_classes: int,
                 in_channels: int = 3, width: int = 64) -> None:
        super().__init__(in_channels=in_channels, image_size=None)
        self.block_names = []
        self._order: list[str] = []
        channels, n_conv, n_pool = in_channels, 0, 0
        for item in config:
            if item == "M":
                n_pool += 1
                name = f"pool{n_pool}"
                self.add_module(name, nn.MaxPool2d(2, ceil_mode=True))
            else:
                n_conv += 1
                name = f"conv{n_conv}"
                out = max(1, round(int(item) * width / 64))
                self.add_module(name, ConvBNAct(channels, out, 3))
                self.block_names.append(name)
                channels = out
            self._order.append(name)
        self.head = nn.Linear(channels, num_classes)
        init_conv_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        for name in self._order:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def _vgg(name: str, num_classes: int, in_channels: int, width: int) -> VGG:
    check_int("width", width)
    return VGG(CONFIGS[name], num_classes=num_classes, in_channels=in_channels, width=width)


def vgg11(*, num_classes: int, in_channels: int = 3, image_size: int = 32,
          width: int = 64) -> VGG:
    """VGG-11-BN for small images; `width` is the first stage's channel count (64)."""
    del image_size  # ceil-mode pools and global pooling accept any size
    return _vgg("vgg11", num_classes, in_channels, width)


def vgg16(*, num_classes: int, in_channels: int = 3, image_size: int = 32,
          width: int = 64) -> VGG:
    """VGG-16-BN for small images; `width` is the first stage's channel count (64)."""
    del image_size
    return _vgg("vgg16", num_classes, in_channels, width)
