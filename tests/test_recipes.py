"""Named training recipes: which recipe each dataset gets, what quick reproduces, overrides,
and the recipe as the commands print and record it (tiny fake CIFAR-10 files)."""
import dataclasses
import json

import pytest

from shortcut_fast import recipes
from shortcut_fast.models import build_model, model_option_names
from shortcut_fast.train import TrainConfig
from cli_runner import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FILE_BACKED = ("cifar10", "colored-mnist", "corrupted-cifar10", "waterbirds", "celeba")
EMBEDDED = ("synthetic-freq", "digits", "colored-digits", "corrupted-digits", "mnist-5k", "colored-mnist-5k")




@pytest.fixture
def cifar(tmp_path):
    from test_data import _write_cifar

    _write_cifar(tmp_path / "data", n_per_batch=20)
    return ["--data", "cifar10", "--data-root", tmp_path / "data", "-D", "val_size=10"]


# ---- the registry

def test_recipe_train_defaults_are_trainconfig_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert {k: defaults[k] for k in recipes.TRAIN_DEFAULTS} == recipes.TRAIN_DEFAULTS


def test_default_recipe_per_dataset():
    assert {d for d in FILE_BACKED + EMBEDDED if recipes.file_backed(d)} == set(FILE_BACKED)
    for purpose in recipes.PURPOSES:
        for dataset in FILE_BACKED:
            r = recipes.recipe_for(dataset, purpose)
            assert (r.name, r.dataset, r.purpose, r.fallback_from) == ("paper", dataset, purpose, None)
            assert r.source and r.reported and r.measured_here.startswith("no")  # none measured here
        for dataset in EMBEDDED:
            assert recipes.recipe_for(dataset, purpose).name == "quick"
        # asked for, a missing paper recipe falls back to quick and says so
        fallback = recipes.recipe_for("digits", purpose, "paper")
        assert fallback.name == "quick" and fallback.fallback_from == "paper" and "no paper recipe" in fallback.note
        assert recipes.recipe_for("cifar10", purpose, "quick").name == "quick"
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipes.recipe_for("cifar10", "train", "slow")


def test_cifar10_paper_recipe_is_the_frequency_shortcut_training():
    r = recipes.recipe_for("cifar10", "freq-probe")
    assert (r.model, r.model_options) == ("resnet18", {"width": 64})
    t = r.train
    assert (t["epochs"], t["batch_size"], t["optimizer"], t["lr"], t["momentum"], t["nesterov"], t["weight_decay"]) \
        == (200, 8, "sgd", 1e-3, 0.9, True, 1e-4)
    assert (t["schedule"], t["plateau_factor"], t["plateau_patience"], t["plateau_monitor"]) \
        == ("plateau", 0.1, 10, "val_loss")
    assert t["augment"] == "pad-flip-resized-crop" and "nn-frequency-shortcuts" in r.source
    assert "not reported" in r.reported
    # one recipe for every purpose on CIFAR-10: one trained model serves every command
    assert all(recipes.recipe_for("cifar10", p).train == t for p in recipes.PURPOSES)


def test_waterbirds_and_celeba_recipes():
    for dataset, lr, epochs, worst in (("waterbirds", 1e-3, 300, "72.6 %"), ("celeba", 1e-4, 50, "47.2 %")):
        erm = recipes.recipe_for(dataset, "train")
        assert erm.model == "tv:resnet50" and erm.pretrained and erm.data_options == {"image_size": 224}
        assert (erm.train["lr"], erm.train["epochs"], erm.train["batch_size"], erm.train["weight_decay"],
                erm.train["nesterov"]) == (lr, epochs, 128, 1e-4, False)
        assert worst in erm.reported and "Sagawa" in erm.source
        mem = recipes.recipe_for(dataset, "memorization")
        assert mem.train == recipes.recipe_for(dataset, "mitigate").train  # mitigation starts from that ERM model
        assert (mem.train["optimizer"], mem.train["lr"], mem.train["plateau_patience"], mem.train["augment"]) \
            == ("adam", 5e-6, 3, "resized-crop-flip")
        assert "Silent-Majority" in mem.source


