"""torch.distributed scale-out of the frequency probe and the localization experiment: 2 CPU
processes (gloo) launched by torch.distributed.run give the one-process result.

- run_freq_probe(dist=): the DFM search with classes over ranks (loss and greedy methods, 2
  classes) and with the candidates of one class over ranks (loss and gradient methods, 1
  class); each rank keeps its finished classes (class_<c>.rank<r>.json) and a resuming
  call reuses them; greedy with fewer classes than ranks is refused naming the work.
- run_localization(dist=): 2 seeds over 2 ranks (each a whole stacked ensemble: exact) and 1
  seed's variants over 2 ranks (float64, to rounding); each rank keeps its records in
  store/rank<r>/ and a resuming call reuses them.
The launch helper follows tests/test_distributed.py."""
import dataclasses
import json
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

LAUNCH_TIMEOUT = 180  # a safety net against a hung collective, far above the usual run time

# The shared inputs: data built the same way here and in every rank, a tiny model trained here.
COMMON = textwrap.dedent('''
    import dataclasses
    import torch
    from torch import nn

    from shortcut_fast.data import make_synthetic_freq
    from shortcut_fast.experiments import freq_probe as fp
    from shortcut_fast.experiments import localization as loc
    from shortcut_fast.models import build_model


    def freq_splits():
        return make_synthetic_freq(seed=0, num_classes=2, image_size=16, channels=1, n_train=128, n_val=16, n_test=48,
                                   noise=0.3)


    def tiny_cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 2))


    PROBES = {  # name -> FreqProbeConfig
        "loss": fp.FreqProbeConfig(method="loss", patch=2, max_images_per_class=12, batch_size=64),
        "greedy": fp.FreqProbeConfig(method="greedy", max_images_per_class=12, batch_size=256, tolerance=1),
        "loss_one_class": fp.FreqProbeConfig(method="loss", patch=1, classes=[1], max_images_per_class=12,
                                             batch_size=64),
        "gradient_one_class": fp.FreqProbeConfig(method="gradient", patch=1, classes=[0], candidates=20,
                                                 max_images_per_class=12, batch_size=64),
    }


    def loc_splits():
        return make_synthetic_freq(seed=0, num_classes=2, image_size=16, n_train=96, n_val=16, n_test=64)


    def loc_model(seed):
        torch.manual_seed(seed)
        return build_model("small-cnn", num_classes=2, image_size=16, width=4, padding=2)


    def loc_cfg(seeds):
        return loc.LocalizationConfig(units=["conv1", "head"], epochs=1, seeds=seeds, batch_size=32,
                                      probe_images=32)
''')

