"""Registers, spills and shared memory of every GPU kernel for sm_80 and sm_90, without a GPU.

Triton: each op of shortcut_fast.kernels runs on meta tensors of the sizes the benchmarks and
the CIFAR/ImageNet experiments use (workloads() below), its launches recorded instead of run,
so the launch code picks block sizes and warps exactly as on a GPU. Every distinct launch
(kernel, argument types and 16-byte divisibility, constexprs, num_warps, num_stages) is
compiled by triton.compile for GPUTarget("cuda", 80 | 90, 32), specialized as the launcher
would on that card; ptxas' verbose log gives registers and spills, the kernel's metadata its
shared memory. CUDA: each csrc/cuda/*.cu goes through one nvcc call for both archs with
-Xptxas -v and the flags torch's extension build uses.

Needs triton's CUDA backend and nvcc, no GPU; run it in a process without TRITON_INTERPRET
(the launch code chooses interpreter sizes under it):
    python -m shortcut_fast.bench.kernel_resources [--out FILE] [--jobs N]
It writes bench/results/kernel_resources.json; tests/test_gpu_compile.py runs it and fails on
a compile error, a spill or shared memory over a card's limit that it does not list as a
reasoned exception.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "kernel_resources.json"
# Compute capability -> the most shared memory one block may use (opt-in): A100 163 KB,
# H100/H200 227 KB.
ARCHS = {80: 166912, 90: 232448}
# MNIST, CIFAR, 64x64 (the first size past one tile) and ImageNet crops. 28 and 32 take the
# same blocks but compile differently (32 is a multiple of 16, which the launcher specializes on).
IMAGE_SIDES = (28, 32, 64, 224)
CLASSES = (2, 10, 100, 1000)
# Input dtypes the kernels load: float32 and the 16-bit one mixed precision uses (float16
# compiles like bfloat16: a 16-bit load converted to float32).
DTYPES = (torch.float32, torch.bfloat16)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def workloads():
    """(op, description, call) for the sizes the benchmarks and experiments run; call() runs
    the op's launch code (the body of its torch.library.triton_op) on meta tensors. Every
    block size, warp count and precision the launch code picks at these sizes is covered;
    sizes that would only change an integer argument's specialization (a count of 1, a
    multiple of 16) are not all crossed with every precision, to keep this to minutes."""
    from shortcut_fast.kernels import ablation, band_filter, class_spectrum, probe_stats, probe_training
    from shortcut_fast.ops.precision import PRECISIONS  # the kernels take the names the ops checked

    def body(op):
        return op._init_fn  # the launch code itself, not the fake the op dispatches meta tensors to

    out = []
    labels = _meta(256, dtype=torch.int64)
    for side in IMAGE_SIDES:
        for dtype in DTYPES:
            x = _meta(256, 3, side, side, dtype=dtype)
            # the input dtype changes only the first load: every precision in float32
            for precision in PRECISIONS if dtype == torch.float32 else ("ieee",):
                out.append(("class_spectrum_sum", f"x (256, 3, {side}, {side}) {dtype}, 10 classes, {precision}",
                            lambda x=x, p=precision: body(class_spectrum.class_spectrum_sum_op)(x, labels, 10, p)))
            for K in (1, 16):
                freqs = _meta(K, 2, dtype=torch.int64)
                out.append(("remove_frequencies", f"x (256, 3, {side}, {side}) {dtype}, {K} pairs",
                            lambda x=x, f=freqs: body(band_filter.remove_frequencies_op)(x, f)))
        x = _meta(256, 3, side, side)
        for K in (1, 16):  # one mask (its own K_GROUP on one-tile images), or a sweep's group of 8
            for precision in PRECISIONS if K > 1 else ("ieee",):
                out.append(("band_filter", f"x (256, 3, {side}, {side}), {K} masks, {precision}",
                            lambda x=x, K=K, side=side, p=precision: body(band_filter.band_filter_op)(
                                x, _meta(K, side, side), p)))
    # Linear-probe statistics (bench/probe_stats.py: 2048 features, 10,000 targets): the tiles
    # are 64 wide below 1024 features + targets, 128 from there.
    for D, K in ((64, 10), (512, 1000), (2048, 10000)):
        for precision in PRECISIONS:
            out.append(("probe_stats", f"x (8192, {D}), z (8192, {K}), {precision}",
                        lambda D=D, K=K, p=precision: body(probe_stats.probe_stats_op)(
                            _meta(8192, D), _meta(8192, K), p)))
    # Probe training on 512 features (ResNet-18's last stage): softmax up to the kernel's
    # MAX_CLASSES (more fall back to torch); one probe, and 1000 (the widest tiles).
    for family, code in probe_training.FAMILY_CODES.items():
        for C in ((2, 10, 100, probe_training.MAX_CLASSES) if family == "softmax" else (1,)):
            for K in (1, 1000):
                for precision in PRECISIONS if K > 1 else ("ieee",):
                    out.append(("probe_step", f"{family}, x (1024, 512), {K} probes, {C} classes, {precision}",
                                lambda K=K, C=C, code=code, p=precision: body(probe_training.probe_step_op)(
                                    _meta(1024, 512), _meta(1024, K), _meta(K, 512, C), _meta(K, C), _meta(K),
                                    code, p)))
    # Channel-ablation sweeps: (batch, channels, positions) of ResNet stages on 32x32 inputs,
    # one variant per channel.
    for dtype in DTYPES:
        for C, S in ((64, 32 * 32), (512, 4 * 4)):
            act = _meta(1024, C, S, dtype=dtype)
            for rep in (_meta(C, dtype=dtype), act):
                out.append(("channel_ablate", f"act (1024, {C}, {S}) {dtype}, {C} variants, "
                                              f"replacement {tuple(rep.shape)}",
                            lambda act=act, C=C, rep=rep: body(ablation.channel_ablate_op)(
                                act, _meta(C, C, dtype=torch.bool), rep)))
        for L in CLASSES:  # batches of 1024 images (bench/ablation_sweep.py), 4 or 100 groups
            for G in (4, 100):
                out.append(("group_outcomes", f"logits (64, 1024, {L}) {dtype}, {G} groups",
                            lambda dtype=dtype, L=L, G=G: body(ablation.group_outcomes_op)(
                                _meta(64, 1024, L, dtype=dtype), _meta(1024, dtype=torch.int64),
                                _meta(1024, dtype=torch.int64), G)))
    return out


@contextlib.contextmanager
def _recorded_launches():
    """torch.library.wrap_triton(kernel)[grid](*args, **kwargs) appends to the yielded list
    instead of launching."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    saved = torch.library.wrap_triton
    torch.library.wrap_triton = Recorder
    try:
        yield launches
    finally:
        torch.library.wrap_triton = saved


