"""Users' own images as datasets: `imagefolder:PATH` and `csv:FILE` (load_dataset / --data).

imagefolder:PATH  torchvision's ImageFolder layout: PATH/train/CLASS/*.png|jpg|jpeg|bmp|webp
                  (any of torchvision's IMG_EXTENSIONS), PATH/val/CLASS/... and PATH/test/CLASS/...
                  optional. Without train/, val/ and test/, the class folders may sit in PATH
                  itself. Class names map to indices in sorted order, the same in every split; a
                  class of val/ or test/ that train/ lacks is refused. Folders and files whose
                  names start with "." are skipped. No attribute (num_attributes = 0).
csv:FILE          a table with the columns `path` and `label`, optionally `attribute` (the
                  spurious attribute, e.g. Waterbirds' place) and `split` (train / val / test);
                  other columns are ignored. Paths are relative to the CSV's folder. Labels and
                  attributes are either integers 0..K-1, every value occurring, or names, mapped
                  to indices in sorted order. An attribute is given on every row or on none.

Splits. A split that is absent (no val/ folder, no `split` column, no row of that split) is
carved from train: a class-stratified split (stratified by group, label x attribute, when
there is an attribute) drawn with a fixed seed, SPLIT_SEED, not the run's --seed (as
mnist-5k: every seed and command sees the same images), test_fraction and val_fraction of
the train images (defaults 0.1 each, rounded). Train needs >= 2 classes; val and test must
not be empty; a class in val or test needs images in train.

Options: image_size (default None: the images' common size, refused unless they all share one
square size), channels (3: RGB, grayscale images replicated; 1: gray, color images converted
to luminance after the resize, PIL's "L"), val_fraction and test_fraction (see above). Each
image is center-cropped to a square (the shorter side) and resized bilinearly with
antialiasing (core._load_image, as FileImageDataset).

Cache. Decoding runs once: the decoded images (uint8 (N,C,S,S), in listing order) are stored
in cache_root()/data/<key>.pt (cache_root(): $SHORTCUT_FAST_CACHE, else
~/.cache/shortcut-fast/models), key = sha256 of every image file's bytes (in order) and the
options that change the decoded pixels (image_size as given, channels). A changed file gives
a new key; a later load with the same files reads the cache only. Cache files are written to
a temporary name and renamed (never half written). The splits are in-memory ImageDatasets,
and meta["content_digest"] (the key) is part of DatasetSplits.identity().

bias_aligned_attribute ("attribute == label" means aligned) is set only where it is meaningful:
a csv attribute with as many values as there are classes, either both integers (the
Waterbirds convention: y and place) or both names from the same set.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shortcut_fast.validate import check_int

from .core import DataFormatError, DatasetNotFoundError, DatasetSplits, ImageDataset, _load_image, \
    make_generator, stratified_split
from .loaders import _check_fields, _check_fraction, _table_lines

__all__ = ["parse_spec", "build_imagefolder", "build_csv", "FORMS", "DESCRIPTIONS", "SPLIT_SEED", "cache_folder"]

FORMS = {"imagefolder": "imagefolder:PATH", "csv": "csv:FILE"}
DESCRIPTIONS = {
    "imagefolder:PATH": "your images in PATH/train/CLASS/*.png|jpg (val/, test/ optional: else a fixed "
                        "10 %/10 % stratified split); -D image_size=N",
    "csv:FILE": "your images listed in a CSV: path,label[,attribute][,split] (paths relative to the CSV); "
                "-D image_size=N",
}
SPLITS = ("train", "val", "test")
SPLIT_SEED = 4242  # fixed: the carved split never depends on --seed
CACHE_VERSION = 1  # bump when the decoding changes: old cache files are then never read
_COLUMNS = ("path", "label", "attribute", "split")


def parse_spec(name) -> tuple[str, str] | None:
    """("imagefolder" | "csv", path) for imagefolder:PATH / csv:FILE, None for any other name."""
    if not isinstance(name, str) or ":" not in name:
        return None
    form, path = name.strip().split(":", 1)
    form = form.strip().lower()
    if form not in FORMS:
        return None
    if not path.strip():
        raise ValueError(f"dataset {name!r}: give a path after the colon, e.g. {FORMS[form]}")
    return form, path.strip()


def cache_folder() -> Path:
    """Where decoded images are cached: cache_root()/data."""
    from shortcut_fast.model_cache import DATA_FOLDER, cache_root  # lazy: keeps `import shortcut_fast.data` light

    return cache_root() / DATA_FOLDER


# --------------------------------------------------------------------------- listings

@dataclass
class _Listing:
    """What a folder or table lists: image files in order, their labels, attributes and splits."""

    name: str                       # imagefolder:PATH / csv:FILE, for messages
    location: Path                  # the folder or the CSV
    files: list[Path]
    where: list[str]                # per file, where it was listed (for a CSV: "FILE, line N")
    labels: np.ndarray              # int64 (N,)
    class_names: list[str]
    split: np.ndarray               # int64 (N,): 0 train, 1 val, 2 test
    given: set                      # the splits the data itself defines (the others are carved)
    attributes: np.ndarray | None = None
    attribute_names: list[str] | None = None
    bias_aligned: bool = False
    lines: list[int] | None = None  # CSV line of each file


def _image_files(folder: Path, class_to_idx: dict) -> list[tuple[str, int]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

    def valid(path: str) -> bool:  # hidden files (e.g. macOS "._x.png") are not images
        return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, IMG_EXTENSIONS)

    return make_dataset(str(folder), class_to_idx, is_valid_file=valid, allow_empty=True)


def _class_folders(folder: Path, name: str) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        classes = [c for c in find_classes(str(folder))[0] if not c.startswith(".")]
    except FileNotFoundError:
        classes = []
    if not classes:
        raise DatasetNotFoundError(name, folder, ["one subfolder per class, holding its images"],
                                   hint="the folder has no class subfolders")
    return classes


def _list_imagefolder(name: str, root: Path) -> _Listing:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    layout = "PATH/train/CLASS/IMAGE (val/ and test/ optional) or PATH/CLASS/IMAGE"
    if not root.is_dir():
        raise DatasetNotFoundError(name, root.parent, [f"the folder {root.name}/ ({layout})"],
                                   hint="no such folder" if not root.exists() else "it is not a folder")
    present = {s for s in SPLITS if (root / s).is_dir()}
    if present and "train" not in present:
        raise DatasetNotFoundError(name, root, ["train/CLASS/IMAGE"],
                                   hint=f"{' and '.join(sorted(present))}/ found but no train/")
    train_dir = root / "train" if present else root
    classes = _class_folders(train_dir, name)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    files, labels, split = [], [], []
    for code, key in enumerate(SPLITS):
        if key != "train" and key not in present:
            continue
        folder = root / key if present else root
        found = _class_folders(folder, name)
        unknown = [c for c in found if c not in class_to_idx]
        if unknown:
            raise DataFormatError(folder / unknown[0], f"class {unknown[0]!r} of {key}/ is not a class of train/ "
                                                       f"(train classes: {', '.join(classes)})")
        samples = _image_files(folder, {c: class_to_idx[c] for c in found})
        seen = {y for _, y in samples}
        empty = [c for c in (classes if key == "train" else found) if class_to_idx[c] not in seen]
        if empty:  # a class folder without images is a mistake (train: the class would have no sample)
            raise DataFormatError(folder / empty[0], f"class folder without images (expected files ending in "
                                                     f"{', '.join(IMG_EXTENSIONS)})")
        files += [Path(p) for p, _ in samples]
        labels += [y for _, y in samples]
        split += [code] * len(samples)
    return _Listing(name=name, location=root, files=files, where=[str(f) for f in files],
                    labels=np.array(labels, dtype=np.int64), class_names=classes,
                    split=np.array(split, dtype=np.int64), given=present or {"train"})


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _codes(table: Path, column: str, texts: list[str], lines: list[int]) -> tuple[np.ndarray, list[str], bool]:
    """A label/attribute column as indices, the value names, and whether the values were integers.

    Integers must be 0..K-1 with every value present (a gap usually means a wrong column or a
    lost class); names map to indices in sorted order. A column mixing both is refused.
    """
    ints = [_as_int(t) for t in texts]
    named = [i for i, v in enumerate(ints) if v is None]
    if named and len(named) < len(ints):
        i, j = named[0], next(k for k, v in enumerate(ints) if v is not None)
        raise DataFormatError(table, f"{texts[i]!r} is a name but line {lines[j]} holds the integer {texts[j]}: "
                              f"use integers 0..K-1 or names on every row", lines[i], column)
    if named:
        names = sorted(set(texts))
        index = {n: k for k, n in enumerate(names)}
        return np.array([index[t] for t in texts], dtype=np.int64), names, False
    values = np.array(ints, dtype=np.int64)
    if (values < 0).any():
        i = int(np.flatnonzero(values < 0)[0])
        raise DataFormatError(table, f"negative value {values[i]}: expected integers 0..K-1 or names", lines[i],
                              column)
    k = int(values.max()) + 1
    missing = sorted(set(range(k)) - set(values.tolist()))
    if missing:
        more = f" (nor {', '.join(map(str, missing[1:6]))}{', ...' if len(missing) > 6 else ''})" \
            if len(missing) > 1 else ""
        raise DataFormatError(table, f"integer values must be 0..K-1 with each one present: {missing[0]} never "
                              f"occurs{more}, while {k - 1} does", column=column)
    return values, [str(v) for v in range(k)], True


def _list_csv(name: str, table: Path) -> _Listing:
    if not table.is_file():
        raise DatasetNotFoundError(name, table.parent, [f"{table.name} (a CSV: path,label[,attribute][,split])"],
                                   hint="no such file" if not table.exists() else "it is not a file")
    rows = _table_lines(table, ",")
    first = next(rows, None)
    if first is None:
        raise DataFormatError(table, "empty file: expected a header with the columns path, label "
                                     "(optional: attribute, split)", 1)
    line, header = first
    header = [h.lstrip("\ufeff") for h in header]  # a byte-order mark, as spreadsheets write it
    names = [h.lower() for h in header]
    absent = [c for c in ("path", "label") if c not in names]
    if absent:
        raise DataFormatError(table, f"the header lacks the column(s) {', '.join(absent)} (needs path, label; "
                                     f"optional: attribute, split; found: {', '.join(header)})", line)
    twice = [c for c in _COLUMNS if names.count(c) > 1]
    if twice:
        raise DataFormatError(table, f"the column {twice[0]!r} appears twice in the header", line)
    col = {c: names.index(c) for c in _COLUMNS if c in names}
    cells = {c: [] for c in col}
    lines = []
    folder = table.parent
    for line, fields in rows:
        _check_fields(table, line, fields, header)
        for c, i in col.items():
            cells[c].append(fields[i])
        lines.append(line)
        for c in ("path", "label"):
            if not fields[col[c]]:
                raise DataFormatError(table, f"empty {c}", line, c)
    if not lines:
        raise DataFormatError(table, "no data rows after the header", line)

    files = [folder / p for p in cells["path"]]
    for f, line in zip(files, lines):
        if not f.is_file():
            raise DataFormatError(table, f"image file {f} {'is not a file' if f.exists() else 'does not exist'}",
                                  line, "path")
    labels, class_names, int_labels = _codes(table, "label", cells["label"], lines)

    attributes = attribute_names = None
    aligned = False
    if "attribute" in cells:
        given = [i for i, t in enumerate(cells["attribute"]) if t]
        if given and len(given) < len(lines):
            i = next(i for i, t in enumerate(cells["attribute"]) if not t)
            raise DataFormatError(table, f"no attribute on this row, but line {lines[given[0]]} has one: give an "
                                         f"attribute on every row or on none", lines[i], "attribute")
        if given:
            attributes, attribute_names, int_attributes = _codes(table, "attribute", cells["attribute"], lines)
            aligned = len(attribute_names) == len(class_names) and (
                (int_labels and int_attributes) or (not int_labels and attribute_names == class_names))

    if "split" in cells:
        codes = []
        for text, line in zip(cells["split"], lines):
            key = text.lower()
            if key not in SPLITS:
                raise DataFormatError(table, f"unknown split {text!r}: expected train, val or test", line, "split")
            codes.append(SPLITS.index(key))
        split = np.array(codes, dtype=np.int64)
        if not (split == 0).any():
            raise DataFormatError(table, "no row of the train split (the split column holds only "
                                         f"{', '.join(sorted(set(cells['split'])))})", column="split")
        present = {SPLITS[c] for c in set(codes)}
    else:
        split, present = np.zeros(len(lines), dtype=np.int64), {"train"}
    return _Listing(name=name, location=table, files=files, where=[f"{table}, line {n}" for n in lines],
                    labels=labels, class_names=class_names, split=split, given=present, attributes=attributes,
                    attribute_names=attribute_names, bias_aligned=aligned, lines=lines)


# --------------------------------------------------------------------------- splits

def _carve(listing: _Listing, val_fraction: float, test_fraction: float) -> np.ndarray:
    """The split codes with the absent val/test carved from train (fixed seed, stratified)."""
    split = listing.split.copy()
    train = np.flatnonzero(split == 0)
    n = len(train)
    n_test = round(n * test_fraction) if "test" not in listing.given else 0
    n_val = round(n * val_fraction) if "val" not in listing.given else 0
    for key, size, fraction in (("val", n_val, val_fraction), ("test", n_test, test_fraction)):
        if key not in listing.given and size == 0:
            raise ValueError(f"{listing.name}: the {key} split, {key}_fraction {fraction} of the {n} train images, "
                             f"would be empty: add images, or give a {key} split, or raise {key}_fraction")
    if n_test or n_val:
        strata = listing.labels[train]
        if listing.attributes is not None:  # keeps small (minority) groups in every split
            strata = strata * len(listing.attribute_names) + listing.attributes[train]
        test_i, val_i, _ = stratified_split(torch.from_numpy(strata), [n_test, n_val],
                                            make_generator(SPLIT_SEED, 3))
        split[train[test_i.numpy()]] = 2
        split[train[val_i.numpy()]] = 1
    return split


def _train_classes(listing: _Listing, split: np.ndarray) -> set:
    in_train = set(listing.labels[split == 0].tolist())
    if len(in_train) < 2:
        only = ", ".join(listing.class_names[c] for c in sorted(in_train))
        raise DataFormatError(listing.location, f"the train split holds a single class ({only}): training needs "
                                                f"at least 2 classes")
    return in_train


def _check_splits(listing: _Listing, split: np.ndarray) -> None:
    names = listing.class_names
    in_train = _train_classes(listing, split)
    for code in (1, 2):
        rows = np.flatnonzero(split == code)
        if len(rows) == 0:
            raise DataFormatError(listing.location, f"the {SPLITS[code]} split has no image")
        lost = [i for i in rows if int(listing.labels[i]) not in in_train]
        if lost:
            i = lost[0]
            cls = names[int(listing.labels[i])]
            if SPLITS[code] in listing.given:
                problem = f"class {cls!r} appears in the {SPLITS[code]} split but has no image in train"
            else:
                problem = (f"class {cls!r} has too few images to keep one in train after carving val/test: "
                           f"add images or lower val_fraction/test_fraction")
            raise DataFormatError(listing.location, problem, None if listing.lines is None else listing.lines[i],
                                  None if listing.lines is None else "label")


# --------------------------------------------------------------------------- decoding and cache

def _decode_image(path: Path, image_size: int, channels: int, source: str) -> np.ndarray:
    """One image as uint8 (C,S,S): center square crop, bilinear antialiased resize (core._load_image)."""
    rgb = _load_image(path, image_size, 1.0, source)
    if channels == 3:
        return rgb.transpose(2, 0, 1)
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).convert("L"))[None]  # exact for gray sources (R = G = B)


def _hash_files(listing: _Listing) -> tuple[list[bytes], list[tuple[int, int]]]:
    """sha256 of every file's bytes, and its (size, mtime) as read (to notice a change during the load)."""
    digests, stats = [], []
    for path in listing.files:
        with open(path, "rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").digest())
            st = os.fstat(f.fileno())
        stats.append((st.st_size, st.st_mtime_ns))
    return digests, stats


