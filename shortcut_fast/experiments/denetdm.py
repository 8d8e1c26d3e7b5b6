"""DeNetDM (Vadakkeeveetil Sreelatha et al., NeurIPS 2024), with ERM and LfF under one protocol.

Stage 1 (product of experts): a deep branch phi_b and a shallow branch phi_d share a linear
head f; logits = f(phi_b(x) + phi_d(x)), plain cross-entropy, one Adam over everything, no
schedule. A branch alone is f applied to its own features (the other's zeroed, head bias kept).
Stage 2: a new target branch phi_t (like the deep one) with head f_t initialized from f;
phi_b, phi_d and f frozen (eval mode: BatchNorm statistics frozen too);
    loss = CE(f_t(phi_b + phi_t), y) + lambda * T^2 * soft-CE(softmax(f(phi_d)/T) -> log_softmax(f_t(phi_t)/T))
(the public code's T^2; the paper's Eq. 6 has none). The debiased model is f_t(phi_t).

Baselines on the same data, seeds, batch orders, epochs and selection: ERM (the target
architecture, cross-entropy) and LfF (Nam et al. 2020: a biased model trained with the
generalized cross-entropy, q = 0.7, and a debiased one with per-sample weights
W = L_b / (L_b + L_d) from per-sample loss EMAs (alpha 0.7) normalized by their class maximum).

Protocol (where we differ from the public code, see docs/experiments.md#denetdm): every model
is selected per member on the validation split (unbiased accuracy: the mean over label x bias
cells), never on the test split; `seed` is honoured; stage 2 trains.

Speed: every (conflict ratio, seed) pair is a *member*; all members of one architecture train
as one `ensemble.StackedModules`: MLP branches as batched matmuls over the stacked weights
(each module's `stacked_forward`), conv branches as one vmap-ed forward and backward per
step; fused Adam on the stacked tensors, which is elementwise and so the same as one Adam
per member. Data live on
the device as uint8 (members x images), batches are gathered, normalized and augmented there,
all heads of a model are evaluated in one pass, and per-cell counts stay on the device.

Distribution (`run_denetdm(..., dist=)` a distributed.DistContext with world_size > 1, under
torchrun): the members are split over the ranks in contiguous, balanced shares (member
order is ratio-major); each rank loads and trains only its members (as one stack, or one at
a time with stacked=False), keeps its partial state in store.sub("rank{r}"), and the member
records are gathered in member order. A member's result does not depend on who it is
stacked with (per-member seeds, batch orders and augmentation draws; see
test_stacked_members_equal_members_trained_one_at_a_time), so the result equals one
process's; only the timings differ (a phase's seconds are the slowest rank's).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast.data import DatasetSplits
from shortcut_fast.data.core import make_generator
from shortcut_fast.distributed import DistContext, check_same, gather, is_main, shard
from shortcut_fast.ensemble import StackedModules, stacked_linear
from shortcut_fast.experiments._api import ApiResult
from shortcut_fast.models import build_model
from shortcut_fast.models.small import MLP
from shortcut_fast.ops._checks import all_true, check_labels, in_range, nonfinite_count, raise_nonfinite
from shortcut_fast.ops.ablation import _group_outcomes_unchecked
from shortcut_fast.report import Progress, format_table, plot_curves, pyplot, save_figure, write_json
from shortcut_fast.run_folder import Store
from shortcut_fast.train import augment_batch
from shortcut_fast.validate import check_int

__all__ = ["Config", "Result", "run", "DeNetDMConfig", "DeNetDMResult", "ProductOfExperts", "DistilledTarget", "FeatureBranch", "run_denetdm", "summary",
           "write_outputs", "BASELINES", "STAGE1_HEADS", "STAGE2_HEADS"]

BASELINES = ("erm", "lff")
ARCHS = ("mlp", "conv")
AUGMENTATIONS = ("none", "flip-crop", "crop")
# Baselines trained like the target (ours) or as LfF's code trained them (LFF_PROTOCOL).
BASELINE_PROTOCOLS = ("ours", "lff")
STAGE1_HEADS = ("poe", "deep", "shallow")          # f(b + d), f(b), f(d)
STAGE2_HEADS = ("target+deep", "target", "teacher")  # f_t(b + t), f_t(t), f(d) (frozen)
ERM_HEADS = ("erm",)
LFF_HEADS = ("debiased", "biased")
METRICS = ("unbiased", "conflicting", "aligned", "accuracy")


# ---------------------------------------------------------------------------------------
# Configuration


def _check_float(name: str, value, *, low: float = 0.0, low_open: bool = True, high: float | None = None,
                 high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) \
        and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ValueError(f"{name} must be a number in {lo}, {hi}, got {value!r}")
    return float(value)


@dataclass
class DeNetDMConfig:
    """Settings of one DeNetDM comparison (defaults: the paper's Colored MNIST setting).

    ratios: bias-conflicting training fractions, each in (0, 1); seeds: seed, seed+1, ...
    depths: (shallow, deep) layer counts incl. the head (mlp), one DeNetDM per pair; the
    first pair also fixes the target architecture of stage 2 and of the baselines.
    arch: "mlp" (width `width`) or "conv" (deep CIFAR ResNet-20, shallow three 5x5 convs
    3-32-64-64, 64-d features). target: a model name for the target branch and the
    baselines (default: like the deep branch); its features are projected to the branches'
    width when they differ (the public C-CIFAR10 target: ResNet-18 + Linear(512, 64)).
    baseline_epochs: ERM and LfF epochs (default stage1 + stage2: the same passes over the data).
    baseline_batch_size / baseline_depth / baseline_input_scale: the protocol of the baselines'
    published numbers (LFF_PROTOCOL: LfF's own code, whose Colored MNIST ERM and LfF figures
    DeNetDM's table quotes: batch 256, a 4-layer MLP, 100 epochs, inputs divided by 255 twice).
    Whatever the selection, every phase also records each epoch's test metrics, so that the
    last epoch and the best-on-test epoch (the public code's checkpoint rule) can be reported
    beside the validation-selected one; selection itself never reads the test split.
    """

    ratios: tuple = (0.005, 0.01, 0.02, 0.05)
    seeds: int = 3
    seed: int = 0
    depths: tuple = ((3, 5),)
    arch: str = "mlp"
    width: int = 100
    target: str | None = None
    target_pretrained: str | None = None
    stage1_epochs: int = 100
    stage2_epochs: int = 100
    baseline_epochs: int | None = None
    batch_size: int = 64
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-3
    stage1_weight_decay: float = 1e-3
    stage2_weight_decay: float = 0.0
    baseline_lr: float = 1e-3
    baseline_weight_decay: float = 0.0
    baseline_batch_size: int | None = None  # default batch_size
    baseline_depth: int | None = None  # MLP layers of ERM/LfF (default: the target's, like the deep branch)
    baseline_input_scale: float = 1.0  # ERM/LfF multiply their input by it (LfF's code: 1/255, pixels divided twice)
    temperature: float = 2.0
    distill_weight: float = 1.0
    baselines: tuple = BASELINES
    denetdm: bool = True  # False: the baselines only (e.g. under another baseline protocol)
    lff_q: float = 0.7
    lff_ema: float = 0.7
    augment: str = "none"
    normalize: tuple | None = None  # ((mean per channel), (std per channel)) after /255
    stacked: bool = True
    test_curves: bool = True  # evaluate the test split after every epoch (reported, never selecting)
    eval_batch_size: int = 1024
    checkpoint_seconds: float = 30.0  # partial state is saved at most this often (and when a phase ends)

    def __post_init__(self):
        self.ratios = tuple(self.ratios)
        if not self.ratios:
            raise ValueError("ratios must hold at least one conflict ratio")
        for r in self.ratios:
            _check_float("ratios: every conflict ratio", r, high=1.0, high_open=True)
        if len(set(self.ratios)) != len(self.ratios):
            raise ValueError(f"ratios must be distinct, got {list(self.ratios)}")
        check_int("seeds", self.seeds)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        self.depths = tuple(tuple(d) for d in self.depths)
        if not self.depths:
            raise ValueError("depths must hold at least one (shallow, deep) pair")
        for pair in self.depths:
            if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
                raise ValueError(f"depths must be pairs of positive integers SHALLOW,DEEP, got {pair!r}")
            if pair[0] >= pair[1]:
                raise ValueError(f"depths: the shallow branch must have fewer layers than the deep one, got "
                                 f"shallow {pair[0]} >= deep {pair[1]}")
            if self.arch == "mlp" and pair[0] < 2:
                raise ValueError(f"depths: an MLP branch needs >= 2 layers (incl. the head), got {pair[0]}")
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths must be distinct pairs, got {list(self.depths)}")
        if self.arch == "conv" and self.depths != ((3, 5),):
            raise ValueError("depths applies to the mlp branches; the conv branches are fixed (ResNet-20 vs "
                             "three 5x5 convs)")
        check_int("width", self.width)
        check_int("stage1_epochs", self.stage1_epochs)
        check_int("stage2_epochs", self.stage2_epochs)
        if self.baseline_epochs is None:
            self.baseline_epochs = self.stage1_epochs + self.stage2_epochs
        check_int("baseline_epochs", self.baseline_epochs)
        check_int("batch_size", self.batch_size)
        if self.baseline_batch_size is None:
            self.baseline_batch_size = self.batch_size
        check_int("baseline_batch_size", self.baseline_batch_size)
        if self.baseline_depth is not None:
            check_int("baseline_depth", self.baseline_depth, 2)
            if self.arch != "mlp" or self.target is not None:
                raise ValueError("baseline_depth applies to the mlp baselines only (arch mlp, no --target)")
        _check_float("baseline_input_scale", self.baseline_input_scale)
        check_int("eval_batch_size", self.eval_batch_size)
        for name in ("stage1_lr", "stage2_lr", "baseline_lr", "temperature"):
            _check_float(name, getattr(self, name))
        for name in ("stage1_weight_decay", "stage2_weight_decay", "baseline_weight_decay", "distill_weight"):
            _check_float(name, getattr(self, name), low_open=False)
        _check_float("lff_q", self.lff_q, high=1.0)
        _check_float("lff_ema", self.lff_ema, low_open=False, high=1.0, high_open=True)
        self.baselines = tuple(self.baselines)
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"baselines: unknown {unknown}; valid: {', '.join(BASELINES)}")
        if not self.denetdm and not self.baselines:
            raise ValueError("baselines: with DeNetDM skipped (denetdm=False) at least one baseline must run")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")

    @property
    def members(self) -> list[tuple[float, int]]:
        """(conflict ratio, seed) of every member, ratio-major."""
        return [(r, self.seed + j) for r in self.ratios for j in range(self.seeds)]


# ---------------------------------------------------------------------------------------
# Models


class FeatureBranch(nn.Module):
    """A project Classifier without its head: forward(x) = its features, optionally projected
    by a Linear to `out_features` (a target whose width differs from the branches')."""

    def __init__(self, model: nn.Module, out_features: int | None = None):
        super().__init__()
        width = model.head.in_features
        model.head = nn.Identity()  # unused: the experiment's own heads act on the features
        self.body = model
        self.proj = nn.Linear(width, out_features) if out_features and out_features != width else None
        self.out_features = out_features or width

    def forward(self, x):
        z = self.body.features(x)
        return z if self.proj is None else self.proj(z)

    def stacked_forward(self, p: dict, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """forward of every member at once (an MLP body): p the stacked parameters by full
        name, x (M, B, C, H, W) -> (M, B, F)."""
        z = x.flatten(2)
        for name in self.body.block_names:  # LinearAct: Linear -> ReLU
            z = torch.relu(_linear(p, f"{prefix}body.{name}.linear", z))
        return z if self.proj is None else _linear(p, f"{prefix}proj", z)


class ProductOfExperts(nn.Module):
    """Stage 1: forward(x) -> (3, N, C) logits f(b + d), f(b), f(d) (STAGE1_HEADS)."""

    def __init__(self, deep: nn.Module, shallow: nn.Module, num_classes: int):
        super().__init__()
        self.deep, self.shallow = deep, shallow
        self.head = nn.Linear(deep.out_features, num_classes)

    def forward(self, x):
        b, d = self.deep(x), self.shallow(x)
        # f is linear: f(b) = W b + bias is exactly f applied with d zeroed (the public code's branch-alone form).
        return torch.stack([self.head(b + d), self.head(b), self.head(d)])

    def stacked_forward(self, p, x, prefix=""):
        b = self.deep.stacked_forward(p, x, prefix + "deep.")
        d = self.shallow.stacked_forward(p, x, prefix + "shallow.")
        return torch.stack([_linear(p, prefix + "head", z) for z in (b + d, b, d)], dim=1)


class DistilledTarget(nn.Module):
    """Stage 2: forward(x) -> (3, N, C) logits f_t(b + t), f_t(t), f(d) (STAGE2_HEADS).

    deep, shallow and head come from stage 1 and stay frozen (the caller keeps them in eval
    mode and out of the optimizer); target and target_head are trained."""

    def __init__(self, stage1: ProductOfExperts, target: nn.Module):
        super().__init__()
        self.deep, self.shallow, self.head = stage1.deep, stage1.shallow, stage1.head
        self.target = target
        self.target_head = nn.Linear(self.head.in_features, self.head.out_features)
        self.target_head.load_state_dict(self.head.state_dict())  # f_t starts as f

    def frozen(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.split(".")[0] in ("deep", "shallow", "head")]

    def forward(self, x):
        b, t, d = self.deep(x), self.target(x), self.shallow(x)
        return torch.stack([self.target_head(b + t), self.target_head(t), self.head(d)])

    def stacked_forward(self, p, x, prefix="", frozen=None):
        """frozen: the features (b, d) of the frozen branches for these images, when known."""
        t = self.target.stacked_forward(p, x, prefix + "target.")
        b, d = frozen if frozen is not None else (self.deep.stacked_forward(p, x, prefix + "deep."),
                                                  self.shallow.stacked_forward(p, x, prefix + "shallow."))
        return torch.stack([_linear(p, prefix + "target_head", b + t), _linear(p, prefix + "target_head", t),
                            _linear(p, prefix + "head", d)], dim=1)


class _Heads(nn.Module):
    """Baselines: forward(x) -> (H, N, C), one classifier (ERM) or two (LfF: debiased, biased)."""

    def __init__(self, *models: nn.Module):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x):
        return torch.stack([m(x) for m in self.models])

    def stacked_forward(self, p, x, prefix=""):
        return torch.stack([m.stacked_forward(p, x, f"{prefix}models.{i}.") for i, m in enumerate(self.models)], dim=1)


class _Classifier(nn.Module):
    def __init__(self, branch: FeatureBranch, num_classes: int, input_scale: float = 1.0):
        super().__init__()
        self.branch, self.head = branch, nn.Linear(branch.out_features, num_classes)
        self.input_scale = input_scale

    def forward(self, x):
        return self.head(self.branch(x if self.input_scale == 1.0 else x * self.input_scale))

    def stacked_forward(self, p, x, prefix=""):
        z = self.branch.stacked_forward(p, x if self.input_scale == 1.0 else x * self.input_scale, prefix + "branch.")
        return _linear(p, prefix + "head", z)


def _linear(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return stacked_linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def _stacked_program(model: nn.Module) -> Callable | None:
    """The members' forward as batched matmuls (StackedModules' `forward`) when every branch of
    `model` is an MLP of plain Linear -> ReLU blocks (arch mlp); None otherwise (conv branches:
    the vmap pass). Each stacked_forward mirrors its module's forward (tests/test_denetdm.py
    compares the two)."""
    branches = [m for m in model.modules() if isinstance(m, FeatureBranch)]
    if not branches or not hasattr(model, "stacked_forward"):
        return None
    for br in branches:
        if type(br.body) is not MLP or any(
                [type(c) for c in getattr(br.body, n).children()] != [nn.Linear, nn.ReLU] for n in br.body.block_names):
            return None
    return _stacked_call


def _stacked_call(skeleton, params, buffers, x, **extra):
    return skeleton.stacked_forward(params, x, **extra)


def _seeded(seed: int, *salt: int):
    """Seed torch's global generator from (seed, *salt): module initialization per member."""
    g = make_generator(seed, *salt)
    torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=g)))


class _Factory:
    """Builds the branches of one data shape (channels, side, classes)."""

    def __init__(self, cfg: DeNetDMConfig, in_channels: int, image_size: int, num_classes: int):
        self.cfg, self.c, self.s, self.k = cfg, in_channels, image_size, num_classes
        self.feature_width = cfg.width if cfg.arch == "mlp" else 64

    def _model(self, name, **options):
        return build_model(name, num_classes=self.k, in_channels=self.c, image_size=self.s, **options)

    def branch(self, kind: str, depth: int | None = None) -> FeatureBranch:
        cfg = self.cfg
        if cfg.arch == "mlp":
            return FeatureBranch(self._model("mlp", depth=depth, width=cfg.width))
        if kind == "deep":
            return FeatureBranch(self._model("resnet20", width=16))
        return FeatureBranch(self._model("small-cnn", width=32, padding=0))

    def baseline(self) -> FeatureBranch:
        """The body of ERM and LfF: the target's, or an MLP of baseline_depth layers."""
        if self.cfg.baseline_depth is not None:
            return self.branch("deep", self.cfg.baseline_depth)
        return self.target()

    def target(self) -> FeatureBranch:
        cfg = self.cfg
        if cfg.target is None:
            return self.branch("deep", cfg.depths[0][1])
        pretrained = Path(cfg.target_pretrained) if cfg.target_pretrained else None
        return FeatureBranch(self._model(cfg.target, pretrained=pretrained), self.feature_width)


# ---------------------------------------------------------------------------------------
# Member data: (M, N, ...) uint8 on the device


@dataclass
class _Split:
    x: torch.Tensor  # (M, N, C, H, W) uint8
    y: torch.Tensor  # (M, N) int64
    a: torch.Tensor  # (M, N) int64


@dataclass
class _MemberData:
    ratios: list[float]
    seeds: list[int]
    train: _Split
    val: _Split
    test: _Split
    num_classes: int
    num_attributes: int
    image_shape: tuple
    identity: list = field(default_factory=list)

    @property
    def num_members(self) -> int:
        return len(self.ratios)


def _uint8_images(ds, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not getattr(ds, "in_memory", False):
        ds = ds.load_into_memory()
    if ds.images.dtype != torch.uint8:
        raise ValueError(f"data: {what} images must be uint8 (DeNetDM keeps them on the device as uint8), "
                         f"got {ds.images.dtype}")
    return ds.images, ds.labels, ds.attributes


def _gather_members(splits: list[DatasetSplits], ratios, seeds, device) -> _MemberData:
    first = splits[0]
    out = {}
    for part in ("train", "val", "test"):
        xs, ys, as_ = zip(*[_uint8_images(getattr(s, part), f"{s.name} {part}") for s in splits])
        sizes = {x.shape for x in xs}
        if len(sizes) != 1:
            raise ValueError(f"data: the {part} splits of the members differ in shape {sorted(sizes)}; stacked "
                             f"members need equal split sizes")
        out[part] = _Split(torch.stack(xs).to(device), torch.stack(ys).to(device), torch.stack(as_).to(device))
    return _MemberData(list(ratios), list(seeds), out["train"], out["val"], out["test"], first.num_classes,
                       first.num_attributes, tuple(first.image_shape))


def _check_splits(splits: DatasetSplits, ratio: float) -> None:
    if splits.num_attributes < 2 or not splits.bias_aligned_attribute:
        raise ValueError(f"data: {splits.name} has no bias attribute aligned with its labels; DeNetDM needs one "
                         f"(colored-digits, colored-mnist, corrupted-digits, corrupted-cifar10)")
    if splits.num_attributes != splits.num_classes:
        raise ValueError(f"data: {splits.name} has {splits.num_attributes} bias values for {splits.num_classes} "
                         f"classes; aligned/conflicting needs one bias value per class")
    for part in ("train", "val", "test"):
        if bool((getattr(splits, part).attributes < 0).any()):
            raise ValueError(f"data: the {part} split of {splits.name} has samples without a bias label")


# ---------------------------------------------------------------------------------------
# Batches, evaluation, selection


class _Pipeline:
    """Float batches from uint8 member data on the device: /255, normalization, augmentation."""

    def __init__(self, cfg: DeNetDMConfig, data: _MemberData, device):
        self.cfg, self.data = cfg, data
        self.dtype = torch.get_default_dtype()  # the modules' dtype (float64 in the equivalence tests)
        m, s = cfg.normalize if cfg.normalize is not None else (None, None)
        self.mean = None if m is None else torch.tensor(m, device=device).view(1, 1, -1, 1, 1)
        self.std = None if s is None else torch.tensor(s, device=device).view(1, 1, -1, 1, 1)

    def images(self, x_uint8: torch.Tensor) -> torch.Tensor:
        # in place after the conversion: the same values, one float tensor written instead of three
        x = x_uint8.to(self.dtype).div_(255)
        if self.mean is not None:
            x.sub_(self.mean).div_(self.std)
        return x

    def orders(self, epoch: int, device) -> torch.Tensor:
        """(M, N) batch order of every member in `epoch`: the same for every method (paired comparison)."""
        n = self.data.train.y.shape[1]
        return torch.stack([torch.randperm(n, generator=make_generator(seed, 11, epoch))
                            for seed in self.data.seeds]).to(device)

    def generators(self, salt: int, epoch: int) -> list[torch.Generator]:
        """Augmentation draws per member: a member's result never depends on who it is stacked with."""
        return [make_generator(seed, 12, salt, epoch) for seed in self.data.seeds]

    def batch(self, idx: torch.Tensor, generators: list[torch.Generator]):
        t = self.data.train
        M, N = t.y.shape
        # every member's batch in one index_select of whole uint8 images (rows of the flat
        # (M * N, C*H*W) view): several times faster than advanced indexing over (M, N)
        rows = (torch.arange(M, device=idx.device)[:, None] * N + idx).flatten()
        x = self.images(t.x.reshape(M * N, -1).index_select(0, rows).view(*idx.shape, *t.x.shape[2:]))
        if self.cfg.augment != "none":
            x = torch.stack([augment_batch(x[m], self.cfg.augment, g) for m, g in enumerate(generators)])
        return x, t.y.gather(1, idx), idx


@torch.no_grad()
def _evaluate(stack: StackedModules, pipe: _Pipeline, split: _Split, num_heads: int, num_classes: int,
              batch_size: int) -> dict[str, torch.Tensor]:
    """(M, H) tensors of every metric: all heads in one pass; per-cell counts on the device.

    unbiased = mean accuracy over the label x bias cells that have samples (LfF's unbiased
    protocol); aligned: cells label == bias; conflicting: the rest; accuracy: all samples."""
    M, n = split.y.shape
    k = num_classes
    G = k * k
    correct = torch.zeros(M, num_heads, G, dtype=torch.int64, device=split.y.device)
    cell = split.y * k + split.a
    if not all_true(in_range(split.y, k), in_range(split.a, k)):
        for name, t in (("labels", split.y), ("bias labels", split.a)):
            check_labels(name, t.flatten(), t.numel(), k, t.device)
    counts = torch.zeros(M, G, dtype=torch.int64, device=split.y.device).scatter_add_(
        1, cell, torch.ones_like(cell))
    # One reduction per batch for every member: member m's cells become groups m*G..m*G+G-1 of
    # one (H, M*b) problem. Inputs are checked above, once; NaN/Inf logits are counted on the
    # device and read once after the pass.
    member_cells = cell + torch.arange(M, device=cell.device)[:, None] * G
    nonfinite = torch.zeros((), dtype=torch.int64, device=split.y.device)
    for i in range(0, n, batch_size):
        logits = stack(pipe.images(split.x[:, i:i + batch_size]))  # (M, H, b, C)
        nonfinite += nonfinite_count(logits)
        c, _ = _group_outcomes_unchecked(logits.transpose(0, 1).flatten(1, 2), split.y[:, i:i + batch_size].flatten(),
                                         member_cells[:, i:i + batch_size].flatten(), M * G)
        correct += c.view(num_heads, M, G).transpose(0, 1)
    raise_nonfinite("logits", int(nonfinite))
    aligned = torch.zeros(G, dtype=torch.bool, device=cell.device)
    aligned[torch.arange(k, device=cell.device) * (k + 1)] = True
    counts_h = counts[:, None, :].expand_as(correct)
    present = counts_h > 0
    cell_acc = torch.where(present, correct.double() / counts_h.clamp(min=1), torch.zeros((), dtype=torch.float64,
                                                                                        device=cell.device))

    def share(mask):
        num = (correct * mask).sum(-1).double()
        den = (counts_h * mask).sum(-1).double()
        return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan")))

    return {"unbiased": cell_acc.sum(-1) / present.sum(-1).clamp(min=1),
            "aligned": share(aligned), "conflicting": share(~aligned),
            "accuracy": correct.sum(-1).double() / max(n, 1)}


def _as_lists(metrics: dict[str, torch.Tensor], heads: Sequence[str]) -> list[dict]:
    """Per member: {head: {metric: value}} (plain floats)."""
    host = {k: v.cpu().tolist() for k, v in metrics.items()}
    M = len(next(iter(host.values())))
    return [{h: {k: host[k][m][j] for k in host} for j, h in enumerate(heads)} for m in range(M)]


# ---------------------------------------------------------------------------------------
# One training phase of a stack


@dataclass
class _Phase:
    name: str
    heads: tuple
    select: str  # the head whose validation unbiased accuracy selects the checkpoint
    epochs: int
    lr: float
    weight_decay: float
    loss: Callable  # (outputs (M, H, B, C), y (M, B), idx (M, B), state) -> (M,) losses
    salt: int
    batch_size: int
    frozen_modules: tuple = ()  # submodules kept in eval mode (frozen BatchNorm)
    state: dict = field(default_factory=dict)  # extra per-phase training state (LfF's EMAs)
    # (stack, pipe) -> (idx (M, B) -> extra inputs of the stack's forward for those images), once per phase
    step_inputs: Callable | None = None


@torch.no_grad()
def _frozen_features(stack: StackedModules, pipe: _Pipeline) -> Callable:
    """Stage 2's step inputs: the frozen deep and shallow branches' features of every training
    image, computed once (in chunks of eval_batch_size images), gathered by index per step."""
    skeleton, t, chunk = stack.skeleton, pipe.data.train, pipe.cfg.eval_batch_size
    parts = [(skeleton.deep.stacked_forward(stack.params, x, "deep."),
              skeleton.shallow.stacked_forward(stack.params, x, "shallow."))
             for x in (pipe.images(t.x[:, i:i + chunk]) for i in range(0, t.y.shape[1], chunk))]
    b, d = (torch.cat(f, dim=1) for f in zip(*parts))  # (M, N, F) each

    def inputs(idx: torch.Tensor) -> dict:
        rows = idx[..., None].expand(-1, -1, b.shape[-1])
        return {"frozen": (b.gather(1, rows), d.gather(1, rows))}

    return inputs


def _set_mode(stack: StackedModules, phase: _Phase, training: bool) -> None:
    stack.train(training)
    for name in phase.frozen_modules:
        stack.skeleton.get_submodule(name).eval()


def _fit(stack: StackedModules, pipe: _Pipeline, phase: _Phase, *, store: Store | None, progress: bool,
         device) -> dict:
    """Train the stack for phase.epochs; validate every epoch; restore, per member, the epoch
    with the best validation unbiased accuracy of phase.select. Returns the phase record."""
    cfg, data = pipe.cfg, pipe.data
    M, N = data.train.y.shape
    B = phase.batch_size
    steps = N // B  # drop_last, as the public code
    if steps == 0:
        raise ValueError(f"batch_size {B} is larger than the {N} training images")
    params = stack.trainable_parameters()
    # Fused: one pass over each stacked tensor per step instead of ~10 elementwise ops (the
    # stacked tensors outgrow the caches, so each pass is a trip to memory); the same update.
    fused = all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in params)
    opt = torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay, fused=fused or None)
    sel = phase.heads.index(phase.select)
    best_score = torch.full((M,), -1.0, dtype=torch.float64, device=device)
    best_epoch = [0] * M
    best = stack.state()
    history: list[dict] = []
    start = 0
    file = f"{phase.name}.pt"
    saved = store.load_state(file, map_location=device) if store is not None else None
    if saved is not None:
        stack.load_state(saved["stack"])
        opt.load_state_dict(saved["optimizer"])
        best, best_score, best_epoch = saved["best"], saved["best_score"].to(device), saved["best_epoch"]
        history, start = saved["history"], saved["epoch"] + 1
        phase.state.update({k: v.to(device) for k, v in saved["extra"].items()})
    seconds = sum(h["seconds"] for h in history)
    last_save = time.perf_counter()
    inputs = phase.step_inputs(stack, pipe) if phase.step_inputs is not None and start < phase.epochs else None
    for epoch in range(start, phase.epochs):
        t0 = time.perf_counter()
        _set_mode(stack, phase, True)
        order = pipe.orders(epoch, device)
        gens = pipe.generators(phase.salt, epoch)
        loss_sum = torch.zeros(M, dtype=torch.float64, device=device)  # no host sync per step
        bar = Progress(steps, f"{phase.name}: epoch {epoch + 1}/{phase.epochs} ({M} members)", progress)
        for s in range(steps):
            x, y, idx = pipe.batch(order[:, s * B:(s + 1) * B], gens)
            loss = phase.loss(stack(x) if inputs is None else stack(x, **inputs(idx)), y, idx, phase.state)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            loss_sum += loss.detach()
            bar.update(1)
        _set_mode(stack, phase, False)
        val = _evaluate(stack, pipe, data.val, len(phase.heads), data.num_classes, cfg.eval_batch_size)
        # Recorded for the report only (last epoch, best-on-test as the public code selects): never selects.
        test = _evaluate(stack, pipe, data.test, len(phase.heads), data.num_classes, cfg.eval_batch_size) \
            if cfg.test_curves else None
        score = val["unbiased"][:, sel]
        improved = score > best_score
        if bool(improved.any()):
            best_score = torch.where(improved, score, best_score)
            # torch.where writes new tensors (no copy of the current state first); parameters out
            # of the optimizer (stage 2's frozen branches) never change: best keeps them as they are
            trained = set(stack.trainable)
            for kind, current in (("params", stack.params), ("buffers", stack.buffers)):
                for n, t in best[kind].items():
                    if kind == "params" and n not in trained:
                        continue
                    mask = improved.reshape((-1,) + (1,) * (t.dim() - 1))
                    best[kind][n] = torch.where(mask, current[n].detach(), t)
            best_epoch = [epoch + 1 if bool(i) else e for i, e in zip(improved.tolist(), best_epoch)]
        if not bool(torch.isfinite(loss_sum).all()):
            raise FloatingPointError(f"{phase.name}: the training loss became non-finite in epoch {epoch + 1}; "
                                     f"lower the learning rate ({phase.lr})")
        dt = time.perf_counter() - t0
        seconds += dt
        history.append({"epoch": epoch + 1, "seconds": dt, "train_loss": (loss_sum / steps).tolist(),
                        "val_unbiased": val["unbiased"].cpu().tolist(),
                        **({} if test is None else {"test_unbiased": test["unbiased"].cpu().tolist(),
                                                    "test_conflicting": test["conflicting"].cpu().tolist()})})
        bar.set_postfix(val_unbiased=f"{float(score.mean()):.3f}")
        bar.close()
        if store is not None and epoch + 1 < phase.epochs and \
                time.perf_counter() - last_save >= cfg.checkpoint_seconds:
            last_save = time.perf_counter()
            store.save_state(file, {"epoch": epoch, "stack": stack.state(), "optimizer": opt.state_dict(),
                                    "best": best, "best_score": best_score, "best_epoch": best_epoch,
                                    "history": history, "extra": phase.state})
    stack.load_state(best)
    _set_mode(stack, phase, False)
    val = _evaluate(stack, pipe, data.val, len(phase.heads), data.num_classes, cfg.eval_batch_size)
    test = _evaluate(stack, pipe, data.test, len(phase.heads), data.num_classes, cfg.eval_batch_size)
    return {"heads": list(phase.heads), "select": phase.select, "epochs": phase.epochs, "seconds": seconds,
            "best_epoch": best_epoch, "val": _as_lists(val, phase.heads), "test": _as_lists(test, phase.heads),
            "history": history}


# ---------------------------------------------------------------------------------------
# Losses


def _ce(out, y):
    """(M, B, C) logits, (M, B) labels -> (M, B) cross-entropy."""
    M, B, C = out.shape
    return F.cross_entropy(out.reshape(M * B, C), y.reshape(-1), reduction="none").view(M, B)


def _stage1_loss(out, y, idx, state):
    return _ce(out[:, 0], y).mean(1)


def _stage2_loss(cfg: DeNetDMConfig):
    T, lam = cfg.temperature, cfg.distill_weight

    def loss(out, y, idx, state):
        ce = _ce(out[:, 0], y).mean(1)
        teacher = F.softmax(out[:, 2].detach() / T, dim=-1)
        student = F.log_softmax(out[:, 1] / T, dim=-1)
        # soft-target cross-entropy, mean over the batch, times T^2 (the public code's form)
        distill = -(teacher * student).sum(-1).mean(1) * T * T
        return ce + lam * distill

    return loss


def _erm_loss(out, y, idx, state):
    return _ce(out[:, 0], y).mean(1)


def gce_loss(logits: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Generalized cross-entropy as LfF trains its biased model: CE * q * p_y^q (p_y detached),
    whose gradient equals that of 1 - p_y^q (q times that of the
    GCE (1 - p_y^q) / q of Zhang & Sabuncu: LfF's scaling). logits (..., C), y (...) -> (...)."""
    p_y = F.softmax(logits, dim=-1).gather(-1, y[..., None])[..., 0].detach()
    C = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none").view(y.shape)
    return ce * q * p_y.pow(q)


def _lff_loss(cfg: DeNetDMConfig, labels: torch.Tensor, num_classes: int):
    """LfF's step: update the per-sample loss EMAs of both models, normalize each by its class
    maximum, weight the debiased model's CE by W = L_b / (L_b + L_d)."""
    M, N = labels.shape
    alpha = cfg.lff_ema

    def loss(out, y, idx, state):
        if "ema_d" not in state:
            for k in ("ema_d", "ema_b", "updated"):
                state[k] = torch.zeros(M, N, dtype=out.dtype, device=labels.device)
        ld, lb = out[:, 0], out[:, 1]
        ce_d, ce_b = _ce(ld, y), _ce(lb, y)
        weights = []
        for key, ce in (("ema_b", ce_b), ("ema_d", ce_d)):
            ema = state[key]
            new = alpha * ema.gather(1, idx) + (1 - alpha * state["updated"].gather(1, idx)) * ce.detach()
            ema.scatter_(1, idx, new)
            # class maximum of the EMA over all training samples of the class (LfF's max_loss)
            cmax = torch.zeros(M, num_classes, dtype=ema.dtype, device=ema.device).scatter_reduce(
                1, labels, ema, reduce="amax", include_self=False)
            weights.append(new / cmax.gather(1, y).clamp(min=1e-12))
        state["updated"].scatter_(1, idx, torch.ones_like(idx, dtype=state["updated"].dtype))
        w = weights[0] / (weights[0] + weights[1] + 1e-8)
        return gce_loss(lb, y, cfg.lff_q).mean(1) + (ce_d * w).mean(1)

    return loss


# ---------------------------------------------------------------------------------------
# The experiment


def _members_of(cfg: DeNetDMConfig, load: Callable[[float, int], DatasetSplits], members=None):
    splits, ratios, seeds = [], [], []
    for ratio, seed in (cfg.members if members is None else members):
        s = load(ratio, seed)
        _check_splits(s, ratio)
        splits.append(s)
        ratios.append(ratio)
        seeds.append(seed)
    return splits, ratios, seeds


def _stack_of(build: Callable[[int], nn.Module], seeds: Sequence[int], salt: int, device,
              trainable=None) -> StackedModules:
    """build(i) is member i's module, initialized under a seed derived from (its seed, salt)."""
    modules = []
    for i, seed in enumerate(seeds):
        _seeded(seed, salt)
        modules.append(build(i).to(device))
    return StackedModules(modules, trainable=trainable, forward=_stacked_program(modules[0]))


def _run_group(cfg: DeNetDMConfig, data: _MemberData, *, store: Store | None, progress: bool, device) -> dict:
    """Every method on one group of members (one stack per model)."""
    pipe = _Pipeline(cfg, data, device)
    C, side, k = data.image_shape[0], data.image_shape[-1], data.num_classes
    factory = _Factory(cfg, C, side, k)
    seeds = data.seeds
    phases: dict[str, dict] = {}

    def run(name, stack, phase):
        done = store.load_state(f"{name}.done.pt", map_location=device) if store is not None else None
        if done is not None:
            stack.load_state(done["stack"])
            phases[name] = done["record"]
            return stack
        phases[name] = _fit(stack, pipe, phase, store=store, progress=progress, device=device)
        if store is not None:
            store.save_state(f"{name}.done.pt", {"stack": stack.state(), "record": phases[name]})
            store.discard(f"{name}.pt")
        return stack

    for di, (shallow, deep) in enumerate(cfg.depths if cfg.denetdm else ()):
        tag = f"denetdm-{shallow}-{deep}"
        stage1 = _stack_of(lambda s: ProductOfExperts(factory.branch("deep", deep), factory.branch("shallow", shallow),
                                                      k), seeds, 21 + 10 * di, device)
        run(f"{tag}-stage1", stage1, _Phase(f"{tag}-stage1", STAGE1_HEADS, "shallow", cfg.stage1_epochs,
                                             cfg.stage1_lr, cfg.stage1_weight_decay, _stage1_loss, 1,
                                             cfg.batch_size))
        stage1_models = [stage1.member_module(m) for m in range(data.num_members)]

        def build_stage2(i):
            return DistilledTarget(stage1_models[i], factory.target())

        probe = DistilledTarget(stage1_models[0], factory.target())
        trainable = [n for n, _ in probe.named_parameters() if n not in set(probe.frozen())]
        stage2 = _stack_of(build_stage2, seeds, 22 + 10 * di, device, trainable=trainable)
        # Without augmentation an image's features in the frozen (stateless MLP) branches are the
        # same every epoch: computed once, not in every step (half the first layers' FLOPs of a step).
        cache = stage2.forward is not None and cfg.augment == "none"
        run(f"{tag}-stage2", stage2, _Phase(f"{tag}-stage2", STAGE2_HEADS, "target", cfg.stage2_epochs, cfg.stage2_lr,
                                             cfg.stage2_weight_decay, _stage2_loss(cfg), 2, cfg.batch_size,
                                             frozen_modules=("deep", "shallow"),
                                             step_inputs=_frozen_features if cache else None))
    if "erm" in cfg.baselines:
        erm = _stack_of(lambda s: _Heads(_Classifier(factory.baseline(), k, cfg.baseline_input_scale)), seeds, 23,
                        device)
        run("erm", erm, _Phase("erm", ERM_HEADS, "erm", cfg.baseline_epochs, cfg.baseline_lr,
                               cfg.baseline_weight_decay, _erm_loss, 3, cfg.baseline_batch_size))
    if "lff" in cfg.baselines:
        lff = _stack_of(lambda s: _Heads(_Classifier(factory.baseline(), k, cfg.baseline_input_scale),
                                         _Classifier(factory.baseline(), k, cfg.baseline_input_scale)),
                        seeds, 24, device)
        run("lff", lff, _Phase("lff", LFF_HEADS, "debiased", cfg.baseline_epochs, cfg.baseline_lr,
                               cfg.baseline_weight_decay, _lff_loss(cfg, data.train.y, k), 4,
                               cfg.baseline_batch_size))
    return phases


def _method_rows(cfg: DeNetDMConfig) -> list[tuple[str, str, str]]:
    """(method name, phase, head) of every reported method; the first is DeNetDM's output."""
    rows = []
    multi = len(cfg.depths) > 1
    for shallow, deep in (cfg.depths if cfg.denetdm else ()):
        tag = f"denetdm-{shallow}-{deep}"
        name = f"denetdm({shallow},{deep})" if multi else "denetdm"
        rows += [(name, f"{tag}-stage2", "target"),
                 (f"{name} stage-1 shallow", f"{tag}-stage1", "shallow"),
                 (f"{name} stage-1 deep", f"{tag}-stage1", "deep")]
    if "erm" in cfg.baselines:
        rows.append(("erm", "erm", "erm"))
    if "lff" in cfg.baselines:
        rows.append(("lff", "lff", "debiased"))
    return rows


def _test_curves(rec: dict, head: int) -> list[list[float]] | None:
    """Per member (global order), the test unbiased accuracy of `head` after every epoch; None
    when the phase was resumed from a run that did not record it. rec["history"] is a list of
    groups (one stack, or one member at a time), each a list of epochs of per-member lists."""
    curves = []
    for group in rec["history"]:
        if not group or "test_unbiased" not in group[0]:
            return None
        for m in range(len(group[0]["test_unbiased"])):
            curves.append([e["test_unbiased"][m][head] for e in group])
    return curves


def _stats(vals: list[float]) -> dict:
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(vals) > 1 else 0.0, "values": vals}


# The protocol of the ERM and LfF figures DeNetDM quotes on Colored MNIST (LfF's code, alinlab/LfF:
# config.py batch 256, module/mlp.py 3 hidden layers of 100 + head, whose forward divides the
# already [0, 1] pixels by 255 again); its 100 epochs are the CLI's default under this protocol.
LFF_PROTOCOL = {"baseline_batch_size": 256, "baseline_depth": 4, "baseline_input_scale": 1 / 255}
CIFAR_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the public C-CIFAR10 normalization


def config_for(data: str, *, arch: str = "auto", stage2_epochs: int | None = None, baseline_epochs: int | None = None,
               baseline_protocol: str = "ours", batch_size: int | None = None, stage2_lr: float | None = None,
               augment: str = "auto", **fields) -> DeNetDMConfig:
    """The DeNetDMConfig for dataset `data` with the published defaults of what is not given:
    arch "auto" (conv on corrupted-*, else mlp), stage-2 epochs (200 on the CIFAR sets, else
    100), batch (256 conv, 64 mlp), stage-2 learning rate (1e-4 conv, 1e-3 mlp), augment
    "auto" (flip-crop on the CIFAR sets, else none), the C-CIFAR10 normalization on the CIFAR
    sets; baseline_protocol "lff" applies LFF_PROTOCOL (and 100 baseline epochs unless given).
    fields: the other DeNetDMConfig fields. Errors start with the field's name."""
    if baseline_protocol not in BASELINE_PROTOCOLS:
        raise ValueError(f"baseline_protocol: must be one of {', '.join(BASELINE_PROTOCOLS)}, got {baseline_protocol!r}")
    cifar = "cifar" in data
    if arch == "auto":
        arch = "conv" if data.startswith("corrupted") else "mlp"
    if arch == "conv" and tuple(map(tuple, fields.get("depths", ((3, 5),)))) != ((3, 5),):
        raise ValueError("depths: applies to the mlp branches only; the conv branches are fixed")
    if baseline_protocol == "lff" and (arch != "mlp" or fields.get("target")):
        raise ValueError("baseline_protocol: lff is LfF's Colored MNIST protocol (MLP baselines): it needs the mlp "
                         "branches and no target")
    lff = baseline_protocol == "lff"
    return DeNetDMConfig(
        arch=arch, stage2_epochs=stage2_epochs or (200 if cifar else 100),
        baseline_epochs=baseline_epochs or (100 if lff else None),
        batch_size=batch_size or (256 if arch == "conv" else 64),
        stage2_lr=stage2_lr or (1e-4 if arch == "conv" else 1e-3),
        augment=augment if augment != "auto" else ("flip-crop" if cifar else "none"),
        normalize=CIFAR_MEAN_STD if cifar else None, **(LFF_PROTOCOL if lff else {}), **fields)


def member_options(data: str, cfg: DeNetDMConfig, data_options: dict | None = None) -> dict:
    """The dataset options of every member of a run on the built-in dataset `data` (each member
    adds its conflict ratio, seed and an unbiased validation split): the embedded 8x8 digits
    go to 16x16 for the MLP branches (every pixel kept, the first layer 4x cheaper than at 32)."""
    from shortcut_fast.data import dataset_options

    try:
        options = dataset_options(data)
    except ValueError as exc:
        raise ValueError(f"data: {exc}") from None
    if "conflict_ratio" not in options or "unbiased_val" not in options:
        raise ValueError(f"data: {data!r} has no bias attribute with a conflict ratio; use colored-digits, "
                         f"colored-mnist-5k, colored-mnist, corrupted-digits, corrupted-cifar10, or your own "
                         f"csv:FILE with an attribute column")
    extra = dict(data_options or {})
    for key in ("conflict_ratio", "unbiased_val", "seed"):
        if key in extra:
            raise ValueError(f"data_options: {key} is set by denetdm itself (--conflict-ratio / config.ratios, "
                             f"--seed / config.seed)")
    if cfg.arch == "mlp" and "image_size" in options and "image_size" not in extra:
        extra["image_size"] = 16
    return extra

# How a reported number picks its epoch: ours (validation), and the two the published figures may use.
PROTOCOLS = ("val", "last", "test-best")


def _aggregate(cfg: DeNetDMConfig, members: list[dict], phases: dict) -> dict:
    methods = {}
    for name, phase, head in _method_rows(cfg):
        rec = phases[phase]
        curves = _test_curves(rec, rec["heads"].index(head))
        per = [{"ratio": mem["ratio"], "seed": mem["seed"], "best_epoch": rec["best_epoch"][i],
                "val": rec["val"][i][head], "test": rec["test"][i][head]} for i, mem in enumerate(members)]
        by_ratio, by_protocol = {}, {}
        for r in cfg.ratios:
            rows = [i for i, p in enumerate(per) if p["ratio"] == r]
            by_ratio[str(r)] = {metric: _stats([per[i]["test"][metric] for i in rows]) for metric in METRICS}
            if curves is not None:  # unbiased test accuracy under each epoch rule
                by_protocol[str(r)] = {"val": by_ratio[str(r)]["unbiased"],
                                       "last": _stats([curves[i][-1] for i in rows]),
                                       "test-best": _stats([max(curves[i]) for i in rows])}
        methods[name] = {"phase": phase, "head": head, "per_member": per, "by_ratio": by_ratio,
                         "by_protocol": by_protocol or None}
    return methods


def _merge_phases(per_rank: list[dict], stacked: bool) -> dict:
    """The phase records of every rank (in rank order) as one process would have made them:
    per-member lists concatenated; stacked, each epoch's per-member histories concatenated into
    the one stack's history; one member at a time, the per-member histories listed in order.
    seconds: the slowest rank's (ranks train at the same time)."""
    merged = {}
    for name, first in per_rank[0].items():
        recs = [r[name] for r in per_rank]
        rec = dict(first)
        for k in ("best_epoch", "val", "test"):
            rec[k] = [x for r in recs for x in r[k]]
        rec["seconds"] = max(r["seconds"] for r in recs)
        if stacked:
            epochs = [r["history"][0] for r in recs]  # one stack per rank
            rec["history"] = [[{"epoch": row[0]["epoch"], "seconds": max(e["seconds"] for e in row),
                                "train_loss": [v for e in row for v in e["train_loss"]],
                                **{key: [v for e in row for v in e[key]]
                                   for key in ("val_unbiased", "test_unbiased", "test_conflicting")
                                   if all(key in e for e in row)}}
                               for row in zip(*epochs)]]
        else:
            rec["history"] = [h for r in recs for h in r["history"]]
        merged[name] = rec
    return merged


def run_denetdm(load: Callable[[float, int], DatasetSplits], cfg: DeNetDMConfig, *, store: Store | None = None,
                device="cpu", progress: bool = True, dist: DistContext | None = None) -> dict:
    """Train DeNetDM (every depth pair) and the baselines on every (ratio, seed) member.

    load(ratio, seed) returns the member's DatasetSplits (its test and validation splits
    unbiased, with bias labels). store: partial results (every phase's state after every
    epoch; finished phases), resumed when the store is resuming. Returns the result dict
    (`summary` prints it, `write_outputs` saves it). dist (a distributed.DistContext): with
    world_size > 1 the members are split over the ranks (module docstring; the settings are
    compared across ranks first, each rank's partial state goes to store.sub("rank{r}")), and
    every rank returns the whole result.
    """
    if not isinstance(cfg, DeNetDMConfig):
        raise TypeError(f"cfg must be a DeNetDMConfig, got {type(cfg).__name__}")
    device = torch.device(device)
    t0 = time.perf_counter()
    distributed = dist is not None and dist.world_size > 1
    progress = progress and is_main(dist)
    if distributed:
        check_same({"config": asdict(cfg), "dtype": str(torch.get_default_dtype())}, dist, "DeNetDM settings")
        if store is not None:
            store = store.sub(f"rank{dist.rank}")
    everyone = cfg.members
    mine = shard(len(everyone), dist, "the DeNetDM members (conflict ratio, seed)")
    splits, ratios, seeds = _members_of(cfg, load, everyone[mine.start:mine.stop])
    members = [{"ratio": r, "seed": s} for r, s in everyone]
    # One stack of this rank's members (the fast path), or one member at a time (stacked=False).
    groups = [list(range(len(splits)))] if cfg.stacked else [[i] for i in range(len(splits))]
    phases: dict[str, dict] = {}
    for gi, group in enumerate(groups):
        data = _gather_members([splits[i] for i in group], [ratios[i] for i in group], [seeds[i] for i in group],
                               device)
        # member-{global index of the group's first member}: member-{gi} in one process
        sub = store if (store is None or len(groups) == 1) else store.sub(f"member-{mine.start + group[0]}")
        got = _run_group(cfg, data, store=sub, progress=progress, device=device)
        for name, rec in got.items():
            if name not in phases:
                phases[name] = {k: ([] if k in ("best_epoch", "val", "test") else v) for k, v in rec.items()}
                phases[name]["history"] = []
                phases[name]["seconds"] = 0.0
            for k in ("best_epoch", "val", "test"):
                phases[name][k] += rec[k]
            phases[name]["history"].append(rec["history"])
            phases[name]["seconds"] += rec["seconds"]
    first = splits[0]
    sizes = {p: len(getattr(first, p)) for p in ("train", "val", "test")}
    conflicting = [int((s.train.labels != s.train.attributes).sum()) for s in splits]
    dataset = {"name": first.name, "sizes": sizes, "image_shape": list(first.image_shape),
               "num_classes": first.num_classes}
    if distributed:  # every rank's members, in rank order = member order; the dataset as rank 0 (member 0) sees it
        parts = gather({"phases": phases, "conflicting": conflicting, "dataset": dataset}, dist)
        phases = _merge_phases([p["phases"] for p in parts], cfg.stacked)
        conflicting = [c for p in parts for c in p["conflicting"]]
        dataset = parts[0]["dataset"]
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "members": [dict(m, train_conflicting=c) for m, c in zip(members, conflicting)],
            "dataset": dataset,
            "methods": _aggregate(cfg, members, phases),
            "phases": {n: {k: v for k, v in rec.items() if k not in ("val", "test")} for n, rec in phases.items()},
            "seconds": time.perf_counter() - t0, "device": str(device)}


# ---------------------------------------------------------------------------------------
# Reporting


def _cell(stats: dict) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def table_rows(result: dict, metric: str = "unbiased") -> list[list[str]]:
    ratios = result["config"]["ratios"]
    return [[name, *(_cell(m["by_ratio"][str(r)][metric]) for r in ratios)] for name, m in result["methods"].items()]


def summary(result: dict, data: str, out: Path | None = None) -> str:
    ratios = result["config"]["ratios"]
    headers = ["method", *(f"r={100 * r:g}%" for r in ratios)]
    seeds = result["config"]["seeds"]
    lines = [f"DeNetDM on {data}: test accuracy (%) over {seeds} seed(s), mean ± std",
             "unbiased (mean over label x bias cells):", format_table(table_rows(result, "unbiased"), headers),
             "bias-conflicting:", format_table(table_rows(result, "conflicting"), headers),
             f"{result['seconds']:.0f} s on {result['device']}"]
    if out is not None:
        lines.append(f"results in {out}/result.json, figures in {out}/")
    return "\n".join(lines)


def write_outputs(result: dict, out: Path, meta: dict) -> None:
    out = Path(out)
    write_json({**meta, **result}, out / "result.json")
    plt = pyplot()
    ratios = result["config"]["ratios"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("unbiased", "conflicting")):
        for name, m in result["methods"].items():
            if "stage-1" in name:
                continue
            mean = [100 * m["by_ratio"][str(r)][metric]["mean"] for r in ratios]
            std = [100 * m["by_ratio"][str(r)][metric]["std"] for r in ratios]
            ax.errorbar([100 * r for r in ratios], mean, yerr=std, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("bias-conflicting ratio (%)")
        ax.set_ylabel(f"{metric} test accuracy (%)")
        ax.legend(fontsize=8)
    save_figure(fig, out / "accuracy.png", tight=True)
    curves = {}
    for name, rec in result["phases"].items():
        heads = rec["heads"]
        hist = rec["history"][0] if rec["history"] and isinstance(rec["history"][0], list) else rec["history"]
        if not hist:
            continue
        for j, h in enumerate(heads):
            if h == "teacher":
                continue
            # mean over members of the validation unbiased accuracy
            curves[f"{name}:{h}"] = [sum(row[j] for row in e["val_unbiased"]) / len(e["val_unbiased"]) for e in hist]
    plot_curves(curves, out / "curves.png", xlabel="epoch", ylabel="validation unbiased accuracy",
                title="DeNetDM branches and baselines (mean over members)")


# ---------------------------------------------------------------------------------------
# The Python API (docs/api.md): Config, Result, run

Config = DeNetDMConfig


@dataclass
class DeNetDMResult(ApiResult):
    """What `run` returns: `result`, the dict of run_denetdm (config, members, dataset, methods,
    phases, seconds, device), with summary() and write(folder). result["methods"][name]
    ["by_ratio"][str(ratio)][metric] holds {"mean", "std", "values"} of the test accuracy."""

    result: dict

    _command = "denetdm"

    def __getitem__(self, key: str):
        return self.result[key]

    @property
    def methods(self) -> dict:
        return self.result["methods"]

    def _summary(self, data: str, out: Path | None) -> str:
        return summary(self.result, data, out)

    def _write(self, out: Path, record: dict) -> None:
        write_outputs(self.result, out, {k: record[k] for k in ("command", "data", "dataset_meta") if k in record})


Result = DeNetDMResult


def _member_loader(data, cfg: DeNetDMConfig, data_options: dict | None) -> Callable[[float, int], DatasetSplits]:
    """load(ratio, seed) for run: from a dataset name, a function, or one DatasetSplits."""
    if isinstance(data, DatasetSplits):
        if data_options:
            raise TypeError("data_options apply only to a dataset name")
        if len(cfg.ratios) != 1:
            raise ValueError(f"data: one DatasetSplits serves every member, so config.ratios must hold a single "
                             f"conflict ratio (its own), got {list(cfg.ratios)}")
        return lambda ratio, seed: data
    if isinstance(data, str):
        from shortcut_fast.data import load_dataset

        extra = member_options(data, cfg, data_options)
        cache: dict = {}

        def load(ratio: float, seed: int) -> DatasetSplits:
            if (ratio, seed) not in cache:
                cache[(ratio, seed)] = load_dataset(data, seed=seed, conflict_ratio=ratio, unbiased_val=True, **extra)
            return cache[(ratio, seed)]

        return load
    if callable(data):
        if data_options:
            raise TypeError("data_options apply only to a dataset name")
        return data
    raise TypeError(f"data must be a dataset name (e.g. 'colored-digits'), a function (ratio, seed) -> DatasetSplits "
                    f"or one DatasetSplits (shortcut_fast.data.as_splits builds one from uint8 tensors), got "
                    f"{type(data).__name__}")


def run(model, data, config: DeNetDMConfig | None = None, *, progress: bool = False,
        data_options: dict | None = None, **kw) -> DeNetDMResult:
    """DeNetDM against ERM and LfF on every (conflict ratio, seed) member of config.

    model: must be None: DeNetDM trains its own pair of branches (config.arch, depths,
    width; config.target for the stage-2 target and the baselines). data: a dataset name
    with a conflict ratio (loaded per ratio and seed, with an unbiased validation split;
    data_options: its other options), a function (ratio, seed) -> DatasetSplits, or one
    DatasetSplits used for every member (then config.ratios holds one ratio). Images must be
    uint8, the attribute aligned with the labels. kw: run_denetdm's own options (device,
    store). Returns a Result: summary(), write(folder) (result.json and the figures).
    """
    from shortcut_fast.experiments import _api

    if model is not None:
        raise ValueError(f"model must be None for DeNetDM: it trains its own branch pair (the published "
                         f"architectures, chosen by config.arch / depths / width / target), got "
                         f"{type(model).__name__}")
    cfg = _api.check_config(config, DeNetDMConfig, "denetdm.Config")
    load = _member_loader(data, cfg, data_options)
    first: list[DatasetSplits] = []

    def remembered(ratio: float, seed: int) -> DatasetSplits:
        splits = load(ratio, seed)
        if not first and isinstance(splits, DatasetSplits):
            first.append(splits)  # its metadata goes into result.json, as the command line's first member
        return splits

    kw.setdefault("device", _api.default_device(None))
    out = run_denetdm(remembered, cfg, progress=progress, **kw)
    result = DeNetDMResult(out)
    name = data if isinstance(data, str) else (first[0].name if first else "data")
    _api.attach(result, "denetdm", name, first[0] if first else None, None)
    return result
