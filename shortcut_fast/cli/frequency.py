"""`shortcut-fast spectrum` and `freq-probe`: class spectra and frequency shortcuts."""
from __future__ import annotations

import click

from shortcut_fast import pipeline

from ._common import (NON_NEGATIVE, POSITIVE, backend_and_device, data_options, fail, int_list, LibraryChoice, main,
                      model_name, model_options, precision_option, run_options)
from ._distributed import dist_kw, distributed_command


@main.command()
@data_options
@click.option("--split", type=LibraryChoice("shortcut_fast.data.core:SPLIT_NAMES"), default="train")
@click.option("--batch-size", type=POSITIVE, default=256)
@backend_and_device
@precision_option
@run_options("runs/spectrum", resume_help=None)
def spectrum(**params):
    """Class-wise amplitude spectra and ADCS maps of a dataset (one streaming pass)."""
    import torch

    from shortcut_fast.experiments.freq_probe import class_spectra
    from shortcut_fast.ops import adcs
    from shortcut_fast.ops.freq import shifted
    from shortcut_fast.report import format_table, plot_maps, write_json

    p = params
    splits = pipeline.load_data(p)
    dataset = getattr(splits, p["split"])
    out, data, split = p["out"], p["data"], p["split"]
    with pipeline.open_run("spectrum", p, splits, not_fingerprinted=("batch_size",)):
        try:
            acc = class_spectra(dataset, splits.num_classes, backend=p["backend"], precision=p["precision"],
                                batch_size=p["batch_size"],
                                device=p["device"], progress=not p["quiet"])
        except (ValueError, RuntimeError) as exc:
            fail(exc)
        means = acc.mean()
        scores = adcs(means.nan_to_num(0.0))  # a class without images scores 0 against the others
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
@model_options("freq-probe")
@click.option("--method", type=LibraryChoice("shortcut_fast.experiments.freq_probe:METHODS"), default=None,
              help="DFM search (default: greedy on cifar10 under the paper recipe, as published; else loss).")
@click.option("--patch", type=POSITIVE, default=None, help="Patch size p of the shifted spectrum (1: single pairs; "
              "default: 1 on cifar10 under the paper recipe, else 2).")
@click.option("--top-percent", type=click.FloatRange(0, 100, min_open=True), default=5.0,
              help="DFM size in % of all frequencies.")
@click.option("--tolerance", type=NON_NEGATIVE, default=6, help="greedy: correct-count drop allowed per removal.")
@click.option("--greedy-reference",
              type=LibraryChoice("shortcut_fast.experiments.freq_probe:GREEDY_REFERENCES"), default=None,
              help="greedy: drop measured from the count after the last kept removal (published, the default) or "
                   "from the original count (ours).")
@click.option("--greedy-order", type=LibraryChoice("shortcut_fast.experiments.freq_probe:GREEDY_ORDERS"), default=None,
              help="greedy: conjugate pairs from DC outwards (ours) or the published spiral (even square images; "
                   "default: published on cifar10 under the paper recipe, else ours).")
@click.option("--filter-centre",
              type=LibraryChoice("shortcut_fast.experiments.freq_probe:FILTER_CENTRES"), default="dataset-mean",
              help="Filter x - mu and add mu back: mu = the model's normalization, else the train split's "
                   "mean colour (published: normalized input); zero: raw pixels.")
@click.option("--adcs", "adcs_variant",
              type=LibraryChoice("shortcut_fast.experiments.freq_probe:ADCS_VARIANTS"), default="ours",
              help="ADCS: class means, channel average (ours) or class sums, luminance weights and the published "
                   "comparison loop (every map shifted by -1, a published bug).")
@click.option("--classes", default=None, callback=int_list, help="Comma-separated classes (default all).")
@click.option("--no-dfm", is_flag=True, help="Skip the DFM search (ADCS, band-stop and learning order only).")
@click.option("--max-images-per-class", type=NON_NEGATIVE, default=None,
              help="Class images used in the DFM search, 0 for all (default: all on cifar10 under the paper recipe, "
                   "as the released DFMs; else 100).")
@click.option("--verify-gradient", is_flag=True, help="gradient: also run the exact search and report agreement.")
@click.option("--ood", "ood", multiple=True, metavar="NAME[:SEVERITY]",
              help="Corrupted test set for OOD transfer, e.g. --ood gaussian-noise:3 (repeatable).")
