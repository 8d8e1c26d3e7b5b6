"""Spurious memorization in a few channels (You et al., arXiv 2501.00961;
docs/experiments.md#spurious-memorization).

`run_memorization` asks whether a model's minority-group gap comes from a few channels that
memorize the minority training samples:
- per-group train and test accuracy and the memorization gap (train minus test), per group;
- an exact ablation sweep (surgery.channel_ablation_sweep) of every channel of the chosen
  layers, on the train and the test split in one pass (the test samples get group ids
  shifted by G), ranking channels by
      score = (minority train accuracy drop) - (majority train accuracy drop);
- the top channels with their per-group train/test accuracies when ablated, the effect of
  ablating each layer's top 1, 2, ..., k channels together, and their weight-norm and
  gradient-norm scores (the paper's two cheaper criteria) for comparison.

`run_mitigation` is the paper's training-time framework: starting from the ERM model, every
epoch masks the `prune_fraction` smallest-magnitude weights (one global threshold; convs
only by default, as published, or convs and linear layers) and every step minimizes
      contrastive(pruned output, dense output; tau) + ce_weight * CE(dense output, y)
with Adam. contrastive_form "sum-2n" (default, the published script): NT2N(sg(dense), pruned)
+ NT2N(dense, sg(pruned)), each the SimCLR loss over all 2N anchors of the two views;
"half-mean" (ours before): 0.5 * (NT(pruned -> sg(dense)) + NT(dense -> sg(pruned))) with N
anchors each, half the published value, so CE weighs twice as much against it. Defaults
follow the published script: 21 epochs, ReduceLROnPlateau(0.5, patience 1) on the training
loss, RandomResizedCrop(0.7-1) + flip. double_softmax=True reproduces its head's extra
Softmax (CE and NT-Xent then see softmax(logits)): a bug there, off by default. The pruned
forward uses the same parameters with the mask applied (torch.func.functional_call), so the
dense weights are never zeroed in place.

Persistence: both take `store=` (a run_folder.Store the caller owns, e.g. a RunFolder's
`partial`); they write resume state only there and never write results or figures (the CLI
writes result.json; plot_memorization / plot_mitigation draw the figures).

Groups. The analysis works on a small set of groups (`Grouping`): the dataset's own groups
(label * num_attributes + attribute) when there are at most 16 of them (Waterbirds, CelebA),
otherwise, for datasets whose attribute is a class index (colored digits / MNIST, injected
shortcuts), two groups: bias-aligned (attribute == label) and bias-conflicting. Minority
groups are the non-empty train groups holding fewer than `minority_fraction` (0.5) times the
mean non-empty train group size (Waterbirds 3498/184/56/1057: groups 1 and 2; CelebA: the
1387 blond men; colored digits: the conflicting group); if none is that small, the smallest
group(s). Majority = the other non-empty groups. Minority/majority accuracies pool the
samples of their groups (sample-weighted).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast import distributed as sd
from shortcut_fast.experiments._api import ApiResult
from shortcut_fast.experiments.stats import spearman
from shortcut_fast.ops._checks import check_labels
from shortcut_fast.ops.ablation import _check_groups, _group_outcomes_unchecked
from shortcut_fast.report import progress_ticker, to_jsonable
from shortcut_fast.run_folder import file_digest, settings_diff, tensor_digest
from shortcut_fast.surgery.split import WHERE
from shortcut_fast.surgery.sweep import MODES, NOISE_KINDS

if TYPE_CHECKING:
    from shortcut_fast.run_folder import Store

WEIGHT_NORM_RANKINGS = ("global", "layer")
CONTRASTIVE_FORMS = ("sum-2n", "half-mean")
PRUNE_LAYERS = ("conv", "conv-linear")
GROUPINGS = ("auto", "group", "alignment")
MITIGATION_SCHEDULES = ("plateau", "constant")
MITIGATION_AUGMENTATIONS = ("resized-crop-flip", "flip-crop", "crop", "none")
MITIGATION_SELECT = ("last", "accuracy", "worst_group_accuracy")
MAX_DATASET_GROUPS = 16  # above this, "auto" groups by alignment (e.g. 10 x 10 colored digits)


# ---------------------------------------------------------------------------------------
# Groups


@dataclass
class Grouping:
    """How samples map to the analysis groups: kind "group" (dataset groups) or "alignment"."""

    kind: str
    names: list[str]

    @property
    def num_groups(self) -> int:
        return len(self.names)

    @classmethod
    def build(cls, splits, kind: str = "auto") -> "Grouping":
        if kind not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {kind!r}")
        num_attributes = int(getattr(splits, "num_attributes", 0) or 0)
        if num_attributes == 0:
            raise ValueError(f"dataset {getattr(splits, 'name', '')!r} has no attributes (groups): the "
                             f"memorization analysis needs a spurious attribute, e.g. --data colored-digits")
        aligned_ok = bool(getattr(splits, "bias_aligned_attribute", False))
        if kind == "auto":
            kind = "group" if splits.num_groups <= MAX_DATASET_GROUPS or not aligned_ok else "alignment"
        if kind == "alignment":
            if not aligned_ok:
                raise ValueError("grouping 'alignment' needs attributes that are class indices "
                                 "(bias_aligned_attribute); use grouping 'group'")
            return cls("alignment", ["aligned", "conflicting"])
        A = num_attributes
        return cls("group", [f"y{g // A}/a{g % A}" for g in range(splits.num_classes * A)])

    def of(self, dataset) -> torch.Tensor:
        """Analysis group of every sample of `dataset` (int64, -1 where the attribute is unknown)."""
        labels, attributes = dataset.labels.cpu(), dataset.attributes.cpu()
        g = (attributes != labels).long() if self.kind == "alignment" else dataset.groups.cpu().clone()
        return torch.where(attributes >= 0, g, torch.full_like(g, -1))


def minority_groups(counts: Sequence[int], fraction: float = 0.5) -> list[int]:
    """Non-empty groups smaller than fraction * mean non-empty size; else the smallest (ties kept)."""
    nonempty = [(g, c) for g, c in enumerate(counts) if c > 0]
    if len(nonempty) < 2:
        raise ValueError(f"need at least two non-empty train groups to compare minority and majority, "
                         f"got counts {list(counts)}")
    mean = sum(c for _, c in nonempty) / len(nonempty)
    small = [g for g, c in nonempty if c < fraction * mean]
    if not small:
        smallest = min(c for _, c in nonempty)
        small = [g for g, c in nonempty if c == smallest]
    if len(small) == len(nonempty):  # all equal: no majority left to compare with
        raise ValueError(f"train groups are all the same size ({list(counts)}): no minority group")
    return small


def _take(dataset, grouping: Grouping, limit: int | None, seed: int, salt: int):
    """(x, y, g) of the samples with a known group, at most `limit` of them (seeded subset), on the CPU."""
    g = grouping.of(dataset)
    index = (g >= 0).nonzero().flatten()
    if limit is not None and index.numel() > limit:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + salt)
        index = index[torch.randperm(index.numel(), generator=gen)[:limit]].sort().values
    # File-backed datasets (Waterbirds, CelebA) decode just these images, once.
    x, y, _ = dataset.get_batch(index.to(dataset.labels.device))
    return x.cpu(), y.cpu(), g[index]


@torch.no_grad()
def group_outcomes_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, num_groups: int, *,
                      batch_size: int = 512, device=None, amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct counts and sample counts per group (both (G,) int64) of `model` in eval mode."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_groups, dtype=torch.int64, device=device)  # read once, after the loop
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(xb).float()
        sl = slice(start, start + batch_size)
        if start == 0:  # labels and groups checked once for every batch (NaN/Inf logits are accepted)
            check_labels("labels", y, y.shape[0], logits.shape[-1], y.device)
            _check_groups(g, g.shape[0], num_groups, g.device)
        c, _ = _group_outcomes_unchecked(logits[None], y[sl].to(device), g[sl].to(device), num_groups)
        correct += c[0]
    model.train(was_training)
    return correct.cpu(), torch.bincount(g, minlength=num_groups)


def _accuracy(correct, counts) -> list[float | None]:
    return [float(c) / float(n) if n > 0 else None for c, n in zip(correct.tolist(), counts.tolist())]


def _pooled(correct: torch.Tensor, counts: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """Sample-weighted accuracy over `groups`: correct (..., G) -> (...) float64 (NaN without samples)."""
    idx = torch.tensor(list(groups), dtype=torch.long)
    n = float(counts[idx].sum())
    return (correct[..., idx].double().sum(-1) / n) if n > 0 else torch.full(correct.shape[:-1], float("nan"),
                                                                             dtype=torch.float64)


def group_report(model: nn.Module, splits, grouping: Grouping, minority: Sequence[int], *, batch_size: int = 512,
                 device=None, amp: bool = False, split_names: Sequence[str] = ("train", "val", "test")) -> dict:
    """Per split: accuracy, per-group accuracy (by name), worst group, minority / majority accuracy."""
    G = grouping.num_groups
    out = {}
    for name in split_names:
        dataset = getattr(splits, name)
        x, y, g = _take(dataset, grouping, None, 0, 0)
        correct, counts = group_outcomes_of(model, x, y, g, G, batch_size=batch_size, device=device, amp=amp)
        acc = _accuracy(correct, counts)
        present = [i for i in range(G) if counts[i] > 0]
        majority = [i for i in present if i not in minority]
        out[name] = {
            "n": int(counts.sum()),
            "accuracy": float(correct.sum()) / max(int(counts.sum()), 1),
            "group_accuracy": {grouping.names[i]: acc[i] for i in present},
            "group_counts": {grouping.names[i]: int(counts[i]) for i in present},
            "worst_group_accuracy": min(acc[i] for i in present) if present else None,
            "minority_accuracy": float(_pooled(correct.double(), counts, [i for i in minority if counts[i] > 0]))
            if any(counts[i] > 0 for i in minority) else None,
            "majority_accuracy": float(_pooled(correct.double(), counts, majority)) if majority else None,
        }
    return out


# ---------------------------------------------------------------------------------------
# Memorization: ablation sweep, ranking, cumulative top-k, importance scores


@dataclass
class MemorizationConfig:
    layers: list[str] | None = None  # None: default_layers(model, where, stem)
    mode: str = "zero"
    # "pre-bn" zeroes the conv's output channel = the published zeroing of its filter weights
    # (bias-free convs, as in ResNets); "output" (the block output) was our default before.
    where: str = "pre-bn"
    stem: bool = True  # default layers include the stem conv (torchvision ResNet-50: conv1)
    repeats: int = 1  # noise modes: draws averaged
    noise_kind: str = "replace"  # weight-noise: replace the channel's weights, or add the noise
    noise_std: float | None = None  # weight-noise: std of N(0, std^2) (required there)
    weight_norm_ranking: str = "global"  # ranks reported: over all convs but downsample (published), or in-layer
    top_k: int = 5  # channels reported, and the largest set of the cumulative top-k sweep
    grouping: str = "auto"
    minority_groups: list[int] | None = None  # None: minority_groups(train counts, minority_fraction)
    minority_fraction: float = 0.5
    max_samples: int | None = None  # per split (seeded subset); None: all
    gradient_samples: int = 200  # lowest-p(true class) train samples per group for the gradient-norm scores
    batch_size: int = 256
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.mode == "noise":
            raise ValueError("mode 'noise' is ambiguous: use 'activation-noise' (ours: activations replaced by "
                             "Gaussian noise with the channel's mean and std) or 'weight-noise' (published: the "
                             "channel's conv weights replaced by / added N(0, noise_std^2))")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.where not in WHERE:
            raise ValueError(f"where must be one of {WHERE}, got {self.where!r}")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {self.noise_kind!r}")
        if self.mode == "weight-noise" and (self.noise_std is None or not self.noise_std > 0):
            raise ValueError(f"mode 'weight-noise' needs noise_std > 0, got {self.noise_std!r}")
        if self.mode != "weight-noise" and self.noise_std is not None:
            raise ValueError(f"noise_std only applies to mode 'weight-noise', got it with mode {self.mode!r}")
        if self.weight_norm_ranking not in WEIGHT_NORM_RANKINGS:
            raise ValueError(f"weight_norm_ranking must be one of {WEIGHT_NORM_RANKINGS}, "
                             f"got {self.weight_norm_ranking!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        for name in ("repeats", "top_k", "batch_size", "gradient_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < self.minority_fraction <= 1:
            raise ValueError(f"minority_fraction must be in (0, 1], got {self.minority_fraction!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be None or >= 1, got {self.max_samples!r}")


@dataclass
class LayerRanking:
    """One swept layer: every channel's ablation outcome and score, comparison scores, cumulative top-k."""

    layer: str
    channels: int
    score: list[float]  # minority train drop - majority train drop, per channel
    minority_drop: list[float]  # train
    majority_drop: list[float]
    test_minority_drop: list[float]
    test_majority_drop: list[float]
    train_accuracy: list[list[float | None]]  # (C, G) per-group train accuracy with the channel ablated
    test_accuracy: list[list[float | None]]
    weight_norm: list[float] | None = None
    weight_norm_global_rank: list[int] | None = None  # 1-based, among every channel of every conv but downsample
    gradient_norm: list[float] | None = None
    spearman_score_vs_weight_norm: float | None = None
    spearman_score_vs_gradient_norm: float | None = None
    cumulative: list[dict] = field(default_factory=list)  # ablating this layer's top 1..k together
    seconds: float = 0.0


