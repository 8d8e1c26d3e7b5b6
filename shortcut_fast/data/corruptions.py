"""Image corruptions for OOD tests (CIFAR-10-C style, written in torch), on float images.

Every corruption maps images (N, C, H, W) with values in value_range to the same range,
with a severity 1..5 and a seed. Names: gaussian-noise, shot-noise, gaussian-blur,
contrast, brightness, saturate, pixelate, fog (a smooth random low-frequency haze).
These are our torch versions of the usual corruption types, not bit-exact copies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import ImageDataset, make_generator


def _gaussian_noise(x, s, g, span):
    return x + torch.randn(x.shape, generator=g).to(x.device) * span * [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]


def _shot_noise(x, s, g, span, lo):
    rate = [60, 25, 12, 5, 3][s - 1]
    unit = ((x - lo) / span).clamp(0, 1)
    return lo + span * torch.poisson(unit.cpu() * rate, generator=g).to(x.device) / rate


def _gaussian_blur(x, s):
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][s - 1]
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _contrast(x, s):
    factor = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _brightness(x, s, span):
    return x + span * [0.1, 0.2, 0.3, 0.4, 0.5][s - 1]


def _saturate(x, s):
    factor = [0.3, 0.1, 2.0, 5.0, 20.0][s - 1]
    gray = x.mean(dim=1, keepdim=True)
    return gray + (x - gray) * factor


def _pixelate(x, s):
    factor = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _fog(x, s, g, span, lo):
    strength = [0.2, 0.3, 0.4, 0.5, 0.6][s - 1]
    n, _, h, w = x.shape
    coarse = torch.rand((n, 1, 4, 4), generator=g).to(x.device)
    haze = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return x * (1 - strength) + strength * (lo + span * haze)


CORRUPTIONS = ("gaussian-noise", "shot-noise", "gaussian-blur", "contrast", "brightness", "saturate",
               "pixelate", "fog")


def corrupt(images: torch.Tensor, name: str, severity: int = 3, *, value_range=(0.0, 1.0), seed: int = 0,
            clamp: bool = True) -> torch.Tensor:
    """A corrupted float copy of images (N, C, H, W) in value_range."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    lo, hi = float(value_range[0]), float(value_range[1])
    span = hi - lo
    g = make_generator(seed, 0xC0)
    x = images.float()
    out = {
        "gaussian-noise": lambda: _gaussian_noise(x, severity, g, span),
        "shot-noise": lambda: _shot_noise(x, severity, g, span, lo),
        "gaussian-blur": lambda: _gaussian_blur(x, severity),
        "contrast": lambda: _contrast(x, severity),
        "brightness": lambda: _brightness(x, severity, span),
        "saturate": lambda: _saturate(x, severity),
        "pixelate": lambda: _pixelate(x, severity),
        "fog": lambda: _fog(x, severity, g, span, lo),
    }[name]()
    return out.clamp(lo, hi) if clamp else out


def parse_corruption(spec: str) -> tuple[str, int]:
    """'NAME' or 'NAME:SEVERITY' -> (name, severity); severity defaults to 3."""
    name, _, sev = spec.partition(":")
    try:
        severity = int(sev) if sev else 3
    except ValueError:
        raise ValueError(f"corruption must be NAME or NAME:SEVERITY (1..5), got {spec!r}") from None
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    return name, severity


def corrupted_dataset(dataset: ImageDataset, spec: str, *, seed: int = 0) -> ImageDataset:
    """The dataset with a corruption applied to every image (uint8 sets stay uint8)."""
    name, severity = parse_corruption(spec)
    images = dataset.images
    if images.dtype == torch.uint8:
        out = corrupt(images.float() / 255, name, severity, seed=seed)
        out = (out * 255).round().to(torch.uint8)
    else:  # float data (e.g. standardized): use its 1%..99% range
        flat = images.flatten().float()
        sample = flat[torch.randperm(flat.numel(), generator=make_generator(seed, 1))[:100_000]]
        lo, hi = torch.quantile(sample, 0.01).item(), torch.quantile(sample, 0.99).item()
        out = corrupt(images, name, severity, value_range=(lo, hi), seed=seed, clamp=False)
    return ImageDataset(out, dataset.labels, dataset.attributes, num_classes=dataset.num_classes,
                        num_attributes=dataset.num_attributes, name=f"{dataset.name}-{name}{severity}")
