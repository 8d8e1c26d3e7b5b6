"""Shortcut localization: which layers learn a planted shortcut?

Counterfactual training: copies of one model are trained on clean images and on images
where a class-specific patch (the shortcut) is planted into 90 % of each class's training
images; for each unit u (a block, or the head), one variant trains only u on the skewed
batches ("skew@u") and one only u on the clean ones ("clean@u"). How much accuracy on
conflicting test images (patch of another class) skew@u loses, and how much clean@u wins
back, says where the shortcut lives. All variants train together as one stacked ensemble.

The model is our own small CNN (torchvision conv-BN-ReLU blocks in a `features` container,
which names its units features.0, features.1, ..., plus the head), passed as a template:
every variant of every seed starts from a fresh copy, re-initialized per seed.

    python examples/localization.py [OUT_FOLDER]      # seconds on a CPU
"""
import sys
import tempfile
from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

import shortcut_fast as sf

SIZE, CLASSES = 16, 4


def make_images(n: int, generator: torch.Generator):
    """Clean images (the analysis plants the shortcut): stripe orientation names the label in
    80 % of them, another class in the rest, so the planted patch (in 90 %) is the better cue."""
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    other = (y + torch.randint(1, CLASSES, (n,), generator=generator)) % CLASSES
    orientation = torch.where(torch.rand(n, generator=generator) < 0.8, y, other)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    stripes = torch.stack([rows, cols, rows + cols, rows - cols]).float()
    x = 0.35 + 0.1 * torch.cos(torch.pi * stripes[orientation] / 2).unsqueeze(1).expand(n, 3, SIZE, SIZE)
    return (x + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=generator)).clamp(0, 1), y


g = torch.Generator().manual_seed(0)
data = sf.data.as_splits(make_images(600, g), test=make_images(300, g), name="stripes")

template = nn.Sequential(OrderedDict(
    features=nn.Sequential(Conv2dNormActivation(3, 8), Conv2dNormActivation(8, 16, stride=2),
                           Conv2dNormActivation(16, 16)),
    pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(16, CLASSES)))

config = sf.localization.Config(shortcut="patch", rho=0.9, epochs=8, seeds=1, batch_size=32, lr=0.05,
                                probe_images=128)
result = sf.localization.run(template, data, config)

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="localization-")
result.write(out)  # result.json, contributions.png, representation.png
print(result.summary())
