"""Data-parallel training (train(dist=) and run_mitigation(dist=)): 2 CPU processes (gloo)
launched by torch.distributed.run train a small CNN with BatchNorm on colored digits (an
uneven last batch: 76 samples in batches of 25, the last one of a single sample, so rank 1
gets an empty slice of it; the other slices are 13 / 12) to the one-process weights, history
and evaluation; a run whose rank 1 is killed after epoch 1 under --max-restarts 1 resumes
from rank 0's last.pt to the uninterrupted weights; a 1-epoch mitigation run (NT-Xent over
the gathered global batch) equals one process. One launch runs all three (the killed run
first, so the others run in the restarted round): ~25 s on 2 loaded cores.

Tolerances: the model computes in float64 (its input cast), so the reductions that differ
from one process (gradient and BatchNorm sums over ranks) move the weights by ~1e-15; the
tests allow rtol 1e-9 / atol 1e-10 for plain training. The mitigation objective computes its
loss terms in float32 (as in one process): rtol 1e-5 / atol 1e-6. Counts are exact."""
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import torchrun_command, torchrun_env
import torch

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available in this PyTorch build"),
]

LAUNCH_TIMEOUT = 180  # a safety net against a hung collective, far above the usual ~15 s
RTOL, ATOL = 1e-9, 1e-10  # plain training, float64 model
MIT_RTOL, MIT_ATOL = 1e-5, 1e-6  # mitigation: float32 loss terms

# The job: importable (the test runs the same functions with dist=None) and a torchrun script.
SCRIPT = textwrap.dedent('''
    import os, sys
    from pathlib import Path

    import torch
    from torch import nn

    from shortcut_fast import distributed as sd
    from shortcut_fast.data import load_dataset
    from shortcut_fast.experiments import memorization as mem
    from shortcut_fast.models import build_model
    from shortcut_fast.run_folder import Store
    from shortcut_fast.train import TrainConfig, train


    class Net(nn.Module):
        """small-cnn (BatchNorm after every conv) in float64."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = build_model("small-cnn", num_classes=10, image_size=16, width=4, padding=2).double()

        def forward(self, x):
            return self.body(x.double())


    def splits(saved=None):
        if saved is not None and saved.exists():  # what the test saved (the same subsets, loaded faster)
            return torch.load(saved, weights_only=False)
        s = load_dataset("colored-digits", image_size=16, conflict_ratio=0.1)
        g = torch.Generator().manual_seed(0)
        for name, n in (("train", 76), ("val", 31), ("test", 29)):
            ds = getattr(s, name)
            setattr(s, name, ds.subset(torch.randperm(len(ds), generator=g)[:n]))
        s.extra = {}
        return s


    CFG = TrainConfig(epochs=2, batch_size=25, optimizer="sgd", lr=0.05, augment="flip-crop", select="last",
                      device="cpu", seed=3)


    def run_train(data, dist=None, store=None, on_epoch_end=None):
        model = Net()
        res = train(model, data, CFG, store=store, progress=False, dist=dist, on_epoch_end=on_epoch_end)
        assert all(type(m) in (nn.BatchNorm2d,) for m in model.modules() if "Norm" in type(m).__name__)
        return {"weights": model.state_dict(), "history": res.history, "final": res.final}


    MIT = dict(epochs=1, batch_size=25, device="cpu", eval_batch_size=16)


    def run_mitigation(data, dist=None):
        model = Net()
        res = mem.run_mitigation(model, data, mem.MitigationConfig(**MIT), progress=False, dist=dist)
        return {"weights": model.state_dict(), "history": res.history, "after": res.after,
                "after_pruned": res.after_pruned}


    if __name__ == "__main__":
        torch.set_num_threads(1)
        jobs, folder = sys.argv[1].split(","), Path(sys.argv[2])
        ctx = sd.context("cpu")
        data = splits(folder / "splits.pt")
        out = {"restart_count": ctx.restart_count}
        for job in jobs:
            if job == "train":
                out[job] = run_train(data, ctx)
            elif job == "mitigation":
                out[job] = run_mitigation(data, ctx)
            elif job == "elastic":
                def die(epoch, model, record):  # rank 1 dies once, right after epoch 1's checkpoint
                    marker = folder / "killed"
                    if ctx.rank == 1 and epoch == 0 and not marker.exists():
                        marker.write_text(str(os.getpid()))
                        os._exit(3)
                out[job] = run_train(data, ctx, Store(folder / "store", resuming=True), die)
        if ctx.rank == 0:
            torch.save(out, folder / "result.pt")
        sd.shutdown()
''')


