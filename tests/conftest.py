"""Test set-up. Without a GPU, Triton kernels run on the CPU through the interpreter,
which must be switched on before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# Tolerances per input dtype for results computed in float32 (float64 for float64 input): one
# table for the tests and `shortcut-fast selftest`.
from shortcut_fast.selftest import TOLERANCES  # noqa: E402

# Every compiled/kernel backend on the device it runs on here: cpp and triton run on the
# CPU in CI (triton through the interpreter); cuda needs a GPU.
FAST_BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp"),
    pytest.param("triton", "cuda" if HAS_GPU else "cpu", id="triton"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(scope="session", autouse=True)
def _session_model_cache(tmp_path_factory):
    """Fixtures wider than one test (module-scoped checkpoints) run before the per-test cache
    below is set: they get a cache of their own, never the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHORTCUT_FAST_CACHE", str(tmp_path_factory.mktemp("model-cache-session")))
        yield


@pytest.fixture(autouse=True)
def model_cache_folder(tmp_path_factory, monkeypatch):
    """Every test gets its own empty model cache ($SHORTCUT_FAST_CACHE): nothing is written
    to the user's home, and a model trained by one test is never reused by another."""
    folder = tmp_path_factory.mktemp("model-cache")
    monkeypatch.setenv("SHORTCUT_FAST_CACHE", str(folder))
    return folder


@pytest.fixture
def one_thread():
    """Tiny models and problems: one intra-op thread avoids thread wake-up latency, which
    dominates on a loaded 2-core machine. Use with pytestmark = pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- torchrun launches (the tests/test_distributed*.py files)

def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a c10d rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(**extra) -> dict:
    """The environment of a launched worker: one thread per process, this checkout importable."""
    import os
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_command(script, *args, port: int | None = None, extra=(), nproc: int | None = 2) -> list[str]:
    """`python -m torch.distributed.run` of `script ARGS` with a c10d rendezvous on 127.0.0.1
    (a fresh port unless given; nproc None leaves --nproc-per-node to `extra`)."""
    import sys

    per_node = [] if nproc is None else ["--nproc-per-node", str(nproc)]
    return [sys.executable, "-m", "torch.distributed.run", *per_node, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port() if port is None else port}", "--monitor-interval", "0.2",
            *extra, str(script), *map(str, args)]
