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


# Options shared by every command that loads a dataset; `data_options` itself, or
# `data_options_with("colored-digits")` for commands that need a dataset with groups.
def data_options_with(default_data: str):
    def decorate(f):
        decorators = [
            click.option("--data", "data", default=default_data, show_default=True,
                         help="Dataset name (see `shortcut-fast datasets`)."),
            click.option("--data-root", type=click.Path(path_type=Path), default=None,
                         help="Folder with dataset files (default: $SHORTCUT_FAST_DATA)."),
            click.option("--download", is_flag=True, help="Allow downloading a missing dataset (network)."),
            click.option("--bias-band", type=click.IntRange(1, 4), default=None,
                         help="synthetic-freq: the distinctive band."),
            click.option("--conflict-ratio", type=float, default=None,
                         help="colored-*: bias-conflicting training fraction."),
            click.option("--data-option", "-D", "data_option", multiple=True, metavar="KEY=VALUE",
                         help="Any other dataset option, e.g. -D num_classes=6."),
            click.option("--seed", type=int, default=0, help="Seeds data generation, initialization and order."),
        ]
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return decorate


data_options = data_options_with("synthetic-freq")


def model_options(model: str, width: int, epochs: int, epochs_help: str = "Training epochs"):
    """--model/-M/--checkpoint/--epochs of the analysis commands (train a small model, or load one)."""
    def decorate(f):
        decorators = [
            click.option("--model", default=model, show_default=True,
                         help="Architecture to train when no --checkpoint is given."),
            click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE", default=(f"width={width}",),
                         show_default=True, help=f"Model option (default width={width}: minutes on a CPU)."),
            click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
                         help="A checkpoint written by `shortcut-fast train` (skips training)."),
            click.option("--epochs", type=int, default=epochs, show_default=True,
                         help=f"{epochs_help} when no --checkpoint is given."),
        ]
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return decorate


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


def _build_model(model, splits, model_option, seed, pretrained=None):
    from shortcut_fast.models import build_model
    from shortcut_fast.train import seed_everything

    seed_everything(seed)  # --seed controls the initialization too
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
@click.option("--warmup-epochs", type=float, default=1.0, help="Linear learning-rate warm-up (capped at --epochs).")
@click.option("--augment", type=click.Choice(["none", "flip-crop", "crop"]), default="none")
@click.option("--select", type=click.Choice(["accuracy", "worst_group_accuracy", "last"]), default="accuracy",
              help="Validation metric that picks the reported checkpoint.")
@click.option("--keep-every", type=int, default=0, help="Also keep epoch_NNN.pt every k epochs.")
@click.option("--max-steps-per-epoch", type=int, default=None)
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/train"), help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue from <out>/last.pt.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(data, data_root, download, bias_band, conflict_ratio, data_option, seed, model, model_option, pretrained,
          epochs, batch_size, optimizer, lr, weight_decay, schedule, warmup_epochs, augment, select, keep_every,
          max_steps_per_epoch, device, out, resume, quiet):
    """Train a model on a dataset; writes checkpoints, history.json and result.json to --out."""
    from shortcut_fast.report import format_table, plot_curves, write_json
    from shortcut_fast.train import TrainConfig
    from shortcut_fast.train import train as run_training

    splits = _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed)
    net = _build_model(model, splits, model_option, seed, pretrained)
    try:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                          weight_decay=weight_decay, schedule=schedule, warmup_epochs=min(warmup_epochs, epochs),
                          augment=augment, seed=seed, device=device,
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
    from shortcut_fast.train import Batches, resolve_device

    splits = _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed)
    dataset = getattr(splits, split)
    dev = resolve_device(device)
    acc = ClassSpectrum(splits.num_classes, backend=backend)
    from tqdm.auto import tqdm

    batches = Batches(dataset, batch_size, dev)
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


