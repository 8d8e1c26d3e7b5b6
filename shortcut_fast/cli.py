"""The `shortcut-fast` command line: thin shells over the library.

Each command parses and checks its options, opens its run folder (shortcut_fast.run_folder:
fingerprint of every setting that changes a result, lock, resume), calls the experiment,
writes `<out>/result.json` (and figures), and prints a short table. Usage errors exit
with status 2, runtime errors with 1, each as one line naming the argument or file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

# Options recorded in run.json but not fingerprinted: they decide where and how fast a run
# goes, not what it computes (backends agree within float tolerance).
# --data-root and --download only say where the data comes from: its identity (content
# digest) is fingerprinted instead. --no-cache only says whether a cached model may be reused
# (the cache holds the model the same settings train).
# --nproc and --max-restarts only say how many processes share the work (the results equal the
# one-process run's; see shortcut_fast.distributed).
EXECUTION_OPTIONS = {"out", "resume", "overwrite", "quiet", "device", "backend", "data_root", "download", "no_cache",
                     "nproc", "max_restarts"}


def _parse_options(pairs: tuple[str, ...], what: str) -> dict:
    """KEY=VALUE pairs -> dict, values parsed as JSON where possible (ints, floats, bools)."""
    options = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=what)
        key, value = pair.split("=", 1)
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return options


def _fail(exc: Exception) -> None:
    message = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0])
    raise click.ClickException(message) from exc


# ---- option parsing (callbacks turn bad values into usage errors naming the option)

def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 0,3, got {value!r}") from None
    if not items:
        raise click.BadParameter(f"expected at least one integer, got {value!r}")
    return items


def _name_list(ctx, param, value):
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter(f"expected comma-separated names, got {value!r}")
    return items


def _float_list(ctx, param, value):
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


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
FRACTION = click.FloatRange(0, 1, min_open=True, max_open=True)

device_option = click.option("--device", default="auto", callback=_device, help="auto, cpu, cuda or cuda:N.")
backend_option = click.option("--backend", type=click.Choice(["auto", "torch", "cpp", "cuda", "triton"]),
                              default="auto", help="Kernel backend of the ops (see `shortcut-fast info`).")


def _options(*decorators):
    def decorate(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return decorate


backend_and_device = _options(backend_option, device_option)


ARGV_KEY = "shortcut_fast.argv"


class _Group(click.Group):
    """The command group, remembering the command line it was given (--nproc re-launches it)."""

    def parse_args(self, ctx, args):
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="shortcut-fast")
def main():
    """Fast experiments on shortcut learning."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def info(as_json):
    """Versions, devices, and which backends are usable here (and why not)."""
    from shortcut_fast.backends import info as backend_info

    data = backend_info()
    data["distributed"] = _distributed_info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"shortcut-fast {data['shortcut_fast']}  torch {data['torch']} (CUDA {data['torch_cuda']})  "
               f"triton {data['triton']}")
    click.echo(f"GPUs: {', '.join(data['gpus']) or 'none'}")
    click.echo(f"distributed: {_distributed_line(data['distributed'])}")
    click.echo(f"compiled extension: {data['extension']}"
               + (f" (CUDA kernels: {'yes' if data['extension_cuda'] else 'no'}, "
                  f"OpenMP threads: {data.get('extension_openmp_threads')})" if data["extension"] == "loaded" else ""))
    for device, backends in data["backends"].items():
        click.echo(f"\nbackends on {device}:")
        for name, status in backends.items():
            mark = "yes" if status["usable"] else "no "
            click.echo(f"  {name:<7} {mark}  {status['reason']}")
    click.echo("\nverified by `shortcut-fast selftest --record` (bench/results/verified.jsonl):")
    for line in _verified_lines():
        click.echo(f"  {line}")


def _distributed_info() -> dict:
    """What a distributed run would see here: torch.distributed and its backends, and the
    torchrun environment (read as distributed.context() reads it, without starting a group)."""
    import os

    import torch

    available = torch.distributed.is_available()
    info = {"available": available,
            "gloo": available and torch.distributed.is_gloo_available(),
            "nccl": available and torch.distributed.is_nccl_available(),
            "under_torchrun": "WORLD_SIZE" in os.environ}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR",
                "MASTER_PORT"):
        if key in os.environ:
            info[key.lower()] = os.environ[key]
    return info


def _distributed_line(info: dict) -> str:
    if not info["available"]:
        return "torch.distributed is not available in this PyTorch build (one process only)"
    backends = f"gloo {'yes' if info['gloo'] else 'no'}, nccl {'yes' if info['nccl'] else 'no'}"
    if not info["under_torchrun"]:
        return (f"torch.distributed yes ({backends}); not under torchrun: one process (run several with "
                f"--nproc N, or torchrun --nproc-per-node N -m shortcut_fast <command>)")
    return (f"torch.distributed yes ({backends}); under torchrun: rank {info.get('rank', '?')} of world size "
            f"{info.get('world_size')} (local rank {info.get('local_rank', '?')}, restart "
            f"{info.get('torchelastic_restart_count', '0')}, rendezvous {info.get('master_addr', '?')}:"
            f"{info.get('master_port', '?')}); process group nccl with a CUDA --device, else gloo")


def _verified_lines() -> list[str]:
    """Which backend passed its selftest on which hardware, and which never ran on a GPU."""
    from shortcut_fast.bench.common import verified_backends

    records = verified_backends()
    lines = []
    for (backend, mode), recs in records.items():
        for r in recs:
            verdict = "passed" if r["failed"] == 0 else f"FAILED {r['failed']} of"
            lines.append(f"{backend:<7} ({mode}) {verdict} {r['passed'] + r['failed']} checks on {r['device']}, "
                         f"{r['date'][:10]}, commit {r['commit']}")
    on_gpu = {backend for (backend, mode), recs in records.items()
              if mode == "compiled" and any(not r["device_slug"].startswith("cpu") and r["failed"] == 0 for r in recs)}
    for backend in ("cuda", "triton"):
        if backend not in on_gpu:
            lines.append(f"{backend:<7} never verified on a GPU: run `shortcut-fast selftest --device cuda` there")
    return lines or ["no records"]


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


@main.group("cache")
def cache_group():
    """The cache of trained models that every command reuses ($SHORTCUT_FAST_CACHE, else
    ~/.cache/shortcut-fast/models); --no-cache on a command neither reads nor writes it."""


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@cache_group.command("list")
def cache_list():
    """One line per cached model: key, data, model, recipe, epochs, test accuracy, size, date."""
    from shortcut_fast.model_cache import ModelCache
    from shortcut_fast.report import format_table

    cache = ModelCache()
    entries = cache.entries()
    click.echo(f"model cache {cache.root}: {len(entries)} model(s)")
    if not entries:
        return
    rows = []
    for e in entries:
        info = e.info
        options = ", ".join(f"{k}={v}" for k, v in (info.get("model_options") or {}).items())
        test = ((info.get("train_result") or {}).get("final") or {}).get("test") or {}
        accuracy = test.get("accuracy")
        rows.append([e.key, info.get("data", "?"), f"{info.get('model', '?')}{f' ({options})' if options else ''}",
                     info.get("recipe", "?"), info.get("epochs", "?"),
                     float("nan") if accuracy is None else float(accuracy), _size(e.size_bytes()),
                     str(info.get("created", "?"))[:10], info.get("command", "?")])
    click.echo(format_table(rows, ["key", "data", "model", "recipe", "epochs", "test accuracy", "size", "date",
                                   "trained by"]))


@cache_group.command("clear")
@click.option("--yes", is_flag=True, help="Confirm: delete every cached model.")
def cache_clear(yes):
    """Delete every cached model (asks for --yes)."""
    from shortcut_fast.model_cache import ModelCache

    cache = ModelCache()
    n = len(cache.entries())
    if not yes:
        raise click.BadParameter(f"this deletes {n} cached model(s) in {cache.root}; pass --yes to confirm",
                                 param_hint="--yes")
    click.echo(f"deleted {cache.clear()} cached model(s) from {cache.root}")


# ---- shared option groups

