"""The `shortcut-fast` command line: thin shells over the library.

Each command parses options, calls one library function, writes `<out>/result.json`
(and figures), and prints a short table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _parse_options(pairs: tuple[str, ...], what: str) -> dict:
    """KEY=VALUE pairs -> dict, values parsed as JSON where possible (ints, floats, bools)."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=what)
        key, value = pair.split("=", 1)
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return options


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="shortcut-fast")
def main():
    """Fast experiments on shortcut learning."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def info(as_json):
    """Versions, devices, and which backends are usable here (and why not)."""
    from shortcut_fast.backends import info as backend_info

    data = backend_info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"shortcut-fast {data['shortcut_fast']}  torch {data['torch']} (CUDA {data['torch_cuda']})  "
               f"triton {data['triton']}")
    click.echo(f"GPUs: {', '.join(data['gpus']) or 'none'}")
    click.echo(f"compiled extension: {data['extension']}"
               + (f" (CUDA kernels: {'yes' if data['extension_cuda'] else 'no'}, "
                  f"OpenMP threads: {data.get('extension_openmp_threads')})" if data["extension"] == "loaded" else ""))
    for device, backends in data["backends"].items():
        click.echo(f"\nbackends on {device}:")
        for name, status in backends.items():
            mark = "yes" if status["usable"] else "no "
            click.echo(f"  {name:<7} {mark}  {status['reason']}")


@main.command("datasets")
def list_datasets_cmd():
    """List the dataset names usable as --data."""
    from shortcut_fast.data import list_datasets

    for name, doc in list_datasets().items():
        click.echo(f"{name:<16} {doc}")


@main.command("models")
def list_models_cmd():
    """List the model names usable as --model."""
    from shortcut_fast.models import list_models

    for name, doc in list_models().items():
        click.echo(f"{name:<16} {doc}")


# Options shared by every command that loads a dataset.
def data_options(f):
    decorators = [
        click.option("--data", "data", default="synthetic-freq", help="Dataset name (see `shortcut-fast datasets`)."),
        click.option("--data-root", type=click.Path(path_type=Path), default=None,
                     help="Folder with dataset files (default: $SHORTCUT_FAST_DATA)."),
        click.option("--download", is_flag=True, help="Allow downloading a missing dataset (network)."),
        click.option("--bias-band", type=click.IntRange(1, 4), default=None, help="synthetic-freq: the distinctive band."),
        click.option("--conflict-ratio", type=float, default=None, help="colored-*: bias-conflicting training fraction."),
        click.option("--data-option", "-D", "data_option", multiple=True, metavar="KEY=VALUE",
                     help="Any other dataset option, e.g. -D num_classes=6."),
        click.option("--seed", type=int, default=0, help="Seeds data generation, initialization and order."),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed):
    from shortcut_fast.data import load_dataset

    options = _parse_options(data_option, "--data-option")
    if bias_band is not None:
        options["bias_band"] = bias_band
    if conflict_ratio is not None:
        options["conflict_ratio"] = conflict_ratio
    try:
        return load_dataset(data, root=data_root, download=download, seed=seed, **options)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        _fail(exc)


def _build_model(model, splits, model_option, pretrained=None):
    from shortcut_fast.models import build_model

    options = _parse_options(model_option, "--model-option")
    channels, size = splits.image_shape[0], splits.image_shape[-1]
    try:
        return build_model(model, num_classes=splits.num_classes, in_channels=channels, image_size=size,
                           pretrained=pretrained, **options)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
        _fail(exc)


def _eval_rows(final: dict) -> list[list]:
    rows = []
    for name, r in final.items():
        rows.append([name, r.n, r.accuracy, r.loss,
                     float("nan") if r.worst_group_accuracy is None else r.worst_group_accuracy,
                     float("nan") if r.aligned_accuracy is None else r.aligned_accuracy,
                     float("nan") if r.conflicting_accuracy is None else r.conflicting_accuracy])
    return rows


EVAL_HEADERS = ["split", "n", "accuracy", "loss", "worst-group", "aligned", "conflicting"]


@main.command()
@data_options
@click.option("--model", default="resnet18", help="Model name (see `shortcut-fast models`), or timm:NAME.")
@click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE", help="Model option, e.g. -M width=32.")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local weights file to start from.")
@click.option("--epochs", type=int, default=10)
@click.option("--batch-size", type=int, default=128)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd")
@click.option("--lr", type=float, default=None, help="Default: 0.05 (SGD), 1e-3 (Adam).")
@click.option("--weight-decay", type=float, default=5e-4)
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine")
@click.option("--augment", type=click.Choice(["none", "flip-crop", "crop"]), default="none")
@click.option("--select", type=click.Choice(["accuracy", "worst_group_accuracy", "last"]), default="accuracy",
              help="Validation metric that picks the reported checkpoint.")
@click.option("--keep-every", type=int, default=0, help="Also keep epoch_XXX.pt every k epochs.")
@click.option("--max-steps-per-epoch", type=int, default=None)
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/train"), help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue from <out>/last.pt.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(data, data_root, download, bias_band, conflict_ratio, data_option, seed, model, model_option, pretrained,
          epochs, batch_size, optimizer, lr, weight_decay, schedule, augment, select, keep_every,
          max_steps_per_epoch, device, out, resume, quiet):
    """Train a model on a dataset; writes checkpoints, history.json and result.json to --out."""
    from shortcut_fast.report import format_table, plot_curves, write_json
    from shortcut_fast.train import TrainConfig
    from shortcut_fast.train import train as run_training

    splits = _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed)
    net = _build_model(model, splits, model_option, pretrained)
    try:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                          weight_decay=weight_decay, schedule=schedule, augment=augment, seed=seed, device=device,
                          select=select, keep_every=keep_every, max_steps_per_epoch=max_steps_per_epoch)
        result = run_training(net, splits, cfg, out_dir=out, resume=resume, progress=not quiet)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        _fail(exc)
    record = {"command": "train", "data": data, "dataset_meta": splits.meta, "model": model,
              "model_options": _parse_options(model_option, "--model-option"), "result": result}
    write_json(record, out / "result.json")
    plot_curves({"val accuracy": [h["val_accuracy"] for h in result.history]}, out / "val_accuracy.png",
                xlabel="epoch", ylabel="accuracy", title=f"{model} on {data}")
    click.echo(f"\n{model} on {data}: {result.epochs_run} epochs in {result.seconds:.1f} s, "
               f"best epoch {result.best_epoch} (by val {select})")
    click.echo(format_table(_eval_rows(result.final), EVAL_HEADERS))
    click.echo(f"\nwrote {out / 'result.json'}")


@main.command()
@data_options
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train")
@click.option("--batch-size", type=int, default=256)
@click.option("--backend", type=click.Choice(["auto", "torch", "cpp", "cuda", "triton"]), default="auto")
@click.option("--device", default="auto")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/spectrum"))
def spectrum(data, data_root, download, bias_band, conflict_ratio, data_option, seed, split, batch_size, backend,
             device, out):
    """Class-wise amplitude spectra and ADCS maps of a dataset (one streaming pass)."""
    import torch

    from shortcut_fast.ops import ClassSpectrum, adcs
    from shortcut_fast.ops.freq import shifted
    from shortcut_fast.report import format_table, plot_maps, write_json
    from shortcut_fast.train import _Batches, resolve_device

    splits = _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed)
    dataset = getattr(splits, split)
    dev = resolve_device(device)
    acc = ClassSpectrum(splits.num_classes, backend=backend)
    from tqdm.auto import tqdm

    batches = _Batches(dataset, batch_size, dev)
    for x, y, _ in tqdm(batches.iterate(), total=len(batches), desc="spectrum", leave=False):
        acc.update(x, y)
    means = acc.mean()
    scores = adcs(means.nan_to_num(0.0))
    log_energy = torch.log1p(means.mean(1)).cpu()
    names = [f"class {c}" for c in range(splits.num_classes)]
    plot_maps([shifted(m) for m in log_energy], names, out / "class_spectra.png",
              suptitle=f"log(1 + mean |FFT|), {data} {split} (centred)", colorbar_label="log energy")
    plot_maps([shifted(s.float()) for s in scores.cpu()], names, out / "adcs.png",
              suptitle=f"ADCS, {data} {split} (centred)", cmap="RdBu_r", symmetric=True)
    write_json({"command": "spectrum", "data": data, "split": split, "dataset_meta": splits.meta,
                "counts": acc.counts, "adcs": scores, "mean_log_energy": log_energy}, out / "result.json")
    k = splits.num_classes
    rows = [[c, int(acc.counts[c]), int((scores[c] == k - 1).sum()), int((scores[c] == 1 - k).sum())]
            for c in range(k)]
    click.echo(format_table(rows, ["class", "images", f"freqs ADCS={k - 1}", f"freqs ADCS={1 - k}"]))
    click.echo(f"\nwrote {out / 'result.json'}, {out / 'adcs.png'}, {out / 'class_spectra.png'}")


@main.command()
@click.argument("name", required=False)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--quick", is_flag=True, help="Small sizes (a smoke run, not a measurement).")
def bench(name, device, quick):
    """Run the throughput benchmarks (all, or NAME); results go to bench/results/."""
    from shortcut_fast.bench import BENCHMARKS, run_benchmarks

    if name is not None and name not in BENCHMARKS:
        _fail(ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}"))
    run_benchmarks([name] if name else list(BENCHMARKS), device=device, quick=quick, echo=click.echo)


if __name__ == "__main__":
    sys.exit(main())