@main.command("freq-probe")
@data_options
@model_options("resnet18", width=16, epochs=4)
@click.option("--method", type=click.Choice(["loss", "greedy", "gradient"]), default="loss")
@click.option("--patch", type=int, default=2, help="Patch size p of the shifted spectrum (1: single pairs).")
@click.option("--top-percent", type=float, default=5.0, help="DFM size in % of all frequencies.")
@click.option("--tolerance", type=int, default=6, help="greedy: correct-count drop allowed per removal.")
@click.option("--classes", default=None, help="Comma-separated classes (default all).")
@click.option("--no-dfm", is_flag=True, help="Skip the DFM search (ADCS, band-stop and learning order only).")
@click.option("--max-images-per-class", type=int, default=100, help="Class images used in the DFM search.")
@click.option("--verify-gradient", is_flag=True, help="gradient: also run the exact search and report agreement.")
@click.option("--ood", "ood", multiple=True, metavar="NAME[:SEVERITY]",
              help="Corrupted test set for OOD transfer, e.g. --ood gaussian-noise:3 (repeatable).")
@click.option("--track-every", type=int, default=5, help="Steps between band learning snapshots (0: off).")
@click.option("--track-until", type=int, default=100, help="Last training step with a band learning snapshot.")
@click.option("--batch-size", type=int, default=None, help="Model batch size for the search "
              "(default 128 on the CPU, 1024 on a GPU).")
@click.option("--backend", type=click.Choice(["auto", "torch", "cpp", "cuda", "triton"]), default="auto")
@click.option("--device", default="auto")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/freq-probe"))
@click.option("--resume", is_flag=True, help="Reuse the trained model and finished classes in --out.")
@click.option("--quiet", is_flag=True)
def freq_probe(data, data_root, download, bias_band, conflict_ratio, data_option, seed, model, model_option,
               checkpoint, epochs, method, patch, top_percent, tolerance, classes, no_dfm, max_images_per_class,
               verify_gradient, ood, track_every, track_until, batch_size, backend, device, out, resume, quiet):
    """Frequency shortcuts: ADCS, dominant frequency maps, TPR/FPR, band-stop, OOD transfer."""
    import torch

    from shortcut_fast.data.corruptions import corrupted_dataset
    from shortcut_fast.experiments import freq_probe as fp
    from shortcut_fast.models import model_from_checkpoint
    from shortcut_fast.report import write_json
    from shortcut_fast.train import TrainConfig, resolve_device
    from shortcut_fast.train import train as run_training

    splits = _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed)
    dev = resolve_device(device)
    has_bands = splits.meta.get("band_edges") is not None
    learning = None
    try:
        cfg = fp.FreqProbeConfig(
            method=method, patch=patch, top_percent=top_percent, tolerance=tolerance,
            classes=[] if no_dfm else ([int(c) for c in classes.split(",")] if classes else None),
            max_images_per_class=max_images_per_class, verify_gradient=verify_gradient,
            batch_size=batch_size, backend=backend, amp=dev.type == "cuda", seed=seed)
        ood_sets = {spec: corrupted_dataset(splits.test, spec, seed=seed) for spec in ood}
        if checkpoint:
            net = model_from_checkpoint(checkpoint)
        else:
            net = _build_model(model, splits, model_option, seed)
            model_dir = out / "model"
            tracker = None
            if has_bands and track_every > 0:
                n_eval = min(len(splits.val), 200)
                x_val, y_val, _ = splits.val.get_batch(torch.arange(n_eval, device=splits.val.labels.device))
                tracker = fp.BandLearningTracker(x_val.to(dev), y_val.to(dev), splits.num_classes, track_every,
                                                 until=track_until, batch_size=cfg.resolved(dev).batch_size,
                                                 backend=backend)
            if resume and (model_dir / "last.pt").exists() and (out / "learning.json").exists():
                from shortcut_fast.report import read_json
                from shortcut_fast.train import load_checkpoint

                load_checkpoint(model_dir / "best.pt", net)
                learning = read_json(out / "learning.json")
            else:
                result = run_training(net, splits, TrainConfig(epochs=epochs, seed=seed, device=str(dev)),
                                      out_dir=model_dir, progress=not quiet,
                                      on_step_end=tracker)
                learning = tracker.summary() if tracker else {}
                learning["train"] = {"epochs": result.epochs_run, "test_accuracy": result.final["test"].accuracy}
                write_json(learning, out / "learning.json")
        result = fp.run_freq_probe(net, splits, cfg, out_dir=out, resume=resume, device=dev, ood_sets=ood_sets,
                                   band_table=has_bands, progress=not quiet)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    result.learning = learning or None
    record = {"command": "freq-probe", "data": data, "dataset_meta": splits.meta, "model": checkpoint or model,
              "result": result}
    write_json(record, out / "result.json")
    _freq_probe_figures(result, out)
    _freq_probe_summary(result, data, out)


