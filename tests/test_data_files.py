"""Users' own images: imagefolder:PATH and csv:FILE (shortcut_fast.data.files) through load_dataset
and the command line: labels, class mapping, splits, pixels, the decode cache, identity and bad input."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from shortcut_fast.data import DataFormatError, DatasetNotFoundError, list_datasets, load_dataset
from shortcut_fast.data import files
from cli_runner import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# Each class's images have their own brightness, so a sample's label can be read off its pixels.
LEVEL = {"cat": 40, "dog": 130, "eel": 220}


def _image(path, size=(37, 23), level=128, mode="RGB", seed=0):
    """A noisy image of mean `level`, saved by its extension (png / jpg); returns the path."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    pixels = np.clip(level + rng.integers(-20, 21, shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return path


def _tree(root, counts, split="train", size=(37, 23), ext="png"):
    for cls, n in counts.items():
        for i in range(n):
            _image(root / split / cls / f"{cls}{i}.{ext}", size, LEVEL[cls], seed=hash((cls, i, split)) % 1000)
    return root


def _csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _pil_reference(path, size, channels=3):
    """PIL's own decode, center square crop and bilinear resize, written independently of the loader."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
    if channels == 1:
        return np.asarray(img.convert("L"))[None]
    return np.asarray(img).transpose(2, 0, 1)


def _cached_files():
    folder = files.cache_folder()
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _label_from_pixels(ds, classes):
    """The class whose brightness is nearest each image's mean: checks labels travel with images."""
    levels = torch.tensor([LEVEL[c] for c in classes], dtype=torch.float32)
    means = ds.images.float().mean(dim=(1, 2, 3))
    return (means[:, None] - levels[None]).abs().argmin(1)


# --------------------------------------------------------------------------- imagefolder

def test_imagefolder_sorted_classes_and_fixed_stratified_split(tmp_path):
    root = _tree(tmp_path / "imgs", {"eel": 10, "cat": 20, "dog": 10})
    s = load_dataset(f"imagefolder:{root}", image_size=16)
    assert s.meta["classes"] == ["cat", "dog", "eel"] and s.num_classes == 3 and s.num_attributes == 0
    assert s.meta["dataset"] == "imagefolder" and s.meta["folder"] == str(root)
    assert s.image_shape == (3, 16, 16) and s.train.images.dtype == torch.uint8
    # 10 % val and 10 % test of the 40 train images, each class in proportion
    assert s.val.class_counts() == [2, 1, 1] and s.test.class_counts() == [2, 1, 1]
    assert s.train.class_counts() == [16, 8, 8]
    for ds in (s.train, s.val, s.test):
        assert torch.equal(_label_from_pixels(ds, s.meta["classes"]), ds.labels)
    # the split is fixed: another --seed sees the same images in every split
    other = load_dataset(f"imagefolder:{root}", image_size=16, seed=7)
    for key in ("train", "val", "test"):
        assert torch.equal(other.eval_sets()[key].images, s.eval_sets()[key].images)


def test_imagefolder_given_val_and_test_share_the_train_mapping(tmp_path):
    root = _tree(tmp_path / "imgs", {"cat": 4, "dog": 4, "eel": 4})
    _tree(root, {"dog": 3}, split="val", ext="jpg")
    _tree(root, {"cat": 2, "eel": 2}, split="test")
    s = load_dataset(f"imagefolder:{root}", image_size=8)
    assert len(s.train) == 12 and s.meta["split"] == "given"  # nothing carved
    assert s.val.labels.tolist() == [1, 1, 1]
    assert s.test.class_counts() == [2, 0, 2]
    _tree(root, {"dog": 1}, split="val")
    (root / "val" / "fox").mkdir()
    _image(root / "val" / "fox" / "f.png", level=90)
    with pytest.raises(DataFormatError, match=r"val/fox: class 'fox' of val/ is not a class of train/"):
        load_dataset(f"imagefolder:{root}", image_size=8)


def test_imagefolder_without_train_folder_and_only_test_given(tmp_path):
    flat = _tree(tmp_path / "flat", {"cat": 10, "dog": 10}, split=".")
    s = load_dataset(f"imagefolder:{flat}", image_size=8)
    assert (len(s.train), len(s.val), len(s.test)) == (16, 2, 2)
    root = _tree(tmp_path / "imgs", {"cat": 10, "dog": 10})
    _tree(root, {"cat": 1, "dog": 1}, split="test")
    s = load_dataset(f"imagefolder:{root}", image_size=8)
    assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 2)  # only val carved
    assert s.meta["split"].startswith("val carved from train")


