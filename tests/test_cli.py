"""The command line end to end on the embedded data."""
import json


from cli_runner import run_cli




def test_train_writes_result_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--data", "digits", "--model", "mlp", "--epochs", "2", "--optimizer", "adam",
             "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads((out / "result.json").read_text())
    assert result["result"]["final"]["test"]["accuracy"] > 0.5
    assert (out / "last.pt").exists() and (out / "val_accuracy.png").exists()
    assert "accuracy" in r.output and "test" in r.output


def test_train_synthetic_with_options_and_resume(tmp_path):
    out = tmp_path / "syn"
    args = ["train", "--data", "synthetic-freq", "--bias-band", "3", "-D", "n_train=64", "-D", "n_val=16",
            "-D", "n_test=16", "--model", "mlp", "-M", "width=16", "--epochs", "1", "--out", str(out), "--quiet"]
    assert run_cli(*args).exit_code == 0
    meta = json.loads((out / "result.json").read_text())["dataset_meta"]
    assert meta["bias_band"] == 3
    r = run_cli(*args, "--resume")  # a finished run resumes to the same result
    assert r.exit_code == 0, r.output
    assert len(json.loads((out / "history.json").read_text())) == 1
    args[args.index("--epochs") + 1] = "2"
    r = run_cli(*args, "--resume")  # more epochs is another run: refused, naming the setting
    assert r.exit_code == 1 and "epochs: 1 -> 2" in r.output


def test_spectrum_command(tmp_path):
    out = tmp_path / "spec"
    r = run_cli("spectrum", "--data", "synthetic-freq", "-D", "n_train=40", "-D", "num_classes=3", "--out", str(out))
    assert r.exit_code == 0, r.output
    result = json.loads((out / "result.json").read_text())
    assert sum(result["counts"]) == 40
    assert len(result["adcs"]) == 3 and len(result["adcs"][0]) == 32
    assert (out / "adcs.png").exists() and (out / "class_spectra.png").exists()


def test_unknown_names_list_valid_ones(tmp_path):
    r = run_cli("train", "--data", "imagenet-21k", "--out", str(tmp_path))
    assert r.exit_code != 0 and "valid names: synthetic-freq" in r.output
    r = run_cli("train", "--data", "digits", "--model", "resnet9000", "--out", str(tmp_path))
    assert r.exit_code != 0 and "valid names: resnet18" in r.output


def test_missing_dataset_names_files_and_folder(tmp_path):
    r = run_cli("train", "--data", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.exit_code != 0
    assert "data_batch_1" in r.output and str(tmp_path) in r.output


def test_bad_option_syntax(tmp_path):
    r = run_cli("train", "--data", "digits", "-D", "n_train", "--out", str(tmp_path))
    assert r.exit_code != 0 and "expected KEY=VALUE" in r.output


def test_lists():
    assert "colored-digits" in run_cli("datasets").output
    assert "resnet20" in run_cli("models").output


def test_same_seed_same_model(tmp_path):
    """--seed fixes initialization as well as data and order: two runs give identical weights."""
    import torch

    args = ["train", "--data", "digits", "--model", "mlp", "-M", "width=16", "--epochs", "1",
            "--max-steps-per-epoch", "2", "--quiet", "--seed", "5"]
    for name in ("a", "b"):
        torch.manual_seed(1000 + len(name) * ord(name))  # whatever came before must not matter
        assert run_cli(*args, "--out", str(tmp_path / name)).exit_code == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
