"""The frequency-shortcut experiment: fast search == reference loop, planted shortcut found,
greedy/gradient variants, tables, resume, CLI."""
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from shortcut_fast.data import DatasetSplits, ImageDataset
from shortcut_fast.experiments import freq_probe as fp
from shortcut_fast.experiments.stats import spearman
from shortcut_fast.ops import freq
from shortcut_fast.ops.band_filter import band_filter, remove_frequencies
from shortcut_fast.run_folder import RunFolder
from shortcut_fast.train import TrainConfig, train
from cli_runner import run_cli

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


def _bn_resnet(width=4):
    """A ResNet-18 whose BatchNorms are far from the identity (folding them matters)."""
    from shortcut_fast.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=width).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return model


def test_inference_model_folds_batchnorms_and_keeps_the_function():
    model = _bn_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 3, 32, 32)
    fast = fp.inference_model(model, x[:1])
    assert fast is not model and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    # the model itself is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    # centred models fold their inner model and keep the centre
    centred = fp.CentredModel(model, torch.tensor([0.5, 0.4, 0.3]))
    fast_centred = fp.inference_model(centred, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(fast_centred(x), centred(x), rtol=1e-4, atol=1e-5)

    class Branchy(nn.Module):  # data-dependent control flow: fx cannot trace it
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.Flatten(), nn.LazyLinear(2))

        def forward(self, x):
            return self.net(x) if bool(x.sum() > 0) else -self.net(x)

    branchy = Branchy().eval()
    branchy(x)
    assert fp.inference_model(branchy, x[:1]) is branchy


def test_inference_model_refuses_a_rewrite_that_changes_the_function(monkeypatch):
    import torch.fx.experimental.optimization as fx_opt

    model = _bn_resnet()
    real = fx_opt.fuse

    def broken(gm, **kw):  # folds, then loses the classifier's bias
        out = real(gm, **kw)
        out.head.bias.data += 1.0
        return out

    monkeypatch.setattr(fx_opt, "fuse", broken)
    assert fp.inference_model(model, torch.rand(1, 3, 32, 32)) is model


def test_search_on_a_batchnorm_model_equals_the_reference_loop(monkeypatch):
    monkeypatch.setattr(fp, "INFERENCE_COPY_MIN_FORWARDS", 1)  # the folded copy runs even for this small search
    used = []
    real = fp.inference_model
    monkeypatch.setattr(fp, "inference_model", lambda m, x, **kw: used.append(real(m, x, **kw)) or used[-1])
    model = _bn_resnet()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 32, 32, generator=g)
    candidates = fp.Candidates.build(32, 32, 1)
    index = torch.arange(0, len(candidates), 37)
    fast, _ = fp.candidate_losses(model, images, 3, candidates, index, batch_size=8)
    slow = fp.dfm_losses_reference(model, images, 3, fp.Candidates(candidates.masks[index], candidates.pairs[index]))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert len(used) == 1 and used[0] is not model


