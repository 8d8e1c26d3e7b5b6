"""Your own table of images with a group attribute (csv:FILE, Waterbirds-like) through the
commands that use the attribute: denetdm (its own conflict ratio), localize --shortcut none,
mitigate. The label is the shape (a bright square left or right), the attribute a tint that
agrees with the label on 90 % of the training images."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from cli_runner import assert_refused, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(240):
        y = i % 2
        split = "train" if i < 160 else ("val" if i < 200 else "test")
        if split == "train":
            a = 1 - y if i % 20 in (0, 5) else y  # 90 % aligned, conflicts in both classes
        else:
            a = (i // 2) % 2  # every group equally often
        img = rng.integers(0, 40, (8, 8, 3)).astype(np.uint8)
        img[2:6, (0 if y == 0 else 4):(4 if y == 0 else 8)] += 150
        img[..., a] += 60
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append([f"{i}.png", y, a, split])
    path = root / "meta.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "attribute", "split"], *rows])
    return path


def test_denetdm_runs_at_the_datas_own_conflict_ratio(tmp_path, table):
    out = tmp_path / "run"
    r = run_cli("denetdm", "--data", f"csv:{table}", "--seeds", "1", "--stage1-epochs", "1", "--stage2-epochs", "1",
                "--baseline-epochs", "1", "--width", "16", "--batch-size", "64", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    record = json.loads((out / "result.json").read_text())
    assert record["config"]["ratios"] == [0.1]  # 16 of the 160 training images conflict
    assert {"denetdm", "erm", "lff"} <= set(record["methods"])


def test_denetdm_refuses_a_conflict_ratio_for_own_data(tmp_path, table):
    r = run_cli("denetdm", "--data", f"csv:{table}", "--conflict-ratio", "0.05", "--out", tmp_path / "run")
    assert_refused(r, 2, "--conflict-ratio", "own conflict ratio")
    assert not (tmp_path / "run").exists()


def test_localize_uses_the_attribute_as_the_shortcut(tmp_path, table):
    out = tmp_path / "run"
    r = run_cli("localize", "--data", f"csv:{table}", "--shortcut", "none", "--model", "mlp", "-M", "width=8",
                "--epochs", "1", "--seeds", "1", "--batch-size", "32", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "result.json").is_file()


def test_mitigate_groups_come_from_the_attribute(tmp_path, table):
    out = tmp_path / "run"
    r = run_cli("mitigate", "--data", f"csv:{table}", "--model", "mlp", "-M", "width=8", "--erm-epochs", "1",
                "--epochs", "1", "--max-steps-per-epoch", "2", "--augment", "none", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    grouping = json.loads((out / "result.json").read_text())["result"]["grouping"]
    assert grouping["names"] == ["y0/a0", "y0/a1", "y1/a0", "y1/a1"]
    assert sorted(grouping["minority"]) == ["y0/a1", "y1/a0"]