def _freq_probe_figures(result, out: Path) -> None:
    import torch

    from shortcut_fast.ops.freq import shifted
    from shortcut_fast.report import plot_bars, plot_curves, plot_heatmap, plot_maps

    H, W = result.image_shape[-2:]
    names = [f"class {e.label}" for e in result.classes]
    scores = torch.tensor(result.adcs)
    plot_maps([shifted(s.float()) for s in scores], [f"class {c}" for c in range(result.num_classes)],
              out / "adcs.png", suptitle="ADCS (centred spectrum)", cmap="RdBu_r", symmetric=True)
    dfms = []
    for e in result.classes:
        m = torch.zeros(H, W)
        if e.dfm:
            idx = torch.tensor(e.dfm)
            m[idx[:, 0], idx[:, 1]] = 1
        dfms.append(shifted(m))
    if dfms:
        plot_maps(dfms, names, out / "dfm.png", suptitle=f"DFMs ({result.config['method']}, centred)",
                  cmap="gray_r")
    labels = [str(row["class"]) for row in result.shortcut]
    if labels:
        plot_bars({"TPR": [r["tpr"] for r in result.shortcut], "FPR": [r["fpr"] for r in result.shortcut]},
                  labels, out / "tpr_fpr.png", ylabel="rate", title="DFM-filtered test set", ylim=(0, 1))
    if result.band_stop:
        plot_heatmap(result.band_stop["delta"], [f"class {c}" for c in range(result.num_classes)],
                     [f"B{b + 1}" for b in range(len(result.band_stop["delta"][0]))], out / "band_stop.png",
                     title="band-stop: change in correct predictions (%)", colorbar_label="Delta %")
    if result.learning and result.learning.get("steps"):
        acc = result.learning["band_pass_accuracy"]
        curves = {f"B{b + 1} only": [a[b] for a in acc] for b in range(len(acc[0]))}
        curves["clean"] = result.learning["clean_accuracy"]
        plot_curves(curves, out / "learning_order.png", x=result.learning["steps"], xlabel="training step",
                    ylabel="val accuracy", title="what the model can read from each band")


def _freq_probe_summary(result, data: str, out: Path) -> None:
    from shortcut_fast.report import format_table

    click.echo(f"\nfreq-probe on {data}: test accuracy {result.test_accuracy:.4f}, method {result.config['method']}, "
               f"{result.seconds:.1f} s")
    if result.shortcut:
        rows = [[r["class"], r["dfm_size"], r["tpr"], r["fpr"]] for r in result.shortcut]
        click.echo(format_table(rows, ["class", "DFM size", "TPR", "FPR"]))
    if result.band_stop:
        n_bands = len(result.band_stop["delta"][0])
        click.echo("\nband-stop Delta (% of class images, change in correct predictions):")
        rows = [[c] + row for c, row in enumerate(result.band_stop["delta"])]
        rows.append(["acc"] + [a * 100 for a in result.band_stop["accuracy_band_stopped"]])
        click.echo(format_table(rows, ["class"] + [f"stop B{b + 1}" for b in range(n_bands)]))
    if result.learning and result.learning.get("learned_first_band"):
        click.echo(f"\nlearned first: B{result.learning['learned_first_band']} "
                   f"(band-pass accuracy leads at step {result.learning['first_step_above_threshold']})")
    for name, rows in (result.ood or {}).items():
        click.echo(f"\nOOD {name}:")
        click.echo(format_table([[r["class"], r["tpr"], r["fpr"]] for r in rows], ["class", "TPR", "FPR"]))
    click.echo(f"\nwrote {out / 'result.json'} and figures in {out}")


