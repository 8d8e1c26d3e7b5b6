"""Channel-ablation sweep: the fast path (surgery.split + surgery.sweep) against the hook loop,
captum, direct counts and a planted channel; partial results; bad inputs."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

from conftest import FAST_BACKENDS
from shortcut_fast.backends import BackendUnavailable, choose_backend
from shortcut_fast.models import build_model
from shortcut_fast.ops import ablation
from shortcut_fast.run_folder import RunFolder, Store, load_state_file
from shortcut_fast.surgery import split as split_mod
from shortcut_fast.surgery import (channel_ablation_reference, channel_ablation_sweep, gradient_norm_scores,
                                   weight_norm_scores)
from shortcut_fast.surgery.sweep import conv_names, global_top, weight_noise
from shortcut_fast.report import to_jsonable


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (conftest)


def _data(n=11, size=8, classes=4, groups=3, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g),
            torch.randint(0, groups, (n,), generator=g))


def _perturbed(model, seed=1):
    old = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in old.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1)
    return old


def _models():
    torch.manual_seed(0)
    resnet = build_model("resnet18", num_classes=4, width=4).eval()
    vit = build_model("vit-tiny", num_classes=4, image_size=8, patch=4, dim=8, depth=2, heads=2).eval()
    return {"resnet18": resnet, "vit": vit}


MODELS = _models()


def _compare(fast, ref, exact_counts=True):
    assert fast.outputs.shape == ref.outputs.shape
    torch.testing.assert_close(fast.outputs, ref.outputs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.baseline_outputs, ref.baseline_outputs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-5, atol=1e-4)
    assert torch.equal(fast.group_counts, ref.group_counts)
    assert torch.equal(fast.baseline_correct, ref.baseline_correct)
    if exact_counts:
        assert torch.equal(fast.correct, ref.correct)
    assert fast.channels == ref.channels


CASES = [
    ("resnet18", "layer1.0", "output", False),          # block output: residual path in the prefix
    ("resnet18", "layer2.0.conv1", "pre-bn", False),     # a conv before its BN; downsample branch cached
    ("resnet18", "layer2.0.conv1", "post-activation", True),   # conv1 -> bn1 -> act1 -> conv2: linearity
    ("resnet18", "layer2.0.conv1", "post-activation", False),
    ("vit", "blocks.0", "output", False),                # (N, T, D) tokens, channel axis last
    ("vit", "blocks.0.mlp.fc1", "post-activation", True),    # fc1 -> GELU -> fc2: Linear linearity
    ("vit", "blocks.0.mlp.fc1", "post-activation", False),
]


@pytest.mark.parametrize("mode", ["zero", "mean", "activation-noise", "weight-noise", "rewind"])
@pytest.mark.parametrize("model_name,layer,where,linearity", CASES)
def test_fast_equals_hook_loop(model_name, layer, where, linearity, mode):
    model = MODELS[model_name]
    data = _data(n=7)
    channels = [0, 1, 3] if model_name == "resnet18" and layer == "layer1.0" else [0, 1, 6, 7]
    C = len(channels)
    kw = dict(mode=mode, where=where, return_outputs=True, batch_size=4, seed=3,
              rewind_to=_perturbed(model) if mode == "rewind" else None, channel_sets=[[0, 2], []],
              channels=channels, noise_std=0.5 if mode == "weight-noise" else None)
    if mode == "weight-noise" and where == "output":  # a block output has no filter weights to perturb
        with pytest.raises(ValueError, match="perturbs a conv's filter weights"):
            channel_ablation_sweep(model, [layer], data, backend="torch", **kw)
        return
    # a small max_bytes forces several variant chunks per batch
    fast = channel_ablation_sweep(model, [layer], data, linearity=linearity, max_bytes=1, backend="torch", **kw)
    ref = channel_ablation_reference(model, [layer], data, **kw)
    f, r = fast[layer], ref[layer]
    assert f.linearity == linearity and f.method == "fx"
    assert f.outputs.shape[0] == C + 2
    _compare(f, r)
    if mode != "zero":  # the modification really changes outputs
        assert (f.outputs[:C] - f.baseline_outputs).abs().amax() > 1e-4
    assert torch.equal(f.outputs[C + 1], f.baseline_outputs)  # the empty set is the baseline


def test_noise_repeats_average_and_seed():
    model = MODELS["resnet18"]
    data = _data()
    kw = dict(mode="activation-noise", repeats=3, return_outputs=True, batch_size=5, channels=[0, 3])
    fast = channel_ablation_sweep(model, "layer1.0", data, backend="torch", seed=7, **kw)["layer1.0"]
    ref = channel_ablation_reference(model, "layer1.0", data, seed=7, **kw)["layer1.0"]
    assert fast.outputs.shape == (3, 2, 11, 4)
    _compare(fast, ref)
    assert fast.correct.dtype == torch.float64
    assert not torch.equal(fast.outputs[0], fast.outputs[1])  # independent draws
    other = channel_ablation_sweep(model, "layer1.0", data, backend="torch", seed=8, **kw)["layer1.0"]
    assert not torch.equal(other.outputs, fast.outputs)


def test_torchvision_resnet():
    tv = build_model("tv:resnet18", num_classes=4).eval()
    data = _data(n=5, size=16)
    kw = dict(where="post-activation", channels=[0, 17, 63], channel_sets=[[1, 2, 3]], return_outputs=True,
              batch_size=3)
    for mode in ("zero", "rewind"):
        extra = dict(rewind_to=_perturbed(tv).state_dict()) if mode == "rewind" else {}
        fast = channel_ablation_sweep(tv, "net.layer1.0.conv1", data, mode=mode, backend="torch", **kw, **extra)
        ref = channel_ablation_reference(tv, "net.layer1.0.conv1", data, mode=mode, **kw, **extra)
        assert fast["net.layer1.0.conv1"].linearity
        _compare(fast["net.layer1.0.conv1"], ref["net.layer1.0.conv1"])
    # torchvision's ReLU is in place and shared by two calls per block: flags are restored
    assert tv.net.layer1[0].relu.inplace


def test_timm_convnext_blocks():
    """ConvNeXt-style blocks: depthwise conv, channels-last LayerNorm / MLP (channel axis last)."""
    pytest.importorskip("timm")
    net = build_model("timm:convnext_atto", num_classes=4, image_size=32).eval()
    data = _data(n=4, size=32)
    block = "net.stages.1.blocks.0"
    layers = [f"{block}.conv_dw", f"{block}.mlp.act", "net.stages.2"]
    kw = dict(channels=[0, 5, 31], channel_sets=[[1, 2]], return_outputs=True)
    fast = channel_ablation_sweep(net, layers, data, **kw)
    ref = channel_ablation_reference(net, layers, data, **kw)
    for layer in layers:
        assert fast[layer].method == "fx"
        _compare(fast[layer], ref[layer])


@pytest.mark.parametrize("name,layers", [
    ("resnet20", ["layer2.0", "layer1.1.conv1"]), ("vgg11", ["conv2", "conv3"]),
    ("small-cnn", ["conv2"]), ("mlp", ["fc1"])])
def test_split_reproduces_project_models(name, layers):
    opts = {"resnet20": dict(width=2), "vgg11": dict(width=4), "small-cnn": dict(width=2, padding=2),
            "mlp": dict(width=6)}[name]
    model = build_model(name, num_classes=3, image_size=8, **opts).eval()
    x = torch.rand(3, 3, 8, 8)
    for layer in layers:
        for where in ("output", "post-activation") if name != "resnet20" or "conv" in layer else ("output",):
            sm = split_mod.split_model(model, layer, x, where=where)
            sm.verify(x)
            assert sm.method == "fx"
            masks = torch.eye(sm.num_channels, dtype=torch.bool)[:2]
            out = sm.run_variants(sm.prefix(x), masks, 0.0, backend="torch")
            assert out.shape == (2, 3, 3)


def test_linearity_is_used_and_matches_direct():
    model = MODELS["resnet18"]
    x = torch.rand(4, 3, 8, 8)
    on = split_mod.split_model(model, "layer1.1.conv1", x, where="post-activation")
    off = split_mod.split_model(model, "layer1.1.conv1", x, where="post-activation", linearity=False)
    assert isinstance(on.linear, nn.Conv2d) and off.linear is None
    masks = ablation.channel_masks(4, [0, 1, [0, 3], [], [0, 1, 2, 3]])
    for rep in (0.0, torch.tensor([0.5, -1.0, 2.0, 0.25]), torch.randn(4, 4, 8, 8)):
        a = on.run_variants(on.prefix(x), masks, rep, backend="torch")
        b = off.run_variants(off.prefix(x), masks, rep, backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prefix_is_run_once_and_live_ins_are_repeated():
    model = MODELS["resnet18"]
    x = torch.rand(4, 3, 8, 8)
    sm = split_mod.split_model(model, "layer2.0.conv1", x, where="pre-bn")
    # the downsample branch (shortcut) of layer2.0 reads the block input: a live-in, not recomputed
    assert sm._live_dims == [0]
    suffix_targets = {n.target for n in sm._suffix_gm.graph.nodes if n.op == "call_module"}
    assert "layer2.0.shortcut" not in suffix_targets and "layer2.0.shortcut.0" not in suffix_targets
    assert "layer1.0.conv1" not in suffix_targets and "layer2.0.bn1" in suffix_targets


def test_group_counts_and_channel_sets_equal_direct_count():
    model = MODELS["resnet18"]
    x, y, g = _data(n=9)
    sets = [[0], [1, 2], [0, 1, 2, 3]]
    res = channel_ablation_sweep(model, "layer1.0", (x, y, g), channel_sets=sets, num_groups=5, backend="torch",
                                 return_outputs=True)["layer1.0"]
    assert torch.equal(res.group_counts, torch.bincount(g, minlength=5))
    for v, s in enumerate(sets):
        def hook(_m, _a, out, s=s):
            out = out.clone()
            out[:, s] = 0
            return out
        h = model.layer1[0].register_forward_hook(hook)
        with torch.no_grad():
            pred = model(x).argmax(1)
        h.remove()
        direct = torch.bincount(g[pred == y], minlength=5)
        assert torch.equal(res.correct[v], direct)
    with torch.no_grad():
        base = torch.bincount(g[model(x).argmax(1) == y], minlength=5)
    assert torch.equal(res.baseline_correct, base)
    acc = res.accuracy()
    assert acc.shape == (3, 5) and torch.isnan(acc[:, 3:]).all()  # empty groups
    torch.testing.assert_close(res.drop(), res.baseline_accuracy()[None] - acc, equal_nan=True)
    json.dumps(to_jsonable(channel_ablation_sweep(model, "layer1.0", (x, y, g), channels=[0], backend="torch")))


def test_captum_layer_feature_ablation():
    captum = pytest.importorskip("captum.attr")
    model = MODELS["resnet18"]
    x, y, g = _data(n=6)
    res = channel_ablation_sweep(model, "layer2.0.conv1", (x, y, g), where="post-activation", backend="torch",
                                 return_outputs=True)["layer2.0.conv1"]
    C = res.num_channels

    def target_logit(inp):  # captum stacks k perturbations along the batch: repeat the labels
        out = model(inp)
        return out.gather(1, y.repeat(out.shape[0] // y.numel())[:, None])[:, 0]
    lfa = captum.LayerFeatureAblation(target_logit, model.layer2[0].act1)
    mask = torch.arange(C).reshape(1, C, 1, 1)
    with torch.no_grad():
        attr = lfa.attribute(x, layer_mask=mask, perturbations_per_eval=3)
    ours = res.baseline_outputs.gather(1, y[:, None]) - res.outputs.gather(2, y[None, :, None].expand(C, -1, 1))[..., 0].T
    torch.testing.assert_close(attr[:, :, 0, 0], ours, rtol=1e-4, atol=1e-5)


class _Planted(nn.Module):
    """x = (attribute sign, minority-only label signal, noise); channel 2 of fc1 memorizes
    the minority groups, channel 0 carries the spurious attribute."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.head = nn.Linear(6, 2)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.zero_()
            self.fc1.weight[0, 0] = 1.0
            self.fc1.weight[2, 1] = 1.0
            self.fc1.weight[[1, 3, 4, 5], 2] = torch.tensor([0.3, -0.2, 0.1, 0.05])
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[1, 0], self.head.weight[0, 0] = 0.5, -0.5
            self.head.weight[1, 2], self.head.weight[0, 2] = 1.0, -1.0
            self.head.weight[1, [1, 3, 4, 5]] = 0.01

    def forward(self, x):
        return self.head(self.fc1(x))