def test_pixels_match_pil_for_rgb_gray_png_and_jpg(tmp_path):
    data = tmp_path / "d"
    paths = [_image(data / "a.png", (37, 23), 100, "RGB", 1), _image(data / "b.jpg", (23, 37), 150, "RGB", 2),
             _image(data / "c.png", (30, 40), 60, "L", 3), _image(data / "d.jpg", (41, 29), 200, "L", 4)]
    # (odd sizes with an even difference of sides: the centered crop falls on whole pixels in both)
    table = _csv(data / "list.csv", ["path", "label", "split"],
                 [[p.name, i % 2, "test"] for i, p in enumerate(paths)] + [["a.png", 0, "train"], ["c.png", 1, "train"],
                                                                             ["b.jpg", 1, "val"]])
    rgb = load_dataset(f"csv:{table}", image_size=12)
    gray = load_dataset(f"csv:{table}", image_size=12, channels=1)
    assert rgb.image_shape == (3, 12, 12) and gray.image_shape == (1, 12, 12)
    for i, p in enumerate(paths):
        for splits, channels in ((rgb, 3), (gray, 1)):
            diff = np.abs(splits.test.images[i].numpy().astype(int) - _pil_reference(p, 12, channels))
            # the loader's filter may reach past the crop at the border (a resize box), the reference not
            assert diff[:, 1:-1, 1:-1].max() <= 1 and diff.mean() <= 1, (p.name, channels)
    for i in (2, 3):  # grayscale files: replicated into three equal channels
        x = rgb.test.images[i]
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
        assert torch.equal(x[0], gray.test.images[i][0])


def test_image_size_defaults_to_the_common_square_size(tmp_path):
    root = _tree(tmp_path / "sq", {"cat": 5, "dog": 5}, size=(20, 20))
    s = load_dataset(f"imagefolder:{root}", val_fraction=0.2, test_fraction=0.2)
    assert s.image_shape == (3, 20, 20)
    first = sorted((root / "train" / "cat").iterdir())
    expected = np.stack([np.asarray(Image.open(p)).transpose(2, 0, 1) for p in first])
    all_cat = torch.cat([d.images[d.labels == 0] for d in (s.train, s.val, s.test)])
    # unresized: the pixels are the files' own (compare as sets of images: the split reorders)
    assert sorted(map(bytes, all_cat.numpy())) == sorted(map(bytes, expected))
    odd = _tree(tmp_path / "odd", {"cat": 5, "dog": 5})  # 37x23: not square
    with pytest.raises(ValueError, match=r"give image_size.*-D image_size=.*37x23"):
        load_dataset(f"imagefolder:{odd}")


# --------------------------------------------------------------------------- cache and identity

