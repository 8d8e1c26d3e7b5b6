"""Tests of shortcut_fast.data: containers, generators, loaders (on fake files) and shortcut injection."""
from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch

from shortcut_fast.ops.freq import radial_band_index
from shortcut_fast.data import (LFF_COLORS, DataFormatError, DatasetNotFoundError, DatasetSplits, FileImageDataset,
                                ImageDataset,
                                assign_bias_attributes, colorize, dataset_options, default_data_root,
                                inject_shortcut, list_datasets, load_dataset, read_idx,
                                stratified_split)
from shortcut_fast.data.core import make_generator

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def colored():
    return load_dataset("colored-digits", seed=0)


def _image_bytes(ds):
    return sorted(bytes(x.numpy().tobytes()) for x in ds.images)


# --------------------------------------------------------------------------- registry

def test_list_datasets_names():
    names = list_datasets()
    assert set(names) == {"synthetic-freq", "digits", "colored-digits", "cifar10", "colored-mnist",
                          "mnist-5k", "colored-mnist-5k", "corrupted-digits", "corrupted-cifar10", "waterbirds",
                          "celeba", "imagefolder:PATH", "csv:FILE"}
    assert all(isinstance(d, str) and d for d in names.values())


def test_unknown_dataset_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist-c'.*colored-mnist.*celeba"):
        load_dataset("mnist-c")


def test_unknown_option_names_valid_options():
    with pytest.raises(TypeError, match="bogus.*valid options:.*conflict_ratio.*shortcut"):
        load_dataset("colored-digits", bogus=1)
    with pytest.raises(ValueError, match="rho and shortcut_strength"):
        load_dataset("digits", rho=0.5)
    assert dataset_options("colored_mnist")["conflict_ratio"] == 0.01  # "_" accepted for "-"


def test_bad_option_values_name_the_argument():
    with pytest.raises(ValueError, match="conflict_ratio"):
        load_dataset("colored-digits", conflict_ratio=0.0)
    with pytest.raises(ValueError, match="bias_band"):
        load_dataset("synthetic-freq", bias_band=5)
    with pytest.raises(ValueError, match="channels"):
        load_dataset("synthetic-freq", channels=2)
    with pytest.raises(TypeError, match="option 'n_train' of dataset 'synthetic-freq' must be int, got str"):
        load_dataset("synthetic-freq", n_train="100")


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SHORTCUT_FAST_DATA", raising=False)
    assert default_data_root() is None
    monkeypatch.setenv("SHORTCUT_FAST_DATA", str(tmp_path))
    assert default_data_root() == tmp_path


# --------------------------------------------------------------------------- ImageDataset

def test_image_dataset_contract():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 5, 4), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    a = torch.tensor([0, 1, -1, 1, 0, 1])
    ds = ImageDataset(x, y, a, num_classes=3, num_attributes=2, name="t")
    img, label, attr = ds[4]
    assert img.dtype == torch.float32 and img.shape == (3, 5, 4)
    assert torch.equal(img, x[4].float() / 255) and (label, attr) == (1, 0)
    assert isinstance(label, int) and isinstance(attr, int)
    assert ds.image_shape == (3, 5, 4) and ds.num_groups == 6
    assert ds.groups.tolist() == [0, 3, -1, 1, 2, 5]
    assert ds.group_counts() == [1, 1, 1, 1, 0, 1]
    xb, yb, ab = ds.get_batch(torch.tensor([5, 0]), device="cpu")
    assert xb.dtype == torch.float32 and torch.equal(xb, x[[5, 0]].float() / 255)
    assert yb.tolist() == [2, 0] and ab.tolist() == [1, 0]
    sub = ds.subset(y == 1)
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1] and sub.num_groups == 6
    assert torch.equal(sub.images, x[[1, 4]])
    assert ds.to("cpu").images.device.type == "cpu"

    f = ImageDataset(torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.tensor([0, 1]))
    assert f.images.dtype == torch.float32 and f.num_classes == 2 and f.groups.tolist() == [-1, -1]
    assert f.num_groups == 0 and f.group_counts() is None


