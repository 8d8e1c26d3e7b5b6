"""`shortcut-fast denetdm`: DeNetDM against ERM and LfF."""
from __future__ import annotations

from pathlib import Path

import click

from shortcut_fast import pipeline

from ._common import (POSITIVE, data_root_option, device_option, download_option, fail, float_list, image_size_option,
                      LibraryChoice, main, name_list, pairs, run_options)
from ._distributed import dist_kw, distributed_command


def _ratio_list(ctx, param, value):
    items = float_list(ctx, param, value)
    if items is not None and any(not 0 < r < 1 for r in items):
        raise click.BadParameter(f"expected conflict ratios in (0, 1) such as 0.005,0.01, got {value!r}")
    if items is not None and len(set(items)) != len(items):
        raise click.BadParameter(f"expected distinct ratios, got {value!r}")
    return items


def _depth_pairs(ctx, param, value):
    pairs = []
    for spec in value:
        try:
            pair = tuple(int(v) for v in spec.split(","))
        except ValueError:
            raise click.BadParameter(f"expected SHALLOW,DEEP layer counts such as 3,5, got {spec!r}") from None
        if len(pair) != 2 or min(pair) < 1:
            raise click.BadParameter(f"expected two positive layer counts SHALLOW,DEEP such as 3,5, got {spec!r}")
        if pair[0] >= pair[1]:
            raise click.BadParameter(f"the shallow branch must have fewer layers than the deep one, got {spec!r}")
        pairs.append(pair)
    return tuple(pairs) or ((3, 5),)


class _MemberSplits:
    """The data identity of every (ratio, seed) member, for the run's fingerprint."""

    def __init__(self, splits: dict):
        self.splits = splits

    def identity(self) -> dict:
        return {f"ratio={r},seed={s}": sp.identity() for (r, s), sp in self.splits.items()}


@main.command()
@click.option("--data", default="colored-digits", help="A dataset with a bias attribute per class: colored-digits, "
              "colored-mnist-5k (real digits, offline), colored-mnist, corrupted-digits, corrupted-cifar10, or your "
              "own csv:FILE with an attribute column (its own conflict ratio; every seed sees the same data).")
@data_root_option
@download_option
@image_size_option
@click.option("--data-option", "-D", "data_option", multiple=True, metavar="KEY=VALUE",
              help="Any other dataset option (the embedded digits default to -D image_size=16 with the mlp "
                   "branches).")
@click.option("--conflict-ratio", "ratios", default="0.005,0.01,0.02,0.05", callback=_ratio_list,
              help="Comma-separated bias-conflicting training fractions, each in (0, 1).")
@click.option("--seeds", type=POSITIVE, default=3, help="Seeds --seed, --seed+1, ... per ratio (data, init, order).")
@click.option("--seed", type=int, default=0, help="First seed.")
@click.option("--stage1-epochs", type=POSITIVE, default=100, help="Stage-1 epochs (published: 100).")
@click.option("--stage2-epochs", type=POSITIVE, default=None,
              help="Stage-2 epochs (default as published: 200 on the CIFAR sets, 100 otherwise).")
@click.option("--baseline-epochs", type=POSITIVE, default=None,
              help="ERM and LfF epochs (default: stage-1 + stage-2 epochs, the same passes over the data).")
@click.option("--depths", multiple=True, callback=_depth_pairs, metavar="SHALLOW,DEEP",
              help="Layer counts (incl. the head) of the shallow and deep MLP branches; repeat for the depth "
                   "ablation, e.g. --depths 3,5 --depths 4,8.  [default: 3,5]")
@click.option("--arch", type=LibraryChoice("shortcut_fast.experiments.denetdm:ARCHS", before=("auto",)), default="auto",
              help="Branches: MLPs, or ResNet-20 vs three 5x5 convs (auto: conv for corrupted-*, else mlp).")
@click.option("--width", type=POSITIVE, default=100, help="Hidden width of the MLP branches.")
@click.option("--target", default=None, help="Model of the stage-2 target branch and of ERM/LfF (default: like "
              "the deep branch), e.g. resnet18 or tv:resnet18 with --pretrained.")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Weights file of --target (e.g. an ImageNet ResNet-18, as the public C-CIFAR10 code).")
@click.option("--baselines", default="erm,lff", help="Comma-separated baselines (erm, lff), or none.")
@click.option("--baselines-only", is_flag=True, help="Train the baselines only (no DeNetDM).")
@click.option("--baseline-protocol",
              type=LibraryChoice("shortcut_fast.experiments.denetdm:BASELINE_PROTOCOLS"), default="ours",
              help="ours: ERM/LfF like the target (batch and epochs as DeNetDM's); lff: as in LfF's code, which "
                   "DeNetDM's ERM/LfF figures come from (batch 256, 4-layer MLP, 100 epochs unless "
                   "--baseline-epochs, inputs divided by 255 twice).")
