"""Frequency shortcuts: which frequencies does a classifier read each class from?

A small CNN (torchvision conv-BN-ReLU blocks) is trained for a few steps on synthetic images
whose only label signal is a planted shortcut: one spatial frequency per class (a faint
grating). The probe then finds, per class, the dominant frequency map (DFM: the frequencies whose removal hurts
that class most) and checks it is a shortcut (TPR/FPR of test images filtered to the DFM).
The planted frequency of each class should lie in its DFM.

    python examples/freq_probe.py [OUT_FOLDER]        # seconds on a CPU
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
PLANTED = [(0, 3), (3, 0), (2, 5), (5, 2)]  # class c's frequency (row, column) on the 16 x 16 spectrum


def make_images(n: int, generator: torch.Generator):
    """Smooth random images plus a faint grating at the label's frequency (the shortcut)."""
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    noise = torch.rand(n, 3, SIZE // 4, SIZE // 4, generator=generator)
    x = 0.3 + 0.4 * nn.functional.interpolate(noise, size=SIZE, mode="bilinear")  # low frequencies only
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for c, (u, v) in enumerate(PLANTED):
        grating = torch.cos(2 * torch.pi * (u * rows + v * cols) / SIZE)
        x[y == c] += 0.1 * grating
    return x.clamp(0, 1), y


g = torch.Generator().manual_seed(0)
x_train, y_train = make_images(1000, g)
x_test, y_test = make_images(400, g)

# Our own model (any nn.Module taking (N, C, H, W) works, e.g. torchvision.models.resnet18),
# trained here for a few steps; the probe only evaluates it.
model = nn.Sequential(OrderedDict(
    features=nn.Sequential(Conv2dNormActivation(3, 16), Conv2dNormActivation(16, 32)),
    pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(32, CLASSES)))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
model.train()
for step in range(60):
    index = torch.randint(0, len(x_train), (64,), generator=g)
    loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()

# The analysis: tensors in (as_splits holds 10 % of the training tensors out as val), a result out.
data = sf.data.as_splits((x_train, y_train), test=(x_test, y_test), name="planted-frequencies")
config = sf.freq_probe.Config(patch=4, max_images_per_class=50)
result = sf.freq_probe.run(model, data, config)

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="freq-probe-")
result.write(out)  # result.json + figures (ADCS, DFMs, TPR/FPR, band-stop)
print(result.summary())
for entry in result.classes:  # is the planted frequency (or its mirror) in the class's DFM?
    u, v = PLANTED[entry.label]
    found = [u, v] in entry.dfm or [(-u) % SIZE, (-v) % SIZE] in entry.dfm
    print(f"class {entry.label}: planted frequency {(u, v)} in its DFM: {found}")
