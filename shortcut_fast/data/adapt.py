"""as_splits: a researcher's own data (tensors, a torch Dataset, a dataset name) as DatasetSplits.

    as_splits((x_train, y_train), test=(x_test, y_test))           # tensors; val carved from train
    as_splits((x, y, a), test=(x_t, y_t, a_t), val=(x_v, y_v, a_v))  # with a spurious attribute
    as_splits(torchvision_dataset, test=other_dataset)               # yields (image tensor, label[, attr])
    as_splits("colored-digits", seed=1, conflict_ratio=0.02)        # load_dataset(name, seed=..., **options)
    as_splits(splits)                                                 # a DatasetSplits, returned as is

Choices: without `val`, a seeded class-stratified `val_fraction` of the training data becomes
the validation split (the rest stays train). `test` is required for tensors and Datasets:
every analysis reports on images the model never saw, and only the caller knows which
those are, so none are carved silently from `data`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .core import DatasetSplits, FileImageDataset, ImageDataset, make_generator, stratified_split

__all__ = ["as_splits"]

_VAL_SALT = 17  # the generator stream of the train / val split (independent of other seeded draws)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _tensor(arg: str, what: str, value) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{arg}: {what} must be a tensor (or a numpy array), got {_describe(value)}") from None


def _from_tensors(arg: str, parts: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if len(parts) not in (2, 3):
        raise ValueError(f"{arg}: expected a tuple (images, labels) or (images, labels, attributes), "
                         f"got a tuple of {len(parts)}")
    x = _tensor(arg, "images", parts[0])
    y = _tensor(arg, "labels", parts[1])
    a = _tensor(arg, "attributes", parts[2]) if len(parts) == 3 and parts[2] is not None else None
    if x.dim() != 4:
        hint = " (grayscale (N, H, W): pass x[:, None])" if x.dim() == 3 else ""
        raise ValueError(f"{arg}: images must have shape (N, C, H, W), got {tuple(x.shape)}{hint}")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise TypeError(f"{arg}: images must be float (any range, e.g. [0, 1]) or uint8 in [0, 255], got {x.dtype}")
    for name, t in (("labels", y), ("attributes", a)):
        if t is None:
            continue
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{arg}: {name} must be integers, got {t.dtype}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"{arg}: {name} must have shape ({x.shape[0]},) (one per image), got {tuple(t.shape)}")
    return x, y.long(), None if a is None else a.long()


def _from_dataset(arg: str, ds: Dataset, batch_size: int):
    """(images, labels, attributes or None) of every sample, read once through a DataLoader."""
    try:
        n = len(ds)
    except TypeError:
        raise TypeError(f"{arg}: the Dataset must have a length (a map-style torch Dataset), "
                        f"got a {type(ds).__name__} without __len__") from None
    if n == 0:
        raise ValueError(f"{arg}: the Dataset is empty")
    first = ds[0]
    if not isinstance(first, (tuple, list)) or len(first) not in (2, 3):
        raise ValueError(f"{arg}: the Dataset must yield (image, label) or (image, label, attribute), "
                         f"got {_describe(first)}")
    if not isinstance(first[0], torch.Tensor):
        raise TypeError(f"{arg}: the Dataset yields images as {type(first[0]).__name__}, not tensors; add a "
                        f"ToTensor transform (e.g. torchvision.transforms.ToTensor())")
    if first[0].dim() != 3:
        raise ValueError(f"{arg}: the Dataset's images must have shape (C, H, W), got {tuple(first[0].shape)}")
    xs, ys, as_ = [], [], []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
        if len(batch) == 3:
            as_.append(torch.as_tensor(batch[2]))
    return _from_tensors(arg, (torch.cat(xs), torch.cat(ys), torch.cat(as_) if as_ else None))


def _raw(arg: str, value, batch_size: int):
    """An ImageDataset / FileImageDataset as it is, else (images, labels, attributes or None)."""
    if isinstance(value, (ImageDataset, FileImageDataset)):
        return value
    if isinstance(value, (tuple, list)):
        return _from_tensors(arg, tuple(value))
    if isinstance(value, Dataset):
        return _from_dataset(arg, value, batch_size)
    raise TypeError(f"{arg}: expected a tuple (images, labels[, attributes]) of tensors or a torch Dataset, "
                    f"got {_describe(value)}")


def as_splits(data, *, test=None, val=None, seed: int = 0, val_fraction: float | None = None, name: str | None = None,
              attributes: int | None = None, num_classes: int | None = None, bias_aligned: bool | None = None,
              batch_size: int = 256, **options) -> DatasetSplits:
    """`data` as DatasetSplits (train / val / test), the form every analysis takes.

    data: a DatasetSplits (returned as is); a dataset name (load_dataset(name, seed=seed,
    **options), e.g. "colored-digits", "synthetic-freq", "mnist-5k"); a tuple (images, labels)
    or (images, labels, attributes) of tensors; or a torch Dataset yielding (image tensor,
    label) or (image, label, attribute), read once into memory. Images: float (N, C, H, W)
    (kept as they are) or uint8 in [0, 255] (divided by 255 when read). Attributes: the
    spurious attribute per image, -1 where unknown.
    test, val: the same forms as `data` (tuples or Datasets). test is required with tensors or
    a Dataset; without val, a seeded, class-stratified val_fraction (default 0.1) of `data` is
    held out. With a dataset name, val_fraction is passed on as the dataset's own option.
    attributes: how many values the attribute takes (default: the largest seen + 1; 0 without
    attributes). num_classes: default the largest label + 1. bias_aligned: whether the
    attribute's values are class indices ("aligned" = attribute == label, as colored digits;
    default: attributes == num_classes). name: the data's name in results (default "tensors"
    or the Dataset's class name). batch_size: DataLoader batch when reading a Dataset.
    """
    if isinstance(data, DatasetSplits) or isinstance(data, str):
        given = [k for k, v in (("test", test), ("val", val), ("name", name), ("attributes", attributes),
                                ("num_classes", num_classes), ("bias_aligned", bias_aligned)) if v is not None]
        if given:
            what = "a DatasetSplits" if isinstance(data, DatasetSplits) else "a dataset name"
            raise ValueError(f"{', '.join(given)}: not accepted with {what} as data (it brings its own splits "
                             f"and metadata)")
        if isinstance(data, DatasetSplits):
            if val_fraction is not None:
                options["val_fraction"] = val_fraction
            if options:
                raise TypeError(f"{', '.join(sorted(options))}: dataset options apply only to a dataset name")
            return data
        from .registry import load_dataset  # lazy: the registry pulls every loader

        if val_fraction is not None:  # the dataset's own option of that name (refused where it has none)
            options["val_fraction"] = val_fraction
        return load_dataset(data, seed=seed, **options)
    if options:
        raise TypeError(f"{', '.join(sorted(options))}: dataset options apply only to a dataset name, "
                        f"not to {_describe(data)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    val_fraction = 0.1 if val_fraction is None else val_fraction
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if test is None:
        raise ValueError("test: required with tensors or a Dataset, e.g. test=(x_test, y_test): the analyses "
                         "report on images the model never saw, and only you know which those are")
    train_raw = _raw("data", data, batch_size)
    raw = {"train": train_raw, "test": _raw("test", test, batch_size)}
    if val is not None:
        raw["val"] = _raw("val", val, batch_size)
    default_name = name if name is not None else (
        "tensors" if isinstance(data, (tuple, list)) else getattr(data, "name", "") or type(data).__name__)

    def columns(part):
        return (part.labels, part.attributes if part.num_attributes else None) if not isinstance(part, tuple) \
            else (part[1], part[2])

    labels = [columns(p)[0] for p in raw.values()]
    attrs = [columns(p)[1] for p in raw.values() if columns(p)[1] is not None]
    shapes = {k: tuple(p.image_shape if not isinstance(p, tuple) else p[0].shape[1:]) for k, p in raw.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"data, test, val: every split must have the same image shape (C, H, W), got "
                         + ", ".join(f"{k} {s}" for k, s in shapes.items()))
    if any(int(y.min()) < 0 for y in labels if y.numel()):
        raise ValueError("labels must be >= 0 (class indices)")
    seen_classes = max(int(y.max()) + 1 for y in labels if y.numel())
    if num_classes is None:
        num_classes = seen_classes
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < seen_classes:
        raise ValueError(f"num_classes must be an int >= {seen_classes} (the largest label + 1), got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"labels: need at least 2 classes, got only class 0 ({sum(len(y) for y in labels)} images)")
    seen_attrs = max([int(a.max()) + 1 for a in attrs if a.numel()] or [0])
    if attributes is None:
        attributes = seen_attrs
    elif isinstance(attributes, bool) or not isinstance(attributes, int) or attributes < seen_attrs:
        raise ValueError(f"attributes: the number of attribute values must be an int >= {seen_attrs} (the largest "
                         f"attribute + 1), got {attributes!r}")
    if attributes == 1:
        raise ValueError("attributes: an attribute with a single value carries no information; give at least 2 "
                         "values or none")
    if bias_aligned is None:
        bias_aligned = attributes == num_classes
    elif bias_aligned and attributes != num_classes:
        raise ValueError(f"bias_aligned: aligned attributes are class indices, so attributes must equal "
                         f"num_classes ({num_classes}), got {attributes}")

    def build(key, part) -> Dataset:
        if not isinstance(part, tuple):
            if part.num_classes != num_classes or part.num_attributes != attributes:
                raise ValueError(f"{'data' if key == 'train' else key}: the dataset has {part.num_classes} classes "
                                 f"and {part.num_attributes} attribute values, the other splits "
                                 f"{num_classes} and {attributes}")
            return part
        x, y, a = part
        if attributes == 0 and a is not None:
            a = None  # every attribute unknown (-1)
        try:
            return ImageDataset(x, y, a, num_classes=num_classes, num_attributes=attributes, name=default_name)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{'data' if key == 'train' else key}: {exc}") from None

    sets = {k: build(k, p) for k, p in raw.items()}
    held_out = None
    if "val" not in sets:
        train = sets["train"]
        n_val = max(1, round(val_fraction * len(train)))
        if n_val >= len(train):
            raise ValueError(f"data: {len(train)} training images are too few to hold out a validation split; "
                             f"pass val=...")
        val_idx, train_idx = stratified_split(train.labels, [n_val], make_generator(seed, _VAL_SALT))
        sets["val"], sets["train"] = train.subset(val_idx), train.subset(train_idx)
        held_out = n_val
    splits = DatasetSplits(name=default_name, train=sets["train"], val=sets["val"], test=sets["test"],
                           num_classes=num_classes, num_attributes=attributes, image_shape=shapes["train"],
                           bias_aligned_attribute=bool(bias_aligned))
    splits.meta = {"dataset": "as_splits", "name": default_name, "seed": seed,
                   "val": f"{held_out} images held out of data (stratified, seed {seed})" if held_out else "given",
                   "num_classes": num_classes, "num_attributes": attributes, "image_shape": list(shapes["train"]),
                   "bias_aligned_attribute": bool(bias_aligned), "splits": splits.describe()}
    return splits