@click.option("--batch-size", type=POSITIVE, default=None, help="Default 64 (mlp) or 256 (conv), as published.")
@click.option("--stage1-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="Adam, stage 1.")
@click.option("--stage2-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Adam, stage 2 (default 1e-3 mlp, 1e-4 conv, as published).")
@click.option("--stage1-weight-decay", type=click.FloatRange(min=0), default=1e-3)
@click.option("--baseline-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="Adam, ERM and LfF.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, help="Distillation T.")
@click.option("--distill-weight", type=click.FloatRange(min=0), default=1.0,
              help="Stage-2 lambda (the paper uses 0 on BFFHQ).")
@click.option("--augment",
              type=LibraryChoice("shortcut_fast.experiments.denetdm:AUGMENTATIONS", before=("auto",)), default="auto",
              help="auto: flip-crop for the CIFAR sets (as published), none otherwise.")
@device_option
@run_options("runs/denetdm", "Continue the run in --out: finished phases and epochs are reused (same settings only).")
@distributed_command("denetdm")
def denetdm(dist=None, **params):
    """DeNetDM (depth-modulated debiasing) against ERM and LfF on every conflict ratio and seed."""
    from shortcut_fast.data import load_dataset
    from shortcut_fast.data.files import parse_spec
    from shortcut_fast.experiments import denetdm as dn

    p = params
    extra = pairs(p["data_option"], "data-option")
    if p["image_size"] is not None:
        extra["image_size"] = p["image_size"]
    # Your own data (csv: with an attribute column) comes with its own conflict ratio: one ratio, as it is.
    own_ratio = parse_spec(p["data"]) is not None
    if own_ratio:
        if click.get_current_context().get_parameter_source("ratios").name != "DEFAULT":
            raise click.BadParameter(f"{p['data']} comes with its own conflict ratio (its attribute column); "
                                     f"drop --conflict-ratio", param_hint="--conflict-ratio")
        p["ratios"] = [round(pipeline.own_conflict_ratio(
            load_dataset(p["data"], root=p["data_root"], download=p["download"], seed=p["seed"], **extra)), 6)]
    baselines = () if p["baselines"].strip() == "none" else tuple(name_list(None, None, p["baselines"]) or ())
    try:
        cfg = dn.config_for(
            p["data"], arch=p["arch"], stage2_epochs=p["stage2_epochs"], baseline_epochs=p["baseline_epochs"],
            baseline_protocol=p["baseline_protocol"], batch_size=p["batch_size"], stage2_lr=p["stage2_lr"],
            augment=p["augment"], ratios=tuple(p["ratios"]), seeds=p["seeds"], seed=p["seed"], depths=p["depths"],
            width=p["width"], target=p["target"], target_pretrained=str(p["pretrained"]) if p["pretrained"] else None,
            stage1_epochs=p["stage1_epochs"], stage1_lr=p["stage1_lr"], stage1_weight_decay=p["stage1_weight_decay"],
            baseline_lr=p["baseline_lr"], denetdm=not p["baselines_only"], temperature=p["temperature"],
            distill_weight=p["distill_weight"], baselines=baselines)
        if not own_ratio:
            extra = dn.member_options(p["data"], cfg, extra)
    except ValueError as exc:
        setting = str(exc).split(" ")[0].split(":")[0].replace("_", "-")
        raise click.BadParameter(str(exc).removeprefix(setting.replace("-", "_") + ": "),
                                 param_hint="--data-option" if setting == "data-options" else f"--{setting}") from None
    splits = pipeline.member_splits(p, cfg.members, extra, own_ratio)
    resolved = {**{k: v for k, v in vars(cfg).items() if k not in ("stacked", "eval_batch_size", "checkpoint_seconds")}}
    out = p["out"]
    with pipeline.open_run("denetdm", {**p, "resolved": resolved}, pipeline.MemberSplits(splits), dist=dist) as run:
        try:
            result = dn.run_denetdm(lambda r, s: splits[(r, s)], cfg, store=run.partial, device=p["device"],
                                    progress=not p["quiet"], **dist_kw(dist))
        except (ValueError, TypeError, FloatingPointError, FileNotFoundError) as exc:
            fail(exc)
        if not pipeline.writes(dist):
            return
        first = next(iter(splits.values()))
        result = dn.DeNetDMResult(result)
        result.write(out, record={"data": p["data"], "dataset_meta": first.meta})
    click.echo(result.summary())
