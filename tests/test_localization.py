"""Layer-wise shortcut localization (experiments/localization.py, `shortcut-fast localize`):
the metrics on hand-made numbers, units and variants, the command end to end, resume, bad input."""
import json
import math
import pytest
import torch
from torch import nn

from shortcut_fast.experiments import localization as loc
from cli_runner import assert_refused, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- metrics on hand-made numbers

# Two units a, b. The accuracies are chosen so that every metric is a round number.
ACC = {
    "clean": {"clean": 0.90, "conflicting": 0.80},
    "skew": {"clean": 0.85, "conflicting": 0.30},
    "skew@a": {"clean": 0.88, "conflicting": 0.50},
    "skew@b": {"clean": 0.90, "conflicting": 0.70},
    "clean@a": {"clean": 0.89, "conflicting": 0.60},
    "clean@b": {"clean": 0.85, "conflicting": 0.35},
}


def test_drop_and_recovery_with_shares_of_the_total_drop():
    # drop(u) = acc(clean) - acc(skew@u); recovery(u) = acc(clean@u) - acc(skew); shares divide by
    # the total drop acc(clean) - acc(skew): 0.5 on the conflicting test, 0.05 on the clean test.
    m = loc.localization_scores(ACC, ["a", "b"])
    approx = lambda v: pytest.approx(v, abs=1e-12)  # noqa: E731
    assert m["total_drop_conflicting"]["all"] == approx(0.5)
    assert m["drop_conflicting"] == {"a": approx(0.3), "b": approx(0.1)}
    assert m["drop_share_conflicting"] == {"a": approx(0.6), "b": approx(0.2)}
    assert m["recovery_conflicting"] == {"a": approx(0.3), "b": approx(0.05)}
    assert m["recovery_share_conflicting"] == {"a": approx(0.6), "b": approx(0.1)}
    assert m["drop_clean"] == {"a": approx(0.02), "b": approx(0.0)}
    assert m["drop_share_clean"] == {"a": approx(0.4), "b": approx(0.0)}
    assert m["recovery_share_clean"] == {"a": approx(0.8), "b": approx(0.0)}


def test_share_is_nan_without_a_total_drop():
    acc = {k: dict(v) for k, v in ACC.items()}
    acc["skew"]["conflicting"] = acc["clean"]["conflicting"]
    m = loc.localization_scores(acc, ["a", "b"])
    assert all(math.isnan(v) for v in m["drop_share_conflicting"].values())


def test_intervention_gains_and_their_rank_correlation_with_the_scores():
    acc = {"skew": {"conflicting": 0.3},
           "skew lr*0.1@a": {"conflicting": 0.4}, "skew lr*0.1@b": {"conflicting": 0.35},
           "skew lr*0.1@c": {"conflicting": 0.3},
           "skew lr*0@a": {"conflicting": 0.2}, "skew lr*0@b": {"conflicting": 0.5},
           "skew lr*0@c": {"conflicting": 0.6}}
    m = loc.intervention_gains(acc, ["a", "b", "c"])
    assert m["gain_lr0.1"] == pytest.approx({"a": 0.1, "b": 0.05, "c": 0.0})
    assert m["gain_frozen"] == pytest.approx({"a": -0.1, "b": 0.2, "c": 0.3})
    # The drop ranks a > b > c: the same order as the lr0.1 gain (+1), the reverse of the frozen one (-1).
    m["drop_conflicting"] = {"a": 0.3, "b": 0.2, "c": 0.1}
    corr = loc.score_gain_correlations(m, ["a", "b", "c"])
    assert corr["drop_conflicting vs gain_lr0.1"] == pytest.approx(1.0)
    assert corr["drop_conflicting vs gain_frozen"] == pytest.approx(-1.0)
    assert "core_forgetting vs gain_frozen" not in corr  # scores that are absent are skipped