def test_every_recipe_gives_a_valid_config_and_model():
    for recipe in [*recipes.PAPER.values(), *recipes.QUICK.values()]:
        TrainConfig(**recipe.train)  # every setting is a valid TrainConfig
        names = model_option_names(recipe.model)
        assert names is None or set(recipe.model_options) <= set(names), recipe
        if not recipe.model.startswith("tv:"):
            build_model(recipe.model, num_classes=10, image_size=32, **recipe.model_options)


@pytest.mark.parametrize("purpose,old", [
    ("train", dict(model="resnet18", options={}, cfg=dict(epochs=10, batch_size=128, optimizer="sgd", lr=None,
                                                          weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
                                                          augment="none", select="accuracy"))),
    ("freq-probe", dict(model="resnet18", options={"width": 16}, cfg=dict(epochs=4))),
    ("complexity", dict(model="resnet20", options={"width": 8}, cfg=dict(epochs=6, select="last",
                                                                         warmup_epochs=1.0))),
    ("memorization", dict(model="small-cnn", options={"width": 16}, cfg=dict(epochs=15, select="last"))),
    ("mitigate", dict(model="small-cnn", options={"width": 16}, cfg=dict(epochs=15, select="last"))),
])
def test_quick_reproduces_each_commands_old_defaults(purpose, old):
    """The embedded datasets' results in the README do not move: quick is what each command
    trained before recipes existed (model, options, TrainConfig)."""
    resolved = recipes.resolve(recipes.recipe_for("synthetic-freq", purpose))
    assert (resolved.model, resolved.model_options, resolved.overrides) == (old["model"], old["options"], {})
    assert TrainConfig(**resolved.train, seed=3) == TrainConfig(**old["cfg"], seed=3)
    if old["options"]:  # another model with a width gets the default width too, as before
        assert recipes.resolve(recipes.recipe_for("digits", purpose), model="vgg11").model_options == old["options"]


def test_explicit_options_override_and_are_recorded():
    paper = recipes.recipe_for("cifar10", "train")
    r = recipes.resolve(paper, train={"epochs": 3, "batch_size": None, "lr": 1e-3})
    assert r.train["epochs"] == 3 and r.train["batch_size"] == 8
    assert r.overrides == {"epochs": 3}  # an explicit value equal to the recipe's is no override
    r = recipes.resolve(paper, model="mlp", model_option={"width": 8})
    assert (r.model, r.model_options) == ("mlp", {"width": 8})  # the recipe's width=64 belongs to its resnet18
    assert r.overrides == {"model": "mlp", "model_option.width": 8}
    r = recipes.resolve(paper, model_option={"width": 32}, train={"max_steps_per_epoch": 2})
    assert r.model_options == {"width": 32} and r.train["max_steps_per_epoch"] == 2
    assert recipes.resolve(recipes.recipe_for("digits", "train"), train={"epochs": 1}).train["warmup_epochs"] == 1.0
    plateau = recipes.resolve(recipes.recipe_for("digits", "train"), train={"schedule": "plateau"})
    assert plateau.train["warmup_epochs"] == 0.0  # no warm-up under the plateau scheduler unless asked for
    # -M on top of the quick recipe keeps its default width (-M padding=2 as before)
    assert recipes.resolve(recipes.recipe_for("digits", "memorization"),
                           model_option={"padding": 2}).model_options == {"width": 16, "padding": 2}
    with pytest.raises(ValueError, match="valid names"):
        recipes.resolve(paper, model="resnet9000")


def test_expected_cpu_duration():
    r = recipes.resolve(recipes.recipe_for("cifar10", "train"))
    seconds = recipes.estimate_seconds(r, 45_000, 5_000)
    assert seconds == pytest.approx(200 * (45_000 + 1_250) * 0.23)
    assert recipes.format_duration(seconds).endswith("days")
    assert recipes.estimate_seconds(recipes.resolve(recipes.recipe_for("cifar10", "train"), model="mlp"), 10, 1) is None
    capped = recipes.resolve(recipes.recipe_for("cifar10", "train"), train={"max_steps_per_epoch": 2, "epochs": 1})
    assert recipes.estimate_seconds(capped, 45_000, 0) == pytest.approx(16 * 0.23)
    assert [recipes.format_duration(s) for s in (30, 600, 7200)] == ["30 s", "10 min", "2.0 h"]


