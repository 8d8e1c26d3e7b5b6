"""Bad input to every command ends with one line naming the argument or file (exit status 2
for usage errors, 1 for runtime errors, never a traceback), and the run folder refuses what
would otherwise give a silent wrong answer: stale resumes, leftover files, foreign checkpoints."""
import json

import pytest
import torch

from shortcut_fast.run_folder import RunFolder
from cli_runner import assert_refused, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# Small, fast settings per command (embedded data, an MLP, one short epoch).
SYN = ["--data", "synthetic-freq", "-D", "n_train=64", "-D", "n_val=32", "-D", "n_test=32"]
TINY = {
    "train": ["train", "--data", "digits", "--model", "mlp", "-M", "width=8", "--epochs", "1",
              "--max-steps-per-epoch", "2"],
    "spectrum": ["spectrum", *SYN],
    "freq-probe": ["freq-probe", *SYN, "--model", "mlp", "-M", "width=8", "--epochs", "1", "--patch", "8",
                   "--max-images-per-class", "4", "--track-every", "0"],
    "complexity": ["complexity", "--model", "mlp", "-M", "width=8", "--epochs", "1", "--directions", "pca:4",
                   "--max-images", "64", "--max-heldout", "32", "--layers", "fc1"],
    "memorization": ["memorization", "--model", "mlp", "-M", "width=8", "--epochs", "1", "--layers", "fc1",
                     "--max-samples", "64"],
    "mitigate": ["mitigate", "--model", "mlp", "-M", "width=8", "--erm-epochs", "1", "--epochs", "1",
                 "--max-steps-per-epoch", "2"],
}