@dataclass
class MemorizationResult(ApiResult):
    """What run_memorization / run return; summary() and write(folder) as in the module's `run`."""

    config: dict
    grouping: dict  # kind, names, minority, majority, train/test counts
    baseline: dict  # per split: per-group accuracy ...; gap: per-group train - test
    memorization_gap: dict[str, float | None]
    layers: list[LayerRanking]
    top_channels: list[dict]
    # The published criteria: global top-k by weight norm over every conv but downsample, and
    # per group the global top-k by gradient norm (every conv, downsample included).
    weight_norm_top: list[dict] = field(default_factory=list)
    gradient_norm_top: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0

    _command = "memorization"

    def _summary(self, data: str, out: Path | None) -> str:
        return summary(self, data, out)

    def _write(self, out: Path, record: dict) -> None:
        write_outputs(self, out, record)


def default_layers(model: nn.Module, count: int = 4, *, where: str = "output", stem: bool = False) -> list[str]:
    """The model's blocks when it has at most `count`, else `count` evenly spaced ones (first
    and last kept). where "pre-bn" / "post-activation" name a conv: each block's conv that
    writes its output channels (surgery.sweep.channel_conv). stem=True puts the model's first
    conv in front (the published example channel is in a torchvision ResNet-50's conv1)."""
    from shortcut_fast.models import model_blocks
    from shortcut_fast.surgery.sweep import channel_conv, conv_names

    blocks = model_blocks(model)
    if len(blocks) > count:
        picks = sorted({round(i * (len(blocks) - 1) / (count - 1)) for i in range(count)})
        blocks = [blocks[i] for i in picks]
    if where != "output":
        blocks = [c for c in (channel_conv(model, b) for b in blocks) if c is not None]
    convs = conv_names(model)
    if stem and convs:
        blocks = [convs[0]] + blocks
    out = []
    for name in blocks:  # the stem may also be a block's conv (e.g. small-cnn's conv1.conv)
        if name not in out:
            out.append(name)
    return out


