"""`shortcut-fast train`: train a model by a recipe."""
from __future__ import annotations

import click

from shortcut_fast import pipeline

from ._common import (EVAL_HEADERS, NON_NEGATIVE, POSITIVE, data_options, device_option, eval_rows, LibraryChoice,
                      main, pretrained_option, recipe_options, run_options, weights_option)
from ._distributed import dist_kw, distributed_command


@main.command()
@data_options
@click.option("--model", default=None, help="Model name (see `shortcut-fast models`), or timm:NAME / tv:NAME "
              "(default: the recipe's; quick: resnet18).")
@click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE", help="Model option, e.g. -M width=32.")
@pretrained_option
@weights_option("training starts from them")
@recipe_options("train")
@click.option("--epochs", type=POSITIVE, default=None, help="Default: the recipe's (quick: 10).")
@click.option("--batch-size", type=POSITIVE, default=None, help="Default: the recipe's (quick: 128).")
@click.option("--optimizer", type=LibraryChoice("shortcut_fast.train:OPTIMIZERS"), default=None,
              help="Default: the recipe's (quick: sgd).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Default: the recipe's (quick: 0.05 with SGD, 1e-3 with Adam).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="Default: the recipe's (quick: 5e-4).")
@click.option("--schedule", type=LibraryChoice("shortcut_fast.train:SCHEDULES"), default=None,
              help="Default: the recipe's (quick: cosine).")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=None,
              help="Linear learning-rate warm-up, capped at --epochs (default: the recipe's; quick: 1).")
@click.option("--augment", type=LibraryChoice("shortcut_fast.train:AUGMENTATIONS"),
              default=None, help="Default: the recipe's (quick: none).")
@click.option("--select", type=LibraryChoice("shortcut_fast.train:SELECT_METRICS"), default=None,
              help="Validation metric that picks the reported checkpoint (default: the recipe's; quick: accuracy).")
@click.option("--keep-every", type=NON_NEGATIVE, default=0, help="Also keep epoch_NNN.pt every k epochs (0: never).")
@click.option("--max-steps-per-epoch", type=POSITIVE, default=None)
@click.option("--compile", is_flag=True, help="torch.compile the model for the training step "
              "(first steps slower; eager with a warning where torch.compile fails).")
@device_option
@run_options("runs/train", "Continue from <out>/last.pt (same settings only).")
@distributed_command("train")
def train(dist=None, **params):
    """Train a model on a dataset by a recipe; writes checkpoints, history.json and result.json to --out."""
    from shortcut_fast.report import format_table, plot_curves, write_json

    p = params
    overrides = {k: p[k] for k in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule",
                                   "warmup_epochs", "augment", "select", "max_steps_per_epoch")}
    resolved = pipeline.resolve_recipe(p, "train", overrides)
    splits = pipeline.load_data(p, resolved.data_options)
    # built before the run folder opens, so a bad model option leaves no folder behind (unused on a cache hit)
    net = pipeline.build_model(resolved.model, splits, resolved.model_options, p["seed"], p["pretrained"],
                               p["weights"])
    cfg = pipeline.train_config(resolved, p, p["device"], keep_every=p["keep_every"], compile=p["compile"])
    out = p["out"]
    pipeline.announce_recipe(resolved, splits, p["device"])
    # --compile is not fingerprinted (run folders from before it existed resume); last.pt's config holds it
    with pipeline.open_run("train", p, splits, model_settings=resolved.model_options, not_fingerprinted=("compile",),
                           recipe=resolved, dist=dist) as run:
        extra = dist_kw(dist)  # distributed training: every rank trains (no model cache: every rank must)
        keep = p["keep_every"]
        _, result, cache = pipeline.trained_model({**p, "no_cache": True} if extra else p, splits, run, resolved, cfg,
                                                  run, net=net,
                                                  need_epochs=range(keep, cfg.epochs + 1, keep) if keep else (),
                                                  **extra)
        if not pipeline.writes(dist):
            return
        record = {"command": "train", "data": p["data"], "dataset_meta": splits.meta, "model": resolved.model,
                  "model_options": resolved.model_options, "recipe": resolved.record(), "model_cache": cache,
                  "result": result}
        write_json(record, out / "result.json")
        plot_curves({"val accuracy": [h["val_accuracy"] for h in result.history]}, out / "val_accuracy.png",
                    xlabel="epoch", ylabel="accuracy", title=f"{resolved.model} on {p['data']}")
    click.echo(f"\n{resolved.model} on {p['data']}: {result.epochs_run} epochs in {result.seconds:.1f} s, "
               f"best epoch {result.best_epoch} (by val {cfg.select})")
    click.echo(format_table(eval_rows(result.final), EVAL_HEADERS))
    click.echo(f"\nwrote {out / 'result.json'}")