def _run(folder: Path, jobs: str, *extra: str) -> dict:
    (folder / "job.py").write_text(SCRIPT)
    proc = subprocess.run(torchrun_command(folder / "job.py", jobs, folder, extra=extra), env=torchrun_env(), cwd=folder, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(folder / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def job():
    """The script's functions, run here in one process for the reference results."""
    space = {"__name__": "job"}
    exec(compile(SCRIPT, "job.py", "exec"), space)
    space["data"] = space["splits"]()
    return space


@pytest.fixture(scope="module")
def two(job, tmp_path_factory):
    """The 2-process results; rank 1 dies once in the first job (elastic), after epoch 1."""
    folder = tmp_path_factory.mktemp("ddp")
    torch.save(job["data"], folder / "splits.pt")
    return folder, _run(folder, "elastic,train,mitigation", "--max-restarts", "1")


def _close_weights(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert list(got) == list(want)  # the plain model's keys: no DDP "module." prefix
    for k, w in want.items():
        if w.is_floating_point():
            torch.testing.assert_close(got[k], w, rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(got[k], w), k  # num_batches_tracked


def _same_eval(got, want, rtol: float, atol: float) -> None:
    assert got.n == want.n and got.group_counts == want.group_counts
    assert got.accuracy == want.accuracy and got.group_accuracy == want.group_accuracy
    assert got.aligned_accuracy == want.aligned_accuracy and got.conflicting_accuracy == want.conflicting_accuracy
    assert got.loss == pytest.approx(want.loss, rel=rtol, abs=atol)


def test_two_processes_train_to_the_one_process_weights_and_evaluation(job, two):
    data = job["data"]
    assert len(data.train) == 76  # batches 25, 25, 25, 1: slices 13/12 and 1/0
    one = job["run_train"](data)
    got = two[1]["train"]
    _close_weights(got["weights"], one["weights"], RTOL, ATOL)
    assert [h["epoch"] for h in got["history"]] == [1, 2]
    for a, b in zip(got["history"], one["history"]):
        assert a["val_accuracy"] == b["val_accuracy"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-7)  # the float32 loss sum
    assert set(got["final"]) == set(one["final"]) == {"test", "val"}
    for name in one["final"]:
        _same_eval(got["final"][name], one["final"][name], 1e-6, 1e-7)  # per-sample losses are float32
    assert got["final"]["test"].n == 29 and sum(got["final"]["test"].group_counts.values()) == 29


def test_a_killed_rank_resumes_from_rank_0s_last_pt_to_the_uninterrupted_weights(two):
    folder, got = two
    assert (folder / "killed").exists()  # rank 1 did die once,
    assert got["restart_count"] == 1  # the job finished in the restarted round
    saved = sorted(p.name for p in (folder / "store").iterdir())
    assert saved == ["best.pt", "history.json", "last.pt"]  # rank 0's files only
    want = got["train"]
    _close_weights(got["elastic"]["weights"], want["weights"], 0, 0)  # the same reductions: exact
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(got["elastic"]["history"]) == drop(want["history"])  # epoch 1's from last.pt


def test_a_two_process_mitigation_run_equals_one_process(job, two):
    one = job["run_mitigation"](job["data"])
    got = two[1]["mitigation"]
    _close_weights(got["weights"], one["weights"], MIT_RTOL, MIT_ATOL)
    (a,), (b,) = got["history"], one["history"]
    assert a["pruned_weights"] == b["pruned_weights"] and a["val_accuracy"] == b["val_accuracy"]
    for key in ("contrastive_loss", "ce_loss", "train_loss", "mask_threshold"):
        assert a[key] == pytest.approx(b[key], rel=MIT_RTOL), key
    for report in ("after", "after_pruned"):
        for split, rec in one[report].items():
            for key, value in rec.items():
                if isinstance(value, float):
                    assert got[report][split][key] == pytest.approx(value, rel=MIT_RTOL, abs=MIT_ATOL), key
                else:
                    assert got[report][split][key] == value, key
