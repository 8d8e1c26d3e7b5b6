"""The Python API (docs/api.md): sf.data.as_splits for every data form and bad input, and each
analysis's run -> Result -> write(folder) / summary() round trip on tiny data."""
import json
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import shortcut_fast as sf
from shortcut_fast.data import DatasetSplits, ImageDataset, load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

# The keys the command line writes into result.json for a model it did not train (--checkpoint).
CLI_RECORD = {"command", "data", "dataset_meta", "model", "model_options", "recipe", "model_cache", "result"}


def _tensors(n=60, classes=3, size=8, attributes=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, 3, size, size, generator=g) * 0.2
    x[:, 0] += y.view(n, 1, 1).float() * 0.3  # the class in the red channel: learnable at once
    if not attributes:
        return x, y
    a = torch.where(torch.arange(n) % 10 < 8, y, (y + 1) % classes)  # 80 % aligned
    x[:, 2] += a.view(n, 1, 1).float() * 0.2
    return x, y, a


def _small_cnn(classes=3, width=4):
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
                               nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                                             nn.ReLU())),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(width, classes)))


def _trained(model, x, y, steps=30):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---- as_splits: every form


def test_tensors_give_stratified_seeded_train_val_and_the_given_test():
    x, y = _tensors(100, classes=4)
    xt, yt = _tensors(20, classes=4, seed=1)
    splits = sf.data.as_splits((x, y), test=(xt, yt))
    assert isinstance(splits, DatasetSplits) and splits.name == "tensors"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert splits.num_classes == 4 and splits.num_attributes == 0 and splits.image_shape == (3, 8, 8)
    assert splits.val.class_counts() in ([3, 3, 2, 2], [2, 2, 3, 3], [3, 2, 3, 2], [2, 3, 2, 3], [3, 2, 2, 3],
                                         [2, 3, 3, 2])  # stratified: each class within one of 2.5
    assert bool((splits.train.attributes == -1).all())
    torch.testing.assert_close(splits.test.images, xt)
    # train + val hold exactly the given images; the split is seeded
    both = torch.cat([splits.train.images, splits.val.images])
    assert sorted(both.flatten(1).sum(1).tolist()) == pytest.approx(sorted(x.flatten(1).sum(1).tolist()))
    again = sf.data.as_splits((x, y), test=(xt, yt))
    assert torch.equal(again.val.images, splits.val.images)
    other = sf.data.as_splits((x, y), test=(xt, yt), seed=1)
    assert not torch.equal(other.val.images, splits.val.images)
    assert splits.meta["splits"]["val"]["n"] == 10 and "held out" in splits.meta["val"]
    splits.identity()  # in-memory splits can be fingerprinted


def test_uint8_images_and_attributes_and_a_given_val():
    x, y, a = _tensors(40, classes=2, attributes=True)
    x8 = (x * 255).to(torch.uint8)
    xv, yv, av = (t[:10] for t in (x8, y, a))
    splits = sf.data.as_splits((x8, y, a), test=(x8, y, a), val=(xv, yv, av), name="mine")
    assert splits.train.images.dtype == torch.uint8 and len(splits.train) == 40 and len(splits.val) == 10
    assert splits.num_attributes == 2 and splits.bias_aligned_attribute and splits.name == "mine"
    image, label, attribute = splits.train[0]
    assert image.dtype == torch.float32 and float(image.max()) <= 1.0 and attribute == int(a[0])
    assert splits.meta["val"] == "given"
    # more attribute values than seen; an attribute that is not a class index
    wider = sf.data.as_splits((x, y, a), test=(x, y, a), attributes=3)
    assert wider.num_attributes == 3 and not wider.bias_aligned_attribute


def test_a_torch_dataset_is_read_into_memory():
    x, y, a = _tensors(30, attributes=True)
    splits = sf.data.as_splits(TensorDataset(x, y, a), test=TensorDataset(x[:9], y[:9]), batch_size=7)
    assert isinstance(splits.train, ImageDataset) and splits.name == "TensorDataset"
    assert len(splits.train) + len(splits.val) == 30 and len(splits.test) == 9
    assert splits.num_attributes == 3
    assert bool((splits.test.attributes == -1).all())  # the test Dataset yields no attribute
    # an ImageDataset is used as it is
    ds = ImageDataset(x, y, num_classes=3)
    assert sf.data.as_splits(ds, test=ds, val=ds).test is ds