def _spearman(a, b) -> float | None:
    """experiments.stats.spearman (average ranks on ties: many channels share a score of 0),
    None where it is undefined, as a result read back from JSON has it."""
    r = spearman(a, b)
    return None if math.isnan(r) else r


def _rank_desc(values: torch.Tensor, i: int) -> int:
    """1-based rank of values[i] from the largest (ties share the better rank)."""
    return int((values > values[i]).sum()) + 1


def _layer_scores(scores, layer: str) -> torch.Tensor | None:
    if scores is None:
        return None
    value = scores.get(layer) if isinstance(scores, dict) else None
    return None if value is None else torch.as_tensor(value, dtype=torch.float64).flatten().cpu()


def _sweep(model, layers, data, cfg: MemorizationConfig, num_groups: int, *, channel_sets=None, rewind_to=None,
           store=None, progress=False, dist=None):
    from shortcut_fast.surgery import channel_ablation_sweep

    return channel_ablation_sweep(model, layers, data, channel_sets=channel_sets, mode=cfg.mode, where=cfg.where,
                                  repeats=cfg.repeats, rewind_to=rewind_to, num_groups=num_groups,
                                  noise_kind=cfg.noise_kind, noise_std=cfg.noise_std,
                                  batch_size=cfg.batch_size, backend=cfg.backend, seed=cfg.seed,
                                  progress=progress, store=store, dist=dist)


def _tensor(value) -> torch.Tensor:
    return torch.as_tensor(value).cpu()


