"""Tests of the LfF Type0 corruptions (snow, frost, spatter, elastic, jpeg and the rest) and of the
corruption-biased datasets corrupted-digits and corrupted-cifar10 (on fake CIFAR-10 files)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shortcut_fast.data import DatasetNotFoundError, ImageDataset, load_dataset, make_corrupted_splits
from shortcut_fast.data.corruptions import (CORRUPTIONS, TYPE0, _motion_blur, _smooth, corrupt, corrupted_dataset,
                                            parse_corruption)
from shortcut_fast.data.loaders import _digits_split, _tinted_digits

NEW = ("snow", "frost", "spatter", "elastic", "jpeg")
DETERMINISTIC = ("gaussian-blur", "contrast", "brightness", "saturate", "pixelate", "jpeg")  # no random draw

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- corruptions

def test_type0_is_lffs_list_and_every_name_is_known():
    assert TYPE0 == ("snow", "frost", "fog", "brightness", "contrast", "spatter", "elastic", "jpeg", "pixelate",
                     "saturate")
    assert set(TYPE0) <= set(CORRUPTIONS) and set(NEW) <= set(CORRUPTIONS)
    assert CORRUPTIONS[:8] == ("gaussian-noise", "shot-noise", "gaussian-blur", "contrast", "brightness", "saturate",
                               "pixelate", "fog")  # the old names keep their place
    assert parse_corruption("snow:5") == ("snow", 5) and parse_corruption("jpeg") == ("jpeg", 3)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_contract(name):
    x = _images((6, 3, 32, 32))
    y = corrupt(x, name, 5, seed=1)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert float((y - x).abs().mean()) > 1e-3  # it does something
    assert torch.equal(corrupt(x, name, 5, seed=1), y)  # deterministic in the seed
    other = corrupt(x, name, 5, seed=2)
    assert torch.equal(other, y) == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", NEW)
def test_new_corruptions_on_odd_shapes(name):
    for shape in ((1, 3, 17, 23), (2, 1, 17, 23), (2, 4, 9, 12), (1, 3, 2, 2), (1, 3, 1, 1), (0, 3, 32, 32)):
        x = _images(shape)
        y = corrupt(x, name, 4, seed=0)
        assert y.shape == x.shape and y.dtype == torch.float32, shape
        assert bool(torch.isfinite(y).all()) and (y.numel() == 0 or 0 <= float(y.min()) <= float(y.max()) <= 1)
    assert not torch.equal(corrupt(_images((1, 3, 17, 23)), name, 5, seed=3), _images((1, 3, 17, 23)))


@pytest.mark.parametrize("name", ["snow", "frost", "spatter", "elastic"])
def test_new_corruptions_follow_value_range(name):
    u = _images((4, 3, 16, 16))
    lo, hi = -1.0, 3.0
    unit = corrupt(u, name, 3, seed=4)
    scaled = corrupt(lo + (hi - lo) * u, name, 3, seed=4, value_range=(lo, hi))
    assert torch.allclose(scaled, lo + (hi - lo) * unit, atol=1e-5)


@pytest.mark.parametrize("name", ["snow", "jpeg", "brightness", "gaussian-noise"])
def test_severity_is_monotone_in_mean_change(name):
    x = _images((32, 3, 32, 32))
    change = [float((corrupt(x, name, s, seed=0) - x).abs().mean()) for s in range(1, 6)]
    assert change == sorted(change) and change[0] < change[-1], change


def test_jpeg_is_a_libjpeg_round_trip_at_hendrycks_quality():
    import io

    from PIL import Image

    q = (_images((3, 3, 32, 32)) * 255).round().to(torch.uint8)
    got = (corrupt(q.float() / 255, "jpeg", 5) * 255).round().to(torch.uint8)
    for i in range(3):  # Pillow, quality 40: Hendrycks' and LfF's own call
        buf = io.BytesIO()
        Image.fromarray(q[i].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=40)
        assert torch.equal(got[i], torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1))
    try:
        from torchvision.io import decode_jpeg, encode_jpeg
    except ImportError:
        return
    with warnings.catch_warnings():  # torchvision.io's codecs are deprecated; they give the same bytes
        warnings.simplefilter("ignore", DeprecationWarning)
        assert torch.equal(got, torch.stack(decode_jpeg(encode_jpeg(list(q), quality=40))))


def test_snow_and_light_frost_only_brighten():
    x = _images((8, 3, 32, 32))
    for name, severities in (("snow", range(1, 6)), ("frost", (1, 2))):  # frost 1-2 keep the image at weight 1
        for s in severities:
            assert bool((corrupt(x, name, s, seed=s) >= x - 1e-6).all()), (name, s)


def test_spatter_water_is_turquoise_and_mud_is_brown():
    black, white = torch.zeros(16, 3, 32, 32), torch.ones(16, 3, 32, 32)
    water = corrupt(black, "spatter", 2, seed=0)
    wet = water.sum(1) > 0
    assert 0.005 < float(wet.float().mean()) < 0.5
    r, g, b = water[:, 0][wet], water[:, 1][wet], water[:, 2][wet]
    assert bool((g > r).all()) and torch.allclose(g, b)  # pale turquoise (175, 238, 238)
    mud = corrupt(white, "spatter", 5, seed=0)
    dirty = (mud < 1).any(1)
    assert 0.001 < float(dirty.float().mean()) < 0.5
    r, g, b = mud[:, 0][dirty], mud[:, 1][dirty], mud[:, 2][dirty]
    assert bool((r >= g).all() and (g >= b).all())  # toward mud brown (63, 42, 20)


def test_elastic_keeps_constant_images_and_warps_the_rest():
    flat = torch.full((4, 3, 17, 23), 0.4)
    for s in range(1, 6):  # reflected borders: no fill color creeps in
        assert torch.allclose(corrupt(flat, "elastic", s, seed=s), flat, atol=1e-6)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(2, 3, 32, 32)
    warped = corrupt(ramp, "elastic", 5, seed=0)
    assert 0 < float((warped - ramp).abs().max()) < 0.2  # sub-pixel-to-few-pixel displacements


def test_motion_blur_matches_a_direct_sum_and_smooth_matches_conv():
    g = torch.Generator().manual_seed(0)
    layer = torch.rand(3, 1, 9, 13, generator=g)
    angle = torch.rand(3, generator=g) * 90 - 135
    out = _motion_blur(layer, 3, 2.0, angle)
    taps = torch.arange(7.0)
    w = torch.exp(-taps ** 2 / 8)
    w = w / w.sum()
    ref = torch.zeros_like(layer)
    for n in range(3):
        rad = torch.deg2rad(angle[n].double())
        for t in range(7):
            ox, oy = int(torch.round(t * torch.cos(rad))), int(torch.round(t * torch.sin(rad)))
            shifted = torch.zeros(9, 13)
            ys, xs = slice(max(0, -oy), min(9, 9 - oy)), slice(max(0, -ox), min(13, 13 - ox))
            shifted[ys, xs] = layer[n, 0, max(0, oy):min(9, 9 + oy), max(0, ox):min(13, 13 + ox)]
            ref[n, 0] += w[t] * shifted
    assert torch.allclose(out, ref, atol=1e-5)

    x = torch.rand(2, 2, 17, 23, generator=g)
    r, sigma = 4, 1.3
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(2, 1, 1, -1), groups=2)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(2, 1, -1, 1), groups=2)
    assert torch.allclose(_smooth(x, sigma), y, atol=1e-5)
    assert _smooth(torch.rand(1, 1, 3, 2), 4.0).shape == (1, 1, 3, 2)  # support wider than the image


def test_corrupted_dataset_accepts_the_new_names():
    ds = ImageDataset((_images((5, 3, 16, 16)) * 255).to(torch.uint8), torch.arange(5) % 2)
    out = corrupted_dataset(ds, "frost:4", seed=0)
    assert out.images.dtype == torch.uint8 and out.name.endswith("frost4")
    with pytest.raises(ValueError, match="unknown corruption 'ice'.*snow.*jpeg"):
        corrupt(ds.images.float(), "ice")
    with pytest.raises(ValueError, match="severity must be an int in 1..5, got 6"):
        corrupt(ds.images.float(), "snow", 6)


def test_against_imagecorruptions_if_installed():
    """Our substitutes are not bit-exact; only compare how strongly each type changes an image."""
    ic = pytest.importorskip("imagecorruptions")
    x = (_images((4, 3, 32, 32)) * 255).to(torch.uint8)
    for name, theirs in (("jpeg", "jpeg_compression"), ("elastic", "elastic_transform"), ("snow", "snow")):
        ours = float((corrupt(x.float() / 255, name, 3) * 255 - x.float()).abs().mean())
        ref = np.mean([np.abs(ic.corrupt(im.permute(1, 2, 0).numpy(), corruption_name=theirs, severity=3)
                              .astype(float) - im.permute(1, 2, 0).numpy()).mean() for im in x])
        assert 0.2 * ref < ours < 5 * ref, (name, ours, ref)


# --------------------------------------------------------------------------- corrupted-digits

@pytest.fixture(scope="module")
def digits():
    return load_dataset("corrupted-digits", seed=0)


def test_corrupted_digits_protocol(digits):
    assert digits.num_attributes == 10 and digits.num_classes == 10 and digits.bias_aligned_attribute
    assert digits.image_shape == (3, 32, 32) and digits.train.images.dtype == torch.uint8
    for ds in (digits.train, digits.val, digits.test):
        assert 0 <= int(ds.attributes.min()) and int(ds.attributes.max()) <= 9
    tr = digits.train
    for c in range(10):  # exactly round(0.05 * n_c) conflicting per class, as in colored-digits
        n_c = int((tr.labels == c).sum())
        assert int(((tr.labels == c) & (tr.attributes != c)).sum()) == int(np.floor(0.05 * n_c + 0.5))
    assert abs(float((tr.attributes != tr.labels).float().mean()) - 0.05) < 0.01
    assert abs(float((digits.val.attributes == digits.val.labels).float().mean()) - 0.95) < 0.03
    te = digits.test
    assert abs(float((te.attributes == te.labels).float().mean()) - 0.1) < 0.04
    assert len(set(te.attributes.tolist())) == 10
    aligned, conflicting = digits.extra["aligned"], digits.extra["conflicting"]
    assert (aligned.attributes == aligned.labels).all() and (conflicting.attributes != conflicting.labels).all()
    assert len(aligned) + len(conflicting) == len(te)
    meta = digits.meta
    assert meta["corruptions"] == list(TYPE0) and meta["severity"] == 5 and "substitute" in meta["corruption_source"]
    assert meta["options"]["severity"] == 5 and meta["options"]["conflict_ratio"] == 0.05
    assert json.loads(json.dumps(digits.identity())) == digits.identity()


def test_corrupted_digits_every_type_changes_the_clean_images(digits):
    gray, labels = _digits_split(32, 0.1, 0.3, 0)
    clean = _tinted_digits(gray["test"])
    assert torch.equal(labels["test"], digits.test.labels)  # same split as the plain digits
    te = digits.test
    changed = (te.images.float() - clean.float()).abs().mean((1, 2, 3))
    for k, name in enumerate(TYPE0):
        rows = te.attributes == k
        assert float((changed[rows] > 0.5).float().mean()) > 0.9, name


def test_corrupted_digits_unbiased_val_and_determinism():
    kw = dict(image_size=16, test_fraction=0.2)
    a = load_dataset("corrupted-digits", seed=0, **kw)
    b = load_dataset("corrupted-digits", seed=0, **kw)
    assert a.identity() == b.identity()
    unbiased = load_dataset("corrupted-digits", seed=0, unbiased_val=True, **kw)
    assert torch.equal(unbiased.train.images, a.train.images) and torch.equal(unbiased.test.images, a.test.images)
    assert abs(float((unbiased.val.attributes == unbiased.val.labels).float().mean()) - 0.1) < 0.08
    assert float((a.val.attributes == a.val.labels).float().mean()) > 0.9
    other = load_dataset("corrupted-digits", seed=1, **kw)
    assert not torch.equal(other.test.attributes, a.test.attributes)


def test_types_give_different_images_and_splits_are_independent():
    base = (_images((1, 3, 16, 16)) * 255).to(torch.uint8)
    n = 200
    labels = {s: torch.arange(n) % 10 for s in ("train", "val", "test")}
    images = {s: base.expand(n, -1, -1, -1).clone() for s in labels}
    s = make_corrupted_splits("t", images, labels, conflict_ratio=0.5, severity=5, seed=0)
    means = torch.stack([s.test.images[s.test.attributes == k].float().mean(0) for k in range(10)])
    gap = (means[:, None] - means[None]).abs().mean((2, 3, 4)) + torch.eye(10) * 1e9
    assert float(gap.min()) > 0.5  # every pair of types leaves a different average image
    # a split's images depend only on its own images, labels and the seed
    images2 = dict(images, train=(_images((n, 3, 16, 16), 7) * 255).to(torch.uint8))
    s2 = make_corrupted_splits("t", images2, labels, conflict_ratio=0.5, severity=5, seed=0)
    assert torch.equal(s2.test.images, s.test.images) and torch.equal(s2.val.images, s.val.images)
    assert not torch.equal(make_corrupted_splits("t", images, labels, conflict_ratio=0.5, severity=5,
                                                 seed=1).test.images, s.test.images)
    with pytest.raises(ValueError, match=r"images\['train'\] must be uint8"):
        make_corrupted_splits("t", dict(images, train=images["train"].float()), labels, conflict_ratio=0.5,
                              severity=5, seed=0)


@pytest.mark.parametrize("dataset", ["corrupted-digits", "corrupted-cifar10"])
def test_bad_options_name_the_argument(dataset, tmp_path):
    for value in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"conflict_ratio must be a number in \\(0, 1\\], got {value}"):
            load_dataset(dataset, root=tmp_path, conflict_ratio=value)
    with pytest.raises(ValueError, match="severity must be an int >= 1, got 0"):
        load_dataset(dataset, root=tmp_path, severity=0)
    with pytest.raises(ValueError, match="severity must be an int in 1..5, got 6"):
        load_dataset(dataset, root=tmp_path, severity=6)
    with pytest.raises(TypeError, match="option 'severity' of dataset '.*' must be int, got float 2.5"):
        load_dataset(dataset, root=tmp_path, severity=2.5)


# --------------------------------------------------------------------------- corrupted-cifar10

def test_corrupted_cifar10_on_fake_batches(tmp_path):
    from test_data import _write_cifar

    batches = _write_cifar(tmp_path)
    s = load_dataset("corrupted-cifar10", root=tmp_path, val_size=10, conflict_ratio=0.2, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert s.name == "corrupted-cifar10" and s.image_shape == (3, 32, 32) and s.num_attributes == 10
    assert s.train.images.dtype == torch.uint8
    data, labels = batches["test_batch"]
    raw = torch.from_numpy(data).reshape(20, 3, 32, 32)
    assert s.test.labels.tolist() == labels and not torch.equal(s.test.images, raw)
    assert ((s.test.images.float() - raw.float()).abs().mean((1, 2, 3)) > 0.5).all()
    assert int((s.train.attributes != s.train.labels).sum()) == 20  # round(0.2 * 9) = 2 per class
    assert s.meta["options"] == {"conflict_ratio": 0.2, "severity": 5, "val_size": 10, "unbiased_val": False}
    again = load_dataset("corrupted-cifar10", root=tmp_path, val_size=10, conflict_ratio=0.2, seed=0)
    assert again.identity() == s.identity()
    default = load_dataset("corrupted-cifar10", root=tmp_path, val_size=10, severity=1)
    assert (default.train.attributes == default.train.labels).all()  # 0.01 * 9 rounds to no conflicting sample


def test_corrupted_cifar10_missing_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_dataset("corrupted-cifar10", root=tmp_path / "nowhere")
    text = str(excinfo.value)
    assert "'corrupted-cifar10'" in text and "cifar-10-batches-py/data_batch_1" in text
    assert "cifar-10-batches-py/test_batch" in text and str(tmp_path / "nowhere") in text
    monkeypatch.delenv("SHORTCUT_FAST_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="no folder given"):
        load_dataset("corrupted-cifar10")


@pytest.mark.gpu
def test_new_corruptions_on_cuda_match_cpu():
    x = _images((4, 3, 32, 32))
    for name in NEW:
        on_gpu = corrupt(x.cuda(), name, 5, seed=0)
        assert on_gpu.is_cuda
        assert (on_gpu.cpu() - corrupt(x, name, 5, seed=0)).abs().max() < 1e-4, name
