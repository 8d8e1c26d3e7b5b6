"""`shortcut-fast localize`: layer-wise shortcut localization."""
from __future__ import annotations

import click

from shortcut_fast import pipeline

from ._common import (POSITIVE, backend_and_device, data_options_with, fail, LibraryChoice, main, name_list,
                      run_options, weights_option)
from ._distributed import dist_kw, distributed_command


@main.command()
@data_options_with("digits")
@click.option("--model", default="small-cnn", help="Architecture (see `shortcut-fast models`), or timm:NAME.")
@click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE",
              help="Model option (default width=8 where the model has a width: minutes on a CPU).")
@click.option("--shortcut",
              type=LibraryChoice("shortcut_fast.experiments.localization:SHORTCUT_KINDS"), default="patch",
              help="Shortcut planted into a fraction --rho of each class's training images (none: the "
                   "dataset's own attribute, e.g. waterbirds: skewed = its training set, clean = its group-balanced "
                   "subsample).")
@click.option("--rho", type=click.FloatRange(0, 1, min_open=True), default=0.9,
              help="Fraction of each class's training images with the shortcut, in (0, 1].")
@click.option("--shortcut-strength", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Patch opacity in (0, 1] or tint/freq amplitude (default: the shortcut's own).")
@click.option("--granularity",
              type=LibraryChoice("shortcut_fast.experiments.localization:GRANULARITIES"), default="stage",
              help="Localize per stage (layer1, layer2, ...) or per block (layer1.0, ...).")
@click.option("--blocks", default=None, callback=name_list,
              help="Comma-separated units to localize (stage or block names, or head; default all).")
@click.option("--epochs", type=POSITIVE, default=8, help="Training epochs of every variant.")
@click.option("--seeds", type=POSITIVE, default=3, help="Seeds --seed, --seed+1, ... (init and batch order).")
@click.option("--batch-size", type=POSITIVE, default=64)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, help="SGD learning rate.")
@click.option("--interventions", is_flag=True,
              help="Also train skewed variants with one unit at 0.1 x the learning rate or frozen.")
@click.option("--probe-images", type=click.IntRange(min=4), default=None,
              help="Conflicting test images for the V-information probes (default all).")
@backend_and_device
@run_options("runs/localize", "Continue the run in --out: reuse its finished seeds and epochs (same settings only).")
@weights_option("every variant starts from them instead of a seeded initialization")
@distributed_command("localize")
def localize(dist=None, **params):
    """Layer-wise shortcut localization: counterfactual training of every unit as one stacked ensemble."""
    from shortcut_fast.experiments import localization as loc

    p = params
    if any(pair.split("=", 1)[0].strip().replace("-", "_") in ("shortcut", "rho", "shortcut_strength")
           for pair in p["data_option"]):
        raise click.BadParameter("localize plants the shortcut itself into the clean data; use --shortcut, --rho "
                                 "and --shortcut-strength instead of -D", param_hint="--data-option")
    splits = pipeline.load_data(p)
    if p["shortcut"] == "none" and splits.num_attributes < 2:
        raise click.BadParameter(f"{p['data']} has no attributes of its own; choose --shortcut patch, tint or freq",
                                 param_hint="--shortcut")
    model_settings = pipeline.model_settings(p["model"], p["model_option"], 8)
    try:
        cfg = loc.LocalizationConfig(shortcut=p["shortcut"], rho=p["rho"], shortcut_strength=p["shortcut_strength"],
                                     granularity=p["granularity"], units=p["blocks"], epochs=p["epochs"],
                                     seeds=p["seeds"], seed=p["seed"], batch_size=p["batch_size"], lr=p["lr"],
                                     interventions=p["interventions"], probe_images=p["probe_images"])
    except ValueError as exc:
        fail(exc)
    # Units and unit names are checked before the run folder opens (usage errors, status 2).
    probe = pipeline.build_model(p["model"], splits, model_settings, p["seed"], weights=p["weights"])
    try:
        units = [*loc.model_units(probe, p["granularity"]), loc.HEAD]
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("model: "), param_hint="--model") from None
    try:
        loc.check_units(p["blocks"], units, p["granularity"])
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("blocks: "), param_hint="--blocks") from None
    out = p["out"]
    with pipeline.open_run("localize", p, splits, model_settings=model_settings, dist=dist) as run:
        try:
            def variant(seed: int):
                return pipeline.build_model(p["model"], splits, model_settings, seed, weights=p["weights"])

            result = loc.run_localization(variant, splits, cfg, store=run.partial, device=p["device"],
                                          backend=p["backend"], progress=not p["quiet"], **dist_kw(dist))
        except (ValueError, TypeError, FloatingPointError) as exc:
            fail(exc)
        if not pipeline.writes(dist):
            return
        result.write(out, record={"data": p["data"], "dataset_meta": splits.meta, "model": p["model"],
                                  "model_options": model_settings})
    click.echo(result.summary())