def _content_key(digests: list[bytes], image_size: int | None, channels: int) -> str:
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "image_size": image_size, "channels": channels,
                                   "n": len(digests)}, sort_keys=True).encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()[:32]


def _common_size(listing: _Listing) -> int:
    """The side all images share when they are all square and equal; else a one-line refusal."""
    from PIL import Image, UnidentifiedImageError

    sizes = {}
    for path, where in zip(listing.files, listing.where):
        try:
            with Image.open(path) as img:  # reads the header only
                sizes.setdefault(img.size, path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            listed = f" (listed in {where})" if where != str(path) else ""
            raise DataFormatError(path, f"cannot decode the image{listed}: {exc}") from None
        if len(sizes) > 1:
            break
    (w, h), path = next(iter(sizes.items()))
    if len(sizes) == 1 and w == h:
        return w
    shown = " but ".join(f"{p} is {a}x{b}" for (a, b), p in sizes.items())
    raise ValueError(f"{listing.name}: give image_size, the side to resize the images to (CLI: -D image_size=64): "
                     f"they are not all square of one size ({shown})")


def _decode_all(listing: _Listing, image_size: int, channels: int) -> torch.Tensor:
    out = torch.empty((len(listing.files), channels, image_size, image_size), dtype=torch.uint8)

    def work(i):
        source = listing.where[i] if listing.where[i] != str(listing.files[i]) else ""
        pixels = _decode_image(listing.files[i], image_size, channels, source)
        out[i] = torch.from_numpy(np.require(pixels, np.uint8, ["C", "W"]))  # PIL's arrays are read-only

    workers = min(8, os.cpu_count() or 1, max(len(listing.files), 1))
    if workers <= 1:
        for i in range(len(listing.files)):
            work(i)
    else:  # Pillow releases the GIL while decoding and resizing
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(len(listing.files))))  # list(): re-raises the first error here
    return out