# ---- complexity command (owner: experiments/complexity.py) ----

@main.command()
@data_options_with("colored-digits")
@model_options("resnet20", width=8, epochs=6)
@click.option("--layers", default=None, help="Comma-separated block names (default: every block of the model).")
@click.option("--directions", default="nmf:64", help="Features: nmf:K, pca:K or a directions file.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of epoch_NNN.pt (train --keep-every 1) for the training dynamics.")
@click.option("--dynamics", is_flag=True, help="When training here, also analyse every epoch's checkpoint.")
@click.option("--max-images", type=int, default=2000, help="Probe-train images (from the train split).")
@click.option("--max-heldout", type=int, default=1000, help="Held-out images.")
@click.option("--heldout-split", type=click.Choice(["val", "test"]), default="val")
@click.option("--alphas", default=None, help="Comma-separated ridge alphas (default: a grid scaled to each layer).")
@click.option("--batch-size", type=int, default=256, help="Images per forward chunk.")
@click.option("--backend", type=click.Choice(["auto", "torch", "cpp", "cuda", "triton"]), default="auto")
@click.option("--device", default="auto")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/complexity"))
@click.option("--resume", is_flag=True, help="Reuse the trained model and finished work in --out.")
@click.option("--quiet", is_flag=True)
def complexity(data, data_root, download, bias_band, conflict_ratio, data_option, seed, model, model_option,
               checkpoint, epochs, layers, directions, checkpoints, dynamics, max_images, max_heldout,
               heldout_split, alphas, batch_size, backend, device, out, resume, quiet):
    """Feature complexity by V-information: per-layer decodability, importance, dynamics."""
    from shortcut_fast.experiments import complexity as cx
    from shortcut_fast.models import model_from_checkpoint
    from shortcut_fast.report import write_json
    from shortcut_fast.train import TrainConfig, resolve_device
    from shortcut_fast.train import train as run_training

    splits = _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed)
    trained = None
    try:
        dev = resolve_device(device)
        alpha_list = [float(a) for a in alphas.split(",")] if alphas else None
        cfg = cx.ComplexityConfig(
            layers=[n.strip() for n in layers.split(",") if n.strip()] if layers else None, directions=directions,
            max_images=max_images, max_heldout=max_heldout, heldout_split=heldout_split, alphas=alpha_list,
            batch_size=batch_size, backend=backend, seed=seed)
        if checkpoint:
            net = model_from_checkpoint(checkpoint)
        else:
            net = _build_model(model, splits, model_option, seed)
            model_dir = out / "model"
            # select="last": the analysed model is the end of training, the reference of the dynamics.
            # Every epoch is kept (small files) so that a later --resume --dynamics can use them.
            tcfg = TrainConfig(epochs=epochs, seed=seed, device=str(dev), select="last",
                               warmup_epochs=min(1.0, epochs), keep_every=1)
            again = resume and (model_dir / "last.pt").exists()
            result = run_training(net, splits, tcfg, out_dir=model_dir, resume=again, progress=not quiet)
            trained = {"epochs": result.epochs_run, "test_accuracy": result.final["test"].accuracy,
                       "model_dir": str(model_dir)}
            if dynamics and checkpoints is None:
                checkpoints = model_dir
        result = cx.run_complexity(net, splits, cfg, out_dir=out, checkpoints=checkpoints, resume=resume,
                                   device=dev, progress=not quiet)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        _fail(exc)
    record = {"command": "complexity", "data": data, "dataset_meta": splits.meta, "model": checkpoint or model,
              "model_options": None if checkpoint else _parse_options(model_option, "--model-option"),
              "trained": trained, "result": result}
    write_json(record, out / "result.json")
    _complexity_summary(result, data, out)


