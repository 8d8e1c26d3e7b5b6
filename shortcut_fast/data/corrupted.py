"""Corruption-biased splits: the bias attribute is a corruption type (LfF's Corrupted CIFAR-10).

Shared by `corrupted-cifar10` and its offline stand-in `corrupted-digits`. Attributes follow
the LfF protocol of colored.py (attribute i aligned with class i); image j is corrupted with
TYPE0[attribute_j] at one severity, by our torch substitutes of Hendrycks' corruptions.
"""
from __future__ import annotations

import torch

from .colored import aligned_extra, lff_split_attributes
from .core import DatasetSplits, ImageDataset, make_generator
from .corruptions import TYPE0, corrupt

__all__ = ["make_corrupted_splits"]

_SPLIT_SALT = {"train": 1, "val": 2, "test": 3}


def _corrupt_groups(images: torch.Tensor, attributes: torch.Tensor, severity: int, seed: int,
                    split: str) -> torch.Tensor:
    """uint8 (N,C,H,W) with image j corrupted by TYPE0[attributes[j]].

    Each attribute group is corrupted in one call whose seed comes from (seed, split, attribute),
    so a group's result depends neither on the other groups nor on the other splits.
    """
    out = torch.empty_like(images)
    for k, name in enumerate(TYPE0):
        rows = torch.nonzero(attributes == k).flatten()
        if not len(rows):
            continue
        g = make_generator(seed, 0xC1, _SPLIT_SALT[split], k)
        group_seed = int(torch.randint(0, 2 ** 62, (), generator=g))
        x = corrupt(images[rows].float() / 255, name, severity, seed=group_seed)
        out[rows] = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out


def make_corrupted_splits(name: str, images: dict, labels: dict, *, conflict_ratio: float, severity: int,
                          seed: int, unbiased_val: bool = False) -> DatasetSplits:
    """Corruption-biased splits from uint8 images {"train","val","test"}: (N,3,H,W) and labels 0..9.

    train and val follow the biased protocol (colored.assign_bias_attributes: a fraction
    conflict_ratio of each class gets another corruption; val unbiased when unbiased_val); test
    attributes are uniform over the 10 types (aligned ratio about 0.1). extra = aligned /
    conflicting subsets of test. Images stay uint8.
    """
    if not isinstance(severity, int) or isinstance(severity, bool) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    k = len(TYPE0)
    sets = {}
    for split, y, a, _ in lff_split_attributes(labels, conflict_ratio=conflict_ratio, num_attributes=k, seed=seed,
                                               unbiased_val=unbiased_val):
        x = torch.as_tensor(images[split])
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] != y.shape[0]:
            raise ValueError(f"images[{split!r}] must be uint8 (N,C,H,W) with N = {y.shape[0]} labels, "
                             f"got {x.dtype} {tuple(x.shape)}")
        sets[split] = ImageDataset(_corrupt_groups(x, a, severity, seed, split), y, a, num_classes=10,
                                   num_attributes=k, name=name)
    test = sets["test"]
    return DatasetSplits(name=name, train=sets["train"], val=sets["val"], test=test, extra=aligned_extra(test),
                         num_classes=10, num_attributes=k, image_shape=test.image_shape,
                         bias_aligned_attribute=True,
                         meta={"corruptions": list(TYPE0), "severity": severity,
                               "corruption_source": "shortcut_fast.data.corruptions: torch substitutes of "
                                                    "Hendrycks' CIFAR-10-C corruptions, not bit-exact (frost "
                                                    "is procedural: no frost photographs)"})
