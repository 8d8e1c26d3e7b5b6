"""Tests of shortcut_fast.models: project models, the timm/torchvision bridge, introspection
helpers and local weight loading. Everything runs on the CPU with small widths."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from shortcut_fast.models import (
    block_outputs,
    build_model,
    features_and_head,
    get_submodule,
    list_models,
    load_pretrained,
    model_blocks,
)

# small versions of every project model (keeps the file fast); options that are
# needed for some sizes are added by `_options`
SMALL = {
    "resnet18": {"width": 8},
    "resnet20": {"width": 4},
    "vgg11": {"width": 8},
    "vgg16": {"width": 8},
    "small-cnn": {},
    "mlp": {"width": 16},
    "mlp3": {},
    "mlp5": {},
    "vit-tiny": {"dim": 32, "depth": 2, "heads": 2},
}

EXPECTED_BLOCKS = {
    "resnet18": ["stem"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)],
    "resnet20": ["stem"] + [f"layer{s}.{b}" for s in range(1, 4) for b in range(3)],
    "vgg11": [f"conv{i}" for i in range(1, 9)],
    "vgg16": [f"conv{i}" for i in range(1, 14)],
    "small-cnn": ["conv1", "conv2", "conv3"],
    "mlp": ["fc1", "fc2"],
    "mlp3": ["fc1", "fc2"],
    "mlp5": ["fc1", "fc2", "fc3", "fc4"],
    "vit-tiny": ["blocks.0", "blocks.1"],
}


def _options(name: str, image_size: int) -> dict:
    opts = dict(SMALL[name])
    if name == "small-cnn" and image_size < 32:
        opts["padding"] = 2  # DeNetDM's unpadded convs need 32x32 inputs
    return opts


def _seeded_input(n: int, c: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def _call_order(model: nn.Module, x: torch.Tensor, names: list[str]) -> list[str]:
    """Names in the order their modules finish during one forward pass."""
    order: list[str] = []
    handles = [
        get_submodule(model, n).register_forward_hook(lambda m, a, o, n=n: order.append(n))
        for n in names
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order


# ---------------------------------------------------------------------------------------
# project models


@pytest.mark.parametrize("num_classes", [2, 10])
@pytest.mark.parametrize("image_size", [28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list(SMALL))
def test_project_model_shapes_and_head(name, in_channels, image_size, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, in_channels=in_channels,
                        image_size=image_size, **_options(name, image_size)).eval()
    x = _seeded_input(3, in_channels, image_size)
    with torch.no_grad():
        logits = model(x)
        feats, head = features_and_head(model)
        f = feats(x)
    assert logits.shape == (3, num_classes)
    assert isinstance(head, nn.Linear) and head is model.head
    assert f.shape == (3, head.in_features)
    assert head.out_features == num_classes
    torch.testing.assert_close(head(f), logits, rtol=0, atol=0)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(SMALL))
def test_blocks_in_forward_order_and_pooled_outputs(name):
    model = build_model(name, num_classes=4, in_channels=3, image_size=32,
                        **_options(name, 32)).eval()
    x = _seeded_input(2, 3, 32)
    names = model_blocks(model)
    assert names == EXPECTED_BLOCKS[name]
    assert _call_order(model, x, names) == names

    with torch.no_grad():
        raw = block_outputs(model, x, pool=False)
        pooled = block_outputs(model, x)
    assert list(raw) == names and list(pooled) == names
    for n in names:
        r, p = raw[n], pooled[n]
        assert p.dim() == 2 and p.shape[0] == 2
        expected = {4: lambda t: t.mean((2, 3)), 3: lambda t: t.mean(1), 2: lambda t: t}[r.dim()]
        torch.testing.assert_close(p, expected(r))
    # the last block's pooled output is the features, except where a max-pool (VGG) or a
    # final LayerNorm on the class token (ViT) comes between them
    if name not in ("vgg11", "vgg16", "vit-tiny"):
        with torch.no_grad():
            torch.testing.assert_close(pooled[names[-1]], model.features(x))


def test_block_outputs_stop_early_and_subset():
    model = build_model("resnet20", num_classes=10, width=4).eval()
    calls = []
    model.head.register_forward_hook(lambda *a: calls.append("head"))
    model.layer3.register_forward_hook(lambda *a: calls.append("layer3"))
    out = block_outputs(model, _seeded_input(2, 3, 32), ["layer1.2", "stem"], pool=False)
    assert list(out) == ["layer1.2", "stem"]
    assert out["stem"].shape == (2, 4, 32, 32) and out["layer1.2"].shape == (2, 4, 32, 32)
    assert calls == []  # nothing after layer1.2 ran
    # inner modules can be addressed too (pre-BN conv output of a block)
    inner = block_outputs(model, _seeded_input(2, 3, 32), ["layer2.0.conv1"])
    assert inner["layer2.0.conv1"].shape == (2, 8)


def test_block_outputs_keep_gradients():
    model = build_model("mlp", num_classes=3, image_size=8, width=5)
    x = torch.rand(4, 3, 8, 8)
    out = block_outputs(model, x, ["fc1"])
    out["fc1"].sum().backward()
    assert model.fc1.linear.weight.grad is not None


def test_parameter_counts_match_the_standard_models():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    # CIFAR ResNet-18 (projection shortcuts): 11,173,962 parameters for 10 classes
    assert count(build_model("resnet18", num_classes=10)) == 11_173_962
    # He et al.'s CIFAR ResNet-20 (option A shortcuts): 0.27M, exactly 269,722
    assert count(build_model("resnet20", num_classes=10)) == 269_722


def test_denetdm_branch_pairs_share_feature_width():
    assert build_model("resnet20", num_classes=10).num_features == 64
    assert build_model("small-cnn", num_classes=10).num_features == 64
    assert build_model("mlp3", num_classes=10, image_size=28).num_features == 100
    assert build_model("mlp5", num_classes=10, image_size=28).num_features == 100
    # DeNetDM's C-CIFAR10 shallow branch ends at a 1x1 map at 32x32 (its flatten == our pool)
    small = build_model("small-cnn", num_classes=10).eval()
    raw = block_outputs(small, torch.rand(1, 3, 32, 32), ["conv3"], pool=False)["conv3"]
    assert raw.shape == (1, 64, 1, 1)
    mlp5 = build_model("mlp5", num_classes=10, image_size=28)
    assert sum(isinstance(m, nn.Linear) for m in mlp5.modules()) == 5


def test_train_step_reaches_every_parameter():
    for name in ("resnet20", "vit-tiny"):
        model = build_model(name, num_classes=3, **_options(name, 32)).train()
        logits = model(torch.rand(4, 3, 32, 32))
        nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{name}: no gradient for {missing}"


def test_resnet20_shortcut_option_b():
    model = build_model("resnet20", num_classes=10, shortcut="B")
    assert isinstance(model.layer2[0].shortcut, nn.Sequential)
    assert sum(p.numel() for p in model.parameters()) > 269_722


def test_build_config_is_recorded():
    model = build_model("vgg11", num_classes=5, in_channels=1, image_size=28, width=8)
    assert model.build_config == dict(name="vgg11", num_classes=5, in_channels=1,
                                      image_size=28, width=8)


# ---------------------------------------------------------------------------------------
# errors


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_model("resnet19", num_classes=10)
    for valid in ("resnet18", "resnet20", "vgg16", "small-cnn", "mlp5", "vit-tiny", "timm:NAME"):
        assert valid in str(info.value)


@pytest.mark.parametrize("name, kwargs, match", [
    ("resnet18", {"depth": 3}, "valid options: width"),
    ("mlp3", {"depth": 4}, "mlp3 pins depth=3"),
    ("mlp", {"depth": 1}, "depth must be an int >= 2"),
    ("resnet18", {"width": 0}, "width must be"),
    ("vgg11", {"width": 2.5}, "width must be"),
    ("vit-tiny", {"patch": 5}, "multiple of patch"),
    ("vit-tiny", {"dim": 30, "heads": 4}, "multiple of heads"),
    ("resnet20", {"shortcut": "C"}, "shortcut must be"),
    ("resnet20", {"num_classes": 0}, "num_classes must be"),
    ("resnet20", {"in_channels": "3"}, "in_channels must be"),
    ("timm:", {}, "give a model name"),
])
def test_bad_options_raise_clear_errors(name, kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


def test_small_cnn_too_small_for_unpadded_convs():
    with pytest.raises(ValueError, match="padding=2"):
        build_model("small-cnn", num_classes=10, image_size=28)


def test_wrong_input_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        build_model("resnet20", num_classes=10)(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="28x28"):
        build_model("mlp3", num_classes=10, image_size=28)(torch.rand(2, 3, 32, 32))


def test_get_submodule_error_lists_names():
    model = build_model("resnet20", num_classes=10, width=4)
    assert get_submodule(model, "layer2.1.conv2") is model.layer2[1].conv2
    with pytest.raises(ValueError) as info:
        get_submodule(model, "layer4.0")
    message = str(info.value)
    assert "layer4.0" in message and "layer3.2" in message and "stem" in message
    with pytest.raises(ValueError, match="layer9"):
        block_outputs(model, torch.rand(1, 3, 32, 32), ["layer9"])


def test_list_models():
    models = list_models()
    assert set(SMALL) <= set(models)
    assert "timm:NAME" in models and "tv:NAME" in models
    assert all(isinstance(v, str) and v and "\n" not in v for v in models.values())


# ---------------------------------------------------------------------------------------
# local weights


def test_pretrained_round_trip(tmp_path):
    torch.manual_seed(1)
    source = build_model("resnet20", num_classes=10, width=4).eval()
    # non-trivial BatchNorm statistics, so buffers are part of the round trip
    with torch.no_grad():
        source.train()(torch.rand(8, 3, 32, 32))
        source.eval()
    x = _seeded_input(2, 3, 32)
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("resnet20", num_classes=10, width=4, pretrained=path).eval()
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)

    # a training checkpoint, with DataParallel's prefix
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in source.state_dict().items()}},
               wrapped)
    again = build_model("resnet20", num_classes=10, width=4, pretrained=str(wrapped)).eval()
    torch.testing.assert_close(again(x), source(x), rtol=0, atol=0)

    # into an existing model, e.g. a later checkpoint of a model being analysed
    fresh = build_model("resnet20", num_classes=10, width=4)
    assert load_pretrained(fresh, path) is fresh
    torch.testing.assert_close(fresh.eval()(x), source(x), rtol=0, atol=0)


def test_pretrained_head_of_other_shape_is_dropped(tmp_path):
    source = build_model("vit-tiny", num_classes=10, **SMALL["vit-tiny"]).eval()
    path = tmp_path / "vit.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.warns(UserWarning, match="head"):
        target = build_model("vit-tiny", num_classes=3, pretrained=path, **SMALL["vit-tiny"]).eval()
    x = _seeded_input(2, 3, 32)
    torch.testing.assert_close(target.features(x), source.features(x))
    assert target.head.out_features == 3


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model("resnet20", num_classes=10, pretrained=tmp_path / "missing.pt")
    path = tmp_path / "other.pt"
    torch.save(build_model("resnet20", num_classes=10, width=8).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_model("resnet20", num_classes=10, width=4, pretrained=path)
    torch.save(build_model("small-cnn", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="missing keys"):
        build_model("resnet20", num_classes=10, pretrained=path)
    with pytest.raises(TypeError, match="never downloads"):
        build_model("resnet20", num_classes=10, pretrained=True)


# ---------------------------------------------------------------------------------------
# timm and torchvision bridges

def test_timm_resnet_wraps_correctly():
    pytest.importorskip("timm")
    model = build_model("timm:test_resnet", num_classes=4, in_channels=1, image_size=32).eval()
    x = _seeded_input(2, 1, 32)
    with torch.no_grad():
        logits = model(x)
        feats, head = features_and_head(model)
        torch.testing.assert_close(head(feats(x)), logits)
    assert logits.shape == (2, 4)
    assert head is model.net.get_classifier()
    names = model_blocks(model)
    assert names == ["net." + info["module"] for info in model.net.feature_info]
    assert _call_order(model, x, names) == names
    outs = block_outputs(model, x)
    assert [o.shape[1] for o in outs.values()] == [i["num_chs"] for i in model.net.feature_info]
    # the state dict is the timm model's own, under "net."
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}


def test_timm_vit_at_32px():
    pytest.importorskip("timm")
    model = build_model("timm:test_vit", num_classes=3, image_size=32).eval()
    x = _seeded_input(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.head(model.features(x)), model(x))
    names = model_blocks(model)
    assert names[0] == "net.blocks.0" and len(names) == len(model.net.blocks)
    outs = block_outputs(model, x)
    assert all(o.shape == (2, model.net.embed_dim) for o in outs.values())


def test_timm_pretrained_from_local_file(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    raw = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    path = tmp_path / "timm.pth"
    torch.save(raw.state_dict(), path)  # timm's own keys, no "net." prefix
    x = _seeded_input(2, 3, 32)
    model = build_model("timm:test_resnet", num_classes=4, pretrained=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw(x), rtol=0, atol=0)
    # another number of classes: head dropped, features kept
    with pytest.warns(UserWarning, match="head"):
        other = build_model("timm:test_resnet", num_classes=7, pretrained=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(other.features(x), model.features(x))
    # 3-channel weights into a 1-channel model: the input conv is summed over channels
    with pytest.warns(UserWarning, match="input channels"):
        gray = build_model("timm:test_resnet", num_classes=4, in_channels=1, pretrained=path)
    def first_conv(m):
        return next(c for c in m.modules() if isinstance(c, nn.Conv2d))

    assert first_conv(gray).weight.shape[1] == 1
    torch.testing.assert_close(first_conv(gray).weight, first_conv(raw).weight.sum(1, keepdim=True))


def test_timm_options_and_errors():
    pytest.importorskip("timm")
    model = build_model("timm:test_vit", num_classes=3, image_size=32, normalize="imagenet",
                        blocks=["blocks.1", "blocks.3"])
    assert model_blocks(model) == ["net.blocks.1", "net.blocks.3"]
    assert model.state_dict().keys() == {f"net.{k}" for k in model.net.state_dict()}
    with pytest.raises(ValueError, match="close matches: .*resnet18"):
        build_model("timm:resnet18x", num_classes=3)
    with pytest.raises(ValueError, match="set by build_model"):
        build_model("timm:test_resnet", num_classes=3, in_chans=1)
    with pytest.raises(ValueError, match="channel"):
        build_model("timm:test_resnet", num_classes=3, in_channels=1, normalize="imagenet")
    with pytest.raises(ValueError, match="bad options"):
        build_model("timm:test_resnet", num_classes=3, no_such_option=1)


def test_normalize_option_changes_only_the_input():
    pytest.importorskip("timm")
    torch.manual_seed(3)
    plain = build_model("timm:test_resnet", num_classes=2).eval()
    norm = build_model("timm:test_resnet", num_classes=2, normalize=([0.5] * 3, [0.25] * 3)).eval()
    norm.load_state_dict(plain.state_dict())
    x = _seeded_input(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), plain((x - 0.5) / 0.25))


def test_missing_timm_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ImportError, match="pip install timm"):
        build_model("timm:test_resnet", num_classes=2)


def test_torchvision_resnet18_wraps_correctly():
    pytest.importorskip("torchvision")
    model = build_model("tv:resnet18", num_classes=5, in_channels=1, image_size=32).eval()
    x = _seeded_input(2, 1, 32)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.head(model.features(x)), logits)
    assert logits.shape == (2, 5) and model.head is model.net.fc
    names = model_blocks(model)
    assert names == [f"net.layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert _call_order(model, x, names) == names
    assert model.net.conv1.in_channels == 1
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_model("tv:resnet19", num_classes=3)


def test_features_and_head_on_plain_library_module():
    tv = pytest.importorskip("torchvision")
    net = tv.models.get_model("resnet18", weights=None, num_classes=3).eval()
    feats, head = features_and_head(net)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert head is net.fc
        torch.testing.assert_close(head(feats(x)), net(x))
    assert model_blocks(net)[:2] == ["layer1.0", "layer1.1"]


def test_import_is_light():
    code = ("import sys, shortcut_fast.models; "
            "print(any(m in sys.modules for m in ('timm', 'torchvision')))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=True)
    assert result.stdout.strip() == "False"


def test_no_warnings_for_plain_builds():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model("vgg16", num_classes=10, width=8)
        build_model("vit-tiny", num_classes=10, **SMALL["vit-tiny"])
