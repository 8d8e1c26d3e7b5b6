"""Spurious memorization: do a few channels memorize the minority training images? And mitigation.

Two classes with a planted shortcut: in 90 % of the training images the colour names the
class (majority groups), in 10 % the other colour (minority groups: y0/a1 and y1/a0). The
class itself is carried only by a very faint stripe orientation. A small CNN (torchvision
conv-BN-ReLU blocks) trained long on few images fits the minority images by memorizing them:
train accuracy 1 on those groups, far lower test accuracy (the memorization gap). The analysis
ablates every channel of the chosen layers and ranks channels by how much more their removal
costs the minority train images than the majority ones. Then the mitigation (pruned/dense
contrastive training from the trained model) runs for two epochs.

    python examples/memorization.py [OUT_FOLDER]      # seconds on a CPU
"""
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

import shortcut_fast as sf

torch.manual_seed(0)
SIZE = 16
TINTS = torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, 0.3]])  # colour of attribute 0 (red), 1 (blue)


def make_images(n: int, aligned: float, generator: torch.Generator):
    """(images, labels, attributes): stripe orientation is the label; the colour is the attribute."""
    y = torch.randint(0, 2, (n,), generator=generator)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    stripes = torch.stack([rows, cols]).float()  # horizontal / vertical
    x = 0.3 + 0.015 * torch.cos(torch.pi * stripes[y] / 2).unsqueeze(1).expand(n, 3, SIZE, SIZE)
    x = x + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=generator)
    a = torch.where(torch.rand(n, generator=generator) < aligned, y, 1 - y)
    return (x + TINTS[a].view(n, 3, 1, 1)).clamp(0, 1), y, a


g = torch.Generator().manual_seed(0)
train = make_images(200, aligned=0.9, generator=g)
test = make_images(200, aligned=0.5, generator=g)  # every group equally large

model = nn.Sequential(OrderedDict(
    features=nn.Sequential(Conv2dNormActivation(3, 8), Conv2dNormActivation(8, 16, stride=2),
                           Conv2dNormActivation(16, 16)),
    pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(16, 2)))
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
x_train, y_train, _ = train
for step in range(300):  # ~100 passes over 200 images: enough to memorize the minority
    index = torch.randint(0, len(x_train), (64,), generator=g)
    loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()

data = sf.data.as_splits(train, test=test, name="stripes+colour")  # groups y/a from the attribute
out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="memorization-"))

# 1. Where is the minority memorized? Sweep every channel of the three blocks' convs.
config = sf.memorization.Config(layers=["features.0.0", "features.1.0", "features.2.0"], top_k=3)
result = sf.memorization.run(model, data, config)
result.write(out / "memorization")  # result.json, top_channels.csv, figures
print(result.summary())

# 2. Mitigation from the same model (trained further in place): two short epochs.
mitigation = sf.memorization.MitigationConfig(epochs=2, batch_size=64, device="cpu")
mitigated = sf.memorization.mitigate(model, data, mitigation)
mitigated.write(out / "mitigation")  # result.json, figures
print(mitigated.summary())