def test_categorical_v_information_of_a_hand_made_case():
    # Three balanced categories; the one feature is "category 0 or not". The one-hot column of
    # category 0 is decoded exactly (R^2 = 1). Category 1's column among the other two thirds is
    # a coin flip: best prediction 1/2, SSE = (2n)(1/4) = n/2 against SST = 3n (1/3)(2/3) = 2n/3,
    # so R^2 = 1/4, and the same for category 2. Mean over the columns: (1 + 1/4 + 1/4) / 3 = 1/2.
    c = torch.arange(3).repeat(20)
    x = (c == 0).double()[:, None]
    assert loc.categorical_v_information(x, c, x, c) == pytest.approx(0.5, abs=1e-4)
    # Features identical to the one-hot code: every column decoded (1); constant features: 0.
    assert loc.categorical_v_information(loc.one_hot(c), c, loc.one_hot(c), c) == pytest.approx(1.0, abs=1e-4)
    ones = torch.ones(60, 2, dtype=torch.float64)
    assert loc.categorical_v_information(ones, c, ones, c) == pytest.approx(0.0, abs=1e-12)
    assert loc.categorical_v_information(x, torch.zeros(60, dtype=torch.long), x,
                                         torch.zeros(60, dtype=torch.long)) == 0.0


# ---- units and variants

def test_units_by_stage_and_by_block():
    from shortcut_fast.models import build_model

    net = build_model("resnet20", num_classes=10, in_channels=3, image_size=32, width=4)
    stages = loc.model_units(net, "stage")
    assert list(stages) == ["stem", "layer1", "layer2", "layer3"]
    assert stages["layer2"] == ["layer2.0", "layer2.1", "layer2.2"]
    assert list(loc.model_units(net, "block")) == ["stem", *[f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]]
    vit = build_model("vit-tiny", num_classes=10, in_channels=3, image_size=32, dim=32, depth=6, heads=2)
    assert loc.model_units(vit, "stage") == {"blocks.0-1": ["blocks.0", "blocks.1"],
                                             "blocks.2-3": ["blocks.2", "blocks.3"],
                                             "blocks.4-5": ["blocks.4", "blocks.5"]}
    # Up to 4 blocks under one prefix are stages already (timm ConvNeXt: net.stages.0 ... net.stages.3).
    four = nn.Sequential()
    four.stages = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    four.block_names = [f"stages.{i}" for i in range(4)]
    assert list(loc.model_units(four, "stage")) == four.block_names


def test_a_model_without_blocks_is_refused_naming_the_choices():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

    with pytest.raises(ValueError, match=r"model: .*cannot be listed.*resnet20"):
        loc.model_units(Bare())


def test_unknown_unit_names_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"blocks: unknown stage name\(s\) 'layer9'.*stem, layer1, head"):
        loc.check_units(["layer9"], ["stem", "layer1", "head"], "stage")
    assert loc.check_units(["head", "stem"], ["stem", "layer1", "head"], "stage") == ["stem", "head"]


def test_config_refuses_rho_outside_the_unit_interval():
    for rho in (0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"rho must be a number in \(0, 1\]"):
            loc.LocalizationConfig(rho=rho)
    loc.LocalizationConfig(rho=1)


# ---- variants and their evaluation (through shortcut_fast.ensemble)

def test_variant_masks():
    v = loc.make_variants(["stem", "layer1", "head"], ["stem", "head"], interventions=True)
    assert v.names == ["clean", "skew", "skew@stem", "clean@stem", "skew@head", "clean@head",
                       "skew lr*0.1@stem", "skew lr*0.1@head", "skew lr*0@stem", "skew lr*0@head"]
    rows = {n: (v.skewed[i].tolist(), v.lr_scale[i].tolist()) for i, n in enumerate(v.names)}
    assert rows["clean"] == ([False] * 3, [1.0] * 3)
    assert rows["skew@head"] == ([False, False, True], [1.0] * 3)
    assert rows["clean@stem"] == ([False, True, True], [1.0] * 3)
    assert rows["skew lr*0.1@head"] == ([True] * 3, [1.0, 1.0, pytest.approx(0.1)])
    assert rows["skew lr*0@stem"] == ([True] * 3, [0.0, 1.0, 1.0])
    assert loc.make_variants(["stem", "head"], ["head"], interventions=False).names == \
        ["clean", "skew", "skew@head", "clean@head"]