@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """A 10-class MLP trained on digits (for the foreign-checkpoint cases)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert run_cli(*TINY["train"], "--out", out, "--quiet").exit_code == 0
    return out / "last.pt"


# ---- sizes and lists (usage errors, status 2)

@pytest.mark.parametrize("command,option,value", [
    ("train", "--max-steps-per-epoch", "-3"),
    ("train", "--epochs", "0"),
    ("train", "--batch-size", "0"),
    ("train", "--lr", "-1"),
    ("spectrum", "--batch-size", "0"),
    ("freq-probe", "--max-images-per-class", "-5"),
    ("freq-probe", "--batch-size", "0"),
    ("freq-probe", "--patch", "0"),
    ("freq-probe", "--top-percent", "0"),
    ("freq-probe", "--classes", "a,b"),
    ("freq-probe", "--classes", "7"),
    ("freq-probe", "--ood", "sunburn:3"),
    ("complexity", "--layers", ","),
    ("complexity", "--max-images", "0"),
    ("complexity", "--alphas", "-1"),
    ("memorization", "--layers", ","),
    ("memorization", "--top-k", "0"),
    ("memorization", "--repeats", "-2"),
    ("mitigate", "--prune-fraction", "1.5"),
    ("mitigate", "--conflict-ratio", "0"),
])
def test_bad_sizes_and_lists_are_usage_errors(tmp_path, command, option, value):
    r = run_cli(*TINY[command], option, value, "--out", tmp_path / "out")
    assert_refused(r, 2, option)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("command", list(TINY))
def test_device_must_be_a_device(tmp_path, command):
    assert_refused(run_cli(*TINY[command], "--device", "gpu0", "--out", tmp_path), 2, "--device")


def test_bench_cuda_without_gpu_and_unknown_benchmark():
    if not torch.cuda.is_available():
        assert_refused(run_cli("bench", "--device", "cuda"), 2, "--device")
    assert_refused(run_cli("bench", "nonsense"), 2, "NAME", )


def test_bad_model_option_and_model_name(tmp_path):
    assert_refused(run_cli(*TINY["train"], "-M", "depth", "--out", tmp_path / "a"), 2, "--model-option")
    assert_refused(run_cli(*TINY["freq-probe"][:-4], "--model", "resnet9000", "--out", tmp_path / "b"), 2, "--model")


# ---- files given as arguments (runtime errors, status 1)

def test_text_file_as_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    for command in ("freq-probe", "complexity", "memorization", "mitigate"):
        r = run_cli(*TINY[command], "--checkpoint", bad, "--out", tmp_path / command)
        assert_refused(r, 1, "--checkpoint", "notes.pt")


def test_other_kinds_of_torch_file_as_checkpoint(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)  # a bare state dict: not a train checkpoint
    assert_refused(run_cli(*TINY["memorization"], "--checkpoint", weights, "--out", tmp_path / "a"), 1, "weights.pt",
             "model_config")


def test_checkpoint_of_other_data_is_refused(tmp_path, digits_checkpoint):
    # A 10-class digits model on 4-class synthetic data would report accuracy near 0 without a word.
    r = run_cli(*TINY["freq-probe"], "--checkpoint", digits_checkpoint, "--out", tmp_path / "fp")
    assert_refused(r, 1, "--checkpoint", "num_classes 10 (the data has 4)")
    r = run_cli(*TINY["complexity"], *SYN, "--checkpoint", digits_checkpoint, "--out", tmp_path / "cx")
    assert_refused(r, 1, "num_classes 10")


def test_text_file_as_directions(tmp_path, digits_checkpoint):
    bad = tmp_path / "dirs.npy"
    bad.write_text("hello")
    r = run_cli("complexity", "--data", "digits", "--checkpoint", digits_checkpoint, "--directions", bad,
             "--layers", "fc1", "--max-images", "64", "--max-heldout", "32", "--out", tmp_path / "cx")
    assert_refused(r, 1, "dirs.npy")


def test_rewind_with_checkpoint_needs_rewind_to(tmp_path, digits_checkpoint):
    r = run_cli("memorization", "--data", "digits", "--checkpoint", digits_checkpoint, "--mode", "rewind",
             "--out", tmp_path / "m")
    assert_refused(r, 2, "--rewind-to")


# ---- the run folder: no stale resume, no leftovers, no two runs in one folder

@pytest.mark.parametrize("command,change", [
    ("train", ["--epochs", "2"]),
    ("train", ["-M", "width=16"]),
    ("train", ["--data", "synthetic-freq", "--bias-band", "2"]),
    ("freq-probe", ["--top-percent", "10"]),
    ("freq-probe", ["--patch", "4"]),
    ("freq-probe", ["--method", "gradient"]),
    ("freq-probe", ["--epochs", "2"]),
    ("complexity", ["--conflict-ratio", "0.1"]),
    ("complexity", ["--data", "digits"]),
    ("memorization", ["--mode", "mean"]),
    ("memorization", ["--epochs", "2"]),
    ("mitigate", ["--tau", "0.1"]),
])
def test_resume_with_a_changed_setting_is_refused(tmp_path, command, change):
    out = tmp_path / "run"
    first = run_cli(*TINY[command], "--out", out, "--quiet")
    assert first.exit_code == 0, first.output
    before = (out / "run.json").read_text()
    r = run_cli(*TINY[command], *change, "--out", out, "--resume", "--quiet")
    option = change[0].lstrip("-").replace("-", "_")
    option = {"M": "model_option", "data": "data"}.get(option, option)
    assert_refused(r, 1, "--resume", "settings differ", option)
    assert json.loads((out / "run.json").read_text())["fingerprint"] == json.loads(before)["fingerprint"]
    # The same settings resume, and give the same result as the first run.
    again = run_cli(*TINY[command], "--out", out, "--resume", "--quiet")
    assert again.exit_code == 0, again.output


def test_freq_probe_resume_with_the_checkpoint_changed_is_refused(tmp_path, digits_checkpoint):
    other = tmp_path / "other.pt"
    state = torch.load(digits_checkpoint, weights_only=True)
    state["model"] = {k: v + 1 for k, v in state["model"].items()}
    torch.save(state, other)
    args = ["freq-probe", "--data", "digits", "--patch", "8", "--max-images-per-class", "4", "--quiet"]
    out = tmp_path / "m"
    assert run_cli(*args, "--checkpoint", digits_checkpoint, "--out", out).exit_code == 0
    assert_refused(run_cli(*args, "--checkpoint", other, "--out", out, "--resume"), 1, "checkpoint: 'sha256:")


def test_reused_out_is_refused_and_overwrite_clears_leftovers(tmp_path):
    out = tmp_path / "cx"
    args = [*TINY["complexity"], "--dynamics", "--out", out, "--quiet"]
    assert run_cli(*args).exit_code == 0
    leftover = out / "model" / "epoch_003.pt"  # e.g. from an earlier, longer run
    leftover.write_bytes((out / "model" / "epoch_001.pt").read_bytes())
    assert_refused(run_cli(*args), 1, "already holds a 'complexity' run", "--overwrite")
    r = run_cli(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not leftover.exists()
    result = json.loads((out / "result.json").read_text())
    assert result["result"]["dynamics"]["epochs"] == [1]  # only this run's checkpoint is analysed
    assert result["trained"]["epochs"] == 1


def test_a_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "busy"
    with RunFolder(out, "train", {}):
        assert_refused(run_cli(*TINY["train"], "--out", out, "--resume"), 1, "in use by another run")


def test_model_option_keeps_the_default_width(tmp_path):
    out = tmp_path / "mem"
    r = run_cli("memorization", "--model", "small-cnn", "-M", "padding=2", "--epochs", "1", "--layers", "conv3",
             "--max-samples", "32", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["model_option"] == {"width": 16, "padding": 2}


def test_no_progress_bars_when_not_a_terminal(tmp_path):
    """Under a pipe (CliRunner is not a tty) progress comes as lines, one per epoch."""
    r = run_cli(*TINY["train"], "--epochs", "2", "--out", tmp_path)
    assert r.exit_code == 0
    assert "\r" not in r.output
    assert sum(line.startswith("epoch 1/2") for line in r.output.splitlines()) == 1
    assert sum(line.startswith("epoch 2/2") for line in r.output.splitlines()) == 1
    quiet = run_cli(*TINY["train"], "--epochs", "2", "--out", tmp_path / "q", "--quiet")
    assert not any(line.startswith("epoch ") for line in quiet.output.splitlines())
