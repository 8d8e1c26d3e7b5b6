"""Feature complexity: are the features a model relies on simple or complex?

A small CNN (torchvision conv-BN-ReLU blocks) is trained for a few steps on synthetic
images whose label is carried by stripe orientation (the core feature) and, in 90 % of the
training images, also by a colour tint (a planted shortcut; the test images are tinted at
random). The analysis decomposes the penultimate layer into features (NMF directions) and
measures, per feature, how decodable it is from each block (V-information): complexity near
0 = readable at the first block already. It also probes the two named factors, label and
colour attribute, and which of the two the model's decisions follow.

    python examples/complexity.py [OUT_FOLDER]        # seconds on a CPU
"""
import sys
import tempfile
from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

import shortcut_fast as sf

torch.manual_seed(0)
SIZE, CLASSES = 16, 4
TINTS = torch.tensor([[0.3, 0, 0], [0, 0.3, 0], [0, 0, 0.3], [0.3, 0.3, 0]])  # class c's colour


def make_images(n: int, aligned: float, generator: torch.Generator):
    """Stripes whose orientation is the label; a tint that names the label in `aligned` of the images."""
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    stripes = torch.stack([rows, cols, rows + cols, rows - cols]).float()  # 4 orientations
    x = 0.3 + 0.06 * torch.cos(torch.pi * stripes[y] / 2).unsqueeze(1).expand(n, 3, SIZE, SIZE)
    x = x + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=generator)
    keep = torch.rand(n, generator=generator) < aligned
    a = torch.where(keep, y, torch.randint(0, CLASSES, (n,), generator=generator))  # the colour attribute
    return (x + TINTS[a].view(n, 3, 1, 1)).clamp(0, 1), y, a


g = torch.Generator().manual_seed(0)
train = make_images(1200, aligned=0.9, generator=g)
test = make_images(400, aligned=0.0, generator=g)  # colour independent of the label

# Our own model: blocks in a `features` container, a linear `head` (the penultimate layer is its input).
model = nn.Sequential(OrderedDict(
    features=nn.Sequential(Conv2dNormActivation(3, 16), Conv2dNormActivation(16, 32, stride=2),
                           Conv2dNormActivation(32, 32)),
    pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(32, CLASSES)))
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
x_train, y_train, _ = train
for step in range(60):
    index = torch.randint(0, len(x_train), (64,), generator=g)
    loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()

# (images, labels, attributes): the attribute's values are class indices, so the data knows
# which images are bias-aligned; probes train on train, are measured on val (held out of it).
data = sf.data.as_splits(train, test=test, name="stripes+tint")
config = sf.complexity.Config(directions="nmf:8", max_images=600, direction_images=600, max_heldout=300)
result = sf.complexity.run(model, data, config)

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="complexity-")
result.write(out)  # result.json, features.csv, figures
print(result.summary())
f = result.factors
print(f"\ncomplexity of the label (stripes) {f['complexity']['label']:.3f} vs the colour attribute "
      f"{f['complexity']['attribute']:.3f}")
