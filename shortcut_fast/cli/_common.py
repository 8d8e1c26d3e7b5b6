"""What every command shares: the command group, error reporting, option parsing and the
option groups. An option's choices come from the library constant that the config checks
them against (LibraryChoice), never from a literal list here."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from shortcut_fast.pipeline import SettingError

ARGV_KEY = "shortcut_fast.argv"


def message(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def fail(exc: Exception) -> None:
    if isinstance(exc, SettingError):
        raise click.BadParameter(str(exc), param_hint=f"--{exc.setting}") from None
    raise click.ClickException(message(exc)) from exc


@contextlib.contextmanager
def reported():
    """Library errors as one CLI line: a SettingError as a usage error of its option (exit
    status 2), a refusal (ValueError, TypeError, OSError, FloatingPointError) as `Error: ...`
    (exit status 1). SHORTCUT_FAST_DEBUG=1 lets them through with their traceback."""
    try:
        yield
    except SettingError as exc:
        if os.environ.get("SHORTCUT_FAST_DEBUG"):
            raise
        raise click.BadParameter(str(exc), param_hint=f"--{exc.setting}") from None
    except (ValueError, TypeError, OSError, FloatingPointError) as exc:
        if os.environ.get("SHORTCUT_FAST_DEBUG"):
            raise
        raise click.ClickException(message(exc)) from None


class Command(click.Command):
    """A command whose library errors are reported as one line (see reported)."""

    def invoke(self, ctx):
        with reported():
            return super().invoke(ctx)


class Group(click.Group):
    """The command group, remembering the command line it was given (--nproc re-launches it)."""

    command_class = Command

    def parse_args(self, ctx, args):
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)


class SubGroup(click.Group):
    """A group of subcommands (e.g. `cache list`), reporting errors like every command."""

    command_class = Command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="shortcut-fast")
def main():
    """Fast experiments on shortcut learning."""


# ---- option parsing (callbacks turn bad values into usage errors naming the option)

def pairs(values, setting: str) -> dict:
    """-D / -M KEY=VALUE pairs as a dict (usage error naming the option otherwise)."""
    from shortcut_fast.pipeline import parse_pairs

    try:
        return parse_pairs(values, setting)
    except SettingError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{exc.setting}") from None


def int_list(ctx, param, value):
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 0,3, got {value!r}") from None
    if not items:
        raise click.BadParameter(f"expected at least one integer, got {value!r}")
    return items


def name_list(ctx, param, value):
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter(f"expected comma-separated names, got {value!r}")
    return items


def float_list(ctx, param, value):
    if value is None:
        return None
    try:
        items = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not items or any(not a > 0 for a in items):
        raise click.BadParameter(f"expected positive numbers, got {value!r}")
    return items


def _device(ctx, param, value):
    from shortcut_fast.train import resolve_device

    try:
        return resolve_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--device {value!r}: ")) from None


class LibraryChoice(click.Choice):
    """click.Choice over a library constant such as "shortcut_fast.train:OPTIMIZERS", read when
    the option is parsed or its help shown (`shortcut-fast --help` imports no experiment);
    `before`/`after`: values the command adds (e.g. "auto")."""

    def __init__(self, source: str, *, before=(), after=(), case_sensitive: bool = True):
        self.source, self.before, self.after = source, tuple(before), tuple(after)
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple:
        import importlib

        module, name = self.source.split(":")
        return (*self.before, *getattr(importlib.import_module(module), name), *self.after)


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
FRACTION = click.FloatRange(0, 1, min_open=True, max_open=True)
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)

device_option = click.option("--device", default="auto", callback=_device, help="auto, cpu, cuda or cuda:N.")
backend_option = click.option("--backend", type=LibraryChoice("shortcut_fast.backends:BACKENDS"), default="auto",
                              help="Kernel backend of the ops (see `shortcut-fast info`).")
precision_option = click.option(
    "--precision", type=LibraryChoice("shortcut_fast.ops.precision:PRECISION_CHOICES"), default="auto",
    help="Products of the matmul-shaped triton kernels: auto (per op on a GPU, the fastest within its documented "
         "tolerance; ieee elsewhere), ieee (float32), tf32x3, tf32 or bf16 (docs/performance.md#precision).")


def options(*decorators):
    def decorate(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return decorate


backend_and_device = options(backend_option, device_option)


# ---- shared option groups

data_root_option = click.option("--data-root", type=click.Path(path_type=Path), default=None,
                                help="Folder with dataset files (default: $SHORTCUT_FAST_DATA).")
download_option = click.option("--download", is_flag=True, help="Allow downloading a missing dataset (network).")
image_size_option = click.option(
    "--image-size", type=POSITIVE, default=None,
    help="Side the images are resized to (imagefolder:/csv: data and the file-backed datasets; "
         "default: the dataset's).")


def data_options_with(default_data: str):
    """Options of every command that loads a dataset (default dataset per command)."""
    return options(
        click.option("--data", "data", default=default_data, show_default=True,
                     help="Dataset name (see `shortcut-fast datasets`), imagefolder:PATH (your image folder) or "
                          "csv:FILE (your table of path,label[,attribute][,split])."),
        data_root_option,
        download_option,
        image_size_option,
        click.option("--bias-band", type=click.IntRange(1, 4), default=None,
                     help="synthetic-freq: the distinctive band."),
        click.option("--conflict-ratio", type=FRACTION, default=None,
                     help="colored-*: bias-conflicting training fraction, in (0, 1)."),
        click.option("--data-option", "-D", "data_option", multiple=True, metavar="KEY=VALUE",
                     help="Any other dataset option, e.g. -D num_classes=6."),
        click.option("--seed", type=int, default=0, help="Seeds data generation, initialization and order."),
    )


data_options = data_options_with("synthetic-freq")


def run_options(default_out: str, resume_help: str | None = "Continue the run in --out (same settings only)."):
    """--out/--resume/--overwrite/--quiet: the run folder of every command that writes results."""
    decorators = [
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(default_out),
                     help="Output folder (its run.json records the settings)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace the run already in --out (its files are deleted first)."),
        click.option("--quiet", is_flag=True,
                     help="No progress output (bars on a terminal, a line per step in logs)."),
    ]
    if resume_help:
        decorators.insert(1, click.option("--resume", is_flag=True, help=resume_help))
    return options(*decorators)


def _quick_help(purpose: str) -> tuple[str, str, str]:
    """(model, -M, epochs) help texts naming the quick recipe's defaults."""
    from shortcut_fast.recipes import QUICK

    q = QUICK[purpose]
    width = f" (quick recipe: width={q.default_width} where the model has a width)" if q.default_width else ""
    return (f"Architecture to train (default: the recipe's; quick: {q.model}).", f"Model option, e.g. -M width=32{width}.",
            f"default: the recipe's; quick: {q.train['epochs']}")


