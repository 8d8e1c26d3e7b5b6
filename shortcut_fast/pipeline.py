"""From settings to the analysed model: data, recipe, model (trained, cached, loaded), run folder.

The command line and the Python API take the same way down:

    splits = load_data(settings)                       # --data and its options
    resolved = resolve_recipe(settings, "freq-probe")  # the recipe with explicit options on top
    with open_run("freq-probe", settings, splits, ...) as run:
        net, trained, cache = analysed_model(settings, splits, run, resolved, train_cfg, dist=dist)

`settings` is a plain mapping of setting name -> value (the CLI's parsed options: data,
data_option, seed, model, model_option, checkpoint, weights, pretrained, recipe, no_cache,
quiet, out, ...). `dist` is the DistContext of a distributed run (None: one process), always
passed as an argument. Errors are exceptions: SettingError names the setting a user gave wrong
(the CLI reports it as a usage error of that option), other ValueErrors are runtime refusals.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

# Settings recorded in run.json but not fingerprinted: they decide where and how fast a run
# goes, not what it computes (backends agree within float tolerance).
# data_root and download only say where the data comes from: its identity (content digest) is
# fingerprinted instead. no_cache only says whether a cached model may be reused (the cache
# holds the model the same settings train). nproc and max_restarts only say how many processes
# share the work (the results equal the one-process run's; see shortcut_fast.distributed).
EXECUTION_SETTINGS = {"out", "resume", "overwrite", "quiet", "device", "backend", "data_root", "download", "no_cache",
                      "nproc", "max_restarts"}


class SettingError(ValueError):
    """A setting the user gave that cannot work; `setting` is its name (e.g. "model")."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def say(message: str) -> None:
    """Progress and notes of the way to the model (stdout; quiet ranks redirect it)."""
    print(message, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def parse_pairs(pairs, setting: str) -> dict:
    """KEY=VALUE pairs -> dict, values parsed as JSON where possible (ints, floats, bools)."""
    options = {}
    for pair in pairs or ():
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise SettingError(setting, f"expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return options


# ---- data

def data_options(settings: dict, defaults: dict | None = None) -> dict:
    """The dataset options of the settings: -D pairs and the named ones, over `defaults` (a
    recipe's data options, e.g. image_size=224)."""
    options = {**(defaults or {}), **parse_pairs(settings.get("data_option"), "data-option")}
    for name in ("bias_band", "conflict_ratio", "image_size"):
        if settings.get(name) is not None:
            options[name] = settings[name]
    return options


def load_data(settings: dict, defaults: dict | None = None):
    """The DatasetSplits of settings["data"] with its options (see data_options)."""
    from shortcut_fast.data import load_dataset

    return load_dataset(settings["data"], root=settings.get("data_root"), download=settings.get("download", False),
                        seed=settings.get("seed", 0), **data_options(settings, defaults))


def own_conflict_ratio(splits) -> float:
    """The share of bias-conflicting training samples (attribute != label) of data that comes
    with its own bias attribute (csv: with an attribute column), for DeNetDM on such data."""
    if splits.num_attributes != splits.num_classes or not splits.bias_aligned_attribute:
        raise SettingError("data", f"{splits.name} has no bias attribute aligned with its labels (one attribute value "
                                   f"per class, as a csv: attribute column can give); DeNetDM needs one")
    train = splits.train
    ratio = float((train.attributes != train.labels).float().mean())
    if not 0 < ratio < 1:
        raise SettingError("data", f"{splits.name}: {ratio:.0%} of the training samples conflict with the bias "
                                   f"attribute; DeNetDM needs some aligned and some conflicting ones")
    return ratio


def member_splits(settings: dict, members, options: dict, own_ratio: bool) -> dict:
    """(ratio, seed) -> DatasetSplits of every DeNetDM member: the dataset drawn at that conflict
    ratio with an unbiased validation split, or (own_ratio) the data as it comes, every seed."""
    from shortcut_fast.data import load_dataset

    drawn = {} if own_ratio else {"unbiased_val": True}
    return {(ratio, seed): load_dataset(settings["data"], root=settings.get("data_root"),
                                        download=settings.get("download", False), seed=seed,
                                        **({} if own_ratio else {"conflict_ratio": ratio}), **drawn, **options)
            for ratio, seed in members}


class MemberSplits:
    """The data of several (ratio, seed) members under one identity, for a run's fingerprint."""

    def __init__(self, splits: dict):
        self.splits = splits

    def identity(self) -> dict:
        return {f"ratio={r},seed={s}": sp.identity() for (r, s), sp in self.splits.items()}


# ---- recipe and model

def model_settings(model: str, model_option, default_width: int | None) -> dict:
    """-M pairs over the command's defaults: `-M padding=2` keeps the default width."""
    from shortcut_fast.models import model_option_names

    try:
        names = model_option_names(model)
    except ValueError as exc:
        raise SettingError("model", str(exc)) from None
    options = {"width": default_width} if default_width and names and "width" in names else {}
    options.update(parse_pairs(model_option, "model-option"))
    return options


def resolve_recipe(settings: dict, purpose: str, train: dict | None = None):
    """The recipe of settings["recipe"] (default: the dataset's) with the options given
    explicitly on top (model, model_option, and the training options in `train`; None = not
    given). A paper recipe that starts from pretrained weights needs `pretrained` unless the
    model comes from a checkpoint or weights file."""
    from shortcut_fast import recipes

    model_option = parse_pairs(settings.get("model_option"), "model-option")
    try:
        recipe = recipes.recipe_for(settings["data"], purpose, settings.get("recipe"))
        resolved = recipes.resolve(recipe, model=settings.get("model"), model_option=model_option, train=train)
    except ValueError as exc:
        raise SettingError("model", str(exc)) from None
    if (recipe.pretrained and resolved.model == recipe.model and not settings.get("pretrained")
            and not given_model(settings)):
        raise SettingError(
            "pretrained", f"the {recipe.name} recipe of {recipe.dataset} ({purpose}) fine-tunes {recipe.pretrained}: "
                          f"give that file as --pretrained FILE (nothing is downloaded), or choose --recipe quick")
    return resolved


def given_model(settings: dict) -> bool:
    """Whether the analysed model is given (a checkpoint or a weights file) rather than trained here."""
    return bool(settings.get("checkpoint") or settings.get("weights"))


def analysis_inputs(settings: dict, purpose: str, train: dict | None = None):
    """(data, resolved recipe, model options of the analysed model (None with a checkpoint))."""
    if settings.get("checkpoint") and settings.get("weights"):
        raise SettingError("weights", "give either --checkpoint (a file written by `shortcut-fast train`) or "
                                      "--weights (weights of --model), not both")
    resolved = resolve_recipe(settings, purpose, train)
    splits = load_data(settings, resolved.data_options)
    if settings.get("weights"):  # refused before any run folder opens: nothing is written for a file that cannot fit
        given_model_of(settings, splits, resolved)
    return splits, resolved, (None if settings.get("checkpoint") else resolved.model_options)


def train_config(resolved, settings: dict, device, **extra):
    """The TrainConfig of a resolved recipe (seed and device from the settings)."""
    from shortcut_fast.train import TrainConfig

    return TrainConfig(**resolved.train, seed=settings.get("seed", 0), device=str(device), **extra)


def announce_recipe(resolved, splits, device) -> None:
    """One line at the start of a run that trains: the recipe; on a CPU, for `paper`, the
    expected duration and how to ask for `quick` instead."""
    import torch

    from shortcut_fast import recipes

    say(resolved.line())
    if resolved.recipe.fallback_from:
        say(f"note: {resolved.recipe.note}")
    if resolved.name == "paper" and torch.device(str(device)).type == "cpu":
        seconds = recipes.estimate_seconds(resolved, len(splits.train), len(splits.val))
        expected = (f"expected training time on a 2-core CPU like the project's: about "
                    f"{recipes.format_duration(seconds)}" if seconds is not None
                    else f"no measured training time for {resolved.model} on a CPU")
        say(f"{expected}; use --recipe quick for a CPU-minutes run")


def build_model(model: str, splits, options: dict, seed: int, pretrained=None, weights=None):
    """A fresh `model` for the data's classes, channels and size, seeded; `pretrained` (loose:
    a new head is fine) or `weights` (strict: every key and shape must fit) loaded into it."""
    from shortcut_fast.models import build_model as build, load_weights
    from shortcut_fast.train import seed_everything

    seed_everything(seed)  # the seed controls the initialization too
    channels, size = splits.image_shape[0], splits.image_shape[-1]
    try:
        net = build(model, num_classes=splits.num_classes, in_channels=channels, image_size=size,
                    pretrained=pretrained, **options)
    except (ValueError, TypeError, ImportError) as exc:
        raise SettingError("model", str(exc)) from None
    except FileNotFoundError as exc:
        raise SettingError("pretrained", str(exc)) from None
    if weights is not None:
        try:
            load_weights(net, weights)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise SettingError("weights", str(exc)) from None
    return net


def checkpoint_model(path: Path, splits, what: str = "--checkpoint"):
    """A model from `path`, refused when it was built for other data."""
    from shortcut_fast.models import check_model_fits, model_from_checkpoint

    net = model_from_checkpoint(path, what=what)
    check_model_fits(net, num_classes=splits.num_classes, in_channels=splits.image_shape[0],
                     image_size=splits.image_shape[-1], source=f"{what} {str(path)!r}")
    return net


def given_model_of(settings: dict, splits, resolved):
    """The model of --checkpoint or of --model with --weights, checked against the data."""
    if settings.get("checkpoint"):
        return checkpoint_model(settings["checkpoint"], splits)
    return build_model(resolved.model, splits, resolved.model_options, settings.get("seed", 0),
                       weights=settings["weights"])


# ---- run folder

def open_run(command: str, settings: dict, splits, *, model_settings: dict | None = None,
             not_fingerprinted: tuple[str, ...] = (), recipe=None, dist=None):
    """The command's RunFolder, opened: its fingerprint holds every setting except the
    execution ones, with files replaced by their content digests, plus the data's identity
    and the resolved training recipe (`recipe`, when the command trains its model). In a
    distributed run every rank checks that the settings agree and rank 0 opens the folder."""
    import torch

    from shortcut_fast.backends import package_version
    from shortcut_fast.run_folder import RunFolder, file_digest

    skip = EXECUTION_SETTINGS | set(not_fingerprinted)
    fingerprinted = {}
    for key, value in settings.items():
        if key in skip:
            continue
        if isinstance(value, Path) and value.is_file():
            value = f"sha256:{file_digest(value)}"  # a file's identity is its content
        elif isinstance(value, Path) and value.is_dir() and key == "checkpoints":
            value = {p.name: file_digest(p) for p in sorted(value.glob("*.pt"))}
        fingerprinted[key] = value
    if model_settings is not None:
        fingerprinted["model_option"] = model_settings
    if recipe is not None:
        fingerprinted["recipe"] = {"name": recipe.name, "model": recipe.model, "model_options": recipe.model_options,
                                   "train": recipe.train, "data_options": recipe.data_options}
    fingerprinted["data_identity"] = splits.identity()
    info = {k: str(settings[k]) for k in EXECUTION_SETTINGS & set(settings) if k not in ("quiet", "overwrite")}
    info.update(shortcut_fast=package_version(), torch=torch.__version__)
    run = RunFolder(settings["out"], command, fingerprinted, resume=settings.get("resume", False),
                    overwrite=settings.get("overwrite", False), info=info)
    if dist is not None and dist.distributed:
        return _open_distributed(run, dist)
    return run.open()


def writes(dist) -> bool:
    """Whether this process writes result.json and the figures and prints: rank 0, or the only one."""
    return dist is None or not dist.distributed or dist.is_main


def _follower_run(root: Path, command: str, resuming: bool):
    """What a rank other than 0 sees of the run folder: the same folder's files (its library
    call keeps its own partial results there), never run.json, its lock, result.json or figures."""
    from shortcut_fast.run_folder import PARTIAL, Store

    class FollowerRun(Store):
        def __init__(self):
            super().__init__(Path(root), resuming)
            self.command = command

        @property
        def partial(self) -> Store:
            return self.sub(PARTIAL)

        def open(self):
            return self

        def close(self, status: str = "done") -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    return FollowerRun()


def _open_distributed(run, ctx):
    """Every rank: check that the fingerprinted settings agree; rank 0 opens the run folder
    (lock, fingerprint, run.json; an elastic restart resumes), the others follow its decision."""
    from shortcut_fast import distributed as sd

    sd.check_same({"settings": run.settings, "resume": run.resume, "overwrite": run.overwrite}, ctx,
                  f"{run.command} settings")
    if ctx.restart_count > 0:
        run.resume = True  # torchrun restarted the workers: continue from the partial results
    decision = None
    if ctx.is_main:
        try:
            run.open()
            decision = {"resuming": run.resuming}
        except ValueError as exc:
            decision = {"error": str(exc)}
    decision = sd.broadcast(decision, ctx)
    sd.barrier(ctx)
    if "error" in decision:
        raise ValueError(decision["error"])
    return run if ctx.is_main else _follower_run(run.root, run.command, decision["resuming"])


# ---- training and the model cache

class Artifact:
    """Something a command derives from the training itself (e.g. freq-probe's band-learning
    snapshots), cached with the model under `name` so that a reused model comes with it."""

    def __init__(self, name: str, state_dict, load_state_dict):
        self.name, self.state_dict, self.load_state_dict = name, state_dict, load_state_dict


def band_learning(splits, cfg, run, *, every: int, until: int, device, backend: str = "auto"):
    """freq-probe's band-learning tracker (on data whose bands carry the labels by construction,
    synthetic-freq): the band-stop accuracy of up to 200 validation images every `every`
    training steps until `until`. Returns (tracker, training hooks that feed it and keep its
    snapshots in <run>/model/learning-tracker.json for a resume, the Artifact that caches
    them with the model, so that a reused model comes with its snapshots)."""
    import torch

    from shortcut_fast.experiments import freq_probe as fp
    from shortcut_fast.run_folder import fingerprint

    n_eval = min(len(splits.val), 200)
    x_val, y_val, _ = splits.val.get_batch(torch.arange(n_eval, device=splits.val.labels.device))
    tracker = fp.BandLearningTracker(x_val.to(device), y_val.to(device), splits.num_classes, every, until=until,
                                     batch_size=cfg.resolved(device).batch_size, backend=backend,
                                     precision=cfg.precision,
                                     centre=lambda net: fp.input_centre(cfg.filter_centre, net, splits.train,
                                                                        channels=splits.image_shape[0],
                                                                        device=device))
    saved = run.load_json("model/learning-tracker.json")
    if saved is not None:  # snapshots of the epochs already trained
        tracker.load_state_dict(saved)
    hooks = {"on_step_end": tracker,
             "on_epoch_end": lambda *_: run.save_json("model/learning-tracker.json", tracker.state_dict())}
    what = {"every": every, "until": until, "images": n_eval, "filter_centre": cfg.filter_centre}
    artifact = Artifact(f"band-learning-{fingerprint(what)}.json", tracker.state_dict, tracker.load_state_dict)
    return tracker, hooks, (artifact,)


def train_here(net, splits, cfg, store, *, quiet: bool, **hooks):
    """Train `net` into `store` (e.g. run.sub("model")); a resuming run continues from its last.pt."""
    from shortcut_fast.train import train

    return train(net, splits, cfg, store=store, progress=not quiet, **hooks)


def _cached_train_result(entry, cfg, out: Path):
    """The TrainResult of the training that produced a cached model (as that run reported it)."""
    from shortcut_fast.report import read_json
    from shortcut_fast.train import EvalResult, TrainResult

    names = {f.name for f in dataclasses.fields(EvalResult)}

    def evaluation(d: dict) -> EvalResult:
        d = {k: v for k, v in d.items() if k in names}
        for key in ("group_accuracy", "group_counts"):
            d[key] = {int(g): v for g, v in (d.get(key) or {}).items()}
        return EvalResult(**d)

    summary = entry.info["train_result"]
    # the configuration as the training run recorded it (with its automatic settings decided)
    return TrainResult(config=summary.get("config") or dataclasses.asdict(cfg), epochs_run=summary["epochs_run"],
                       best_epoch=summary["best_epoch"], history=read_json(entry.file("history.json")),
                       final={k: evaluation(v) for k, v in summary["final"].items()}, seconds=summary["seconds"],
                       out_dir=str(out))


def trained_model(settings: dict, splits, run, resolved, cfg, store, *, need_epochs=(), artifacts=(), net=None,
                  **hooks):
    """The model of the resolved recipe, trained with `cfg` into `store` (resumable): taken from
    the model cache when it holds it (its files are copied into `store`, so the run folder looks
    the same), else trained here and stored in the cache (unless settings["no_cache"]).
    need_epochs: epoch checkpoints the command reads; artifacts: Artifacts it needs from the
    training; net: the freshly built model to train (default: built here). Returns (model,
    TrainResult, cache record for result.json)."""
    import torch

    from shortcut_fast.model_cache import ModelCache, model_identity, model_key
    from shortcut_fast.report import read_json
    from shortcut_fast.run_folder import file_digest

    seed = settings.get("seed", 0)
    cache = None if settings.get("no_cache") else ModelCache()
    record = {"key": None, "reused": False, "folder": None}
    entry = None
    if cache is not None:
        pretrained, weights = settings.get("pretrained"), settings.get("weights")
        identity = model_identity(data=splits.identity(), model=resolved.model, model_options=resolved.model_options,
                                  train=dataclasses.asdict(cfg), seed=seed,
                                  pretrained=file_digest(pretrained) if pretrained else None,
                                  **({"weights": file_digest(weights)} if weights else {}))
        record["key"] = key = model_key(identity)
        entry = cache.lookup(key)
        lacking = []
        if entry is not None and not entry.has_epochs(need_epochs):
            lacking.append("the epoch checkpoints")
        lacking += [a.name for a in artifacts if entry is not None and entry.artifact(a.name) is None]
        if lacking:
            say(f"cached model {key} lacks {', '.join(lacking)}: training it here")
            entry = None
    if entry is not None:
        try:
            entry.materialize(store.root, epochs=need_epochs)
            net = checkpoint_model(store.root / "best.pt", splits, what="cached model")
            for artifact in artifacts:
                artifact.load_state_dict(read_json(entry.artifact(artifact.name)))
            result = _cached_train_result(entry, cfg, store.root)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            say(f"cached model {entry.key} is unusable ({str(exc)[:200]}): training it here")
            entry = None
        else:
            created = str(entry.info.get("created", "?")).replace("T", " ")
            say(f"reusing cached model {entry.key} (trained by {entry.info.get('command', '?')} on {created}; "
                f"--no-cache trains it anew)")
            return net, result, {**record, "reused": True, "folder": str(entry.path)}
    if net is None:
        net = build_model(resolved.model, splits, resolved.model_options, seed, settings.get("pretrained"),
                          settings.get("weights"))
    result = train_here(net, splits, cfg, store, quiet=settings.get("quiet", False), **hooks)
    if cache is not None:
        info = {"command": f"shortcut-fast {run.command}", "out": str(run.root), "data": settings["data"],
                "model": resolved.model, "model_options": resolved.model_options, "recipe": resolved.name,
                "recipe_source": resolved.recipe.source, "epochs": cfg.epochs, "seed": seed,
                "device": cfg.device, "torch": torch.__version__, "identity": identity,
                "train_result": {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                                 "seconds": result.seconds, "final": result.final, "config": result.config}}
        try:
            stored, mine = cache.store(record["key"], store.root, info)
            if not mine:  # the entry was there already (lacking what this command needs) or another process won
                cache.add_files(stored, store.root, [p.name for p in store.glob("epoch_*.pt")])
            for artifact in artifacts:
                if stored.artifact(artifact.name) is None:
                    cache.save_artifact(stored, artifact.name, artifact.state_dict())
            record["folder"] = str(stored.path)
        except OSError as exc:  # a full disk or a read-only cache must not fail the run
            warn(f"the model was not cached in {cache.root} ({exc})")
    return net, result, record


def _shared_model(settings: dict, splits, run, resolved, train_cfg, dist, **kwargs):
    """Distributed: rank 0 gets the model (cache or training, as in one process) and sends its
    weights to every rank, which builds the same architecture. The wait uses a gloo group with
    a long timeout: training may take longer than a collective's default timeout."""
    from datetime import timedelta

    import torch

    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7))
    box = [None]
    if dist.is_main:
        try:
            store = run.sub(kwargs.pop("store_name"))
            net, trained, cache = trained_model(settings, splits, run, resolved, train_cfg, store, **kwargs)
        except BaseException as exc:
            box = [{"error": str(exc) or type(exc).__name__}]
            torch.distributed.broadcast_object_list(box, src=0, group=group)
            raise
        box = [{"state": {k: v.detach().cpu() for k, v in net.state_dict().items()}}]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    if "error" in box[0]:
        raise ValueError(box[0]["error"])
    if dist.is_main:
        return net, trained, cache
    net = build_model(resolved.model, splits, resolved.model_options, settings.get("seed", 0),
                      settings.get("pretrained"))
    net.load_state_dict(box[0]["state"])
    return net, None, None