def run_memorization(model: nn.Module, splits, cfg: MemorizationConfig | None = None, *,
                     store: Store | None = None, device="cpu", progress: bool = True,
                     rewind_to=None, dist=None) -> MemorizationResult:
    """Per-group memorization gap, channel ablation sweep and top channels (see the module docstring).

    dist (a distributed.DistContext with world_size > 1): every sweep splits its channels
    (variants) over the ranks (surgery.sweep), each rank keeps its own finished-layer files
    (layer_<name>.rank<r>.json), and a layer counts as finished only when every rank has it;
    every rank returns the whole result, equal to one process (the counts are integers).

    rewind_to: the earlier model / state dict / checkpoint path for mode "rewind". store (a
    run_folder.Store, e.g. RunFolder(...).partial): each finished layer is saved there as
    layer_<name>.json and each running sweep in sweep_<name>/ and cumulative_<name>/; when the
    store is resuming, finished layers are read back and cut-short sweeps continue. State
    written for another model, data subset or configuration is refused with a ValueError.
    """
    from shortcut_fast.surgery import gradient_norm_scores, weight_norm_scores
    from shortcut_fast.surgery.sweep import conv_names, global_top

    t0 = time.perf_counter()
    cfg = cfg or MemorizationConfig()
    device = torch.device(device)
    model = model.to(device).eval()
    if cfg.mode == "rewind" and rewind_to is None:
        raise ValueError("mode 'rewind' needs rewind_to (an earlier checkpoint of the same model)")
    layers = list(cfg.layers) if cfg.layers else default_layers(model, where=cfg.where, stem=cfg.stem)
    grouping = Grouping.build(splits, cfg.grouping)
    G = grouping.num_groups

    x_tr, y_tr, g_tr = _take(splits.train, grouping, cfg.max_samples, cfg.seed, 1)
    x_te, y_te, g_te = _take(splits.test, grouping, cfg.max_samples, cfg.seed, 2)
    train_counts = torch.bincount(g_tr, minlength=G)
    test_counts = torch.bincount(g_te, minlength=G)
    minority = list(cfg.minority_groups) if cfg.minority_groups is not None else \
        minority_groups(train_counts.tolist(), cfg.minority_fraction)
    for m in minority:
        if not 0 <= m < G or train_counts[m] == 0:
            raise ValueError(f"minority group {m} is not a non-empty train group "
                             f"(train counts {train_counts.tolist()})")
    majority = [g for g in range(G) if train_counts[g] > 0 and g not in minority]
    if not majority:
        raise ValueError("every non-empty train group is a minority group: nothing to compare with")
    # Train and test in one sweep: test sample groups are shifted by G.
    data = (torch.cat([x_tr, x_te]).to(device), torch.cat([y_tr, y_te]).to(device),
            torch.cat([g_tr, g_te + G]).to(device))
    # What a finished layer's numbers depend on (the sweeps keep their own, finer record).
    record = {"config": {**dataclasses.asdict(cfg), "layers": layers}, "model": _weights_id(model),
              "data": tensor_digest(y_tr, g_tr, y_te, g_te, x_tr[:8], x_te[:8]),
              "rewind_to": _weights_id(rewind_to) if cfg.mode == "rewind" else None}

    # Baseline: per-group accuracy and memorization gap.
    base_correct, _ = group_outcomes_of(model, data[0], data[1].cpu(), data[2].cpu(), 2 * G,
                                        batch_size=cfg.batch_size, device=device)
    base_tr, base_te = _accuracy(base_correct[:G], train_counts), _accuracy(base_correct[G:], test_counts)
    gap = {grouping.names[g]: (base_tr[g] - base_te[g]) if base_tr[g] is not None and base_te[g] is not None
           else None for g in range(G) if train_counts[g] > 0 or test_counts[g] > 0}
    base_min_tr = float(_pooled(base_correct[:G].double(), train_counts, minority))
    base_maj_tr = float(_pooled(base_correct[:G].double(), train_counts, majority))
    base_min_te = float(_pooled(base_correct[G:].double(), test_counts, minority))
    base_maj_te = float(_pooled(base_correct[G:].double(), test_counts, majority))
    baseline = {
        "train": {"group_accuracy": {grouping.names[g]: base_tr[g] for g in range(G) if train_counts[g] > 0},
                  "minority_accuracy": base_min_tr, "majority_accuracy": base_maj_tr,
                  "accuracy": float(base_correct[:G].sum()) / max(int(train_counts.sum()), 1)},
        "test": {"group_accuracy": {grouping.names[g]: base_te[g] for g in range(G) if test_counts[g] > 0},
                 "minority_accuracy": base_min_te, "majority_accuracy": base_maj_te,
                 "accuracy": float(base_correct[G:].sum()) / max(int(test_counts.sum()), 1)},
    }

    # Comparison criteria: weight norm per output channel; gradient norm on the worst-predicted
    # (lowest p(true class) = highest CE) minority train samples of the smallest minority group.
    weight_scores = weight_norm_scores(model, layers)
    grad_group = min(minority, key=lambda g: int(train_counts[g]))
    train_only = (x_tr.to(device), y_tr.to(device), g_tr.to(device))
    grad_scores = gradient_norm_scores(model, layers, train_only, grad_group, num_samples=cfg.gradient_samples)
    # The published forms: weight norms of every conv but downsample, ranked globally; gradient
    # norms of every conv (downsample included) from each group's own lowest-p(true) samples.
    plain_convs = conv_names(model, downsample=False)
    all_weight_norms = weight_norm_scores(model, plain_convs) if plain_convs else {}
    global_norms = torch.cat([v for v in all_weight_norms.values()]) if all_weight_norms else None
    weight_top = global_top(all_weight_norms, cfg.top_k) if all_weight_norms else []
    grad_top = {}
    every_conv = conv_names(model)
    if every_conv:
        for g in range(G):
            if train_counts[g] > 0:
                scores = gradient_norm_scores(model, every_conv, train_only, g, num_samples=cfg.gradient_samples)
                grad_top[grouping.names[g]] = global_top(scores, cfg.top_k)
    model.eval()

    bar = progress_ticker(len(layers), "layers", progress)
    sweeps: list[LayerRanking] = []
    suffix = sd.rank_suffix(dist)
    for layer in layers:
        saved = store.load_json(f"layer_{layer}{suffix}.json") if store is not None else None
        if not all(sd.gather(saved is not None, dist)):  # resume a layer only where every rank finished it
            saved = None
        if saved is not None:
            _check_record(saved.get("record"), record, store, layer)
            sweeps.append(LayerRanking(**saved["ranking"]))
            bar(1)
            continue
        t_layer = time.perf_counter()
        result = _sweep(model, [layer], data, cfg, 2 * G, rewind_to=rewind_to,
                        store=store.sub(f"sweep_{layer}") if store is not None else None, progress=progress,
                        dist=dist)
        entry = _layer_result(result, layer)
        correct = _tensor(entry.correct).double()  # (C, 2G)
        min_tr = _pooled(correct[:, :G], train_counts, minority)
        maj_tr = _pooled(correct[:, :G], train_counts, majority)
        min_te = _pooled(correct[:, G:], test_counts, minority)
        maj_te = _pooled(correct[:, G:], test_counts, majority)
        minority_drop, majority_drop = base_min_tr - min_tr, base_maj_tr - maj_tr
        score = minority_drop - majority_drop
        w = _layer_scores(weight_scores, layer)
        gn = _layer_scores(grad_scores, layer)
        sweep = LayerRanking(
            layer=layer, channels=correct.shape[0], score=score.tolist(), minority_drop=minority_drop.tolist(),
            majority_drop=majority_drop.tolist(), test_minority_drop=(base_min_te - min_te).tolist(),
            test_majority_drop=(base_maj_te - maj_te).tolist(),
            train_accuracy=[_accuracy(row, train_counts) for row in correct[:, :G]],
            test_accuracy=[_accuracy(row, test_counts) for row in correct[:, G:]],
            weight_norm=None if w is None else w.tolist(), gradient_norm=None if gn is None else gn.tolist(),
            weight_norm_global_rank=None if w is None or global_norms is None else
            [int((global_norms > v).sum()) + 1 for v in w.tolist()],
            spearman_score_vs_weight_norm=None if w is None else _spearman(score, w),
            spearman_score_vs_gradient_norm=None if gn is None else _spearman(score, gn))
        # Cumulative: this layer's top 1, 2, ..., k channels ablated together.
        k = min(cfg.top_k, sweep.channels)
        order = torch.argsort(score, descending=True, stable=True)[:k].tolist()
        sets = [order[:i + 1] for i in range(k)]
        # Few sets (top k): split them over the ranks when there are enough, else every rank runs
        # them all, and only rank 0 keeps their partial state (the files would be the same).
        split_sets = dist is not None and dist.world_size <= len(sets)
        cum_store = store.sub(f"cumulative_{layer}") if store is not None and (split_sets or sd.is_main(dist)) \
            else None
        cum = _sweep(model, [layer], data, cfg, 2 * G, channel_sets=sets, rewind_to=rewind_to, store=cum_store,
                     progress=False, dist=dist if split_sets else None)
        cum_correct = _tensor(_layer_result(cum, layer).correct).double()
        for i, channels in enumerate(sets):
            row = cum_correct[i]
            sweep.cumulative.append({
                "k": i + 1, "channels": channels,
                "train_minority_accuracy": float(_pooled(row[:G], train_counts, minority)),
                "train_majority_accuracy": float(_pooled(row[:G], train_counts, majority)),
                "test_minority_accuracy": float(_pooled(row[G:], test_counts, minority)),
                "test_majority_accuracy": float(_pooled(row[G:], test_counts, majority)),
                "train_accuracy": _accuracy(row[:G], train_counts),
                "test_accuracy": _accuracy(row[G:], test_counts)})
        sweep.seconds = time.perf_counter() - t_layer
        if store is not None:
            store.save_json(f"layer_{layer}{suffix}.json", {"record": record, "ranking": sweep})
        sweeps.append(sweep)
        bar(1)
    bar(None)

    top = _top_channels(sweeps, cfg.top_k, grouping, train_counts, test_counts)
    return MemorizationResult(
        config={**dataclasses.asdict(cfg), "layers": layers},
        grouping={"kind": grouping.kind, "names": grouping.names, "minority": [grouping.names[g] for g in minority],
                  "majority": [grouping.names[g] for g in majority],
                  "minority_ids": minority, "majority_ids": majority,
                  "train_counts": train_counts.tolist(), "test_counts": test_counts.tolist(),
                  "gradient_norm_group": grouping.names[grad_group]},
        baseline=baseline, memorization_gap=gap, layers=sweeps, top_channels=top,
        weight_norm_top=weight_top, gradient_norm_top=grad_top, seconds=time.perf_counter() - t0)


def _weights_id(obj) -> str:
    """A digest of a model's (or state dict's, or checkpoint file's) weights."""
    from shortcut_fast.surgery.sweep import weights_digest

    if isinstance(obj, (str, os.PathLike)):
        return file_digest(obj)
    return weights_digest(obj.state_dict() if isinstance(obj, nn.Module) else obj)


def _check_record(old, new: dict, store: Store, layer: str) -> None:
    if old != json.loads(json.dumps(to_jsonable(new))):  # compare as read back from JSON
        diff = settings_diff(old or {}, json.loads(json.dumps(to_jsonable(new)))) or ["format"]
        raise ValueError(f"store {str(store.root)!r}: layer_{layer}.json was written for another memorization run "
                         f"({'; '.join(diff)}); resume with the same model, data and settings, or start afresh")


def _layer_result(result, layer: str):
    """The per-layer entry of a SweepResult (indexable by layer name)."""
    layers = getattr(result, "layers", result)
    if isinstance(layers, dict):
        return layers[layer]
    return next(e for e in layers if getattr(e, "layer", None) == layer)


