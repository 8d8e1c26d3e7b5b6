"""Frequency-biased synthetic images (docs/experiments.md#frequency-shortcuts; our generator, the paper's was not released).

Radial bands B1 (low) .. B4 (high) are those of shortcut_fast.ops.freq.radial_band_index:
equal width on the normalized radius, band 0 = B1 holds DC.

Generator (dataset Syn_k, k = bias_band in 1..4). Every (class, band) has a fixed pattern: the
inverse FFT of a conjugate-symmetric complex-Gaussian spectrum supported on the band (random
magnitude and phase; DC excluded so patterns are zero-mean), scaled to unit RMS. A sample of
class y is  sum_b a_b * pattern[y, b]  circularly shifted by a random (dy, dx), plus white
Gaussian noise, with a_b = strength_b * max(0, 1 + jitter_b * eps), eps ~ N(0, 1) per sample and
band. In band B_k the strength is high and the jitter low (bias_strength, jitter); in the other
bands the patterns are weaker and less consistent (other_strength, other_jitter) but still
informative. Images are then standardized with the training set's mean and std.
"""
from __future__ import annotations

import math

import torch

from shortcut_fast.validate import check_int
from shortcut_fast.ops.freq import band_edges, mirror, radial_band_index

from .core import DatasetSplits, ImageDataset, make_generator

__all__ = ["make_synthetic_freq"]



def _class_patterns(num_classes, channels, size, n_bands, g) -> torch.Tensor:
    """(classes, bands, channels, H, W) float32 patterns, each band-limited, real, zero-mean, unit RMS."""
    band = radial_band_index(size, size, n_bands)
    shape = (num_classes, n_bands, channels, size, size)
    z = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    support = band[None, None, None] == torch.arange(n_bands)[None, :, None, None, None]
    support[..., 0, 0] = False  # no DC: patterns are zero-mean
    z = z * support
    z = 0.5 * (z + mirror(z).conj())  # conjugate-symmetric, same support: ifft2 is real
    patterns = torch.fft.ifft2(z).real
    rms = patterns.pow(2).mean(dim=(2, 3, 4), keepdim=True).sqrt()
    return (patterns / rms).float()


def _circular_shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Roll image n by (dy[n], dx[n]), all at once with one gather on the flattened pixels."""
    n, c, H, W = x.shape
    rows = (torch.arange(H)[None, :] - dy[:, None]) % H
    cols = (torch.arange(W)[None, :] - dx[:, None]) % W
    index = (rows[:, :, None] * W + cols[:, None, :]).reshape(n, 1, H * W).expand(n, c, H * W)
    return x.reshape(n, c, H * W).gather(2, index).reshape(n, c, H, W)


def _sample(patterns, n, strength, jitter, noise, shift, g):
    num_classes, n_bands, channels, H, W = patterns.shape
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    eps = torch.randn(n, n_bands, generator=g)
    amp = strength[None] * torch.clamp(1 + jitter[None] * eps, min=0)
    x = torch.empty(n, channels * H * W)
    flat = patterns.reshape(num_classes, n_bands, -1)
    for c in range(num_classes):  # per class, the band sum is one (n_c, bands) @ (bands, pixels) matmul
        sel = (labels == c).nonzero().flatten()
        x[sel] = amp[sel] @ flat[c]
    x = x.reshape(n, channels, H, W)
    dy = torch.randint(0, H, (n,), generator=g)
    dx = torch.randint(0, W, (n,), generator=g)
    if shift:
        x = _circular_shift(x, dy, dx)
    x += noise * torch.randn(x.shape, generator=g)
    return x, labels


def make_synthetic_freq(*, seed: int = 0, bias_band: int = 1, num_classes: int = 4, image_size: int = 32,
                        channels: int = 3, n_train: int = 2000, n_val: int = 500, n_test: int = 1000,
                        noise: float = 1.0, jitter: float = 0.1, bias_strength: float = 1.0,
                        other_strength: float = 0.15, other_jitter: float = 1.0, shift: bool = True,
                        n_bands: int = 4) -> DatasetSplits:
    """Dataset Syn_k with k = bias_band: float32 images, attribute -1 (see the module docstring)."""
    check_int("n_bands", n_bands, 2)
    if isinstance(bias_band, bool) or not isinstance(bias_band, int) or not 1 <= bias_band <= n_bands:
        raise ValueError(f"bias_band must be an int in 1..{n_bands}, got {bias_band!r}")
    check_int("num_classes", num_classes, 2)
    check_int("image_size", image_size, 4)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        check_int(name, value, 1)
    for name, value in (("noise", noise), ("jitter", jitter), ("bias_strength", bias_strength),
                        ("other_strength", other_strength), ("other_jitter", other_jitter)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    k = bias_band - 1
    strength = torch.full((n_bands,), float(other_strength))
    strength[k] = float(bias_strength)
    jit = torch.full((n_bands,), float(other_jitter))
    jit[k] = float(jitter)
    patterns = _class_patterns(num_classes, channels, image_size, n_bands, make_generator(seed, 0))

    data = {}
    for salt, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test)), start=1):
        data[split] = _sample(patterns, n, strength, jit, float(noise), shift, make_generator(seed, salt))
    mean = float(data["train"][0].mean())
    std = float(data["train"][0].std()) or 1.0
    name = f"synthetic-freq-b{bias_band}"
    sets = {split: ImageDataset((x - mean) / std, y, num_classes=num_classes, name=name)
            for split, (x, y) in data.items()}
    counts = torch.bincount(radial_band_index(image_size, image_size, n_bands).flatten(), minlength=n_bands)
    meta = {
        "band_edges": band_edges(n_bands),
        "band_edges_cycles_per_pixel": [e * math.sqrt(0.5) for e in band_edges(n_bands)],
        "band_definition": "band = floor(n_bands * sqrt(fy^2+fx^2)/sqrt(0.5)) clamped to n_bands-1, "
                           "fy/fx = torch.fft.fftfreq on the unshifted fft2 grid",
        "frequencies_per_band": counts.tolist(),
        "bias_band": bias_band,
        "band_strength": strength.tolist(),
        "band_jitter": jit.tolist(),
        "normalization": {"mean": mean, "std": std},
    }
    return DatasetSplits(name=name, train=sets["train"], val=sets["val"], test=sets["test"], extra={},
                         num_classes=num_classes, num_attributes=0, image_shape=(channels, image_size, image_size),
                         bias_aligned_attribute=False, meta=meta)