def test_second_load_reads_the_cache_and_decodes_nothing(tmp_path, monkeypatch, model_cache_folder):
    root = _tree(tmp_path / "imgs", {"cat": 5, "dog": 5})
    first = load_dataset(f"imagefolder:{root}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    key = first.meta["content_digest"]
    assert files.cache_folder() == model_cache_folder / "data"
    assert _cached_files() == [f"{key}.pt"]  # one file, no temporary left behind

    calls = []
    real = files._decode_image
    monkeypatch.setattr(files, "_decode_image", lambda *a: calls.append(a) or real(*a))
    again = load_dataset(f"imagefolder:{root}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert calls == []
    for key_ in ("train", "val", "test"):
        assert torch.equal(again.eval_sets()[key_].images, first.eval_sets()[key_].images)
    assert again.identity() == first.identity()

    load_dataset(f"imagefolder:{root}", image_size=8, channels=1, val_fraction=0.2, test_fraction=0.2)
    assert len(calls) == 10 and len(_cached_files()) == 2  # channels change the decoded pixels: a new entry


def test_a_changed_image_is_noticed(tmp_path, monkeypatch):
    data = tmp_path / "d"
    for i in range(6):
        _image(data / f"{i}.png", (16, 16), 60 + 30 * (i % 2), seed=i)
    table = _csv(data / "t.csv", ["path", "label", "split"],
                 [[f"{i}.png", i % 2, ("train", "train", "train", "train", "val", "test")[i]] for i in range(6)])
    before = load_dataset(f"csv:{table}")
    _image(data / "5.png", (16, 16), 250, seed=99)  # overwrite the test image
    calls = []
    real = files._decode_image
    monkeypatch.setattr(files, "_decode_image", lambda *a: calls.append(a) or real(*a))
    after = load_dataset(f"csv:{table}")
    assert len(calls) == 6  # a new key: decoded again
    assert after.meta["content_digest"] != before.meta["content_digest"]
    assert np.abs(after.test.images[0].numpy().astype(int) - _pil_reference(data / "5.png", 16)).max() == 0
    assert torch.equal(after.train.images, before.train.images)
    assert after.identity() != before.identity()
    assert after.identity()["meta"]["content_digest"] == after.meta["content_digest"]


def test_identity_does_not_depend_on_where_the_folder_lives(tmp_path):
    root = _tree(tmp_path / "a" / "imgs", {"cat": 5, "dog": 5})
    moved = tmp_path / "b" / "elsewhere"
    shutil.copytree(root, moved)
    a = load_dataset(f"imagefolder:{root}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    b = load_dataset(f"imagefolder:{moved}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert a.meta["folder"] != b.meta["folder"] and a.identity() == b.identity()


def test_unreadable_cache_file_is_decoded_again(tmp_path):
    root = _tree(tmp_path / "imgs", {"cat": 5, "dog": 5})
    first = load_dataset(f"imagefolder:{root}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    cached = files.cache_folder() / f"{first.meta['content_digest']}.pt"
    cached.write_bytes(cached.read_bytes()[:100])  # as a disk fault might leave it
    again = load_dataset(f"imagefolder:{root}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert torch.equal(again.train.images, first.train.images)
    assert torch.load(cached, weights_only=True)["images"].shape == (10, 3, 8, 8)  # rewritten whole


# --------------------------------------------------------------------------- csv

def test_csv_names_attribute_groups_and_relative_paths(tmp_path):
    data = tmp_path / "birds"
    rows = []
    for i in range(40):
        label = "waterbird" if i % 2 else "landbird"
        # 80 % of each class on its "own" place: a spurious attribute with minority groups
        place = ("water" if i % 2 else "land") if i % 10 < 8 else ("land" if i % 2 else "water")
        _image(data / "img" / f"{i}.jpg", (24, 24), 60 if label == "landbird" else 180, seed=i)
        rows.append([f"img/{i}.jpg", label, place])
    table = _csv(data / "meta.csv", ["path", "label", "attribute"], rows)
    s = load_dataset(f"csv:{table}", image_size=8)
    assert s.meta["classes"] == ["landbird", "waterbird"] and s.meta["attributes"] == ["land", "water"]
    assert s.num_attributes == 2 and s.num_groups == 4
    # names from different sets: "attribute == label" has no meaning
    assert s.bias_aligned_attribute is False
    assert sum(s.train.group_counts()) == len(s.train) and s.train.group_counts() == [13, 3, 3, 13]
    # 4 of 40 images each, every group within one image of its share (16/40 and 4/40 of 4)
    assert s.val.group_counts() == [1, 1, 1, 1] and s.test.group_counts() == [2, 0, 0, 2]
    counts = [sum(d.group_counts()[g] for d in (s.train, s.val, s.test)) for g in range(4)]
    assert counts == [16, 4, 4, 16]
    assert "stratified by label and attribute" in s.meta["split"]

    ints = _csv(data / "ints.csv", ["path", "label", "attribute", "extra"],
                [[r[0], int(r[1] == "waterbird"), int(r[2] == "water"), "ignored"] for r in rows])
    s = load_dataset(f"csv:{ints}", image_size=8)
    assert s.bias_aligned_attribute is True  # integers, as many values as classes (the Waterbirds convention)
    aligned = s.describe()["train"]["aligned_fraction"]
    assert 0.7 < aligned < 0.9


def test_csv_integer_labels_and_given_split(tmp_path):
    data = tmp_path / "d"
    rows = []
    for i in range(12):
        _image(data / f"{i}.png", (16, 16), LEVEL[("cat", "dog", "eel")[i % 3]], seed=i)
        rows.append([f"{i}.png", i % 3, "train" if i < 6 else ("VAL" if i < 9 else "test")])
    s = load_dataset(f"csv:{_csv(data / 't.csv', ['Path', 'Label', 'Split'], rows)}")
    assert s.meta["classes"] == ["0", "1", "2"] and s.meta["split"] == "given"
    assert s.train.labels.tolist() == [0, 1, 2, 0, 1, 2] and s.test.labels.tolist() == [0, 1, 2]
    assert torch.equal(_label_from_pixels(s.train, ["cat", "dog", "eel"]), s.train.labels)


# --------------------------------------------------------------------------- bad input

def _bad(tmp_path, header, rows, *, images=("a.png", "b.png", "c.png", "d.png")):
    data = tmp_path / "bad"
    for i, name in enumerate(images):
        _image(data / name, (16, 16), 40 + 50 * i, seed=i)
    return _csv(data / "t.csv", header, rows)


@pytest.mark.parametrize("header, rows, message", [
    (["path", "klass"], [["a.png", 0]], r"t\.csv, line 1: the header lacks the column\(s\) label"),
    (["path", "label"], [["a.png", 0], ["b.png", 2], ["c.png", 3]],
     r"t\.csv, column 'label': integer values must be 0\.\.K-1 with each one present: 1 never occurs"),
    (["path", "label", "attribute"], [["a.png", 0, 1], ["b.png", 1, ""], ["c.png", 1, 0]],
     r"t\.csv, line 3, column 'attribute': no attribute on this row, but line 2 has one"),
    (["path", "label", "split"], [["a.png", 0, "train"], ["b.png", 1, "training"]],
     r"t\.csv, line 3, column 'split': unknown split 'training': expected train, val or test"),
    (["path", "label"], [["a.png", 0], ["sub/zz.png", 1]],
     r"t\.csv, line 3, column 'path': image file .*sub/zz\.png does not exist"),
    (["path", "label"], [["a.png", "cat"], ["b.png", "cat"], ["c.png", "cat"]],
     r"t\.csv: the train split holds a single class \(cat\): training needs at least 2 classes"),
    (["path", "label"], [["a.png", 0], ["b.png", "dog"]], r"t\.csv, line 3, column 'label': 'dog' is a name"),
    (["path", "label", "split"], [["a.png", 0, "train"], ["b.png", 1, "train"], ["c.png", 2, "test"],
                                  ["d.png", 0, "val"]],
     r"t\.csv, line 4, column 'label': class '2' appears in the test split but has no image in train"),
    (["path", "label"], [["a.png", 0], ["b.png"]], r"t\.csv, line 3, column 'label': expected 2 fields"),
    (["path", "label"], [["a.png", -1], ["b.png", 0]], r"t\.csv, line 2, column 'label': negative value -1"),
])
def test_bad_csv_names_file_and_line(tmp_path, header, rows, message):
    table = _bad(tmp_path, header, rows)
    with pytest.raises(DataFormatError, match=message):
        load_dataset(f"csv:{table}", image_size=8)
    assert _cached_files() == []


def test_undecodable_image_names_the_image_and_writes_no_cache(tmp_path):
    root = _tree(tmp_path / "imgs", {"cat": 5, "dog": 5})
    (root / "train" / "dog" / "dog3.png").write_bytes(b"not an image")
    with pytest.raises(DataFormatError, match=r"dog3\.png: cannot decode the image"):
        load_dataset(f"imagefolder:{root}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert _cached_files() == []
    table = _bad(tmp_path, ["path", "label"], [["a.png", 0], ["b.png", 1], ["c.png", 0], ["d.png", 1],
                                               ["a.png", 0], ["b.png", 1], ["c.png", 0], ["broken.jpg", 1]])
    (table.parent / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataFormatError, match=r"broken\.jpg: cannot decode the image \(listed in .*t\.csv, line 9\)"):
        load_dataset(f"csv:{table}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataFormatError, match=r"broken\.jpg: cannot decode the image \(listed in .*t\.csv, line 9\)"):
        load_dataset(f"csv:{table}", val_fraction=0.2, test_fraction=0.2)  # the size probe names it too
    assert _cached_files() == []


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"not found in .*: expected the folder nowhere/.*no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"empty/train: expected one subfolder per class.*no class"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    root = _tree(tmp_path / "imgs", {"cat": 5, "dog": 5})
    (root / "train" / "eel").mkdir()
    (root / "train" / "eel" / "notes.txt").write_text("no images here")
    with pytest.raises(DataFormatError, match=r"train/eel: class folder without images"):
        load_dataset(f"imagefolder:{root}", image_size=8)
    (tmp_path / "only_val" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"expected train/CLASS/IMAGE. val/ found but no train/"):
        load_dataset(f"imagefolder:{tmp_path / 'only_val'}")
    with pytest.raises(DatasetNotFoundError, match=r"not found in .*: expected missing\.csv"):
        load_dataset(f"csv:{tmp_path / 'missing.csv'}")
    (tmp_path / "header_only.csv").write_text("path,label\n")
    with pytest.raises(DataFormatError, match=r"header_only\.csv, line 1: no data rows"):
        load_dataset(f"csv:{tmp_path / 'header_only.csv'}")
    small = _tree(tmp_path / "small", {"cat": 2, "dog": 2})
    with pytest.raises(ValueError, match=r"the val split, val_fraction 0\.1 of the 4 train images, would be empty"):
        load_dataset(f"imagefolder:{small}", image_size=8)


@pytest.mark.parametrize("options, message", [
    ({"image_size": 0}, "image_size must be an int >= 1"),
    ({"image_size": "big"}, "image_size must be an int >= 1"),
    ({"channels": 2}, r"channels must be 1 \(gray\) or 3 \(RGB\)"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must be < 1"),
    ({"test_fraction": 0}, "test_fraction must be a number in"),
])
def test_bad_options_name_the_option(tmp_path, options, message):
    root = _tree(tmp_path / "imgs", {"cat": 5, "dog": 5})
    with pytest.raises(ValueError, match=message):
        load_dataset(f"imagefolder:{root}", **options)


def test_registry_lists_the_forms_and_refuses_unknown_names():
    names = list_datasets()
    assert "imagefolder:PATH" in names and "csv:FILE" in names and "waterbirds" in names
    with pytest.raises(ValueError, match=r"unknown dataset 'imagefolders'.*imagefolder:PATH or csv:FILE"):
        load_dataset("imagefolders")
    with pytest.raises(ValueError, match=r"give a path after the colon, e\.g\. csv:FILE"):
        load_dataset("csv: ")
    with pytest.raises(TypeError, match=r"unknown option\(s\) n_train .*valid options: image_size, channels"):
        load_dataset("imagefolder:/x", n_train=3)


# --------------------------------------------------------------------------- command line

def test_cli_trains_on_an_image_folder(tmp_path):
    root = _tree(tmp_path / "imgs", {"cat": 10, "dog": 10})
    out = tmp_path / "run"
    r = run_cli("train", "--data", f"imagefolder:{root}", "-D", "image_size=16", "--model", "small-cnn",
             "-M", "padding=2", "--recipe", "quick", "--epochs", "1", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    record = json.loads((out / "result.json").read_text())
    meta = record["dataset_meta"]
    assert meta["dataset"] == "imagefolder" and meta["classes"] == ["cat", "dog"]
    assert meta["image_shape"] == [3, 16, 16] and meta["splits"]["train"]["n"] == 16
    assert len(_cached_files()) == 1


def test_cli_refuses_bad_data_in_one_line_and_leaves_no_run_folder(tmp_path):
    root = _tree(tmp_path / "imgs", {"cat": 5, "dog": 5})
    (root / "train" / "cat" / "cat2.png").write_bytes(b"garbage")
    table = tmp_path / "t.csv"
    table.write_text("path,label,split\nimgs/train/dog/dog0.png,1,train\nimgs/train/dog/dog1.png,0,tset\n")
    for data, named in ((f"imagefolder:{root}", "cat2.png"), (f"csv:{tmp_path / 'none.csv'}", "none.csv"),
                        (f"csv:{table}", "t.csv, line 3, column 'split'")):
        out = tmp_path / "run"
        r = run_cli("train", "--data", data, "-D", "image_size=16", "--model", "small-cnn", "--epochs", "1",
                 "--out", out)
        lines = [line for line in r.output.strip().splitlines() if line.strip()]
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert len(lines) == 1 and lines[0].startswith("Error:") and named in lines[0], r.output
        assert not out.exists()


def test_cli_memorization_groups_come_from_the_csv_attribute(tmp_path):
    rows = []
    for i in range(40):
        y = i % 2
        a = y if i % 10 < 8 else 1 - y  # 80 % aligned: the two conflicting groups are the minority
        _image(tmp_path / "img" / f"{i}.png", (16, 16), 60 + 120 * a, seed=i)
        rows.append([f"img/{i}.png", y, a])
    table = _csv(tmp_path / "meta.csv", ["path", "label", "attribute"], rows)
    out = tmp_path / "run"
    r = run_cli("memorization", "--data", f"csv:{table}", "--model", "mlp", "-M", "width=8", "--epochs", "1",
             "--layers", "fc1", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    grouping = json.loads((out / "result.json").read_text())["result"]["grouping"]
    assert grouping["kind"] == "group" and grouping["names"] == ["y0/a0", "y0/a1", "y1/a0", "y1/a1"]
    assert sorted(grouping["minority"]) == ["y0/a1", "y1/a0"]