def _top_channels(sweeps: list[LayerRanking], k: int, grouping: Grouping, train_counts, test_counts) -> list[dict]:
    """The k channels with the largest score over all swept layers, with their details."""
    flat = [(s.score[c], li, c) for li, s in enumerate(sweeps) for c in range(s.channels)]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))  # stable: by score, then layer order, then channel
    rows = []
    for score, li, c in flat[:k]:
        s = sweeps[li]
        row = {"layer": s.layer, "channel": c, "score": score, "minority_drop": s.minority_drop[c],
               "majority_drop": s.majority_drop[c], "test_minority_drop": s.test_minority_drop[c],
               "test_majority_drop": s.test_majority_drop[c],
               "train_accuracy": {grouping.names[g]: s.train_accuracy[c][g] for g in range(grouping.num_groups)
                                  if train_counts[g] > 0},
               "test_accuracy": {grouping.names[g]: s.test_accuracy[c][g] for g in range(grouping.num_groups)
                                 if test_counts[g] > 0},
               "score_rank_in_layer": _rank_desc(torch.tensor(s.score), c)}
        for name, values in (("weight_norm", s.weight_norm), ("gradient_norm", s.gradient_norm)):
            if values is not None:
                row[name] = values[c]
                row[f"{name}_rank_in_layer"] = _rank_desc(torch.tensor(values), c)
        if s.weight_norm_global_rank is not None:
            row["weight_norm_global_rank"] = s.weight_norm_global_rank[c]
        rows.append(row)
    return rows




# ---------------------------------------------------------------------------------------
# Memorization: table and figures


def memorization_table(result: MemorizationResult) -> tuple[list[list], list[str]]:
    """Rows and headers of the top-channel table (train/test minority and majority accuracy when ablated)."""
    b = result.baseline
    global_rank = result.config.get("weight_norm_ranking", "layer") == "global"
    w_rank = "weight_norm_global_rank" if global_rank else "weight_norm_rank_in_layer"
    rows = [["(none)", "-", float("nan"), b["train"]["minority_accuracy"], b["train"]["majority_accuracy"],
             b["test"]["minority_accuracy"], b["test"]["majority_accuracy"], "-", "-"]]
    for r in result.top_channels:
        rows.append([r["layer"], r["channel"], r["score"],
                     b["train"]["minority_accuracy"] - r["minority_drop"],
                     b["train"]["majority_accuracy"] - r["majority_drop"],
                     b["test"]["minority_accuracy"] - r["test_minority_drop"],
                     b["test"]["majority_accuracy"] - r["test_majority_drop"],
                     r.get(w_rank, "-"), r.get("gradient_norm_rank_in_layer", "-")])
    headers = ["layer", "channel", "score", "train minority", "train majority", "test minority", "test majority",
               "w-norm rank (all convs)" if w_rank == "weight_norm_global_rank" else "w-norm rank", "g-norm rank"]
    return rows, headers


def top_channel_rows(result: MemorizationResult) -> list[dict]:
    """The top channels as flat rows (per-group accuracies as "train <group>" / "test <group>" columns), for CSV."""
    rows = []
    for r in result.top_channels:
        flat = {k: v for k, v in r.items() if not isinstance(v, dict)}
        for split in ("train", "test"):
            flat.update({f"{split} {g}": acc for g, acc in r[f"{split}_accuracy"].items()})
        rows.append(flat)
    return rows


def plot_memorization(result: MemorizationResult, out_dir: str | Path) -> list[Path]:
    """drop_scatter.png, top_channels.png, cumulative_topk.png, memorization_gap.png."""
    from shortcut_fast.report import plot_bars, plot_curves, pyplot, save_figure

    out = Path(out_dir)
    paths = []
    names = result.grouping["names"]
    present = [n for n in names if n in result.baseline["train"]["group_accuracy"]
               or n in result.baseline["test"]["group_accuracy"]]
    tr, te = result.baseline["train"]["group_accuracy"], result.baseline["test"]["group_accuracy"]
    nan = float("nan")
    paths.append(plot_bars({"train": [_num(tr.get(n)) for n in present], "test": [_num(te.get(n)) for n in present]},
                           present, out / "memorization_gap.png", ylabel="accuracy", ylim=(0, 1.05),
                           title="per-group accuracy (gap = train - test)"))

    plt = pyplot()
    n = len(result.layers)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    top = {(r["layer"], r["channel"]) for r in result.top_channels}
    for ax, s in zip(axes.flat, result.layers):
        xs, ys = s.majority_drop, s.minority_drop
        hot = [c for c in range(s.channels) if (s.layer, c) in top]
        ax.scatter(xs, ys, s=12, alpha=0.7, label="channel")
        if hot:
            ax.scatter([xs[c] for c in hot], [ys[c] for c in hot], s=30, color="red", label="top")
            for c in hot:
                ax.annotate(str(c), (xs[c], ys[c]), fontsize=7)
        lo = min(min(xs), min(ys), 0.0)
        hi = max(max(xs), max(ys), 0.05)
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
        ax.set_title(s.layer, fontsize=9)
        ax.set_xlabel("majority train acc. drop", fontsize=8)
        ax.set_ylabel("minority train acc. drop", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"channel ablation ({result.config['mode']}, {result.config['where']}): one dot per channel")
    fig.tight_layout()
    paths.append(save_figure(fig, out / "drop_scatter.png"))

    labels = ["none"] + [f"{r['layer']}:{r['channel']}" for r in result.top_channels]
    series = {}
    for split, base in (("train", tr), ("test", te)):
        for g in present:
            if g in base:
                series[f"{split} {g}"] = [_num(base.get(g))] + [_num(r[f"{split}_accuracy"].get(g, nan))
                                                                for r in result.top_channels]
    paths.append(plot_bars(series, labels, out / "top_channels.png", ylabel="accuracy", ylim=(0, 1.05),
                           title="per-group accuracy with one top channel ablated"))

    curves = {}
    for s in result.layers:
        if s.cumulative:
            curves[f"{s.layer} minority (train)"] = [c["train_minority_accuracy"] for c in s.cumulative]
            curves[f"{s.layer} majority (train)"] = [c["train_majority_accuracy"] for c in s.cumulative]
    if curves:
        longest = max(len(s.cumulative) for s in result.layers)
        curves = {k: v + [nan] * (longest - len(v)) for k, v in curves.items()}
        paths.append(plot_curves(curves, out / "cumulative_topk.png", x=list(range(1, longest + 1)),
                                 xlabel="top-k channels of the layer ablated together", ylabel="train accuracy",
                                 title="cumulative ablation"))
    return paths


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def summary(result: MemorizationResult, data: str, out: Path | None = None) -> str:
    """The terminal report: per-group train / test accuracy and gap, then the top channels
    (and, with `out`, where the files were written)."""
    from shortcut_fast.report import format_table

    g = result.grouping
    lines = [f"\nmemorization on {data} ({g['kind']} groups; minority: {', '.join(g['minority'])}), "
             f"{result.seconds:.1f} s"]
    base = result.baseline
    rows = [[name, _num(base["train"]["group_accuracy"].get(name)), _num(base["test"]["group_accuracy"].get(name)),
             _num(gap), g["train_counts"][g["names"].index(name)]] for name, gap in result.memorization_gap.items()]
    lines.append(format_table(rows, ["group", "train acc", "test acc", "gap", "train n"]))
    rows, headers = memorization_table(result)
    lines.append(f"\ntop channels ({result.config['mode']}, {result.config['where']}; score = minority drop - "
                 f"majority drop on train):")
    lines.append(format_table(rows, headers))
    if out is not None:
        lines.append(f"\nwrote {Path(out) / 'result.json'} and figures in {out}")
    return "\n".join(lines)