def test_image_dataset_rejects_bad_input():
    with pytest.raises(ValueError, match=r"images must have shape \(N,C,H,W\)"):
        ImageDataset(torch.zeros(2, 3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must have shape"):
        ImageDataset(torch.zeros(2, 1, 3, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ImageDataset(torch.zeros(2, 1, 3, 3), torch.tensor([0, 2]), num_classes=2)
    with pytest.raises(ValueError, match="attributes must lie"):
        ImageDataset(torch.zeros(2, 1, 3, 3), torch.tensor([0, 1]), torch.tensor([0, 2]), num_attributes=2)
    with pytest.raises(TypeError, match="uint8 or floating"):
        ImageDataset(torch.zeros(2, 1, 3, 3, dtype=torch.int32), torch.tensor([0, 1]))


def test_stratified_split_partitions_and_stratifies():
    labels = torch.arange(103) % 4
    test, val, train = stratified_split(labels, [30, 10], make_generator(0))
    assert (len(test), len(val), len(train)) == (30, 10, 63)
    assert torch.equal(torch.sort(torch.cat([test, val, train])).values, torch.arange(103))
    for part, size in ((test, 30), (val, 10)):
        counts = torch.bincount(labels[part], minlength=4).float()
        expected = torch.bincount(labels).float() * size / 103
        assert (counts - expected).abs().max() <= 1
    again = stratified_split(labels, [30, 10], make_generator(0))
    other = stratified_split(labels, [30, 10], make_generator(1))
    assert torch.equal(again[0], test) and not torch.equal(other[0], test)


# --------------------------------------------------------------------------- synthetic-freq

def test_circular_shift_matches_roll():
    from shortcut_fast.data.synthetic import _circular_shift

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 6, 7, generator=g)
    dy, dx = torch.randint(0, 6, (5,), generator=g), torch.randint(0, 7, (5,), generator=g)
    expected = torch.stack([torch.roll(x[i], (int(dy[i]), int(dx[i])), (1, 2)) for i in range(5)])
    assert torch.equal(_circular_shift(x, dy, dx), expected)


def test_synthetic_freq_shapes_and_determinism():
    kw = dict(n_train=64, n_val=16, n_test=32, num_classes=3, channels=1, image_size=16)
    a = load_dataset("synthetic-freq", seed=1, **kw)
    b = load_dataset("synthetic-freq", seed=1, **kw)
    c = load_dataset("synthetic-freq", seed=2, **kw)
    assert (len(a.train), len(a.val), len(a.test)) == (64, 16, 32)
    assert a.train.images.shape == (64, 1, 16, 16) and a.train.images.dtype == torch.float32
    assert a.image_shape == (1, 16, 16) and a.num_classes == 3 and a.num_attributes == 0
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.allclose(a.train.images, c.train.images)
    assert (a.train.attributes == -1).all() and (a.train.groups == -1).all()
    assert abs(float(a.train.images.mean())) < 1e-4 and abs(float(a.train.images.std()) - 1) < 1e-3
    assert a.meta["band_edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert torch.bincount(a.train.labels).tolist() == [22, 21, 21]
    json.dumps(a.meta)


def _band_accuracy(splits, band_id):
    """Nearest class mean on the standardized |FFT| of one band (channel-averaged)."""
    H = splits.image_shape[1]
    band = radial_band_index(H, H) == band_id

    def feats(ds):
        return torch.fft.fft2(ds.images).abs().mean(1)[:, band]

    ftr, fte = feats(splits.train), feats(splits.test)
    mean, std = ftr.mean(0), ftr.std(0)
    ftr, fte = (ftr - mean) / std, (fte - mean) / std
    centers = torch.stack([ftr[splits.train.labels == c].mean(0) for c in range(splits.num_classes)])
    pred = torch.cdist(fte, centers).argmin(1)
    return float((pred == splits.test.labels).float().mean())


@pytest.mark.parametrize("bias_band", [1, 4])
def test_synthetic_freq_bias_band_is_most_distinctive(bias_band):
    s = load_dataset("synthetic-freq", seed=0, bias_band=bias_band, n_train=400, n_val=10, n_test=400)
    acc = [_band_accuracy(s, b) for b in range(4)]
    k = bias_band - 1
    others = [v for i, v in enumerate(acc) if i != k]
    assert acc[k] > 0.9, acc
    assert acc[k] > max(others) + 0.2, acc
    assert min(others) > 0.3, acc  # the other bands are weaker but still informative (chance 0.25)


# --------------------------------------------------------------------------- digits and colored digits

def test_digits_split(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1078, 180, 539)
    assert digits.train.images.dtype == torch.uint8 and digits.image_shape == (3, 32, 32)
    x = digits.train.images
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray replicated
    assert (digits.test.attributes == -1).all() and digits.num_attributes == 0
    counts = torch.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 50 and counts.max() <= 56  # stratified
    # The three splits partition the 1797 images: same multiset of images as the whole set.
    from shortcut_fast.data.loaders import load_digits_gray
    full, _ = load_digits_gray(32)
    union = sorted(bytes(g.numpy().tobytes()) for ds in (digits.train, digits.val, digits.test)
                   for g in ds.images[:, 0])
    assert union == sorted(bytes(g.numpy().tobytes()) for g in full)


def test_digits_determinism(digits):
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.train.labels, digits.train.labels)
    assert _image_bytes(other.test) != _image_bytes(digits.test)


def test_colored_digits_protocol(colored):
    tr = colored.train
    assert colored.num_attributes == 10 and colored.bias_aligned_attribute and tr.num_groups == 100
    aligned = (tr.attributes == tr.labels).float().mean()
    assert abs(float(aligned) - 0.95) < 0.01
    for c in range(10):  # exactly round(r * n_c) conflicting per class, spread over other colors
        sel = tr.labels == c
        n_c = int(sel.sum())
        conflicting = tr.attributes[sel & (tr.attributes != c)]
        assert len(conflicting) == int(np.floor(0.05 * n_c + 0.5))
        assert torch.bincount(conflicting, minlength=10).max() <= 1
    te = colored.test
    assert abs(float((te.attributes == te.labels).float().mean()) - 0.1) < 0.04
    assert (colored.extra["aligned"].attributes == colored.extra["aligned"].labels).all()
    assert (colored.extra["conflicting"].attributes != colored.extra["conflicting"].labels).all()
    assert len(colored.extra["aligned"]) + len(colored.extra["conflicting"]) == len(te)
    assert abs(colored.meta["splits"]["train"]["aligned_fraction"] - float(aligned)) < 1e-6


def test_colored_digits_color_encodes_attribute(colored):
    for ds in (colored.train, colored.test):
        direction = ds.images.float().sum((2, 3))
        direction = direction / direction.norm(dim=1, keepdim=True)
        palette = LFF_COLORS / LFF_COLORS.norm(dim=1, keepdim=True)
        nearest = (direction @ palette.T).argmax(1)
        assert torch.equal(nearest, ds.attributes)


def test_colored_digits_determinism(colored):
    again = load_dataset("colored-digits", seed=0)
    other = load_dataset("colored-digits", seed=3)
    assert torch.equal(again.train.images, colored.train.images)
    assert torch.equal(again.train.attributes, colored.train.attributes)
    assert not torch.equal(other.train.attributes, colored.train.attributes)


def test_colorize_and_assign():
    gray = torch.full((4, 2, 2), 255, dtype=torch.uint8)
    out = colorize(gray, torch.tensor([0, 4, 9, 4]), color_std=0.0)
    assert out.shape == (4, 3, 2, 2) and out.dtype == torch.uint8
    assert torch.equal(out[:, :, 0, 0], (LFF_COLORS[[0, 4, 9, 4]] * 255).round().to(torch.uint8))
    noisy = colorize(gray, torch.tensor([0, 4, 9, 4]), color_std=0.1, generator=make_generator(0))
    assert not torch.equal(noisy, out) and (noisy.float() - out.float()).abs().max() < 0.6 * 255
    assert torch.equal(colorize(torch.zeros(1, 3, 3, dtype=torch.uint8), torch.tensor([2])),
                       torch.zeros(1, 3, 3, 3, dtype=torch.uint8))
    labels = torch.arange(200) % 10
    a = assign_bias_attributes(labels, 1.0, 10, make_generator(0))
    assert (a != labels).all()
    counts = torch.bincount(a[labels == 3], minlength=10)  # 20 conflicting over the 9 other colors
    others = counts[torch.arange(10) != 3]
    assert counts[3] == 0 and others.sum() == 20 and others.max() - others.min() <= 1
    with pytest.raises(ValueError, match="conflict_ratio"):
        assign_bias_attributes(labels, 1.5, 10, make_generator(0))


# --------------------------------------------------------------------------- shortcut injection

def test_shortcut_patch_protocol(digits):
    rho = 0.7
    s = inject_shortcut(digits, "patch", rho=rho, seed=5)
    C = 10
    assert s.num_attributes == C + 1 and s.bias_aligned_attribute
    assert set(s.extra) == {"clean", "aligned", "conflicting"}
    meta = s.meta["shortcut"]
    size, pos = meta["patch_size"], meta["positions"]
    assert size == 4 and len({tuple(p) for p in pos}) == C

    def region(c):
        m = torch.zeros(32, 32, dtype=torch.bool)
        m[pos[c][0]:pos[c][0] + size, pos[c][1]:pos[c][1] + size] = True
        return m

    tr, base = s.train, digits.train
    assert torch.equal(tr.labels, base.labels)
    assert set(tr.attributes.unique().tolist()) <= set(range(C + 1))
    carries = tr.attributes == tr.labels
    assert ((tr.attributes == C) | carries).all()
    for c in range(C):
        n_c = int((tr.labels == c).sum())
        assert int((carries & (tr.labels == c)).sum()) == int(np.floor(rho * n_c + 0.5))
    clean_rows = tr.attributes == C
    assert torch.equal(tr.images[clean_rows], base.images[clean_rows])

    test = digits.test
    assert torch.equal(s.test.images, test.images) and (s.test.attributes == C).all()
    for key in ("aligned", "conflicting"):
        ds = s.extra[key]
        assert torch.equal(ds.labels, test.labels)
        if key == "aligned":
            assert torch.equal(ds.attributes, ds.labels)
        else:
            assert (ds.attributes != ds.labels).all() and (ds.attributes < C).all()
        for c in range(C):
            rows = ds.attributes == c
            diff = (ds.images[rows] != test.images[rows]).any(1)  # (n, H, W)
            assert not diff[:, ~region(c)].any()  # nothing changed outside the planted patch
            color = torch.tensor(meta["colors"][c]) * 255
            planted = ds.images[rows][:, :, region(c)].float()
            assert (planted - color.round()[None, :, None]).abs().max() <= 0.5
    # conflicting shortcuts are spread over the other classes
    assert len(s.extra["conflicting"].attributes.unique()) == C


def test_shortcut_freq_adds_a_single_frequency():
    base = load_dataset("synthetic-freq", seed=0, n_train=40, n_val=8, n_test=40)
    before = base.test.images.clone(), base.train.images.clone()
    s = inject_shortcut(base, "freq", rho=0.5, seed=1, strength=0.2)
    assert torch.equal(base.test.images, before[0]) and torch.equal(base.train.images, before[1])  # no mutation
    freqs = s.meta["shortcut"]["frequencies"]
    assert len({tuple(f) for f in freqs}) == 4
    for key in ("aligned", "conflicting"):
        ds = s.extra[key]
        diff = ds.images - base.test.images  # float images: no clamping
        spec = torch.fft.fft2(diff.double()).abs() ** 2
        for c in range(4):
            rows = ds.attributes == c
            if not rows.any():
                continue
            u, v = freqs[c]
            keep = torch.zeros(32, 32, dtype=torch.bool)
            keep[u, v] = keep[(-u) % 32, (-v) % 32] = True
            energy = spec[rows]
            assert float(energy[..., keep].sum() / energy.sum()) > 0.999
            assert torch.allclose(diff[rows][:, 0], diff[rows][:, 1], atol=1e-5)  # same grating on every channel
    assert torch.equal(s.extra["clean"].images, base.test.images)
    tr = s.train
    assert torch.equal(tr.images[tr.attributes == 4], base.train.images[tr.attributes == 4])
    assert not torch.equal(tr.images[tr.attributes < 4], base.train.images[tr.attributes < 4])


def test_shortcut_tint_and_load_dataset_option(digits):
    s = load_dataset("digits", seed=0, shortcut="tint", rho=1.0, shortcut_strength=0.2)
    assert (s.train.attributes == s.train.labels).all()  # rho = 1: every training image is tinted
    assert s.meta["options"]["shortcut"] == "tint" and s.meta["shortcut"]["strength"] == 0.2
    colors = torch.tensor(s.meta["shortcut"]["colors"])
    delta = s.extra["aligned"].images.float() - digits.test.images.float()
    expected = (0.2 * 255 * (2 * colors - 1))[s.extra["aligned"].labels][:, :, None, None]
    clamped = (digits.test.images.float() + expected).clamp(0, 255) - digits.test.images.float()
    assert (delta - clamped).abs().max() <= 0.5
    json.dumps(s.meta)
    again = load_dataset("digits", seed=0, shortcut="tint", rho=1.0, shortcut_strength=0.2)
    assert torch.equal(again.extra["conflicting"].images, s.extra["conflicting"].images)


def test_shortcut_bad_input(digits, tmp_path):
    with pytest.raises(ValueError, match="kind must be one of patch, tint, freq"):
        inject_shortcut(digits, "stripe")
    with pytest.raises(ValueError, match="rho"):
        inject_shortcut(digits, "patch", rho=1.5)
    with pytest.raises(ValueError, match="strength"):
        inject_shortcut(digits, "patch", strength=2.0)
    wb = load_dataset("waterbirds", root=_fake_waterbirds(tmp_path), image_size=8)
    with pytest.raises(TypeError, match="FileImageDataset.*load_into_memory"):
        inject_shortcut(wb, "patch")


# --------------------------------------------------------------------------- missing files

@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "data_batch_5", "test_batch"]),
    ("colored-mnist", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte"]),
    ("waterbirds", ["metadata.csv"]),
    ("celeba", ["img_align_celeba", "list_attr_celeba", "list_eval_partition"]),
])
def test_missing_files_error(name, expected, tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and all(e in msg for e in expected), msg
    assert isinstance(info.value, FileNotFoundError)
    monkeypatch.delenv("SHORTCUT_FAST_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="SHORTCUT_FAST_DATA"):
        load_dataset(name)


# --------------------------------------------------------------------------- fake on-disk datasets

def _write_cifar(root, n_per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(n_per_batch) % 10)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f)
        batches[name] = (data, labels)
    return batches


def test_cifar10_fake_batches(tmp_path, monkeypatch):
    batches = _write_cifar(tmp_path)
    s = load_dataset("cifar10", root=tmp_path, val_size=10, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert s.train.images.dtype == torch.uint8 and s.image_shape == (3, 32, 32)
    data, labels = batches["test_batch"]
    assert torch.equal(s.test.images, torch.from_numpy(data).reshape(20, 3, 32, 32))
    assert s.test.labels.tolist() == labels
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [1] * 10  # stratified hold-out
    train_rows = torch.from_numpy(np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]))
    union = sorted(bytes(r.numpy().tobytes()) for r in torch.cat([s.train.images, s.val.images]).reshape(100, -1))
    assert union == sorted(bytes(r.numpy().tobytes()) for r in train_rows)
    monkeypatch.setenv("SHORTCUT_FAST_DATA", str(tmp_path))  # the default root
    again = load_dataset("cifar10", val_size=10, seed=0)
    assert torch.equal(again.val.images, s.val.images)
    assert not torch.equal(load_dataset("cifar10", root=tmp_path, val_size=10, seed=1).val.images, s.val.images)
    patched = load_dataset("cifar10", root=tmp_path, val_size=10, shortcut="patch")
    assert patched.num_attributes == 11
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("cifar10", root=tmp_path, val_size=100)