def _planted_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    minority = torch.arange(n) % 5 == 0
    attr = torch.where(minority, 1 - y, y)
    sign = 2.0 * y - 1.0
    x = torch.stack([2.0 * attr - 1.0, torch.where(minority, 3.0 * sign, torch.zeros(n)),
                     0.1 * torch.randn(n, generator=g)], 1)
    return x, y, y * 2 + attr


@pytest.mark.parametrize("linearity", [True, False])
def test_planted_channel_ranks_first(linearity):
    model = _Planted()
    x, y, groups = _planted_data()
    res = channel_ablation_sweep(model, "fc1", (x, y, groups), num_groups=4, linearity=linearity,
                                 backend="torch")["fc1"]
    assert res.linearity == linearity
    assert torch.equal(res.baseline_correct, res.group_counts)  # the model is perfect
    minority = [1, 2]  # label 0 / attribute 1 and label 1 / attribute 0
    score = res.score(minority)
    assert int(score.argmax()) == 2 and float(score[2]) == pytest.approx(1.0)
    assert res.drop()[2, [0, 3]].abs().max() == 0  # majority untouched


def _run(tmp_path, resume):
    return RunFolder(tmp_path / "run", "sweep-test", {"case": 1}, resume=resume)


def test_resume_through_store_equals_uninterrupted(tmp_path, monkeypatch):
    model = MODELS["resnet18"]
    data = _data(n=10)
    layers = ["layer1.0", "layer1.1"]
    kw = dict(mode="activation-noise", return_outputs=True, batch_size=3, backend="torch", channels=[0, 1, 3])
    real = split_mod.SplitModel.run_variants
    calls = [0]

    def counting(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)
    monkeypatch.setattr(split_mod.SplitModel, "run_variants", counting)
    full = channel_ablation_sweep(model, layers, data, **kw)
    full_calls, calls[0] = calls[0], 0

    def flaky(self, *a, **k):
        calls[0] += 1
        if calls[0] == 15:  # part-way through the second layer (verify, then base + variants per batch)
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(split_mod.SplitModel, "run_variants", flaky)
    with pytest.raises(KeyboardInterrupt), _run(tmp_path, resume=False) as run:
        channel_ablation_sweep(model, layers, data, store=run.partial, **kw)
    saved = load_state_file(tmp_path / "run" / "partial" / "sweep.pt")  # weights_only=True suffices
    assert "layer1.0" in saved["done"] and saved["current"]["layer"] == "layer1.1"
    assert 1 <= saved["current"]["next_batch"] < 4

    monkeypatch.setattr(split_mod.SplitModel, "run_variants", counting)
    calls[0] = 0
    with _run(tmp_path, resume=True) as run:
        resumed = channel_ablation_sweep(model, layers, data, store=run.partial, **kw)
    assert 0 < calls[0] < full_calls - 10  # layer1.0 and the saved batches were not run again
    for layer in layers:
        _compare(resumed[layer], full[layer])
        torch.testing.assert_close(resumed[layer].loss, full[layer].loss, rtol=0, atol=0)
        assert resumed[layer].method == full[layer].method

    # A finished sweep is read back whole; a fresh (not resuming) run starts again from nothing.
    calls[0] = 0
    again = channel_ablation_sweep(model, layers, data, store=Store(tmp_path / "run" / "partial", True), **kw)
    assert calls[0] == 0 and torch.equal(again["layer1.1"].outputs, full["layer1.1"].outputs)
    with _run(tmp_path / "other", resume=False) as run:
        channel_ablation_sweep(model, layers, data, store=run.partial, **kw)
    assert calls[0] > 0


