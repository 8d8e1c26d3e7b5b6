"""The commands around the analyses: info, datasets, models, cache, bench, selftest."""
from __future__ import annotations

import json

import click

from ._common import NON_NEGATIVE, SubGroup, device_option, main


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
    if data.get("extension_cuda"):
        click.echo(f"CUDA archs built: {data.get('extension_cuda_archs') or 'unknown'}")
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


@main.group("cache", cls=SubGroup)
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

@main.command()
@click.argument("name", required=False)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--quick", is_flag=True, help="Small sizes (a smoke run, not a measurement).")
@click.option("--roofline", is_flag=True, help="Run nothing: print the H100 roofline of every kernel at the GPU "
                                                "benchmark sizes and write bench/results/roofline_h100.json.")
def bench(name, device, quick, roofline):
    """Run the throughput benchmarks (all, or NAME); results go to bench/results/."""
    import torch

    from shortcut_fast.bench import BENCHMARKS, run_benchmarks

    if roofline:
        from shortcut_fast.bench.roofline import RESULTS, format_table, write_table

        click.echo(format_table(write_table()))
        click.echo(f"written to {RESULTS}")
        return
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
              "docs report as verified).")
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