def _complexity_summary(result, data: str, out: Path, top: int = 5) -> None:
    from shortcut_fast.report import format_table

    k = len(result.complexity)
    click.echo(f"\ncomplexity on {data}: {k} features ({result.directions['kind']}, from a "
               f"{result.directions['dim']}-d penultimate layer), {result.n_train} probe-train / "
               f"{result.n_heldout} held-out images, held-out accuracy {result.heldout_accuracy:.4f}, "
               f"{result.seconds:.1f} s")
    rows = [[name, dim, result.decodability[name]] for name, dim in zip(result.layers, result.layer_dims)]
    click.echo(format_table(rows, ["layer", "dim", "mean V-information"]))
    order = sorted((i for i in range(k) if result.complexity[i] == result.complexity[i]),
                   key=lambda i: result.complexity[i])  # dead features (NaN) left out
    pick = order[:top] + [i for i in order[-top:] if i not in order[:top]]
    rows = [[i, result.complexity[i], result.importance[i], result.importance_signed[i],
             result.v_information[i][0], result.v_information[i][-1]] for i in pick]
    click.echo(f"\nleast and most complex features (of {k}):")
    click.echo(format_table(rows, ["feature", "complexity", "importance", "signed", "V-info first", "V-info last"]))
    mean_c = sum(result.complexity[i] for i in order) / max(len(order), 1)
    dead = f" ({result.dead_features} dead features left out)" if result.dead_features else ""
    click.echo(f"\nmean complexity {mean_c:.4f}{dead}; most important {100 * result.config['top_fraction']:.0f}%: "
               f"{result.mean_complexity_top_importance:.4f}, rest {result.mean_complexity_rest:.4f}; "
               f"Spearman(importance, complexity) {result.spearman_importance_complexity:.4f}")
    d = result.dynamics
    if d:
        rows = [[e, acc, frac, mc, top_c, rho] for e, acc, frac, mc, top_c, rho in zip(
            d["epochs"], d["heldout_accuracy"], d["fraction_decodable"], d["mean_complexity"],
            d["mean_complexity_top_importance"], d["spearman_importance_complexity"])]
        click.echo("\ndynamics (final features decodable; the checkpoint's own features):")
        click.echo(format_table(rows, ["epoch", "held-out acc", "final decodable", "mean complexity",
                                       "top-importance complexity", "Spearman(imp, cx)"]))
    click.echo(f"\nwrote {out / 'result.json'}, {out / 'features.csv'} and figures in {out}")

# ---- memorization and mitigate commands (owner: experiments/memorization.py) ----

def _erm_model(model, model_option, checkpoint, splits, seed, epochs, device, model_dir: Path, resume, quiet,
               keep_every=0):
    """The model to analyse: --checkpoint, or one trained here by plain ERM (kept in model_dir, resumable)."""
    from shortcut_fast.models import model_from_checkpoint
    from shortcut_fast.train import TrainConfig, load_checkpoint
    from shortcut_fast.train import train as run_training

    if checkpoint:
        return model_from_checkpoint(checkpoint)
    net = _build_model(model, splits, model_option, seed)
    cfg = TrainConfig(epochs=epochs, seed=seed, device=device, select="last", keep_every=keep_every)
    last = model_dir / "last.pt"
    if resume and last.exists() and load_checkpoint(last).get("epoch", -1) + 1 >= epochs:
        load_checkpoint(last, net)  # trained already
        return net
    # select="last": memorization is about the model at the end of training, not an early-stopped one.
    run_training(net, splits, cfg, out_dir=model_dir, resume=resume and last.exists(), progress=not quiet)
    return net


