"""Bad input to a torchrun launch (issue 13): a rank that dies before the rendezvous of the
process group completes, and a node that never joins the launchers' rendezvous, make the
launch fail within a bounded time with torchrun's error summary naming the failed rank (or
the rendezvous timeout), not hang. Plus bench/distributed.py's equality check (no launch:
its quick end-to-end run takes about a minute of torchrun start-ups)."""
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import torchrun_command, torchrun_env
import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this PyTorch build")

BOUND = 60  # seconds: a launch that takes longer is treated as a hang

# Rank 1 exits with an error before calling context(); rank 0 enters context() and waits in
# init_process_group for a peer that never comes.
SCRIPT = textwrap.dedent('''
    import os, sys
    from shortcut_fast import distributed as sd

    if os.environ["RANK"] == "1":
        print("rank 1: giving up before the rendezvous", file=sys.stderr, flush=True)
        sys.exit(7)
    sd.context("cpu")
    print("rank 0: process group up (should not happen)", flush=True)
    sd.shutdown()
''')


def _launch(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    cmd = torchrun_command(script, nproc=None,
                           extra=("--max-restarts", "0", "--rdzv-conf", "join_timeout=5,timeout=10", *args))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=torchrun_env(), cwd=tmp_path, capture_output=True, text=True, timeout=BOUND)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the launch hung for more than {BOUND} s: {exc.stdout!s:.2000} {exc.stderr!s:.4000}")
    return proc, time.perf_counter() - start


def test_a_rank_dying_before_the_rendezvous_fails_the_launch_naming_it(tmp_path):
    proc, _ = _launch(tmp_path, "--nproc-per-node", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "rank 0: process group up" not in out
    assert "giving up before the rendezvous" in out  # the worker's own message
    # torchrun's failure summary: the root cause is rank 1 with its exit code
    assert "Root Cause" in out, out[-4000:]
    root = out[out.index("Root Cause"):].split("=====")[0]  # the root-cause block only
    assert "rank      : 1 (local_rank: 1)" in root, root
    assert "exitcode  : 7" in root, root


def test_a_node_that_never_joins_fails_the_rendezvous_after_join_timeout(tmp_path):
    # --nnodes 2 with one launcher only: the other node "died" before the rendezvous
    proc, seconds = _launch(tmp_path, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "0")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "RendezvousTimeoutError" in out or "timed out" in out.lower(), out[-4000:]
    assert "rank 0: process group up" not in out
    assert seconds < BOUND


def test_bench_distributed_equality_check():
    from shortcut_fast.bench.distributed import PROBE_TOL, _compare

    counts = {"layer4.0": [torch.tensor([[3, 4], [5, 6]]), torch.tensor([7, 8])]}
    same = {"layer4.0": [t.clone() for t in counts["layer4.0"]]}
    assert _compare("sweep", counts, same) == {"identical_group_counts": True, "differing_counts": 0}
    off = {"layer4.0": [torch.tensor([[3, 4], [5, 5]]), torch.tensor([7, 8])]}
    with pytest.raises(RuntimeError, match="1 per-group counts differ"):
        _compare("sweep", counts, off)

    stats = {"complexity": torch.tensor([0.25, 0.5], dtype=torch.float64),
             "v_information": torch.tensor([[0.1, 0.9]], dtype=torch.float64), "heldout_accuracy": 0.5}
    near = {**stats, "complexity": stats["complexity"] + PROBE_TOL / 10}
    got = _compare("probe_stats", stats, near)
    assert got["max_abs_diff_vs_1_process"] == pytest.approx(PROBE_TOL / 10) and got["same_heldout_accuracy"]
    with pytest.raises(RuntimeError, match="statistics differ"):
        _compare("probe_stats", stats, {**stats, "complexity": stats["complexity"] + 10 * PROBE_TOL})
    with pytest.raises(RuntimeError, match="held-out accuracy"):
        _compare("probe_stats", stats, {**stats, "heldout_accuracy": 0.75})