def test_store_of_another_sweep_is_refused(tmp_path):
    model = MODELS["resnet18"]
    data = _data(n=6)
    kw = dict(batch_size=4, backend="torch", channels=[0, 1])
    store = Store(tmp_path, resuming=True)
    channel_ablation_sweep(model, "layer1.0", data, store=store, **kw)
    assert (tmp_path / "sweep.pt").exists()
    other_data = (data[0].flip(0), data[1], data[2])
    for change, key in ((dict(mode="mean"), "mode"), (dict(channels=[0, 2]), "channels"),
                        (dict(layers="layer1.1"), "layers"), (dict(data=other_data), "data"),
                        (dict(model=_perturbed(model)), "model"), (dict(num_groups=5), "num_groups")):
        args = {"model": model, "layers": "layer1.0", "data": data, **kw, **change}
        with pytest.raises(ValueError, match=rf"different sweep \(.*{key}"):
            channel_ablation_sweep(args.pop("model"), args.pop("layers"), args.pop("data"), store=store, **args)
    # A store that is not resuming ignores (and then replaces) what it holds.
    fresh = channel_ablation_sweep(model, "layer1.0", data, store=Store(tmp_path, False), **{**kw, "mode": "mean"})
    assert fresh.mode == "mean"
    with pytest.raises(ValueError, match="different sweep"):
        channel_ablation_sweep(model, "layer1.0", data, store=store, **kw)


