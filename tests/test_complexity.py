"""Feature complexity by V-information: a ground truth (a linear target is simpler than one
that needs depth), consistency of the run with direct computations, dynamics, resume, errors."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast.data import DatasetSplits, ImageDataset
from shortcut_fast.experiments import complexity as cx
from shortcut_fast.experiments.stats import spearman
from shortcut_fast.models import Classifier, block_outputs, build_model, features_and_head, model_blocks
from shortcut_fast.ops.directions import Directions
from shortcut_fast.ops.probe_stats import fit_probes
from shortcut_fast.run_folder import RunFolder, Store
from shortcut_fast.train import TrainConfig, train
from cli_runner import run_cli


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (conftest)


# ---------------------------------------------------------------------------------------
# Ground truth: a target linear in the pixels vs the XOR of two distant regions


class _Tiny(Classifier):
    """Two local conv blocks (receptive fields 3 and 5 px, spatially pooled when probed) and
    one global block: only the global block can combine the two regions 8 px apart."""

    def __init__(self):
        super().__init__(in_channels=1, image_size=None)
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.block3 = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 16, 32), nn.ReLU())
        self.head = nn.Linear(32, 2)
        self.block_names = ["block1", "block2", "block3"]

    def features(self, x):
        return self.block3(self.block2(self.block1(x)))


def _xor_images(n, g):
    a, b = torch.rand(n, generator=g), torch.rand(n, generator=g)
    x = 0.05 * torch.randn(n, 1, 8, 16, generator=g)
    x[..., :4] += a[:, None, None, None]  # region A: columns 0-3
    x[..., 12:] += b[:, None, None, None]  # region B: columns 12-15
    return x, ((a > 0.5) ^ (b > 0.5)).long()


def _targets(x, _feats):
    a, b = x[..., :4].mean((1, 2, 3)), x[..., 12:].mean((1, 2, 3))
    simple = a  # linear in the pixels
    complex_ = torch.sign(a - 0.5) * torch.sign(b - 0.5)  # XOR of the two regions' signs
    return torch.stack([simple, complex_], 1)


def test_ground_truth_linear_target_is_simpler_than_xor():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = _xor_images(400, g)
    x_test, _ = _xor_images(400, g)
    model = _Tiny()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(25):
        perm = torch.randperm(400, generator=g)
        for i in range(0, 400, 50):
            idx = perm[i:i + 50]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    v = cx.layer_v_information(model, x_train, x_test, _targets, batch_size=128)  # (2, 3)
    assert v.shape == (2, 3)
    complexity = 1 - v.mean(1)
    # The pixel-linear target is decodable at the first block; the XOR only at the global one.
    assert v[0, 0] > 0.9
    assert v[1, 0] < 0.1 and v[1, 1] < 0.1
    assert v[1, 2] > 0.5
    assert complexity[0] < 0.4
    assert complexity[1] > complexity[0] + 0.3

    # The streamed per-layer probes equal probes fit on the materialized block outputs.
    with torch.no_grad():
        tr, te = block_outputs(model, x_train), block_outputs(model, x_test)
        z_tr, z_te = _targets(x_train, None), _targets(x_test, None)
    direct = fit_probes(tr["block2"].double(), z_tr.double(), te["block2"].double(), z_te.double())
    torch.testing.assert_close(v[:, 1], direct.v_information.float(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# A full run on a toy dataset with a trained small-cnn and two checkpoints


def _toy_splits():
    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.rand(n, 3, 16, 16, generator=g) * 0.5
        x[:, 0] += 0.3 * (y == 0)[:, None, None]  # color cue
        x[:, 1, :8] += 0.3 * (y == 1)[:, None, None]  # a half-image cue
        return ImageDataset(x, y, num_classes=3)

    return DatasetSplits("toy", make(200), make(90), make(90), num_classes=3, image_shape=(3, 16, 16))


def _run(out, cfg, resume=False) -> RunFolder:
    return RunFolder(out, "complexity", dataclasses.asdict(cfg), resume=resume)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("complexity")
    splits = _toy_splits()
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=3, image_size=16, width=4, padding=2)
    train(model, splits, TrainConfig(epochs=2, keep_every=1, select="last", batch_size=50, warmup_epochs=0),
          store=Store(root / "model", resuming=False), progress=False)
    cfg = cx.ComplexityConfig(directions="pca:5", max_images=150, max_heldout=80, batch_size=64)
    out = root / "out"
    with _run(out, cfg) as run:
        result = cx.run_complexity(model, splits, cfg, store=run.partial, checkpoints=root / "model", progress=False)
        cx.write_outputs(result, out)
    return dict(splits=splits, model=model, cfg=cfg, out=out, ckpts=root / "model", result=result)


def test_run_writes_outputs_and_matches_direct_computation(toy):
    r, out, model, splits = toy["result"], toy["out"], toy["model"], toy["splits"]
    for name in ("result.json", "features.csv", "complexity_hist.png", "importance_vs_complexity.png",
                 "decodability.png", "dynamics.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "result.json").read_text())
    assert saved["layers"] == ["conv1", "conv2", "conv3"]
    assert len((out / "features.csv").read_text().strip().splitlines()) == 1 + 5
    assert r.n_train == 150 and r.n_heldout == 80 and r.layer_dims == [4, 8, 8]
    v = torch.tensor(r.v_information)
    assert v.shape == (5, 3) and bool((v >= 0).all()) and bool((v <= 1 + 1e-9).all())
    torch.testing.assert_close(torch.tensor(r.complexity), 1 - v.mean(1))
    assert r.decodability["conv3"] == pytest.approx(float(v[:, 2].mean()))
    # conv3 pooled IS the penultimate layer, and PCA codes are linear in it: fully decodable.
    assert bool((v[:, 2] > 0.99).all())

    # Recompute V-information at conv1 and the importance from scratch on the same images.
    state = torch.load(out / "partial" / "final.pt", weights_only=False)
    directions = Directions.from_state_dict(state["directions"])
    train_idx = cx._sample(len(splits.train), 150, 0, 1)
    held_idx = cx._sample(len(splits.val), 80, 0, 2)
    x_tr, _, _ = splits.train.get_batch(train_idx)
    x_he, _, _ = splits.val.get_batch(held_idx)
    features, head = features_and_head(model)
    with torch.no_grad():
        f_tr, f_he = features(x_tr), features(x_he)
        c_tr, c_he = directions.encode(f_tr), directions.encode(f_he)
        mean, std = state["mean"], state["std"]
        direct = fit_probes(block_outputs(model, x_tr)["conv1"].double(), ((c_tr - mean) / std).double(),
                            block_outputs(model, x_he)["conv1"].double(), ((c_he - mean) / std).double())
        torch.testing.assert_close(v[:, 0], direct.v_information.float(), atol=1e-5, rtol=0)
        pred = head(f_he).argmax(1)
        contribution = c_he * (head.weight[pred] @ directions.components.T)
    torch.testing.assert_close(torch.tensor(r.importance, dtype=torch.float64), contribution.abs().mean(0).double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(r.importance_signed, dtype=torch.float64), contribution.mean(0).double(), rtol=1e-4, atol=1e-7)
    assert r.spearman_importance_complexity == pytest.approx(
        spearman(torch.tensor(r.importance), torch.tensor(r.complexity)))


def test_dynamics_end_at_the_final_model(toy):
    r = toy["result"]
    d = r.dynamics
    assert d["epochs"] == [1, 2]
    temporal = torch.tensor(d["temporal_v_information"])
    assert temporal.shape == (2, 5)
    # The last checkpoint is the analysed model (select="last"): its decoding of the final
    # features is the final V-information, and its own features are the final features.
    torch.testing.assert_close(temporal[-1], 1 - torch.tensor(r.complexity, dtype=torch.float32), atol=1e-5, rtol=0)
    assert d["mean_complexity"][-1] == pytest.approx(sum(r.complexity) / 5, abs=1e-5)
    assert d["fraction_decodable"][-1] == 1.0
    for epoch, score in zip(d["decodable_from"], d["temporal_score"]):
        assert epoch in (1, 2)
        assert 0 <= score <= 1


def test_resume_reuses_finished_work(toy):
    model, splits, cfg, out = toy["model"], toy["splits"], toy["cfg"], toy["out"]
    calls = []
    handle = model.conv1.register_forward_hook(lambda *a: calls.append(1))
    try:
        with _run(out, cfg, resume=True) as run:
            again = cx.run_complexity(model, splits, cfg, store=run.partial, checkpoints=toy["ckpts"], progress=False)
        assert calls == []  # nothing recomputed: directions, statistics and checkpoints were saved
        assert again.v_information == toy["result"].v_information
        assert again.dynamics["temporal_v_information"] == toy["result"].dynamics["temporal_v_information"]
        (out / "partial" / "checkpoint_002.json").unlink()
        with _run(out, cfg, resume=True) as run:
            redo = cx.run_complexity(model, splits, cfg, store=run.partial, checkpoints=toy["ckpts"], progress=False)
        assert calls  # the missing checkpoint was redone
        torch.testing.assert_close(torch.tensor(redo.dynamics["temporal_v_information"]),
                                   torch.tensor(toy["result"].dynamics["temporal_v_information"]))
        calls.clear()
        path = toy["ckpts"] / "epoch_001.pt"
        original = path.read_bytes()
        state = torch.load(path, weights_only=True)
        state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
        torch.save(state, path)
        try:
            with _run(out, cfg, resume=True) as run:
                cx.run_complexity(model, splits, cfg, store=run.partial, checkpoints=toy["ckpts"], progress=False)
        finally:
            path.write_bytes(original)
        assert calls  # a checkpoint file with other contents is analysed again
    finally:
        handle.remove()
    other = cx.ComplexityConfig(directions="pca:3", max_images=150, max_heldout=80)
    with pytest.raises(ValueError, match="settings differ.*directions"):
        _run(out, other, resume=True).open()


def test_dead_features_are_left_out_of_the_summaries():
    v = torch.tensor([[0.9, 0.7], [0.1, 0.3], [0.0, 0.0]], dtype=torch.float64)
    importance = torch.tensor([1.0, 2.0, 0.0])
    s = cx._summaries(v, importance, torch.tensor([True, True, False]), top_fraction=0.5)
    assert s["complexity"][:2].tolist() == pytest.approx([0.2, 0.8]) and s["complexity"][2].isnan()
    assert s["spearman"] == pytest.approx(1.0)  # the more important feature is the more complex one
    assert s["top"] == pytest.approx(0.8) and s["rest"] == pytest.approx(0.2)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.5, 2.5, 4.0])) == pytest.approx(1.0)


@pytest.mark.parametrize("spec", ["svd:4", "nmf:0", "pca:x", "no_such_file.pt", ""])
def test_bad_directions_spec(spec):
    with pytest.raises(ValueError, match="directions"):
        cx.ComplexityConfig(directions=spec)


def test_bad_arguments(toy, tmp_path):
    model, splits = toy["model"], toy["splits"]
    with pytest.raises(ValueError, match="conv1, conv2, conv3"):
        cx.run_complexity(model, splits, cx.ComplexityConfig(layers=["conv9"], directions="pca:2"), progress=False)
    with pytest.raises(FileNotFoundError, match="epoch_NNN"):
        cx.run_complexity(model, splits, cx.ComplexityConfig(directions="pca:2"), checkpoints=tmp_path,
                          progress=False)
    for kwargs in (dict(heldout_split="train"), dict(max_images=1), dict(alphas=[0.0]), dict(decodable_fraction=0),
                   dict(nmf_solver="als"), dict(v_information="bits")):
        with pytest.raises(ValueError):
            cx.ComplexityConfig(**kwargs)
    with pytest.raises(ValueError, match="k must be"):  # more PCA directions than the 8-d features allow
        cx.run_complexity(model, splits, cx.ComplexityConfig(directions="pca:20", max_images=40), progress=False)


def test_cli_trains_and_runs_with_nmf_and_dynamics(tmp_path):
    out = tmp_path / "cx"
    args = ["complexity", "--data", "synthetic-freq", "-D", "n_train=120", "-D", "n_val=60", "-D", "n_test=60",
            "-D", "image_size=16", "--model", "small-cnn", "-M", "width=4", "-M", "padding=2", "--epochs", "2",
            "--directions", "nmf:6", "--dynamics", "--layers", "conv1,conv3", "--quiet", "--out", str(out)]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "mean V-information" in result.output and "dynamics" in result.output
    record = json.loads((out / "result.json").read_text())
    assert record["command"] == "complexity" and record["trained"]["epochs"] == 2
    r = record["result"]
    assert r["layers"] == ["conv1", "conv3"] and r["directions"]["kind"] == "nmf"
    assert len(r["complexity"]) == 6 and r["dynamics"]["epochs"] == [1, 2]
    assert all(i >= 0 for i in r["importance"])
    bad = run_cli(*args[:-2] + ["--directions", "svd:3", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "directions" in bad.output
    # The V-information form and the NMF solver are result settings: a resume with another refuses.
    for option, value in (("--v-information", "gaussian-nats"), ("--nmf-solver", "mu")):
        other = run_cli(*args + [option, value, "--resume"])
        assert other.exit_code != 0 and option.lstrip("-").replace("-", "_") in other.output, other.output


def test_gaussian_nats_form_is_the_log_of_the_r2_form(toy):
    """Same probes, another V-information: per feature and layer
    I_nats = -1/2 log(1 - R^2) (learned-variance Gaussian family) where R^2 is the fixed-variance
    value of the default run; complexity keeps its formula 1 - mean over layers."""
    from shortcut_fast.ops.probe_stats import v_information_from_r2

    model, splits = toy["model"], toy["splits"]
    cfg = dataclasses.replace(toy["cfg"], v_information="gaussian-nats")
    r = cx.run_complexity(model, splits, cfg, progress=False)
    v_r2 = torch.tensor(toy["result"].v_information, dtype=torch.float64)
    v_nats = torch.tensor(r.v_information, dtype=torch.float64)
    mid = v_r2 < 0.999  # away from R^2 = 1, where the log amplifies rounding
    torch.testing.assert_close(v_nats[mid], v_information_from_r2(v_r2[mid], "gaussian-nats"), rtol=1e-4, atol=1e-6)
    assert bool((v_nats[~mid] > 3.0).all())  # conv3 decodes PCA codes almost exactly: several nats
    torch.testing.assert_close(torch.tensor(r.complexity, dtype=torch.float64), 1 - v_nats.mean(1))
    assert r.config["v_information"] == "gaussian-nats"


# ---------------------------------------------------------------------------------------
# The two named factors (label vs spurious attribute)


def _factor_data(n=400, seed=0):
    """Images whose mean colour is their attribute (drawn independently of the label) and whose
    content says nothing about the label: the attribute is decodable, the label is not."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    a = torch.randint(0, 4, (n,), generator=g)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    x = 0.2 * torch.rand(n, 3, 8, 8, generator=g) + colours[a][:, :, None, None]
    return ImageDataset(x, y, a, num_classes=4, num_attributes=4)


