"""--nproc / --max-restarts and the torchrun context of the long commands.

A distributed command gets its DistContext as the argument `dist` (None in one process).
Under --nproc this process launches the ranks through torch.distributed.run and prints the
one error line of a failed run itself: every rank writes its refusal to a file of the
launcher's, so which rank the launcher saw fail first does not change what the user reads.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import click

from ._common import ARGV_KEY, NON_NEGATIVE, POSITIVE, reported

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

# Set by the --nproc launcher for its ranks: the folder where each failing rank leaves its error.
ERRORS_ENV = "SHORTCUT_FAST_RANK_ERRORS"


def dist_kw(dist) -> dict:
    """{"dist": ctx} for the library call when running distributed, else {}."""
    return {} if dist is None or not dist.distributed else {"dist": dist}


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


def _rank_errors(folder: Path) -> dict[int, dict]:
    errors = {}
    for path in folder.glob("rank-*.json"):
        try:
            errors[int(path.stem.removeprefix("rank-"))] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a rank killed while writing: another rank's file, or the launcher's line, says it
    return errors


def _launch(nproc: int, max_restarts: int) -> int:
    """Run this command line (without --nproc / --max-restarts) in `nproc` processes on this
    machine through torch.distributed.run (standalone c10d rendezvous); their exit status.
    A failed run prints exactly one error line: rank 0's refusal, else the lowest failing
    rank's, else which rank died and how."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = click.get_current_context().meta.get(ARGV_KEY)
    if argv is None:
        raise click.ClickException("--nproc: the command line is unknown here (call shortcut-fast from a shell, "
                                   "or torchrun -m shortcut_fast)")
    argv = _strip_options(argv, ("--nproc", "--max-restarts"))
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts",
                                         str(max_restarts), "-m", "shortcut_fast", *argv])
    with tempfile.TemporaryDirectory(prefix="shortcut-fast-ranks-") as folder:
        os.environ[ERRORS_ENV] = folder  # inherited by the ranks
        try:
            run(args)
        except ChildFailedError as exc:
            errors = _rank_errors(Path(folder))
            if errors:
                error = errors.get(0) or errors[min(errors)]
                click.echo(f"Error: {error['message']}", err=True)
                return error["status"]
            rank, failure = exc.get_first_failure()
            how = failure.signal_name() if failure.exitcode < 0 else f"exit status {failure.exitcode}"
            click.echo(f"Error: rank {rank} of {nproc} failed ({how}); its messages are above", err=True)
            return failure.exitcode if failure.exitcode > 0 else 1
        finally:
            os.environ.pop(ERRORS_ENV, None)
    return 0


def _report_rank_error(exc: click.ClickException, rank: str) -> None:
    """A rank under --nproc: leave the refusal to the launcher, which prints it once."""
    folder = Path(os.environ[ERRORS_ENV])
    tmp = folder / f".rank-{rank}.tmp"
    tmp.write_text(json.dumps({"message": exc.format_message(), "status": exc.exit_code}))
    os.replace(tmp, folder / f"rank-{rank}.json")


def distributed_command(command: str):
    """Decorator of a long command: --nproc / --max-restarts, and under torchrun the context
    every rank runs in, passed to the command as `dist` (rank 0 prints and writes; every other
    rank is quiet, its errors too, and exits with the same status)."""

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
    rank = os.environ.get("RANK", "0") or "0"
    follower = under and rank != "0"
    launched = under and ERRORS_ENV in os.environ
    try:
        with contextlib.ExitStack() as stack:
            if follower:  # quiet: rank 0 prints the tables (and every error all ranks share)
                params = {**params, "quiet": True}
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            world = int(os.environ.get("WORLD_SIZE") or 1) if under else 1
            if world > 1:
                _check_distributable(command, world)
            with reported():
                ctx = sd.context(params["device"])
            if ctx.distributed:
                params = {**params, "device": ctx.device}  # this rank's GPU (cuda:LOCAL_RANK) or the CPU
            try:
                with reported():
                    return f(dist=ctx if ctx.distributed else None, **params)
            finally:
                if ctx.distributed:
                    sd.shutdown()
    except click.ClickException as exc:
        if launched:
            _report_rank_error(exc, rank)
            raise SystemExit(exc.exit_code) from None
        if follower:
            raise SystemExit(exc.exit_code) from None
        raise

