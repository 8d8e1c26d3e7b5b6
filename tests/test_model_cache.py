"""The model cache: a model trained by one command is reused by the others (same numbers),
retrained when a fingerprinted setting differs, stored atomically, listed and cleared."""
import json
import multiprocessing
import os

import pytest
import torch

from shortcut_fast.model_cache import ENTRY, ModelCache, cache_root, model_identity, model_key
from cli_runner import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["train", "--data", "digits", "--model", "mlp", "-M", "width=8", "--epochs", "1", "--max-steps-per-epoch",
         "2", "--quiet"]




def _result(out):
    return json.loads((out / "result.json").read_text())


def _reused(out) -> bool:
    return _result(out)["model_cache"]["reused"]


@pytest.fixture
def cifar(tmp_path):
    from test_data import _write_cifar

    _write_cifar(tmp_path / "data", n_per_batch=20)
    return ["--data", "cifar10", "--data-root", tmp_path / "data", "-D", "val_size=10", "--model", "mlp",
            "-M", "width=8", "--epochs", "1", "--quiet"]


def _fake_model_dir(folder, epochs=0):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ["best.pt", "last.pt"] + [f"epoch_{e:03d}.pt" for e in range(1, epochs + 1)]:
        torch.save({"model": {"w": torch.arange(3.0)}, "name": name}, folder / name)
    (folder / "history.json").write_text("[]")
    return folder


# ---- the library

def test_cache_folder_comes_from_the_environment(model_cache_folder, monkeypatch):
    assert cache_root() == model_cache_folder
    monkeypatch.delenv("SHORTCUT_FAST_CACHE")
    assert cache_root() == __import__("pathlib").Path.home() / ".cache" / "shortcut-fast" / "models"


def test_key_ignores_where_and_how_fast_training_runs():
    base = dict(data={"digest": "x"}, model="mlp", model_options={"width": 8}, seed=0)
    a = model_identity(**base, train={"epochs": 1, "device": "cpu", "num_workers": 0, "keep_every": 0})
    b = model_identity(**base, train={"epochs": 1, "device": "cuda", "num_workers": 4, "keep_every": 1})
    assert model_key(a) == model_key(b)
    assert model_key(a) != model_key(model_identity(**base, train={"epochs": 2}))
    assert model_key(a) != model_key(model_identity(**{**base, "seed": 1}, train={"epochs": 1}))