def test_variant_accuracies_equal_evaluate_of_each_variant():
    from shortcut_fast.data import load_dataset
    from shortcut_fast.models import build_model
    from shortcut_fast.train import evaluate

    splits = load_dataset("digits")
    net = build_model("small-cnn", num_classes=10, in_channels=3, image_size=32, width=4)
    states = []
    for k in range(3):  # three different "variants": perturbed weights, BN statistics included
        torch.manual_seed(k)
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(0.3 * torch.randn_like(t)).abs_() if t.dim() == 1 else t.add_(0.3 * torch.randn_like(t))
        states.append({n: t.clone() for n, t in net.state_dict().items()})
    acc = loc.variant_accuracies(net, states, ["a", "b", "c"], {"test": splits.test}, "cpu", batch_size=200)
    for name, state in zip("abc", states):
        net.load_state_dict(state)
        assert acc[name]["test"] == evaluate(net, splits.test, device="cpu", amp=False).accuracy


def test_unit_parameter_groups_cover_every_parameter_once():
    from shortcut_fast.models import build_model

    net = build_model("resnet20", num_classes=10, in_channels=3, image_size=32, width=4)
    units = loc.model_units(net, "stage")
    groups = loc.unit_parameter_groups(net, units)
    assert len(groups) == len(units) + 1
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(n for n, _ in net.named_parameters())
    assert all(n.startswith("layer2.") for n in groups[2]) and all(n.startswith("head.") for n in groups[-1])


# ---- the command end to end

TINY = ["localize", "--model", "small-cnn", "-M", "width=4", "-M", "padding=2", "--epochs", "1", "--seeds", "2",
        "--batch-size", "256", "--probe-images", "64"]






def test_localize_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    r = run_cli(*TINY, "--interventions", "--blocks", "conv1,head", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "result.json").read_text())
    res = rec["result"]
    assert res["units"] == ["conv1", "conv2", "conv3", "head"] and res["localized"] == ["conv1", "head"]
    assert res["seeds"] == [0, 1] and len(res["variants"]) == 2 + 2 * 2 + 2 * 2
    for v in res["variants"]:
        for t in ("clean", "aligned", "conflicting"):
            stat = res["accuracy"][v][t]
            assert 0 <= stat["mean"] <= 1 and len(stat["values"]) == 2
    pu = res["per_unit"]
    assert set(pu["drop_conflicting"]) == {"conv1", "head"}
    assert set(pu["spurious_encoding"]) == {"conv1", "conv2", "conv3", "head"}
    seed0 = res["per_seed"][0]["accuracy"]
    assert pu["drop_conflicting"]["head"]["values"][0] == pytest.approx(
        seed0["clean"]["conflicting"] - seed0["skew@head"]["conflicting"])
    assert "drop_conflicting vs gain_frozen" in res["correlations"]
    for png in ("contributions.png", "representation.png", "interventions.png"):
        assert (out / png).stat().st_size > 0
    assert "spurious enc" in r.output and "conv1" in r.output
    assert (out / "partial" / "seed_1.json").exists()

    # Resume with the same settings: every seed is read back, not retrained (same numbers).
    r = run_cli(*TINY, "--interventions", "--blocks", "conv1,head", "--out", out, "--quiet", "--resume")
    assert r.exit_code == 0, r.output
    again = json.loads((out / "result.json").read_text())["result"]
    assert again["per_seed"] == res["per_seed"]

    # A changed setting is refused, naming it.
    r = run_cli(*TINY, "--interventions", "--blocks", "conv1,head", "--rho", "0.8", "--out", out, "--quiet", "--resume")
    assert_refused(r, 1, "rho: 0.9 -> 0.8")


# ---- bad input (usage errors: status 2, one line naming the option and the valid choices)