def write_outputs(result: MemorizationResult, out_dir, record: dict | None = None) -> list[Path]:
    """result.json (the result inside `record` when given), top_channels.csv and the figures."""
    from shortcut_fast.report import write_csv, write_json

    out = Path(out_dir)
    write_json(result if record is None else {**record, "result": result}, out / "result.json")
    write_csv(top_channel_rows(result), out / "top_channels.csv")
    return [out / "result.json", out / "top_channels.csv", *plot_memorization(result, out)]


# ---------------------------------------------------------------------------------------
# Mitigation: global magnitude mask, NT-Xent between pruned and dense outputs


def prunable_weights(model: nn.Module, layers: str = "conv-linear") -> dict[str, nn.Parameter]:
    """Qualified name -> weight of every convolution ("conv": the published choice, downsample
    convs included; a model with no convolution at all, e.g. an MLP, falls back to its linear
    layers: the result's `pruned_tensors` lists what was pruned) or of every convolution and
    linear layer ("conv-linear"); biases and norms are never pruned."""
    if layers not in PRUNE_LAYERS:
        raise ValueError(f"layers must be one of {PRUNE_LAYERS}, got {layers!r}")

    def collect(kinds):
        return {f"{name}.weight" if name else "weight": module.weight for name, module in model.named_modules()
                if isinstance(module, kinds) and module.weight is not None}
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    out = collect(convs + (nn.Linear,) if layers == "conv-linear" else convs)
    if not out and layers == "conv":
        out = collect((nn.Linear,))
    if not out:
        raise ValueError(f"{type(model).__name__} has no convolution or linear weights to prune")
    return out


@torch.no_grad()
def global_magnitude_mask(weights: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) pruning exactly floor(fraction * total) weights: the smallest |w|
    over all tensors together (ties broken by position, in dict order)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    k = math.floor(fraction * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start:start + w.numel()].view_as(w)
        start += w.numel()
    return masks


def nt_xent(anchors: torch.Tensor, positives: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR) with `anchors` as the anchor view: for anchor i the positive is
    positives[i]; the negatives are every other row of both views (2N - 2). Cosine
    similarities over the flattened rows, mean over anchors."""
    if anchors.shape != positives.shape or anchors.dim() < 2:
        raise ValueError(f"anchors and positives must have the same shape (N, D...), got {tuple(anchors.shape)} "
                         f"and {tuple(positives.shape)}")
    n = anchors.shape[0]
    a = F.normalize(anchors.flatten(1).float(), dim=1)
    z = torch.cat([a, F.normalize(positives.flatten(1).float(), dim=1)])
    sim = a @ z.T / tau  # (N, 2N)
    idx = torch.arange(n, device=a.device)
    sim = sim.masked_fill(F.one_hot(idx, 2 * n).bool(), float("-inf"))  # no self-similarity
    return F.cross_entropy(sim, idx + n)


def nt_xent_2n(view1: torch.Tensor, view2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """The SimCLR NT-Xent over all 2N anchors (the published utils.nt_xent): row i of either
    view is an anchor whose positive is row i of the other view and whose negatives are the
    2N - 2 other rows; mean over the 2N anchors. Gradients flow through both views (detach
    one to get the published stop-gradient terms). Equals 0.5 * (nt_xent(v1, v2) + nt_xent(v2, v1))."""
    return 0.5 * (nt_xent(view1, view2, tau) + nt_xent(view2, view1, tau))


def published_nt_xent(pruned: torch.Tensor, dense: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """NT2N(sg(dense), pruned) + NT2N(dense, sg(pruned)): the published mitigation's contrastive
    term (SpuriousCorrelationFinetuningPruning.py), twice symmetric_nt_xent's value."""
    return nt_xent_2n(dense.detach(), pruned, tau) + nt_xent_2n(dense, pruned.detach(), tau)


