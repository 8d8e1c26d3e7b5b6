"""DeNetDM with ERM and LfF (experiments/denetdm.py, `shortcut-fast denetdm`): the product of
experts, frozen branches in stage 2, selection on validation only, determinism, stacked vs one
member at a time, the LfF loss on a hand-made case, resume, bad input."""
import json

import pytest
import torch

from shortcut_fast.data import load_dataset
from shortcut_fast.data.core import DatasetSplits, ImageDataset
from shortcut_fast.experiments import denetdm as dn
from shortcut_fast.models import build_model
from shortcut_fast.run_folder import RunFolder
from cli_runner import assert_refused, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(image_size=16, **options):
    cache = {}

    def load(ratio, seed):
        if (ratio, seed) not in cache:
            cache[(ratio, seed)] = load_dataset("colored-digits", seed=seed, conflict_ratio=ratio, unbiased_val=True,
                                                image_size=image_size, **options)
        return cache[(ratio, seed)]

    return load


def _cfg(**kw):
    base = dict(ratios=(0.02, 0.1), seeds=2, stage1_epochs=2, stage2_epochs=2, baseline_epochs=2, width=32,
                batch_size=128)
    base.update(kw)
    return dn.DeNetDMConfig(**base)


def _branch(depth, width=16, size=8):
    return dn.FeatureBranch(build_model("mlp", num_classes=10, in_channels=3, image_size=size, depth=depth,
                                        width=width))


# ---- the models

def test_product_of_experts_logits_and_branches_alone():
    torch.manual_seed(0)
    poe = dn.ProductOfExperts(_branch(5), _branch(3), 10)
    x = torch.randn(7, 3, 8, 8)
    out = poe(x)
    b, d = poe.deep(x), poe.shallow(x)
    assert out.shape == (3, 7, 10)
    torch.testing.assert_close(out[0], poe.head(b + d))                    # f(phi_b + phi_d)
    torch.testing.assert_close(out[1], poe.head(b + torch.zeros_like(d)))  # deep alone: shallow zeroed
    torch.testing.assert_close(out[2], poe.head(torch.zeros_like(b) + d))  # shallow alone
    # the branch alone keeps the head's bias (it is not f without bias)
    assert not torch.allclose(out[1], b @ poe.head.weight.T)


def test_stage2_target_head_starts_as_the_stage1_head():
    torch.manual_seed(0)
    poe = dn.ProductOfExperts(_branch(5), _branch(3), 10)
    st = dn.DistilledTarget(poe, _branch(5))
    torch.testing.assert_close(st.target_head.weight, poe.head.weight)
    assert st.target_head.weight.data_ptr() != poe.head.weight.data_ptr()
    assert all(n.split(".")[0] in ("deep", "shallow", "head") for n in st.frozen())
    x = torch.randn(4, 3, 8, 8)
    out = st(x)
    torch.testing.assert_close(out[1], st.target_head(st.target(x)))
    torch.testing.assert_close(out[2], poe(x)[2])  # the teacher is the stage-1 shallow branch alone


def _members(kind, M=2):
    """M members of one DeNetDM model kind (float64), as the experiment builds them."""
    out = []
    for i in range(M):
        torch.manual_seed(i)
        poe = dn.ProductOfExperts(_branch(5), _branch(3), 10)
        if kind == "stage1":
            out.append(poe)
        elif kind == "stage2":
            out.append(dn.DistilledTarget(poe, _branch(5)))
        elif kind == "erm":
            out.append(dn._Heads(dn._Classifier(_branch(4), 10, 1 / 255)))
        else:  # lff: two classifiers, one with a projection to another width
            out.append(dn._Heads(dn._Classifier(_branch(4), 10), dn._Classifier(dn.FeatureBranch(
                build_model("mlp", num_classes=10, in_channels=3, image_size=8, depth=3, width=16), 12), 10)))
    return [m.double() for m in out]


