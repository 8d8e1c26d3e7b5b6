"""The run-folder module: fingerprint, resume/overwrite rules, lock, atomic weights-only state."""
import json
import os
import subprocess
import sys

import pytest
import torch

from shortcut_fast.run_folder import (RunFolder, RunFolderError, Store, fingerprint, load_state_file, settings_diff,
                                      tensor_digest)


def test_fingerprint_ignores_key_order_and_sees_every_value():
    a = {"patch": 2, "data": {"name": "digits", "seed": 0}}
    assert fingerprint(a) == fingerprint({"data": {"seed": 0, "name": "digits"}, "patch": 2})
    assert fingerprint(a) != fingerprint({"patch": 1, "data": {"name": "digits", "seed": 0}})
    assert fingerprint(a) != fingerprint({"patch": 2, "data": {"name": "digits", "seed": 1}})


def test_settings_diff_names_nested_keys_with_both_values():
    diff = settings_diff({"patch": 1, "data": {"seed": 0}}, {"patch": 2, "data": {"seed": 0}, "mode": "zero"})
    assert diff == ["mode: '<unset>' -> 'zero'", "patch: 1 -> 2"]


def test_tensor_digest_follows_content_dtype_and_shape():
    x = torch.arange(12, dtype=torch.uint8)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x.view(3, 4))
    assert tensor_digest(x) != tensor_digest(x.float())
    y = x.clone()
    y[5] = 0
    assert tensor_digest(x) != tensor_digest(y)
    assert tensor_digest(torch.tensor(3)) != tensor_digest(torch.tensor(4))  # 0-d (e.g. BN counters)


def test_fresh_resume_refuse_and_overwrite(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, "demo", {"patch": 1}) as run:
        assert not run.resuming
        run.partial.save_json("class_0.json", {"done": True})
    assert json.loads((out / "run.json").read_text())["status"] == "done"

    with pytest.raises(RunFolderError, match="already holds a 'demo' run.*--resume.*--overwrite"):
        RunFolder(out, "demo", {"patch": 1}).open()
    with pytest.raises(RunFolderError, match=r"settings differ.*patch: 1 -> 2"):
        RunFolder(out, "demo", {"patch": 2}, resume=True).open()
    with pytest.raises(RunFolderError, match="holds a 'demo' run, not 'other'"):
        RunFolder(out, "other", {"patch": 1}, resume=True).open()

    with RunFolder(out, "demo", {"patch": 1}, resume=True) as run:
        assert run.resuming and run.partial.load_json("class_0.json") == {"done": True}

    with RunFolder(out, "demo", {"patch": 2}, overwrite=True) as run:
        assert not run.resuming and not (out / "partial").exists()
        assert run.partial.load_json("class_0.json") is None


def test_resume_of_an_empty_folder_starts_fresh(tmp_path):
    with RunFolder(tmp_path / "new", "demo", {}, resume=True) as run:
        assert not run.resuming


def test_a_folder_that_is_not_a_run_is_never_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a shortcut-fast run folder"):
        RunFolder(tmp_path, "demo", {}, overwrite=True).open()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_run_is_recorded_and_unlocked(tmp_path):
    with pytest.raises(KeyError):
        with RunFolder(tmp_path, "demo", {}):
            raise KeyError("boom")
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"
    assert not (tmp_path / ".lock").exists()


def test_lock_refuses_a_second_live_run_and_takes_over_a_dead_ones(tmp_path):
    first = RunFolder(tmp_path, "demo", {}).open()
    with pytest.raises(RunFolderError, match="in use by another run"):
        RunFolder(tmp_path, "demo", {}, resume=True).open()
    first.close()
    # A lock left by a process that was killed (kill -9 leaves it behind) is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = json.loads(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "started": 0}))
    (tmp_path / ".lock").write_text(json.dumps(lock))
    with RunFolder(tmp_path, "demo", {}, resume=True) as run:
        assert run.resuming


def test_state_files_are_atomic_and_weights_only(tmp_path):
    store = Store(tmp_path, resuming=True)
    store.save_state("a.pt", {"w": torch.ones(3), "epoch": 2, "history": [{"loss": 0.5}]})
    assert not list(tmp_path.glob("*.tmp"))
    assert store.load_state("a.pt")["epoch"] == 2
    assert Store(tmp_path, resuming=False).load_state("a.pt") is None  # a fresh run never reads old state

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt' is not a readable torch state file"):
        load_state_file(tmp_path / "evil.pt", what="--checkpoint")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="--checkpoint .*text.pt' is not a readable torch state file"):
        load_state_file(tmp_path / "text.pt", what="--checkpoint")