def _specialize(kernel, args, kwargs, capability: int):
    """(options, signature, constexprs, attrs) of this launch on a card of `capability`: the
    launcher's own binder (argument types, 16-byte divisibility, constexprs, defaults)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def triton_jobs(ops=None):
    """Distinct compilations: one per (kernel, specialization, options, arch), with the
    workloads that chose it (of the ops named in `ops`; None: all)."""
    jobs = {}
    for op, description, call in workloads():
        if ops is not None and op not in ops:
            continue
        with _recorded_launches() as launches:
            call()
        if not launches:
            raise RuntimeError(f"{op} ({description}) launched nothing: is it still launched through "
                               f"torch.library.wrap_triton?")
        for kernel, args, kwargs in launches:
            for capability in ARCHS:
                options, signature, constexprs, attrs = _specialize(kernel, args, kwargs, capability)
                names = kernel.arg_names
                config = {names[i[0]]: v for i, v in sorted(constexprs.items())}
                config.update(num_warps=options.num_warps, num_stages=options.num_stages)
                key = (kernel.fn.__module__, kernel.__name__, str(signature), str(constexprs), str(attrs),
                       options.hash(), capability)
                job = jobs.setdefault(key, {
                    "kind": "triton", "op": op, "kernel": kernel.__name__, "module": kernel.fn.__module__,
                    "arch": f"sm_{capability}", "capability": capability, "config": config,
                    "dtypes": ",".join(sorted({v[1:] for v in signature.values() if v.startswith("*")})),
                    "workloads": [], "_compile": (signature, constexprs, attrs, options.__dict__)})
                job["workloads"].append(description)
    return list(jobs.values())


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")


def parse_ptxas(log: str) -> list[dict]:
    """Per entry function of a `ptxas -v` log: registers, spill stores/loads, stack and static
    shared memory (bytes)."""
    found = []
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log)[1:]:
        name, arch = _PTXAS_ENTRY.search(block).groups()

        def number(pattern):
            m = re.search(pattern, block)
            return int(m.group(1)) if m else 0

        found.append({"function": name, "arch": arch.rstrip("a"), "registers": number(r"Used (\d+) registers"),
                      "spill_stores": number(r"(\d+) bytes spill stores"),
                      "spill_loads": number(r"(\d+) bytes spill loads"),
                      "stack": number(r"(\d+) bytes stack frame"), "static_shared": number(r"(\d+) bytes smem")})
    return found


def _compile_triton(job: dict) -> dict:
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    signature, constexprs, attrs, options = job.pop("_compile")
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v is always run; this prints its log
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    log, notes = io.StringIO(), ""
    try:
        with contextlib.redirect_stdout(log), _stderr_to(tempfile.TemporaryFile(mode="w+")) as diagnostics:
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                          target=GPUTarget("cuda", job["capability"], 32), options=options)
            except Exception:
                diagnostics.seek(0)
                notes = diagnostics.read()[-3000:]
                raise
    except Exception as exc:  # a compile error is a result, reported per job
        return {**job, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}\n{notes}".rstrip()}
    usage = parse_ptxas(log.getvalue())
    if len(usage) != 1:
        return {**job, "error": f"expected one entry function in the ptxas log, got:\n{log.getvalue()[-2000:]}"}
    return {**job, **{k: v for k, v in usage[0].items() if k not in ("function", "arch")},
            "shared": compiled.metadata.shared, "shared_limit": ARCHS[job["capability"]], "error": None}


@contextlib.contextmanager
def _stderr_to(file):
    """Point file descriptor 2 at `file` (the compiler's C++ diagnostics go there, not to
    sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield file
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        file.close()


def nvcc() -> str | None:
    """The nvcc setup.py would find: $CUDA_HOME, $CUDA_PATH, PATH, then /usr/local/cuda*."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    found = [os.path.join(h, "bin", "nvcc") for h in homes if h] + [shutil.which("nvcc")]
    toolkits = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    found += [os.path.join(h, "bin", "nvcc") for h in toolkits]
    return next((path for path in found if path and os.path.exists(path)), None)


def nvcc_command(source: Path, output: Path) -> list[str]:
    """nvcc for the device code of one .cu file, both archs, with the defines, include paths
    and C++ standard torch's CUDAExtension build passes (host code is not compiled)."""
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    # torch's headers state the standard they need (C++20 from torch 2.10 on; C++17 before).
    aten = Path(includes[0]) / "ATen" / "ATen.h"
    std = "c++20" if "C++20" in aten.read_text() else "c++17"
    gencode = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in ARCHS]
    return [nvcc(), "--fatbin", *gencode, "-Xptxas", "-v", "-w", f"-std={std}", "-O3",
            *cpp_extension.COMMON_NVCC_FLAGS, "-DSHORTCUT_FAST_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{p}" for p in includes], str(source), "-o", str(output)]