def test_store_lookup_materialize_and_add(tmp_path):
    cache = ModelCache(tmp_path / "cache")
    assert cache.lookup("k") is None and cache.entries() == []
    entry, mine = cache.store("k", _fake_model_dir(tmp_path / "run", epochs=2), {"data": "digits"})
    assert mine and entry.info["data"] == "digits" and entry.epochs_kept == [1, 2]
    again, mine = cache.store("k", _fake_model_dir(tmp_path / "other"), {"data": "other"})
    assert not mine and again.info["data"] == "digits"  # the first stored copy stays
    dest = tmp_path / "dest"
    entry.materialize(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["best.pt", "history.json", "last.pt"]
    entry.materialize(dest, epochs=[2])
    assert (dest / "epoch_002.pt").exists() and not (dest / "epoch_001.pt").exists()
    assert torch.load(dest / "last.pt", weights_only=True)["name"] == "last.pt"
    assert cache.add_files(entry, _fake_model_dir(tmp_path / "more", epochs=3), ["epoch_003.pt", "epoch_001.pt"]) \
        == ["epoch_003.pt"]  # what the entry has is left alone
    assert entry.has_epochs([1, 2, 3]) and not entry.has_epochs([4])
    cache.save_artifact(entry, "snapshots.json", {"a": 1})
    assert json.loads(entry.artifact("snapshots.json").read_text()) == {"a": 1} and entry.artifact("x") is None
    with pytest.raises(FileNotFoundError, match="best.pt"):
        cache.store("j", tmp_path, {})
    assert [e.key for e in cache.entries()] == ["k"] and cache.clear() == 1 and cache.entries() == []


def test_a_lost_race_discards_its_copy(tmp_path, monkeypatch):
    cache = ModelCache(tmp_path / "cache")
    first, _ = cache.store("k", _fake_model_dir(tmp_path / "a"), {"who": "first"})
    monkeypatch.setattr(ModelCache, "lookup", lambda self, key, _real=ModelCache.lookup: (
        None if not hasattr(self, "_asked") and not setattr(self, "_asked", True) else _real(self, key)))
    entry, mine = ModelCache(tmp_path / "cache").store("k", _fake_model_dir(tmp_path / "b"), {"who": "second"})
    assert not mine and entry.info["who"] == "first"  # os.replace onto the stored entry failed
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k"]  # no temporary folder left


def _store_in_process(args):
    root, source, who = args
    entry, mine = ModelCache(root).store("same", source, {"who": who})
    return mine, entry.info["who"]


def test_concurrent_stores_of_one_key_leave_one_complete_entry(tmp_path):
    sources = [_fake_model_dir(tmp_path / f"src{i}") for i in range(4)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_store_in_process, [(tmp_path / "cache", s, i) for i, s in enumerate(sources)])
    winners = [who for mine, who in results if mine]
    assert len(winners) == 1 and all(who == winners[0] for _, who in results)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["same"]
    assert sorted(p.name for p in (tmp_path / "cache" / "same").iterdir()) == \
        ["best.pt", ENTRY, "history.json", "last.pt"]


# ---- the commands

def test_train_then_freq_probe_reuses_the_model(tmp_path, cifar):
    """On CIFAR-10 every command trains by the same paper recipe: one model serves them all."""
    r = run_cli("train", *cifar, "--out", tmp_path / "t")
    assert r.exit_code == 0, r.output
    key = _result(tmp_path / "t")["model_cache"]["key"]
    r = run_cli("freq-probe", *cifar, "--patch", "8", "--classes", "0", "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    assert f"reusing cached model {key} (trained by shortcut-fast train" in r.output
    result = _result(tmp_path / "f")
    assert result["model_cache"] == {"key": key, "reused": True, "folder": str(ModelCache().root / key)}
    trained = _result(tmp_path / "t")["result"]
    assert result["result"]["learning"]["train"]["test_accuracy"] == trained["final"]["test"]["accuracy"]
    assert (tmp_path / "f" / "model" / "last.pt").read_bytes() == (tmp_path / "t" / "last.pt").read_bytes()


def test_freq_probe_then_memorization_share_the_model(tmp_path, cifar):
    shortcut = ["-D", "shortcut=patch"]  # CIFAR-10 with a planted attribute: memorization needs groups
    assert run_cli("freq-probe", *cifar, *shortcut, "--patch", "8", "--classes", "0",
                "--out", tmp_path / "f").exit_code == 0
    r = run_cli("memorization", *cifar, *shortcut, "--layers", "fc1", "--max-samples", "32", "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert _reused(tmp_path / "m") and "reusing cached model" in r.output


@pytest.mark.parametrize("change", [["--epochs", "2"], ["--seed", "1"], ["-M", "width=16"], ["-D", "val_fraction=0.2"],
                                    ["--lr", "0.01"], ["--no-cache"]])
def test_a_changed_setting_trains_anew(tmp_path, change):
    assert run_cli(*TRAIN, "--out", tmp_path / "a").exit_code == 0
    assert not _reused(tmp_path / "a")
    assert run_cli(*TRAIN, "--out", tmp_path / "same").exit_code == 0
    assert _reused(tmp_path / "same")
    r = run_cli(*TRAIN, *change, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert not _reused(tmp_path / "b") and "reusing" not in r.output


def test_another_recipe_trains_anew(tmp_path, cifar):
    assert run_cli("train", *cifar, "--out", tmp_path / "paper").exit_code == 0
    r = run_cli("train", *cifar, "--recipe", "quick", "--out", tmp_path / "quick")
    assert r.exit_code == 0 and not _reused(tmp_path / "quick")
    assert run_cli("train", *cifar, "--recipe", "paper", "--out", tmp_path / "again").exit_code == 0
    assert _reused(tmp_path / "again")  # the default recipe of cifar10 is paper: the same model
    # a paper recipe that falls back to quick (embedded data) trains the quick model: reused
    assert run_cli(*TRAIN, "--out", tmp_path / "d").exit_code == 0
    assert run_cli(*TRAIN, "--recipe", "paper", "--out", tmp_path / "d2").exit_code == 0 and _reused(tmp_path / "d2")


def test_no_cache_neither_reads_nor_writes(tmp_path, model_cache_folder):
    assert run_cli(*TRAIN, "--no-cache", "--out", tmp_path / "a").exit_code == 0
    assert list(model_cache_folder.iterdir()) == []
    assert _result(tmp_path / "a")["model_cache"] == {"key": None, "reused": False, "folder": None}


def test_reused_model_gives_the_same_results(tmp_path):
    """Each command's result.json numbers are the same whether it trained the model or reused it."""
    syn = ["--data", "synthetic-freq", "-D", "n_train=96", "-D", "n_val=32", "-D", "n_test=32", "-D", "image_size=16",
           "--model", "mlp", "-M", "width=16", "--epochs", "2", "--quiet"]
    runs = {
        "train": [*TRAIN],
        "freq-probe": ["freq-probe", *syn, "--patch", "8", "--max-images-per-class", "4", "--track-every", "2"],
        "complexity": ["complexity", "--model", "mlp", "-M", "width=8", "--epochs", "1", "--directions", "pca:4",
                       "--max-images", "64", "--max-heldout", "32", "--layers", "fc1", "--dynamics", "--quiet"],
        "memorization": ["memorization", "--model", "mlp", "-M", "width=8", "--epochs", "1", "--layers", "fc1",
                         "--max-samples", "64", "--quiet"],
        "mitigate": ["mitigate", "--model", "mlp", "-M", "width=8", "--erm-epochs", "1", "--epochs", "1",
                     "--max-steps-per-epoch", "2", "--quiet"],
    }
    for name, args in runs.items():
        ModelCache().clear()  # memorization and mitigate train the same ERM model: each trains it once here
        assert run_cli(*args, "--out", tmp_path / f"{name}-trained").exit_code == 0
        r = run_cli(*args, "--out", tmp_path / f"{name}-reused")
        assert r.exit_code == 0 and "reusing cached model" in r.output, (name, r.output)
        trained, reused = _result(tmp_path / f"{name}-trained"), _result(tmp_path / f"{name}-reused")
        assert (trained["model_cache"]["reused"], reused["model_cache"]["reused"]) == (False, True)
        for record in (trained, reused):
            record.pop("model_cache")
        text = json.dumps(reused).replace(f"{name}-reused", f"{name}-trained")
        assert _numbers(json.loads(text)) == _numbers(trained), name


def _numbers(obj):
    """The record without wall times (they differ from run to run)."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if k not in ("seconds", "seconds_per_class", "analysis_seconds")
                and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return obj


def test_what_a_command_needs_from_the_training_is_added_to_the_entry(tmp_path):
    # freq-probe's band-learning snapshots depend on --track-every: another value trains again
    syn = ["freq-probe", "--data", "synthetic-freq", "-D", "n_train=64", "-D", "n_val=16", "-D", "n_test=16",
           "-D", "image_size=16", "--model", "mlp", "-M", "width=8", "--epochs", "1", "--no-dfm", "--quiet"]
    assert run_cli(*syn, "--track-every", "2", "--out", tmp_path / "a").exit_code == 0
    r = run_cli(*syn, "--track-every", "3", "--out", tmp_path / "b")
    assert "lacks band-learning-" in r.output and not _reused(tmp_path / "b")
    for every, out in (("2", "c"), ("3", "d")):  # both sets of snapshots are cached now
        assert run_cli(*syn, "--track-every", every, "--out", tmp_path / out).exit_code == 0 and _reused(tmp_path / out)
    assert _result(tmp_path / "d")["result"]["learning"]["steps"] == _result(tmp_path / "b")["result"]["learning"][
        "steps"]
    # complexity --dynamics needs every epoch's checkpoint; the model cached without them is trained again
    cx = ["complexity", "--model", "mlp", "-M", "width=8", "--epochs", "2", "--directions", "pca:4", "--max-images",
          "64", "--max-heldout", "32", "--layers", "fc1", "--quiet"]
    assert run_cli(*cx, "--out", tmp_path / "cx").exit_code == 0
    assert not (tmp_path / "cx" / "model" / "epoch_001.pt").exists()
    r = run_cli(*cx, "--dynamics", "--out", tmp_path / "cx-dyn")
    assert "lacks the epoch checkpoints" in r.output and not _reused(tmp_path / "cx-dyn")
    assert run_cli(*cx, "--dynamics", "--out", tmp_path / "cx-dyn2").exit_code == 0 and _reused(tmp_path / "cx-dyn2")
    assert (tmp_path / "cx-dyn2" / "model" / "epoch_002.pt").exists()
    assert _result(tmp_path / "cx-dyn2")["result"]["dynamics"]["epochs"] == [1, 2]


def test_cache_list_and_clear(tmp_path, model_cache_folder):
    r = run_cli("cache", "list")
    assert r.exit_code == 0 and "0 model(s)" in r.output
    assert run_cli(*TRAIN, "--out", tmp_path / "a").exit_code == 0
    key = _result(tmp_path / "a")["model_cache"]["key"]
    r = run_cli("cache", "list")
    assert r.exit_code == 0 and str(model_cache_folder) in r.output
    row = next(line for line in r.output.splitlines() if line.startswith(key))
    for text in ("digits", "mlp (width=8)", "quick", "shortcut-fast train", "kB"):
        assert text in row, text
    r = run_cli("cache", "clear")
    assert r.exit_code == 2 and "--yes" in r.output.strip().splitlines()[-1] and "1 cached model" in r.output
    assert ModelCache().lookup(key) is not None  # nothing deleted without --yes
    (model_cache_folder / "data").mkdir()  # decoded images of imagefolder:/csv: data: not a model
    (model_cache_folder / "data" / "k.pt").write_bytes(b"x")
    r = run_cli("cache", "clear", "--yes")
    assert r.exit_code == 0 and "deleted 1 cached model" in r.output
    assert ModelCache().entries() == [] and os.listdir(model_cache_folder) == ["data"]