def symmetric_nt_xent(pruned: torch.Tensor, dense: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """0.5 * (NT-Xent(pruned -> sg(dense)) + NT-Xent(dense -> sg(pruned))): each side is pulled
    towards the other's output as a fixed target. Symmetric in its arguments; its value is
    the usual two-view SimCLR loss."""
    return 0.5 * (nt_xent(pruned, dense.detach(), tau) + nt_xent(dense, pruned.detach(), tau))


class MitigationObjective:
    """loss_fn(model, x, y, a) for train():
    contrastive_weight * symmetric NT-Xent(pruned, dense) + ce_weight * CE(dense, y).
    contrastive_weight=0 is the control: the same optimizer and schedule with the CE term only.

    The mask is computed lazily from the current weights (so a resumed run masks its loaded
    weights) and cleared by `new_epoch()`. The pruned forward passes copies of the buffers:
    its BatchNorm statistics never move the dense model's running statistics.

    dist (world_size > 1, under train(dist=)): every rank's dense and pruned outputs and
    labels are gathered (train.gather_global_batch, gradients flowing back to each rank), so
    the NT-Xent negatives and both loss terms are those of the whole global batch, as in one
    process (`reduces_over_ranks`: the trainer then leaves the loss unweighted).
    """

    def __init__(self, prune_fraction: float = 0.01, tau: float = 0.5, ce_weight: float = 0.2,
                 contrastive_weight: float = 1.0, *, contrastive_form: str = "sum-2n", prune_layers: str = "conv",
                 double_softmax: bool = False, dist: sd.DistContext | None = None):
        if contrastive_form not in CONTRASTIVE_FORMS:
            raise ValueError(f"contrastive_form must be one of {CONTRASTIVE_FORMS}, got {contrastive_form!r}")
        if prune_layers not in PRUNE_LAYERS:
            raise ValueError(f"prune_layers must be one of {PRUNE_LAYERS}, got {prune_layers!r}")
        self.contrastive_form, self.prune_layers, self.double_softmax = contrastive_form, prune_layers, double_softmax
        if not 0 <= prune_fraction < 1:
            raise ValueError(f"prune_fraction must be in [0, 1), got {prune_fraction!r}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        if not ce_weight >= 0 or not contrastive_weight >= 0 or ce_weight + contrastive_weight == 0:
            raise ValueError(f"ce_weight and contrastive_weight must be >= 0, not both 0, got {ce_weight!r} "
                             f"and {contrastive_weight!r}")
        self.prune_fraction, self.tau, self.ce_weight = prune_fraction, tau, ce_weight
        self.contrastive_weight = contrastive_weight
        self.masks: dict[str, torch.Tensor] | None = None
        self.threshold: float | None = None
        self._device_sums = None  # on-device sums of (contrastive, ce, samples): no per-step sync
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        self.reduces_over_ranks = self.dist is not None

    def update_mask(self, model: nn.Module) -> None:
        weights = prunable_weights(model, self.prune_layers)
        self.masks = global_magnitude_mask(weights, self.prune_fraction)
        pruned = [w.detach().abs()[~self.masks[n]] for n, w in weights.items()]
        pruned = torch.cat([p.flatten() for p in pruned])
        self.threshold = float(pruned.max()) if pruned.numel() else None

    def pruned_forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(model, nn.parallel.DistributedDataParallel):  # the trainer's wrapper: the model itself
            model = model.module
        if self.masks is None:
            self.update_mask(model)
        weights = prunable_weights(model, self.prune_layers)
        state = {name: w * self.masks[name] for name, w in weights.items()}
        state.update({name: b.clone() for name, b in model.named_buffers()})
        return torch.func.functional_call(model, state, (x,))

    def _out(self, logits: torch.Tensor) -> torch.Tensor:
        # double_softmax: the published head ends in Softmax, so its losses see probabilities
        return logits.float().softmax(-1) if self.double_softmax else logits

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        from shortcut_fast.train import gather_global_batch

        dense = self._out(model(x))
        pruned = None if self.contrastive_weight == 0 else self._out(self.pruned_forward(model, x))
        if self.dist is not None:  # the whole global batch, in the one-process order
            dense, y = gather_global_batch(dense, self.dist), gather_global_batch(y, self.dist)
            pruned = None if pruned is None else gather_global_batch(pruned, self.dist)
        ce = F.cross_entropy(dense.float(), y)
        if pruned is None:  # control: no pruned forward at all
            contrastive = torch.zeros((), device=ce.device)
        else:
            form = published_nt_xent if self.contrastive_form == "sum-2n" else symmetric_nt_xent
            contrastive = form(pruned, dense, self.tau)
        stats = torch.stack([contrastive.detach().double() * y.numel(), ce.detach().double() * y.numel(),
                             torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)])
        self._device_sums = stats if self._device_sums is None else self._device_sums + stats
        return self.contrastive_weight * contrastive + self.ce_weight * ce

    def new_epoch(self) -> dict:
        """Epoch means of both terms and the mask threshold used; the next step recomputes the mask."""
        sums = self._device_sums.cpu() if self._device_sums is not None else torch.zeros(3, dtype=torch.float64)
        n = max(float(sums[2]), 1.0)
        pruned = None if self.masks is None else sum(int((~m).sum()) for m in self.masks.values())
        record = {"contrastive_loss": float(sums[0]) / n, "ce_loss": float(sums[1]) / n,
                  "mask_threshold": self.threshold, "pruned_weights": pruned}
        self._device_sums, self.masks = None, None
        return record


@dataclass
class MitigationConfig:
    epochs: int = 21  # published n_epochs
    prune_fraction: float = 0.01
    tau: float = 0.5
    ce_weight: float = 0.2
    contrastive_weight: float = 1.0  # 0: the CE-only control run
    contrastive_form: str = "sum-2n"  # published; "half-mean": ours before (half the value)
    prune_layers: str = "conv"  # published; "conv-linear": also the linear head (ours before)
    schedule: str = "plateau"  # ReduceLROnPlateau(0.5, patience 1), published; "constant": ours before
    augment: str = "resized-crop-flip"  # published; "none": ours before (or the trainer's "flip-crop")
    double_softmax: bool = False  # True: reproduce the published head's extra Softmax (a bug there)
    lr: float = 2e-4
    batch_size: int = 100
    weight_decay: float = 0.0
    select: str = "last"  # checkpoint reported: "last", or by val "accuracy" / "worst_group_accuracy"
    grouping: str = "auto"
    minority_fraction: float = 0.5
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if not 0 <= self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if not self.ce_weight >= 0 or not self.contrastive_weight >= 0 or self.ce_weight + self.contrastive_weight == 0:
            raise ValueError(f"ce_weight and contrastive_weight must be >= 0, not both 0, got {self.ce_weight!r} "
                             f"and {self.contrastive_weight!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if self.contrastive_form not in CONTRASTIVE_FORMS:
            raise ValueError(f"contrastive_form must be one of {CONTRASTIVE_FORMS}, got {self.contrastive_form!r}")
        if self.prune_layers not in PRUNE_LAYERS:
            raise ValueError(f"prune_layers must be one of {PRUNE_LAYERS}, got {self.prune_layers!r}")
        if self.schedule not in MITIGATION_SCHEDULES:
            raise ValueError(f"schedule must be one of {MITIGATION_SCHEDULES}, got {self.schedule!r}")
        if self.augment not in MITIGATION_AUGMENTATIONS:
            raise ValueError(f"augment must be one of {MITIGATION_AUGMENTATIONS}, got {self.augment!r}")
        if not isinstance(self.double_softmax, bool):
            raise ValueError(f"double_softmax must be a bool, got {self.double_softmax!r}")
        self.train_config()  # augment and the rest are checked by the trainer's config

    def train_config(self):
        from shortcut_fast.train import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer="adam", lr=self.lr,
                           weight_decay=self.weight_decay, schedule=self.schedule, augment=self.augment,
                           warmup_epochs=0.0, seed=self.seed,
                           device=self.device, select=self.select, max_steps_per_epoch=self.max_steps_per_epoch,
                           eval_batch_size=self.eval_batch_size)


@dataclass
class MitigationResult(ApiResult):
    """What run_mitigation / mitigate return; summary() and write(folder) as in the module's `mitigate`."""

    config: dict
    grouping: dict
    before: dict  # per split: accuracy, group_accuracy, worst_group_accuracy, minority/majority accuracy
    after: dict
    after_pruned: dict  # the final model with its final mask applied
    history: list[dict]
    checkpoint: str | None
    pruned_tensors: list[str] = field(default_factory=list)  # the weights the magnitude mask acts on
    seconds: float = 0.0

    _command = "mitigate"

    def _summary(self, data: str, out: Path | None) -> str:
        return mitigation_summary(self, data, out)

    def _write(self, out: Path, record: dict) -> None:
        write_mitigation_outputs(self, out, record)


LOG = "mitigation_log.json"


class _PrunedView(nn.Module):
    """The model evaluated with a fixed keep-mask applied (for the after-pruned report)."""

    def __init__(self, model: nn.Module, objective: MitigationObjective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x):
        return self.objective.pruned_forward(self.model, x)


def run_mitigation(model: nn.Module, splits, cfg: MitigationConfig | None = None, *,
                   store: Store | None = None, progress: bool = True,
                   dist: sd.DistContext | None = None) -> MitigationResult:
    """Train `model` (the ERM model, changed in place) with the pruned/dense contrastive objective.

    Reports per-group accuracy before and after on train/val/test. store (a run_folder.Store,
    e.g. RunFolder(...).sub("mitigated")): the trainer's checkpoints (last.pt for resume,
    best.pt = the reported weights) and mitigation_log.json (per-epoch loss terms and mask
    thresholds) go there; when the store is resuming, training and the log continue from them.

    dist (world_size > 1, from torchrun): data-parallel training (train(dist=): each rank a
    slice of every global batch, the loss terms over the whole gathered batch, so the result
    is the one-process result to float tolerance); the before/after reports are computed on
    every rank (the same numbers); rank 0 alone writes the store, every rank resumes from it.
    """
    from shortcut_fast.train import resolve_device
    from shortcut_fast.train import train as run_training

    t0 = time.perf_counter()
    cfg = cfg or MitigationConfig()
    device = resolve_device(cfg.device) if dist is None or dist.world_size == 1 else dist.device
    model = model.to(device)
    grouping = Grouping.build(splits, cfg.grouping)
    train_groups = grouping.of(splits.train)
    train_counts = torch.bincount(train_groups[train_groups >= 0], minlength=grouping.num_groups)
    minority = minority_groups(train_counts.tolist(), cfg.minority_fraction)
    report = dict(batch_size=cfg.eval_batch_size, device=device)
    before = group_report(model, splits, grouping, minority, **report)

    log: list[dict] = store.load_json(LOG, []) if store is not None else []
    objective = MitigationObjective(cfg.prune_fraction, cfg.tau, cfg.ce_weight, cfg.contrastive_weight,
                                    contrastive_form=cfg.contrastive_form, prune_layers=cfg.prune_layers,
                                    double_softmax=cfg.double_softmax, dist=dist)

    def on_epoch_end(epoch: int, net: nn.Module, record: dict) -> None:
        entry = {"epoch": epoch + 1, **objective.new_epoch(), "train_loss": record["train_loss"],
                 "val_accuracy": record["val_accuracy"]}
        del log[epoch:]  # a resumed epoch replaces what an interrupted run logged for it
        log.append(entry)
        if store is not None and sd.is_main(dist):
            store.save_json(LOG, log)

    trained = run_training(model, splits, cfg.train_config(), store=store, progress=progress and sd.is_main(dist),
                           loss_fn=objective, on_epoch_end=on_epoch_end, dist=dist)
    # A run killed between the trainer's checkpoint and the log write resumes past that epoch:
    # its loss terms are unknown (None), never invented.
    for record in trained.history[len(log):]:
        log.append({"epoch": record["epoch"], "contrastive_loss": None, "ce_loss": None, "mask_threshold": None,
                    "pruned_weights": None, "train_loss": record["train_loss"],
                    "val_accuracy": record["val_accuracy"]})
    after = group_report(model, splits, grouping, minority, **report)
    objective.update_mask(model)
    after_pruned = group_report(_PrunedView(model, objective), splits, grouping, minority, **report)
    return MitigationResult(
        config=dataclasses.asdict(cfg),
        grouping={"kind": grouping.kind, "names": grouping.names, "minority": [grouping.names[g] for g in minority],
                  "train_counts": train_counts.tolist()},
        before=before, after=after, after_pruned=after_pruned, history=log,
        pruned_tensors=list(prunable_weights(model, cfg.prune_layers)),
        checkpoint=str(store.root / "best.pt") if store is not None else None, seconds=time.perf_counter() - t0)


def mitigation_table(result: MitigationResult) -> tuple[list[list], list[str]]:
    rows = []
    for split in ("train", "val", "test"):
        for label, rep in (("before", result.before), ("after", result.after), ("after, pruned", result.after_pruned)):
            r = rep.get(split)
            if r is None:
                continue
            rows.append([split, label, r["accuracy"], _num(r["worst_group_accuracy"]), _num(r["minority_accuracy"]),
                         _num(r["majority_accuracy"])])
    return rows, ["split", "model", "accuracy", "worst-group", "minority", "majority"]


def mitigation_summary(result: MitigationResult, data: str, out: Path | None = None) -> str:
    """The terminal report: accuracy, worst-group, minority and majority accuracy before and
    after (and, with `out`, where the files were written)."""
    from shortcut_fast.report import format_table

    lines = [f"\nmitigate on {data} ({result.grouping['kind']} groups; minority: "
             f"{', '.join(result.grouping['minority'])}), {len(result.history)} epochs, {result.seconds:.1f} s"]
    rows, headers = mitigation_table(result)
    lines.append(format_table(rows, headers))
    if out is not None:
        where = f", checkpoint {result.checkpoint}" if result.checkpoint else " and figures in " + str(out)
        lines.append(f"\nwrote {Path(out) / 'result.json'}{where}")
    return "\n".join(lines)


def write_mitigation_outputs(result: MitigationResult, out_dir, record: dict | None = None) -> list[Path]:
    """result.json (the result inside `record` when given) and the figures."""
    from shortcut_fast.report import write_json

    out = Path(out_dir)
    write_json(result if record is None else {**record, "result": result}, out / "result.json")
    return [out / "result.json", *plot_mitigation(result, out)]


def plot_mitigation(result: MitigationResult, out_dir: str | Path) -> list[Path]:
    """group_accuracy.png (before / after per group, test) and mitigation_curves.png (loss terms)."""
    from shortcut_fast.report import plot_bars, plot_curves

    out = Path(out_dir)
    paths = []
    for split in ("test", "val"):
        before, after = result.before.get(split), result.after.get(split)
        if before and after:
            names = list(before["group_accuracy"])
            paths.append(plot_bars(
                {"before (ERM)": [_num(before["group_accuracy"][n]) for n in names],
                 "after": [_num(after["group_accuracy"].get(n)) for n in names]},
                names, out / f"group_accuracy_{split}.png", ylabel="accuracy", ylim=(0, 1.05),
                title=f"{split}: per-group accuracy before / after mitigation"))
    if result.history:
        paths.append(plot_curves(
            {"contrastive (NT-Xent)": [_num(h["contrastive_loss"]) for h in result.history],
             "cross-entropy": [_num(h["ce_loss"]) for h in result.history]},
            out / "mitigation_curves.png", x=[h["epoch"] for h in result.history], xlabel="epoch",
            ylabel="mean loss", title="mitigation loss terms"))
    return paths


# ---------------------------------------------------------------------------------------
# The Python API (docs/api.md): Config, Result, run; MitigationConfig, mitigate

Config = MemorizationConfig
Result = MemorizationResult


def run(model: nn.Module, data, config: MemorizationConfig | None = None, *, progress: bool = False,
        **kw) -> MemorizationResult:
    """Spurious memorization in a trained classifier: per-group gap, channel ablation, top channels.

    model: a trained nn.Module (evaluated; its channels are ablated one at a time, then
    restored). data: anything shortcut_fast.data.as_splits accepts, with a spurious attribute
    (tuples (images, labels, attributes), or a dataset such as "colored-digits"): groups are
    built from it. kw: run_memorization's own options (device, rewind_to, store). Returns a
    Result: summary(), write(folder) (result.json, top_channels.csv and the figures).
    """
    from shortcut_fast.experiments import _api

    cfg, splits, name = _api.model_inputs(model, data, config, MemorizationConfig, "memorization", kw)
    result = run_memorization(model, splits, cfg, progress=progress, **kw)
    _api.attach(result, "memorization", name, splits, model)
    return result


def mitigate(model: nn.Module, data, config: MitigationConfig | None = None, *, progress: bool = False,
             **kw) -> MitigationResult:
    """Train `model` (a trained ERM model; changed in place) with the pruned/dense contrastive
    objective and report per-group accuracy before and after (MitigationConfig).

    data: as for run (with a spurious attribute; its val split is evaluated every epoch).
    kw: run_mitigation's own options (store: where checkpoints go; without one, the mitigated
    weights are only those of `model`). Returns a MitigationResult: summary(), write(folder)
    (result.json and the figures, as the command line writes them).
    """
    from shortcut_fast.experiments import _api

    _api.check_model(model, "memorization")
    cfg = _api.check_config(config, MitigationConfig, "memorization.MitigationConfig")
    splits, name = _api.splits_of(data)
    result = run_mitigation(model, splits, cfg, progress=progress, **kw)
    _api.attach(result, "mitigate", name, splits, model)
    return result