def test_compiled_search_equals_the_reference_loop_and_compiles_once(monkeypatch):
    monkeypatch.setattr(fp, "INFERENCE_COPY_MIN_FORWARDS", 1)
    model = _bn_resnet()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(5, 3, 32, 32, generator=g)
    candidates = fp.Candidates.build(32, 32, 1)
    index = torch.arange(3, len(candidates), 41)  # 13 candidates x 5 images: full batches of 8 and a rest
    sub = fp.Candidates(candidates.masks[index], candidates.pairs[index])
    slow = fp.dfm_losses_reference(model, images, 1, sub)
    fast, _ = fp.candidate_losses(model, images, 1, candidates, index, batch_size=8, compile="on")
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    key, copy = fp._COMPILED[model]  # compiled, not silently the folded copy
    assert isinstance(copy, fp._FixedBatch) and copy.batch == 8
    again, _ = fp.candidate_losses(model, images, 1, candidates, index, batch_size=8, compile="on")
    assert fp._COMPILED[model][1] is copy  # the next class reuses it
    torch.testing.assert_close(again, fast, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    assert fp._weights_key(model) != key[-1]  # new weights: compiled afresh
    off, _ = fp.candidate_losses(model, images[:2], 1, candidates, index[:2], batch_size=8, compile="off")
    assert fp._COMPILED[model][1] is copy  # "off" neither compiles nor uses the compiled copy
    with pytest.raises(ValueError, match="compile must be one of"):
        fp.candidate_losses(model, images, 1, candidates, index, compile="yes")
    with pytest.raises(ValueError, match="compile must be one of"):
        fp.FreqProbeConfig(compile="always")


def test_compile_failure_warns_and_runs_the_folded_copy(monkeypatch):
    monkeypatch.setattr(fp, "INFERENCE_COPY_MIN_FORWARDS", 1)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    model = _bn_resnet()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    candidates = fp.Candidates.build(32, 32, 1)
    index = torch.arange(0, len(candidates), 97)
    with pytest.warns(RuntimeWarning, match="compile: torch.compile failed here"):
        fast, _ = fp.candidate_losses(model, images, 2, candidates, index, batch_size=4, compile="on")
    slow = fp.dfm_losses_reference(model, images, 2, fp.Candidates(candidates.masks[index], candidates.pairs[index]))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert model not in fp._COMPILED


def test_compile_auto_only_for_a_long_cpu_search():
    model = _bn_resnet()
    x = torch.rand(1, 3, 32, 32)
    per_image = fp.forward_flops(model, x)
    assert per_image > 0
    enough = math.ceil(fp.COMPILE_MIN_FLOPS / per_image)
    assert not fp.should_compile("auto", model, x, enough - 1)
    assert fp.should_compile("auto", model, x, enough)
    assert not fp.should_compile("auto", model, x.to("meta"), 10 ** 12)  # not the CPU
    assert fp.should_compile("on", model, x, 1) and not fp.should_compile("off", model, x, 10 ** 12)


def test_default_batch_size_is_sized_from_the_model():
    from shortcut_fast.models import build_model

    x = torch.rand(1, 3, 32, 32)
    wide, narrow = (build_model("resnet18", num_classes=10, width=w) for w in (64, 16))
    stats = wide.stem.bn.running_mean.clone()
    # the largest activation of one image: the stem's (width, 32, 32) float32 output
    assert fp.activation_bytes(wide, x) == 64 * 32 * 32 * 4 and fp.activation_bytes(narrow, x) == 16 * 32 * 32 * 4
    assert fp.default_batch_size("cpu", wide, x) == 32 and fp.default_batch_size("cpu", narrow, x) == 128
    assert fp.default_batch_size("cpu") == 128 and fp.default_batch_size("cuda", wide, x) == 1024
    # the probe forward runs in eval mode: a model in training mode keeps its statistics and mode
    assert wide.training and torch.equal(wide.stem.bn.running_mean, stats)
    cfg = fp.FreqProbeConfig().resolved("cpu", wide, x)
    assert cfg.batch_size == 32 and fp.FreqProbeConfig(batch_size=7).resolved("cpu", wide, x).batch_size == 7


@pytest.mark.parametrize("reference", ["last", "base"])
def test_greedy_is_exact_under_speculation(planted, reference):
    """Speculative batching gives the same DFM as the one-pair-at-a-time walk, for both rules."""
    model, splits = planted
    images = fp._class_images(splits.test, 0, 20, 0, "cpu")
    fast, details = fp.greedy_dfm(model, images, 0, tolerance=1, reference=reference)
    # the plain sequential walk
    pairs = freq.conjugate_pairs(16, 16)
    with torch.no_grad():
        base = ref = int((model(images).argmax(1) == 0).sum())
        current, removed = images.clone(), torch.zeros(16, 16, dtype=torch.bool)
        for p in pairs:
            trial = remove_frequencies(current, p[None], backend="torch")[0]
            hits = int((model(trial).argmax(1) == 0).sum())
            if ref - hits <= 1:
                current = trial
                removed |= freq.pair_masks(16, 16, p[None])[0]
                ref = hits if reference == "last" else base
    assert torch.equal(fast, ~removed)
    assert fast[PLANTED] and details["evaluations"] >= len(pairs)
    if reference == "base":  # only the base rule bounds the total drop
        assert details["base_correct"] - details["final_correct"] <= 1


@pytest.mark.parametrize("max_speculation", [1, 64])
def test_greedy_rules_on_a_toy_count_sequence(max_speculation):
    """Hand-computed. Base count 100, t = 6; removing group g (on top of the kept removals)
    costs cost[g] correct images, costs 3, 4, 2, 5, 1, 8.
    Published rule (reference = count after the last kept removal):
      g0 97 >= 100-6 keep (ref 97); g1 93 >= 91 keep (93); g2 91 >= 87 keep (91);
      g3 86 >= 85 keep (86); g4 85 >= 80 keep (85); g5 77 < 79 reject -> DFM {g5}, total drop 15.
    Ours (reference = 100): g0 97 keep; g1 93 < 94 reject; g2 95 keep; g3 90 reject;
      g4 94 keep; g5 86 reject -> DFM {g1, g3, g5}, total drop 6."""
    cost = [3, 4, 2, 5, 1, 8]
    for reference, want_kept, want_final in (("last", {5}, 85), ("base", {1, 3, 5}, 94)):
        removed: list[int] = []
        last_idx: list[int] = []

        def trial_hits(idx):
            last_idx[:] = idx
            return torch.tensor([100 - sum(cost[r] for r in removed) - cost[g] for g in idx])

        rule = fp.GreedyRule(100, 6, reference)
        kept_removals, evaluations = fp.greedy_walk(len(cost), trial_hits, lambda k: removed.append(last_idx[k]),
                                                    rule, max_speculation=max_speculation)
        assert kept_removals == removed
        assert set(range(len(cost))) - set(removed) == want_kept, reference
        assert 100 - sum(cost[r] for r in removed) == want_final and rule.count == (want_final if reference == "last"
                                                                                     else 100)
        assert evaluations >= len(cost)
    with pytest.raises(ValueError, match="greedy_reference must be one of"):
        fp.GreedyRule(100, 6, "first")


def _unshift(i, j, n):
    return ((i + n // 2) % n, (j + n // 2) % n)


def test_published_removal_order_by_hand_and_at_32():
    """4 x 4 by hand: the clockwise spiral of the shifted grid is
         1  2  3  4          the published rule keeps it on columns < 2, takes the value of the
        12 13 14  5          conjugate partner ((4-i)%4, (4-j)%4) on columns >= 2, and 0 on row 0
        11 16 15  6          right of the centre column:     1  2  3  0
        10  9  8  7                                         12 13  8  9
                                                             11 16 15 16
                                                             10  9 14 13
    Walk from the highest value: 16 {(2,1),(2,3)}, 15 {(2,2)} = DC, 14 {(3,2)}, 13 {(1,1),(3,3)},
    12, 11, 10 (single entries of column 0), 9 {(1,3),(3,1)}, 8 {(1,2)}, 3, 2, 1 (row 0);
    (0,3) is removed from the start."""
    groups, always = fp.published_removal_order(4, 4)
    want = [[(2, 1), (2, 3)], [(2, 2)], [(3, 2)], [(1, 1), (3, 3)], [(1, 0)], [(2, 0)], [(3, 0)], [(1, 3), (3, 1)],
            [(1, 2)], [(0, 2)], [(0, 1)], [(0, 0)]]
    got = [{tuple(x) for x in g.tolist()} for g in groups]
    assert got == [{_unshift(i, j, 4) for i, j in g} for g in want]
    assert {tuple(x) for x in always.tolist()} == {_unshift(0, 3, 4)}
    # 32 x 32 (CIFAR, the released file): DC walked second, the (0, +-1) pair first; 544
    # groups; the 15 Nyquist-row entries with v in 1..15 never tested; every frequency once.
    groups, always = fp.published_removal_order(32, 32)
    assert len(groups) == 544 and {tuple(x) for x in groups[0].tolist()} == {(0, 1), (0, 31)}
    assert groups[1].tolist() == [[0, 0]] and groups[-1].tolist() == [[16, 16]]
    assert sorted(always.tolist()) == [[16, v] for v in range(1, 16)]
    everything = torch.cat(groups + [always])
    assert len({tuple(x) for x in everything.tolist()}) == everything.shape[0] == 1024
    with pytest.raises(ValueError, match="square images with an even side"):
        fp.published_removal_order(16, 15)


def test_published_order_greedy_equals_the_published_masking(planted):
    """greedy_dfm(order="published") equals the plain walk of the published script: binary
    mask on the shifted spectrum, inverse FFT, real part, reference reset at every kept removal."""
    model, splits = planted
    images = fp._class_images(splits.test, 0, 12, 0, "cpu")
    fast, details = fp.greedy_dfm(model, images, 0, tolerance=1, reference="last", order="published")
    groups, always = fp.published_removal_order(16, 16)
    with torch.no_grad():
        ref = int((model(images).argmax(1) == 0).sum())
        mask = torch.ones(16, 16)
        mask[always[:, 0], always[:, 1]] = 0
        for g in groups:
            trial = mask.clone()
            trial[g[:, 0], g[:, 1]] = 0
            x = torch.fft.ifft2(torch.fft.fft2(images.double()) * trial.double()).real.float()
            hits = int((model(x).argmax(1) == 0).sum())
            if hits >= ref - 1:
                mask, ref = trial, hits
    assert torch.equal(fast, mask.bool())
    assert 0 < int(fast.sum()) < 256 - 7  # the walk both kept and removed removals
    assert details["always_removed"] == 7 and details["groups"] == len(groups) and details["order"] == "published"
    assert not fast[8, 1:8].any()  # the 7 never-tested Nyquist-row entries are never in the DFM


class _Recorder(nn.Module):
    """Records its input; predicts class 0."""

    def forward(self, x):
        self.seen = x.detach().clone()
        return torch.stack([torch.ones(x.shape[0]), torch.zeros(x.shape[0])], dim=1)


def test_dc_removal_gives_the_mean_colour_not_black():
    """Hand-computed. The published code filters the normalized input (x - m) / s. Removing
    DC there sets each channel to its spatial mean 0, i.e. (after undoing the normalization)
    to m: the dataset-mean colour. A uniform image of colour (0.9, 0.1, 0.4) with m =
    (0.5, 0.25, 0.75) becomes (0.5, 0.25, 0.75); in [0, 1] pixels (centre zero) it becomes
    black. A non-uniform channel [[0.1, 0.3], [0.5, 0.7]] (spatial mean 0.4) with m = 0.5
    becomes x - 0.4 + 0.5 = [[0.2, 0.4], [0.6, 0.8]]."""
    x = torch.tensor([0.9, 0.1, 0.4]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    x[0, 0] = torch.tensor([[0.1, 0.3], [0.5, 0.7]])
    x[0, 1:] = torch.tensor([0.1, 0.4]).view(2, 1, 1)
    no_dc = torch.ones(1, 2, 2, dtype=torch.bool)
    no_dc[0, 0, 0] = False
    centre = fp.InputCentre([0.5, 0.25, 0.75], [0.2, 0.3, 0.4], "test")
    model = _Recorder()
    fp.shortcut_table(model, x, torch.zeros(1, dtype=torch.long), no_dc, centre=centre, backend="torch")
    want = torch.tensor([[[0.2, 0.4], [0.6, 0.8]], [[0.25, 0.25], [0.25, 0.25]], [[0.75, 0.75], [0.75, 0.75]]])
    torch.testing.assert_close(model.seen[0], want)
    # the same as filtering the normalized input and undoing the normalization
    m, s = torch.tensor(centre.mean).view(3, 1, 1), torch.tensor(centre.std).view(3, 1, 1)
    normalized = (x[0] - m) / s
    torch.testing.assert_close((normalized - normalized.mean(dim=(1, 2), keepdim=True)) * s + m, want)
    fp.shortcut_table(model, x, torch.zeros(1, dtype=torch.long), no_dc, centre=None, backend="torch")
    torch.testing.assert_close(model.seen[0, 1:], torch.zeros(2, 2, 2), atol=1e-6, rtol=0)  # black


def test_input_centre_sources():
    """dataset-mean: the per-channel mean (and std) of the train split, by hand; a model with
    an input normalization gives its own; zero: none."""
    from shortcut_fast.models.bridges import Normalize

    x = torch.zeros(2, 2, 1, 2)
    x[0, 0] = torch.tensor([0.0, 1.0])  # channel 0: 0, 1, 1, 0 -> mean 0.5, std 0.5
    x[1, 0] = torch.tensor([1.0, 0.0])
    x[:, 1] = 0.2  # channel 1: constant -> mean 0.2, std 0 (kept as 1: no scaling)
    train = ImageDataset(x, torch.tensor([0, 1]), num_classes=2, name="tiny")
    c = fp.input_centre("dataset-mean", nn.Identity(), train, batch_size=1)
    assert c.mean == pytest.approx([0.5, 0.2]) and c.std == pytest.approx([0.5, 1.0])
    assert c.source.startswith("train split mean")
    normalized = nn.Sequential(Normalize([0.4, 0.3], [0.2, 0.1]), nn.Flatten())
    c = fp.input_centre("dataset-mean", normalized, train)
    assert c.mean == pytest.approx([0.4, 0.3]) and c.std == pytest.approx([0.2, 0.1])
    assert c.source == "model normalization"
    assert fp.input_centre("zero", normalized, train, channels=2).is_zero()
    with pytest.raises(ValueError, match="filter_centre must be one of"):
        fp.input_centre("median", None, train)


def test_adcs_published_by_hand():
    """Hand-computed on class SUMS S (3 classes, RGB, 1 x 2 spectrum). Luminance of the
    sums (0.2989 R + 0.587 G + 0.114 B): frequency 0: S0 = R -> 0.2989, S1 = G -> 0.587,
    S2 = B -> 0.114; frequency 1: S0 = G, S1 = G, S2 = R -> 0.587, 0.587, 0.2989.
    Published: for c, sum over ALL j (j = c included) of +1 if gray_c - gray_j > 0 else -1:
      f0: c0: -1 (self) -1 (vs 1) +1 (vs 2) = -1; c1: +1 -1 +1 = +1; c2: -1 -1 -1 = -3
      f1: c0: -1 -1 (tie) +1 = -1; c1: -1 (tie) -1 +1 = -1; c2: -3.
    Ours (channel mean, j != c, sign): every class has mean 1/3 at both frequencies -> 0."""
    S = torch.zeros(3, 3, 1, 2)
    S[0, 0, 0, 0] = S[1, 1, 0, 0] = S[2, 2, 0, 0] = 1.0
    S[0, 1, 0, 1] = S[1, 1, 0, 1] = S[2, 0, 0, 1] = 1.0
    assert fp.adcs_published(S).tolist() == [[[-1, -1]], [[1, -1]], [[-3, -3]]]
    from shortcut_fast.ops import adcs

    assert adcs(S).tolist() == [[[0, 0]]] * 3
    # without ties the published map is ours (on luminance) shifted by -1
    gray = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    assert torch.equal(fp.adcs_published(gray), adcs(gray) - 1)
    with pytest.raises(ValueError, match="3 \\(RGB\\) or 1 channel"):
        fp.adcs_published(torch.ones(2, 2, 1, 1))


def test_band_learning_tracker_reports_band_pass_and_band_stop(planted):
    model, splits = planted
    x, y, _ = splits.val.get_batch(torch.arange(40))
    tracker = fp.BandLearningTracker(x, y, 4, every=1, centre=lambda net: fp.InputCentre([0.0], None, "zero"),
                                     backend="torch")
    tracker(1, model)
    masks = freq.band_masks(16, 16)
    with torch.no_grad():
        for b in range(4):
            stopped = model(band_filter(x, masks[b], "stop", backend="torch")[0]).argmax(1)
            kept = model(band_filter(x, masks[b], "pass", backend="torch")[0]).argmax(1)
            assert tracker.band_stop[0][b] == pytest.approx(float((stopped == y).float().mean()))
            assert tracker.band_pass[0][b] == pytest.approx(float((kept == y).float().mean()))
    # Chance 1/4, threshold 0.25 + 0.25 * 0.75 = 0.4375: first reached at step 20. There B2 is
    # the best band alone (band-pass) but removing B3 costs the most (band-stop).
    tracker.steps, tracker.clean = [10, 20], [0.2, 0.6]
    tracker.band_pass = [[0.3] * 4, [0.3, 0.5, 0.2, 0.1]]
    tracker.band_stop = [[0.2] * 4, [0.55, 0.58, 0.3, 0.6]]
    summary = tracker.summary()
    assert summary["first_step_above_threshold"] == 20
    assert summary["learned_first_band"] == 2 and summary["learned_first_band_by_band_stop"] == 3
    assert summary["band_stop_accuracy"] == tracker.band_stop
    restored = fp.BandLearningTracker(x, y, 4, every=1)
    restored.load_state_dict(tracker.state_dict())
    assert restored.summary() == summary
    with pytest.raises(ValueError, match="no band-stop accuracy"):
        restored.load_state_dict({"steps": [], "band_pass": [], "clean": []})


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
    for name in ("greedy_reference", "greedy_order", "filter_centre", "adcs"):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            fp.FreqProbeConfig(**{name: "nonsense"})
    assert fp.FreqProbeConfig().greedy_reference == "last" and fp.FreqProbeConfig().filter_centre == "dataset-mean"


def test_cli_end_to_end_with_checkpoint_and_ood(tmp_path):
    data = ["--data", "synthetic-freq", "-D", "n_train=200", "-D", "n_val=40", "-D", "n_test=80",
            "-D", "image_size=16", "-D", "channels=1"]
    r = run_cli("freq-probe", *data, "--model", "mlp", "-M", "width=32", "--epochs", "2", "--patch", "4",
                "--max-images-per-class", "8", "--track-every", "2", "--ood", "gaussian-noise:2",
                "--out", tmp_path / "fp", "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "fp" / "result.json").read_text())["result"]
    assert len(result["classes"]) == 4 and len(result["shortcut"]) == 4
    assert len(result["band_stop"]["delta"]) == 4 and "gaussian-noise:2" in result["ood"]
    assert result["learning"]["steps"][0] == 2
    assert len(result["learning"]["band_stop_accuracy"][0]) == 4
    centre = result["config"]["centre"]  # the mlp has no normalization: the train split's mean
    assert centre["source"].startswith("train split mean") and len(centre["mean"]) == 1
    assert result["config"]["greedy_reference"] == "last" and result["config"]["adcs"] == "ours"
    for png in ("adcs.png", "dfm.png", "tpr_fpr.png", "band_stop.png", "learning_order.png"):
        assert (tmp_path / "fp" / png).exists(), png
    assert "band-stop Delta" in r.output and "TPR" in r.output
    # a checkpoint written by the run is reusable
    r = run_cli("freq-probe", *data, "--checkpoint", tmp_path / "fp" / "model" / "best.pt", "--method", "greedy",
                "--patch", "1", "--classes", "0", "--max-images-per-class", "8", "--greedy-order", "published",
                "--greedy-reference", "base", "--adcs", "published", "--filter-centre", "zero",
                "--out", tmp_path / "fp2", "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "fp2" / "result.json").read_text())["result"]
    assert result["classes"][0]["method"] == "greedy" and result["classes"][0]["details"]["order"] == "published"
    assert result["config"]["centre"]["source"] == "zero" and result["config"]["greedy_reference"] == "base"
    assert min(min(row) for row in result["adcs"][0]) >= -4  # published ADCS: values in [-K, K - 2]


def test_cli_no_dfm_gives_band_tables_only(tmp_path):
    r = run_cli("freq-probe", "--data", "synthetic-freq", "-D", "n_train=120", "-D", "n_val=40",
                                  "-D", "n_test=40", "-D", "image_size=16", "--model", "mlp", "--epochs", "1",
                                  "--no-dfm", "--out", str(tmp_path), "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "result.json").read_text())["result"]
    assert result["classes"] == [] and result["shortcut"] == [] and len(result["band_stop"]["delta"]) == 4
    assert (tmp_path / "band_stop.png").exists() and not (tmp_path / "dfm.png").exists()


def test_cli_runs_on_cifar10_files(tmp_path):
    """The headline command on the real CIFAR-10 file layout (tiny fake batches made here)."""
    from test_data import _write_cifar

    _write_cifar(tmp_path / "data", n_per_batch=20)
    r = run_cli("freq-probe", "--data", "cifar10", "--data-root", str(tmp_path / "data"),
                                  "-D", "val_size=20", "--model", "mlp", "-M", "width=16", "--epochs", "1",
                                  "--patch", "8", "--max-images-per-class", "2", "--classes", "0,1",
                                  "--out", str(tmp_path / "out"), "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "out" / "result.json").read_text())["result"]
    assert result["image_shape"] == [3, 32, 32] and [c["label"] for c in result["classes"]] == [0, 1]
    # band-stop on any data: the four radial bands of equal width (the classes' reliance per band)
    assert len(result["band_stop"]["delta"]) == 10 and len(result["band_stop"]["accuracy_band_stopped"]) == 4
    r = run_cli("freq-probe", "--data", "cifar10", "--data-root", str(tmp_path / "nowhere"),
                                  "--out", str(tmp_path / "o2"))
    assert r.exit_code != 0 and "data_batch_1" in r.output


def test_cli_cifar10_defaults_are_the_published_search(tmp_path):
    """On CIFAR-10 under the paper recipe freq-probe runs the published DFM search (greedy rule
    over single pairs, reference "last", the published order, every test image of a class) and
    reports the released DFM sizes next to its own; explicit options and --recipe quick override."""
    from test_data import _write_cifar

    _write_cifar(tmp_path / "data", n_per_batch=20)
    args = ["freq-probe", "--data", "cifar10", "--data-root", str(tmp_path / "data"), "-D", "val_size=10",
            "--model", "mlp", "-M", "width=8", "--epochs", "1", "--classes", "0", "--quiet"]
    r = run_cli(*args, "--out", str(tmp_path / "paper"))
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "paper" / "result.json").read_text())
    result, cfg = record["result"], record["result"]["config"]
    assert (cfg["method"], cfg["patch"], cfg["greedy_reference"], cfg["greedy_order"], cfg["max_images_per_class"]) \
        == ("greedy", 1, "last", "published", None)
    assert result["classes"][0]["images"] == 2  # all of the class's test images (2 in the fake files)
    assert result["released_dfm_sizes"] == [459, 561, 368, 395, 112, 410, 158, 468, 202, 413]
    assert record["recipe"]["name"] == "paper"
    assert "the published DFM search by default" in r.output
    row = next(line.split() for line in r.output.splitlines() if line.strip().startswith("0 "))
    assert row[:3] == ["0", str(result["shortcut"][0]["dfm_size"]), "459"]  # ours next to the released size
    assert "released DFM size" in r.output
    # explicit options override the published defaults
    r = run_cli(*args, "--method", "greedy", "--greedy-order", "ours", "--greedy-reference", "base",
                                  "--max-images-per-class", "1", "--out", str(tmp_path / "explicit"))
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "explicit" / "result.json").read_text())["result"]["config"]
    assert (cfg["greedy_order"], cfg["greedy_reference"], cfg["max_images_per_class"]) == ("ours", "base", 1)
    # the quick recipe keeps our CPU-minutes search; the released sizes are still there to compare with
    r = run_cli(*args, "--recipe", "quick", "--patch", "8", "--out", str(tmp_path / "quick"))
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "quick" / "result.json").read_text())["result"]
    cfg = result["config"]
    assert (cfg["method"], cfg["patch"], cfg["greedy_order"], cfg["max_images_per_class"]) == ("loss", 8, "ours", 100)
    assert result["released_dfm_sizes"][0] == 459


def test_probe_defaults():
    paper, note = fp.probe_defaults("cifar10", "paper")
    assert paper == fp.PAPER_PROBE and "published DFM search" in note
    ours, note = fp.probe_defaults("synthetic-freq", "quick")
    assert ours == fp.OUR_PROBE and note is None
    assert fp.probe_defaults("cifar10", "quick")[0] == fp.OUR_PROBE
    # a patch > 1 without --method: the loss method (greedy walks single pairs), said so
    settings, note = fp.probe_defaults("cifar10", "paper", patch=4)
    assert (settings["method"], settings["patch"]) == ("loss", 4) and "--patch 4" in note
    assert fp.probe_defaults("digits", "quick", max_images_per_class=0)[0]["max_images_per_class"] is None  # 0: all
    assert fp.released_dfm_sizes("cifar10") == list(fp.RELEASED_CIFAR10_DFM_SIZES)
    assert fp.released_dfm_sizes("corrupted-cifar10") is None