def test_rewind_checkpoint_files(tmp_path):
    model = MODELS["resnet18"]
    data = _data(n=5)
    old = _perturbed(model)
    kw = dict(mode="rewind", channels=[0, 2], backend="torch", return_outputs=True)
    ckpt = tmp_path / "epoch_001.pt"
    torch.save({"model": old.state_dict(), "epoch": 0, "model_config": {"name": "resnet18"}}, ckpt)
    from_file = channel_ablation_sweep(model, "layer1.0", data, rewind_to=ckpt, **kw)["layer1.0"]
    from_model = channel_ablation_sweep(model, "layer1.0", data, rewind_to=old, **kw)["layer1.0"]
    assert torch.equal(from_file.outputs, from_model.outputs)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"rewind_to '.*notes.txt' is not a readable torch state file"):
        channel_ablation_sweep(model, "layer1.0", data, rewind_to=tmp_path / "notes.txt", **kw)
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"rewind_to '.*tensor.pt' is not a model checkpoint.*got Tensor"):
        channel_ablation_sweep(model, "layer1.0", data, rewind_to=tmp_path / "tensor.pt", **kw)
    torch.save(old, tmp_path / "pickled_module.pt")  # a whole pickled model: refused by weights_only=True
    with pytest.raises(ValueError, match=r"rewind_to '.*pickled_module.pt' is not a readable torch state"):
        channel_ablation_sweep(model, "layer1.0", data, rewind_to=tmp_path / "pickled_module.pt", **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_named(bad):
    model = MODELS["resnet18"]
    x, y, g = _data(n=9)
    x[6, 1, 2, 3] = bad
    for fn, extra in ((channel_ablation_sweep, dict(backend="torch")), (channel_ablation_reference, {})):
        with pytest.raises(ValueError, match=r"data: the images contain NaN or Inf .*first is sample 6"):
            fn(model, "layer1.0", (x, y, g), batch_size=4, channels=[0], **extra)
    x[0, 0, 0, 0] = bad  # in the batch the split is checked on: still the input is blamed, not the split
    with pytest.raises(ValueError, match=r"data: the images contain NaN or Inf \(1 bad samples among 0..3"):
        channel_ablation_sweep(model, "layer1.0", (x, y, g), batch_size=4, channels=[0], backend="torch")
    with pytest.raises(ValueError, match="data: the images contain NaN or Inf"):
        gradient_norm_scores(model, ["layer1.0.conv1"], (x, y, torch.zeros_like(g)), 0, num_samples=3)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        if float(x.sum()) > -1:  # data-dependent Python branch: fx cannot trace it
            h = h.relu()
        return self.head(h.mean((2, 3)))


def test_untraceable_model_falls_back_to_hooks():
    model = _Untraceable().eval()
    data = _data(n=5, classes=2)
    with pytest.warns(RuntimeWarning, match="falling back"):
        fast = channel_ablation_sweep(model, "conv", data, return_outputs=True, backend="torch", mode="mean")
    ref = channel_ablation_reference(model, "conv", data, return_outputs=True, mode="mean")
    assert fast["conv"].method == "hook"
    _compare(fast["conv"], ref["conv"])


class _BatchDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x.flatten(1)[:, :3])
        return self.head(h) * 8 / h.shape[0]  # depends on the batch size