@pytest.mark.parametrize("kind", ["stage1", "stage2", "erm", "lff"])
def test_stacked_matmuls_equal_the_vmap_pass_outputs_and_gradients(kind):
    from shortcut_fast.ensemble import StackedModules

    members = _members(kind)
    program = dn._stacked_program(members[0])
    assert program is not None
    trainable = None if kind != "stage2" else [n for n, _ in members[0].named_parameters()
                                               if n not in set(members[0].frozen())]
    fast, slow = (StackedModules(members, trainable, forward=f) for f in (program, None))
    x = torch.rand(2, 6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got, want = fast(x), slow(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(want)
    g_fast = torch.autograd.grad((got * upstream).sum(), fast.trainable_parameters())
    g_slow = torch.autograd.grad((want * upstream).sum(), slow.trainable_parameters())
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conv_branches_keep_the_vmap_pass():
    conv = dn._Factory(dn.DeNetDMConfig(arch="conv"), 3, 32, 10)
    assert dn._stacked_program(dn.ProductOfExperts(conv.branch("deep"), conv.branch("shallow"), 10)) is None


# ---- the LfF loss on a hand-made case

def test_gce_matches_its_closed_form_gradient():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    q = 0.7
    dn.gce_loss(logits, y, q).sum().backward()
    g1 = logits.grad.clone()
    logits.grad = None
    p_y = torch.softmax(logits, -1).gather(1, y[:, None])[:, 0]
    (1 - p_y ** q).sum().backward()  # LfF's form: q x the gradient of (1 - p^q) / q
    torch.testing.assert_close(g1, logits.grad)


def test_lff_weights_follow_the_published_ema_rule():
    torch.manual_seed(1)
    M, N, C, alpha = 1, 6, 3, 0.7
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]])
    cfg = dn.DeNetDMConfig(lff_ema=alpha)
    loss_fn = dn._lff_loss(cfg, labels, C)
    state = {}
    ema = {"b": torch.zeros(N, dtype=torch.float64), "d": torch.zeros(N, dtype=torch.float64)}
    updated = torch.zeros(N, dtype=torch.float64)
    for idx in ([0, 2, 4], [1, 2, 5]):  # sample 2 twice: its EMA mixes two losses
        idx_t = torch.tensor([idx])
        y = labels[:, idx]
        out = torch.randn(M, 2, 3, C, dtype=torch.float64)  # (M, heads: debiased, biased, B, C)
        got = loss_fn(out, y, idx_t, state)
        # the published loop, one sample at a time
        ce_d = torch.nn.functional.cross_entropy(out[0, 0], y[0], reduction="none")
        ce_b = torch.nn.functional.cross_entropy(out[0, 1], y[0], reduction="none")
        for key, ce in (("b", ce_b), ("d", ce_d)):
            for j, i in enumerate(idx):
                ema[key][i] = alpha * ema[key][i] + (1 - alpha * updated[i]) * ce[j]
        for i in idx:
            updated[i] = 1
        w = []
        for key in ("b", "d"):
            norm = torch.stack([ema[key][i] / ema[key][labels[0] == labels[0, i]].max() for i in idx])
            w.append(norm)
        weight = w[0] / (w[0] + w[1] + 1e-8)
        want = dn.gce_loss(out[0, 1], y[0], 0.7).mean() + (ce_d * weight).mean()
        torch.testing.assert_close(got[0], want.to(got.dtype))


# ---- the experiment

def test_stage2_changes_no_parameter_or_batchnorm_buffer_of_the_frozen_branches(tmp_path):
    run = RunFolder(tmp_path / "run", "denetdm", {"t": 1}).open()
    cfg = _cfg(arch="conv", ratios=(0.1,), seeds=1, baselines=(), batch_size=32, stage1_epochs=1, stage2_epochs=2)
    dn.run_denetdm(_few(_load(32), 96, 24), cfg, store=run.partial, progress=False)
    s1 = torch.load(run.partial.file("denetdm-3-5-stage1.done.pt"), weights_only=True)["stack"]
    s2 = torch.load(run.partial.file("denetdm-3-5-stage2.done.pt"), weights_only=True)["stack"]
    frozen = [n for kind in ("params", "buffers") for n in s1[kind] if n.split(".")[0] in ("deep", "shallow", "head")]
    assert any("running_mean" in n for n in frozen) and any(n.startswith("shallow") for n in frozen)
    for kind in ("params", "buffers"):
        for n, t in s1[kind].items():
            assert torch.equal(s2[kind][n], t), n
    # the target branch did train
    tgt = [n for n in s2["params"] if n.startswith("target.")]
    assert tgt and any(not torch.equal(s2["params"][n], s2["params"][n] * 0 + s2["params"][n].mean())
                       for n in tgt)
    run.close()


def _few(load, n_train, n_eval):
    """The members with only the first images of each split (conv models on a CPU)."""
    def few(ratio, seed):
        s = load(ratio, seed)
        return DatasetSplits(name=s.name, train=s.train.subset(range(n_train)), val=s.val.subset(range(n_eval)),
                             test=s.test.subset(range(n_eval)), num_classes=10, num_attributes=10,
                             image_shape=s.image_shape, bias_aligned_attribute=True)
    return few