# ---- the command line

def test_cifar10_trains_by_the_paper_recipe_with_overrides(tmp_path, cifar):
    out = tmp_path / "t"
    r = run_cli("train", *cifar, "--model", "mlp", "-M", "width=8", "--epochs", "1", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    first = r.output.splitlines()[0]
    assert first.startswith("recipe paper (cifar10, train): mlp (width=8), 1 epoch, batch 8, sgd lr 0.001")
    assert "Wang et al." in first and "overridden: model=mlp, model_option.width=8, epochs=1" in first
    assert "use --recipe quick for a CPU-minutes run" in r.output
    result = json.loads((out / "result.json").read_text())
    recipe = result["recipe"]
    assert recipe["name"] == "paper" and recipe["overrides"] == {"model": "mlp", "model_option.width": 8, "epochs": 1}
    assert "nn-frequency-shortcuts" in recipe["source"] and recipe["measured_here"].startswith("no")
    cfg = result["result"]["config"]
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["weight_decay"], cfg["schedule"], cfg["plateau_monitor"],
            cfg["augment"], cfg["select"]) == (1, 8, 1e-3, 1e-4, "plateau", "val_loss", "pad-flip-resized-crop", "last")
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["recipe"]["name"] == "paper" and settings["recipe"]["train"]["batch_size"] == 8


def test_recipe_quick_on_cifar10_and_explicit_epochs(tmp_path, cifar):
    out = tmp_path / "q"
    r = run_cli("train", *cifar, "--recipe", "quick", "--model", "mlp", "-M", "width=8", "--epochs", "1",
             "--max-steps-per-epoch", "2", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("recipe quick (cifar10, train): mlp (width=8), 1 epoch, batch 128, sgd lr 0.05")
    assert "--recipe quick for a CPU-minutes run" not in r.output  # no duration warning for quick
    result = json.loads((out / "result.json").read_text())
    assert result["recipe"]["name"] == "quick" and result["result"]["config"]["schedule"] == "cosine"
    # --epochs over a recipe, on the embedded data too
    r = run_cli("train", "--data", "digits", "--model", "mlp", "-M", "width=8", "--epochs", "2", "--batch-size", "256",
             "--max-steps-per-epoch", "1", "--out", tmp_path / "d", "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "d" / "result.json").read_text())
    assert result["recipe"]["name"] == "quick" and result["result"]["epochs_run"] == 2
    assert result["recipe"]["overrides"] == {"model": "mlp", "model_option.width": 8, "epochs": 2, "batch_size": 256,
                                             "max_steps_per_epoch": 1}


def test_paper_on_a_cpu_prints_the_expected_duration(tmp_path, cifar):
    r = run_cli("train", *cifar, "--epochs", "1", "--max-steps-per-epoch", "1", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    line = next(s for s in r.output.splitlines() if "expected training time" in s)
    assert "about" in line and line.endswith("use --recipe quick for a CPU-minutes run")


def test_paper_recipe_of_waterbirds_needs_pretrained(tmp_path):
    for command in (["train"], ["freq-probe"], ["memorization"], ["mitigate"]):
        r = run_cli(*command, "--data", "waterbirds", "--data-root", tmp_path, "--out", tmp_path / "o")
        assert r.exit_code == 2 and "--pretrained" in r.output.strip().splitlines()[-1], r.output
        assert "ImageNet ResNet-50" in r.output
    # quick needs no weights (and then fails on the missing data files, naming them)
    r = run_cli("train", "--data", "waterbirds", "--recipe", "quick", "--data-root", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "metadata.csv" in r.output


def test_paper_on_embedded_data_falls_back_with_a_note(tmp_path):
    r = run_cli("train", "--data", "digits", "--recipe", "paper", "--model", "mlp", "-M", "width=8", "--epochs", "1",
             "--max-steps-per-epoch", "1", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("recipe quick (digits, train)") and "note: digits has no paper recipe" in r.output
    assert json.loads((tmp_path / "o" / "result.json").read_text())["recipe"]["fallback_from"] == "paper"
