"""Light start-up: `import shortcut_fast` and `shortcut-fast --help` import neither triton
nor torch._dynamo (with triton, they cost seconds); both load at first use.

Each check runs in a fresh interpreter (sys.executable, without TRITON_INTERPRET, which
conftest sets for this process) because this process has long since imported both. The
requirement is about what shortcut_fast adds: a module that a bare `import torch` already
loads in the installed torch (none does in torch 2.14) is taken as part of the baseline,
measured in its own fresh interpreter. The time saved is measured by bench/startup.py, not
here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shortcut_fast import backends

HEAVY = ("triton", "torch._dynamo")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # a fresh `import torch` takes seconds on a loaded machine

# Prints which HEAVY modules are loaded, as one JSON line tagged `tag`.
_REPORT = ("import json, sys\n"
           "def report(tag):\n"
           f"    print(tag, json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}), flush=True)\n")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args] + (["-c", code] if code else []), env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _reports(proc: subprocess.CompletedProcess) -> dict[str, dict[str, bool]]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag.startswith("@"):
            out[tag[1:]] = json.loads(rest)
    return out


@pytest.fixture(scope="module")
def torch_baseline() -> dict[str, bool]:
    """Which HEAVY modules a bare `import torch` loads in a fresh interpreter."""
    return _reports(_python(_REPORT + "import torch\nreport('@torch')\n"))["torch"]


def _added(loaded: dict[str, bool], baseline: dict[str, bool]) -> list[str]:
    return [m for m in HEAVY if loaded[m] and not baseline[m]]


def test_import_loads_neither_triton_nor_dynamo(torch_baseline):
    loaded = _reports(_python(_REPORT + "import shortcut_fast\nreport('@import')\n"))["import"]
    assert _added(loaded, torch_baseline) == [], f"import shortcut_fast loads {_added(loaded, torch_baseline)}"


def test_help_loads_neither_triton_nor_dynamo(torch_baseline):
    """The click group's --help, run in-process so the modules it loaded can be listed."""
    code = _REPORT + (
        "from shortcut_fast.cli import main\n"
        "try:\n"
        "    code = main(['--help'], prog_name='shortcut-fast', standalone_mode=False)\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('@exit', json.dumps(code or 0))\n"
        "report('@help')\n")
    proc = _python(code)
    reports = _reports(proc)
    assert "Usage: shortcut-fast" in proc.stdout and reports["exit"] == 0
    assert _added(reports["help"], torch_baseline) == [], f"--help loads {_added(reports['help'], torch_baseline)}"


def test_python_m_help_exits_zero():
    proc = _python("", "-m", "shortcut_fast", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Usage: shortcut-fast" in proc.stdout and "info" in proc.stdout


def test_ops_work_after_a_light_import(torch_baseline):
    """The light import still gives working ops; the torch backend needs no kernels."""
    code = _REPORT + (
        "import torch, shortcut_fast as sf\n"
        "from shortcut_fast.ops.class_spectrum import class_spectrum_sum_reference\n"
        "x = torch.randn(4, 1, 6, 5, generator=torch.Generator().manual_seed(0)); y = torch.tensor([0, 1, 1, 0])\n"
        "sums = sf.class_spectrum_sum(x, y, 2, backend='torch')\n"
        "assert torch.allclose(sums, class_spectrum_sum_reference(x, y, 2), rtol=1e-5, atol=1e-5)\n"
        "means = sums / torch.bincount(y, minlength=2).view(-1, 1, 1, 1)\n"
        "maps = sf.adcs(means)\n"
        "assert int(maps.abs().max()) <= 1  # two classes: ADCS in [-1, 1]\n"
        "print('@shape', json.dumps(list(maps.shape)))\n"
        "report('@ops')\n")
    reports = _reports(_python(code))
    assert reports["shape"] == [2, 6, 5]
    assert _added(reports["ops"], torch_baseline) == []


def test_constant_marker_matches_torch():
    """backends marks choose_backend and _import_kernels constant for torch.compile without
    importing torch._dynamo; the marker must do exactly what torch's decorator does."""
    def ours():
        return 1

    def theirs():
        return 1

    assert backends._assume_constant_result(ours) is ours
    assert torch.compiler.assume_constant_result(theirs) is theirs
    assert vars(ours) == vars(theirs) and vars(ours)
    for fn in (backends.choose_backend, backends._import_kernels):
        assert all(getattr(fn, k, None) == v for k, v in vars(theirs).items()), fn.__name__
