"""Start-up time: `import torch`, `import shortcut_fast` and `shortcut-fast --help`.

Each figure is the median wall-clock time of N fresh interpreters (sys.executable, the
environment without TRITON_INTERPRET), from process start to exit, so it includes what a
user waits for; `python -c pass` is timed too, as the floor. Runs are interleaved
(round-robin over trees and commands) so that a change in the machine's load hits every
figure alike; the load average (os.getloadavg) is recorded before and after.

  python bench/startup.py                          this checkout only
  python bench/startup.py --before /tmp/before     also a tree of an earlier commit, e.g.
                                                   `git worktree add /tmp/before HEAD` with
                                                   shortcut_fast/_C*.so copied into it
  --after TREE                                     time TREE instead of this checkout (a
                                                   worktree of one commit, free of edits in
                                                   progress)

Results go to bench/results/startup_cpu.json (replaced, not appended: one before/after pair).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shortcut_fast.bench.common import RESULTS_DIR, device_name

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = RESULTS_DIR / "startup_cpu.json"

# name -> interpreter arguments
COMMANDS = {
    "python": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import shortcut_fast": ["-c", "import shortcut_fast"],
    "shortcut-fast --help": ["-m", "shortcut_fast", "--help"],
}
# Printed by a fresh interpreter: which tree it imported and what that import loaded.
_PROBE = ("import json, sys, shortcut_fast, torch\n"
          "print(json.dumps({'file': shortcut_fast.__file__, 'version': shortcut_fast.__version__,\n"
          "    'torch': torch.__version__, 'loads': [m for m in ('triton', 'torch._dynamo') if m in sys.modules]}))\n")


def _env(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wall_s(args: list[str], tree: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=_env(tree), cwd=tree, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _tree_commit(tree: Path) -> str | None:
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=tree, text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree,
                                        text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" + uncommitted changes" if dirty else "")


def _probe(tree: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=_env(tree), cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    if not Path(info["file"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{tree}: `import shortcut_fast` took {info['file']}, not this tree")
    return info


def run(runs: int = 5, before: Path | None = None, after: Path = ROOT, echo=print) -> dict:
    trees = {"after": Path(after)} if before is None else {"before": Path(before), "after": Path(after)}
    probes = {label: _probe(tree) for label, tree in trees.items()}
    load_start = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {label: {name: [] for name in COMMANDS} for label in trees}
    for i in range(runs):
        for name, args in COMMANDS.items():
            for label, tree in trees.items():
                times[label][name].append(_wall_s(args, tree))
        echo(f"run {i + 1}/{runs} done (load {os.getloadavg()[0]:.2f})")
    load_end = os.getloadavg()
    result = {
        "what": "wall-clock seconds of a fresh interpreter, process start to exit; median of runs",
        "runs": runs,
        "device": device_name("cpu"),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "python": sys.version.split()[0],
        "torch": probes["after"]["torch"],
        "shortcut_fast": probes["after"]["version"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for label, tree in trees.items():
        result[label] = {
            "tree": str(tree),
            "commit": _tree_commit(tree),
            "import_shortcut_fast_loads": probes[label]["loads"],
            "median_s": {name: round(statistics.median(t), 3) for name, t in times[label].items()},
            "all_s": {name: [round(x, 3) for x in t] for name, t in times[label].items()},
        }
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    for label in trees:
        echo(f"{label:<7}" + "  ".join(f"{name} {s:.2f} s" for name, s in result[label]["median_s"].items()))
    echo(f"load average {result['loadavg_start']} -> {result['loadavg_end']}; written to {RESULT_FILE}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per figure (median)")
    parser.add_argument("--before", type=Path, help="a tree of an earlier commit to time alongside this one")
    parser.add_argument("--after", type=Path, default=ROOT, help="the tree to time as `after` (default: this checkout)")
    args = parser.parse_args()
    run(args.runs, args.before, args.after)