def test_verify_catches_a_wrong_split():
    with pytest.raises(RuntimeError, match="does not reproduce"):
        channel_ablation_sweep(_BatchDependent(), "fc", _data(n=8, classes=2), backend="torch")


def test_bad_inputs():
    model = MODELS["resnet18"]
    data = _data()
    with pytest.raises(ValueError, match="no submodule 'layer9'.*layer1.0"):
        channel_ablation_sweep(model, ["layer9"], data)
    with pytest.raises(ValueError, match="mode must be one of"):
        channel_ablation_sweep(model, "layer1.0", data, mode="erase")
    with pytest.raises(ValueError, match="'noise' is ambiguous.*'activation-noise'.*'weight-noise'"):
        channel_ablation_sweep(model, "layer1.0", data, mode="noise")
    with pytest.raises(ValueError, match="needs noise_std"):
        channel_ablation_sweep(model, "layer1.0.conv1", data, mode="weight-noise", where="pre-bn")
    with pytest.raises(ValueError, match="noise_kind must be one of"):
        channel_ablation_sweep(model, "layer1.0.conv1", data, mode="weight-noise", where="pre-bn", noise_std=0.1,
                               noise_kind="scale")
    with pytest.raises(ValueError, match="noise_std only applies"):
        channel_ablation_sweep(model, "layer1.0", data, mode="activation-noise", noise_std=0.1)
    with pytest.raises(ValueError, match="where must be one of"):
        channel_ablation_sweep(model, "layer1.0", data, where="inside")
    with pytest.raises(ValueError, match="needs rewind_to"):
        channel_ablation_sweep(model, "layer1.0", data, mode="rewind")
    with pytest.raises(ValueError, match="repeats"):
        channel_ablation_sweep(model, "layer1.0", data, repeats=2)
    with pytest.raises(ValueError, match="not an activation"):
        channel_ablation_sweep(model, "layer1.0.conv2", data, where="post-activation", backend="torch")
    with pytest.raises(ValueError, match="exactly one"):
        channel_ablation_sweep(model, "layer1.0", data, where="pre-bn", backend="torch")
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        channel_ablation_sweep(model, "layer1.0", data, channels=[4], backend="torch")
    with pytest.raises(ValueError, match="groups must lie in"):
        channel_ablation_sweep(model, "layer1.0", data, num_groups=2, backend="torch")
    with pytest.raises(TypeError, match="ImageDataset or a tuple"):
        channel_ablation_sweep(model, "layer1.0", data[0])
    with pytest.raises(ValueError, match="no weights for"):
        channel_ablation_sweep(model, "layer1.0", data, mode="rewind", rewind_to={"head.weight": torch.ones(1)},
                               backend="torch")


