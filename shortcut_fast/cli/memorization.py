"""`shortcut-fast memorization` and `mitigate`: spurious memorization and its mitigation."""
from __future__ import annotations

from pathlib import Path

import click

from shortcut_fast import pipeline

from ._common import (FRACTION, POSITIVE, backend_and_device, data_options_with, device_option, fail, LibraryChoice,
                      main, model_name, model_options, name_list, pretrained_option, recipe_options, run_options,
                      weights_option)
from ._distributed import dist_kw, distributed_command


@main.command()
@data_options_with("colored-digits")
@model_options("memorization", epochs_help="ERM training epochs")
@click.option("--layers", default=None, callback=name_list,
              help="Comma-separated layer names (default: the stem conv and up to 4 blocks of the model; "
                   "with --where pre-bn/post-activation each block's conv).")
@click.option("--stem/--no-stem", default=True, help="Default layers include the model's first (stem) conv.")
@click.option("--mode", type=LibraryChoice("shortcut_fast.surgery.sweep:MODES", after=("noise",)),
              default="zero", help="What replaces an ablated channel (weight-noise: the published 'noise'; "
                                   "activation-noise: ours; plain 'noise' is refused as ambiguous).")
@click.option("--where", type=LibraryChoice("shortcut_fast.surgery.split:WHERE"), default="pre-bn",
              help="Which activation of the layer is modified (pre-bn: the conv output, i.e. the published "
                   "zeroing of the channel's filter weights).")
@click.option("--repeats", type=POSITIVE, default=1, help="Noise modes: draws averaged per channel.")
@click.option("--noise-kind", type=LibraryChoice("shortcut_fast.surgery.sweep:NOISE_KINDS"), default="replace",
              help="weight-noise: replace the channel's weights with N(0, std^2), or add it.")
@click.option("--noise-std", type=click.FloatRange(min=0, min_open=True), default=None,
              help="weight-noise: the noise std (required there).")
@click.option("--weight-norm-ranking",
              type=LibraryChoice("shortcut_fast.experiments.memorization:WEIGHT_NORM_RANKINGS"), default="global",
              help="Weight-norm ranks over every conv but downsample (published) or within the layer.")
@click.option("--rewind-to", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="rewind: the earlier checkpoint (default: epoch 1 of the model trained here).")
@click.option("--top-k", type=POSITIVE, default=5, help="Top channels reported; largest cumulative set.")
@click.option("--grouping", type=LibraryChoice("shortcut_fast.experiments.memorization:GROUPINGS"), default="auto",
              help="Dataset groups, or aligned/conflicting (auto: groups when there are <= 16).")
@click.option("--max-samples", type=POSITIVE, default=None, help="Samples per split in the sweep (default all).")
@click.option("--batch-size", type=POSITIVE, default=256)
@backend_and_device
@run_options("runs/memorization", "Continue the run in --out: reuse its model and finished layers (same settings only).")
@distributed_command("memorization")
def memorization(dist=None, **params):
    """Spurious memorization: per-group gap, channel ablation sweep, critical channels."""
    from shortcut_fast.experiments import memorization as mem

    p = params
    splits, resolved, model_settings = pipeline.analysis_inputs(p, "memorization", {"epochs": p["epochs"]})
    dev, out, mode = p["device"], p["out"], p["mode"]
    if mode == "rewind" and pipeline.given_model(p) and not p["rewind_to"]:
        raise click.BadParameter("--mode rewind with --checkpoint or --weights needs --rewind-to (the earlier "
                                 "checkpoint)",
                                 param_hint="--rewind-to")
    try:
        cfg = mem.MemorizationConfig(layers=p["layers"], mode=mode, where=p["where"], repeats=p["repeats"],
                                     stem=p["stem"], noise_kind=p["noise_kind"], noise_std=p["noise_std"],
                                     weight_norm_ranking=p["weight_norm_ranking"],
                                     top_k=p["top_k"], grouping=p["grouping"], max_samples=p["max_samples"],
                                     batch_size=p["batch_size"], backend=p["backend"], seed=p["seed"])
    except ValueError as exc:
        fail(exc)
    trains = not pipeline.given_model(p)
    if trains:
        pipeline.announce_recipe(resolved, splits, dev)
    with pipeline.open_run("memorization", p, splits, model_settings=model_settings, dist=dist,
                   not_fingerprinted=("batch_size",), recipe=resolved if trains else None) as run:
        try:
            # The recipes select the last epoch: memorization is about the model at the end of training.
            keep = 1 if mode == "rewind" and not p["rewind_to"] else 0
            tcfg = pipeline.train_config(resolved, p, dev, keep_every=keep)
            net, _, cache = pipeline.analysed_model(p, splits, run, resolved, tcfg, need_epochs=(1,) if keep else (),
                                                   dist=dist)
            rewind_to = p["rewind_to"] or (run.root / "model" / "epoch_001.pt" if mode == "rewind" else None)
            result = mem.run_memorization(net, splits, cfg, store=run.partial, device=dev, progress=not p["quiet"],
                                          rewind_to=rewind_to, **dist_kw(dist))
        except (ValueError, FileNotFoundError) as exc:
            fail(exc)
        if not pipeline.writes(dist):
            return
        result.write(out, record={"data": p["data"], "dataset_meta": splits.meta, "model": model_name(p, resolved),
                                  "model_options": model_settings, "recipe": resolved.record() if trains else None,
                                  "model_cache": cache})
    click.echo("\n" + result.summary())