def _with_other_test_split(load):
    """The same members, but every test image and label replaced by different data."""
    def other(ratio, seed):
        s = load(ratio, seed)
        g = torch.Generator().manual_seed(99)
        t = s.test
        x = torch.randint(0, 256, t.images.shape, generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, t.labels.shape, generator=g)
        a = torch.randint(0, 10, t.labels.shape, generator=g)
        test = ImageDataset(x, y, a, num_classes=10, num_attributes=10, name=t.name)
        return DatasetSplits(name=s.name, train=s.train, val=s.val, test=test, num_classes=10, num_attributes=10,
                             image_shape=s.image_shape, bias_aligned_attribute=True)
    return other


def test_selection_never_reads_the_test_split():
    cfg = _cfg(stage1_epochs=4, stage2_epochs=3, baseline_epochs=4)
    load = _load()
    a = dn.run_denetdm(load, cfg, progress=False)
    b = dn.run_denetdm(_with_other_test_split(load), cfg, progress=False)
    differs = False
    for name, m in a["methods"].items():
        for pa, pb in zip(m["per_member"], b["methods"][name]["per_member"]):
            assert pa["best_epoch"] == pb["best_epoch"], name
            assert pa["val"] == pb["val"], name
            differs |= pa["test"] != pb["test"]
    assert differs  # the replaced test split was really evaluated
    for name in a["phases"]:
        assert a["phases"][name]["history"] == b["phases"][name]["history"] or all(
            [e["val_unbiased"] for e in ha] == [e["val_unbiased"] for e in hb]
            for ha, hb in zip(a["phases"][name]["history"], b["phases"][name]["history"]))


def test_same_seed_same_result_and_another_seed_differs():
    cfg = _cfg(ratios=(0.1,), seeds=1)
    a = dn.run_denetdm(_load(), cfg, progress=False)
    b = dn.run_denetdm(_load(), cfg, progress=False)
    assert a["methods"] == b["methods"]
    c = dn.run_denetdm(_load(), _cfg(ratios=(0.1,), seeds=1, seed=5), progress=False)
    assert c["methods"] != a["methods"]


def test_stage2_with_the_frozen_features_computed_once_equals_computing_them_every_step(monkeypatch):
    cfg = _cfg(ratios=(0.1,), stage1_epochs=2, stage2_epochs=3, baselines=())
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cached = dn.run_denetdm(_load(), cfg, progress=False)
        monkeypatch.setattr(dn, "_frozen_features", None)  # step_inputs None: both branches run every step
        every_step = dn.run_denetdm(_load(), cfg, progress=False)
    finally:
        torch.set_default_dtype(old)
    name = "denetdm-3-5-stage2"
    a, b = cached["phases"][name]["history"][0], every_step["phases"][name]["history"][0]
    torch.testing.assert_close(torch.tensor([e["train_loss"] for e in a]), torch.tensor([e["train_loss"] for e in b]),
                               rtol=1e-12, atol=1e-12)
    assert cached["methods"]["denetdm"] == every_step["methods"]["denetdm"]


