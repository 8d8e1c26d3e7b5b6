"""memorization / mitigate: NT-Xent, the global magnitude mask, the mitigation step, groups,
an end-to-end run through the CLI (result.json keys, figures), and resume through a run folder."""
from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from shortcut_fast.data import load_dataset
from shortcut_fast.experiments import memorization as mem
from shortcut_fast.models import build_model
from shortcut_fast.report import to_jsonable
from shortcut_fast.run_folder import RunFolder, Store, load_state_file
from cli_runner import run_cli


@pytest.fixture(scope="module")
def tiny_splits():
    splits = load_dataset("colored-digits", image_size=16, conflict_ratio=0.1)
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", 240), ("val", 60), ("test", 60)):
        ds = getattr(splits, name)
        setattr(splits, name, ds.subset(torch.randperm(len(ds), generator=g)[:n]))
    splits.extra = {}
    return splits


# ---------------------------------------------------------------------------------------
# NT-Xent


def _nt_xent_loop(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Direct per-anchor computation: -log(exp(s(a_i,b_i)/t) / sum over all 2N-1 others)."""
    n = a.shape[0]
    z = torch.cat([a, b])
    total = 0.0
    for i in range(n):
        def sim(u, v):
            return float(torch.dot(u, v) / (u.norm() * v.norm())) / tau
        den = sum(math.exp(sim(a[i], z[j])) for j in range(2 * n) if j != i)
        total += -(sim(a[i], b[i]) - math.log(den))
    return torch.tensor(total / n)


def test_nt_xent_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    for tau in (0.5, 0.1):
        assert torch.allclose(mem.nt_xent(a, b, tau).double(), _nt_xent_loop(a, b, tau).double(), atol=1e-5)
    # Identical views with tiny tau: the positive dominates, the loss goes to 0.
    assert float(mem.nt_xent(a, a, 0.01)) < 1e-3
    # (N, C, H, W) rows are flattened.
    x, y = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    assert torch.allclose(mem.nt_xent(x, y), mem.nt_xent(x.flatten(1), y.flatten(1)))
    with pytest.raises(ValueError, match="same shape"):
        mem.nt_xent(a, b[:4])


def test_symmetric_nt_xent_is_symmetric_and_stops_gradients():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(6, 4, generator=g, requires_grad=True)
    d = torch.randn(6, 4, generator=g, requires_grad=True)
    loss = mem.symmetric_nt_xent(p, d, 0.5)
    assert torch.allclose(loss, mem.symmetric_nt_xent(d, p, 0.5))
    expected = 0.5 * (_nt_xent_loop(p.detach(), d.detach(), 0.5) + _nt_xent_loop(d.detach(), p.detach(), 0.5))
    assert abs(float(loss.detach()) - float(expected)) < 1e-5
    gp, gd = torch.autograd.grad(loss, (p, d))
    # With stop-gradients, p only receives the gradient of the term where p is the anchor view.
    p2 = p.detach().clone().requires_grad_(True)
    (ref_p,) = torch.autograd.grad(0.5 * mem.nt_xent(p2, d.detach(), 0.5), p2)
    d2 = d.detach().clone().requires_grad_(True)
    (ref_d,) = torch.autograd.grad(0.5 * mem.nt_xent(d2, p.detach(), 0.5), d2)
    assert torch.allclose(gp, ref_p, atol=1e-6) and torch.allclose(gd, ref_d, atol=1e-6)
    # ... which is not the full gradient of the loss without stop-gradients.
    p3 = p.detach().clone().requires_grad_(True)
    (full_p,) = torch.autograd.grad(0.5 * (mem.nt_xent(p3, d.detach()) + mem.nt_xent(d.detach(), p3)), p3)
    assert not torch.allclose(gp, full_p, atol=1e-4)


def test_published_nt_xent_on_a_hand_computed_batch():
    """The published mitigation term (utils.nt_xent, called twice in
    SpuriousCorrelationFinetuningPruning.py): the SimCLR loss over all 2N rows of the two
    views, each row's positive its counterpart, its negatives the 2N - 2 other rows, mean
    over the 2N anchors; once with the dense view detached and once with the pruned one,
    summed. Dense rows d1 = (1, 0), d2 = (0, 1); pruned rows p1 = (1, 1), p2 = (0, 2); tau 0.5,
    so a similarity is 2 * cosine: cos(d1, p1) = cos(d2, p1) = cos(p1, p2) = 1/sqrt 2,
    cos(d2, p2) = 1, cos(d1, d2) = cos(d1, p2) = 0."""
    r2 = math.sqrt(2)
    anchors = [math.log(1 + math.exp(r2) + 1) - r2,              # d1: positive p1 (sqrt 2); d2 0, p1, p2 0
               math.log(1 + math.exp(r2) + math.exp(2)) - 2,      # d2: positive p2 (2); d1 0, p1 sqrt 2, p2
               math.log(3 * math.exp(r2)) - r2,                   # p1: positive d1; d1, d2, p2 all sqrt 2
               math.log(1 + math.exp(2) + math.exp(r2)) - 2]      # p2: positive d2 (2); d1 0, d2, p1 sqrt 2
    one_term = sum(anchors) / 4
    dense = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    pruned = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    assert float(mem.nt_xent_2n(dense, pruned, 0.5).detach()) == pytest.approx(one_term, rel=1e-6)
    published = mem.published_nt_xent(pruned, dense, 0.5)
    assert float(published.detach()) == pytest.approx(2 * one_term, rel=1e-6)
    # Ours ("half-mean") is half of it: against it CE (x 0.2) weighs twice as much.
    assert float(mem.symmetric_nt_xent(pruned, dense, 0.5).detach()) == pytest.approx(one_term, rel=1e-6)
    # Gradients: the pruned view gets the whole 2N-anchor loss's gradient with dense held fixed, and
    # the dense view the converse.
    gp, gd = torch.autograd.grad(published, [pruned, dense])
    p2, d2 = pruned.detach().clone().requires_grad_(), dense.detach().clone().requires_grad_()
    (want_p,) = torch.autograd.grad(mem.nt_xent_2n(dense.detach(), p2, 0.5), p2)
    (want_d,) = torch.autograd.grad(mem.nt_xent_2n(d2, pruned.detach(), 0.5), d2)
    torch.testing.assert_close(gp, want_p)
    torch.testing.assert_close(gd, want_d)


def test_double_softmax_and_published_objective_defaults():
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2).eval()
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, 3, (6,))
    for double in (False, True):
        objective = mem.MitigationObjective(0.05, 0.5, 0.2, double_softmax=double)
        assert objective.contrastive_form == "sum-2n" and objective.prune_layers == "conv"
        loss = objective(model, x, y, y)
        dense, pruned = model(x), objective.pruned_forward(model, x)
        if double:  # the published head's Softmax: both losses see probabilities
            dense, pruned = dense.softmax(-1), pruned.softmax(-1)
        want = mem.published_nt_xent(pruned, dense, 0.5) + 0.2 * F.cross_entropy(dense, y)
        assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
        assert set(objective.masks) == {"conv1.conv.weight", "conv2.conv.weight", "conv3.conv.weight"}
    cfg = mem.MitigationConfig()
    assert (cfg.epochs, cfg.schedule, cfg.augment, cfg.contrastive_form, cfg.prune_layers, cfg.double_softmax) == \
        (21, "plateau", "resized-crop-flip", "sum-2n", "conv", False)
    with pytest.raises(ValueError, match="contrastive_form must be one of"):
        mem.MitigationConfig(contrastive_form="half")
    with pytest.raises(ValueError, match="augment must be one of"):
        mem.MitigationConfig(augment="jitter")
    with pytest.raises(ValueError, match="prune_layers must be one of"):
        mem.MitigationObjective(prune_layers="linear")


def test_plateau_schedule_halves_lr_after_two_flat_epochs(tiny_splits):
    """ReduceLROnPlateau(mode min, factor 0.5, patience 1, relative threshold 1e-4) on the epoch's
    training loss: an epoch improves when loss < best * (1 - 1e-4); after two epochs in a row
    without improvement the lr halves. Replayed here by hand on the recorded losses."""
    from shortcut_fast.train import TrainConfig, train

    torch.manual_seed(0)
    net = build_model("small-cnn", num_classes=10, image_size=16, width=4, padding=2)
    # lr so small the weights barely move: the loss wanders with the batch, so plateaus happen (and
    # large enough that a halving exceeds the scheduler's eps 1e-8, below which it skips a change)
    cfg = TrainConfig(epochs=16, batch_size=20, optimizer="adam", lr=1e-5, weight_decay=0.0, schedule="plateau",
                      max_steps_per_epoch=1, device="cpu", select="last")
    history = train(net, tiny_splits, cfg, progress=False).history
    lr, best, bad, halvings = 1e-5, math.inf, 0, 0
    for h in history:
        assert h["lr"] == pytest.approx(lr, rel=1e-12)  # the lr this epoch trained with
        if h["train_loss"] < best * (1 - 1e-4):
            best, bad = h["train_loss"], 0
        else:
            bad += 1
        if bad > 1:
            lr, bad, halvings = lr * 0.5, 0, halvings + 1
    assert halvings >= 1
    with pytest.raises(ValueError, match="warmup_epochs must be 0 with schedule 'plateau'"):
        TrainConfig(schedule="plateau", warmup_epochs=1.0)


def test_resized_crop_flip_augmentation():
    """RandomResizedCrop(scale 0.7-1, ratio 3/4-4/3) + flip: on ramp images (channel 0 = column,
    channel 1 = row) the output is again a ramp whose slope is the crop's size over the image's
    (negative in x when flipped), so the crop's area fraction can be read back."""
    from shortcut_fast.train import augment_batch

    n, h, w = 200, 24, 24
    cols = torch.arange(w, dtype=torch.float32).expand(h, w)
    x = torch.stack([cols, cols.T.contiguous(), torch.zeros(h, w)])[None].repeat(n, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(x, "resized-crop-flip", gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    sx = out[:, 0, h // 2, w // 2 + 1] - out[:, 0, h // 2, w // 2]
    sy = out[:, 1, h // 2 + 1, w // 2] - out[:, 1, h // 2, w // 2]
    area = sx.abs() * sy
    assert bool((area > 0.7 - 0.08).all()) and bool((area <= 1 + 1e-5).all())
    assert 60 < int((sx < 0).sum()) < 140  # about half flipped
    assert bool((sy > 0).all())  # never flipped vertically
    again = augment_batch(x, "resized-crop-flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


# ---------------------------------------------------------------------------------------
# Global magnitude mask


def test_global_mask_prunes_floor_fraction_smallest():
    g = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(7, 3, 5, 5, generator=g), "b": torch.randn(13, 11, generator=g) * 0.1,
               "c": torch.randn(9, generator=g) * 3}
    total = sum(w.numel() for w in weights.values())  # 525 + 143 + 9 = 677
    for fraction in (0.01, 0.1, 0.37):
        masks = mem.global_magnitude_mask(weights, fraction)
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert pruned == math.floor(fraction * total)
        kept_min = min(float(w.abs()[m].min()) for w, m in zip(weights.values(), masks.values()) if m.any())
        pruned_max = max(float(w.abs()[~m].max()) for w, m in zip(weights.values(), masks.values()) if (~m).any())
        assert pruned_max <= kept_min
        assert all(m.shape == w.shape and m.dtype == torch.bool for w, m in zip(weights.values(), masks.values()))
    # Global, not per tensor: at 10% the small-scaled "b" loses far more than 10% of its weights.
    masks = mem.global_magnitude_mask(weights, 0.1)
    assert int((~masks["b"]).sum()) > 0.25 * weights["b"].numel()
    assert int((~masks["c"]).sum()) == 0
    # Ties are broken by position: exactly k pruned even when all magnitudes are equal.
    masks = mem.global_magnitude_mask({"w": torch.ones(10, 10)}, 0.05)
    assert int((~masks["w"]).sum()) == 5 and not masks["w"].flatten()[:5].any()
    assert int((~mem.global_magnitude_mask(weights, 0.0)["a"]).sum()) == 0
    with pytest.raises(ValueError, match="fraction"):
        mem.global_magnitude_mask(weights, 1.0)


def test_prunable_weights_are_conv_and_linear_only():
    model = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2)
    names = set(mem.prunable_weights(model))
    assert names == {"conv1.conv.weight", "conv2.conv.weight", "conv3.conv.weight", "head.weight"}
    assert set(mem.prunable_weights(model, "conv")) == names - {"head.weight"}  # the published choice
    mlp = build_model("mlp", num_classes=3, image_size=16, width=8)  # no conv: "conv" falls back to linears
    assert set(mem.prunable_weights(mlp, "conv")) == set(mem.prunable_weights(mlp, "conv-linear")) != set()


# ---------------------------------------------------------------------------------------
# Mitigation step


def test_mitigation_step_changes_weights_keeps_dense_weights_and_stats():
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2)
    model.train()
    x, y = torch.rand(12, 3, 16, 16), torch.randint(0, 3, (12,))
    objective = mem.MitigationObjective(prune_fraction=0.05, tau=0.5, ce_weight=0.2, contrastive_form="half-mean",
                                        prune_layers="conv-linear")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # The pruned forward is the model with masked weights, computed without touching the dense ones.
    objective.update_mask(model)
    masked = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2)
    masked.load_state_dict(before)
    with torch.no_grad():
        for name, keep in objective.masks.items():
            masked.get_parameter(name).mul_(keep)
    masked.eval(), model.eval()
    assert torch.allclose(objective.pruned_forward(model, x), masked(x), atol=1e-5)
    model.train()

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = objective(model, x, y, torch.zeros_like(y))
    ref = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2)
    ref.load_state_dict(before)
    dense_logits = ref.train()(x)  # one dense forward: also the reference for the BN statistics below
    expected = mem.symmetric_nt_xent(objective.pruned_forward(masked.train(), x), dense_logits) \
        + 0.2 * F.cross_entropy(dense_logits, y)
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-4
    opt.zero_grad()
    loss.backward()
    # Pruned weights still get gradient (through the dense forward), the masks are not applied in place.
    w = model.conv1.conv.weight
    keep = objective.masks["conv1.conv.weight"]
    assert (~keep).any() and w.grad[~keep].abs().sum() > 0
    opt.step()
    after = model.state_dict()
    assert all(not torch.equal(before[n], after[n]) for n in mem.prunable_weights(model))
    assert (after["conv1.conv.weight"][~keep] != 0).all()
    # BatchNorm running stats moved exactly as one dense forward moves them (the pruned pass used copies).
    assert torch.allclose(after["conv1.bn.running_mean"], ref.conv1.bn.running_mean, atol=1e-6)
    assert int(after["conv1.bn.num_batches_tracked"]) == 1
    record = objective.new_epoch()
    assert objective.masks is None and record["pruned_weights"] > 0 and record["ce_loss"] > 0
    # The control (contrastive_weight=0) is plain weighted CE on the dense output, with no pruned pass.
    control = mem.MitigationObjective(0.05, 0.5, 0.2, contrastive_weight=0.0)
    model.eval()
    assert torch.allclose(control(model, x, y, y).detach(), 0.2 * F.cross_entropy(model(x), y).detach())
    assert control.masks is None
    with pytest.raises(ValueError, match="not both 0"):
        mem.MitigationConfig(ce_weight=0.0, contrastive_weight=0.0)


# ---------------------------------------------------------------------------------------
# Groups


def test_groupings_and_minority(tiny_splits):
    splits = tiny_splits
    grouping = mem.Grouping.build(splits)
    assert grouping.kind == "alignment" and grouping.names == ["aligned", "conflicting"]
    g = grouping.of(splits.train)
    assert torch.equal(g, (splits.train.attributes != splits.train.labels).long())
    counts = torch.bincount(g, minlength=2).tolist()
    assert mem.minority_groups(counts) == [1]
    assert mem.Grouping.build(splits, "group").num_groups == 100
    # Waterbirds and CelebA train counts per group (the standard splits of Sagawa et al. 2020).
    assert mem.minority_groups([3498, 184, 56, 1057]) == [1, 2]
    assert mem.minority_groups([71629, 66874, 22880, 1387]) == [3]
    assert mem.minority_groups([10, 9, 0, 9]) == [1, 3]  # nothing below half the mean: the smallest
    with pytest.raises(ValueError, match="same size"):
        mem.minority_groups([5, 5])
    with pytest.raises(ValueError, match="no attributes"):
        mem.Grouping.build(SimpleNamespace(name="digits", num_attributes=0))


# ---------------------------------------------------------------------------------------
# End to end through the CLI


_DATA = ["--data", "colored-digits", "-D", "image_size=16", "-D", "conflict_ratio=0.1",
         "--model", "small-cnn", "-M", "width=4", "-M", "padding=2"]


def _invoke(args):
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_splits):
    """A small-cnn trained for a few steps on the tiny splits, saved like `shortcut-fast train` does."""
    from shortcut_fast.train import TrainConfig, train

    torch.manual_seed(0)
    net = build_model("small-cnn", num_classes=10, image_size=16, width=4, padding=2)
    out = tmp_path_factory.mktemp("erm")
    train(net, tiny_splits, TrainConfig(epochs=1, batch_size=60, device="cpu"), store=Store(out, False),
          progress=False)
    return out / "last.pt"