# The job each rank runs: the library called with dist=context().
SCRIPT = textwrap.dedent('''
    import json
    import sys
    from pathlib import Path

    import torch

    from shortcut_fast import distributed as sd
    from shortcut_fast.run_folder import Store
    sys.path.insert(0, sys.argv[2])
    from common import *  # noqa: F401,F403

    torch.set_num_threads(1)
    jobs, folder = sys.argv[1].split(","), Path(sys.argv[2])
    ctx = sd.context("cpu")
    out = {}
    for job in jobs:
        if job == "freq":
            splits = freq_splits()
            model = tiny_cnn()
            model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
            for name, cfg in PROBES.items():
                store = Store(folder / f"fp-{name}", resuming=False) if name in ("loss", "loss_one_class") else None
                out[name] = fp.run_freq_probe(model, splits, cfg, store=store, progress=False, dist=ctx)
            # each rank resumes from its own finished classes (rank 1 holds class 1 of "loss")
            if ctx.rank == 1:
                f = folder / "fp-loss" / "class_1.rank1.json"
                saved = json.loads(f.read_text())
                f.write_text(json.dumps(dict(saved, dfm_size=saved["dfm_size"] - 7000)))
            sd.barrier(ctx)
            out["resumed"] = fp.run_freq_probe(model, splits, PROBES["loss"], store=Store(folder / "fp-loss", True),
                                               progress=False, dist=ctx)
            out["resumed_sizes"] = sd.gather([e.dfm_size for e in out["resumed"].classes], ctx)
        elif job == "loc":
            splits = loc_splits()
            store = Store(folder / "loc-store", resuming=False)
            out["loc2"] = loc.run_localization(loc_model, splits, loc_cfg(2), store=store, progress=False, dist=ctx)
            if ctx.rank == 1:  # rank 1 resumes from its own record of seed 1
                f = folder / "loc-store" / "rank1" / "seed_1.json"
                saved = json.loads(f.read_text())
                saved["accuracy"]["clean"]["clean"] = -1.0
                f.write_text(json.dumps(saved))
            sd.barrier(ctx)
            out["loc2_resumed"] = loc.run_localization(loc_model, splits, loc_cfg(2), store=Store(store.root, True),
                                                       progress=False, dist=ctx)
            out["loc1"] = loc.run_localization(loc_model, splits, loc_cfg(1), progress=False, dist=ctx)
        elif job == "bad":  # refused on every rank, naming the work items
            try:
                fp.run_freq_probe(tiny_cnn(), freq_splits(), dataclasses.replace(PROBES["greedy"], classes=[0]),
                                  progress=False, dist=ctx)
            except ValueError as exc:
                out["bad"] = sd.gather(str(exc), ctx)
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


def _common():
    ns: dict = {}
    exec(compile(COMMON, "common", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from shortcut_fast.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("dist-exp")
    (folder / "common.py").write_text(COMMON)
    (folder / "job.py").write_text(SCRIPT)
    ns = _common()
    splits = ns["freq_splits"]()
    model = ns["tiny_cnn"]()
    train(model, splits, TrainConfig(epochs=10, batch_size=32, optimizer="adam", lr=3e-2, weight_decay=0),
          progress=False)
    torch.save(model.state_dict(), folder / "model.pt")
    got = _run(folder, "freq,loc,bad")  # one launch (torchrun's start-up is most of the time)
    return folder, ns, model.eval(), splits, got


def _same_entries(got, want, exact=True):
    assert [e.label for e in got] == [e.label for e in want]
    for a, b in zip(got, want):
        a, b = dataclasses.asdict(a), dataclasses.asdict(b)
        a.pop("seconds"), b.pop("seconds")
        if exact:
            assert a == b, a["label"]
            continue
        # candidates over ranks: the forward batches are composed differently (float rounding)
        assert a["dfm"] == b["dfm"] and a["dfm_size"] == b["dfm_size"]
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]), rtol=1e-5, atol=1e-6)
        for key in ("correct_after_removal", "candidates", "exact_evaluations"):
            assert a["details"].get(key) == b["details"].get(key), key


def test_two_processes_give_the_one_process_dfm_search(setup):
    from shortcut_fast.experiments import freq_probe as fp

    folder, ns, model, splits, got = setup
    for name, cfg in ns["PROBES"].items():
        want = fp.run_freq_probe(model, splits, cfg, progress=False)
        two = got[name]
        assert two.config == want.config and two.test_accuracy == want.test_accuracy and two.adcs == want.adcs
        split_classes = len(cfg.classes or [0, 1]) >= 2
        _same_entries(two.classes, want.classes, exact=split_classes)
        if split_classes:
            assert two.shortcut == want.shortcut
        else:
            assert [r["dfm_size"] for r in two.shortcut] == [r["dfm_size"] for r in want.shortcut]
    # classes over ranks: each rank saved its own; one class's candidates over ranks: both saved it
    assert sorted(p.name for p in (folder / "fp-loss").glob("class_*")) == ["class_0.rank0.json", "class_1.rank1.json"]
    assert sorted(p.name for p in (folder / "fp-loss_one_class").glob("class_*")) == ["class_1.rank0.json",
                                                                                      "class_1.rank1.json"]
    # a resuming call reuses each rank's finished classes (rank 1's edited file), every rank the same result
    assert got["resumed"].classes[1].dfm_size == -7000 + got["loss"].classes[1].dfm_size
    assert got["resumed"].classes[0] == got["loss"].classes[0]
    assert got["resumed_sizes"][0] == got["resumed_sizes"][1] == [e.dfm_size for e in got["resumed"].classes]


def test_two_processes_give_the_one_process_localization(setup):
    from shortcut_fast.experiments import localization as loc

    folder, ns, _, _, got = setup
    splits = ns["loc_splits"]()
    want = loc.run_localization(ns["loc_model"], splits, ns["loc_cfg"](2), progress=False)
    two = got["loc2"]
    assert two.variants == want.variants and len(want.variants) == 6 and two.seeds == [0, 1]
    # seeds over ranks: every seed is the same stacked ensemble as in one process
    assert two.per_seed == want.per_seed
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # noqa: E731  (NaN shares equal NaN)
    assert same(two.accuracy, want.accuracy) and same(two.per_unit, want.per_unit)
    resumed = got["loc2_resumed"].per_seed
    assert resumed[0] == two.per_seed[0] and resumed[1]["accuracy"]["clean"]["clean"] == -1.0
    for rank, seed in ((0, 0), (1, 1)):
        assert (folder / "loc-store" / f"rank{rank}" / f"seed_{seed}.json").exists()

    # one seed: its 6 variants over 2 ranks (3 each, own stacks): the same up to the float
    # rounding of convolutions grouped over 3 instead of 6 variants
    want1 = loc.run_localization(ns["loc_model"], splits, ns["loc_cfg"](1), progress=False)
    one, two = want1.per_seed[0], got["loc1"].per_seed[0]
    assert two["variants"] == one["variants"] and two["accuracy"] == one["accuracy"]
    for which in ("attribute", "label"):
        for arm in ("clean", "skew"):
            a, b = one["v_information"][which][arm], two["v_information"][which][arm]
            assert list(a) == list(b)
            torch.testing.assert_close(torch.tensor(list(b.values())), torch.tensor(list(a.values())), rtol=1e-4,
                                       atol=1e-6)


def test_a_world_size_above_the_work_items_is_refused_naming_them(setup):
    errors = setup[-1]["bad"]
    assert len(errors) == 2 and errors[0] == errors[1]
    assert "world size 2 is larger than the 1 work items of the classes of the DFM search (method 'greedy'" \
        in errors[0]