def test_a_name_loads_the_dataset_and_a_datasetsplits_is_returned_as_is():
    splits = sf.data.as_splits("digits", seed=1, image_size=8)
    expected = load_dataset("digits", seed=1, image_size=8)
    assert splits.image_shape == (3, 8, 8) and torch.equal(splits.val.labels, expected.val.labels)
    assert sf.data.as_splits(splits) is splits
    wider = sf.data.as_splits("digits", seed=1, image_size=8, val_fraction=0.2)  # the dataset's own option
    assert len(wider.val) == len(load_dataset("digits", seed=1, image_size=8, val_fraction=0.2).val) > len(splits.val)
    with pytest.raises(TypeError, match=r"val_fraction: dataset options apply only to a dataset name"):
        sf.data.as_splits(splits, val_fraction=0.2)


class _PilImages(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        from PIL import Image

        return Image.new("RGB", (4, 4)), 0


class _Triples(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.zeros(3, 4, 4)


@pytest.mark.parametrize("call, error, words", [
    (lambda x, y: sf.data.as_splits((x, y)), ValueError, ["test: required", "test=(x_test, y_test)"]),
    (lambda x, y: sf.data.as_splits((x[:, 0], y), test=(x, y)), ValueError, ["data:", "(N, C, H, W)", "x[:, None]"]),
    (lambda x, y: sf.data.as_splits((x, y.float()), test=(x, y)), TypeError, ["data:", "labels must be integers"]),
    (lambda x, y: sf.data.as_splits((x, y[:5]), test=(x, y)), ValueError, ["data:", "labels must have shape (60,)"]),
    (lambda x, y: sf.data.as_splits((x, y), test=(x[:, :, :4], y)), ValueError, ["same image shape", "test (3, 4, 8)"]),
    (lambda x, y: sf.data.as_splits((x.int(), y), test=(x, y)), TypeError, ["data:", "float", "uint8"]),
    (lambda x, y: sf.data.as_splits((x, y, y, y), test=(x, y)), ValueError, ["data:", "tuple of 4"]),
    (lambda x, y: sf.data.as_splits((x, y - 1), test=(x, y)), ValueError, ["labels must be >= 0"]),
    (lambda x, y: sf.data.as_splits((x, y), test=42), TypeError, ["test:", "expected a tuple", "got a int"]),
    (lambda x, y: sf.data.as_splits(None, test=(x, y)), TypeError, ["data:", "torch Dataset", "NoneType"]),
    (lambda x, y: sf.data.as_splits((x, y), test=(x, y), image_size=8), TypeError,
     ["image_size", "only to a dataset name"]),
    (lambda x, y: sf.data.as_splits("digits", test=(x, y)), ValueError, ["test", "dataset name"]),
    (lambda x, y: sf.data.as_splits((x, y), test=(x, y), val_fraction=1.5), ValueError, ["val_fraction", "(0, 1)"]),
    (lambda x, y: sf.data.as_splits((x, y), test=(x, y), num_classes=2), ValueError, ["num_classes", ">= 3"]),
    (lambda x, y: sf.data.as_splits((x, y, y), test=(x, y), attributes=1), ValueError, ["attributes", ">= 3"]),
    (lambda x, y: sf.data.as_splits((x, y, y), test=(x, y), attributes=4, bias_aligned=True), ValueError,
     ["bias_aligned", "must equal num_classes (3)"]),
    (lambda x, y: sf.data.as_splits(_PilImages(), test=(x, y)), TypeError, ["data:", "Image", "ToTensor"]),
    (lambda x, y: sf.data.as_splits(_Triples(), test=(x, y)), ValueError, ["data:", "(image, label)"]),
    (lambda x, y: sf.data.as_splits((x[:1], y[:1] + 1), test=(x[:1], y[:1] + 1)), ValueError,
     ["too few to hold out", "val="]),
])
def test_bad_data_is_refused_by_argument(call, error, words):
    x, y = _tensors()
    with pytest.raises(error) as info:
        call(x, y)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# ---- the analyses: run -> Result -> write / summary


@pytest.fixture(scope="module")
def small():
    x, y, a = _tensors(90, attributes=True)
    xt, yt, at = _tensors(45, attributes=True, seed=1)
    data = sf.data.as_splits((x, y, a), test=(xt, yt, at), name="tiny")
    with torch.random.fork_rng():
        model = _trained(_small_cnn(), x, y)
    return data, model


def _record(folder):
    return json.loads((folder / "result.json").read_text())


def test_freq_probe_round_trip(small, tmp_path):
    data, model = small
    result = sf.freq_probe.run(model, data, sf.freq_probe.Config(patch=2, max_images_per_class=6))
    assert isinstance(result, sf.freq_probe.Result)
    text = result.summary()
    assert text.startswith("freq-probe on tiny: test accuracy") and "wrote" not in text
    assert result.write(tmp_path / "fp") == tmp_path / "fp"
    rec = _record(tmp_path / "fp")
    assert set(rec) == CLI_RECORD and rec["command"] == "freq-probe" and rec["data"] == "tiny"
    assert rec["model"] == "torch.nn.modules.container.Sequential" and rec["dataset_meta"]["name"] == "tiny"
    assert rec["result"]["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert len(rec["result"]["classes"]) == 3 and rec["result"]["band_stop"] is not None  # as the CLI: band table
    assert "_api_info" not in rec["result"]
    for name in ("adcs.png", "dfm.png", "tpr_fpr.png", "band_stop.png"):
        assert (tmp_path / "fp" / name).stat().st_size > 0
    assert f"wrote {tmp_path / 'fp' / 'result.json'}" in result.summary()
    # the command line's own record entries replace what run noted; summary() follows them
    result.write(tmp_path / "cli", record={"data": "cli-name", "model_options": {"width": 4}})
    rec = _record(tmp_path / "cli")
    assert rec["data"] == "cli-name" and rec["model_options"] == {"width": 4} and rec["command"] == "freq-probe"
    assert result.summary().startswith("freq-probe on cli-name")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"folder: .*file exists and is not a folder"):
        result.write(tmp_path / "file")
    with pytest.raises(TypeError, match=r"record must be a dict"):
        result.write(tmp_path / "x", record=["data"])
    with pytest.raises(TypeError, match=r"config must be a shortcut_fast.freq_probe.Config"):
        sf.freq_probe.run(model, data, sf.complexity.Config())
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        sf.freq_probe.run(lambda x: x, data)


def test_complexity_round_trip(small, tmp_path):
    data, model = small
    config = sf.complexity.Config(directions="pca:3", max_images=60, max_heldout=9, direction_images=60)
    result = sf.complexity.run(model, data, config)
    assert isinstance(result, sf.complexity.Result) and result.layers == ["features.0", "features.1"]
    assert "complexity on tiny" in result.summary()
    result.write(tmp_path)
    rec = _record(tmp_path)
    assert set(rec) == CLI_RECORD | {"trained"} and rec["command"] == "complexity"
    assert rec["result"]["complexity"] == pytest.approx(result.complexity, nan_ok=True)
    assert (tmp_path / "features.csv").read_text().count("\n") == 1 + 3
    assert (tmp_path / "decodability.png").exists() and (tmp_path / "importance_vs_complexity.png").exists()


def test_memorization_and_mitigation_round_trip(small, tmp_path):
    data, model = small
    config = sf.memorization.Config(layers=["features.0.0", "features.1.0"], top_k=2, gradient_samples=4)
    result = sf.memorization.run(model, data, config)
    assert isinstance(result, sf.memorization.Result)
    text = result.summary()
    assert "memorization on tiny" in text and "top channels (zero, pre-bn" in text
    result.write(tmp_path / "mem")
    rec = _record(tmp_path / "mem")
    assert set(rec) == CLI_RECORD and rec["command"] == "memorization"
    assert len(rec["result"]["top_channels"]) == 2 and rec["result"]["grouping"]["kind"] == "group"
    assert (tmp_path / "mem" / "top_channels.csv").exists() and (tmp_path / "mem" / "drop_scatter.png").exists()

    before = [p.detach().clone() for p in model.parameters()]
    copy = _small_cnn()
    copy.load_state_dict(model.state_dict())
    mitigated = sf.memorization.mitigate(copy, data, sf.memorization.MitigationConfig(epochs=1, batch_size=32,
                                                                                      device="cpu"))
    assert isinstance(mitigated, sf.memorization.MitigationResult) and len(mitigated.history) == 1
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # only the model passed changed
    assert not all(torch.equal(p, q) for p, q in zip(before, copy.parameters()))
    assert "mitigate on tiny" in mitigated.summary()
    mitigated.write(tmp_path / "mit")
    rec = _record(tmp_path / "mit")
    assert set(rec) == CLI_RECORD and rec["command"] == "mitigate" and rec["result"]["checkpoint"] is None
    assert (tmp_path / "mit" / "group_accuracy_test.png").exists()


def test_localization_round_trip_with_a_template_and_a_function(small, tmp_path):
    data, _ = small
    config = sf.localization.Config(epochs=1, seeds=1, batch_size=32, units=["features.0", "head"], probe_images=16)
    template = _small_cnn()
    kept = [p.detach().clone() for p in template.parameters()]
    result = sf.localization.run(template, data, config)
    assert isinstance(result, sf.localization.Result)
    assert result.units == ["features.0", "features.1", "head"] and result.localized == ["features.0", "head"]
    assert all(torch.equal(p, q) for p, q in zip(kept, template.parameters()))  # the template is never trained
    assert "localize on tiny" in result.summary()
    result.write(tmp_path)
    rec = _record(tmp_path)
    assert rec["command"] == "localize" and set(rec) == {"command", "data", "dataset_meta", "model", "model_options",
                                                        "result"}
    assert (tmp_path / "contributions.png").exists()
    # a function seed -> model gives the same numbers as the template's fresh copies
    again = sf.localization.run(sf.localization.fresh_copies(template), data, config)
    assert again.accuracy == result.accuracy


def test_fresh_copies_are_reinitialized_per_seed_without_touching_the_global_random_state():
    template = _small_cnn()
    build = sf.localization.fresh_copies(template)
    state = torch.random.get_rng_state()
    a, b, c = build(0), build(0), build(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q, r, t in zip(a.parameters(), b.parameters(), c.parameters(), template.parameters()):
        assert torch.equal(p, q)
        if p.dim() > 1:  # weights (biases of BatchNorm start as zeros / ones for every seed)
            assert not torch.equal(p, r) and not torch.equal(p, t)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.conv = nn.Conv2d(3, 2, 1)

    with pytest.raises(ValueError, match=r"Scaled has parameters but no reset_parameters\(\).*function seed"):
        sf.localization.fresh_copies(Scaled())
    with pytest.raises(TypeError, match=r"model must be an nn.Module .* or a function seed -> nn.Module"):
        sf.localization.run(42, "digits")


def test_denetdm_round_trip_and_refusals(tmp_path):
    splits = load_dataset("colored-digits", seed=0, conflict_ratio=0.05, unbiased_val=True, image_size=8)
    config = sf.denetdm.Config(ratios=(0.05,), seeds=1, stage1_epochs=1, stage2_epochs=1, baseline_epochs=1,
                               width=8, batch_size=256, baselines=("erm",))
    result = sf.denetdm.run(None, splits, config)
    assert isinstance(result, sf.denetdm.Result) and set(result.methods) >= {"denetdm", "erm"}
    assert result["config"]["ratios"] == [0.05]
    assert result.summary().startswith(f"DeNetDM on {splits.name}: test accuracy")
    result.write(tmp_path)
    rec = _record(tmp_path)
    assert rec["command"] == "denetdm" and rec["data"] == splits.name and rec["dataset_meta"] == splits.meta
    assert rec["methods"].keys() == result.methods.keys() and (tmp_path / "accuracy.png").exists()

    with pytest.raises(ValueError, match=r"model must be None for DeNetDM: it trains its own branch pair"):
        sf.denetdm.run(_small_cnn(), splits, config)
    with pytest.raises(ValueError, match=r"config.ratios must hold a single conflict ratio"):
        sf.denetdm.run(None, splits, sf.denetdm.Config(ratios=(0.02, 0.05)))
    with pytest.raises(ValueError, match=r"'digits' has no bias attribute with a conflict ratio"):
        sf.denetdm.run(None, "digits", config)
    with pytest.raises(ValueError, match=r"data_options: seed is set by denetdm itself"):
        sf.denetdm.run(None, "colored-digits", config, data_options={"seed": 3})
    with pytest.raises(TypeError, match=r"data must be a dataset name .* got tuple"):
        sf.denetdm.run(None, (torch.zeros(1), torch.zeros(1)), config)


def test_import_stays_light_and_the_modules_load_on_first_access():
    code = ("import sys, shortcut_fast as sf; "
            "assert not [m for m in sys.modules if m.startswith('shortcut_fast.experiments')]; "
            "import shortcut_fast.experiments.freq_probe as fp; assert sf.freq_probe is fp; "
            "from shortcut_fast import denetdm; assert denetdm.Config is denetdm.DeNetDMConfig; "
            "assert sf.data.as_splits.__module__ == 'shortcut_fast.data.adapt'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        sf.nope  # noqa: B018


def test_run_computes_where_the_model_is_unless_told():
    from shortcut_fast.experiments._api import default_device

    assert default_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert default_device(nn.ReLU()) == default_device(None)  # no parameters: as --device auto
    assert default_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
