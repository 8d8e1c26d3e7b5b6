"""torch.distributed scale-out of the library (shortcut_fast.distributed): 2 CPU processes
(gloo) launched by torch.distributed.run with a c10d rendezvous give the one-process result
for the channel-ablation sweep (image batches over ranks), the complexity statistics (images over
ranks, sums all-reduced) and DeNetDM (members over ranks); so does a 2-"node" run (two
launchers on 127.0.0.1) and a run whose rank 1 is killed mid-sweep under --max-restarts 1;
bad input (world size > work items, settings that differ across ranks) is refused with a
message naming the cause. Plus the one-process helpers in this process."""
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import free_port, torchrun_command, torchrun_env
import torch

import shortcut_fast.distributed as sd

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available in this PyTorch build"),
]

LAUNCH_TIMEOUT = 180  # a safety net against a hung collective, far above the usual ~10 s

# The job each rank runs: the library called with dist=context() on the inputs the test saved.
SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path

    import torch

    from shortcut_fast import distributed as sd
    from shortcut_fast.data import DatasetSplits, ImageDataset, load_dataset
    from shortcut_fast.experiments import complexity as cx
    from shortcut_fast.experiments import denetdm as dn
    from shortcut_fast.models import build_model
    from shortcut_fast.run_folder import Store
    from shortcut_fast.surgery import sweep as sw

    torch.set_num_threads(1)
    jobs, folder = sys.argv[1].split(","), Path(sys.argv[2])
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    ctx = sd.context("cpu")
    model = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2)
    model.load_state_dict(inputs["model"])
    data = (inputs["x"], inputs["y"], inputs["g"])
    out = {}

    def sweep(batch_size=16, **kw):
        return sw.channel_ablation_sweep(model, ["conv1", "conv2"], data, batch_size=batch_size, dist=ctx, **kw)

    for job in jobs:
        if job == "sweep":
            out[job] = sweep(mode="activation-noise", repeats=2, return_outputs=True, seed=3)
        elif job == "elastic":
            if ctx.rank == 1:  # rank 1 dies once, in conv2's second item (conv1 and conv2's first item saved)
                real, calls = sw._group_outcomes_unchecked, []

                def dying(*args, **kw):
                    calls.append(1)
                    marker = folder / "killed"
                    # rank 1's items a layer: batch 1 (baseline + variants: 2 calls), then its
                    # share of the variants of batch 2, the batch left over (1 call)
                    if len(calls) == 6 and not marker.exists():
                        marker.write_text(str(os.getpid()))
                        os._exit(3)
                    return real(*args, **kw)
                sw._group_outcomes_unchecked = dying
            saved = folder / "store" / f"sweep.rank{ctx.rank}.pt"  # what this rank resumes from
            saved = torch.load(saved, weights_only=True) if saved.exists() else None
            cur = saved and saved["current"]
            mine = saved and (sorted(saved["done"]), cur and (cur["layer"], cur["next_batch"]))
            out["resumed"] = sd.gather(mine, ctx)
            out[job] = sweep(mode="zero", return_outputs=True, store=Store(folder / "store", resuming=True))
            out["restart_count"] = ctx.restart_count
        elif job == "complexity":
            splits = DatasetSplits("toy", ImageDataset(inputs["x"], inputs["y"], num_classes=3),
                                   ImageDataset(inputs["xv"], inputs["yv"], num_classes=3),
                                   ImageDataset(inputs["xv"], inputs["yv"], num_classes=3),
                                   num_classes=3, image_shape=(3, 16, 16))
            cfg = cx.ComplexityConfig(directions="pca:5", max_images=None, max_heldout=None, batch_size=16)
            res = cx.run_complexity(model, splits, cfg, checkpoints=folder / "ckpts", progress=False, dist=ctx,
                                    store=Store(folder / "cx-store", resuming=False))
            out[job] = {k: v for k, v in vars(res).items() if k != "seconds"}
        elif job == "denetdm":
            torch.set_default_dtype(torch.float64)
            cfg = dn.DeNetDMConfig(ratios=(0.05, 0.1), seeds=1, stage1_epochs=1, stage2_epochs=1, baseline_epochs=1,
                                   width=16, batch_size=128)
            load = lambda r, s: load_dataset("colored-digits", seed=s, conflict_ratio=r, unbiased_val=True,
                                             image_size=16)
            out[job] = dn.run_denetdm(load, cfg, progress=False, dist=ctx,
                                      store=Store(folder / "dn-store", resuming=False))
            torch.set_default_dtype(torch.float32)
        elif job == "bad":  # each refusal is raised on every rank (no rank is left in a collective)
            errors = {}
            for name, kw in (("world", dict(channels=[0], batch_size=64)), ("settings", dict(seed=ctx.rank))):
                try:
                    sweep(mode="activation-noise", **kw)
                except ValueError as exc:
                    errors[name] = str(exc)
            out[job] = errors
    if ctx.rank == 0:
        torch.save(out, folder / "result.pt")
        print("rank 0 of", ctx.world_size, "done:", ",".join(jobs), flush=True)
    sd.shutdown()
