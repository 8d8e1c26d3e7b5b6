"""`shortcut-fast complexity`: feature complexity by V-information."""
from __future__ import annotations

from pathlib import Path

import click

from shortcut_fast import pipeline

from ._common import (POSITIVE, backend_and_device, data_options_with, fail, float_list, LibraryChoice, main,
                      model_name, model_options, name_list, precision_option, run_options)
from ._distributed import dist_kw, distributed_command


@main.command()
@data_options_with("colored-digits")
@model_options("complexity")
@click.option("--layers", default=None, callback=name_list,
              help="Comma-separated block names (default: every block of the model).")
@click.option("--directions", default="nmf:64", help="Features: nmf:K, pca:K or a directions file.")
@click.option("--nmf-solver", type=LibraryChoice("shortcut_fast.ops.directions:NMF_SOLVERS"), default="hals",
              help="NMF solver for nmf:K (hals: coordinate descent; mu: multiplicative updates).")
@click.option("--v-information", type=LibraryChoice("shortcut_fast.ops.probe_stats:V_INFORMATION_FORMS"), default="r2",
              help="r2: fixed-variance Gaussian family (the paper's); gaussian-nats: learned variance, "
                   "-1/2 log(1 - R^2) nats.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of epoch_NNN.pt (train --keep-every 1) for the training dynamics.")
@click.option("--dynamics", is_flag=True, help="When training here, also analyse every epoch's checkpoint.")
@click.option("--max-images", type=POSITIVE, default=2000, help="Probe-train images (from the train split).")
@click.option("--max-heldout", type=POSITIVE, default=1000, help="Held-out images.")
@click.option("--heldout-split",
              type=LibraryChoice("shortcut_fast.experiments.complexity:HELDOUT_SPLITS"), default="val")
@click.option("--alphas", default=None, callback=float_list,
              help="Comma-separated ridge alphas (default: a grid scaled to each layer).")
@click.option("--batch-size", type=POSITIVE, default=256, help="Images per forward chunk.")
@backend_and_device
@precision_option
@run_options("runs/complexity", "Continue the run in --out: reuse its model and finished work (same settings only).")
@distributed_command("complexity")
def complexity(dist=None, **params):
    """Feature complexity by V-information: per-layer decodability, importance, dynamics."""
    from shortcut_fast.experiments import complexity as cx

    p = params
    splits, resolved, model_settings = pipeline.analysis_inputs(p, "complexity", {"epochs": p["epochs"]})
    dev, out = p["device"], p["out"]
    if p["dynamics"] and (pipeline.given_model(p) or p["checkpoints"]):
        raise click.BadParameter("--dynamics analyses the model trained here; with --checkpoint or --weights give the "
                                 "epoch checkpoints as --checkpoints DIR instead", param_hint="--dynamics")
    try:
        cfg = cx.ComplexityConfig(layers=p["layers"], directions=p["directions"], nmf_solver=p["nmf_solver"],
                                  v_information=p["v_information"], max_images=p["max_images"],
                                  max_heldout=p["max_heldout"], heldout_split=p["heldout_split"],
                                  alphas=p["alphas"], batch_size=p["batch_size"], backend=p["backend"],
                                  precision=p["precision"], seed=p["seed"])
    except ValueError as exc:
        fail(exc)
    trains = not pipeline.given_model(p)
    if trains:
        pipeline.announce_recipe(resolved, splits, dev)
    with pipeline.open_run("complexity", p, splits, model_settings=model_settings, dist=dist,
                   not_fingerprinted=("batch_size",), recipe=resolved if trains else None) as run:
        try:
            # The quick recipe selects the last epoch: the analysed model is the end of training, the
            # reference of the dynamics; every epoch is kept for --dynamics.
            tcfg = pipeline.train_config(resolved, p, dev, keep_every=1 if p["dynamics"] else 0)
            need = range(1, tcfg.epochs + 1) if p["dynamics"] else ()
            net, trained, cache = pipeline.analysed_model(p, splits, run, resolved, tcfg, need_epochs=need, dist=dist)
            checkpoints = run.root / "model" if p["dynamics"] else p["checkpoints"]
            result = cx.run_complexity(net, splits, cfg, store=run.partial, checkpoints=checkpoints, device=dev,
                                       progress=not p["quiet"], **dist_kw(dist))
        except (ValueError, FileNotFoundError, TypeError) as exc:
            fail(exc)
        if not pipeline.writes(dist):
            return
        result.write(out, record={"data": p["data"], "dataset_meta": splits.meta, "model": model_name(p, resolved),
                                  "model_options": model_settings, "trained": trained,
                                  "recipe": resolved.record() if trains else None, "model_cache": cache})
    click.echo(result.summary())
