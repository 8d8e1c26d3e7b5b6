"""--weights: a user's own weights of --model for every command that has a model; strict
loading, refusals in one line, and the weights' digest in the run's fingerprint."""
import json

import pytest
import torch

from cli_runner import assert_refused, run_cli
from shortcut_fast import pipeline
from shortcut_fast.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["--data", "colored-digits", "--model", "mlp", "-M", "width=8"]
MEMORIZATION = ["memorization", *DIGITS, "--layers", "fc1", "--max-samples", "64"]


def _own_weights(path, seed=1, **wrap):
    """A state_dict of the colored-digits MLP (width 8), as a user would save it; `wrap`: {"key": name}
    saves it inside a checkpoint dict under that key."""
    splits = load_dataset("colored-digits")
    net = pipeline.build_model("mlp", splits, {"width": 8}, seed)
    state = net.state_dict()
    torch.save({wrap["key"]: state, "epoch": 3} if wrap else state, path)
    return state


def test_analysis_runs_on_the_given_weights_without_training(tmp_path):
    state = _own_weights(tmp_path / "w.pt")
    out = tmp_path / "run"
    r = run_cli(*MEMORIZATION, "--weights", tmp_path / "w.pt", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert not (out / "model").exists()  # nothing trained
    record = json.loads((out / "result.json").read_text())
    assert record["model"] == "mlp" and record["recipe"] is None
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["weights"].startswith("sha256:")
    # the analysed model is the file's: the baseline accuracies equal those of the loaded net
    splits = load_dataset("colored-digits")
    net = pipeline.build_model("mlp", splits, {"width": 8}, 0, weights=tmp_path / "w.pt")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_weights_inside_a_checkpoint_dict_load(tmp_path):
    state = _own_weights(tmp_path / "ckpt.pt", key="model_state_dict")
    splits = load_dataset("colored-digits")
    net = pipeline.build_model("mlp", splits, {"width": 8}, 0, weights=tmp_path / "ckpt.pt")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_changed_weights_change_the_fingerprint(tmp_path):
    _own_weights(tmp_path / "w.pt", seed=1)
    out = tmp_path / "run"
    assert run_cli(*MEMORIZATION, "--weights", tmp_path / "w.pt", "--out", out, "--quiet").exit_code == 0
    _own_weights(tmp_path / "w.pt", seed=2)  # same path, other content
    r = run_cli(*MEMORIZATION, "--weights", tmp_path / "w.pt", "--out", out, "--quiet", "--resume")
    assert_refused(r, 1, "weights")


def test_weights_of_another_architecture_are_refused_naming_the_keys(tmp_path):
    _own_weights(tmp_path / "w.pt")
    r = run_cli(*MEMORIZATION[:-4], "--layers", "fc1", "-M", "width=16", "--weights", tmp_path / "w.pt",
                "--out", tmp_path / "run")
    line = assert_refused(r, 2, "--weights", "shape mismatch", "fc1")
    assert "w.pt" in line
    assert not (tmp_path / "run").exists()


def test_weights_with_a_missing_key_are_refused(tmp_path):
    state = _own_weights(tmp_path / "w.pt")
    dropped = sorted(state)[-1]
    torch.save({k: v for k, v in state.items() if k != dropped}, tmp_path / "w.pt")
    r = run_cli(*MEMORIZATION, "--weights", tmp_path / "w.pt", "--out", tmp_path / "run")
    assert_refused(r, 2, "--weights", "missing keys", dropped)


def test_a_pickled_module_is_not_unpickled(tmp_path):
    splits = load_dataset("colored-digits")
    torch.save(pipeline.build_model("mlp", splits, {"width": 8}, 0), tmp_path / "module.pt")
    r = run_cli(*MEMORIZATION, "--weights", tmp_path / "module.pt", "--out", tmp_path / "run")
    assert_refused(r, 2, "--weights", "weights_only")


def test_weights_and_checkpoint_together_are_refused(tmp_path):
    _own_weights(tmp_path / "w.pt")
    r = run_cli(*MEMORIZATION, "--weights", tmp_path / "w.pt", "--checkpoint", tmp_path / "w.pt",
                "--out", tmp_path / "run")
    assert_refused(r, 2, "--weights", "--checkpoint")


@pytest.mark.parametrize("command", ["train", "freq-probe", "complexity", "memorization", "mitigate", "localize"])
def test_every_model_command_has_weights(command):
    r = run_cli(command, "--help")
    assert r.exit_code == 0 and "--weights" in r.output


def test_train_starts_from_the_weights(tmp_path):
    state = _own_weights(tmp_path / "w.pt")
    out = tmp_path / "run"
    r = run_cli("train", *DIGITS, "--weights", tmp_path / "w.pt", "--epochs", "1", "--max-steps-per-epoch", "1",
                "--lr", "1e-9", "--no-cache", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    # one step at lr 1e-9 keeps the weights within float noise of where they started
    assert all(torch.allclose(trained[k].float(), v.float(), atol=1e-6) for k, v in state.items() if v.is_floating_point())


def test_image_size_option_reaches_the_data(tmp_path):
    out = tmp_path / "run"
    r = run_cli("spectrum", "--data", "digits", "--image-size", "12", "--out", out)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "result.json").read_text())
    assert record["dataset_meta"]["options"]["image_size"] == 12
    assert record["dataset_meta"]["image_shape"][-1] == 12
