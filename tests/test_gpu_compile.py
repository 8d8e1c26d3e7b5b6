"""Every GPU kernel compiles for sm_80 (A100) and sm_90 (H100/H200) without a GPU: the Triton
kernels at every launch configuration their launch code picks for the benchmark and
experiment sizes, the CUDA kernels of csrc/cuda. None may spill registers or ask for more
shared memory than the card has. bench/kernel_resources.py does the compiling, in a process
without TRITON_INTERPRET, and writes bench/results/kernel_resources.json (registers, spills
and shared memory per kernel and configuration)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shortcut_fast.bench import kernel_resources

# (kernel, arch) -> why it may spill. Every kernel is spill-free at the sizes compiled today;
# an entry needs the reason the size cannot be, and the kernel's docstring the same.
SPILL_EXCEPTIONS: dict[tuple[str, str], str] = {}

HAS_TRITON_CUDA = importlib.util.find_spec("triton") is not None and importlib.util.find_spec(
    "triton.backends.nvidia") is not None
HAS_NVCC = kernel_resources.nvcc() is not None


@pytest.fixture(scope="module")
def report():
    if not (HAS_TRITON_CUDA or HAS_NVCC):
        pytest.skip("neither triton's CUDA backend nor nvcc is installed")
    out = kernel_resources.RESULTS
    out.unlink(missing_ok=True)  # so a stale report cannot pass for this run's
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # GPU launch sizes
    cmd = [sys.executable, "-m", "shortcut_fast.bench.kernel_resources", "--out", str(out)]
    cmd += [] if HAS_NVCC else ["--no-cuda"]
    cmd += [] if HAS_TRITON_CUDA else ["--no-triton"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    # A kernel that fails to compile is reported in the file (and checked below); any other
    # failure is a bug of the tool itself.
    assert out.exists() and proc.returncode in (0, 1), proc.stderr[-5000:]
    return json.loads(Path(out).read_text())


def _problems(results, kind):
    found = []
    for r in results:
        if r["kind"] != kind:
            continue
        name = f"{r.get('kernel') or r.get('source')} {r['arch']} {r.get('config', '')}"
        if r["error"]:
            found.append(f"{name}: does not compile: {r['error'][-1500:]}")
            continue
        spilled = r["spill_stores"] + r["spill_loads"]
        if spilled and (r["kernel"], r["arch"]) not in SPILL_EXCEPTIONS:
            found.append(f"{name}: {r['registers']} registers, spills {r['spill_stores']} B stored, "
                         f"{r['spill_loads']} B loaded ({r.get('workloads', [''])[0]})")
        if r["shared"] > r["shared_limit"]:
            found.append(f"{name}: {r['shared']} B of shared memory, the card has {r['shared_limit']}")
    return found


@pytest.mark.skipif(not HAS_TRITON_CUDA, reason="triton's CUDA backend is not installed")
def test_triton_kernels_compile_for_sm80_and_sm90_without_spills(report):
    results = report["results"]
    assert not _problems(results, "triton"), "\n".join(_problems(results, "triton"))
    compiled = {(r["op"], r["arch"]) for r in results if r["kind"] == "triton"}
    ops = {op for op, _, _ in kernel_resources.workloads()}
    assert compiled == {(op, f"sm_{c}") for op in ops for c in kernel_resources.ARCHS}


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed")
def test_cuda_kernels_compile_for_sm80_and_sm90_without_spills(report):
    results = report["results"]
    assert not _problems(results, "cuda"), "\n".join(_problems(results, "cuda"))
    compiled = {(r["source"], r["arch"]) for r in results if r["kind"] == "cuda"}
    sources = {job["source"] for job in kernel_resources.cuda_jobs()}
    assert compiled == {(s, f"sm_{c}") for s in sources for c in kernel_resources.ARCHS}


def test_ptxas_log_is_parsed_per_kernel():
    log = """ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    5176 bytes stack frame, 5624 bytes spill stores, 11048 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 5176 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 4096 bytes smem, 380 bytes cmem[0]
"""
    assert kernel_resources.parse_ptxas(log) == [
        {"function": "_k", "arch": "sm_90", "registers": 168, "spill_stores": 5624, "spill_loads": 11048,
         "stack": 5176, "static_shared": 0},
        {"function": "_Z3fooPf", "arch": "sm_80", "registers": 32, "spill_stores": 0, "spill_loads": 0,
         "stack": 0, "static_shared": 4096},
    ]