def cuda_jobs() -> list[dict]:
    return [{"kind": "cuda", "source": str(p.relative_to(ROOT))} for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _compile_cuda(job: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(nvcc_command(ROOT / job["source"], Path(tmp) / "out.fatbin"),
                              capture_output=True, text=True)
    if proc.returncode != 0:
        return [{**job, "arch": f"sm_{c}", "error": (proc.stderr or proc.stdout)[-3000:]} for c in ARCHS]
    usage = parse_ptxas(proc.stderr + proc.stdout)
    names = _demangle([u["function"] for u in usage])
    results = []
    for name, u in zip(names, usage):
        # "void shortcut_fast::(anonymous namespace)::k<float, 4>(args)" -> k, <float, 4>
        short = name.replace("shortcut_fast::", "").replace("(anonymous namespace)::", "").removeprefix("void ")
        short = short[:short.find("(")] if "(" in short else short
        kernel, _, template = short.partition("<")
        results.append({**job, "kernel": kernel, "config": {"template": "<" + template} if template else {},
                        **{k: v for k, v in u.items() if k != "function"}, "shared": u["static_shared"],
                        "shared_limit": ARCHS[int(u["arch"][3:])], "error": None})
    return results


def _run(job):
    return _compile_cuda(job) if job["kind"] == "cuda" else [_compile_triton(job)]


def summarize(results: list[dict]) -> list[dict]:
    """Per (kind, kernel, arch): configurations, most registers, spills and shared memory."""
    table = {}
    for r in results:
        if r.get("error"):
            continue
        key = (r["kind"], r["kernel"], r["arch"])
        row = table.setdefault(key, {"kind": r["kind"], "kernel": r["kernel"], "arch": r["arch"], "configs": 0,
                                     "max_registers": 0, "max_spill_bytes": 0, "max_stack": 0, "max_shared": 0,
                                     "shared_limit": r["shared_limit"]})
        row["configs"] += 1
        row["max_registers"] = max(row["max_registers"], r["registers"])
        row["max_spill_bytes"] = max(row["max_spill_bytes"], r["spill_stores"] + r["spill_loads"])
        row["max_stack"] = max(row["max_stack"], r["stack"])
        row["max_shared"] = max(row["max_shared"], r["shared"])
    return [table[k] for k in sorted(table)]


def collect(jobs: int | None = None, *, cuda: bool = True, triton: bool = True, ops=None,
            echo=lambda msg: None) -> dict:
    """Compile everything; the report written to RESULTS."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1: under it the launch code picks interpreter sizes")
    work = (cuda_jobs() if cuda else []) + (triton_jobs(ops) if triton else [])  # the long nvcc calls first
    echo(f"{len(work)} compilations ({sum(j['kind'] == 'triton' for j in work)} triton)")
    results = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # leave the user's cache alone
        workers = jobs or min(len(work), os.cpu_count() or 1)
        # spawn, not fork: this process runs torch's and triton's threads, which fork does not copy
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in pool.map(_run, work):
                results += done
    for r in results:
        r.pop("capability", None)
        r.pop("module", None)
    return {
        "what": "registers, spills and shared memory (bytes) per kernel and launch configuration, compiled "
                "without a GPU: triton kernels through triton.compile for each arch at every launch "
                "configuration the launch code picks for the benchmark and experiment sizes; CUDA kernels "
                "through nvcc -Xptxas -v",
        "command": "python -m shortcut_fast.bench.kernel_resources",
        "triton": _version("triton") if triton else None, "torch": torch.__version__,
        "nvcc": _nvcc_version() if cuda else None,
        "archs": {f"sm_{c}": {"shared_limit": limit} for c, limit in ARCHS.items()},
        "summary": summarize(results),
        "results": results,
    }


def _version(module: str) -> str:
    return __import__(module).__version__


def _nvcc_version() -> str | None:
    try:
        out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout
    except (OSError, TypeError):
        return None
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else None


def dumps(report: dict) -> str:
    """The report as JSON, one line per summary row and per result (diffs stay readable)."""
    head = {k: v for k, v in report.items() if k not in ("summary", "results")}
    lines = json.dumps(head, indent=1)[:-2].splitlines()
    for key in ("summary", "results"):
        rows = [json.dumps(row) for row in report[key]]
        lines[-1] += ","
        lines += [f' "{key}": [', *[f"  {row}," for row in rows[:-1]], *[f"  {row}" for row in rows[-1:]], " ]"]
    return "\n".join(lines) + "\n}\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations (default: CPU count)")
    parser.add_argument("--no-cuda", action="store_true", help="no CUDA kernels")
    parser.add_argument("--no-triton", action="store_true", help="no triton kernels")
    parser.add_argument("--ops", help="comma-separated triton ops to compile (default: all)")
    args = parser.parse_args(argv)
    ops = args.ops.split(",") if args.ops else None
    start = time.perf_counter()
    report = collect(args.jobs, cuda=not args.no_cuda, triton=not args.no_triton, ops=ops,
                     echo=lambda m: print(m, file=sys.stderr))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(report))
    for row in report["summary"]:
        print(f"{row['kind']:<6} {row['kernel']:<40} {row['arch']}  configs {row['configs']:>3}  "
              f"registers <= {row['max_registers']:>3}  spills <= {row['max_spill_bytes']:>6} B  "
              f"shared <= {row['max_shared']:>6} B")
    errors = [r for r in report["results"] if r.get("error")]
    for r in errors:
        print(f"ERROR {r.get('kernel') or r.get('source')} {r['arch']}: {r['error'][:500]}", file=sys.stderr)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
