"""torch.distributed scale-out (issue 13): the same job with 1 process and with W processes.

Two workloads, each run as a worker script under torch.distributed.run (torchrun, c10d
rendezvous on 127.0.0.1) with --nproc-per-node 1 and W:
- sweep: channel_ablation_sweep(dist=) of a ResNet-18 w16 stage (layer3 block outputs, 128
  variants) on 256 random images in batches of 128; the batches are split over the ranks,
  each runs the prefix (stem to layer3) of its own batch once and sweeps every variant on
  it, and the per-group counts are all-reduced (no rank recomputes another's prefix).
- probe_stats: run_complexity(dist=), the V-information pass (directions pca:64 fit on rank
  0, then every block's probe statistics streamed over the ranks' shares of some thousand
  probe-train + held-out images and all-reduced, the probes fit on every rank).

On the CPU (gloo): W = 2 with OMP_NUM_THREADS=1 per process (2 processes on 2 cores),
against 1 process with OMP_NUM_THREADS=1 (the ratio and the parallel efficiency = ratio / 2)
and 1 process with OMP_NUM_THREADS=2 (its row's ratio is against that; the efficiency stays
the one against 1 process, 1 thread) (what a user without torchrun gets: the same 2 cores
through intra-op threads). On CUDA with >= 2 GPUs: one process per GPU (nccl), for every
device count 2..N against 1 GPU; with 1 GPU nothing is measured (a note says so).

Time = the job itself, measured inside the worker around the library call between two
barriers, after the process group is up (best of `repeats` calls; a small warm-up call
first). The launch overhead (torchrun, interpreter and imports, inputs, process-group
start-up until the job starts; and the tear-down after it) is recorded separately. Before
any row is written the W-process result must equal the 1-process one: the sweep's per-group
counts exactly, the complexity statistics to PROBE_TOL (only the summation order of the
all-reduced float64 statistics differs, and the float32 activations of other batches).
On a 2-core machine shared with other work the ratio is modest: the rows record the load
average before each launch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from shortcut_fast.bench.common import BenchRow, record

PROBE_TOL = 1e-6  # max |difference| of the complexity statistics, W processes vs 1
LAUNCH_TIMEOUT = 1800

WORKER = textwrap.dedent('''
    import json, os, sys, time

    import torch

    from shortcut_fast import distributed as sd
    from shortcut_fast.data import DatasetSplits, ImageDataset
    from shortcut_fast.experiments import complexity as cx
    from shortcut_fast.models import build_model
    from shortcut_fast.surgery import channel_ablation_sweep

    job, out, device = sys.argv[1], sys.argv[2], sys.argv[3]
    p = json.loads(sys.argv[4])
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=p["width"]).eval()
    g = torch.Generator().manual_seed(1)
    n = p["images"] + p.get("heldout", 0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    t0 = time.perf_counter()
    ctx = sd.context(device)
    init_ms = (time.perf_counter() - t0) * 1e3
    ready = time.time()
    model = model.to(ctx.device)
    if job == "sweep":
        x, y = x.to(ctx.device), y.to(ctx.device)
        layers = [b for b in model.block_names if b.startswith(p["stage"] + ".")]

        def call(m):
            return channel_ablation_sweep(model, layers, (x[:m], y[:m], y[:m] % 4), where="output",
                                          batch_size=p["batch"], dist=ctx)

        def summary(res):
            return {l: [res[l].correct.cpu(), res[l].baseline_correct.cpu()] for l in layers}
    else:
        tr = ImageDataset(x[:p["images"]], y[:p["images"]], num_classes=10)
        he = ImageDataset(x[p["images"]:], y[p["images"]:], num_classes=10)

        def call(m):
            splits = DatasetSplits("random", tr, he, he, num_classes=10, image_shape=(3, 32, 32))
            cfg = cx.ComplexityConfig(directions=p["directions"], max_images=min(m, p["images"]),
                                      max_heldout=min(m, p["heldout"]), direction_images=p["direction_images"],
                                      batch_size=p["batch"])
            return cx.run_complexity(model, splits, cfg, device=ctx.device, progress=False, dist=ctx)

        def summary(res):
            keys = ("v_information", "complexity", "importance", "importance_signed", "feature_std")
            return {**{k: torch.tensor(getattr(res, k), dtype=torch.float64) for k in keys},
                    "heldout_accuracy": res.heldout_accuracy}
    call(p["warmup"])
    times = []
    for _ in range(p["repeats"]):
        sd.barrier(ctx)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        t = time.perf_counter()
        res = call(n)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        sd.barrier(ctx)
        times.append((time.perf_counter() - t) * 1e3)
    if ctx.rank == 0:
        torch.save({"result": summary(res), "times_ms": times, "init_ms": init_ms, "ready": ready,
                    "done": time.time(), "world_size": ctx.world_size, "backend": ctx.backend,
                    "threads": torch.get_num_threads()}, out)
    sd.shutdown()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(folder: Path, job: str, params: dict, device: str, nproc: int, threads: int | None) -> dict:
    """One torchrun launch of the worker: its saved record plus the launch overhead."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    root = str(Path(__file__).resolve().parents[1])  # the checkout (bench/ is shortcut_fast.bench when installed)
    if (Path(root) / "shortcut_fast").is_dir():
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = folder / f"{job}.{nproc}.{threads}.pt"
    script = folder / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "0", "--monitor-interval", "0.2",
           str(script), job, str(out), device, json.dumps(params)]
    load = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"distributed bench: {job} with {nproc} process(es) failed (exit {proc.returncode}):\n"
                           + proc.stdout[-2000:] + proc.stderr[-4000:])
    rec = torch.load(out, weights_only=False)
    rec["job_ms"] = min(rec["times_ms"])
    rec["startup_ms"] = (rec["ready"] - start) * 1e3  # launch until the process group is up
    rec["teardown_ms"] = (end - rec["done"]) * 1e3
    rec["launch_total_ms"] = (end - start) * 1e3
    rec["load_before"] = load
    return rec