def test_image_dataset_input():
    from shortcut_fast.data.core import ImageDataset

    x, y, a = _data(n=7, groups=2)
    images = (x * 255).to(torch.uint8)
    ds = ImageDataset(images, y, a, num_classes=4, num_attributes=2)
    model = MODELS["resnet18"]
    got = channel_ablation_sweep(model, "layer1.0", ds, channels=[1, 2], backend="torch")["layer1.0"]
    want = channel_ablation_reference(model, "layer1.0", (images.float() / 255, y, y * 2 + a), num_groups=8,
                                      channels=[1, 2])["layer1.0"]
    assert torch.equal(got.correct, want.correct) and got.correct.shape == (2, 8)


def test_weight_and_gradient_norm_scores():
    model = MODELS["resnet18"]
    w = weight_norm_scores(model, ["layer1.0.conv1", "stem", "layer1.0"])
    torch.testing.assert_close(w["stem"], model.stem.conv.weight.detach().flatten(1).norm(dim=1).double())
    torch.testing.assert_close(w["layer1.0"], model.layer1[0].conv2.weight.detach().flatten(1).norm(dim=1).double())
    assert set(weight_norm_scores(model)) >= {"stem.conv", "head", "layer2.0.shortcut.0"}
    x, y, g = _data(n=12)
    got = gradient_norm_scores(model, ["layer1.0.conv1", "head"], (x, y, g), 1, num_samples=3, batch_size=2)
    members = (g == 1).nonzero().flatten()
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(x[members]), y[members], reduction="none")
    worst = members[losses.argsort(descending=True)[:3]]
    loss = torch.nn.functional.cross_entropy(model(x[worst]), y[worst])
    gw, gh = torch.autograd.grad(loss, [model.layer1[0].conv1.weight, model.head.weight])
    torch.testing.assert_close(got["layer1.0.conv1"], gw.flatten(1).norm(dim=1).double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got["head"], gh.flatten(1).norm(dim=1).double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch")] + FAST_BACKENDS)
def test_backends(backend, device):
    for op in ("channel_ablate", "group_outcomes"):
        try:
            choose_backend(op, backend, device, ("torch", "cpp", "cuda", "triton"))
        except BackendUnavailable as exc:
            pytest.skip(str(exc))
    model = copy.deepcopy(MODELS["resnet18"]).to(device)
    data = tuple(t.to(device) for t in _data())
    kw = dict(mode="mean", where="output", channel_sets=[[0, 1], [3]], channels=[0, 1, 2, 3], return_outputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = channel_ablation_sweep(model, "layer1.0", data, backend=backend, linearity=False, **kw)
    ref = channel_ablation_reference(model, "layer1.0", data, **kw)
    _compare(fast["layer1.0"], ref["layer1.0"])


class _TinyConvNet(nn.Module):
    """conv (with a bias: weight noise must keep it) -> BN -> ReLU -> pool -> linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("kind", ["replace", "add"])
def test_weight_noise_is_the_published_weight_perturbation(kind):
    """Published "noise" (utils.modify_weights, random_init / random_noise): in a copy of the
    model, output channel c's filter weights W[c] become Z[c] (replace) or W[c] + Z[c] (add),
    Z ~ N(0, std^2) drawn once per run; the bias stays; the copy is evaluated on all the data;
    the runs' correct counts are averaged. Computed here with full forwards of modified copies."""
    torch.manual_seed(0)
    model = _TinyConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.conv.bias.uniform_(-0.5, 0.5)
    x, y, g = _data(n=13, classes=4, groups=2)
    std, R, channels = 0.3, 2, [1, 4]
    got = channel_ablation_sweep(model, "conv", (x, y, g), mode="weight-noise", where="pre-bn", noise_kind=kind,
                                 noise_std=std, repeats=R, channels=channels, channel_sets=[[0, 2]], seed=5,
                                 return_outputs=True, batch_size=4, backend="torch")["conv"]
    W = model.conv.weight.detach()
    expected = torch.zeros(3, 2, dtype=torch.float64)
    for r in range(R):
        z = weight_noise(W, "replace", std, 5, 0, r)  # the draw: N(0, std^2) per weight
        assert abs(float(z.std()) / std - 1) < 0.35 and not torch.equal(z, weight_noise(W, "replace", std, 5, 0, 1 - r))
        for v, chans in enumerate([[1], [4], [0, 2]]):
            copy_ = copy.deepcopy(model)
            with torch.no_grad():
                for c in chans:
                    copy_.conv.weight[c] = z[c] if kind == "replace" else W[c] + z[c]
                logits = copy_(x)
            torch.testing.assert_close(got.outputs[r, v], logits, rtol=1e-5, atol=1e-5)
            hit = (logits.argmax(1) == y).double()
            expected[v] += torch.stack([hit[g == k].sum() for k in range(2)]) / R
    torch.testing.assert_close(got.correct, expected)
    ref = channel_ablation_reference(model, "conv", (x, y, g), mode="weight-noise", where="pre-bn", noise_kind=kind,
                                     noise_std=std, repeats=R, channels=channels, channel_sets=[[0, 2]], seed=5,
                                     return_outputs=True, batch_size=4)["conv"]
    _compare(got, ref, exact_counts=False)


def test_conv_names_and_global_top():
    model = MODELS["resnet18"]
    every = conv_names(model)
    plain = conv_names(model, downsample=False)
    assert "layer2.0.shortcut.0" in every and "layer2.0.shortcut.0" not in plain
    assert plain[0] == "stem.conv" and set(every) - set(plain) == {n for n in every if ".shortcut." in n}
    scores = {"a": torch.tensor([0.5, 3.0, 1.0]), "b": torch.tensor([3.0, 2.0])}
    assert global_top(scores, 3) == [{"layer": "a", "channel": 1, "score": 3.0},
                                     {"layer": "b", "channel": 0, "score": 3.0},
                                     {"layer": "b", "channel": 1, "score": 2.0}]
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        global_top(scores, 0)


@pytest.mark.parametrize("batches,variants,world", [(2, 64, 2), (3, 8, 2), (7, 5, 3), (2, 8, 3), (5, 2, 3), (4, 1, 4)])
def test_distributed_work_plan_covers_every_cell_once(batches, variants, world):
    """Every (batch, variant) cell is swept by exactly one rank, every rank has work, each
    batch's baseline is counted once, and a batch's prefix runs on more than one rank only
    for the batches left over after an even split of the batches."""
    from shortcut_fast.distributed import DistContext
    from shortcut_fast.surgery.sweep import _work_plan

    plans = [_work_plan(batches, variants, DistContext(rank=r, world_size=world), "l") for r in range(world)]
    cells = [(b, v) for plan in plans for b, vr in plan for v in vr]
    assert sorted(cells) == [(b, v) for b in range(batches) for v in range(variants)]
    assert all(plans) and sorted(b for plan in plans for b, vr in plan if vr.start == 0) == list(range(batches))
    prefix_runs = sum(len(plan) for plan in plans)
    assert prefix_runs <= batches + (batches % world) * (world - 1)
    if batches % world == 0:  # an even split: every prefix runs once
        assert prefix_runs == batches
    assert _work_plan(batches, variants, None, "l") == [(b, range(variants)) for b in range(batches)]


def test_distributed_work_plan_refuses_a_world_without_work_for_every_rank():
    from shortcut_fast.distributed import DistContext
    from shortcut_fast.surgery.sweep import _work_plan

    with pytest.raises(ValueError, match="world size 3 is larger than both the 2 image batches and the 2 variants"):
        _work_plan(2, 2, DistContext(rank=0, world_size=3), "l")
