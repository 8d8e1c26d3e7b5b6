"""A cache of trained models, shared by every command that trains one.

A model is stored under `<cache>/<key>/`, where key = run_folder.fingerprint of what
decides the trained weights: the data's identity (DatasetSplits.identity()), the model
name and options, the training configuration (TrainConfig fields, without the ones that
only decide where and how fast it runs), the seed and the digest of a pretrained weights
file. An entry holds the files the trainer wrote (best.pt, last.pt, history.json and any
epoch_NNN.pt) and entry.json (data, model, recipe, training summary, the command that
trained it, when). Extra files a command derives from the same training (e.g. freq-probe's
band-learning snapshots) may be added to an entry later as artifacts.

The cache folder is $SHORTCUT_FAST_CACHE, else ~/.cache/shortcut-fast/models.

Writes are atomic: an entry is assembled in a temporary folder and moved into place with
os.replace, which fails when another process has already stored the same key; the loser
discards its copy (both trained the same model). Files added to an existing entry are
written to a temporary name and renamed. Readers only ever see complete entries.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from shortcut_fast.report import read_json, to_jsonable, write_json
from shortcut_fast.run_folder import fingerprint

ENV = "SHORTCUT_FAST_CACHE"
ENTRY = "entry.json"
ARTIFACTS = "artifacts"
MODEL_FILES = ("best.pt", "last.pt", "history.json")
# TrainConfig fields that decide where and how fast training runs, not the weights it gives.
DATA_FOLDER = "data"  # decoded images of imagefolder:/csv: data (shortcut_fast.data.files), not a model
EXECUTION_FIELDS = ("device", "num_workers", "eval_batch_size", "keep_every", "channels_last", "compile")
_STALE_SECONDS = 24 * 3600  # a temporary folder older than this belongs to a process that died


def cache_root() -> Path:
    """$SHORTCUT_FAST_CACHE, else ~/.cache/shortcut-fast/models."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shortcut-fast" / "models"


def model_identity(*, data: dict, model: str, model_options: dict, train: dict, seed: int,
                   pretrained: str | None = None, weights: str | None = None) -> dict:
    """What a cached model is keyed by (see the module docstring); `train` is a TrainConfig as a
    dict; pretrained / weights: digests of the files the training starts from."""
    identity = {"data": data, "model": model, "model_options": model_options,
                "train": {k: v for k, v in train.items() if k not in EXECUTION_FIELDS},
                "seed": seed, "pretrained": pretrained}
    if weights is not None:  # absent otherwise: the keys of models cached before --weights stay valid
        identity["weights"] = weights
    return to_jsonable(identity)


def model_key(identity: dict) -> str:
    return fingerprint(identity)


def _epoch_number(path: Path) -> int | None:
    stem = path.stem
    if stem.startswith("epoch_") and stem[6:].isdigit():
        return int(stem[6:])
    return None


@dataclass
class CacheEntry:
    key: str
    path: Path
    info: dict

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def epochs_kept(self) -> list[int]:
        return sorted(n for p in self.path.glob("epoch_*.pt") if (n := _epoch_number(p)) is not None)

    def has_epochs(self, epochs) -> bool:
        return set(epochs) <= set(self.epochs_kept)

    def artifact(self, name: str) -> Path | None:
        path = self.path / ARTIFACTS / name
        return path if path.is_file() else None

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def materialize(self, dest: Path, epochs=()) -> list[Path]:
        """Copy the trainer's files (best.pt, last.pt, history.json, and epoch_NNN.pt for the
        `epochs` asked for) into `dest` (e.g. a run's model/ folder), so the run folder looks as
        if it had trained the model."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        wanted = set(epochs)
        written = []
        for src in sorted(self.path.iterdir()):
            if src.is_file() and (src.name in MODEL_FILES or _epoch_number(src) in wanted):
                tmp = dest / f".{src.name}.{uuid.uuid4().hex[:8]}.tmp"
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest / src.name)
                written.append(dest / src.name)
        return written


class ModelCache:
    """The cache folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def _entry(self, path: Path) -> CacheEntry | None:
        record = path / ENTRY
        if not record.is_file() or not all((path / f).is_file() for f in ("best.pt", "last.pt")):
            return None
        try:
            info = read_json(record)
        except (OSError, ValueError):
            return None
        return CacheEntry(path.name, path, info)

    def lookup(self, key: str) -> CacheEntry | None:
        return self._entry(self.root / key)

    def store(self, key: str, source: str | os.PathLike, info: dict) -> tuple[CacheEntry, bool]:
        """Store the trainer's files in `source` under `key`, with `info` in entry.json.
        Returns (entry, True) when this call stored it, (the existing entry, False) when
        another process had stored the same key first (this copy is discarded)."""
        source = Path(source)
        missing = [f for f in ("best.pt", "last.pt") if not (source / f).is_file()]
        if missing:
            raise FileNotFoundError(f"cannot cache the model in {source}: {', '.join(missing)} missing")
        dest = self.root / key
        existing = self.lookup(key)
        if existing is not None:
            return existing, False
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = []
            for src in sorted(source.iterdir()):
                if src.is_file() and (src.name in MODEL_FILES or _epoch_number(src) is not None):
                    shutil.copyfile(src, tmp / src.name)
                    files.append(src.name)
            write_json({**info, "key": key, "files": files,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, tmp / ENTRY)
            try:
                os.replace(tmp, dest)
            except OSError:
                if dest.exists() and self.lookup(key) is None:  # a broken leftover (e.g. a half-cleared entry)
                    trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
                    os.replace(dest, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                    os.replace(tmp, dest)
                else:
                    raise
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            winner = self.lookup(key)
            if winner is not None:  # another process stored the same model first
                return winner, False
            raise
        return self.lookup(key), True

    def add_files(self, entry: CacheEntry, source: str | os.PathLike, names) -> list[str]:
        """Add files of `source` (e.g. epoch checkpoints a later run kept) to an existing
        entry, each atomically; files the entry already has are left as they are."""
        added = []
        for name in names:
            src, dst = Path(source) / name, entry.path / name
            if dst.exists() or not src.is_file():
                continue
            tmp = entry.path / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            added.append(name)
        return added

    def save_artifact(self, entry: CacheEntry, name: str, obj) -> Path:
        """A JSON artifact derived from the same training (written atomically)."""
        return write_json(obj, entry.path / ARTIFACTS / name)

    def entries(self) -> list[CacheEntry]:
        if not self.root.is_dir():
            return []
        found = [e for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                 if (e := self._entry(p)) is not None]
        return sorted(found, key=lambda e: str(e.info.get("created", "")))

    def clear(self) -> int:
        """Delete every entry (and temporary folders left by dead processes); returns how many entries."""
        if not self.root.is_dir():
            return 0
        removed = 0
        now = time.time()
        for path in self.root.iterdir():
            if not path.is_dir():
                continue
            if path.name == DATA_FOLDER:
                continue
            if path.name.startswith("."):
                if now - path.stat().st_mtime > _STALE_SECONDS or path.name.startswith(".trash-"):
                    shutil.rmtree(path, ignore_errors=True)
                continue
            trash = self.root / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(path, trash)  # readers never see a half-deleted entry
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            removed += 1
        return removed
