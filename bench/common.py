"""Timing and recording shared by the benchmarks (see docs/performance.md#how-the-benchmarks-measure)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:  # Linux: the CPU model is more telling than the architecture
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def device_slug(device: str) -> str:
    name = device_name(device) if device == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def record_path(device: str) -> Path:
    return RESULTS_DIR / f"{device_slug(device)}.jsonl"


def _git_commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_DIR.parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_fp32_rate() -> dict:
    """One core's fastest measured fp32 rate: a compute-bound oneDNN convolution (3x3, 256 ->
    256 channels, 8 x 8, batch 128, channels_last, inference mode; best of 9, one thread).
    It stands in for the peak: the nominal one (SIMD lanes x FMA units x the clock
    /proc/cpuinfo states) undercounts a core that boosts above that clock; on the project's
    CPU machine this convolution ran faster than that nominal figure."""
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            x = torch.rand(128, 256, 8, 8).contiguous(memory_format=torch.channels_last)
            w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
            F.conv2d(x, w, padding=1)
            best = float("inf")
            for _ in range(9):
                start = time.perf_counter()
                F.conv2d(x, w, padding=1)
                best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    flops = 2 * 128 * 256 * 256 * 9 * 8 * 8
    return {"cpu_fp32_gflops_per_core": flops / best / 1e9,
            "cpu_fp32_rate_basis": "the fastest of 9 runs of a oneDNN 3x3 convolution, 256 channels, 8 x 8, "
                                   "batch 128, one thread"}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_cpu(fn: Callable[[], object], *, min_runs: int = 5, min_seconds: float = 1.0, warmup: int = 1) -> Timing:
    """Median of repeated wall-clock runs (after warm-up)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 100):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7])


def time_cuda(fn: Callable[[], object]) -> Timing:
    """CUDA-event timing through triton.testing.do_bench (warm-up, L2 flush, median)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], return_mode="median")
    return Timing(med, p20, p80)


def hbm_fraction(bytes_moved: int, median_ms: float, device: str) -> float | None:
    """Achieved bandwidth as a fraction of the GPU's HBM peak (None on the CPU or an unknown GPU)."""
    if device != "cuda":
        return None
    from shortcut_fast.bench.roofline import peak_bandwidth

    peak = peak_bandwidth(torch.cuda.get_device_name())
    return bytes_moved / (median_ms * 1e-3) / peak if peak else None


def alternating_wall_ms(fns: dict[str, Callable[[], object]], rounds: int,
                        device: str) -> tuple[dict[str, object], dict[str, list[float]]]:
    """Each of `fns` run `rounds` times, in turn (wall_ms): (the last output of each, every
    run's milliseconds per name). For workloads too long to repeat many times on a machine
    whose speed drifts between runs: take the medians."""
    outputs: dict[str, object] = {}
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            outputs[name], ms = wall_ms(fn, device)
            runs[name].append(ms)
    return outputs, runs


def wall_ms(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """(fn(), milliseconds) of one run: for workloads too long to repeat."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def time_fn(fn: Callable[[], object], device: str) -> Timing:
    return time_cuda(fn) if device == "cuda" else time_cpu(fn)


@dataclass
class BenchRow:
    workload: str
    sizes: dict
    dtype: str
    backend: str
    baseline: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    baseline_ms: float
    ratio: float
    achieved: dict = field(default_factory=dict)  # e.g. {"GB/s": ..., "fraction_of_ceiling": ...}
    device: str = ""
    torch: str = torch.__version__
    triton: str | None = None
    commit: str | None = None
    date: str = ""
    quick: bool = False
    # bench/roofline.py: bytes, flops, precision; on a GPU of known peaks bound, best_ms and
    # fraction (best / measured). None for workloads without one.
    roofline: dict | None = None

    def summary(self) -> str:
        extra = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.achieved.items())
        line = (f"{self.workload:<20} {self.backend:<7} {self.median_ms:9.3f} ms  vs {self.baseline} {self.baseline_ms:9.3f} ms  "
                f"x{self.ratio:.2f}  {extra}")
        if self.roofline and "error" in self.roofline:
            return line + f"\n      roofline failed: {self.roofline['error']}"
        if self.roofline:
            from shortcut_fast.bench.roofline import summary

            return line + f"\n      {summary(self.roofline)}"
        return line


def _roofline(row: BenchRow, device: str) -> dict | None:
    """The row's roofline; a failure is recorded in the row rather than losing the measurement."""
    from shortcut_fast.bench.roofline import row_roofline

    try:
        return row_roofline(row.workload, row.sizes, row.dtype, row.backend, row.median_ms, device)
    except Exception as exc:  # noqa: BLE001 - the timing is already paid for
        return {"error": f"{type(exc).__name__}: {exc}"}


def record(row: BenchRow, device: str) -> BenchRow:
    try:
        import triton

        row.triton = triton.__version__
    except ImportError:
        pass
    row.device = device_name(device)
    row.roofline = _roofline(row, device)
    row.commit = _git_commit()
    row.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path = record_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(asdict(row)) + "\n")
    return row


# ---------------------------------------------------------------------------------------
# Which backends have been verified where: `shortcut-fast selftest --record` appends here.

VERIFIED_FILE = RESULTS_DIR / "verified.jsonl"


def _backend_mode(backend: str, device: str) -> str:
    """How a backend ran: Triton on a CPU can only run through its interpreter."""
    if backend == "triton" and (device == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"):
        return "interpreter"
    return "compiled"


def record_selftest(rows, device: str, *, seed: int, quick: bool, path: Path | None = None) -> list[dict]:
    """Append one line per backend that ran in a selftest (rows: selftest.Row): checks
    passed / failed / skipped, the ops covered, the device, commit and date."""
    import torch

    lines = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    for backend in dict.fromkeys(r.backend for r in rows if r.status != "unavailable"):
        mine = [r for r in rows if r.backend == backend and r.status != "unavailable"]
        counts = {s: sum(r.status == s for r in mine) for s in ("pass", "FAIL", "skip")}
        lines.append({"backend": backend, "mode": _backend_mode(backend, dev), "device": device_name(dev),
                      "device_slug": device_slug(dev), "passed": counts["pass"], "failed": counts["FAIL"],
                      "skipped": counts["skip"], "ops": sorted({r.op for r in mine}), "seed": seed, "quick": quick,
                      "torch": torch.__version__, "commit": _git_commit(), "date": stamp})
    path = VERIFIED_FILE if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return lines


def verified_backends(path: Path | None = None) -> dict[tuple[str, str], list[dict]]:
    """(backend, mode) -> the latest selftest record per device, newest first."""
    path = VERIFIED_FILE if path is None else path
    if not path.exists():
        return {}
    latest: dict[tuple[str, str, str], dict] = {}
    for text in path.read_text().splitlines():
        if text.strip():
            rec = json.loads(text)
            key = (rec["backend"], rec["mode"], rec["device_slug"])
            if key not in latest or rec["date"] >= latest[key]["date"]:
                latest[key] = rec
    out: dict[tuple[str, str], list[dict]] = {}
    for (backend, mode, _), rec in sorted(latest.items()):
        out.setdefault((backend, mode), []).append(rec)
    for recs in out.values():
        recs.sort(key=lambda r: r["date"], reverse=True)
    return out