@click.option("--track-every", type=NON_NEGATIVE, default=5, help="Steps between band learning snapshots (0: off).")
@click.option("--track-until", type=POSITIVE, default=100, help="Last training step with a band learning snapshot.")
@click.option("--batch-size", type=POSITIVE, default=None, help="Model batch size for the search "
              "(default: on the CPU sized from the model's largest activation, 32 for full-width ResNet-18; "
              "1024 on a GPU).")
@click.option("--compile", "compile_search", type=LibraryChoice("shortcut_fast.experiments.freq_probe:COMPILE_CHOICES"),
              default="auto", show_default=True, help="torch.compile the model copy the loss search runs "
              "(auto: on the CPU from about a minute of forwards on; scores change by float rounding only).")
@backend_and_device
@precision_option
@run_options("runs/freq-probe", "Continue the run in --out: reuse its model and finished classes (same settings only).")
@distributed_command("freq-probe")
def freq_probe(dist=None, **params):
    """Frequency shortcuts: ADCS, dominant frequency maps, TPR/FPR, band-stop, OOD transfer."""
    from shortcut_fast.data.corruptions import corrupted_dataset
    from shortcut_fast.experiments import freq_probe as fp

    p = params
    splits, resolved, model_settings = pipeline.analysis_inputs(p, "freq-probe", {"epochs": p["epochs"]})
    dev, out = p["device"], p["out"]
    # Band-stop (4 radial bands) runs on every dataset; the band-learning tracker needs a dataset
    # whose bands carry the labels by construction (synthetic-freq).
    has_bands = splits.meta.get("band_edges") is not None
    probe, probe_note = fp.probe_defaults(p["data"], resolved.name, method=p["method"], patch=p["patch"],
                                          greedy_reference=p["greedy_reference"], greedy_order=p["greedy_order"],
                                          max_images_per_class=p["max_images_per_class"])
    try:
        cfg = fp.FreqProbeConfig(
            **probe, top_percent=p["top_percent"], tolerance=p["tolerance"],
            filter_centre=p["filter_centre"], adcs=p["adcs_variant"],
            classes=[] if p["no_dfm"] else p["classes"],
            verify_gradient=p["verify_gradient"], batch_size=p["batch_size"], backend=p["backend"],
            precision=p["precision"], amp=dev.type == "cuda", compile=p["compile_search"], seed=p["seed"])
    except ValueError as exc:
        fail(exc)
    for c in p["classes"] or []:
        if not 0 <= c < splits.num_classes:
            raise click.BadParameter(f"class {c} is not in [0, {splits.num_classes}) for {p['data']}",
                                     param_hint="--classes")
    try:
        ood_sets = {spec: corrupted_dataset(splits.test, spec, seed=p["seed"]) for spec in p["ood"]}
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ood") from None
    trains = not pipeline.given_model(p)
    if trains:
        pipeline.announce_recipe(resolved, splits, dev)
    if probe_note:
        click.echo(probe_note)
    with pipeline.open_run("freq-probe", p, splits, model_settings=model_settings,
                           not_fingerprinted=("batch_size", "compile_search"),
                           recipe=resolved if trains else None, dist=dist) as run:
        tracker, hooks, artifacts = None, {}, ()
        if trains and has_bands and p["track_every"] > 0:
            tracker, hooks, artifacts = pipeline.band_learning(splits, cfg, run, every=p["track_every"],
                                                               until=p["track_until"], device=dev,
                                                               backend=p["backend"])
        try:
            tcfg = pipeline.train_config(resolved, p, dev)
            net, trained, cache = pipeline.analysed_model(p, splits, run, resolved, tcfg, artifacts=artifacts, dist=dist,
                                                          **hooks)
            if tracker is not None and cache and cache["reused"]:
                run.save_json("model/learning-tracker.json", tracker.state_dict())
            result = fp.run_freq_probe(net, splits, cfg, store=run.partial, device=dev, ood_sets=ood_sets,
                                       band_table=True, progress=not p["quiet"], **dist_kw(dist))
        except (ValueError, FileNotFoundError) as exc:
            fail(exc)
        if not pipeline.writes(dist):
            return
        if trained is not None:
            result.learning = {**(tracker.summary() if tracker else {}), "train": trained}
        result.released_dfm_sizes = fp.released_dfm_sizes(p["data"])
        result.write(out, record={"data": p["data"], "dataset_meta": splits.meta, "model": model_name(p, resolved),
                                  "model_options": model_settings, "recipe": resolved.record() if trains else None,
                                  "model_cache": cache})
    click.echo(result.summary())
