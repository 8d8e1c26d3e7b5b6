"""What the five analyses' Python API shares (docs/api.md): data in, the result.json record out.

Every analysis module offers `Config`, `Result` and `run(model, data, config)`; its result
class mixes in `ApiResult`, which gives `summary()` and `write(folder)` on top of the
module's own summary / figure functions. What those need beyond the result's fields (the
data's name and metadata, the model's description) is attached by `run` as a plain
attribute, so it never enters the result's own JSON.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

_INFO = "_api_info"


def splits_of(data) -> tuple[Any, str]:
    """(DatasetSplits, the data's name for reports) from anything data.as_splits accepts alone."""
    from shortcut_fast.data import as_splits

    splits = as_splits(data)
    return splits, data if isinstance(data, str) else splits.name


def model_name(model) -> str:
    """How result.json names a model passed as an object (the CLI writes its model option)."""
    if model is None:
        return "none"
    kind = model if isinstance(model, type) else type(model)
    if isinstance(model, nn.Module) or isinstance(model, type):
        return f"{kind.__module__}.{kind.__qualname__}"
    return getattr(model, "__qualname__", None) or repr(model)


def check_config(config, cls, public: str):
    """config, or cls() for None; anything else is refused, naming the class expected."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"config must be a shortcut_fast.{public} ({cls.__name__}), got {type(config).__name__}")
    return config


def default_device(model=None):
    """Where `run` computes unless told (device=...): where the model's parameters are, so a
    model is never moved off its device; without a model (or parameters), a GPU when there
    is one, as the command line's --device auto."""
    import torch

    if isinstance(model, nn.Module):
        first = next(model.parameters(), None)
        if first is not None:
            return first.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_model(model, module: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module taking (N, C, H, W) images (shortcut_fast.{module}.run), "
                        f"got {type(model).__name__}")


def model_inputs(model, data, config, cls, module: str, kw: dict) -> tuple[Any, Any, str]:
    """What every `run(model, data, config)` of a trained model starts with: the model and
    config checked, (config, DatasetSplits, the data's name), kw's device defaulting to the
    model's (default_device)."""
    check_model(model, module)
    cfg = check_config(config, cls, f"{module}.Config")
    splits, name = splits_of(data)
    kw.setdefault("device", default_device(model))
    return cfg, splits, name


def attach(result, command: str, data_name: str, splits, model) -> None:
    """Remember what summary() and write() need: the record the CLI puts beside the result."""
    setattr(result, _INFO, {"record": {"command": command, "data": data_name,
                                       "dataset_meta": getattr(splits, "meta", {}) or {},
                                       "model": model_name(model), "model_options": None, "recipe": None,
                                       "model_cache": None},
                            "out": None})


def info(result) -> dict:
    return getattr(result, _INFO, None) or {"record": {}, "out": None}


def folder(path) -> Path:
    if not isinstance(path, (str, Path)) or str(path) == "":
        raise TypeError(f"folder must be a path (str or pathlib.Path), got {path!r}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"folder: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


class ApiResult:
    """summary() and write(folder) for a result dataclass; the module fills in _write / _summary."""

    _command = ""

    def _record(self) -> dict:
        record = dict(info(self)["record"])
        record.setdefault("command", self._command)
        record.setdefault("data", "data")
        return record

    def _data_name(self) -> str:
        return self._record()["data"]

    def _summary(self, data: str, out: Path | None) -> str:  # pragma: no cover - every result overrides it
        raise NotImplementedError

    def _write(self, out: Path, record: dict) -> None:  # pragma: no cover - every result overrides it
        raise NotImplementedError

    def summary(self) -> str:
        """The report the command line prints (after write(): with the folder written)."""
        return self._summary(self._data_name(), info(self)["out"]).strip("\n")

    def write(self, folder_path, *, record: dict | None = None) -> Path:
        """Create `folder_path` and write result.json and the figures there, as the command line does;
        returns the folder. record: entries of result.json beside the result that replace those
        `run` noted (the command line's own: data, model, model_options, recipe, model_cache);
        summary() then names record["data"]."""
        if record is not None and not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        out = folder(folder_path)
        state = info(self)
        merged = {**state["record"], **(record or {})}
        setattr(self, _INFO, {"record": merged, "out": None})
        self._write(out, self._record())
        setattr(self, _INFO, {"record": merged, "out": out})
        return out