@main.command()
@data_options_with("colored-digits")
@model_options("small-cnn", width=16, epochs=15, epochs_help="ERM training epochs")
@click.option("--layers", default=None, help="Comma-separated layer names (default: up to 4 blocks of the model).")
@click.option("--mode", type=click.Choice(["zero", "mean", "noise", "rewind"]), default="zero",
              help="What replaces an ablated channel.")
@click.option("--where", type=click.Choice(["output", "pre-bn", "post-activation"]), default="output",
              help="Which activation of the layer is modified.")
@click.option("--repeats", type=int, default=1, help="noise: draws averaged per channel.")
@click.option("--rewind-to", type=click.Path(exists=True, dir_okay=False), default=None,
              help="rewind: the earlier checkpoint (default: epoch 1 of the model trained here).")
@click.option("--top-k", type=int, default=5, help="Top channels reported; largest cumulative set.")
@click.option("--grouping", type=click.Choice(["auto", "group", "alignment"]), default="auto",
              help="Dataset groups, or aligned/conflicting (auto: groups when there are <= 16).")
@click.option("--max-samples", type=int, default=None, help="Samples per split in the sweep (default all).")
@click.option("--batch-size", type=int, default=256)
@click.option("--backend", type=click.Choice(["auto", "torch", "cpp", "cuda", "triton"]), default="auto")
@click.option("--device", default="auto")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/memorization"))
@click.option("--resume", is_flag=True, help="Reuse the trained model and finished layers in --out.")
@click.option("--quiet", is_flag=True)
def memorization(data, data_root, download, bias_band, conflict_ratio, data_option, seed, model, model_option,
                 checkpoint, epochs, layers, mode, where, repeats, rewind_to, top_k, grouping, max_samples,
                 batch_size, backend, device, out, resume, quiet):
    """Spurious memorization: per-group gap, channel ablation sweep, critical channels."""
    from shortcut_fast.experiments import memorization as mem
    from shortcut_fast.report import format_table, write_csv, write_json
    from shortcut_fast.train import resolve_device

    splits = _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed)
    try:
        dev = resolve_device(device)
        cfg = mem.MemorizationConfig(layers=[s.strip() for s in layers.split(",")] if layers else None, mode=mode,
                                     where=where, repeats=repeats, top_k=top_k, grouping=grouping,
                                     max_samples=max_samples, batch_size=batch_size, backend=backend, seed=seed)
        model_dir = out / "model"
        keep = 1 if mode == "rewind" and not rewind_to and not checkpoint else 0
        net = _erm_model(model, model_option, checkpoint, splits, seed, epochs, str(dev), model_dir, resume, quiet,
                         keep_every=keep)
        if mode == "rewind" and not rewind_to:
            if checkpoint:
                raise ValueError("--mode rewind with --checkpoint needs --rewind-to (the earlier checkpoint)")
            rewind_to = model_dir / "epoch_001.pt"
        result = mem.run_memorization(net, splits, cfg, out_dir=out, device=dev, progress=not quiet, resume=resume,
                                      rewind_to=rewind_to)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    write_json({"command": "memorization", "data": data, "dataset_meta": splits.meta, "model": checkpoint or model,
                "result": result}, out / "result.json")
    write_csv(mem.top_channel_rows(result), out / "top_channels.csv")
    mem.plot_memorization(result, out)
    g = result.grouping
    click.echo(f"\nmemorization on {data} ({g['kind']} groups; minority: {', '.join(g['minority'])}), "
               f"{result.seconds:.1f} s")
    rows = [[name, _num_or_nan(result.baseline["train"]["group_accuracy"].get(name)),
             _num_or_nan(result.baseline["test"]["group_accuracy"].get(name)), _num_or_nan(gap),
             g["train_counts"][g["names"].index(name)]] for name, gap in result.memorization_gap.items()]
    click.echo(format_table(rows, ["group", "train acc", "test acc", "gap", "train n"]))
    rows, headers = mem.memorization_table(result)
    click.echo(f"\ntop channels ({mode}, {where}; score = minority drop - majority drop on train):")
    click.echo(format_table(rows, headers))
    click.echo(f"\nwrote {out / 'result.json'} and figures in {out}")


