"""The command line distributed (issue 13): `shortcut-fast <command> --nproc 2` and torchrun -m
shortcut_fast give result.json numbers equal to the one-process run (DeNetDM exactly: members
over ranks; complexity to 1e-9: only the summation order of the all-reduced float64 statistics
differs); only rank 0 writes run.json, result.json and the figures; settings that differ
across ranks, a world size larger than the work and --nproc under torchrun are refused with
a clear message printed once. 2 gloo processes on the CPU, as tests/test_distributed.py."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import torchrun_command, torchrun_env
import torch

from cli_runner import run_cli

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available in this PyTorch build"),
]

TIMEOUT = 180  # a safety net against a hung collective, far above the usual ~15 s

DENETDM = ["denetdm", "--conflict-ratio", "0.05,0.1", "--seeds", "1", "--stage1-epochs", "1", "--stage2-epochs", "1",
           "--baseline-epochs", "1", "--width", "16", "-D", "image_size=16", "--batch-size", "128", "--quiet",
           "--device", "cpu", "--seed", "0"]
COMPLEXITY = ["complexity", "--data", "colored-digits", "--recipe", "quick", "--epochs", "1", "--directions", "pca:4",
              "--max-images", "64", "--max-heldout", "32", "--batch-size", "16", "--quiet", "--device", "cpu"]

# torchrun's job: the command line, with rank 1's options changed as $RANK1_SET says
# (another --out shows what rank 1 writes; another --seed is a mismatch); with $RANK1_DIES
# rank 1 of the first attempt dies when DeNetDM starts (after rank 0 opened the run folder).
WRAPPER = textwrap.dedent('''
    import functools, json, os, sys
    from shortcut_fast.cli import main
    from shortcut_fast.experiments import denetdm as dn

    args = sys.argv[1:]
    if os.environ.get("RANK") == "1":
        for key, value in json.loads(os.environ.get("RANK1_SET", "{}")).items():
            args[args.index(key) + 1] = value
        if os.environ.get("RANK1_DIES") and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            @functools.wraps(dn.run_denetdm)
            def dying(*a, **k):
                os._exit(3)
            dn.run_denetdm = dying
    main(args, prog_name="shortcut-fast")
''')


def _shortcut_fast(*args, cwd):
    """`shortcut-fast ARGS` in a fresh process (as from a shell: --nproc re-launches it)."""
    return subprocess.run([sys.executable, "-m", "shortcut_fast", *map(str, args)], env=torchrun_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _torchrun(tmp_path, args, rank1_set=None, *extra, dies=False):
    """torchrun --nproc-per-node 2 (c10d rendezvous) of the wrapper around the command line."""
    job = tmp_path / "job.py"
    job.write_text(WRAPPER)
    cmd = torchrun_command(job, *args, extra=extra)
    env = torchrun_env(RANK1_SET=json.dumps(rank1_set or {}), **({"RANK1_DIES": "1"} if dies else {}))
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)


def _one_process(*args):
    r = run_cli(*list(map(str, args)))
    assert r.exit_code == 0, r.output
    return r


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def test_denetdm_under_torchrun_restarted_equals_one_process_and_only_rank_0_writes(tmp_path):
    """Rank 1 dies once after rank 0 opened the run folder; torchrun --max-restarts 1 restarts
    both, rank 0 resumes the folder (its lock taken over), and the result is the one-process one."""
    _one_process(*DENETDM, "--out", tmp_path / "one")
    out, other = tmp_path / "two", tmp_path / "rank1-out"  # rank 1 gets another --out (not a setting)
    proc = _torchrun(tmp_path, [*DENETDM, "--out", out], {"--out": str(other)}, "--max-restarts", "1", dies=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert _result(out)["methods"] == _result(tmp_path / "one")["methods"]  # members over ranks: exact
    assert proc.stdout.count("results in") == 1  # one summary table: rank 0's
    assert {p.name for p in out.iterdir()} >= {"run.json", "result.json", "accuracy.png", "partial"}
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["resumed"] is True  # the restarted attempt resumed
    # rank 1 wrote its own partial results and nothing else (no run.json, lock, result.json, figures)
    written = sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file())
    assert written and all(w.startswith("partial/rank1/") for w in written), written
    assert (out / "partial" / "rank0").is_dir()


def test_complexity_nproc_2_equals_one_process(tmp_path):
    one = _one_process(*COMPLEXITY, "--out", tmp_path / "one")  # trains the model into the (test's) model cache
    assert "Traceback" not in one.output
    proc = _shortcut_fast(*COMPLEXITY, "--out", tmp_path / "two", "--nproc", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "reusing cached model" in proc.stdout  # rank 0 took it from the cache, the other rank got its weights
    a, b = _result(tmp_path / "one")["result"], _result(tmp_path / "two")["result"]
    assert (a["n_train"], a["n_heldout"], a["heldout_accuracy"]) == (b["n_train"], b["n_heldout"], b["heldout_accuracy"])
    # float64 statistics, images split over 2 ranks: only the all-reduce's summation order differs
    for key in ("v_information", "complexity", "importance", "importance_signed", "feature_std"):
        torch.testing.assert_close(torch.tensor(b[key], dtype=torch.float64), torch.tensor(a[key], dtype=torch.float64),
                                   rtol=1e-9, atol=1e-9)
    for rank in (0, 1):
        assert (tmp_path / "two" / "partial" / f"rank{rank}").is_dir()
    assert (tmp_path / "two" / "complexity_hist.png").exists()


def test_memorization_nproc_2(tmp_path):
    """The sweep's channels over 2 processes: the same counts, scores and top channels."""
    args = ["memorization", "--model", "mlp", "-M", "width=8", "--epochs", "1", "--layers", "fc1", "--max-samples", "64",
            "--quiet", "--device", "cpu"]
    _one_process(*args, "--out", tmp_path / "one")
    proc = _shortcut_fast(*args, "--out", tmp_path / "two", "--nproc", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    a, b = _result(tmp_path / "one")["result"], _result(tmp_path / "two")["result"]
    assert b["baseline"] == a["baseline"]
    assert [s["train_accuracy"] for s in b["layers"]] == [s["train_accuracy"] for s in a["layers"]]
    assert [s["score"] for s in b["layers"]] == [s["score"] for s in a["layers"]]
    assert b["top_channels"] == a["top_channels"]


def test_settings_that_differ_across_ranks_are_refused_once_naming_the_setting(tmp_path):
    proc = _torchrun(tmp_path, [*DENETDM, "--out", tmp_path / "run"], {"--seed": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr[-4000:]  # rank 0's; rank 1 exits quietly with the same status
    assert "settings differ across ranks" in errors[0] and "seed: 0 on rank 0, 1 on rank 1" in errors[0], errors
    assert not (tmp_path / "run" / "result.json").exists()


def test_world_size_larger_than_the_work_is_refused(tmp_path):
    one_member = [a if a != "0.05,0.1" else "0.05" for a in DENETDM]
    proc = _shortcut_fast(*one_member, "--out", tmp_path / "run", "--nproc", "2", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "world size 2 is larger than the 1 work items" in errors[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr


def test_nproc_and_max_restarts_refused_where_they_do_not_apply(tmp_path, monkeypatch):
    r = run_cli(*DENETDM, "--out", str(tmp_path / "a"), "--max-restarts", "1")
    assert r.exit_code == 2 and "--max-restarts" in r.output and "--nproc N" in r.output, r.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = run_cli(*DENETDM, "--out", str(tmp_path / "b"), "--nproc", "2")
    assert r.exit_code == 2 and "already runs under torchrun" in r.output, r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_info_shows_the_distributed_setting(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    r = run_cli("info")
    assert r.exit_code == 0, r.output
    line = next(line for line in r.output.splitlines() if line.startswith("distributed:"))
    assert "gloo yes" in line and "not under torchrun" in line
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    r = run_cli("info", "--json")
    data = json.loads(r.output)["distributed"]
    assert data["under_torchrun"] and (data["rank"], data["world_size"], data["local_rank"]) == ("3", "4", "1")
