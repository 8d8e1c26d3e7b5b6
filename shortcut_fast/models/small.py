"""Small models of DeNetDM (Vadakkeeveetil Sreelatha et al., NeurIPS 2024).

- `SmallCNN` ("small-cnn"): the shallow branch used on Corrupted CIFAR-10: three 5x5
  conv-BN-ReLU units (in -> 32 -> 64 -> 64) with a 2x2 max-pool after the first two, then
  global average pooling to 64-d features. With DeNetDM's unpadded convs a 32x32 image ends
  as a 1x1 map (32 -> 28 -> 14 -> 10 -> 5 -> 1), so the pooling equals their flatten.
  Block names: "conv1", "conv2", "conv3" (pools: "pool1", "pool2").
- `MLP` ("mlp", "mlp3", "mlp5"): flattened input, `depth` linear layers in total including
  the head, hidden width 100 and ReLU; mlp3 / mlp5 are DeNetDM's Colored MNIST shallow and
  deep branches. Block names: "fc1" ... "fc<depth-1>" (each Linear -> ReLU, children
  linear, act); the features are the output of the last of them.

Both branches of a DeNetDM pair have the same feature width (64 for resnet20 / small-cnn,
`width` for the MLPs), so their features can share one linear head.
"""
from __future__ import annotations

import torch
from torch import nn

from shortcut_fast.validate import check_int

from .base import Classifier, ConvBNAct, LinearAct, init_conv_weights


class SmallCNN(Classifier):
    """Three 5x5 conv-BN-ReLU units, two max-pools, global average pooling."""

    def __init__(self, *, num_classes: int, in_channels: int = 3, width: int = 32,
                 padding: int = 0) -> None:
        super().__init__(in_channels=in_channels, image_size=None)
        self.conv1 = ConvBNAct(in_channels, width, 5, padding=padding)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = ConvBNAct(width, 2 * width, 5, padding=padding)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = ConvBNAct(2 * width, 2 * width, 5, padding=padding)
        self.head = nn.Linear(2 * width, num_classes)
        self.block_names = ["conv1", "conv2", "conv3"]
        init_conv_weights(self)

    @staticmethod
    def output_size(image_size: int, padding: int) -> int:
        """Side of the final feature map for a square input (<= 0: input too small)."""
        s = image_size
        for layer in ("conv", "pool", "conv", "pool", "conv"):
            s = s + 2 * padding - 4 if layer == "conv" else s // 2
            if s < 1:
                return 0
        return s

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        return self.conv3(x).mean(dim=(2, 3))


class MLP(Classifier):
    """Multi-layer perceptron on flattened images; `depth` linear layers incl. the head."""

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int,
                 depth: int = 3, width: int = 100) -> None:
        super().__init__(in_channels=in_channels, image_size=image_size)
        in_features = in_channels * image_size * image_size
        self.block_names = []
        for i in range(1, depth):
            self.add_module(f"fc{i}", LinearAct(in_features if i == 1 else width, width))
            self.block_names.append(f"fc{i}")
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = x.flatten(1)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return x


def small_cnn(*, num_classes: int, in_channels: int = 3, image_size: int = 32,
              width: int = 32, padding: int = 0) -> SmallCNN:
    """DeNetDM's shallow C-CIFAR10 branch; `padding=2` keeps sizes (needed below 32x32)."""
    check_int("width", width)
    check_int("padding", padding, minimum=0)
    if padding > 2:
        raise ValueError(f"padding must be 0, 1 or 2 for 5x5 convs, got {padding}")
    side = SmallCNN.output_size(image_size, padding)
    if side < 1:
        raise ValueError(
            f"small-cnn with padding={padding} needs larger images than "
            f"{image_size}x{image_size} (its last feature map would be empty); "
            "use image_size >= 32 or padding=2"
        )
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width,
                    padding=padding)


def mlp(*, num_classes: int, in_channels: int = 3, image_size: int = 32,
        depth: int = 3, width: int = 100) -> MLP:
    """MLP on flattened images: `depth` linear layers in total (>= 2), hidden `width`."""
    check_int("depth", depth, minimum=2)
    check_int("width", width)
    return MLP(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
               depth=depth, width=width)