''')


def _run(folder: Path, jobs: str, *extra: str) -> dict:
    proc = subprocess.run(torchrun_command(folder / "job.py", jobs, folder, extra=extra), env=torchrun_env(), cwd=folder,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(folder / "result.pt", weights_only=False)


# ---------------------------------------------------------------------------------------
# Inputs, and the one-process results they are compared with


def _toy():
    """A small-cnn trained a few steps on a colour / half-image cue, and its data."""
    from shortcut_fast.models import build_model

    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.rand(n, 3, 16, 16, generator=g) * 0.5
        x[:, 0] += 0.3 * (y == 0)[:, None, None]
        x[:, 1, :8] += 0.3 * (y == 1)[:, None, None]
        return x, y

    x, y = make(40)
    xv, yv = make(32)
    groups = torch.randint(0, 4, (40,), generator=g)
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), dict(x=x, y=y, g=groups, xv=xv, yv=yv)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    model, data = _toy()
    torch.save(dict(data, model=model.state_dict()), folder / "inputs.pt")
    (folder / "ckpts").mkdir()
    g = torch.Generator().manual_seed(1)
    earlier = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    torch.save({"model": earlier}, folder / "ckpts" / "epoch_001.pt")
    (folder / "job.py").write_text(SCRIPT)
    return folder, model, data


def _copy(setup, tmp_path) -> Path:
    folder = setup[0]
    for name in ("inputs.pt", "job.py"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "epoch_001.pt").write_bytes((folder / "ckpts" / "epoch_001.pt").read_bytes())
    return tmp_path


def _sweep(model, data, **kw):
    from shortcut_fast.surgery import channel_ablation_sweep

    return channel_ablation_sweep(model, ["conv1", "conv2"], (data["x"], data["y"], data["g"]), batch_size=16, **kw)


def _same_sweep(got, want):
    assert list(got.layers) == list(want.layers)
    for name, w in want.layers.items():
        r = got.layers[name]
        assert r.channels == w.channels and r.num_channels == w.num_channels
        assert torch.equal(r.correct, w.correct), name  # counts (and means of counts): exact
        assert torch.equal(r.baseline_correct, w.baseline_correct) and torch.equal(r.group_counts, w.group_counts)
        torch.testing.assert_close(r.loss, w.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.outputs, w.outputs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 2 processes vs 1


def test_two_processes_give_the_one_process_sweep_complexity_and_denetdm(setup):
    from shortcut_fast.data import DatasetSplits, ImageDataset, load_dataset
    from shortcut_fast.experiments import complexity as cx
    from shortcut_fast.experiments import denetdm as dn

    folder, model, data = setup
    got = _run(folder, "sweep,complexity,denetdm")

    _same_sweep(got["sweep"], _sweep(model, data, mode="activation-noise", repeats=2, return_outputs=True, seed=3))
    assert got["sweep"]["conv2"].outputs.shape == (2, 8, 40, 3)  # (repeats, variants, samples, classes)

    splits = DatasetSplits("toy", ImageDataset(data["x"], data["y"], num_classes=3),
                           ImageDataset(data["xv"], data["yv"], num_classes=3),
                           ImageDataset(data["xv"], data["yv"], num_classes=3), num_classes=3, image_shape=(3, 16, 16))
    want = cx.run_complexity(model, splits, cx.ComplexityConfig(directions="pca:5", max_images=None, max_heldout=None,
                                                                 batch_size=16),
                             checkpoints=folder / "ckpts", progress=False)
    c = got["complexity"]
    assert c["n_train"] == want.n_train == 40 and c["n_heldout"] == want.n_heldout == 32
    assert c["heldout_accuracy"] == want.heldout_accuracy
    # float64 statistics (the CPU default), shards on the same 16-image chunks: only the
    # summation order of the all-reduce differs from one process
    for key in ("v_information", "complexity", "importance", "importance_signed", "feature_std"):
        torch.testing.assert_close(torch.tensor(c[key]), torch.tensor(getattr(want, key)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.tensor(c["dynamics"]["temporal_v_information"]),
                               torch.tensor(want.dynamics["temporal_v_information"]), rtol=1e-9, atol=1e-9)
    assert c["dynamics"]["mean_complexity"] == pytest.approx(want.dynamics["mean_complexity"], abs=1e-9)
    for rank in (0, 1):  # each rank keeps its own partial results
        assert (folder / "cx-store" / f"rank{rank}" / "final.pt").exists()

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = dn.DeNetDMConfig(ratios=(0.05, 0.1), seeds=1, stage1_epochs=1, stage2_epochs=1, baseline_epochs=1,
                               width=16, batch_size=128)
        one = dn.run_denetdm(lambda r, s: load_dataset("colored-digits", seed=s, conflict_ratio=r, unbiased_val=True,
                                                       image_size=16), cfg, progress=False)
    finally:
        torch.set_default_dtype(old)
    two = got["denetdm"]
    assert two["methods"] == one["methods"]
    assert two["members"] == one["members"] and two["dataset"] == one["dataset"] and two["config"] == one["config"]
    for name, rec in one["phases"].items():
        a, b = rec["history"], two["phases"][name]["history"]
        assert len(a) == len(b) == 1 and [e["val_unbiased"] for e in a[0]] == [e["val_unbiased"] for e in b[0]]
        torch.testing.assert_close(torch.tensor([e["train_loss"] for e in b[0]]),
                                   torch.tensor([e["train_loss"] for e in a[0]]), rtol=1e-9, atol=1e-11)
    assert (folder / "dn-store" / "rank1" / "erm.done.pt").exists()


def test_two_nodes_with_one_process_each_give_the_one_process_sweep(setup, tmp_path):
    folder = _copy(setup, tmp_path)
    port = free_port()
    procs = [subprocess.Popen(torchrun_command(folder / "job.py", "sweep", folder, port=port, nproc=1,
                                               extra=("--nnodes", "2", "--node-rank", str(node),
                                                      "--rdzv-conf", f"is_host={1 - node}")),
                              env=torchrun_env(), cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=LAUNCH_TIMEOUT) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-6000:]
    _, model, data = setup
    got = torch.load(folder / "result.pt", weights_only=False)
    _same_sweep(got["sweep"], _sweep(model, data, mode="activation-noise", repeats=2, return_outputs=True, seed=3))


def test_a_killed_worker_is_restarted_and_the_sweep_resumes_to_the_uninterrupted_result(setup, tmp_path):
    folder = _copy(setup, tmp_path)
    got = _run(folder, "elastic", "--max-restarts", "1")
    assert (folder / "killed").exists()  # rank 1 did die once
    assert got["restart_count"] == 1  # and the job finished in the restarted round,
    assert got["resumed"][1] == (["conv1"], ("conv2", 1))  # rank 1 resuming from its second item of conv2
    for rank in (0, 1):  # each rank kept its own partial state
        assert (folder / "store" / f"sweep.rank{rank}.pt").exists()
    _, model, data = setup
    _same_sweep(got["elastic"], _sweep(model, data, mode="zero", return_outputs=True))


def test_bad_input_world_size_above_the_work_items_and_settings_that_differ(setup, tmp_path):
    folder = _copy(setup, tmp_path)
    errors = _run(folder, "bad")["bad"]
    assert ("world size 2 is larger than both the 1 image batches and the 1 variants of the sweep of layer 'conv1'"
            in errors["world"])
    msg = errors["settings"]
    assert "differ across ranks" in msg and "rank 1 differs from rank 0 in seed: 0 on rank 0, 1 on rank 1" in msg


# ---------------------------------------------------------------------------------------
# The helpers in one process, and their checks


def test_one_process_helpers_are_no_ops():
    ctx = sd.context("cpu", env={})
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.distributed, ctx.is_main) == (0, 1, None, False, True)
    assert sd.shard(5, ctx) == range(5) and sd.shard(0, None) == range(0)
    assert sd.gather({"a": 1}, ctx) == [{"a": 1}] and sd.broadcast(3, None) == 3
    t = torch.arange(3.0)
    assert sd.all_reduce_sum_(t, ctx) is t and t.tolist() == [0.0, 1.0, 2.0]
    sd.barrier(ctx)
    sd.check_same({"anything": object()}, ctx)
    assert sd.rank_suffix(ctx) == "" and sd.rank_suffix(sd.DistContext(rank=1, world_size=2)) == ".rank1"
    assert sd.context(env={"WORLD_SIZE": "1", "TORCHELASTIC_RESTART_COUNT": "2"}).restart_count == 2


def test_shards_are_contiguous_balanced_and_cover_the_items():
    for n, w in ((10, 3), (7, 7), (8, 2), (100, 6)):
        parts = [sd.shard(n, sd.DistContext(rank=r, world_size=w)) for r in range(w)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="world size 4 is larger than the 3 work items of the members"):
        sd.shard(3, sd.DistContext(rank=0, world_size=4), "the members")


@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an int"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK 2 must be smaller than WORLD_SIZE 2"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be an int >= 1"),
])
def test_a_bad_torchrun_environment_is_named(env, match):
    with pytest.raises(ValueError, match=match):
        sd.context("cpu", env=env)


def test_the_settings_diff_names_every_key_and_rank():
    diff = sd._diff(sd._canonical({"a": 1, "b": {"c": (1, 2)}, "d": "x"}),
                    sd._canonical({"a": 1, "b": {"c": (1, 3)}, "e": 2}))
    assert diff == ["b.c: [1, 2] on rank 0, [1, 3]", "d: 'x' on rank 0, '<unset>'", "e: '<unset>' on rank 0, 2"]
    json.dumps(sd._canonical({"t": torch.ones(2), "p": Path("/x"), "dtype": torch.float32}))
