"""Dataset containers shared by every loader: in-memory and file-backed images, splits, errors.

Data model (see docs/experiments.md#datasets): a sample is (image, label, attribute), where `attribute` is
the spurious/bias attribute or -1 when unknown, and `group = label * num_attributes + attribute`.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from shortcut_fast.validate import check_int

__all__ = [
    "ImageDataset",
    "FileImageDataset",
    "DatasetSplits",
    "DatasetNotFoundError",
    "DataFormatError",
    "default_data_root",
    "stratified_split",
    "rank_within_class",
    "make_generator",
]

DATA_ROOT_ENV = "SHORTCUT_FAST_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing. The message names the expected files and the folder searched."""

    def __init__(self, dataset: str, folder: Path | str | None, expected: Sequence[str], hint: str = ""):
        self.dataset = dataset
        self.folder = None if folder is None else Path(folder)
        self.expected = list(expected)
        self.hint = hint
        where = f"in {self.folder}" if folder is not None else "(no folder given)"
        msg = f"dataset {dataset!r} not found {where}: expected " + ", ".join(self.expected)
        if hint:
            msg += f". {hint}"
        super().__init__(msg)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # picklable (e.g. across DataLoader workers) despite the custom __init__
        return (type(self), (self.dataset, self.folder, self.expected, self.hint))


class MissingExtraError(DatasetNotFoundError):
    """A dataset ships in an optional package that is not installed; the message names the extra."""

    def __init__(self, dataset: str, extra: str, package: str):
        self.extra, self.package = extra, package
        FileNotFoundError.__init__(self, f"dataset {dataset!r} needs the optional extra {extra!r}: "
                                         f"pip install 'shortcut-fast[{extra}]' (or pip install {package})")
        self.dataset, self.folder, self.expected, self.hint = dataset, None, [], ""

    def __reduce__(self):
        return (type(self), (self.dataset, self.extra, self.package))


class DataFormatError(ValueError):
    """A dataset file exists but its content is malformed. The message names the file and,
    for tables, the line (1-based, as an editor shows it) and the column."""

    def __init__(self, path: Path | str, problem: str, line: int | None = None, column: str | None = None):
        self.path, self.problem, self.line, self.column = Path(path), problem, line, column
        where = str(self.path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {problem}")

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # picklable across DataLoader workers despite the custom __init__
        return (type(self), (self.path, self.problem, self.line, self.column))


def default_data_root() -> Path | None:
    """The folder named by $SHORTCUT_FAST_DATA, or None when it is unset or empty."""
    value = os.environ.get(DATA_ROOT_ENV, "").strip()
    return Path(value).expanduser() if value else None


def make_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, *salt).

    Separate salts give independent streams, so e.g. changing n_test never changes the train set.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *salt]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _as_index(index: Any, n: int, what: str = "index") -> torch.Tensor:
    """LongTensor of indices from a LongTensor, bool mask, list or numpy array."""
    index = torch.as_tensor(index)
    if index.dtype == torch.bool:
        if index.shape != (n,):
            raise ValueError(f"{what}: a boolean mask must have shape ({n},), got {tuple(index.shape)}")
        return index.nonzero().flatten()
    if index.dtype.is_floating_point or index.dtype.is_complex:
        raise TypeError(f"{what} must hold integers or booleans, got {index.dtype}")
    return index.long().flatten()