def _read_cache(path: Path, key: str, n: int, channels: int, image_size: int | None) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        images = stored["images"]
        ok = (stored.get("key") == key and isinstance(images, torch.Tensor) and images.dtype == torch.uint8
              and images.dim() == 4 and images.shape[:2] == (n, channels) and images.shape[2] == images.shape[3]
              and (image_size is None or images.shape[2] == image_size))
    except Exception:  # an unreadable cache file is only a cache miss: decode again and replace it
        return None
    return images if ok else None


def _write_cache(path: Path, key: str, images: torch.Tensor) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "images": images}, tmp)
        os.replace(tmp, path)  # atomic: readers see the whole file or none
    except OSError as exc:  # no cache (read-only disk, full disk) only costs decoding next time
        warnings.warn(f"could not cache the decoded images in {path.parent}: {exc}", stacklevel=3)
    finally:
        tmp.unlink(missing_ok=True)


def _images(listing: _Listing, image_size: int | None, channels: int) -> tuple[torch.Tensor, str]:
    """uint8 (N,C,S,S) of every listed image, from the cache or decoded (and cached); and the key."""
    digests, stats = _hash_files(listing)
    key = _content_key(digests, image_size, channels)
    path = cache_folder() / f"{key}.pt"
    images = _read_cache(path, key, len(listing.files), channels, image_size)
    if images is not None:
        return images, key
    size = image_size if image_size is not None else _common_size(listing)
    images = _decode_all(listing, size, channels)
    for f, before in zip(listing.files, stats):
        st = f.stat()
        if (st.st_size, st.st_mtime_ns) != before:  # the pixels may not match the key: cache nothing
            raise DataFormatError(f, "the file changed while the dataset was being loaded: load it again")
    _write_cache(path, key, images)
    return images, key


