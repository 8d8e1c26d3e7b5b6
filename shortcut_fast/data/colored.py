"""Colored digits with a planted color attribute: the LfF Colored MNIST protocol.

Shared by `colored-mnist` (real MNIST) and `colored-digits` (its offline stand-in on
scikit-learn's 8x8 digits). The attribute ("bias label") is a color index 0..9; a sample is
aligned when its color index equals its digit.
"""
from __future__ import annotations

import math

import torch

from .core import DatasetSplits, ImageDataset, make_generator, rank_within_class

__all__ = ["LFF_COLORS", "colorize", "assign_bias_attributes", "lff_split_attributes", "aligned_extra",
           "make_colored_splits"]

# Mean foreground color (RGB in [0, 1]) of bias classes 0-9, as in LfF's Colored MNIST.
_LFF_RGB = (
    (0.984, 0.313, 0.169), (0.991, 0.916, 0.352), (0.673, 0.461, 0.580), (0.783, 0.832, 0.601),
    (0.088, 0.778, 0.982), (0.321, 0.961, 0.446), (0.025, 0.236, 0.759), (0.555, 0.102, 0.762),
    (0.208, 0.393, 0.019), (0.834, 0.202, 0.267),
)
LFF_COLORS = torch.tensor(_LFF_RGB)


def colorize(gray: torch.Tensor, attributes: torch.Tensor, *, color_std: float = 0.005,
             generator: torch.Generator | None = None, colors: torch.Tensor | None = None) -> torch.Tensor:
    """Color gray digits: uint8 (N,H,W) (or (N,1,H,W)) -> uint8 (N,3,H,W).

    Each image gets one color c = clip(colors[attribute] + N(0, color_std^2 I), 0, 1) (one
    draw per image, as in LfF) and pixel = round(c * gray); the background stays black.
    """
    gray = torch.as_tensor(gray)
    if gray.dim() == 4 and gray.shape[1] == 1:
        gray = gray[:, 0]
    if gray.dim() != 3 or gray.dtype != torch.uint8:
        raise ValueError(f"gray must be uint8 (N,H,W), got {gray.dtype} {tuple(gray.shape)}")
    colors = LFF_COLORS if colors is None else torch.as_tensor(colors, dtype=torch.float32)
    attributes = torch.as_tensor(attributes).long().cpu()
    if attributes.shape != (gray.shape[0],):
        raise ValueError(f"attributes must have shape ({gray.shape[0]},), got {tuple(attributes.shape)}")
    if attributes.numel() and (int(attributes.min()) < 0 or int(attributes.max()) >= len(colors)):
        raise ValueError(f"attributes must lie in [0, {len(colors)}) for colorize")
    if not color_std >= 0 or not math.isfinite(color_std):
        raise ValueError(f"color_std must be a finite number >= 0, got {color_std!r}")
    noise = torch.randn(attributes.shape[0], colors.shape[1], generator=generator)
    c = torch.clamp(colors[attributes] + color_std * noise, 0, 1).to(gray.device)
    out = gray[:, None].float() * c[:, :, None, None]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def assign_bias_attributes(labels: torch.Tensor, conflict_ratio: float, num_attributes: int,
                           generator: torch.Generator) -> torch.Tensor:
    """Bias attributes for a biased split (LfF protocol).

    In each class, after a seeded shuffle, the first round((1 - r) * n_c) samples are aligned
    (attribute = label); the remaining round(r * n_c) are spread as evenly as possible over
    the other num_attributes - 1 values, cycling from a random per-class start (so that with
    few conflicting samples their colors are not always label + 1).
    """
    if not 0 < conflict_ratio <= 1:
        raise ValueError(f"conflict_ratio must be in (0, 1], got {conflict_ratio!r}")
    if num_attributes < 2:
        raise ValueError(f"num_attributes must be >= 2, got {num_attributes!r}")
    labels = torch.as_tensor(labels).long().cpu()
    if labels.numel() and int(labels.max()) >= num_attributes:
        raise ValueError(f"labels must be < num_attributes={num_attributes} to define aligned attributes")
    rank, counts = rank_within_class(labels, generator)
    n_conflict = torch.floor(counts.double() * conflict_ratio + 0.5).long()
    n_aligned = (counts - n_conflict)[labels]
    start = torch.randint(0, max(num_attributes - 1, 1), (len(counts),), generator=generator)
    j = rank - n_aligned  # 0, 1, ... for the conflicting samples of a class
    offset = (j + start[labels]) % (num_attributes - 1) + 1
    return torch.where(j >= 0, (labels + offset) % num_attributes, labels)


def lff_split_attributes(labels: dict, *, conflict_ratio: float, num_attributes: int, seed: int,
                         unbiased_val: bool = False):
    """Yield (split, labels, attributes, generator) for "train", "val", "test" (LfF protocol).

    train and val are biased (assign_bias_attributes; val uniform when unbiased_val); test
    attributes are uniform over num_attributes (aligned ratio about 1 / num_attributes). The
    generator (salt 100 + split index) has drawn the attributes; callers may keep drawing
    from it (colorize does), so every split stays independent of the others.
    """
    for salt, split in enumerate(("train", "val", "test"), start=1):
        g = make_generator(seed, 100 + salt)
        y = torch.as_tensor(labels[split]).long()
        if split == "test" or (split == "val" and unbiased_val):
            a = torch.randint(0, num_attributes, y.shape, generator=g)
        else:
            a = assign_bias_attributes(y, conflict_ratio, num_attributes, g)
        yield split, y, a, g


def aligned_extra(test: ImageDataset) -> dict:
    """{"aligned", "conflicting"}: the test samples whose attribute equals / differs from their label."""
    aligned = test.attributes == test.labels
    return {"aligned": test.subset(aligned), "conflicting": test.subset(~aligned)}


def make_colored_splits(name: str, gray: dict, labels: dict, *, conflict_ratio: float, color_std: float,
                        seed: int, unbiased_val: bool = False) -> DatasetSplits:
    """Colored splits from gray uint8 images {"train","val","test"}: (N,H,W) and their labels.

    train and val follow the biased protocol (val unbiased when unbiased_val); test attributes
    are uniform over the 10 colors (aligned ratio about 0.1). extra = aligned / conflicting
    subsets of test.
    """
    k = len(LFF_COLORS)
    sets = {}
    for split, y, a, g in lff_split_attributes(labels, conflict_ratio=conflict_ratio, num_attributes=k, seed=seed,
                                               unbiased_val=unbiased_val):
        x = colorize(gray[split], a, color_std=color_std, generator=g)
        sets[split] = ImageDataset(x, y, a, num_classes=10, num_attributes=k, name=name)
    test = sets["test"]
    return DatasetSplits(name=name, train=sets["train"], val=sets["val"], test=test, extra=aligned_extra(test),
                         num_classes=10, num_attributes=k, image_shape=test.image_shape,
                         bias_aligned_attribute=True,
                         meta={"colors": [list(c) for c in _LFF_RGB], "color_noise": "one N(0, color_std^2) draw per image"})