def _compare(job: str, one: dict, many: dict) -> dict:
    """Equality of the W-process result with the 1-process one (raises when they differ)."""
    if job == "sweep":
        differing = sum(int((a != b).sum()) for layer in one
                        for a, b in zip(one[layer], many[layer]))
        if differing:
            raise RuntimeError(f"distributed sweep: {differing} per-group counts differ from one process")
        return {"identical_group_counts": True, "differing_counts": 0}
    diff = max(float((one[k] - many[k]).abs().max()) for k in one if k != "heldout_accuracy")
    acc = abs(one["heldout_accuracy"] - many["heldout_accuracy"])
    if not (diff <= PROBE_TOL and acc == 0):
        raise RuntimeError(f"distributed complexity: statistics differ from one process by {diff:.3g} "
                           f"(tolerance {PROBE_TOL}), held-out accuracy by {acc}")
    return {"max_abs_diff_vs_1_process": diff, "tolerance": PROBE_TOL, "same_heldout_accuracy": True}


def _params(device: str, quick: bool) -> dict:
    if quick:
        return {"sweep": dict(width=8, images=48, stage="layer4", batch=48, warmup=8, repeats=1),
                "probe_stats": dict(width=8, images=96, heldout=48, directions="pca:8", direction_images=48,
                                    batch=48, warmup=16, repeats=1)}
    if device == "cuda":
        return {"sweep": dict(width=64, images=4096, stage="layer4", batch=1024, warmup=64, repeats=3),
                "probe_stats": dict(width=64, images=20_000, heldout=10_000, directions="pca:256",
                                    direction_images=4096, batch=1024, warmup=512, repeats=3)}
    return {"sweep": dict(width=16, images=256, stage="layer3", batch=128, warmup=16, repeats=2),
            "probe_stats": dict(width=16, images=2000, heldout=1000, directions="pca:64", direction_images=500,
                                batch=256, warmup=128, repeats=2)}


SIZES_TEXT = {"sweep": "{stage} block outputs, every channel one variant, 4 groups",
              "probe_stats": "run_complexity: directions fit on rank 0, statistics of every block over ranks"}
WORKLOADS = {"sweep": "distributed_ablation_sweep", "probe_stats": "distributed_probe_stats"}


def run(device: str = "cpu", quick: bool = False, echo=print) -> list[BenchRow]:
    if not (torch.distributed.is_available() and
            (torch.distributed.is_gloo_available() if device == "cpu" else torch.distributed.is_nccl_available())):
        echo("  distributed: skipped, torch.distributed (gloo on the CPU, nccl on CUDA) is not available")
        return []
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 2:
            echo(f"  distributed: skipped, {gpus} GPU on this machine (one process per GPU needs >= 2)")
            return []
        # one process per GPU; threads do not matter much there
        configs = [(w, None) for w in range(2, gpus + 1)]
        base = [(1, None, "1 process, 1 GPU")]
    else:
        configs = [(2, 1)]
        base = [(1, 1, "1 process, 1 thread (OMP_NUM_THREADS=1)"),
                (1, 2, "1 process, 2 threads (OMP_NUM_THREADS=2, no torchrun)")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        folder = Path(tmp)
        for job, params in _params(device, quick).items():
            ones = {label: _launch(folder, job, params, device, n, th) for n, th, label in base}
            reference = ones[base[0][2]]
            for world, threads in configs:
                many = _launch(folder, job, params, device, world, threads)
                equal = _compare(job, reference["result"], many["result"])
                sizes = {k: v for k, v in params.items() if k not in ("warmup", "repeats", "batch")}
                sizes.update(model=f"resnet18(width={params['width']})", processes=world,
                             threads_per_process=threads, repeats=params["repeats"])
                speedup = reference["job_ms"] / many["job_ms"]  # against 1 process, 1 thread (or 1 GPU)
                for label, one in ones.items():
                    ratio = one["job_ms"] / many["job_ms"]
                    achieved = {
                        **equal, "speedup_vs_1_process_1_thread": speedup,
                        "parallel_efficiency": speedup / world, "processes": world,
                        "baseline_threads": one["threads"], "times_ms": many["times_ms"],
                        "baseline_times_ms": one["times_ms"],
                        "launch_overhead_ms": {"startup": many["startup_ms"], "teardown": many["teardown_ms"],
                                               "process_group_init": many["init_ms"]},
                        "baseline_launch_overhead_ms": {"startup": one["startup_ms"],
                                                        "teardown": one["teardown_ms"]},
                        "launch_total_ms": many["launch_total_ms"],
                        "baseline_launch_total_ms": one["launch_total_ms"],
                        "load_avg_1min_before": {"run": many["load_before"], "baseline": one["load_before"]},
                        "cpu_count": os.cpu_count(), "what": SIZES_TEXT[job].format(**params)}
                    if one is not reference:  # 1 process with 2 threads against 1 thread
                        achieved["baseline_speedup_vs_1_thread"] = reference["job_ms"] / one["job_ms"]
                    rows.append(record(BenchRow(
                        workload=WORKLOADS[job], sizes=sizes, dtype="float32", backend=many["backend"],
                        baseline=label, median_ms=many["job_ms"], p20_ms=min(many["times_ms"]),
                        p80_ms=max(many["times_ms"]), baseline_ms=one["job_ms"], ratio=ratio,
                        achieved=achieved, quick=quick), device))
    return rows
