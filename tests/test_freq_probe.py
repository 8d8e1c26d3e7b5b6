"""The frequency-shortcut experiment: fast search == reference loop, planted shortcut found,
greedy/gradient variants, tables, resume, CLI."""
import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from shortcut_fast.cli import main
from shortcut_fast.data import DatasetSplits, ImageDataset
from shortcut_fast.experiments import freq_probe as fp
from shortcut_fast.experiments.stats import spearman
from shortcut_fast.ops import freq
from shortcut_fast.ops.band_filter import band_filter, remove_frequencies
from shortcut_fast.run_folder import RunFolder
from shortcut_fast.train import TrainConfig, train

PLANTED = (3, 5)


def _planted_set(n: int, seed: int) -> ImageDataset:
    """16x16 noise images; class c carries a grating at its own frequency. Class 0's
    grating (the planted shortcut, PLANTED) is strong and also appears weakly in every other
    image, so a model that relies on it predicts 0 from it whatever the image."""
    g = torch.Generator().manual_seed(seed)
    H = W = 16
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, H, W, generator=g) * 0.5
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")

    def grating(u, v):
        phase = torch.rand(n, generator=g) * 2 * math.pi
        return torch.cos(2 * math.pi * (u * yy / H + v * xx / W)[None] + phase[:, None, None])

    for c, (u, v) in {0: PLANTED, 1: (1, 1), 2: (2, 0), 3: (0, 2)}.items():
        x[y == c, 0] += (1.0 if c == 0 else 0.6) * grating(u, v)[y == c]
    x[y != 0, 0] += 0.35 * grating(*PLANTED)[y != 0]
    return ImageDataset(x, y, num_classes=4, name="planted")


def _tiny_cnn(channels=1, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 16, 5, padding=2), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


@pytest.fixture(scope="module")
def planted():
    splits = DatasetSplits(name="planted", train=_planted_set(600, 0), val=_planted_set(100, 1),
                           test=_planted_set(200, 2), extra={}, num_classes=4, num_attributes=0,
                           image_shape=(1, 16, 16), bias_aligned_attribute=False, meta={})
    model = _tiny_cnn()
    train(model, splits, TrainConfig(epochs=5, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0),
          progress=False)
    return model.eval(), splits


def test_planted_frequency_is_found_and_is_a_shortcut(planted):
    model, splits = planted
    res = fp.run_freq_probe(model, splits, fp.FreqProbeConfig(method="loss", patch=1, max_images_per_class=40),
                            progress=False)
    assert res.test_accuracy > 0.95
    pairs = freq.conjugate_pairs(16, 16)
    best = pairs[int(torch.tensor(res.classes[0].scores).argmax())].tolist()
    assert best == list(PLANTED)  # removing the planted pair costs class 0 the most
    assert list(PLANTED) in res.classes[0].dfm
    table = {row["class"]: row for row in res.shortcut}
    assert table[0]["tpr"] > 0.9 and table[0]["fpr"] > 0.5  # high TPR and FPR: a frequency shortcut
    assert table[1]["fpr"] < 0.2  # class 1 has no such shortcut


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("patch", [1, 3])
def test_fast_search_equals_reference_loop(planted, backend, patch):
    model, splits = planted
    # triton runs on the CPU only through the interpreter (CI); with a GPU it runs there
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    images = fp._class_images(splits.test, 2, 12, 0, device)
    candidates = fp.Candidates.build(16, 16, patch)
    model = model.to(device)
    try:
        fast, _ = fp.candidate_losses(model, images, 2, candidates, batch_size=100, backend=backend,
                                      max_bytes=1 << 20)
        slow = fp.dfm_losses_reference(model, images, 2, candidates)
    finally:
        model.cpu()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    # Identical rankings up to float32 ties: walking the fast order, the reference losses
    # never increase by more than rounding noise.
    in_fast_order = slow[torch.argsort(fast, descending=True)]
    assert bool((in_fast_order[1:] <= in_fast_order[:-1] + 2e-5).all())
    assert int(fast.argmax()) == int(slow.argmax())


