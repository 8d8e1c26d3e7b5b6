"""One home for an experiment's folder: its settings fingerprint, lock, partial results, resume.

Every command (and library user who wants persistence) opens a `RunFolder`:

    with RunFolder(out, "freq-probe", settings, resume=resume, overwrite=overwrite) as run:
        ...                                   # run.save_json / run.load_json / run.save_state ...

- `settings` holds every setting that changes a result (data and model identity included,
  e.g. through `file_digest` of a checkpoint and `tensor_digest` of a dataset). It is
  written to `<out>/run.json` with its fingerprint when the run starts.
- `resume=True` continues a run only if the folder's fingerprint is the same; otherwise it is
  refused with a message naming each setting that differs (old and new value).
- A run without `resume` into a folder holding another run is refused unless
  `overwrite=True`, which first deletes the old run's files. A non-empty folder that is not
  a run folder is never deleted.
- `<out>/.lock` (pid and host) keeps two processes out of one folder; a lock left by a
  killed process on this host is taken over.
- Partial results and checkpoints are written atomically (temp file + rename) through
  `save_json` / `save_state` under `<out>/partial/` (or a `sub`-folder such as `model/`), and
  read back with `weights_only=True`: nothing else writes resume state.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

from shortcut_fast.report import read_json, to_jsonable, write_json
from shortcut_fast.validate import nested_diff

RECORD = "run.json"
LOCK = ".lock"
PARTIAL = "partial"


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (other run, changed settings, lock held)."""


# ---------------------------------------------------------------------------------------
# Fingerprints


def fingerprint(settings: dict) -> str:
    """A short stable hash of JSON-able settings (key order does not matter)."""
    text = json.dumps(to_jsonable(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (cached per path, size and mtime): the identity of a checkpoint."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """sha256 of tensors' dtypes, shapes and bytes: the identity of in-memory data."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors (BN counters) too
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


def settings_diff(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every (nested) setting that differs."""
    return nested_diff(old, new)


# ---------------------------------------------------------------------------------------
# The folder


class Store:
    """Atomic JSON / tensor-state files under one folder of a run (resume state only goes here)."""

    def __init__(self, root: Path, resuming: bool):
        self.root = root
        self.resuming = resuming  # True when the run continues an earlier one with the same settings

    def sub(self, name: str) -> "Store":
        return Store(self.root / name, self.resuming)

    def file(self, name: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def has(self, name: str) -> bool:
        return (self.root / name).exists()

    def save_json(self, name: str, obj: Any) -> Path:
        return write_json(obj, self.file(name))

    def load_json(self, name: str, default: Any = None) -> Any:
        """The saved object, or `default` when absent or when this run is not resuming."""
        path = self.root / name
        if not self.resuming or not path.exists():
            return default
        return read_json(path)

    def save_state(self, name: str, obj: Any) -> Path:
        """torch.save atomically: an interrupted run never leaves a truncated file."""
        path = self.file(name)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return path

    def load_state(self, name: str, default: Any = None, *, map_location="cpu") -> Any:
        """The saved state (read with weights_only=True), or `default` when absent or not resuming."""
        path = self.root / name
        if not self.resuming or not path.exists():
            return default
        return load_state_file(path, map_location=map_location)

    def discard(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern)) if self.root.exists() else []


def load_state_file(path: str | os.PathLike, *, map_location="cpu", what: str = "file") -> Any:
    """torch.load(weights_only=True) with an error that names the file when it is not a torch state."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle, zip and weights-only refusals all mean "not a file we wrote"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {str(path)!r} is not a readable torch state file ({first[:200]})") from None


class RunFolder(Store):
    """An experiment's output folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, command: str, settings: dict, *, resume: bool = False,
                 overwrite: bool = False, info: dict | None = None):
        super().__init__(Path(path), False)
        self.command = command
        self.settings = to_jsonable(settings)
        self.fingerprint = fingerprint(self.settings)
        self.resume, self.overwrite = resume, overwrite
        self.info = info or {}  # recorded, not fingerprinted (device, backend, versions)
        self._locked = False

    # -- life cycle
    def open(self) -> "RunFolder":
        if self._locked:  # already open (e.g. opened, then used as a context manager)
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check_previous()
            self.save_json(RECORD, {"command": self.command, "fingerprint": self.fingerprint,
                                    "settings": self.settings, "info": self.info, "status": "running",
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "resumed": self.resuming})
        except BaseException:
            self._unlock()
            raise
        return self

    def close(self, status: str = "done") -> None:
        if not self._locked:
            return
        record = read_json(self.root / RECORD)
        record["status"] = status
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(record, self.root / RECORD)
        self._unlock()

    def __enter__(self) -> "RunFolder":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("done" if exc_type is None else "failed")

    @property
    def partial(self) -> Store:
        return self.sub(PARTIAL)

    # -- checks
    def _check_previous(self) -> None:
        entries = [p for p in self.root.iterdir() if p.name != LOCK]
        record_path = self.root / RECORD
        if not entries:
            return  # a new folder: a fresh run (also under --resume: there is nothing to resume)
        if not record_path.exists():
            raise RunFolderError(
                f"--out {str(self.root)!r} is not empty and holds no {RECORD} (it is not a shortcut-fast run "
                f"folder, or was written by an older version); choose another --out or empty it")
        try:
            old = read_json(record_path)
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"{record_path}: unreadable run record ({exc}); choose another --out") from None
        if self.resume:
            if old.get("command") != self.command:
                raise RunFolderError(
                    f"--resume: {self.root} holds a {old.get('command')!r} run, not {self.command!r}; "
                    f"choose another --out")
            if old.get("fingerprint") != self.fingerprint:
                diff = settings_diff(old.get("settings", {}), self.settings)
                raise RunFolderError(
                    f"--resume: the settings differ from the run in {self.root} ("
                    + "; ".join(diff or ["code version"]) + "); resume with the same settings, "
                    "or pass --overwrite to start again, or choose another --out")
            self.resuming = True
            return
        if self.overwrite:
            for p in entries:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            return
        raise RunFolderError(
            f"--out {str(self.root)!r} already holds a {old.get('command')!r} run ({old.get('status')}, started "
            f"{old.get('started')}); pass --resume to continue it, --overwrite to replace it, "
            f"or choose another --out")

    def _lock(self) -> None:
        lock = self.root / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(lock.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    lock.unlink(missing_ok=True)  # left by a killed process: take it over
                    continue
                raise RunFolderError(
                    f"--out {str(self.root)!r} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}); wait for it, choose another --out, or delete {lock} if that run "
                    f"is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            return
        raise RunFolderError(f"could not lock {lock}")

    def _unlock(self) -> None:
        if self._locked:
            (self.root / LOCK).unlink(missing_ok=True)
            self._locked = False


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