def rank_within_class(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rank of every sample inside its class, and the class sizes.

    rank[i] in [0, count[labels[i]]): a seeded shuffle of each class, without a Python loop.
    """
    labels = labels.cpu().long()
    n = labels.numel()
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.argsort(labels[perm], stable=True)]  # grouped by class, random within class
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[labels[order]]
    return rank, counts


def stratified_split(labels: torch.Tensor, sizes: Sequence[int], generator: torch.Generator) -> list[torch.Tensor]:
    """Split indices 0..N-1 into parts of the given sizes plus a last part with the remainder.

    Every part is stratified by label (each class within one sample of its proportional share)
    and the total sizes are exact. Each returned index tensor is sorted.
    """
    labels = torch.as_tensor(labels).cpu().long()
    n = labels.numel()
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"split sizes {sizes} do not fit into {n} samples")
    rank, counts = rank_within_class(labels, generator)
    # Quantile of each sample inside its class; sorting by it interleaves the classes in
    # proportion to their sizes, so any prefix is stratified.
    q = (rank.double() + 0.5) / counts[labels].double()
    order = torch.argsort(q, stable=True)
    parts, start = [], 0
    for s in sizes:
        parts.append(torch.sort(order[start:start + s]).values)
        start += s
    parts.append(torch.sort(order[start:]).values)
    return parts


def _group_ids(labels: torch.Tensor, attributes: torch.Tensor, num_attributes: int) -> torch.Tensor:
    if num_attributes <= 0:
        return torch.full_like(labels, -1)
    return torch.where(attributes >= 0, labels * num_attributes + attributes, torch.full_like(labels, -1))


class _GroupMixin:
    """What the in-memory and the file-backed dataset share: groups / counts, and `in_memory`.

    Both have get_batch(index, device=None) -> (x float32 (n,C,H,W), y int64 (n,), a int64 (n,)),
    so callers never branch on the kind; `in_memory` only tells the trainer whether to batch
    on the device (True) or to read through a DataLoader with worker processes (False).
    """

    labels: torch.Tensor
    attributes: torch.Tensor
    num_classes: int
    num_attributes: int
    in_memory: bool

    @property
    def groups(self) -> torch.Tensor:
        """label * num_attributes + attribute; -1 where the attribute is unknown."""
        return _group_ids(self.labels, self.attributes, self.num_attributes)

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.num_attributes

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes).tolist()

    def group_counts(self) -> list[int] | None:
        """Samples per group (length num_groups), or None when there are no attributes."""
        if self.num_attributes == 0:
            return None
        g = self.groups.cpu()
        return torch.bincount(g[g >= 0], minlength=self.num_groups).tolist()


def _int_vector(name: str, value, n: int) -> torch.Tensor:
    """An int64 tensor of shape (n,) (the per-sample counterpart of check_int, for label columns)."""
    value = torch.as_tensor(value)
    if value.dtype.is_floating_point or value.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got {value.dtype}")
    value = value.long()
    if value.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(value.shape)}")
    return value


def _check_targets(labels, attributes, n, num_classes, num_attributes):
    labels = _int_vector("labels", labels, n)
    if attributes is None:
        attributes = torch.full((n,), -1, dtype=torch.long, device=labels.device)
    attributes = _int_vector("attributes", attributes, n)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if n else 0
    else:  # refuse 0, negatives and 2.5 (int() would silently truncate it)
        num_classes = check_int("num_classes", num_classes, 1)
    num_attributes = check_int("num_attributes", num_attributes, 0)
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
        lo, hi = int(attributes.min()), int(attributes.max())
        if num_attributes == 0 and hi != -1:
            raise ValueError("attributes must all be -1 when num_attributes == 0")
        if lo < -1 or (num_attributes > 0 and hi >= num_attributes):
            raise ValueError(f"attributes must lie in [-1, {num_attributes}), got values in [{lo}, {hi}]")
    return labels, attributes, num_classes, num_attributes


class ImageDataset(_GroupMixin, Dataset):
    """In-memory images with labels and bias attributes.

    images: uint8 (N,C,H,W) in [0,255] (returned divided by 255) or float (N,C,H,W) (returned
    as float32). labels: int64 (N,). attributes: int64 (N,), the spurious attribute, -1 = unknown
    (all -1 when num_attributes == 0). Small datasets can live on the GPU (`.to("cuda")`); the
    trainer then draws batches with `get_batch`, with no DataLoader and no per-sample Python.
    """

    def __init__(self, images: torch.Tensor, labels, attributes=None, *, num_classes: int | None = None,
                 num_attributes: int = 0, name: str = ""):
        images = torch.as_tensor(images)
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N,C,H,W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        if images.dtype.is_floating_point and images.dtype != torch.float32:
            images = images.float()
        labels, attributes, num_classes, num_attributes = _check_targets(
            labels, attributes, images.shape[0], num_classes, num_attributes)
        self._set(images, labels.to(images.device), attributes.to(images.device), num_classes,
                  num_attributes, name)

    def _set(self, images, labels, attributes, num_classes, num_attributes, name):
        self.images, self.labels, self.attributes = images, labels, attributes
        self.num_classes, self.num_attributes, self.name = num_classes, num_attributes, name

    def _derive(self, images, labels, attributes) -> "ImageDataset":
        """A dataset with the same metadata and new, already valid tensors (skips the checks)."""
        new = ImageDataset.__new__(ImageDataset)
        new._set(images, labels, attributes, self.num_classes, self.num_attributes, self.name)
        return new

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        x = self.images[i]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x, int(self.labels[i]), int(self.attributes[i])

    def get_batch(self, index, device=None):
        """(x float32 (n,C,H,W), y int64 (n,), a int64 (n,)) for `index`, moved to `device`.

        uint8 images travel as uint8 and are converted on the target device (4x less traffic).
        """
        index = _as_index(index, len(self)).to(self.images.device)
        x, y, a = self.images[index], self.labels[index], self.attributes[index]
        if device is not None:
            x, y, a = (t.to(device, non_blocking=True) for t in (x, y, a))
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x, y, a

    @property
    def in_memory(self) -> bool:
        """True: the images are resident tensors (see _GroupMixin)."""
        return True

    def digest(self) -> str:
        """Content hash of the images (as stored: uint8 is not converted), labels and attributes."""
        from shortcut_fast.run_folder import tensor_digest  # lazy: only fingerprints need it

        counts = torch.tensor([self.num_classes, self.num_attributes])
        return tensor_digest(self.images, self.labels, self.attributes, counts)

    def to(self, device) -> "ImageDataset":
        """The same dataset with every tensor on `device`."""
        return self._derive(self.images.to(device), self.labels.to(device), self.attributes.to(device))

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index) -> "ImageDataset":
        """The samples at `index` (LongTensor, list, numpy array or boolean mask), as a new dataset."""
        index = _as_index(index, len(self)).to(self.images.device)
        return self._derive(self.images[index], self.labels[index], self.attributes[index])

    def with_attributes(self, attributes, num_attributes: int) -> "ImageDataset":
        """The same images and labels with a new attribute column."""
        return ImageDataset(self.images, self.labels, attributes, num_classes=self.num_classes,
                            num_attributes=num_attributes, name=self.name)

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, shape={self.image_shape}, "
                f"dtype={self.images.dtype}, classes={self.num_classes}, "
                f"attributes={self.num_attributes}, device={self.device})")


def _load_image(path: Path, image_size: int, crop_fraction: float, source: str = "") -> np.ndarray:
    """Decode, center-crop a square of side crop_fraction * min(H, W), resize: uint8 (H,W,3).

    A missing file raises FileNotFoundError and an undecodable one DataFormatError, both naming
    the file (and `source`, the table that lists it), never a bare PIL traceback.
    """
    from PIL import Image, UnidentifiedImageError

    listed = f" (listed in {source})" if source else ""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # forces the full decode, so truncated files fail here
            w, h = img.size
            side = crop_fraction * min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            # PIL's bilinear filter widens its support when downscaling, i.e. it antialiases.
            img = img.resize((image_size, image_size), resample=Image.BILINEAR, box=box)
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path}{listed} not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # PIL's ways to say "corrupt"
        raise DataFormatError(path, f"cannot decode the image{listed}: {exc}") from None


class FileImageDataset(_GroupMixin, Dataset):
    """Images read lazily from files (Waterbirds, CelebA), returned float32 (3,S,S) in [0,1].

    `in_memory` is False: the trainer reads it through a DataLoader with worker processes.
    `get_batch` decodes just the requested images (threaded); for the in-memory fast path
    over many epochs, use `load_into_memory()`.

    Each image is center-cropped to a square of side crop_fraction * min(H, W) and resized
    (bilinear, antialiased) to image_size x image_size. crop_fraction = 224/256 is the usual
    Waterbirds transform (resize to 256/224 of the target, center crop); 1.0 is the usual
    CelebA one (center crop of the shorter side, resize). Decoding needs Pillow.

    root: the dataset folder the paths live in; the identity digest uses paths relative to
    it, so moving the folder keeps the identity. source: the table listing the images, named
    in error messages.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels, attributes=None, *, num_classes: int | None = None,
                 num_attributes: int = 0, name: str = "", image_size: int = 64, crop_fraction: float = 1.0,
                 root: str | os.PathLike | None = None, source: str = ""):
        self.paths = [Path(p) for p in paths]
        labels, attributes, num_classes, num_attributes = _check_targets(
            labels, attributes, len(self.paths), num_classes, num_attributes)
        check_int("image_size", image_size, 1)
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
        self.labels, self.attributes = labels.cpu(), attributes.cpu()
        self.num_classes, self.num_attributes, self.name = num_classes, num_attributes, name
        self.image_size, self.crop_fraction = int(image_size), float(crop_fraction)
        self.root, self.source = (None if root is None else Path(root)), str(source)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def in_memory(self) -> bool:
        """False: every access decodes files (see _GroupMixin)."""
        return False

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def load_uint8(self, i: int) -> torch.Tensor:
        """Image i as uint8 (3,S,S)."""
        arr = _load_image(self.paths[i], self.image_size, self.crop_fraction, self.source)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitem__(self, i: int):
        return self.load_uint8(i).float().div_(255), int(self.labels[i]), int(self.attributes[i])

    def _decode(self, index: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
        """uint8 (n,3,S,S) of the images at `index`, decoded in a thread pool.

        Pillow releases the GIL while decoding and resizing, so threads scale.
        """
        n = index.numel()
        if n and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images: values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        out = torch.empty((n, *self.image_shape), dtype=torch.uint8)
        rows = index.tolist()

        def work(j):
            out[j] = self.load_uint8(rows[j])

        workers = min(num_threads or min(8, os.cpu_count() or 1), max(n, 1))
        if workers <= 1:
            for j in range(n):
                work(j)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(work, range(n)))  # list(): re-raises the first worker's error here
        return out

    def get_batch(self, index, device=None):
        """(x float32 (n,3,S,S), y int64 (n,), a int64 (n,)) for `index`, moved to `device`.

        The same contract as ImageDataset.get_batch; only the images at `index` are decoded.
        """
        index = _as_index(index, len(self)).cpu()
        x, y, a = self._decode(index), self.labels[index], self.attributes[index]
        if device is not None:
            x, y, a = (t.to(device, non_blocking=True) for t in (x, y, a))
        return x.float().div_(255), y, a

    def digest(self) -> str:
        """Hash of the image list (paths relative to `root`), labels, attributes and transform.

        The pixels are not read (decoding a whole dataset would be too slow); the table the
        paths come from is digested by DatasetSplits.identity.
        """
        import hashlib

        h = hashlib.sha256()
        h.update(f"{self.image_size} {self.crop_fraction!r} {self.num_classes} {self.num_attributes}\n".encode())
        names = [str(p) for p in self.paths]
        if self.root is not None:  # string slicing: Path.relative_to costs seconds on CelebA
            prefix = str(self.root) + os.sep
            names = [n[len(prefix):] if n.startswith(prefix) else n for n in names]
        h.update("\n".join(names).encode())
        h.update(self.labels.numpy().tobytes())
        h.update(self.attributes.numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, index) -> "FileImageDataset":
        index = _as_index(index, len(self))
        new = FileImageDataset.__new__(FileImageDataset)
        new.__dict__.update(self.__dict__)
        new.paths = [self.paths[int(i)] for i in index]
        new.labels, new.attributes = self.labels[index], self.attributes[index]
        return new

    def load_into_memory(self, num_threads: int | None = None) -> ImageDataset:
        """Decode every image once into a uint8 ImageDataset (fast path for training)."""
        out = self._decode(torch.arange(len(self)), num_threads)
        return ImageDataset(out, self.labels, self.attributes, num_classes=self.num_classes,
                            num_attributes=self.num_attributes, name=self.name)

    def __repr__(self) -> str:
        return (f"FileImageDataset(name={self.name!r}, n={len(self)}, size={self.image_size}, "
                f"classes={self.num_classes}, attributes={self.num_attributes})")