# --------------------------------------------------------------------------- builders

def _check_options(image_size, channels, val_fraction, test_fraction) -> None:
    if image_size is not None:
        check_int("image_size", image_size, 1)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


def _build(form: str, listing: _Listing, image_size, channels, val_fraction, test_fraction) -> DatasetSplits:
    _train_classes(listing, listing.split)  # before carving: the more basic refusal first
    split = _carve(listing, val_fraction, test_fraction)
    _check_splits(listing, split)
    images, key = _images(listing, image_size, channels)
    k = len(listing.class_names)
    n_attr = 0 if listing.attribute_names is None else len(listing.attribute_names)
    labels = torch.from_numpy(listing.labels)
    attrs = None if listing.attributes is None else torch.from_numpy(listing.attributes)
    sets = {}
    for code, name in enumerate(SPLITS):
        idx = torch.from_numpy(np.flatnonzero(split == code))
        sets[name] = ImageDataset(images[idx], labels[idx], None if attrs is None else attrs[idx], num_classes=k,
                                  num_attributes=n_attr, name=form)
    carved = [s for s in ("val", "test") if s not in listing.given]
    fractions = {"val": val_fraction, "test": test_fraction}
    how = "given" if not carved else (
        f"{' and '.join(carved)} carved from train ({' and '.join(str(fractions[s]) for s in carved)} of it, "
        f"stratified by {'label and attribute' if n_attr else 'label'}, fixed seed {SPLIT_SEED})")
    return DatasetSplits(
        name=form, train=sets["train"], val=sets["val"], test=sets["test"], num_classes=k, num_attributes=n_attr,
        image_shape=tuple(images.shape[1:]), bias_aligned_attribute=listing.bias_aligned,
        meta={"folder": str(listing.location), "classes": listing.class_names,
              "attributes": listing.attribute_names, "content_digest": key, "split": how,
              "transform": f"center square crop, bilinear antialiased resize to {images.shape[-1]}, "
                           f"{'RGB (gray replicated)' if channels == 3 else 'gray (luminance)'}"})


def build_imagefolder(path, *, seed=0, image_size=None, channels=3, val_fraction=0.1, test_fraction=0.1):
    """imagefolder:PATH (see the module docstring). `seed` is unused: the split is fixed."""
    _check_options(image_size, channels, val_fraction, test_fraction)
    root = Path(path).expanduser().absolute()
    return _build("imagefolder", _list_imagefolder(f"imagefolder:{path}", root), image_size, channels,
                  val_fraction, test_fraction)


def build_csv(path, *, seed=0, image_size=None, channels=3, val_fraction=0.1, test_fraction=0.1):
    """csv:FILE (see the module docstring). `seed` is unused: the split is fixed."""
    _check_options(image_size, channels, val_fraction, test_fraction)
    table = Path(path).expanduser().absolute()
    return _build("csv", _list_csv(f"csv:{path}", table), image_size, channels, val_fraction, test_fraction)


BUILDERS = {"imagefolder": build_imagefolder, "csv": build_csv}