def recipe_options(purpose: str):
    """--recipe and --no-cache of every command that trains one model."""
    return options(
        click.option("--recipe", type=LibraryChoice("shortcut_fast.recipes:NAMES"), default=None,
                     help=f"Training recipe of the {purpose} model: paper (what the dataset's paper trained) or "
                          "quick (CPU minutes). Default: paper on the real, file-backed datasets, quick on the "
                          "embedded ones. Explicit training options override it."),
        click.option("--no-cache", is_flag=True,
                     help="Neither reuse a cached model nor store the one trained here (see `shortcut-fast cache`)."),
    )


pretrained_option = click.option(
    "--pretrained", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="Local weights file the trained model starts from (the paper recipes of waterbirds and celeba need a "
         "torchvision ImageNet ResNet-50).")


def weights_option(what: str):
    return click.option(
        "--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help=f"Your own weights of --model (a state_dict, or a checkpoint dict holding one): {what}. Loaded "
             "with weights_only, every key and shape must fit; its digest is part of the run's fingerprint.")


checkpoint_option = click.option(
    "--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="A checkpoint written by `shortcut-fast train` (skips training).")


def model_options(purpose: str, epochs_help: str = "Training epochs"):
    """--model/-M/--checkpoint/--weights/--epochs/--pretrained/--recipe/--no-cache of the
    analysis commands (train a model by a recipe, or load one)."""
    model_help, option_help, epochs_default = _quick_help(purpose)
    return options(
        click.option("--model", default=None,
                     help=model_help.replace("train", "train when no --checkpoint or --weights is given")),
        click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE", help=option_help),
        checkpoint_option,
        weights_option("the model analysed as it is (skips training)"),
        click.option("--epochs", type=POSITIVE, default=None,
                     help=f"{epochs_help} when the model is trained here ({epochs_default})."),
        pretrained_option,
        recipe_options(purpose),
    )


def num_or_nan(v) -> float:
    return float("nan") if v is None else float(v)


def eval_rows(final: dict) -> list[list]:
    return [[name, r.n, r.accuracy, r.loss, num_or_nan(r.worst_group_accuracy), num_or_nan(r.aligned_accuracy),
             num_or_nan(r.conflicting_accuracy)] for name, r in final.items()]


EVAL_HEADERS = ["split", "n", "accuracy", "loss", "worst-group", "aligned", "conflicting"]


def model_name(params: dict, resolved) -> str:
    """What result.json calls the analysed model: the checkpoint file, or the architecture
    (trained here or loaded from --weights, whose digest run.json holds)."""
    return str(params["checkpoint"]) if params.get("checkpoint") else resolved.model