def data_options_with(default_data: str):
    """Options of every command that loads a dataset (default dataset per command)."""
    return _options(
        click.option("--data", "data", default=default_data, show_default=True,
                     help="Dataset name (see `shortcut-fast datasets`)."),
        click.option("--data-root", type=click.Path(path_type=Path), default=None,
                     help="Folder with dataset files (default: $SHORTCUT_FAST_DATA)."),
        click.option("--download", is_flag=True, help="Allow downloading a missing dataset (network)."),
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
    return _options(*decorators)


def _quick_help(purpose: str) -> tuple[str, str, str]:
    """(model, -M, epochs) help texts naming the quick recipe's defaults."""
    from shortcut_fast.recipes import QUICK

    q = QUICK[purpose]
    width = f" (quick recipe: width={q.default_width} where the model has a width)" if q.default_width else ""
    return (f"Architecture to train (default: the recipe's; quick: {q.model}).", f"Model option, e.g. -M width=32{width}.",
            f"default: the recipe's; quick: {q.train['epochs']}")


def recipe_options(purpose: str):
    """--recipe and --no-cache of every command that trains one model."""
    return _options(
        click.option("--recipe", type=click.Choice(["paper", "quick"]), default=None,
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


def model_options(purpose: str, epochs_help: str = "Training epochs"):
    """--model/-M/--checkpoint/--epochs/--pretrained/--recipe/--no-cache of the analysis commands
    (train a model by a recipe, or load one)."""
    model_help, option_help, epochs_default = _quick_help(purpose)
    return _options(
        click.option("--model", default=None, help=model_help.replace("train", "train when no --checkpoint is given")),
        click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE", help=option_help),
        click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="A checkpoint written by `shortcut-fast train` (skips training)."),
        click.option("--epochs", type=POSITIVE, default=None,
                     help=f"{epochs_help} when no --checkpoint is given ({epochs_default})."),
        pretrained_option,
        recipe_options(purpose),
    )


# ---- distributed runs (torchrun, or --nproc N; shortcut_fast.distributed)

# The library call of each command that runs distributed: it gets dist= when it accepts one.
DISTRIBUTED_CALLS = {
    "train": ("shortcut_fast.train", "train"),
    "freq-probe": ("shortcut_fast.experiments.freq_probe", "run_freq_probe"),
    "complexity": ("shortcut_fast.experiments.complexity", "run_complexity"),
    "memorization": ("shortcut_fast.experiments.memorization", "run_memorization"),
    "mitigate": ("shortcut_fast.experiments.memorization", "run_mitigation"),
    "localize": ("shortcut_fast.experiments.localization", "run_localization"),
    "denetdm": ("shortcut_fast.experiments.denetdm", "run_denetdm"),
}

_DIST = None  # the DistContext of the command running in this process (None: one process)


def _dist_ctx():
    """The running command's DistContext when it runs distributed (world size > 1), else None."""
    return _DIST if _DIST is not None and _DIST.distributed else None


def _writes() -> bool:
    """Whether this process writes result.json and the figures and prints: rank 0, or the only one."""
    return _dist_ctx() is None or _DIST.is_main


def _dist_kw() -> dict:
    """{"dist": ctx} for the library call when running distributed, else {}."""
    ctx = _dist_ctx()
    return {} if ctx is None else {"dist": ctx}


def _accepts_dist(command: str) -> bool:
    import importlib
    import inspect

    module, name = DISTRIBUTED_CALLS[command]
    return "dist" in inspect.signature(getattr(importlib.import_module(module), name)).parameters


def _check_distributable(command: str, world: int) -> None:
    if not _accepts_dist(command):
        module, name = DISTRIBUTED_CALLS[command]
        raise click.ClickException(
            f"{command} does not run distributed yet ({module}.{name} takes no dist=); run it in one process "
            f"(without --nproc / torchrun), not in {world}")


def _strip_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the options `names` and their values (`--name V` or `--name=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in names:
            skip = True
            continue
        if any(arg.startswith(n + "=") for n in names):
            continue
        out.append(arg)
    return out


def _launch(nproc: int, max_restarts: int) -> int:
    """Run this command line (without --nproc / --max-restarts) in `nproc` processes on this
    machine through torch.distributed.run (standalone c10d rendezvous); their exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = click.get_current_context().meta.get(ARGV_KEY)
    if argv is None:
        raise click.ClickException("--nproc: the command line is unknown here (call shortcut-fast from a shell, "
                                   "or torchrun -m shortcut_fast)")
    argv = _strip_options(argv, ("--nproc", "--max-restarts"))
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts",
                                         str(max_restarts), "-m", "shortcut_fast", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        main_failure = (getattr(exc, "failures", None) or {}).get(0)
        if main_failure is not None and main_failure.exitcode > 0:
            # rank 0 failed with an exit status: it printed the one error line itself (the other
            # ranks, refusing the same input, are quiet), whichever rank the launcher saw first
            return main_failure.exitcode
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        if rank != 0 or failure.exitcode < 0:  # rank 0 printed its own error; say which other rank failed
            how = failure.signal_name() if failure.exitcode < 0 else f"exit status {failure.exitcode}"
            click.echo(f"Error: rank {rank} of {nproc} failed ({how}); its messages are above", err=True)
        return code
    return 0


def distributed_command(command: str):
    """Decorator of a long command: --nproc / --max-restarts, and under torchrun the context
    every rank runs in (rank 0 prints and writes; every other rank is quiet, its errors too,
    and exits with the same status)."""
    import functools

    def decorate(f):
        @functools.wraps(f)
        def wrapper(**params):
            return _run_command(command, f, params)

        wrapper = click.option(
            "--max-restarts", type=NON_NEGATIVE, default=0,
            help="With --nproc: restart the processes up to this many times after one fails (they resume from "
                 "their partial results).")(wrapper)
        wrapper = click.option(
            "--nproc", type=POSITIVE, default=None,
            help="Run in N processes on this machine (one per GPU with --device cuda; gloo on the CPU): the same "
                 "results, work split across them (torchrun -m shortcut_fast for several machines).")(wrapper)
        return wrapper

    return decorate


def _run_command(command: str, f, params: dict):
    import contextlib
    import os

    global _DIST
    from shortcut_fast import distributed as sd

    under = "WORLD_SIZE" in os.environ
    nproc, restarts = params["nproc"], params["max_restarts"]
    if under and nproc is not None:
        raise click.BadParameter("this process already runs under torchrun (WORLD_SIZE is set), whose "
                                 "--nproc-per-node says how many processes run; drop --nproc", param_hint="--nproc")
    if restarts and (under or not nproc or nproc < 2):
        raise click.BadParameter("applies with --nproc N (N > 1) only; under torchrun give torchrun --max-restarts",
                                 param_hint="--max-restarts")
    if not under and nproc is not None and nproc > 1:
        _check_distributable(command, nproc)
        sys.exit(_launch(nproc, restarts))
    follower = under and os.environ.get("RANK", "0") not in ("", "0")
    try:
        with contextlib.ExitStack() as stack:
            if follower:  # quiet: rank 0 prints the tables (and every error all ranks share)
                params = {**params, "quiet": True}
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            world = int(os.environ.get("WORLD_SIZE") or 1) if under else 1
            if world > 1:
                _check_distributable(command, world)
            try:
                ctx = sd.context(params["device"])
            except (ValueError, RuntimeError) as exc:
                _fail(exc)
            if ctx.distributed:
                params = {**params, "device": ctx.device}  # this rank's GPU (cuda:LOCAL_RANK) or the CPU
                _DIST = ctx
            try:
                return f(**params)
            finally:
                _DIST = None
                if ctx.distributed:
                    sd.shutdown()
    except click.ClickException as exc:
        if follower:
            raise SystemExit(exc.exit_code) from None
        raise


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

    try:
        sd.check_same({"settings": run.settings, "resume": run.resume, "overwrite": run.overwrite}, ctx,
                      f"{run.command} settings")
    except ValueError as exc:
        _fail(exc)
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
        raise click.ClickException(decision["error"])
    return run if ctx.is_main else _follower_run(run.root, run.command, decision["resuming"])


def _shared_model(params: dict, splits, run, resolved, train_cfg, ctx, **kwargs):
    """Distributed: rank 0 gets the model (cache or training, as in one process) and sends its
    weights to every rank, which builds the same architecture. The wait uses a gloo group with
    a long timeout: training may take longer than a collective's default timeout."""
    from datetime import timedelta

    import torch

    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7))
    box = [None]
    if ctx.is_main:
        try:
            store = run.sub(kwargs.pop("store_name"))
            net, trained, cache = _trained_model(params, splits, run, resolved, train_cfg, store, **kwargs)
        except BaseException as exc:
            box = [{"error": str(exc) or type(exc).__name__}]
            torch.distributed.broadcast_object_list(box, src=0, group=group)
            raise
        box = [{"state": {k: v.detach().cpu() for k, v in net.state_dict().items()}}]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    if "error" in box[0]:
        raise click.ClickException(box[0]["error"])
    if ctx.is_main:
        return net, trained, cache
    net = _build_model(resolved.model, splits, resolved.model_options, params["seed"], params.get("pretrained"))
    net.load_state_dict(box[0]["state"])
    return net, None, None


# ---- shared steps

def _load_data(params: dict, defaults: dict | None = None):
    """The dataset of --data with its options; `defaults` (a recipe's data options, e.g.
    image_size=224) apply under any -D the user gives."""
    from shortcut_fast.data import load_dataset

    options = {**(defaults or {}), **_parse_options(params["data_option"], "--data-option")}
    if params.get("bias_band") is not None:
        options["bias_band"] = params["bias_band"]
    if params.get("conflict_ratio") is not None:
        options["conflict_ratio"] = params["conflict_ratio"]
    try:
        return load_dataset(params["data"], root=params["data_root"], download=params["download"],
                            seed=params["seed"], **options)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        _fail(exc)


def _model_settings(model: str, model_option: tuple, default_width: int | None) -> dict:
    """-M pairs over the command's defaults: `-M padding=2` keeps the default width."""
    from shortcut_fast.models import model_option_names

    try:
        names = model_option_names(model)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    options = {"width": default_width} if default_width and names and "width" in names else {}
    options.update(_parse_options(model_option, "--model-option"))
    return options


def _resolve_recipe(params: dict, purpose: str, train: dict | None = None):
    """The recipe of --recipe (default: the dataset's) with the options given explicitly on
    top (--model, -M, and the training options in `train`; None = not given). A paper recipe
    that starts from pretrained weights needs --pretrained unless a --checkpoint is given."""
    from shortcut_fast import recipes

    model_option = _parse_options(params["model_option"], "--model-option")
    try:
        recipe = recipes.recipe_for(params["data"], purpose, params.get("recipe"))
        resolved = recipes.resolve(recipe, model=params.get("model"), model_option=model_option, train=train)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    if (recipe.pretrained and resolved.model == recipe.model and not params.get("pretrained")
            and not params.get("checkpoint")):
        raise click.BadParameter(
            f"the {recipe.name} recipe of {recipe.dataset} ({purpose}) fine-tunes {recipe.pretrained}: give that file "
            f"as --pretrained FILE (nothing is downloaded), or choose --recipe quick", param_hint="--pretrained")
    return resolved


def _analysis_inputs(params: dict, purpose: str, train: dict | None = None):
    """(data, resolved recipe, model options when the model is trained here (None with --checkpoint))."""
    resolved = _resolve_recipe(params, purpose, train)
    splits = _load_data(params, resolved.data_options)
    return splits, resolved, (None if params["checkpoint"] else resolved.model_options)


def _train_config(resolved, params: dict, device, **extra):
    """The TrainConfig of a resolved recipe (seed and device from the command)."""
    from shortcut_fast.train import TrainConfig

    try:
        return TrainConfig(**resolved.train, seed=params["seed"], device=str(device), **extra)
    except ValueError as exc:
        _fail(exc)


def _announce_recipe(resolved, splits, device) -> None:
    """One line at the start of a run that trains: the recipe; on a CPU, for `paper`, the
    expected duration and how to ask for `quick` instead."""
    import torch

    from shortcut_fast import recipes

    click.echo(resolved.line())
    if resolved.recipe.fallback_from:
        click.echo(f"note: {resolved.recipe.note}")
    if resolved.name == "paper" and torch.device(str(device)).type == "cpu":
        seconds = recipes.estimate_seconds(resolved, len(splits.train), len(splits.val))
        expected = (f"expected training time on a 2-core CPU like the project's: about "
                    f"{recipes.format_duration(seconds)}" if seconds is not None
                    else f"no measured training time for {resolved.model} on a CPU")
        click.echo(f"{expected}; use --recipe quick for a CPU-minutes run")


def _build_model(model: str, splits, options: dict, seed: int, pretrained=None):
    from shortcut_fast.models import build_model
    from shortcut_fast.train import seed_everything

    seed_everything(seed)  # --seed controls the initialization too
    channels, size = splits.image_shape[0], splits.image_shape[-1]
    try:
        return build_model(model, num_classes=splits.num_classes, in_channels=channels, image_size=size,
                           pretrained=pretrained, **options)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
        _fail(exc)


def _checkpoint_model(path: Path, splits, what: str = "--checkpoint"):
    """A model from `path`, refused when it was built for other data."""
    from shortcut_fast.models import check_model_fits, model_from_checkpoint

    net = model_from_checkpoint(path, what=what)
    check_model_fits(net, num_classes=splits.num_classes, in_channels=splits.image_shape[0],
                     image_size=splits.image_shape[-1], source=f"{what} {str(path)!r}")
    return net


def _open_run(command: str, params: dict, splits, *, model_settings: dict | None = None,
              not_fingerprinted: tuple[str, ...] = (), recipe=None):
    """The command's RunFolder, opened: settings = every option except the execution ones,
    with files replaced by their content digests, plus the data's identity and the resolved
    training recipe (`recipe`, when the command trains its model)."""
    import torch

    import shortcut_fast
    from shortcut_fast.run_folder import RunFolder, file_digest

    skip = EXECUTION_OPTIONS | set(not_fingerprinted)
    settings = {}
    for key, value in params.items():
        if key in skip:
            continue
        if isinstance(value, Path) and value.is_file():
            value = f"sha256:{file_digest(value)}"  # a file's identity is its content
        elif isinstance(value, Path) and value.is_dir() and key == "checkpoints":
            value = {p.name: file_digest(p) for p in sorted(value.glob("*.pt"))}
        settings[key] = value
    if model_settings is not None:
        settings["model_option"] = model_settings
    if recipe is not None:
        settings["recipe"] = {"name": recipe.name, "model": recipe.model, "model_options": recipe.model_options,
                              "train": recipe.train, "data_options": recipe.data_options}
    settings["data_identity"] = splits.identity()
    info = {k: str(params[k]) for k in EXECUTION_OPTIONS & set(params) if k not in ("quiet", "overwrite")}
    info.update(shortcut_fast=getattr(shortcut_fast, "__version__", "?"), torch=torch.__version__)
    run = RunFolder(params["out"], command, settings, resume=params.get("resume", False),
                    overwrite=params["overwrite"], info=info)
    if _dist_ctx() is not None:
        return _open_distributed(run, _dist_ctx())
    try:
        return run.open()
    except ValueError as exc:
        _fail(exc)


def _train_here(net, splits, cfg, store, *, quiet: bool, **hooks):
    """Train `net` into `store` (e.g. run.sub("model")); a resuming run continues from its last.pt."""
    from shortcut_fast.train import train as run_training

    try:
        return run_training(net, splits, cfg, store=store, progress=not quiet, **hooks)
    except (ValueError, FloatingPointError) as exc:
        _fail(exc)


class _Artifact:
    """Something a command derives from the training itself (e.g. freq-probe's band-learning
    snapshots), cached with the model under `name` so that a reused model comes with it."""

    def __init__(self, name: str, state_dict, load_state_dict):
        self.name, self.state_dict, self.load_state_dict = name, state_dict, load_state_dict


def _cached_train_result(entry, cfg, out: Path):
    """The TrainResult of the training that produced a cached model (as that run reported it)."""
    import dataclasses

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


def _trained_model(params: dict, splits, run, resolved, cfg, store, *, need_epochs=(), artifacts=(), net=None,
                   **hooks):
    """The model of the resolved recipe, trained with `cfg` into `store` (resumable): taken from
    the model cache when it holds it (its files are copied into `store`, so the run folder looks
    the same), else trained here and stored in the cache (unless --no-cache).
    need_epochs: epoch checkpoints the command reads; artifacts: _Artifacts it needs from the
    training; net: the freshly built model to train (default: built here). Returns (model,
    TrainResult, cache record for result.json)."""
    import dataclasses

    import torch

    from shortcut_fast.model_cache import ModelCache, model_identity, model_key
    from shortcut_fast.report import read_json
    from shortcut_fast.run_folder import file_digest

    cache = None if params.get("no_cache") else ModelCache()
    record = {"key": None, "reused": False, "folder": None}
    entry = None
    if cache is not None:
        pretrained = params.get("pretrained")
        identity = model_identity(data=splits.identity(), model=resolved.model, model_options=resolved.model_options,
                                  train=dataclasses.asdict(cfg), seed=params["seed"],
                                  pretrained=file_digest(pretrained) if pretrained else None)
        record["key"] = key = model_key(identity)
        entry = cache.lookup(key)
        lacking = []
        if entry is not None and not entry.has_epochs(need_epochs):
            lacking.append("the epoch checkpoints")
        lacking += [a.name for a in artifacts if entry is not None and entry.artifact(a.name) is None]
        if lacking:
            click.echo(f"cached model {key} lacks {', '.join(lacking)}: training it here")
            entry = None
    if entry is not None:
        try:
            entry.materialize(store.root, epochs=need_epochs)
            net = _checkpoint_model(store.root / "best.pt", splits, what="cached model")
            for artifact in artifacts:
                artifact.load_state_dict(read_json(entry.artifact(artifact.name)))
            result = _cached_train_result(entry, cfg, store.root)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            click.echo(f"cached model {entry.key} is unusable ({str(exc)[:200]}): training it here")
            entry = None
        else:
            created = str(entry.info.get("created", "?")).replace("T", " ")
            click.echo(f"reusing cached model {entry.key} (trained by {entry.info.get('command', '?')} on {created}; "
                       f"--no-cache trains it anew)")
            return net, result, {**record, "reused": True, "folder": str(entry.path)}
    if net is None:
        net = _build_model(resolved.model, splits, resolved.model_options, params["seed"], params.get("pretrained"))
    result = _train_here(net, splits, cfg, store, quiet=params["quiet"], **hooks)
    if cache is not None:
        info = {"command": f"shortcut-fast {run.command}", "out": str(run.root), "data": params["data"],
                "model": resolved.model, "model_options": resolved.model_options, "recipe": resolved.name,
                "recipe_source": resolved.recipe.source, "epochs": cfg.epochs, "seed": params["seed"],
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
            click.echo(f"warning: the model was not cached in {cache.root} ({exc})", err=True)
    return net, result, record


def _analysed_model(params: dict, splits, run, resolved, train_cfg, *, store_name: str = "model", need_epochs=(),
                    artifacts=(), **hooks):
    """The model an analysis command studies: --checkpoint (checked against the data), or the
    recipe's model, cached or trained here into <out>/<store_name> (resumable). Returns (model,
    training summary or None, cache record or None)."""
    if params.get("checkpoint"):
        return _checkpoint_model(params["checkpoint"], splits), None, None
    if _dist_ctx() is not None:
        net, result, cache = _shared_model(params, splits, run, resolved, train_cfg, _dist_ctx(),
                                           store_name=store_name, need_epochs=need_epochs, artifacts=artifacts,
                                           **hooks)
        if result is None:  # a rank other than 0: the model only
            return net, None, None
        return net, {"epochs": result.epochs_run, "test_accuracy": result.final["test"].accuracy,
                     "model_dir": str(run.root / store_name)}, cache
    net, result, cache = _trained_model(params, splits, run, resolved, train_cfg, run.sub(store_name),
                                        need_epochs=need_epochs, artifacts=artifacts, **hooks)
    return net, {"epochs": result.epochs_run, "test_accuracy": result.final["test"].accuracy,
                 "model_dir": str(run.root / store_name)}, cache


def _eval_rows(final: dict) -> list[list]:
    rows = []
    for name, r in final.items():
        rows.append([name, r.n, r.accuracy, r.loss,
                     float("nan") if r.worst_group_accuracy is None else r.worst_group_accuracy,
                     float("nan") if r.aligned_accuracy is None else r.aligned_accuracy,
                     float("nan") if r.conflicting_accuracy is None else r.conflicting_accuracy])
    return rows


EVAL_HEADERS = ["split", "n", "accuracy", "loss", "worst-group", "aligned", "conflicting"]


# ---- commands

@main.command()
@data_options
@click.option("--model", default=None, help="Model name (see `shortcut-fast models`), or timm:NAME / tv:NAME "
              "(default: the recipe's; quick: resnet18).")
@click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE", help="Model option, e.g. -M width=32.")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Local weights file to start from (the paper recipes of waterbirds and celeba need a torchvision "
                   "ImageNet ResNet-50).")
@recipe_options("train")
@click.option("--epochs", type=POSITIVE, default=None, help="Default: the recipe's (quick: 10).")
@click.option("--batch-size", type=POSITIVE, default=None, help="Default: the recipe's (quick: 128).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default=None,
              help="Default: the recipe's (quick: sgd).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Default: the recipe's (quick: 0.05 with SGD, 1e-3 with Adam).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="Default: the recipe's (quick: 5e-4).")
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant", "plateau"]), default=None,
              help="Default: the recipe's (quick: cosine).")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=None,
              help="Linear learning-rate warm-up, capped at --epochs (default: the recipe's; quick: 1).")
@click.option("--augment", type=click.Choice(["none", "flip-crop", "crop", "resized-crop-flip", "pad-flip-resized-crop"]),
              default=None, help="Default: the recipe's (quick: none).")
@click.option("--select", type=click.Choice(["accuracy", "worst_group_accuracy", "last"]), default=None,
              help="Validation metric that picks the reported checkpoint (default: the recipe's; quick: accuracy).")
@click.option("--keep-every", type=NON_NEGATIVE, default=0, help="Also keep epoch_NNN.pt every k epochs (0: never).")
@click.option("--max-steps-per-epoch", type=POSITIVE, default=None)
@click.option("--compile", is_flag=True, help="torch.compile the model for the training step "
              "(first steps slower; eager with a warning where torch.compile fails).")
@device_option
@run_options("runs/train", "Continue from <out>/last.pt (same settings only).")
@distributed_command("train")
def train(**params):
    """Train a model on a dataset by a recipe; writes checkpoints, history.json and result.json to --out."""
    from shortcut_fast.report import format_table, plot_curves, write_json

    p = params
    overrides = {k: p[k] for k in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule",
                                   "warmup_epochs", "augment", "select", "max_steps_per_epoch")}
    resolved = _resolve_recipe(p, "train", overrides)
    splits = _load_data(p, resolved.data_options)
    # built before the run folder opens, so a bad model option leaves no folder behind (unused on a cache hit)
    net = _build_model(resolved.model, splits, resolved.model_options, p["seed"], p["pretrained"])
    cfg = _train_config(resolved, p, p["device"], keep_every=p["keep_every"], compile=p["compile"])
    out = p["out"]
    _announce_recipe(resolved, splits, p["device"])
    # --compile is not fingerprinted (run folders from before it existed resume); last.pt's config holds it
    with _open_run("train", p, splits, model_settings=resolved.model_options, not_fingerprinted=("compile",),
                   recipe=resolved) as run:
        extra = _dist_kw()  # distributed training: every rank trains (no model cache: every rank must)
        _, result, cache = _trained_model({**p, "no_cache": True} if extra else p, splits, run, resolved, cfg, run,
                                          net=net, need_epochs=range(p["keep_every"], cfg.epochs + 1,
                                                                     p["keep_every"] or 1) if p["keep_every"] else (),
                                          **extra)
        if not _writes():
            return
        record = {"command": "train", "data": p["data"], "dataset_meta": splits.meta, "model": resolved.model,
                  "model_options": resolved.model_options, "recipe": resolved.record(), "model_cache": cache,
                  "result": result}
        write_json(record, out / "result.json")
        plot_curves({"val accuracy": [h["val_accuracy"] for h in result.history]}, out / "val_accuracy.png",
                    xlabel="epoch", ylabel="accuracy", title=f"{resolved.model} on {p['data']}")
    click.echo(f"\n{resolved.model} on {p['data']}: {result.epochs_run} epochs in {result.seconds:.1f} s, "
               f"best epoch {result.best_epoch} (by val {cfg.select})")
    click.echo(format_table(_eval_rows(result.final), EVAL_HEADERS))
    click.echo(f"\nwrote {out / 'result.json'}")

@main.command()
@data_options
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train")
@click.option("--batch-size", type=POSITIVE, default=256)
@backend_and_device
@run_options("runs/spectrum", resume_help=None)
def spectrum(**params):
    """Class-wise amplitude spectra and ADCS maps of a dataset (one streaming pass)."""
    import torch

    from shortcut_fast.experiments.freq_probe import class_spectra
    from shortcut_fast.ops import adcs
    from shortcut_fast.ops.freq import shifted
    from shortcut_fast.report import format_table, plot_maps, write_json

    p = params
    splits = _load_data(p)
    dataset = getattr(splits, p["split"])
    out, data, split = p["out"], p["data"], p["split"]
    with _open_run("spectrum", p, splits, not_fingerprinted=("batch_size",)):
        try:
            acc = class_spectra(dataset, splits.num_classes, backend=p["backend"], batch_size=p["batch_size"],
                                device=p["device"], progress=not p["quiet"])
        except (ValueError, RuntimeError) as exc:
            _fail(exc)
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
@click.option("--method", type=click.Choice(["loss", "greedy", "gradient"]), default=None,
              help="DFM search (default: greedy on cifar10 under the paper recipe, as published; else loss).")
@click.option("--patch", type=POSITIVE, default=None, help="Patch size p of the shifted spectrum (1: single pairs; "
              "default: 1 on cifar10 under the paper recipe, else 2).")
@click.option("--top-percent", type=click.FloatRange(0, 100, min_open=True), default=5.0,
              help="DFM size in % of all frequencies.")
@click.option("--tolerance", type=NON_NEGATIVE, default=6, help="greedy: correct-count drop allowed per removal.")
@click.option("--greedy-reference", type=click.Choice(["last", "base"]), default=None,
              help="greedy: drop measured from the count after the last kept removal (published, the default) or "
                   "from the original count (ours).")
@click.option("--greedy-order", type=click.Choice(["ours", "published"]), default=None,
              help="greedy: conjugate pairs from DC outwards (ours) or the published spiral (even square images; "
                   "default: published on cifar10 under the paper recipe, else ours).")
@click.option("--filter-centre", type=click.Choice(["dataset-mean", "zero"]), default="dataset-mean",
              help="Filter x - mu and add mu back: mu = the model's normalization, else the train split's "
                   "mean colour (published: normalized input); zero: raw pixels.")
@click.option("--adcs", "adcs_variant", type=click.Choice(["ours", "published"]), default="ours",
              help="ADCS: class means, channel average (ours) or class sums, luminance weights and the published "
                   "comparison loop (every map shifted by -1, a published bug).")
@click.option("--classes", default=None, callback=_int_list, help="Comma-separated classes (default all).")
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
              "(default 128 on the CPU, 1024 on a GPU).")
@backend_and_device
@run_options("runs/freq-probe", "Continue the run in --out: reuse its model and finished classes (same settings only).")
@distributed_command("freq-probe")
def freq_probe(**params):
    """Frequency shortcuts: ADCS, dominant frequency maps, TPR/FPR, band-stop, OOD transfer."""
    import torch

    from shortcut_fast.data.corruptions import corrupted_dataset
    from shortcut_fast.experiments import freq_probe as fp
    from shortcut_fast.report import write_json
    from shortcut_fast.run_folder import fingerprint

    p = params
    splits, resolved, model_settings = _analysis_inputs(p, "freq-probe", {"epochs": p["epochs"]})
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
            amp=dev.type == "cuda", seed=p["seed"])
    except ValueError as exc:
        _fail(exc)
    for c in p["classes"] or []:
        if not 0 <= c < splits.num_classes:
            raise click.BadParameter(f"class {c} is not in [0, {splits.num_classes}) for {p['data']}",
                                     param_hint="--classes")
    try:
        ood_sets = {spec: corrupted_dataset(splits.test, spec, seed=p["seed"]) for spec in p["ood"]}
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ood") from None
    trains = not p["checkpoint"]
    if trains:
        _announce_recipe(resolved, splits, dev)
    if probe_note:
        click.echo(probe_note)
    with _open_run("freq-probe", p, splits, model_settings=model_settings, not_fingerprinted=("batch_size",),
                   recipe=resolved if trains else None) as run:
        hooks, tracker, artifacts = {}, None, ()
        if trains and has_bands and p["track_every"] > 0:
            n_eval = min(len(splits.val), 200)
            x_val, y_val, _ = splits.val.get_batch(torch.arange(n_eval, device=splits.val.labels.device))
            tracker = fp.BandLearningTracker(x_val.to(dev), y_val.to(dev), splits.num_classes, p["track_every"],
                                             until=p["track_until"], batch_size=cfg.resolved(dev).batch_size,
                                             backend=p["backend"], centre=lambda net: fp.input_centre(
                                                 cfg.filter_centre, net, splits.train,
                                                 channels=splits.image_shape[0], device=dev))
            saved = run.load_json("model/learning-tracker.json")
            if saved is not None:  # snapshots of the epochs already trained
                tracker.load_state_dict(saved)
            hooks = {"on_step_end": tracker,
                     "on_epoch_end": lambda *_: run.save_json("model/learning-tracker.json", tracker.state_dict())}
            # the snapshots come from the training itself: a cached model is reused only with them
            what = {"every": p["track_every"], "until": p["track_until"], "images": n_eval,
                    "filter_centre": cfg.filter_centre}
            artifacts = (_Artifact(f"band-learning-{fingerprint(what)}.json", tracker.state_dict,
                                   tracker.load_state_dict),)
        try:
            tcfg = _train_config(resolved, p, dev)
            net, trained, cache = _analysed_model(p, splits, run, resolved, tcfg, artifacts=artifacts, **hooks)
            if tracker is not None and cache and cache["reused"]:
                run.save_json("model/learning-tracker.json", tracker.state_dict())
            result = fp.run_freq_probe(net, splits, cfg, store=run.partial, device=dev, ood_sets=ood_sets,
                                       band_table=True, progress=not p["quiet"], **_dist_kw())
        except (ValueError, FileNotFoundError) as exc:
            _fail(exc)
        if not _writes():
            return
        if trained is not None:
            result.learning = {**(tracker.summary() if tracker else {}), "train": trained}
        result.released_dfm_sizes = fp.released_dfm_sizes(p["data"])
        write_json({"command": "freq-probe", "data": p["data"], "dataset_meta": splits.meta,
                    "model": str(p["checkpoint"] or resolved.model), "model_options": model_settings,
                    "recipe": resolved.record() if trains else None, "model_cache": cache, "result": result},
                   out / "result.json")
        fp.write_figures(result, out)
    click.echo(fp.summary(result, p["data"], out))

@main.command()
@data_options_with("colored-digits")
@model_options("complexity")
@click.option("--layers", default=None, callback=_name_list,
              help="Comma-separated block names (default: every block of the model).")
@click.option("--directions", default="nmf:64", help="Features: nmf:K, pca:K or a directions file.")
@click.option("--nmf-solver", type=click.Choice(["hals", "mu"]), default="hals",
              help="NMF solver for nmf:K (hals: coordinate descent; mu: multiplicative updates).")
@click.option("--v-information", type=click.Choice(["r2", "gaussian-nats"]), default="r2",
              help="r2: fixed-variance Gaussian family (the paper's); gaussian-nats: learned variance, "
                   "-1/2 log(1 - R^2) nats.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of epoch_NNN.pt (train --keep-every 1) for the training dynamics.")
@click.option("--dynamics", is_flag=True, help="When training here, also analyse every epoch's checkpoint.")
@click.option("--max-images", type=POSITIVE, default=2000, help="Probe-train images (from the train split).")
@click.option("--max-heldout", type=POSITIVE, default=1000, help="Held-out images.")
@click.option("--heldout-split", type=click.Choice(["val", "test"]), default="val")
@click.option("--alphas", default=None, callback=_float_list,
              help="Comma-separated ridge alphas (default: a grid scaled to each layer).")
@click.option("--batch-size", type=POSITIVE, default=256, help="Images per forward chunk.")
@backend_and_device
@run_options("runs/complexity", "Continue the run in --out: reuse its model and finished work (same settings only).")
@distributed_command("complexity")
def complexity(**params):
    """Feature complexity by V-information: per-layer decodability, importance, dynamics."""
    from shortcut_fast.experiments import complexity as cx

    p = params
    splits, resolved, model_settings = _analysis_inputs(p, "complexity", {"epochs": p["epochs"]})
    dev, out = p["device"], p["out"]
    if p["dynamics"] and (p["checkpoint"] or p["checkpoints"]):
        raise click.BadParameter("--dynamics analyses the model trained here; with --checkpoint give the "
                                 "epoch checkpoints as --checkpoints DIR instead", param_hint="--dynamics")
    try:
        cfg = cx.ComplexityConfig(layers=p["layers"], directions=p["directions"], nmf_solver=p["nmf_solver"],
                                  v_information=p["v_information"], max_images=p["max_images"],
                                  max_heldout=p["max_heldout"], heldout_split=p["heldout_split"],
                                  alphas=p["alphas"], batch_size=p["batch_size"], backend=p["backend"],
                                  seed=p["seed"])
    except ValueError as exc:
        _fail(exc)
    trains = not p["checkpoint"]
    if trains:
        _announce_recipe(resolved, splits, dev)
    with _open_run("complexity", p, splits, model_settings=model_settings,
                   not_fingerprinted=("batch_size",), recipe=resolved if trains else None) as run:
        try:
            # The quick recipe selects the last epoch: the analysed model is the end of training, the
            # reference of the dynamics; every epoch is kept for --dynamics.
            tcfg = _train_config(resolved, p, dev, keep_every=1 if p["dynamics"] else 0)
            need = range(1, tcfg.epochs + 1) if p["dynamics"] else ()
            net, trained, cache = _analysed_model(p, splits, run, resolved, tcfg, need_epochs=need)
            checkpoints = run.root / "model" if p["dynamics"] else p["checkpoints"]
            result = cx.run_complexity(net, splits, cfg, store=run.partial, checkpoints=checkpoints, device=dev,
                                       progress=not p["quiet"], **_dist_kw())
        except (ValueError, FileNotFoundError, TypeError) as exc:
            _fail(exc)
        if not _writes():
            return
        record = {"command": "complexity", "data": p["data"], "dataset_meta": splits.meta,
                  "model": str(p["checkpoint"] or resolved.model), "model_options": model_settings, "trained": trained,
                  "recipe": resolved.record() if trains else None, "model_cache": cache}
        cx.write_outputs(result, out, record)
    click.echo(cx.summary(result, p["data"], out))


@main.command()
@data_options_with("colored-digits")
@model_options("memorization", epochs_help="ERM training epochs")
@click.option("--layers", default=None, callback=_name_list,
              help="Comma-separated layer names (default: the stem conv and up to 4 blocks of the model; "
                   "with --where pre-bn/post-activation each block's conv).")
@click.option("--stem/--no-stem", default=True, help="Default layers include the model's first (stem) conv.")
@click.option("--mode", type=click.Choice(["zero", "mean", "activation-noise", "weight-noise", "rewind", "noise"]),
              default="zero", help="What replaces an ablated channel (weight-noise: the published 'noise'; "
                                   "activation-noise: ours; plain 'noise' is refused as ambiguous).")
@click.option("--where", type=click.Choice(["output", "pre-bn", "post-activation"]), default="pre-bn",
              help="Which activation of the layer is modified (pre-bn: the conv output, i.e. the published "
                   "zeroing of the channel's filter weights).")
@click.option("--repeats", type=POSITIVE, default=1, help="Noise modes: draws averaged per channel.")
@click.option("--noise-kind", type=click.Choice(["replace", "add"]), default="replace",
              help="weight-noise: replace the channel's weights with N(0, std^2), or add it.")
@click.option("--noise-std", type=click.FloatRange(min=0, min_open=True), default=None,
              help="weight-noise: the noise std (required there).")
@click.option("--weight-norm-ranking", type=click.Choice(["global", "layer"]), default="global",
              help="Weight-norm ranks over every conv but downsample (published) or within the layer.")
@click.option("--rewind-to", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="rewind: the earlier checkpoint (default: epoch 1 of the model trained here).")
@click.option("--top-k", type=POSITIVE, default=5, help="Top channels reported; largest cumulative set.")
@click.option("--grouping", type=click.Choice(["auto", "group", "alignment"]), default="auto",
              help="Dataset groups, or aligned/conflicting (auto: groups when there are <= 16).")
@click.option("--max-samples", type=POSITIVE, default=None, help="Samples per split in the sweep (default all).")
@click.option("--batch-size", type=POSITIVE, default=256)
@backend_and_device
@run_options("runs/memorization", "Continue the run in --out: reuse its model and finished layers (same settings only).")
@distributed_command("memorization")
def memorization(**params):
    """Spurious memorization: per-group gap, channel ablation sweep, critical channels."""
    from shortcut_fast.experiments import memorization as mem
    from shortcut_fast.report import format_table, write_csv, write_json

    p = params
    splits, resolved, model_settings = _analysis_inputs(p, "memorization", {"epochs": p["epochs"]})
    dev, out, mode = p["device"], p["out"], p["mode"]
    if mode == "rewind" and p["checkpoint"] and not p["rewind_to"]:
        raise click.BadParameter("--mode rewind with --checkpoint needs --rewind-to (the earlier checkpoint)",
                                 param_hint="--rewind-to")
    try:
        cfg = mem.MemorizationConfig(layers=p["layers"], mode=mode, where=p["where"], repeats=p["repeats"],
                                     stem=p["stem"], noise_kind=p["noise_kind"], noise_std=p["noise_std"],
                                     weight_norm_ranking=p["weight_norm_ranking"],
                                     top_k=p["top_k"], grouping=p["grouping"], max_samples=p["max_samples"],
                                     batch_size=p["batch_size"], backend=p["backend"], seed=p["seed"])
    except ValueError as exc:
        _fail(exc)
    trains = not p["checkpoint"]
    if trains:
        _announce_recipe(resolved, splits, dev)
    with _open_run("memorization", p, splits, model_settings=model_settings,
                   not_fingerprinted=("batch_size",), recipe=resolved if trains else None) as run:
        try:
            # The recipes select the last epoch: memorization is about the model at the end of training.
            keep = 1 if mode == "rewind" and not p["rewind_to"] else 0
            tcfg = _train_config(resolved, p, dev, keep_every=keep)
            net, _, cache = _analysed_model(p, splits, run, resolved, tcfg, need_epochs=(1,) if keep else ())
            rewind_to = p["rewind_to"] or (run.root / "model" / "epoch_001.pt" if mode == "rewind" else None)
            result = mem.run_memorization(net, splits, cfg, store=run.partial, device=dev, progress=not p["quiet"],
                                          rewind_to=rewind_to, **_dist_kw())
        except (ValueError, FileNotFoundError) as exc:
            _fail(exc)
        if not _writes():
            return
        write_json({"command": "memorization", "data": p["data"], "dataset_meta": splits.meta,
                    "model": str(p["checkpoint"] or resolved.model), "model_options": model_settings,
                    "recipe": resolved.record() if trains else None, "model_cache": cache, "result": result},
                   out / "result.json")
        write_csv(mem.top_channel_rows(result), out / "top_channels.csv")
        mem.plot_memorization(result, out)
    g = result.grouping
    click.echo(f"\nmemorization on {p['data']} ({g['kind']} groups; minority: {', '.join(g['minority'])}), "
               f"{result.seconds:.1f} s")
    rows = [[name, _num_or_nan(result.baseline["train"]["group_accuracy"].get(name)),
             _num_or_nan(result.baseline["test"]["group_accuracy"].get(name)), _num_or_nan(gap),
             g["train_counts"][g["names"].index(name)]] for name, gap in result.memorization_gap.items()]
    click.echo(format_table(rows, ["group", "train acc", "test acc", "gap", "train n"]))
    rows, headers = mem.memorization_table(result)
    click.echo(f"\ntop channels ({mode}, {p['where']}; score = minority drop - majority drop on train):")
    click.echo(format_table(rows, headers))
    click.echo(f"\nwrote {out / 'result.json'} and figures in {out}")


def _num_or_nan(v) -> float:
    return float("nan") if v is None else float(v)


@main.command()
@data_options_with("digits")
@click.option("--model", default="small-cnn", help="Architecture (see `shortcut-fast models`), or timm:NAME.")
@click.option("--model-option", "-M", multiple=True, metavar="KEY=VALUE",
              help="Model option (default width=8 where the model has a width: minutes on a CPU).")
@click.option("--shortcut", type=click.Choice(["patch", "tint", "freq", "none"]), default="patch",
              help="Shortcut planted into a fraction --rho of each class's training images (none: the "
                   "dataset's own attribute, e.g. waterbirds: skewed = its training set, clean = its group-balanced "
                   "subsample).")
@click.option("--rho", type=click.FloatRange(0, 1, min_open=True), default=0.9,
              help="Fraction of each class's training images with the shortcut, in (0, 1].")
@click.option("--shortcut-strength", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Patch opacity in (0, 1] or tint/freq amplitude (default: the shortcut's own).")
@click.option("--granularity", type=click.Choice(["stage", "block"]), default="stage",
              help="Localize per stage (layer1, layer2, ...) or per block (layer1.0, ...).")
@click.option("--blocks", default=None, callback=_name_list,
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
@distributed_command("localize")
def localize(**params):
    """Layer-wise shortcut localization: counterfactual training of every unit as one stacked ensemble."""
    from shortcut_fast.experiments import localization as loc

    p = params
    if any(pair.split("=", 1)[0].strip().replace("-", "_") in ("shortcut", "rho", "shortcut_strength")
           for pair in p["data_option"]):
        raise click.BadParameter("localize plants the shortcut itself into the clean data; use --shortcut, --rho "
                                 "and --shortcut-strength instead of -D", param_hint="--data-option")
    splits = _load_data(p)
    if p["shortcut"] == "none" and splits.num_attributes < 2:
        raise click.BadParameter(f"{p['data']} has no attributes of its own; choose --shortcut patch, tint or freq",
                                 param_hint="--shortcut")
    model_settings = _model_settings(p["model"], p["model_option"], 8)
    try:
        cfg = loc.LocalizationConfig(shortcut=p["shortcut"], rho=p["rho"], shortcut_strength=p["shortcut_strength"],
                                     granularity=p["granularity"], units=p["blocks"], epochs=p["epochs"],
                                     seeds=p["seeds"], seed=p["seed"], batch_size=p["batch_size"], lr=p["lr"],
                                     interventions=p["interventions"], probe_images=p["probe_images"])
    except ValueError as exc:
        _fail(exc)
    # Units and unit names are checked before the run folder opens (usage errors, status 2).
    probe = _build_model(p["model"], splits, model_settings, p["seed"])
    try:
        units = [*loc.model_units(probe, p["granularity"]), loc.HEAD]
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("model: "), param_hint="--model") from None
    try:
        loc.check_units(p["blocks"], units, p["granularity"])
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("blocks: "), param_hint="--blocks") from None
    out = p["out"]
    with _open_run("localize", p, splits, model_settings=model_settings) as run:
        try:
            result = loc.run_localization(lambda s: _build_model(p["model"], splits, model_settings, s), splits, cfg,
                                          store=run.partial, device=p["device"], backend=p["backend"],
                                          progress=not p["quiet"], **_dist_kw())
        except (ValueError, TypeError, FloatingPointError) as exc:
            _fail(exc)
        if not _writes():
            return
        loc.write_outputs(result, out, {"command": "localize", "data": p["data"], "dataset_meta": splits.meta,
                                        "model": p["model"], "model_options": model_settings})
    click.echo(loc.summary(result, p["data"], out))


@main.command()
@data_options_with("colored-digits")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The ERM checkpoint to start from (default: train one here with --model).")
@click.option("--model", default=None, help="Architecture of the ERM model trained when no --checkpoint (default: "
              "the recipe's; quick: small-cnn).")
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
@click.option("--contrastive-form", type=click.Choice(["sum-2n", "half-mean"]), default="sum-2n",
              help="sum-2n: NT(sg(dense), pruned) + NT(dense, sg(pruned)), 2N anchors each (published); "
                   "half-mean: half of that value (ours before).")
@click.option("--prune-layers", type=click.Choice(["conv", "conv-linear"]), default="conv",
              help="Weights the magnitude mask prunes: convs (published) or convs and linear layers.")
@click.option("--schedule", type=click.Choice(["plateau", "constant"]), default="plateau",
              help="plateau: ReduceLROnPlateau(0.5, patience 1) on the training loss (published).")
@click.option("--augment", type=click.Choice(["resized-crop-flip", "flip-crop", "crop", "none"]),
              default="resized-crop-flip", help="Training augmentation (published: RandomResizedCrop 0.7-1 + flip).")
@click.option("--double-softmax", is_flag=True,
              help="Apply softmax to the outputs before CE and NT-Xent, as the published head does "
                   "(a bug there: CE then applies softmax twice).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, help="Adam learning rate.")
@click.option("--batch-size", type=POSITIVE, default=100)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0)
@click.option("--select", type=click.Choice(["last", "accuracy", "worst_group_accuracy"]), default="last",
              help="Which epoch's weights are reported and saved as best.pt.")
@click.option("--grouping", type=click.Choice(["auto", "group", "alignment"]), default="auto")
@click.option("--max-steps-per-epoch", type=POSITIVE, default=None)
@device_option
@run_options("runs/mitigate", "Continue the run in --out: its ERM model and mitigation epochs (same settings only).")
@distributed_command("mitigate")
def mitigate(**params):
    """Mitigate spurious memorization: pruned/dense NT-Xent + CE training from the ERM model."""
    from shortcut_fast.experiments import memorization as mem
    from shortcut_fast.report import format_table, write_json

    p = params
    splits, resolved, model_settings = _analysis_inputs(p, "mitigate", {"epochs": p["erm_epochs"]})
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
        _fail(exc)
    trains = not p["checkpoint"]
    if trains:
        _announce_recipe(resolved, splits, dev)
    with _open_run("mitigate", p, splits, model_settings=model_settings, recipe=resolved if trains else None) as run:
        try:
            tcfg = _train_config(resolved, p, dev)
            net, _, cache = _analysed_model(p, splits, run, resolved, tcfg, store_name="erm")
            result = mem.run_mitigation(net, splits, cfg, store=run, progress=not p["quiet"], **_dist_kw())
        except (ValueError, FileNotFoundError, FloatingPointError) as exc:
            _fail(exc)
        if not _writes():
            return
        write_json({"command": "mitigate", "data": p["data"], "dataset_meta": splits.meta,
                    "model": str(p["checkpoint"] or out / "erm" / "last.pt"), "model_options": model_settings,
                    "recipe": resolved.record() if trains else None, "model_cache": cache, "result": result},
                   out / "result.json")
        mem.plot_mitigation(result, out)
    click.echo(f"\nmitigate on {p['data']} ({result.grouping['kind']} groups; minority: "
               f"{', '.join(result.grouping['minority'])}), {len(result.history)} epochs, {result.seconds:.1f} s")
    rows, headers = mem.mitigation_table(result)
    click.echo(format_table(rows, headers))
    click.echo(f"\nwrote {out / 'result.json'}, checkpoint {result.checkpoint}")


def _ratio_list(ctx, param, value):
    items = _float_list(ctx, param, value)
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


CIFAR_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the public C-CIFAR10 normalization


@main.command()
@click.option("--data", default="colored-digits", help="A dataset with a bias attribute per class: colored-digits, "
              "colored-mnist-5k (real digits, offline), colored-mnist, corrupted-digits, corrupted-cifar10.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Folder with dataset files (default: $SHORTCUT_FAST_DATA).")
@click.option("--download", is_flag=True, help="Allow downloading a missing dataset (network).")
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
@click.option("--arch", type=click.Choice(["auto", "mlp", "conv"]), default="auto",
              help="Branches: MLPs, or ResNet-20 vs three 5x5 convs (auto: conv for corrupted-*, else mlp).")
@click.option("--width", type=POSITIVE, default=100, help="Hidden width of the MLP branches.")
@click.option("--target", default=None, help="Model of the stage-2 target branch and of ERM/LfF (default: like "
              "the deep branch), e.g. resnet18 or tv:resnet18 with --pretrained.")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Weights file of --target (e.g. an ImageNet ResNet-18, as the public C-CIFAR10 code).")
@click.option("--baselines", default="erm,lff", help="Comma-separated baselines (erm, lff), or none.")
@click.option("--baselines-only", is_flag=True, help="Train the baselines only (no DeNetDM).")
@click.option("--baseline-protocol", type=click.Choice(["ours", "lff"]), default="ours",
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
@click.option("--augment", type=click.Choice(["auto", "none", "flip-crop"]), default="auto",
              help="auto: flip-crop for the CIFAR sets (as published), none otherwise.")
@device_option
@run_options("runs/denetdm", "Continue the run in --out: finished phases and epochs are reused (same settings only).")
@distributed_command("denetdm")
def denetdm(**params):
    """DeNetDM (depth-modulated debiasing) against ERM and LfF on every conflict ratio and seed."""
    from shortcut_fast.data import dataset_options, load_dataset
    from shortcut_fast.experiments import denetdm as dn

    p = params
    try:
        options = dataset_options(p["data"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    if "conflict_ratio" not in options or "unbiased_val" not in options:
        raise click.BadParameter(f"{p['data']} has no bias attribute with a conflict ratio; use colored-digits, "
                                 f"colored-mnist-5k, colored-mnist, corrupted-digits or corrupted-cifar10",
                                 param_hint="--data")
    extra = _parse_options(p["data_option"], "--data-option")
    for key in ("conflict_ratio", "unbiased_val", "seed"):
        if key in extra:
            raise click.BadParameter(f"{key} is set by denetdm itself (use --conflict-ratio / --seed)",
                                     param_hint="--data-option")
    baselines = () if p["baselines"].strip() == "none" else tuple(_name_list(None, None, p["baselines"]) or ())
    cifar = "cifar" in p["data"]
    arch = p["arch"] if p["arch"] != "auto" else ("conv" if p["data"].startswith("corrupted") else "mlp")
    if arch == "mlp" and "image_size" in options and "image_size" not in extra:
        # The embedded digits are 8x8: 16x16 keeps every pixel and makes the MLPs' first layer 4x cheaper.
        extra["image_size"] = 16
    if arch == "conv" and p["depths"] != ((3, 5),):
        raise click.BadParameter("applies to the mlp branches only; the conv branches are fixed", param_hint="--depths")
    if p["baseline_protocol"] == "lff" and (arch != "mlp" or p["target"]):
        raise click.BadParameter("lff is LfF's Colored MNIST protocol (MLP baselines): it needs the mlp branches "
                                 "and no --target", param_hint="--baseline-protocol")
    stage1 = p["stage1_epochs"]
    stage2 = p["stage2_epochs"] or (200 if cifar else 100)
    try:
        cfg = dn.DeNetDMConfig(
            ratios=tuple(p["ratios"]), seeds=p["seeds"], seed=p["seed"], depths=p["depths"], arch=arch,
            width=p["width"], target=p["target"], target_pretrained=str(p["pretrained"]) if p["pretrained"] else None,
            stage1_epochs=stage1, stage2_epochs=stage2,
            baseline_epochs=p["baseline_epochs"] or (100 if p["baseline_protocol"] == "lff" else None),
            batch_size=p["batch_size"] or (256 if arch == "conv" else 64), stage1_lr=p["stage1_lr"],
            stage2_lr=p["stage2_lr"] or (1e-4 if arch == "conv" else 1e-3),
            stage1_weight_decay=p["stage1_weight_decay"], baseline_lr=p["baseline_lr"],
            **(dn.LFF_PROTOCOL if p["baseline_protocol"] == "lff" else {}), denetdm=not p["baselines_only"],
            temperature=p["temperature"], distill_weight=p["distill_weight"], baselines=baselines,
            augment=p["augment"] if p["augment"] != "auto" else ("flip-crop" if cifar else "none"),
            normalize=CIFAR_MEAN_STD if cifar else None)
    except ValueError as exc:
        param = str(exc).split(" ")[0].split(":")[0].replace("_", "-")
        raise click.BadParameter(str(exc), param_hint=f"--{param}") from None
    splits = {}
    for ratio, seed in cfg.members:
        try:
            splits[(ratio, seed)] = load_dataset(p["data"], root=p["data_root"], download=p["download"], seed=seed,
                                                 conflict_ratio=ratio, unbiased_val=True, **extra)
        except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
            _fail(exc)
    resolved = {**{k: v for k, v in vars(cfg).items() if k not in ("stacked", "eval_batch_size", "checkpoint_seconds")}}
    out = p["out"]
    with _open_run("denetdm", {**p, "resolved": resolved}, _MemberSplits(splits)) as run:
        try:
            result = dn.run_denetdm(lambda r, s: splits[(r, s)], cfg, store=run.partial, device=p["device"],
                                    progress=not p["quiet"], **_dist_kw())
        except (ValueError, TypeError, FloatingPointError, FileNotFoundError) as exc:
            _fail(exc)
        if not _writes():
            return
        first = next(iter(splits.values()))
        dn.write_outputs(result, out, {"command": "denetdm", "data": p["data"], "dataset_meta": first.meta})
    click.echo(dn.summary(result, p["data"], out))


@main.command()
@click.argument("name", required=False)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--quick", is_flag=True, help="Small sizes (a smoke run, not a measurement).")
def bench(name, device, quick):
    """Run the throughput benchmarks (all, or NAME); results go to bench/results/."""
    import torch

    from shortcut_fast.bench import BENCHMARKS, run_benchmarks

    if name is not None and name not in BENCHMARKS:
        raise click.BadParameter(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}",
                                 param_hint="NAME")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("torch sees no CUDA device here; use --device cpu", param_hint="--device")
    run_benchmarks([name] if name else list(BENCHMARKS), device=device, quick=quick, echo=click.echo)


@main.command()
@device_option
@click.option("--quick", is_flag=True, help="float32 and three awkward shapes per op only (a few seconds).")
@click.option("--seed", type=NON_NEGATIVE, default=None, help="Seed of the random inputs (default: a fresh one).")
@click.option("--record", is_flag=True, help="Append what ran to bench/results/verified.jsonl (what `info` and the "
              "README report as verified).")
def selftest(device, quick, seed, record):
    """Check every op on every backend usable on --device against its PyTorch reference."""
    import random

    from shortcut_fast.report import format_table
    from shortcut_fast.selftest import failures, run_selftest

    seed = random.randrange(10**6) if seed is None else seed  # fresh inputs, printed so a failure reproduces
    rows = run_selftest(device, quick=quick, seed=seed)
    checks = [r for r in rows if r.status != "unavailable"]
    click.echo(f"selftest on {device}, seed {seed}{' (quick)' if quick else ''}")
    click.echo(format_table(
        [[r.op, r.backend, r.dtype, r.shape, "-" if r.max_abs_error is None else f"{r.max_abs_error:.2e}",
          "-" if r.atol is None else f"{r.atol:.0e} + {r.rtol:.0e}|ref|", r.status, r.detail] for r in checks],
        ["op", "backend", "dtype", "shape", "max abs error", "tolerance", "result", "note"]))
    for r in rows:
        if r.status == "unavailable":
            click.echo(f"backend {r.backend} not usable on {device}: {r.detail}")
    failed = failures(rows)
    if record:
        from shortcut_fast.bench import common

        common.record_selftest(rows, str(device), seed=seed, quick=quick)
        click.echo(f"recorded in {common.VERIFIED_FILE}")
    if failed:
        names = ", ".join(dict.fromkeys(f"{r.op} on {r.backend}" for r in failed))
        raise click.ClickException(f"selftest: {len(failed)} of {len(checks)} checks failed: {names} "
                                   f"(--seed {seed})")
    click.echo(f"all {sum(r.status == 'pass' for r in checks)} checks passed "
               f"({sum(r.status == 'skip' for r in checks)} skipped: dtype not supported by the backend)")


if __name__ == "__main__":
    sys.exit(main())
