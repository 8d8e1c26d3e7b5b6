"""load_dataset / list_datasets: one entry point for every dataset name the CLI accepts."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path

from . import files
from .core import DatasetSplits
from .loaders import BUILDERS
from .shortcuts import inject_shortcut

__all__ = ["load_dataset", "list_datasets", "dataset_options"]

_COMMON = ("root", "download", "seed")
_SHORTCUT_OPTIONS = ("shortcut", "rho", "shortcut_strength")


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    spec = files.parse_spec(name)  # imagefolder:PATH / csv:FILE: the path keeps its case
    if spec is not None:
        return f"{spec[0]}:{spec[1]}"
    key = name.strip().lower().replace("_", "-")
    if key not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(BUILDERS)}; or your own images as "
                         f"{' or '.join(files.FORMS.values())}")
    return key


def _builder(key: str):
    """The builder of a canonical name; for imagefolder:PATH / csv:FILE with the path bound."""
    spec = files.parse_spec(key)
    if spec is not None:
        return functools.partial(files.BUILDERS[spec[0]], spec[1])
    return BUILDERS[key][0]


def list_datasets() -> dict[str, str]:
    """Dataset name -> one-line description (the last entries are the forms of users' own images)."""
    return {**{name: desc for name, (_, desc) in BUILDERS.items()}, **files.DESCRIPTIONS}


def dataset_options(name: str) -> dict[str, object]:
    """The dataset-specific options of `name` and their defaults (shortcut options excluded)."""
    builder = _builder(_canonical(name))
    return {p.name: p.default for p in inspect.signature(builder).parameters.values() if p.name not in _COMMON}


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


def _check_option_type(dataset: str, option: str, value, default) -> None:
    """Options must have their default's type (ints accepted for floats): catches e.g. "3" from a CLI."""
    if default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TypeError(f"option {option!r} of dataset {dataset!r} must be {type(default).__name__}, "
                        f"got {type(value).__name__} {value!r}")


def load_dataset(name: str, *, root=None, download: bool = False, seed: int = 0, **options) -> DatasetSplits:
    """Load dataset `name` (see list_datasets()) as DatasetSplits; deterministic in `seed`.

    `name` may also be imagefolder:PATH or csv:FILE, users' own images (shortcut_fast.data.files).

    root: data folder (default $SHORTCUT_FAST_DATA); download: let torchvision fetch missing
    files (cifar10, colored-mnist, celeba). options: the dataset's own (dataset_options(name))
    plus shortcut="patch"|"tint"|"freq", rho (default 0.9), shortcut_strength, which apply
    inject_shortcut after loading.
    """
    key = _canonical(name)
    builder = _builder(key)
    shortcut = options.pop("shortcut", None)
    rho = options.pop("rho", None)
    strength = options.pop("shortcut_strength", None)
    if shortcut is None and (rho is not None or strength is not None):
        raise ValueError("rho and shortcut_strength apply only with shortcut='patch'|'tint'|'freq'")
    rho = 0.9 if rho is None else rho
    valid = dataset_options(key)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for dataset {key!r}; valid options: "
                        f"{', '.join([*valid, *_SHORTCUT_OPTIONS])}")
    for key_, value in options.items():
        _check_option_type(key, key_, value, valid[key_])
    params = inspect.signature(builder).parameters
    kwargs = dict(options, seed=seed)
    if "root" in params:
        kwargs.update(root=root, download=download)
    splits = builder(**kwargs)
    if shortcut is not None:
        splits = inject_shortcut(splits, kind=shortcut, rho=rho, seed=seed, strength=strength)
    resolved = {**valid, **options}
    if shortcut is not None:
        resolved.update(shortcut=shortcut, rho=rho, shortcut_strength=strength)
    # imagefolder:/x records "imagefolder" here and the path in meta["folder"] (a location, not
    # part of the identity): a moved folder keeps its identity.
    spec = files.parse_spec(key)
    meta = {"dataset": spec[0] if spec else key, "name": splits.name, "seed": seed, "options": resolved,
            "root": str(root) if root is not None and "root" in params else None,
            "num_classes": splits.num_classes, "num_attributes": splits.num_attributes,
            "image_shape": list(splits.image_shape), "bias_aligned_attribute": splits.bias_aligned_attribute,
            **splits.meta, "splits": splits.describe()}
    splits.meta = _jsonable(meta)
    return splits