def analysed_model(settings: dict, splits, run, resolved, train_cfg, *, store_name: str = "model", need_epochs=(),
                   artifacts=(), dist=None, **hooks):
    """The model an analysis studies: --checkpoint (checked against the data), --model with
    --weights, or the recipe's model, cached or trained here into <out>/<store_name>
    (resumable). Returns (model, training summary or None, cache record or None)."""
    if given_model(settings):
        return given_model_of(settings, splits, resolved), None, None
    if dist is not None and dist.distributed:
        net, result, cache = _shared_model(settings, splits, run, resolved, train_cfg, dist, store_name=store_name,
                                           need_epochs=need_epochs, artifacts=artifacts, **hooks)
        if result is None:  # a rank other than 0: the model only
            return net, None, None
    else:
        net, result, cache = trained_model(settings, splits, run, resolved, train_cfg, run.sub(store_name),
                                           need_epochs=need_epochs, artifacts=artifacts, **hooks)
    return net, {"epochs": result.epochs_run, "test_accuracy": result.final["test"].accuracy,
                 "model_dir": str(run.root / store_name)}, cache


def prepare(data: str, purpose: str = "train", *, folder, model: str | None = None, model_options: dict | None = None,
            recipe: str | None = None, epochs: int | None = None, weights=None, checkpoint=None, seed: int = 0,
            data_options: dict | None = None, device="cpu", resume: bool = True, cache: bool = True,
            quiet: bool = True):
    """(DatasetSplits, model) the way a command gets them, for the Python API: the dataset
    `data` (a name, imagefolder:PATH or csv:FILE) and the model of its recipe for `purpose`
    (train, freq-probe, complexity, memorization, mitigate) trained in `folder` (a run folder:
    resumable, refused when it holds other settings) or taken from the model cache; or the
    model of `checkpoint`, or `model` with your `weights`. E.g.

        splits, net = sf.pipeline.prepare("mnist-5k", "freq-probe", folder="runs/model")
        result = sf.freq_probe.run(net, splits, sf.freq_probe.Config())
    """
    from pathlib import Path

    from shortcut_fast.train import resolve_device

    device = resolve_device(device)
    settings = {"data": data, "data_option": [f"{k}={json.dumps(v)}" for k, v in (data_options or {}).items()],
                "seed": seed, "model": model,
                "model_option": [f"{k}={json.dumps(v)}" for k, v in (model_options or {}).items()],
                "recipe": recipe, "epochs": epochs, "checkpoint": Path(checkpoint) if checkpoint else None,
                "weights": Path(weights) if weights else None, "pretrained": None, "no_cache": not cache,
                "quiet": quiet, "out": Path(folder), "resume": resume, "overwrite": False, "device": str(device)}
    splits, resolved, model_settings = analysis_inputs(settings, purpose, {"epochs": epochs})
    trains = not given_model(settings)
    with open_run(f"prepare {purpose}", settings, splits, model_settings=model_settings,
                  recipe=resolved if trains else None) as run:
        net, _, _ = analysed_model(settings, splits, run, resolved, train_config(resolved, settings, device))
    return splits, net