def test_memorization_cli_end_to_end(tmp_path, tiny_checkpoint):
    out = tmp_path / "mem"
    args = ["memorization", "--data", "colored-digits", "-D", "image_size=16", "-D", "conflict_ratio=0.1",
            "--checkpoint", str(tiny_checkpoint), "--max-samples", "200", "--top-k", "3", "--backend", "torch",
            "--out", str(out), "--quiet"]
    text = _invoke(args)
    assert "top channels" in text
    record = json.loads((out / "result.json").read_text())
    r = record["result"]
    assert {"config", "grouping", "baseline", "memorization_gap", "layers", "top_channels", "seconds"} <= set(r)
    # default: pre-BN (the conv outputs = the published zeroing of filter weights), stem conv included
    assert r["grouping"]["minority"] == ["conflicting"] and r["config"]["where"] == "pre-bn"
    assert r["config"]["layers"] == ["conv1.conv", "conv2.conv", "conv3.conv"]
    assert len(r["top_channels"]) == 3
    csv_lines = (out / "top_channels.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and "train conflicting" in csv_lines[0]
    for name in ("memorization_gap.png", "drop_scatter.png", "top_channels.png", "cumulative_topk.png"):
        assert (out / name).stat().st_size > 1000
    base = r["baseline"]
    gap = r["memorization_gap"]["conflicting"]
    assert gap == pytest.approx(base["train"]["group_accuracy"]["conflicting"]
                                - base["test"]["group_accuracy"]["conflicting"])
    layer = {s["layer"]: s for s in r["layers"]}
    assert [s["channels"] for s in r["layers"]] == [4, 8, 8]
    for s in r["layers"]:
        assert len(s["score"]) == s["channels"] and len(s["weight_norm"]) == s["channels"]
        assert s["score"] == pytest.approx([a - b for a, b in zip(s["minority_drop"], s["majority_drop"])])
        assert [c["k"] for c in s["cumulative"]] == [1, 2, 3]
        # k = 1 of the cumulative sweep is the single best channel of the sweep.
        best = max(range(s["channels"]), key=lambda c: (s["score"][c], -c))
        assert s["cumulative"][0]["channels"] == [best]
        assert s["cumulative"][0]["train_accuracy"] == pytest.approx(s["train_accuracy"][best])
    # The published criteria: weight norms ranked over every conv but downsample, and per group
    # the global top by gradient norm (every conv) on that group's lowest-p(true class) samples.
    from shortcut_fast.models import model_from_checkpoint

    net = model_from_checkpoint(tiny_checkpoint).eval()
    norms = {n: net.get_submodule(n).weight.detach().flatten(1).norm(dim=1) for n in ("conv1.conv", "conv2.conv",
                                                                                       "conv3.conv")}
    flat = torch.cat(list(norms.values()))
    best_layer = max(norms, key=lambda n: float(norms[n].max()))
    assert r["weight_norm_top"][0]["layer"] == best_layer
    assert r["weight_norm_top"][0]["score"] == pytest.approx(float(flat.max()))
    for s in r["layers"]:
        for c in range(s["channels"]):
            assert s["weight_norm_global_rank"][c] == int((flat > norms[s["layer"]][c] * (1 + 1e-6)).sum()) + 1
    assert set(r["gradient_norm_top"]) == {"aligned", "conflicting"}
    assert all(len(v) == 3 for v in r["gradient_norm_top"].values())
    assert "w-norm rank (all convs)" in text
    top = r["top_channels"][0]
    assert top["score"] == max(max(s["score"]) for s in r["layers"])
    assert top["score"] == pytest.approx(layer[top["layer"]]["score"][top["channel"]])

    # The top channel's reported train accuracies agree with zeroing its filter weights (published).
    splits = load_dataset("colored-digits", image_size=16, conflict_ratio=0.1)
    grouping = mem.Grouping.build(splits)
    x, y, g = mem._take(splits.train, grouping, 200, 0, 1)

    with torch.no_grad():
        net.get_submodule(top["layer"]).weight[top["channel"]] = 0
    correct, counts = mem.group_outcomes_of(net, x, y, g, 2)
    assert top["train_accuracy"]["conflicting"] == pytest.approx(float(correct[1] / counts[1]))
    assert top["train_accuracy"]["aligned"] == pytest.approx(float(correct[0] / counts[0]))


def _jsonable(result) -> dict:
    out = json.loads(json.dumps(to_jsonable(result)))
    for s in out["layers"]:
        s.pop("seconds")
    out.pop("seconds")
    return out


def test_memorization_resume_through_store(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits):
    from shortcut_fast.models import model_from_checkpoint

    net = model_from_checkpoint(tiny_checkpoint).eval()
    cfg = mem.MemorizationConfig(max_samples=120, top_k=2, backend="torch")
    with RunFolder(tmp_path / "run", "memorization", {"cfg": cfg}) as run:
        first = mem.run_memorization(net, tiny_splits, cfg, store=run.partial, progress=False)
    partial = tmp_path / "run" / "partial"
    assert sorted(p.name for p in partial.glob("layer_*.json")) == ["layer_conv1.conv.json", "layer_conv2.conv.json",
                                                                   "layer_conv3.conv.json"]
    assert load_state_file(partial / "sweep_conv3.conv" / "sweep.pt")["done"].keys() == {"conv3.conv"}

    # Resume: finished layers are read back, not swept again; the result is unchanged.
    calls = []
    real = mem._sweep
    monkeypatch.setattr(mem, "_sweep", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    (partial / "layer_conv3.conv.json").unlink()
    with RunFolder(tmp_path / "run", "memorization", {"cfg": cfg}, resume=True) as run:
        again = mem.run_memorization(net, tiny_splits, cfg, store=run.partial, progress=False)
    assert calls == [["conv3.conv"], ["conv3.conv"]]  # the single-channel and the cumulative sweep of conv3 only
    assert _jsonable(again) == _jsonable(first)
    # Without resuming, the same store is swept afresh (and gives the same numbers).
    calls.clear()
    fresh = mem.run_memorization(net, tiny_splits, cfg, store=Store(partial, False), progress=False)
    assert len(calls) == 6 and _jsonable(fresh) == _jsonable(first)

    # A library caller resuming a store written with other settings is refused, not mixed in.
    with pytest.raises(ValueError, match=r"layer_conv1.conv.json was written for another memorization run "
                                         r"\(config.top_k: 2 -> 3\)"):
        mem.run_memorization(net, tiny_splits, dataclasses.replace(cfg, top_k=3), store=Store(partial, True),
                             progress=False)
    other = model_from_checkpoint(tiny_checkpoint).eval()
    with torch.no_grad():
        other.conv1.conv.weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"another memorization run \(model:"):
        mem.run_memorization(other, tiny_splits, cfg, store=Store(partial, True), progress=False)


def test_spearman_ties_and_undefined():
    # Average ranks on ties (many channels share a score of 0), as scipy.stats.spearmanr.
    from scipy.stats import spearmanr

    a, b = [0.0, 0.0, 0.0, 0.2, 0.5], [1.0, 3.0, 2.0, 4.0, 5.0]
    assert mem._spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert mem._spearman([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]) is None  # constant scores: undefined
    assert mem._spearman([1.0], [2.0]) is None


def test_mitigate_cli(tmp_path):
    out = tmp_path / "mit"
    text = _invoke(["mitigate", *_DATA, "--erm-epochs", "1", "--epochs", "2", "--max-steps-per-epoch", "1",
                    "--out", str(out), "--quiet"])
    assert "worst-group" in text
    r = json.loads((out / "result.json").read_text())["result"]
    assert {"before", "after", "after_pruned", "history", "checkpoint", "grouping"} <= set(r)
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert all(h["pruned_weights"] > 0 and h["mask_threshold"] > 0 for h in r["history"])
    for split in ("train", "val", "test"):
        assert set(r["before"][split]["group_accuracy"]) == {"aligned", "conflicting"}
        assert r["after"][split]["worst_group_accuracy"] == min(r["after"][split]["group_accuracy"].values())
    assert r["config"]["lr"] == 2e-4 and r["config"]["tau"] == 0.5 and r["config"]["batch_size"] == 100
    assert r["config"]["ce_weight"] == 0.2 and r["config"]["prune_fraction"] == 0.01
    assert r["checkpoint"] == str(out / "best.pt") and (out / "erm" / "last.pt").exists()
    # the published defaults: convs only pruned, 2N-anchor sum, plateau schedule, resized crop + flip
    assert r["pruned_tensors"] == ["conv1.conv.weight", "conv2.conv.weight", "conv3.conv.weight"]
    assert (r["config"]["contrastive_form"], r["config"]["schedule"], r["config"]["augment"]) == \
        ("sum-2n", "plateau", "resized-crop-flip") and r["config"]["double_softmax"] is False
    for name in ("group_accuracy_test.png", "mitigation_curves.png"):
        assert (out / name).stat().st_size > 1000


def test_mitigation_resume_matches_uninterrupted(tmp_path, tiny_splits, monkeypatch):
    def model():
        torch.manual_seed(0)
        return build_model("small-cnn", num_classes=10, image_size=16, width=4, padding=2)

    cfg = mem.MitigationConfig(epochs=2, batch_size=60, max_steps_per_epoch=2, device="cpu")

    def run(name, resume=False):
        return RunFolder(tmp_path / name, "mitigate", {"cfg": cfg}, resume=resume)
    with run("full") as folder:
        full = mem.run_mitigation(model(), tiny_splits, cfg, store=folder, progress=False)
    assert full.checkpoint == str(tmp_path / "full" / "best.pt")

    # Interrupted on the first step of epoch 2 (after epoch 1's checkpoint and log entry).
    real, steps = mem.MitigationObjective.__call__, [0]

    def flaky(self, *a):
        steps[0] += 1
        if steps[0] == 3:
            raise KeyboardInterrupt
        return real(self, *a)
    monkeypatch.setattr(mem.MitigationObjective, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt), run("part") as folder:
        mem.run_mitigation(model(), tiny_splits, cfg, store=folder, progress=False)
    monkeypatch.setattr(mem.MitigationObjective, "__call__", real)
    assert [h["epoch"] for h in json.loads((tmp_path / "part" / "mitigation_log.json").read_text())] == [1]
    with run("part", resume=True) as folder:
        resumed = mem.run_mitigation(model(), tiny_splits, cfg, store=folder, progress=False)
    a = load_state_file(tmp_path / "full" / "best.pt")["model"]
    b = load_state_file(tmp_path / "part" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history == full.history and resumed.after == full.after and resumed.before == full.before
    # Training moved the weights: "after" is a different model from "before".
    assert not torch.equal(a["conv1.conv.weight"], model().state_dict()["conv1.conv.weight"])


def test_default_layers_stem_and_where():
    torch.manual_seed(0)
    ours = build_model("resnet18", num_classes=4, width=4)
    blocks = mem.default_layers(ours)  # the old default: blocks only, block outputs
    assert "stem.conv" not in blocks
    assert mem.default_layers(ours, where="output", stem=True) == ["stem.conv"] + blocks
    convs = mem.default_layers(ours, where="pre-bn", stem=True)
    # our ResNet's first block is the stem unit itself: its conv is listed once
    assert blocks[0] == "stem" and convs == ["stem.conv"] + [f"{b}.conv2" for b in blocks[1:]]
    tv = build_model("tv:resnet18", num_classes=2)
    assert mem.default_layers(tv, where="pre-bn", stem=True)[0] == "net.conv1"  # where the published channel is
    small = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2)
    assert mem.default_layers(small, where="pre-bn", stem=True) == ["conv1.conv", "conv2.conv", "conv3.conv"]


def test_memorization_config_noise_modes(tmp_path):
    with pytest.raises(ValueError, match="'noise' is ambiguous.*'activation-noise'.*'weight-noise'"):
        mem.MemorizationConfig(mode="noise")
    with pytest.raises(ValueError, match="needs noise_std"):
        mem.MemorizationConfig(mode="weight-noise")
    with pytest.raises(ValueError, match="noise_std only applies"):
        mem.MemorizationConfig(mode="zero", noise_std=0.1)
    cfg = mem.MemorizationConfig(mode="weight-noise", noise_std=0.01, noise_kind="add", repeats=3)
    assert cfg.where == "pre-bn" and cfg.stem and cfg.weight_norm_ranking == "global"
    result = run_cli("memorization", *_DATA, "--mode", "noise", "--out", str(tmp_path / "m"),
                                       "--quiet")
    assert result.exit_code != 0 and "activation-noise" in result.output and "weight-noise" in result.output