@pytest.mark.parametrize("rho", ["0", "1.5", "-0.2"])
def test_rho_outside_the_unit_interval(tmp_path, rho):
    assert_refused(run_cli(*TINY, "--rho", rho, "--out", tmp_path / "o"), 2, "--rho", "0<x<=1")


def test_unknown_block_name(tmp_path):
    assert_refused(run_cli(*TINY, "--blocks", "conv1,layer9", "--out", tmp_path / "o"), 2, "--blocks", "'layer9'",
             "conv1, conv2, conv3, head")
    assert_refused(run_cli(*TINY, "--granularity", "block", "--blocks", "stem", "--out", tmp_path / "o"), 2, "--blocks",
             "conv1")


def test_dataset_without_attributes_and_no_shortcut(tmp_path):
    assert_refused(run_cli(*TINY, "--shortcut", "none", "--out", tmp_path / "o"), 2, "--shortcut", "patch, tint or freq")
    assert_refused(run_cli(*TINY, "-D", "shortcut=tint", "--out", tmp_path / "o"), 2, "--data-option", "--shortcut")


def test_dataset_with_its_own_attribute(tmp_path):
    # colored-digits: every (digit, color) group needs training images for a group-balanced clean set;
    # at conflict_ratio 0.05 some are empty, which is refused naming the group.
    assert_refused(run_cli(*TINY, "--data", "colored-digits", "--shortcut", "none", "--out", tmp_path / "o"), 1,
             "no image of group", "shortcut=patch|tint|freq")
    out = tmp_path / "own"
    r = run_cli(*TINY, "--seeds", "1", "--data", "colored-digits", "--conflict-ratio", "0.9", "--shortcut", "none",
             "--blocks", "head", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "result.json").read_text())["result"]
    assert "group-balanced subsample" in res["data"] and res["variants"] == ["clean", "skew", "skew@head", "clean@head"]


def test_group_balanced_clean_set_and_label_matched_batches():
    from shortcut_fast.data import ImageDataset

    # 2 labels x 2 attributes with group counts 5, 1, 2, 3: the balanced subsample keeps 1 per group.
    labels = torch.tensor([0] * 6 + [1] * 5)
    attrs = torch.tensor([0] * 5 + [1] + [0] * 2 + [1] * 3)
    ds = ImageDataset(torch.arange(11.0).view(11, 1, 1, 1).expand(11, 3, 2, 2).contiguous(), labels, attrs,
                      num_classes=2, num_attributes=2)
    keep = loc._group_balanced(ds, 2, 2, seed=0, what="train")
    assert sorted((int(labels[i]), int(attrs[i])) for i in keep) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert 5 in keep.tolist()  # the only (0, 1) image
    data = loc.LocalizationData(skew_train=ds, clean_train=ds.subset(keep),
                                clean_pools=[torch.tensor([0, 1]), torch.tensor([2, 3])], tests={},
                                attribute_probe=None, label_probe=None, description="")
    cfg = loc.LocalizationConfig(shortcut="none", batch_size=4)
    epoch = loc._batches(data, cfg, 0, "cpu")(0)
    first = list(epoch)
    assert len(epoch) == len(first) == 3 and sum(len(y) for _, _, y in first) == 11
    clean_labels = ds.subset(keep).labels
    for xc, xs, y in first:  # every clean partner has the label of its skewed image
        partner = xc[:, 0, 0, 0].long()
        assert torch.equal(labels[partner], y)
        assert set(partner.tolist()) <= set(keep.tolist())
    again = list(loc._batches(data, cfg, 0, "cpu")(0))  # the same batches for the same epoch
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert torch.equal(clean_labels, labels[keep])


def test_model_whose_blocks_cannot_be_listed(tmp_path, monkeypatch):
    import shortcut_fast.models

    monkeypatch.setattr(shortcut_fast.models, "model_blocks", lambda model: [])
    assert_refused(run_cli(*TINY, "--out", tmp_path / "o"), 2, "--model", "cannot be listed", "resnet20")