def _write_idx(path, arr, gz=False):
    codes = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def test_read_idx_formats(tmp_path):
    a = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3", a, gz=True)
    out = read_idx(tmp_path / "a-idx3.gz")
    assert out.dtype == np.int32 and out.dtype.isnative and np.array_equal(out, a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")


def test_colored_mnist_fake_idx(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (400, 28, 28), dtype=np.uint8)
    ytr = (np.arange(400) % 10).astype(np.uint8)
    xte = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    yte = rng.permutation(np.arange(100) % 10).astype(np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", xtr, gz=True)  # .gz and plain files mixed
    _write_idx(raw / "train-labels-idx1-ubyte", ytr)
    _write_idx(raw / "t10k-images-idx3-ubyte", xte)
    _write_idx(raw / "t10k-labels-idx1-ubyte", yte, gz=True)
    s = load_dataset("colored-mnist", root=tmp_path, val_size=50, conflict_ratio=0.1, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (350, 50, 100)
    assert s.train.images.shape == (350, 3, 28, 28) and s.train.images.dtype == torch.uint8
    assert s.num_attributes == 10 and s.bias_aligned_attribute
    assert abs(float((s.train.attributes == s.train.labels).float().mean()) - 0.9) < 0.02
    assert s.test.labels.tolist() == yte.tolist()
    # every test pixel is round(color * gray) for the image's color
    color = LFF_COLORS[s.test.attributes][:, :, None, None]
    recon = torch.from_numpy(xte)[:, None].float() * color
    assert (s.test.images.float() - recon).abs().max() <= 255 * 0.005 * 6 + 0.5
    same = load_dataset("colored-mnist", root=tmp_path, val_size=50, conflict_ratio=0.1, seed=0)
    assert torch.equal(same.train.images, s.train.images)


def _fake_waterbirds(root):
    folder = root / "waterbird_complete95_forest2water2"
    (folder / "001.Bird").mkdir(parents=True)
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    spec = [(0, 0, 0), (0, 0, 1), (1, 0, 1), (1, 0, 0), (0, 1, 0), (1, 1, 1), (0, 2, 1), (1, 2, 0)]
    for i, (y, split, place) in enumerate(spec):
        color = (10 * i, 255 - 20 * i, 100 + y * 50)
        Image.new("RGB", (40, 30), color).save(folder / "001.Bird" / f"img_{i}.png")
        rows.append(f"{i + 1},001.Bird/img_{i}.png,{y},{split},{place},/b/bamboo/x.jpg")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_waterbirds_fake_files(tmp_path):
    s = load_dataset("waterbirds", root=_fake_waterbirds(tmp_path), image_size=16)
    assert isinstance(s.train, FileImageDataset) and s.bias_aligned_attribute
    assert (len(s.train), len(s.val), len(s.test)) == (4, 2, 2) and s.image_shape == (3, 16, 16)
    assert s.train.labels.tolist() == [0, 0, 1, 1] and s.train.attributes.tolist() == [0, 1, 1, 0]
    assert s.train.groups.tolist() == [0, 1, 3, 2] and s.train.num_groups == 4
    x, y, a = s.val[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and (y, a) == (1, 1)
    assert torch.allclose(x, torch.tensor([50, 155, 150.0])[:, None, None] / 255, atol=1e-6)
    assert not s.test.in_memory  # the trainer reads file datasets through a DataLoader
    xg, yg, ag = s.val.get_batch(torch.tensor([1, 0]), device="cpu")  # the same contract as ImageDataset
    assert xg.dtype == torch.float32 and xg.shape == (2, 3, 16, 16) and torch.equal(xg[0], x)
    assert torch.equal(xg[1], s.val[0][0]) and yg.tolist() == [1, 0] and ag.tolist() == [1, 0]
    assert yg.dtype == ag.dtype == torch.int64
    assert s.val.get_batch(torch.tensor([True, False]))[0].shape == (1, 3, 16, 16)
    with pytest.raises(IndexError, match="out of range for 2 images"):
        s.val.get_batch([2])
    xb, yb, ab = next(iter(torch.utils.data.DataLoader(s.test, batch_size=2)))
    assert xb.shape == (2, 3, 16, 16) and yb.tolist() == [0, 1] and ab.tolist() == [1, 0]
    mem = load_dataset("waterbirds", root=tmp_path / "waterbird_complete95_forest2water2", image_size=16,
                       in_memory=True)  # the folder itself is accepted as root
    assert isinstance(mem.train, ImageDataset) and torch.equal(mem.val.get_batch([1])[0][0], x)
    assert mem.train.in_memory
    for split in ("train", "val", "test"):  # file-backed get_batch == in-memory get_batch
        file_ds, mem_ds = getattr(s, split), getattr(mem, split)
        idx = torch.arange(len(file_ds)).flip(0)
        for got, want in zip(file_ds.get_batch(idx), mem_ds.get_batch(idx)):
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert s.meta["splits"]["train"]["group_counts"] == [1, 1, 1, 1]
    sub = s.train.subset(torch.tensor([3, 0]))
    assert isinstance(sub, FileImageDataset) and sub.groups.tolist() == [2, 0]
    assert torch.equal(sub[0][0], s.train[3][0])


CELEBA_NAMES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
                "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair"] + [f"Attr_{i}" for i in range(10, 20)] + \
               ["Male"] + [f"Attr_{i}" for i in range(21, 40)]


def _fake_celeba(root, csv=False):
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    values = rng.choice([-1, 1], size=(9, 40))
    files = [f"{i + 1:06d}.jpg" for i in range(9)]
    for i, f in enumerate(files):
        Image.new("RGB", (178, 218), (20 * i, 100, 200)).save(folder / "img_align_celeba" / f, quality=95)
    parts = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    if csv:
        lines = ["image_id," + ",".join(CELEBA_NAMES)] + [f + "," + ",".join(map(str, v)) for f, v in zip(files, values)]
        (folder / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
        (folder / "list_eval_partition.csv").write_text(
            "image_id,partition\n" + "".join(f"{f},{p}\n" for f, p in zip(files, parts)))
    else:
        lines = [str(len(files)), " ".join(CELEBA_NAMES) + " "] + \
            [f + " " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, values)]
        (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (folder / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, parts)))
    return values, parts


@pytest.mark.parametrize("csv", [False, True])
def test_celeba_fake_files(tmp_path, csv):
    values, parts = _fake_celeba(tmp_path, csv=csv)
    s = load_dataset("celeba", root=tmp_path, image_size=12)
    parts = np.array(parts)
    blond, male = (values[:, 9] > 0).astype(int), (values[:, 20] > 0).astype(int)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 2, 3)
    assert s.train.labels.tolist() == blond[parts == 0].tolist()
    assert s.test.attributes.tolist() == male[parts == 2].tolist()
    assert not s.bias_aligned_attribute and s.num_groups == 4
    x, _, _ = s.test[0]
    assert x.shape == (3, 12, 12) and torch.allclose(x, torch.tensor([120, 100, 200.0])[:, None, None] / 255,
                                                     atol=3 / 255)
    other = load_dataset("celeba", root=tmp_path / "celeba", target_attribute="Bald", bias_attribute="Bangs")
    assert other.train.labels.tolist() == (values[parts == 0, 4] > 0).astype(int).tolist()
    assert other.image_shape == (3, 64, 64)
    with pytest.raises(ValueError, match="target_attribute must be one of the CelebA attributes.*Male"):
        load_dataset("celeba", root=tmp_path, target_attribute="Blue_Hair")


# --------------------------------------------------------------------------- malformed files

def _error_text(excinfo):
    return str(excinfo.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_dict", "no_data", "bad_shape", "bad_labels"])
def test_cifar10_corrupt_batch_names_the_file(tmp_path, damage):
    _write_cifar(tmp_path, n_per_batch=10)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    payload = {
        "truncated": raw[: len(raw) // 2],
        "garbage": b"\x80\x04this is not a pickle at all" * 10,
        "not_a_dict": pickle.dumps([1, 2, 3]),
        "no_data": pickle.dumps({b"labels": [0] * 10}),
        "bad_shape": pickle.dumps({b"labels": [0] * 10, b"data": np.zeros((10, 100), np.uint8)}),
        "bad_labels": pickle.dumps({b"labels": [0] * 9 + [10], b"data": np.zeros((10, 3072), np.uint8)}),
    }[damage]
    path.write_bytes(payload)
    with pytest.raises(DataFormatError) as excinfo:
        load_dataset("cifar10", root=tmp_path, val_size=10)
    assert str(path) in _error_text(excinfo) and excinfo.value.path == path
    assert "Traceback" not in _error_text(excinfo)


def _edit_line(path, line, edit):
    lines = path.read_text().splitlines()
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")


def _set_field(index, value, sep=","):
    def edit(text):
        fields = text.split(None if sep == " " else sep)
        fields[index] = value
        return sep.join(fields)
    return edit


# metadata.csv columns: img_id,img_filename,y,split,place,place_filename; data row i is on line i + 2
@pytest.mark.parametrize("line, edit, column, problem", [
    (4, lambda t: ",".join(t.split(",")[:4]), "place", "the column is missing"),
    (3, _set_field(2, "bird"), "y", "expected an integer"),
    (5, _set_field(3, "1.5"), "split", "expected an integer"),
    (9, _set_field(4, ""), "place", "expected an integer"),
    (6, _set_field(2, "2"), "y", "expected a value in (0, 1)"),
    (7, _set_field(3, "-1"), "split", "expected a value in (0, 1, 2)"),
    (8, lambda t: t + ",extra", None, "expected 6 fields"),
    (2, _set_field(1, ""), "img_filename", "empty image file name"),
    (1, lambda t: t.replace("place,", "where,"), None, "lacks the column(s) place"),
])
def test_waterbirds_malformed_row_names_file_line_and_column(tmp_path, line, edit, column, problem):
    root = _fake_waterbirds(tmp_path)
    table = root / "waterbird_complete95_forest2water2" / "metadata.csv"
    _edit_line(table, line, edit)
    with pytest.raises(DataFormatError) as excinfo:
        load_dataset("waterbirds", root=root, image_size=8)
    err = excinfo.value
    assert (err.path, err.line, err.column) == (table, line, column)
    expected = f"{table}, line {line}" + (f", column {column!r}" if column else "") + ": "
    assert _error_text(excinfo).startswith(expected) and problem in _error_text(excinfo)


def test_waterbirds_empty_table(tmp_path):
    root = _fake_waterbirds(tmp_path)
    table = root / "waterbird_complete95_forest2water2" / "metadata.csv"
    table.write_text(table.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataFormatError, match="no data rows"):
        load_dataset("waterbirds", root=root)
    table.write_text("")
    with pytest.raises(DataFormatError, match="empty file"):
        load_dataset("waterbirds", root=root)


# list_attr_celeba.txt: line 1 the count, line 2 the names, data row i on line i + 3;
# Blond_Hair is field 10 of a row, Male field 21 (the image name is field 0)
@pytest.mark.parametrize("line, edit, column, problem", [
    (5, lambda t: " ".join(t.split()[:15]), "Attr_14", "the column is missing"),
    (4, _set_field(10, "yes", sep=" "), "Blond_Hair", "expected an integer"),
    (11, _set_field(21, "2", sep=" "), "Male", "expected a value in (-1, 0, 1)"),
    (1, lambda t: "12", None, "declares 12 images but the table has 9 rows"),
    (1, lambda t: "many", None, "number of images"),
])
def test_celeba_malformed_attribute_row(tmp_path, line, edit, column, problem):
    _fake_celeba(tmp_path)
    table = tmp_path / "celeba" / "list_attr_celeba.txt"
    _edit_line(table, line, edit)
    with pytest.raises(DataFormatError) as excinfo:
        load_dataset("celeba", root=tmp_path, image_size=8)
    err = excinfo.value
    assert (err.path, err.line, err.column) == (table, line, column)
    assert str(table) in _error_text(excinfo) and problem in _error_text(excinfo)


@pytest.mark.parametrize("csv, line, edit, column, problem", [
    (False, 3, lambda t: t.split()[0], "partition", "the column is missing"),
    (False, 7, _set_field(1, "test", sep=" "), "partition", "expected an integer"),
    (False, 2, _set_field(1, "3", sep=" "), "partition", "expected a value in (0, 1, 2)"),
    (False, 5, lambda t: "000001.jpg 0", "image_id", "listed twice"),
    (True, 4, _set_field(1, "x"), "partition", "expected an integer"),  # csv: header on line 1, row i on i + 2
])
def test_celeba_malformed_partition_row(tmp_path, csv, line, edit, column, problem):
    _fake_celeba(tmp_path, csv=csv)
    table = tmp_path / "celeba" / ("list_eval_partition.csv" if csv else "list_eval_partition.txt")
    _edit_line(table, line, edit)
    with pytest.raises(DataFormatError) as excinfo:
        load_dataset("celeba", root=tmp_path, image_size=8)
    err = excinfo.value
    assert (err.path, err.line, err.column) == (table, line, column)
    assert _error_text(excinfo).startswith(f"{table}, line {line}, column {column!r}: ")
    assert problem in _error_text(excinfo)


def test_celeba_csv_attribute_row_and_missing_partition(tmp_path):
    _fake_celeba(tmp_path, csv=True)
    table = tmp_path / "celeba" / "list_attr_celeba.csv"
    _edit_line(table, 6, _set_field(10, "1.0"))  # csv: header on line 1, Blond_Hair is field 10
    with pytest.raises(DataFormatError, match=r"list_attr_celeba.csv, line 6, column 'Blond_Hair'"):
        load_dataset("celeba", root=tmp_path)
    _fake_celeba(tmp_path / "b")
    part = tmp_path / "b" / "celeba" / "list_eval_partition.txt"
    part.write_text("".join(ln + "\n" for ln in part.read_text().splitlines()[:-1]))  # drops 000009.jpg
    with pytest.raises(DataFormatError, match=r"list_eval_partition.txt: no entry for 1 of the 9 images.*"
                                              r"000009.jpg \(its line 11\)"):
        load_dataset("celeba", root=tmp_path / "b")


def test_missing_image_named_with_its_table_line(tmp_path):
    root = _fake_waterbirds(tmp_path)
    folder = root / "waterbird_complete95_forest2water2"
    (folder / "001.Bird" / "img_5.png").unlink()  # data row 5: line 7 of metadata.csv
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_dataset("waterbirds", root=root, image_size=8)
    text = _error_text(excinfo)
    assert "001.Bird/img_5.png" in text and str(folder / "metadata.csv") in text and "line 7" in text
    assert "1 of 8 images" in text

    _fake_celeba(tmp_path / "c")
    (tmp_path / "c" / "celeba" / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"expected 000004.jpg.*list_attr_celeba.txt.*line 6"):
        load_dataset("celeba", root=tmp_path / "c", image_size=8)


def test_unreadable_image_names_the_file_and_table(tmp_path):
    root = _fake_waterbirds(tmp_path)
    folder = root / "waterbird_complete95_forest2water2"
    s = load_dataset("waterbirds", root=root, image_size=8)
    bad = folder / "001.Bird" / "img_2.png"  # train row 2 (y=1, split 0)
    good = bad.read_bytes()
    for payload in (b"not an image", good[: len(good) // 2]):  # garbage, then a truncated PNG
        bad.write_bytes(payload)
        for read in (lambda: s.train[2], lambda: s.train.get_batch([0, 2, 3]), s.train.load_into_memory):
            with pytest.raises(DataFormatError) as excinfo:
                read()
            assert excinfo.value.path == bad and "metadata.csv" in _error_text(excinfo)
    bad.unlink()  # removed after loading: a clear FileNotFoundError, not a PIL traceback
    with pytest.raises(FileNotFoundError, match=r"image file .*img_2.png \(listed in .*metadata.csv\) not found"):
        s.train.get_batch([2])
    bad.write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="img_2.png"):
        load_dataset("waterbirds", root=root, image_size=8, in_memory=True)


# --------------------------------------------------------------------------- identity

def test_identity_same_data_same_identity_and_changes_otherwise(digits):
    ident = digits.identity()
    assert json.loads(json.dumps(ident)) == ident  # JSON-able
    assert ident == load_dataset("digits", seed=0).identity()
    assert ident["meta"]["seed"] == 0 and set(ident["digests"]) == {"train", "val", "test"}
    assert load_dataset("digits", seed=1).identity() != ident
    assert load_dataset("digits", seed=0, val_fraction=0.2).identity() != ident
    shortcut = load_dataset("digits", seed=0, shortcut="patch").identity()
    assert shortcut != ident and set(shortcut["digests"]) >= {"clean", "aligned", "conflicting"}

    # same meta, one pixel / one label changed: only the content digest can tell
    def splits(images, labels):
        ds = ImageDataset(images, labels, num_classes=3)
        return DatasetSplits(name="t", train=ds, val=ds.subset([0]), test=ds.subset([1]), num_classes=3,
                             image_shape=(1, 2, 2), meta={"seed": 0})
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0])
    base = splits(x, y).identity()
    x2 = x.clone()
    x2[3, 0, 1, 1] = 1
    y2 = y.clone()
    y2[2] = 1
    assert splits(x.clone(), y.clone()).identity() == base
    assert splits(x2, y).identity()["digests"]["train"] != base["digests"]["train"]
    assert splits(x, y2).identity()["digests"]["train"] != base["digests"]["train"]
    foreign = splits(x, y)
    foreign.extra["odd"] = torch.utils.data.TensorDataset(x)
    with pytest.raises(TypeError, match="split 'odd' is a TensorDataset"):
        foreign.identity()


def test_identity_of_file_backed_splits(tmp_path):
    import shutil

    root = _fake_waterbirds(tmp_path / "a")
    ident = load_dataset("waterbirds", root=root, image_size=8).identity()
    assert json.loads(json.dumps(ident)) == ident and list(ident["source_files"]) == ["metadata.csv"]
    assert load_dataset("waterbirds", root=root, image_size=8).identity() == ident
    moved = tmp_path / "b"
    shutil.copytree(root, moved)  # the same data elsewhere: the same identity
    assert load_dataset("waterbirds", root=moved, image_size=8).identity() == ident
    assert load_dataset("waterbirds", root=root, image_size=16).identity() != ident
    table = moved / "waterbird_complete95_forest2water2" / "metadata.csv"
    _edit_line(table, 2, _set_field(2, "1"))  # one label flipped
    changed = load_dataset("waterbirds", root=moved, image_size=8).identity()
    assert changed["digests"]["train"] != ident["digests"]["train"]
    assert changed["source_files"] != ident["source_files"]
    # the file-backed identity reads no pixels (too slow at 200k images) ...
    (root / "waterbird_complete95_forest2water2" / "001.Bird" / "img_0.png").write_bytes(b"changed")
    assert load_dataset("waterbirds", root=moved, image_size=8).identity() == changed
    # ... the in-memory one does
    mem = load_dataset("waterbirds", root=moved, image_size=8, in_memory=True).identity()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(moved / "waterbird_complete95_forest2water2" / "001.Bird" / "img_7.png")
    mem2 = load_dataset("waterbirds", root=moved, image_size=8, in_memory=True).identity()
    assert mem2["digests"]["test"] != mem["digests"]["test"] and mem2["digests"]["train"] == mem["digests"]["train"]


# --------------------------------------------------------------------------- sizes and the trainer

def test_zero_or_negative_sizes_are_refused_by_name(tmp_path):
    from shortcut_fast.data import make_shortcut

    x, y = torch.zeros(2, 1, 3, 3), torch.tensor([0, 1])
    for value in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"num_classes must be an int >= 1, got {value!r}"):
            ImageDataset(x, y, num_classes=value)
    with pytest.raises(ValueError, match="num_attributes must be an int >= 0, got -1"):
        ImageDataset(x, y, num_attributes=-1)
    with pytest.raises(ValueError, match="image_size must be an int >= 1, got 8.0"):
        FileImageDataset(["a.png", "b.png"], y, image_size=8.0)
    for value in (0, -3):  # (load_dataset refuses a float option by type before the builder runs)
        with pytest.raises(ValueError, match=f"image_size must be an int >= 1, got {value!r}"):
            FileImageDataset(["a.png", "b.png"], y, image_size=value)
        with pytest.raises(ValueError, match=f"image_size must be an int >= 1, got {value!r}"):
            load_dataset("waterbirds", root=tmp_path, image_size=value)
        with pytest.raises(ValueError, match=f"image_size must be an int >= 1, got {value!r}"):
            load_dataset("celeba", root=tmp_path, image_size=value)
    with pytest.raises(ValueError, match="image_size must be an int >= 8, got 0"):
        load_dataset("digits", image_size=0)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        make_shortcut("patch", 1, (3, 8, 8))
    _write_cifar(tmp_path, n_per_batch=10)
    for value in (0, -5):
        with pytest.raises(ValueError, match=f"val_size must be an int >= 1, got {value}"):
            load_dataset("cifar10", root=tmp_path, val_size=value)


def test_trainer_batches_choose_by_in_memory(tmp_path):
    from shortcut_fast.train import Batches

    s = load_dataset("waterbirds", root=_fake_waterbirds(tmp_path), image_size=8)
    mem = s.train.load_into_memory()
    file_batches, mem_batches = Batches(s.train, 3, torch.device("cpu")), Batches(mem, 3, torch.device("cpu"))
    assert not file_batches.in_memory and mem_batches.in_memory
    order = torch.tensor([2, 0, 3, 1])
    for got, want in zip(file_batches.iterate(order), mem_batches.iterate(order)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.gpu
def test_gpu_resident_dataset_and_injection(digits):
    cuda = digits.train.to("cuda")
    assert cuda.images.is_cuda and cuda.labels.is_cuda
    idx = torch.tensor([3, 1, 4], device="cuda")
    x, y, a = cuda.get_batch(idx)
    assert x.is_cuda and x.dtype == torch.float32 and torch.equal(x.cpu(), digits.train.get_batch([3, 1, 4])[0])
    gpu_splits = type(digits)(name="d", train=cuda, val=digits.val.to("cuda"), test=digits.test.to("cuda"),
                              num_classes=10, image_shape=digits.image_shape)
    for kind in ("patch", "tint", "freq"):
        on_gpu = inject_shortcut(gpu_splits, kind, rho=0.8, seed=2)
        on_cpu = inject_shortcut(digits, kind, rho=0.8, seed=2)
        assert on_gpu.train.images.is_cuda
        assert torch.equal(on_gpu.train.attributes.cpu(), on_cpu.train.attributes)
        diff = (on_gpu.extra["conflicting"].images.cpu().float() - on_cpu.extra["conflicting"].images.float())
        assert diff.abs().max() <= 1  # rounding of the float deltas may differ by one level