def test_greedy_is_exact_under_speculation(planted):
    """Speculative batching gives the same DFM as the one-pair-at-a-time walk."""
    model, splits = planted
    images = fp._class_images(splits.test, 0, 20, 0, "cpu")
    fast, details = fp.greedy_dfm(model, images, 0, tolerance=1)
    # the plain sequential walk
    pairs = freq.conjugate_pairs(16, 16)
    with torch.no_grad():
        base = int((model(images).argmax(1) == 0).sum())
        current, removed = images.clone(), torch.zeros(16, 16, dtype=torch.bool)
        for p in pairs:
            trial = remove_frequencies(current, p[None], backend="torch")[0]
            if base - int((model(trial).argmax(1) == 0).sum()) <= 1:
                current = trial
                removed |= freq.pair_masks(16, 16, p[None])[0]
    assert torch.equal(fast, ~removed)
    assert fast[PLANTED] and details["base_correct"] - details["final_correct"] <= 1
    assert details["evaluations"] >= len(pairs)


def test_gradient_estimate_matches_finite_difference(planted):
    model, splits = planted
    images = fp._class_images(splits.test, 0, 16, 0, "cpu")
    candidates = fp.Candidates.build(16, 16, 1)
    estimate = fp.gradient_scores(model, images, 0, candidates)
    exact, _ = fp.candidate_losses(model, images, 0, candidates)
    base = fp.candidate_losses(model, images, 0, fp.Candidates(torch.zeros(1, 16, 16, dtype=torch.bool)))[0][0]
    assert spearman(estimate, exact - base) > 0.5
    k = int(exact.argmax())
    assert int(estimate.argmax()) == k  # the planted pair stands out in both


def test_gradient_method_reports_agreement(planted):
    model, splits = planted
    cfg = fp.FreqProbeConfig(method="gradient", patch=1, classes=[0], max_images_per_class=16, verify_gradient=True)
    res = fp.run_freq_probe(model, splits, cfg, progress=False)
    details = res.classes[0].details
    assert details["exact_evaluations"] < details["candidates"]
    assert 0 < details["dfm_jaccard_vs_exact"] <= 1 and details["spearman_estimate_vs_exact_all"] > 0.3
    assert list(PLANTED) in res.classes[0].dfm


def test_band_stop_table_definition(planted):
    model, splits = planted
    x, y, _ = splits.test.get_batch(torch.arange(len(splits.test)))
    table = fp.band_stop_table(model, x, y, 4)
    masks = freq.band_masks(16, 16)
    with torch.no_grad():
        base = model(x).argmax(1)
        stopped = model(band_filter(x, masks[1], "stop", backend="torch")[0]).argmax(1)
    c = 0
    want = (int((stopped[y == c] == c).sum()) - int((base[y == c] == c).sum())) / int((y == c).sum()) * 100
    assert table["delta"][c][1] == pytest.approx(want)


def test_resume_skips_finished_classes(planted, tmp_path):
    model, splits = planted
    cfg = fp.FreqProbeConfig(method="loss", patch=4, max_images_per_class=8)
    with RunFolder(tmp_path, "freq-probe", {"patch": 4}) as run:
        first = fp.run_freq_probe(model, splits, cfg, store=run.partial, progress=False)
    marker = tmp_path / "partial" / "class_1.json"
    data = json.loads(marker.read_text())
    data["dfm_size"] = -7  # a finished class is reused, not recomputed
    marker.write_text(json.dumps(data))
    with RunFolder(tmp_path, "freq-probe", {"patch": 4}, resume=True) as run:
        again = fp.run_freq_probe(model, splits, cfg, store=run.partial, progress=False)
    assert again.classes[1].dfm_size == -7 and again.classes[0].dfm == first.classes[0].dfm
    with RunFolder(tmp_path, "freq-probe", {"patch": 4}, overwrite=True) as run:
        fresh = fp.run_freq_probe(model, splits, cfg, store=run.partial, progress=False)
    assert fresh.classes[1].dfm_size == first.classes[1].dfm_size


def test_class_subset_keeps_each_class_its_own_row(planted):
    """--classes 2,0 reports class 2's and class 0's TPR/FPR (it scored the rows by position before)."""
    model, splits = planted
    cfg = fp.FreqProbeConfig(method="loss", patch=4, max_images_per_class=8)
    full = fp.run_freq_probe(model, splits, cfg, progress=False)
    subset = fp.run_freq_probe(model, splits, dataclasses.replace(cfg, classes=[2, 0]), progress=False)
    by_class = {row["class"]: row for row in full.shortcut}
    assert [row["class"] for row in subset.shortcut] == [2, 0]
    for row in subset.shortcut:
        assert row == by_class[row["class"]]
    assert by_class[0]["tpr"] != by_class[2]["tpr"] or by_class[0]["fpr"] != by_class[2]["fpr"]