def test_factor_probes_tell_a_decodable_attribute_from_an_absent_label():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=4, in_channels=3, image_size=8, depth=3, width=32).eval()
    ds = _factor_data()
    layers = model_blocks(model)
    f = cx.factor_probes(model, ds, layers, batch_size=64)
    for layer in layers:
        assert f["decodability"]["attribute"][layer] > 0.5
        assert f["decodability"]["label"][layer] < 0.1
    assert f["complexity"]["attribute"] < f["complexity"]["label"]
    # decision shares against a direct count
    feats_fn, head = features_and_head(model)
    with torch.no_grad():
        pred = head(feats_fn(ds.images)).argmax(1)
    other = ds.attributes != ds.labels
    assert f["decision"]["images"] == int(other.sum())
    assert f["decision"]["follows_label"] == pytest.approx(float((pred == ds.labels)[other].float().mean()))
    assert f["decision"]["follows_attribute"] == pytest.approx(float((pred == ds.attributes)[other].float().mean()))


def test_factor_probes_only_where_the_attribute_names_a_class():
    from shortcut_fast.data import load_dataset
    assert cx._factor_split(load_dataset("colored-digits")) is not None
    assert cx._factor_split(load_dataset("digits")) is None                      # no attribute
    assert cx._factor_split(load_dataset("digits", shortcut="patch")) is None    # attribute "none" on test