_LOCATION_KEYS = ("root", "folder")  # meta keys that say where the data lives, not what it is


SPLIT_NAMES = ("train", "val", "test")  # the splits every DatasetSplits has


@dataclass
class DatasetSplits:
    """train / val / test plus named extra evaluation sets, and a JSON-able description (meta).

    bias_aligned_attribute: attribute values are class indices and "aligned" means
    attribute == label (colored digits/MNIST, shortcut-injected data, Waterbirds).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    extra: dict[str, Dataset] = field(default_factory=dict)
    num_classes: int = 0
    num_attributes: int = 0
    image_shape: tuple = ()
    bias_aligned_attribute: bool = False
    meta: dict = field(default_factory=dict)
    # The tables the (file-backed) samples were read from, e.g. Waterbirds' metadata.csv;
    # identity() digests their bytes.
    source_files: tuple = ()

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.num_attributes

    def eval_sets(self) -> dict[str, Dataset]:
        """{"train", "val", "test", *extra} in that order."""
        return {"train": self.train, "val": self.val, "test": self.test, **self.extra}

    def describe(self) -> dict:
        """Counts per split: samples, classes, groups and (if meaningful) the aligned fraction."""
        out = {}
        for key, ds in self.eval_sets().items():
            d = {"n": len(ds), "class_counts": ds.class_counts(), "group_counts": ds.group_counts()}
            if self.bias_aligned_attribute and len(ds):
                known = ds.attributes >= 0
                d["aligned_fraction"] = float((ds.attributes == ds.labels)[known].float().mean()) \
                    if bool(known.any()) else None
            out[key] = d
        return out

    def identity(self) -> dict:
        """A small JSON-able dict that identifies this data, for run fingerprints.

        Holds the name, shape facts, `meta` (options, seed, sizes; minus where the files live,
        so a moved data folder keeps its identity), a content digest per split (in-memory:
        the stored tensors; file-backed: the image list, labels and attributes) and the
        digest of each source table. Equal data and options give an equal dict; a changed
        option, seed, label or pixel (of in-memory data) changes it.
        """
        from shortcut_fast.run_folder import file_digest  # lazy: only fingerprints need it

        splits = {}
        for key, ds in self.eval_sets().items():
            if not isinstance(ds, (ImageDataset, FileImageDataset)):  # refuse rather than fingerprint nothing
                raise TypeError(f"split {key!r} is a {type(ds).__name__}, which has no content digest; "
                                f"use ImageDataset or FileImageDataset")
            splits[key] = ds.digest()
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "num_attributes": self.num_attributes,
            "image_shape": [int(d) for d in self.image_shape],
            "bias_aligned_attribute": self.bias_aligned_attribute,
            "meta": {k: v for k, v in self.meta.items() if k not in _LOCATION_KEYS},
            "digests": splits,
            "source_files": {Path(f).name: file_digest(f) for f in self.source_files},
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.eval_sets().items())
        return (f"DatasetSplits({self.name!r}, {sizes}, classes={self.num_classes}, "
                f"attributes={self.num_attributes}, shape={self.image_shape})")