def _num_or_nan(v) -> float:
    return float("nan") if v is None else float(v)


@main.command()
@data_options_with("colored-digits")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The ERM checkpoint to start from (default: train one here with --model).")
@click.option("--model", default="small-cnn", help="Architecture of the ERM model trained when no --checkpoint.")
@click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE", default=("width=16",))
@click.option("--erm-epochs", type=int, default=15, help="ERM training epochs when no --checkpoint is given.")
@click.option("--epochs", type=int, default=20, help="Mitigation epochs.")
@click.option("--prune-fraction", type=float, default=0.01, help="Fraction of weights masked (global magnitude).")
@click.option("--tau", type=float, default=0.5, help="NT-Xent temperature.")
@click.option("--ce-weight", type=float, default=0.2, help="Weight of the cross-entropy on the dense output.")
@click.option("--contrastive-weight", type=float, default=1.0,
              help="Weight of the NT-Xent term (0: CE-only control run with the same optimizer).")
@click.option("--lr", type=float, default=2e-4, help="Adam learning rate.")
@click.option("--batch-size", type=int, default=100)
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--select", type=click.Choice(["last", "accuracy", "worst_group_accuracy"]), default="last",
              help="Which epoch's weights are reported and saved as best.pt.")
@click.option("--grouping", type=click.Choice(["auto", "group", "alignment"]), default="auto")
@click.option("--max-steps-per-epoch", type=int, default=None)
@click.option("--device", default="auto")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/mitigate"))
@click.option("--resume", is_flag=True, help="Continue from <out>/last.pt (and the ERM model in <out>/erm).")
@click.option("--quiet", is_flag=True)
def mitigate(data, data_root, download, bias_band, conflict_ratio, data_option, seed, checkpoint, model,
             model_option, erm_epochs, epochs, prune_fraction, tau, ce_weight, contrastive_weight, lr, batch_size,
             weight_decay, select, grouping, max_steps_per_epoch, device, out, resume, quiet):
    """Mitigate spurious memorization: pruned/dense NT-Xent + CE training from the ERM model."""
    from shortcut_fast.experiments import memorization as mem
    from shortcut_fast.report import format_table, write_json
    from shortcut_fast.train import resolve_device

    splits = _load_data(data, data_root, download, bias_band, conflict_ratio, data_option, seed)
    try:
        dev = str(resolve_device(device))
        cfg = mem.MitigationConfig(epochs=epochs, prune_fraction=prune_fraction, tau=tau, ce_weight=ce_weight,
                                   contrastive_weight=contrastive_weight, lr=lr, batch_size=batch_size,
                                   weight_decay=weight_decay, select=select, grouping=grouping,
                                   max_steps_per_epoch=max_steps_per_epoch, seed=seed, device=dev)
        net = _erm_model(model, model_option, checkpoint, splits, seed, erm_epochs, dev, out / "erm", resume, quiet)
        result = mem.run_mitigation(net, splits, cfg, out_dir=out, progress=not quiet,
                                    resume=resume and (out / "last.pt").exists())
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        _fail(exc)
    write_json({"command": "mitigate", "data": data, "dataset_meta": splits.meta,
                "model": checkpoint or str(out / "erm" / "last.pt"), "result": result}, out / "result.json")
    mem.plot_mitigation(result, out)
    click.echo(f"\nmitigate on {data} ({result.grouping['kind']} groups; minority: "
               f"{', '.join(result.grouping['minority'])}), {len(result.history)} epochs, {result.seconds:.1f} s")
    rows, headers = mem.mitigation_table(result)
    click.echo(format_table(rows, headers))
    click.echo(f"\nwrote {out / 'result.json'}, checkpoint {result.checkpoint}")


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