def test_stacked_members_equal_members_trained_one_at_a_time():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        # augmentation on: its draws are per member, so stacking must not change them either
        cfg = _cfg(stage1_epochs=2, stage2_epochs=2, baseline_epochs=2, augment="flip-crop")
        load = _load()
        a = dn.run_denetdm(load, cfg, progress=False)
        b = dn.run_denetdm(load, _cfg(stage1_epochs=2, stage2_epochs=2, baseline_epochs=2, augment="flip-crop",
                                      stacked=False), progress=False)
    finally:
        torch.set_default_dtype(old)
    for name, m in a["methods"].items():
        for pa, pb in zip(m["per_member"], b["methods"][name]["per_member"]):
            assert pa["best_epoch"] == pb["best_epoch"] and pa["val"] == pb["val"] and pa["test"] == pb["test"], name
    for name, rec in a["phases"].items():
        stacked = torch.tensor([e["train_loss"] for e in rec["history"][0]])           # (epochs, M)
        single = torch.tensor([[e["train_loss"][0] for e in h] for h in b["phases"][name]["history"]]).T
        torch.testing.assert_close(stacked, single, rtol=1e-9, atol=1e-11)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg = _cfg(ratios=(0.1,), stage1_epochs=3, stage2_epochs=3, baseline_epochs=3, checkpoint_seconds=0)
    load = _load()
    want = dn.run_denetdm(load, cfg, progress=False)

    class Stop(Exception):
        pass

    real, calls = dn._evaluate, []

    def flaky(*args, **kw):
        calls.append(1)
        # every epoch evaluates validation then test (the recorded test curve), and so does the end
        # of a phase: stage 1 makes 3 x 2 + 2 calls, stage 2's first epoch 2; the 11th is its second epoch's
        if len(calls) == 11:
            raise Stop
        return real(*args, **kw)

    run = RunFolder(tmp_path / "run", "denetdm", {"t": 1}).open()
    monkeypatch.setattr(dn, "_evaluate", flaky)
    with pytest.raises(Stop):
        dn.run_denetdm(load, cfg, store=run.partial, progress=False)
    monkeypatch.setattr(dn, "_evaluate", real)
    run.close("failed")
    assert run.partial.has("denetdm-3-5-stage1.done.pt") and run.partial.has("denetdm-3-5-stage2.pt")
    again = RunFolder(tmp_path / "run", "denetdm", {"t": 1}, resume=True).open()
    got = dn.run_denetdm(load, cfg, store=again.partial, progress=False)
    again.close()
    assert got["methods"] == want["methods"]


# ---- the command

def _cli(*args):
    return run_cli("denetdm", *args)


TINY = ("--conflict-ratio", "0.05,0.1", "--seeds", "1", "--stage1-epochs", "1", "--stage2-epochs", "1",
        "--baseline-epochs", "1", "--width", "16", "-D", "image_size=16", "--batch-size", "128", "--quiet")