def test_resume_within_a_class(planted):
    model, splits = planted
    images = fp._class_images(splits.test, 1, 8, 0, "cpu")
    candidates = fp.Candidates.build(16, 16, 2)
    full, full_correct = fp.candidate_losses(model, images, 1, candidates)
    half = full.clone()
    half_correct = full_correct.clone()
    half_correct[::2] = -1  # pretend every other candidate was never evaluated
    half[::2] = 123.0  # values of unevaluated rows must be ignored
    resumed, _ = fp.candidate_losses(model, images, 1, candidates, resume_from=(half, half_correct))
    torch.testing.assert_close(resumed, full)


def test_config_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        fp.FreqProbeConfig(method="exact")
    with pytest.raises(ValueError, match="patch must be 1"):
        fp.FreqProbeConfig(method="greedy", patch=2)
    with pytest.raises(ValueError, match="top_percent must be in"):
        fp.FreqProbeConfig(top_percent=0)


def test_cli_end_to_end_with_checkpoint_and_ood(tmp_path):
    runner = CliRunner()
    data = ["--data", "synthetic-freq", "-D", "n_train=200", "-D", "n_val=40", "-D", "n_test=80",
            "-D", "image_size=16", "-D", "channels=1"]
    r = runner.invoke(main, ["freq-probe", *data, "--model", "mlp", "-M", "width=32", "--epochs", "2",
                             "--patch", "4", "--max-images-per-class", "8", "--track-every", "2",
                             "--ood", "gaussian-noise:2", "--out", str(tmp_path / "fp"), "--quiet"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "fp" / "result.json").read_text())["result"]
    assert len(result["classes"]) == 4 and len(result["shortcut"]) == 4
    assert len(result["band_stop"]["delta"]) == 4 and "gaussian-noise:2" in result["ood"]
    assert result["learning"]["steps"][0] == 2
    for png in ("adcs.png", "dfm.png", "tpr_fpr.png", "band_stop.png", "learning_order.png"):
        assert (tmp_path / "fp" / png).exists(), png
    assert "band-stop Delta" in r.output and "TPR" in r.output
    # a checkpoint written by the run is reusable
    r = runner.invoke(main, ["freq-probe", *data, "--checkpoint", str(tmp_path / "fp" / "model" / "best.pt"),
                             "--method", "greedy", "--patch", "1", "--classes", "0", "--max-images-per-class", "8",
                             "--out", str(tmp_path / "fp2"), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "fp2" / "result.json").read_text())["result"]["classes"][0]["method"] == "greedy"


def test_cli_no_dfm_gives_band_tables_only(tmp_path):
    r = CliRunner().invoke(main, ["freq-probe", "--data", "synthetic-freq", "-D", "n_train=120", "-D", "n_val=40",
                                  "-D", "n_test=40", "-D", "image_size=16", "--model", "mlp", "--epochs", "1",
                                  "--no-dfm", "--out", str(tmp_path), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "result.json").read_text())["result"]
    assert result["classes"] == [] and result["shortcut"] == [] and len(result["band_stop"]["delta"]) == 4
    assert (tmp_path / "band_stop.png").exists() and not (tmp_path / "dfm.png").exists()


def test_cli_runs_on_cifar10_files(tmp_path):
    """The headline command on the real CIFAR-10 file layout (tiny fake batches made here)."""
    from test_data import _write_cifar

    _write_cifar(tmp_path / "data", n_per_batch=20)
    r = CliRunner().invoke(main, ["freq-probe", "--data", "cifar10", "--data-root", str(tmp_path / "data"),
                                  "-D", "val_size=20", "--model", "mlp", "-M", "width=16", "--epochs", "1",
                                  "--patch", "8", "--max-images-per-class", "2", "--classes", "0,1",
                                  "--out", str(tmp_path / "out"), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "out" / "result.json").read_text())["result"]
    assert result["image_shape"] == [3, 32, 32] and [c["label"] for c in result["classes"]] == [0, 1]
    assert result["band_stop"] is None  # no radial-band structure to report on real data
    r = CliRunner().invoke(main, ["freq-probe", "--data", "cifar10", "--data-root", str(tmp_path / "nowhere"),
                                  "--out", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "data_batch_1" in r.output