@main.command()
@data_options_with("colored-digits")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The ERM checkpoint to start from (default: train one here with --model).")
@weights_option("the ERM model mitigation starts from (skips its training)")
@click.option("--model", default=None, help="Architecture of the ERM model trained when no --checkpoint or --weights "
              "(default: the recipe's; quick: small-cnn).")
@click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE",
              help="Model option (quick recipe: width=16 where the model has a width).")
@click.option("--erm-epochs", type=POSITIVE, default=None, help="ERM training epochs when no --checkpoint is given "
              "(default: the recipe's; quick: 15).")
@pretrained_option
@recipe_options("mitigate (ERM)")
@click.option("--epochs", type=POSITIVE, default=21, help="Mitigation epochs (published: 21).")
@click.option("--prune-fraction", type=FRACTION, default=0.01, help="Fraction of weights masked (global magnitude).")
@click.option("--tau", type=click.FloatRange(min=0, min_open=True), default=0.5, help="NT-Xent temperature.")
@click.option("--ce-weight", type=click.FloatRange(min=0), default=0.2,
              help="Weight of the cross-entropy on the dense output.")
@click.option("--contrastive-weight", type=click.FloatRange(min=0), default=1.0,
              help="Weight of the NT-Xent term (0: CE-only control run with the same optimizer).")
@click.option("--contrastive-form",
              type=LibraryChoice("shortcut_fast.experiments.memorization:CONTRASTIVE_FORMS"), default="sum-2n",
              help="sum-2n: NT(sg(dense), pruned) + NT(dense, sg(pruned)), 2N anchors each (published); "
                   "half-mean: half of that value (ours before).")
@click.option("--prune-layers",
              type=LibraryChoice("shortcut_fast.experiments.memorization:PRUNE_LAYERS"), default="conv",
              help="Weights the magnitude mask prunes: convs (published) or convs and linear layers.")
@click.option("--schedule",
              type=LibraryChoice("shortcut_fast.experiments.memorization:MITIGATION_SCHEDULES"), default="plateau",
              help="plateau: ReduceLROnPlateau(0.5, patience 1) on the training loss (published).")
@click.option("--augment", type=LibraryChoice("shortcut_fast.experiments.memorization:MITIGATION_AUGMENTATIONS"),
              default="resized-crop-flip", help="Training augmentation (published: RandomResizedCrop 0.7-1 + flip).")
@click.option("--double-softmax", is_flag=True,
              help="Apply softmax to the outputs before CE and NT-Xent, as the published head does "
                   "(a bug there: CE then applies softmax twice).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, help="Adam learning rate.")
@click.option("--batch-size", type=POSITIVE, default=100)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0)
@click.option("--select",
              type=LibraryChoice("shortcut_fast.experiments.memorization:MITIGATION_SELECT"), default="last",
              help="Which epoch's weights are reported and saved as best.pt.")
@click.option("--grouping", type=LibraryChoice("shortcut_fast.experiments.memorization:GROUPINGS"), default="auto")
@click.option("--max-steps-per-epoch", type=POSITIVE, default=None)
@device_option
@run_options("runs/mitigate", "Continue the run in --out: its ERM model and mitigation epochs (same settings only).")
@distributed_command("mitigate")
def mitigate(dist=None, **params):
    """Mitigate spurious memorization: pruned/dense NT-Xent + CE training from the ERM model."""
    from shortcut_fast.experiments import memorization as mem

    p = params
    splits, resolved, model_settings = pipeline.analysis_inputs(p, "mitigate", {"epochs": p["erm_epochs"]})
    dev, out = str(p["device"]), p["out"]
    try:
        cfg = mem.MitigationConfig(epochs=p["epochs"], prune_fraction=p["prune_fraction"], tau=p["tau"],
                                   ce_weight=p["ce_weight"], contrastive_weight=p["contrastive_weight"], lr=p["lr"],
                                   contrastive_form=p["contrastive_form"], prune_layers=p["prune_layers"],
                                   schedule=p["schedule"], augment=p["augment"], double_softmax=p["double_softmax"],
                                   batch_size=p["batch_size"], weight_decay=p["weight_decay"], select=p["select"],
                                   grouping=p["grouping"], max_steps_per_epoch=p["max_steps_per_epoch"],
                                   seed=p["seed"], device=dev)
    except ValueError as exc:
        fail(exc)
    trains = not pipeline.given_model(p)
    if trains:
        pipeline.announce_recipe(resolved, splits, dev)
    with pipeline.open_run("mitigate", p, splits, model_settings=model_settings, recipe=resolved if trains else None,
                           dist=dist) as run:
        try:
            tcfg = pipeline.train_config(resolved, p, dev)
            net, _, cache = pipeline.analysed_model(p, splits, run, resolved, tcfg, store_name="erm", dist=dist)
            result = mem.run_mitigation(net, splits, cfg, store=run, progress=not p["quiet"], **dist_kw(dist))
        except (ValueError, FileNotFoundError, FloatingPointError) as exc:
            fail(exc)
        if not pipeline.writes(dist):
            return
        result.write(out, record={"data": p["data"], "dataset_meta": splits.meta,
                                  "model": str(p["checkpoint"] or p["weights"] or out / "erm" / "last.pt"),
                                  "model_options": model_settings, "recipe": resolved.record() if trains else None,
                                  "model_cache": cache})
    click.echo("\n" + result.summary())