def test_command_end_to_end_table_figures_and_resume(tmp_path):
    out = tmp_path / "run"
    r = _cli(*TINY, "--out", out)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "result.json").read_text())
    assert set(rec["methods"]) == {"denetdm", "denetdm stage-1 shallow", "denetdm stage-1 deep", "erm", "lff"}
    for m in rec["methods"].values():
        for ratio in ("0.05", "0.1"):
            for metric in ("unbiased", "conflicting", "aligned"):
                assert 0 <= m["by_ratio"][ratio][metric]["mean"] <= 1
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    assert "unbiased" in r.output and "lff" in r.output and "r=5%" in r.output
    again = _cli(*TINY, "--out", out, "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "result.json").read_text())["methods"] == rec["methods"]
    assert_refused(_cli(*TINY[:-1], "--temperature", "3", "--out", out, "--resume"), 1, "temperature: 2.0 -> 3.0")


def test_depth_ablation_reports_one_denetdm_per_pair(tmp_path):
    r = _cli(*TINY, "--depths", "3,5", "--depths", "2,4", "--baselines", "none", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    methods = json.loads((tmp_path / "o" / "result.json").read_text())["methods"]
    assert {"denetdm(3,5)", "denetdm(2,4)"} <= set(methods) and "erm" not in methods


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1", "0.1,abc"])
def test_ratio_outside_the_open_unit_interval(tmp_path, ratio):
    assert_refused(_cli("--conflict-ratio", ratio, "--out", tmp_path / "o"), 2, "--conflict-ratio")


@pytest.mark.parametrize("depths", ["5,3", "4,4", "0,3", "3", "a,b"])
def test_bad_depths(tmp_path, depths):
    assert_refused(_cli("--depths", depths, "--out", tmp_path / "o"), 2, "--depths")


def test_mlp_depth_below_two_is_refused(tmp_path):
    assert_refused(_cli("--depths", "1,3", "--out", tmp_path / "o"), 2, "--depths", ">= 2")


@pytest.mark.parametrize("data", ["digits", "synthetic-freq"])
def test_dataset_without_bias_attributes(tmp_path, data):
    assert_refused(_cli("--data", data, "--out", tmp_path / "o"), 2, "--data", "bias attribute")


def test_unknown_baseline_and_reserved_data_options(tmp_path):
    assert_refused(_cli("--baselines", "erm,jtt", "--out", tmp_path / "o"), 2, "--baselines", "jtt")
    assert_refused(_cli("-D", "conflict_ratio=0.2", "--out", tmp_path / "o"), 2, "--data-option", "--conflict-ratio")


def test_api_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="ratios"):
        dn.DeNetDMConfig(ratios=(0.0,))
    with pytest.raises(ValueError, match="ratios"):
        dn.DeNetDMConfig(ratios=(1.0,))
    with pytest.raises(ValueError, match="depths"):
        dn.DeNetDMConfig(depths=((5, 3),))
    with pytest.raises(ValueError, match="data: digits"):
        dn.run_denetdm(lambda r, s: load_dataset("digits"), _cfg(), progress=False)


def test_corrupted_digits_runs_with_the_mlp_branches_and_conv_refuses_depths(tmp_path):
    r = _cli(*TINY, "--data", "corrupted-digits", "--arch", "mlp", "--baselines", "erm", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o" / "result.json").read_text())
    assert rec["dataset"]["name"] == "corrupted-digits" and rec["dataset"]["image_shape"] == [3, 16, 16]
    assert_refused(_cli("--data", "corrupted-digits", "--depths", "4,8", "--out", tmp_path / "p"), 2, "--depths")


# ---- epoch rules and the baselines' published protocol

def test_test_curves_give_last_and_best_on_test_without_moving_selection():
    load = _load()
    res = dn.run_denetdm(load, _cfg(ratios=(0.05,), stage1_epochs=3, stage2_epochs=2, baseline_epochs=3,
                                    baselines=("erm",)), progress=False)
    quiet = dn.run_denetdm(load, _cfg(ratios=(0.05,), stage1_epochs=3, stage2_epochs=2, baseline_epochs=3,
                                      baselines=("erm",), test_curves=False), progress=False)
    for name, m in res["methods"].items():
        # the curves are only recorded: the selected epochs and numbers are those of a run without them
        assert m["by_ratio"] == quiet["methods"][name]["by_ratio"]
        assert quiet["methods"][name]["by_protocol"] is None
        rec = res["phases"][m["phase"]]
        j = rec["heads"].index(m["head"])
        curves = [[e["test_unbiased"][i][j] for e in rec["history"][0]] for i in range(2)]
        p = m["by_protocol"]["0.05"]
        assert p["last"]["values"] == [c[-1] for c in curves]
        assert p["test-best"]["values"] == [max(c) for c in curves]
        assert all(b >= v for b, v in zip(p["test-best"]["values"], p["val"]["values"]))
        assert len(curves[0]) == rec["epochs"]


def test_lff_protocol_baselines_use_their_own_batch_depth_and_input_scale():
    cfg = _cfg(ratios=(0.05,), seeds=1, baselines=("erm", "lff"), denetdm=False, **dn.LFF_PROTOCOL)
    assert cfg.baseline_batch_size == 256 and cfg.baseline_depth == 4 and cfg.batch_size == 128
    res = dn.run_denetdm(_load(), cfg, progress=False)
    assert set(res["methods"]) == {"erm", "lff"}  # no DeNetDM trained
    n_train = res["dataset"]["sizes"]["train"]
    # steps per epoch follow the baselines' batch: the loss is averaged over n_train // 256 steps
    assert n_train // 256 >= 1
    torch.manual_seed(0)
    clf = dn._Classifier(_branch(4), 10, input_scale=1 / 255)
    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(clf(x), clf.head(clf.branch(x / 255)))
    depths = [m for m in dn._Factory(cfg, 3, 8, 10).baseline().body.modules() if isinstance(m, torch.nn.Linear)]
    assert len(depths) == 3  # 4 layers with the head: 3 hidden Linear layers in the body


def test_baseline_protocol_bad_input():
    with pytest.raises(ValueError, match="baseline_depth"):
        _cfg(baseline_depth=1)
    with pytest.raises(ValueError, match="at least one baseline"):
        _cfg(denetdm=False, baselines=())
    with pytest.raises(ValueError, match="baseline_input_scale"):
        _cfg(baseline_input_scale=0.0)


def test_cli_baseline_protocol_and_baselines_only(tmp_path):
    r = _cli(*TINY, "--baselines-only", "--baseline-protocol", "lff", "--baseline-epochs", "1",
             "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o" / "result.json").read_text())
    assert set(rec["methods"]) == {"erm", "lff"}
    cfg = rec["config"]
    assert (cfg["baseline_batch_size"], cfg["baseline_depth"], cfg["denetdm"]) == (256, 4, False)
    assert cfg["baseline_input_scale"] == pytest.approx(1 / 255)
    assert_refused(_cli("--data", "corrupted-digits", "--baseline-protocol", "lff", "--out", tmp_path / "p"), 2,
             "--baseline-protocol")
    assert_refused(_cli("--baselines-only", "--baselines", "none", "--out", tmp_path / "q"), 2, "--baselines")
