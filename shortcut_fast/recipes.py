"""Named training recipes: what the model a command trains is, per dataset and purpose.

Two names:

- `paper`: what the paper behind the dataset trained (model, optimizer, schedule, epochs,
  augmentation), each setting taken from the paper's public code and named in `source`.
- `quick`: the CPU-minutes setting every command had before recipes existed (narrow models,
  a few epochs); the embedded datasets default to it, so their results do not move.

Real, file-backed datasets (cifar10, colored-mnist, corrupted-cifar10, waterbirds, celeba)
default to `paper`, the embedded ones (synthetic-freq, digits, colored-digits,
corrupted-digits) and the packaged real digits (mnist-5k, colored-mnist-5k: the stand-ins'
settings, so that real and stand-in results differ only in the images) to `quick`. A dataset without a paper recipe for a purpose falls back to
`quick`, with a note saying so.

Purposes are the commands that train one model: train, freq-probe, complexity,
memorization, mitigate (its ERM model). On CIFAR-10 only the frequency-shortcut paper
trained a model; its recipe serves every purpose there, so one trained (and cached) model
is what every command studies. Waterbirds and CelebA have two: the usual ERM of Sagawa et
al. (train, freq-probe, complexity) and the ERM of the spurious-memorization paper
(memorization, mitigate), which its mitigation starts from.

`resolve(recipe, ...)` applies the options a user gave explicitly on top of a recipe and
records them as overrides; the train settings are TrainConfig fields (shortcut_fast.train).
Each recipe says which accuracy its source reports and whether it was measured here: none
of the paper recipes was (the project's machines hold none of the real datasets).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from shortcut_fast.models import model_option_names

NAMES = ("paper", "quick")
FILE_BACKED = ("cifar10", "colored-mnist", "corrupted-cifar10", "waterbirds", "celeba")
PURPOSES = ("train", "freq-probe", "complexity", "memorization", "mitigate")

# TrainConfig's defaults for the fields a recipe sets (tests check they agree with train.py).
TRAIN_DEFAULTS = dict(epochs=10, batch_size=128, optimizer="sgd", lr=None, momentum=0.9, nesterov=True,
                      weight_decay=5e-4, schedule="cosine", warmup_epochs=0.0, augment="none", select="accuracy",
                      plateau_factor=0.5, plateau_patience=1, plateau_monitor="train_loss")


@dataclass(frozen=True)
class Recipe:
    """One named way to train the model of a (dataset, purpose).

    model_options apply when the model is the recipe's own; default_width (quick recipes)
    is the width given to any model that has one (the commands' old `-M width` default).
    train: TrainConfig fields (seed and device come from the command). data_options: dataset
    options the source used (e.g. 224-pixel images), under any -D the user gives.
    pretrained: what the --pretrained weights file must be, when the recipe starts from one.
    cpu_seconds_per_image: one training step per image on the project's 2-core CPU
    (measured here, under load; a rough figure for the expected duration).
    """

    name: str
    dataset: str
    purpose: str
    model: str
    model_options: dict = field(default_factory=dict)
    default_width: int | None = None
    train: dict = field(default_factory=dict)
    data_options: dict = field(default_factory=dict)
    source: str = ""
    reported: str = "not reported"
    measured_here: str = "no"
    pretrained: str | None = None
    cpu_seconds_per_image: float | None = None
    note: str = ""
    fallback_from: str | None = None  # "paper" when this quick recipe stands in for a missing paper recipe


def _train(**kw) -> dict:
    unknown = set(kw) - set(TRAIN_DEFAULTS)
    if unknown:
        raise KeyError(f"not a recipe train setting: {sorted(unknown)}")
    return {**TRAIN_DEFAULTS, **kw}


# ---------------------------------------------------------------------------------------
# quick: each command's defaults before recipes (dataset "*": any dataset)

_QUICK_MEASURED = ("on the embedded data: the results in docs/results.md (docs/results/*.json, the project's 2-core CPU); "
                   "not measured on the real datasets")
_QUICK_SOURCE = "this project's CPU-minutes default (not a paper's recipe)"

QUICK = {
    "train": Recipe("quick", "*", "train", "resnet18",
                    train=_train(epochs=10, warmup_epochs=1.0)),
    "freq-probe": Recipe("quick", "*", "freq-probe", "resnet18", default_width=16, train=_train(epochs=4)),
    "complexity": Recipe("quick", "*", "complexity", "resnet20", default_width=8,
                         train=_train(epochs=6, warmup_epochs=1.0, select="last")),
    "memorization": Recipe("quick", "*", "memorization", "small-cnn", default_width=16,
                           train=_train(epochs=15, select="last")),
    "mitigate": Recipe("quick", "*", "mitigate", "small-cnn", default_width=16,
                       train=_train(epochs=15, select="last")),
}
QUICK = {k: dataclasses.replace(r, source=_QUICK_SOURCE, reported="none (not a paper's recipe)",
                                measured_here=_QUICK_MEASURED) for k, r in QUICK.items()}

# ---------------------------------------------------------------------------------------
# paper recipes

_NOT_HERE = "no: the project's machines hold no copy of this dataset"

_WANG = Recipe(
    "paper", "cifar10", "freq-probe", "resnet18", model_options={"width": 64},
    train=_train(epochs=200, batch_size=8, optimizer="sgd", lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4,
                 schedule="plateau", plateau_factor=0.1, plateau_patience=10, plateau_monitor="val_loss",
                 augment="pad-flip-resized-crop", select="last"),
    source="Wang et al., ICCV 2023 (frequency shortcuts): nis-research/nn-frequency-shortcuts train.py (SGD lr 0.001, "
           "momentum 0.9, Nesterov, weight decay 1e-4, ReduceLROnPlateau(factor 0.1, patience 10) on the validation "
           "loss, 200 epochs, batch 8, Pad(4) + flip + RandomResizedCrop(32), 90/10 train/val split; the DFMs are "
           "computed from the last checkpoint) and backbone/resnet.py (CIFAR ResNet-18: 3x3 stride-1 stem, no "
           "max-pool, 64-512 channels)",
    reported="not reported (the repository's README and train.py state no CIFAR-10 accuracy; the paper's text was "
             "not checked here)",
    measured_here=_NOT_HERE, cpu_seconds_per_image=0.23,
    note="not reproduced: the Normalize(mean, std) input layer (our resnet18 takes [0, 1] pixels; the filters of "
         "freq-probe still act around the train split's mean colour), torchvision's antialiasing when a crop is "
         "shrunk; the repository of the released DFMs (nis-research/dfmX-augmentation train.py) trains the same "
         "way with batch 64")

_LFF_SOURCE = "Nam et al., NeurIPS 2020 (LfF), vanilla model: alinlab/LfF config.py"
_LFF_REPORTED = "not copied here (LfF reports unbiased test accuracy per conflict ratio in its tables)"
_LFF_CMNIST = Recipe(
    "paper", "colored-mnist", "train", "mlp", model_options={"depth": 4, "width": 100},
    train=_train(epochs=100, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant",
                 augment="none", select="last"),
    source=_LFF_SOURCE + " (colored_mnist: MLP, 235 x 100 steps of batch 256, Adam lr 1e-3, weight decay 0) and "
                         "module/mlp.py (3 hidden layers of 100, ReLU)",
    reported=_LFF_REPORTED, measured_here=_NOT_HERE, cpu_seconds_per_image=5e-5,
    note="LfF counts 235 x 100 steps of an endless sampler; ours 100 epochs")
_LFF_CCIFAR = Recipe(
    "paper", "corrupted-cifar10", "train", "resnet20", model_options={"width": 16},
    train=_train(epochs=200, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant",
                 augment="flip-crop", select="last"),
    source=_LFF_SOURCE + " (corrupted_cifar10: ResNet20, 196 x 200 steps of batch 256, Adam lr 1e-3, weight decay 0), "
                         "data/util.py (RandomCrop(32, padding 4) + flip) and module/resnet.py (He et al.'s ResNet-20, "
                         "option A shortcuts)",
    reported=_LFF_REPORTED, measured_here=_NOT_HERE, cpu_seconds_per_image=0.011,
    note="not reproduced: the crop's zero padding (ours reflects), the Normalize layer; LfF counts 196 x 200 steps "
         "of an endless sampler, ours 200 epochs")

_IMAGENET_RESNET50 = "a torchvision ImageNet ResNet-50 state dict (e.g. resnet50-19c8e357.pth)"
_SAGAWA = dict(
    model="tv:resnet50", model_options={"normalize": "imagenet"}, data_options={"image_size": 224},
    pretrained=_IMAGENET_RESNET50, measured_here=_NOT_HERE, cpu_seconds_per_image=0.8,
    note="model selection is ours (the last epoch); the reported figure's selection rule was not checked")
_SAGAWA_SOURCE = ("Sagawa et al., ICLR 2020 (group DRO), standard ERM: kohpangwei/group_DRO README (ImageNet-"
                  "pretrained torchvision ResNet-50, SGD momentum 0.9, batch 128, {what}), no augmentation, constant "
                  "learning rate")
_SAGAWA_WB = Recipe(
    "paper", "waterbirds", "train", **_SAGAWA,
    train=_train(epochs=300, batch_size=128, optimizer="sgd", lr=1e-3, momentum=0.9, nesterov=False,
                 weight_decay=1e-4, schedule="constant", augment="none", select="last"),
    source=_SAGAWA_SOURCE.format(what="lr 1e-3, weight decay 1e-4, 300 epochs"),
    reported="worst-group test accuracy 72.6 %, average 97.3 % for this ERM setup as tabulated by Liu et al., "
             "ICML 2021 (JTT), Table 1; not re-checked against the paper here")
_SAGAWA_CA = Recipe(
    "paper", "celeba", "train", **_SAGAWA,
    train=_train(epochs=50, batch_size=128, optimizer="sgd", lr=1e-4, momentum=0.9, nesterov=False,
                 weight_decay=1e-4, schedule="constant", augment="none", select="last"),
    source=_SAGAWA_SOURCE.format(what="lr 1e-4, weight decay 1e-4, 50 epochs"),
    reported="worst-group test accuracy 47.2 %, average 95.6 % for this ERM setup as tabulated by Liu et al., "
             "ICML 2021 (JTT), Table 1; not re-checked against the paper here")

_YOU = dict(
    model="tv:resnet50", model_options={"normalize": "imagenet"}, data_options={"image_size": 224},
    pretrained=_IMAGENET_RESNET50, measured_here=_NOT_HERE, cpu_seconds_per_image=0.8,
    reported="not reported (aarentai/Silent-Majority states no ERM accuracy)",
    note="the published script builds resnet50() without weights and runs 101 epochs, against its README; we follow "
         "the README (ImageNet weights, 40 / 20 epochs). Not reproduced: the Softmax the published head ends in "
         "(cross-entropy then sees softmax twice; `mitigate --double-softmax` has it for the mitigation)")
_YOU_SOURCE = ("You et al., 2025 (spurious memorization): aarentai/Silent-Majority README (ImageNet ResNet-50 "
               "fine-tuned by ERM for {epochs} epochs on {data}) and scripts/SpuriousCorrelationPretrainingErm.py "
               "(Adam lr 5e-6, weight decay 0, batch 256, ReduceLROnPlateau(0.5, patience 3) on the training loss, "
               "224 px, utils.get_transform: RandomResizedCrop(0.7-1) + flip)")
_YOU_TRAIN = dict(batch_size=256, optimizer="adam", lr=5e-6, weight_decay=0.0, schedule="plateau", plateau_factor=0.5,
                  plateau_patience=3, plateau_monitor="train_loss", augment="resized-crop-flip", select="last")
_YOU_WB = Recipe("paper", "waterbirds", "memorization", **_YOU, train=_train(epochs=40, **_YOU_TRAIN),
                 source=_YOU_SOURCE.format(epochs=40, data="Waterbirds"))
_YOU_CA = Recipe("paper", "celeba", "memorization", **_YOU, train=_train(epochs=20, **_YOU_TRAIN),
                 source=_YOU_SOURCE.format(epochs=20, data="CelebA"))

_CIFAR_SHARED = ("no paper of this purpose trained on CIFAR-10: this is the CIFAR-10 model of the frequency-shortcut "
                 "paper, shared by every command (one cached model). ")


def _for(recipe: Recipe, purposes, prefix: str = "") -> dict:
    out = {}
    for purpose in purposes:
        note = recipe.note if purpose in ("train", "freq-probe") or not prefix else prefix + recipe.note
        out[(recipe.dataset, purpose)] = dataclasses.replace(recipe, purpose=purpose, note=note)
    return out


PAPER: dict[tuple[str, str], Recipe] = {
    **_for(_WANG, PURPOSES, _CIFAR_SHARED),
    **_for(_LFF_CMNIST, PURPOSES),
    **_for(_LFF_CCIFAR, PURPOSES),
    **_for(_SAGAWA_WB, ("train", "freq-probe", "complexity")),
    **_for(_YOU_WB, ("memorization", "mitigate")),
    **_for(_SAGAWA_CA, ("train", "freq-probe", "complexity")),
    **_for(_YOU_CA, ("memorization", "mitigate")),
}

# The published sizes of the released CIFAR-10 DFMs (nis-research/dfmX-augmentation DFMs/resnet18.pkl) live in
# shortcut_fast.experiments.freq_probe (RELEASED_CIFAR10_DFM_SIZES).


# ---------------------------------------------------------------------------------------
# Choosing and resolving


def _canonical(dataset: str) -> str:
    """The dataset's name as the registry spells it; the path of imagefolder:PATH / csv:FILE as given."""
    name, colon, path = str(dataset).strip().partition(":")
    return name.lower().replace("_", "-") + colon + path


def file_backed(dataset: str) -> bool:
    """The real datasets, read from files under --data-root (the others are generated or ship
    with scikit-learn)."""
    return _canonical(dataset) in FILE_BACKED


def default_name(dataset: str) -> str:
    return "paper" if file_backed(dataset) else "quick"


def recipe_for(dataset: str, purpose: str, name: str | None = None) -> Recipe:
    """The recipe `name` (None: the dataset's default) for training the model of `purpose`
    on `dataset`; `paper` without a paper recipe falls back to `quick`, saying so in its note."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if name is not None and name not in NAMES:
        raise ValueError(f"recipe must be one of {NAMES}, got {name!r}")
    key = _canonical(dataset)
    name = name or default_name(key)
    if name == "paper":
        if (key, purpose) in PAPER:
            return PAPER[(key, purpose)]
        quick = dataclasses.replace(QUICK[purpose], dataset=key)
        return dataclasses.replace(quick, fallback_from="paper",
                                   note=f"{key} has no paper recipe for {purpose}: the quick recipe instead")
    return dataclasses.replace(QUICK[purpose], dataset=key)


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe with the user's explicit options applied (recorded as overrides)."""

    recipe: Recipe
    model: str
    model_options: dict
    train: dict  # TrainConfig keyword arguments (without seed, device, keep_every)
    data_options: dict
    overrides: dict

    @property
    def name(self) -> str:
        return self.recipe.name

    def record(self) -> dict:
        """What result.json keeps: where the recipe comes from, what was overridden, the settings."""
        r = self.recipe
        return {"name": r.name, "dataset": r.dataset, "purpose": r.purpose, "source": r.source,
                "reported": r.reported, "measured_here": r.measured_here, "note": r.note,
                "fallback_from": r.fallback_from, "pretrained": r.pretrained, "overrides": self.overrides,
                "model": self.model, "model_options": self.model_options, "data_options": self.data_options,
                "train": self.train}

    def line(self) -> str:
        """One line for the start of a run."""
        t = self.train
        options = ", ".join(f"{k}={v}" for k, v in self.model_options.items())
        lr = t["lr"] if t["lr"] is not None else ("0.05" if t["optimizer"] == "sgd" else "1e-3")
        schedule = t["schedule"] + (f" (x{t['plateau_factor']} after {t['plateau_patience']} epochs without a lower "
                                    f"{t['plateau_monitor'].replace('_', ' ')})" if t["schedule"] == "plateau" else "")
        text = (f"recipe {self.name} ({self.recipe.dataset}, {self.recipe.purpose}): {self.model}"
                f"{f' ({options})' if options else ''}, {t['epochs']} epoch{'s' if t['epochs'] != 1 else ''}, "
                f"batch {t['batch_size']}, "
                f"{t['optimizer']} lr {lr}, {schedule}, augment {t['augment']}")
        if self.overrides:
            text += "; overridden: " + ", ".join(f"{k}={v}" for k, v in self.overrides.items())
        source = self.recipe.source.split(":")[0] if self.name == "paper" else self.recipe.source
        return text + f". Source: {source}."


def resolve(recipe: Recipe, *, model: str | None = None, model_option: dict | None = None,
            train: dict | None = None) -> ResolvedRecipe:
    """Apply explicit options: `model` (None: the recipe's), `model_option` (-M pairs, on top
    of the recipe's options for its own model, or of default_width for any model with a
    width), `train` (TrainConfig fields given explicitly; None values are ignored).
    Raises ValueError for an unknown model name."""
    overrides = {}
    chosen = model or recipe.model
    if model is not None and model != recipe.model:
        overrides["model"] = model
    names = model_option_names(chosen)  # ValueError for an unknown name
    if chosen == recipe.model and recipe.model_options:
        options = dict(recipe.model_options)
    elif recipe.default_width and names and "width" in names:
        options = {"width": recipe.default_width}
    else:
        options = {}
    for key, value in (model_option or {}).items():
        if options.get(key, object()) != value:
            overrides[f"model_option.{key}"] = value
        options[key] = value
    settings = dict(recipe.train)
    for key, value in (train or {}).items():
        if value is None:
            continue
        if key not in settings and key != "max_steps_per_epoch":
            raise KeyError(f"not a recipe train setting: {key!r}")
        if settings.get(key) != value:
            overrides[key] = value
        settings[key] = value
    settings["warmup_epochs"] = min(settings["warmup_epochs"], settings["epochs"])  # warm-up is capped at the epochs
    if settings["schedule"] == "plateau" and (train or {}).get("warmup_epochs") is None:
        settings["warmup_epochs"] = 0.0  # the plateau scheduler owns the learning rate (no warm-up)
    return ResolvedRecipe(recipe, chosen, options, settings, dict(recipe.data_options), overrides)


def estimate_seconds(resolved: ResolvedRecipe, n_train: int, n_val: int) -> float | None:
    """Rough training time on the project's 2-core CPU: epochs x (train images + a quarter of
    the validation images, evaluated each epoch) x the measured seconds per image. None when
    the model is not the recipe's (no measured figure)."""
    per_image = resolved.recipe.cpu_seconds_per_image
    if per_image is None or resolved.model != resolved.recipe.model:
        return None
    t = resolved.train
    steps = t.get("max_steps_per_epoch")
    images = min(n_train, steps * t["batch_size"]) if steps else n_train
    return t["epochs"] * (images + 0.25 * n_val) * per_image


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

