"""The one trainer every experiment uses.

- SGD or Adam, cosine / step / constant schedules with optional linear warm-up, or
  "plateau": ReduceLROnPlateau (default factor 0.5, patience 1) on the epoch's mean training
  loss (the schedule of You et al.'s mitigation script), or on the validation loss
  (plateau_monitor "val_loss", as Wang et al.'s Lightning script).
- In-memory datasets (`dataset.in_memory`) are moved to the device once and batched
  there: no DataLoader, no per-sample Python. File-backed datasets use a DataLoader.
- Mixed precision (bf16 autocast) on CUDA by default; float32 on the CPU. On CUDA, conv
  models also train in channels_last by default, cuDNN picks its algorithms by benchmark,
  evaluation batches hold 2048 images, and `compile=True` runs the training step through
  torch.compile. Nothing inside a step waits for the device (no .item(), no blocking copy:
  augmentation draws go through pinned memory), so the host runs ahead of the GPU.
- Evaluation reports accuracy, loss, per-group accuracy, worst-group accuracy and, where
  attributes are class-aligned, bias-aligned / bias-conflicting accuracy.
- Every epoch writes `last.pt` (full state, for resume) and `history.json`; `best.pt`
  holds the weights with the best validation score; `keep_every` adds `epoch_NNN.pt`.
- Determinism: the batch order of epoch e comes from a generator seeded by (seed, e), so a
  resumed run sees exactly the batches an uninterrupted run would have seen.
- Distribution (`dist=`, a shortcut_fast.distributed.DistContext with world_size > 1, from
  torchrun): data parallel with DistributedDataParallel. Every rank walks the one-process
  batch order, augments the whole global batch with the one-process draws, then trains on
  its contiguous slice of it (balanced: sizes differ by at most one; an uneven last batch
  may leave a rank an empty slice); each rank's loss, its slice mean, is weighted by
  slice_size * world_size / batch_size, so DDP's gradient average is the full-batch mean.
  BatchNorm layers become SyncBatchNorm (global batch statistics; on the CPU a gloo
  implementation that all-reduces sums), restored to the plain modules on return.
  Evaluation shards the samples over ranks and all-reduces counts and loss sums. Rank 0
  alone writes the checkpoints (a barrier follows); every rank resumes from the same
  last.pt. The result equals one process to float tolerance (reduction order differs).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast import distributed as sd
from shortcut_fast.ops.ablation import group_outcomes
from shortcut_fast.report import Progress
from shortcut_fast.run_folder import Store, load_state_file, settings_diff

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant", "plateau")
AUGMENTATIONS = ("none", "flip-crop", "crop", "resized-crop-flip", "pad-flip-resized-crop")
PLATEAU_MONITORS = ("train_loss", "val_loss")
SELECT_METRICS = ("accuracy", "worst_group_accuracy", "last")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # None: 0.05 for SGD, 1e-3 for Adam/AdamW
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    augment: str = "none"
    amp: bool | None = None  # None: bf16 autocast on CUDA, off on the CPU
    channels_last: bool | None = None  # None: on for CUDA models with 2-d convolutions, off on the CPU
    compile: bool = False  # torch.compile the model for the training step (eager, with a warning, where it fails)
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int | None = None  # None: 2048 on CUDA, 512 on the CPU
    select: str = "accuracy"  # validation metric that picks best.pt
    keep_every: int = 0  # also keep epoch_NNN.pt every k epochs (0: never)
    max_steps_per_epoch: int | None = None  # cap for quick runs and tests
    label_smoothing: float = 0.0
    num_workers: int = 0
    nesterov: bool = True  # SGD with momentum > 0 only (the trainer has always used Nesterov momentum)
    plateau_factor: float = 0.5  # schedule "plateau": ReduceLROnPlateau's factor, patience, monitored loss
    plateau_patience: int = 1
    plateau_monitor: str = "train_loss"  # or "val_loss"

    def __post_init__(self):
        checks = [
            ("epochs", self.epochs >= 1, "an int >= 1"),
            ("batch_size", self.batch_size >= 1, "an int >= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("augment", self.augment in AUGMENTATIONS, f"one of {AUGMENTATIONS}"),
            ("select", self.select in SELECT_METRICS, f"one of {SELECT_METRICS}"),
            ("lr", self.lr is None or self.lr > 0, "a positive float"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, f"in [0, epochs={self.epochs}]"),
            ("warmup_epochs", self.schedule != "plateau" or self.warmup_epochs == 0,
             "0 with schedule 'plateau' (the plateau scheduler owns the learning rate)"),
            ("eval_batch_size", self.eval_batch_size is None or self.eval_batch_size >= 1, "None or an int >= 1"),
            ("keep_every", self.keep_every >= 0, "an int >= 0 (0: keep no epoch checkpoints)"),
            ("max_steps_per_epoch", self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             "None or an int >= 1"),
            ("weight_decay", self.weight_decay >= 0, "a float >= 0"),
            ("num_workers", self.num_workers >= 0, "an int >= 0"),
            ("plateau_factor", 0 < self.plateau_factor < 1, "in (0, 1)"),
            ("plateau_patience", self.plateau_patience >= 0, "an int >= 0"),
            ("plateau_monitor", self.plateau_monitor in PLATEAU_MONITORS, f"one of {PLATEAU_MONITORS}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.05 if self.optimizer == "sgd" else 1e-3


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    n: int
    group_accuracy: dict[int, float] = field(default_factory=dict)
    group_counts: dict[int, int] = field(default_factory=dict)
    worst_group_accuracy: float | None = None
    aligned_accuracy: float | None = None
    conflicting_accuracy: float | None = None


@dataclass
class TrainResult:
    config: dict
    epochs_run: int
    best_epoch: int
    history: list[dict]
    final: dict[str, EvalResult]  # evaluation of best.pt on test, val and extra sets
    seconds: float
    out_dir: str | None = None


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N'; anything else is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: torch sees no CUDA device here (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Batching


class Batches:
    """Yields (x, y, a) float/long batches on `device` in a seeded order."""

    def __init__(self, dataset, batch_size: int, device: torch.device, *, num_workers: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        # Resident data is batched on the device; file-backed data (in_memory False) and foreign
        # torch Datasets (no such property) go through a DataLoader with worker processes.
        self.in_memory = bool(getattr(dataset, "in_memory", False))
        if self.in_memory:
            self.dataset = dataset.to(device)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def iterate(self, order: torch.Tensor | None = None):
        """Batches of `order` (default: every sample in order; a subset of indices is fine)."""
        order = torch.arange(len(self.dataset)) if order is None else order
        n = len(order)
        if self.in_memory:
            order = order.to(self.device)
            for start in range(0, n, self.batch_size):
                yield self.dataset.get_batch(order[start:start + self.batch_size])
            return
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.dataset, order.tolist()),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y, a in loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                   a.to(self.device, non_blocking=True))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (augmentation draws from the CPU generator) on `device` without a
    host sync: a blocking copy to a GPU waits for its stream, a pinned non-blocking one does not."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _resized_crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size = input size, scale (0.7, 1), ratio (3/4, 4/3), bilinear) + a
    horizontal flip with p 0.5, the augmentation of You et al.'s scripts (utils.get_transform),
    vectorized: one draw of area and log-ratio per image; where torchvision would retry an
    oversized box (up to 10 times) the box is clipped to the image instead."""
    n, _, h, w = x.shape
    area = torch.empty(n).uniform_(0.7, 1.0, generator=generator) * (h * w)
    ratio = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator))
    cw = torch.sqrt(area * ratio).round().clamp(1, w)
    ch = torch.sqrt(area / ratio).round().clamp(1, h)
    left = torch.floor(torch.rand(n, generator=generator) * (w - cw + 1))
    top = torch.floor(torch.rand(n, generator=generator) * (h - ch + 1))
    flip = torch.rand(n, generator=generator) < 0.5
    # affine_grid maps output [-1, 1] to the crop box in input coordinates (align_corners=False)
    sx, sy = cw / w, ch / h
    tx, ty = (2 * left + cw) / w - 1, (2 * top + ch) / h - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = tx, sy, ty
    grid = F.affine_grid(_to_device(theta, x.device).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pad_flip_resized_crop(x: torch.Tensor, generator: torch.Generator, *, pad: int = 4, attempts: int = 10) -> torch.Tensor:
    """Pad(4) (zeros) + RandomHorizontalFlip + RandomResizedCrop(size = input size, scale
    (0.08, 1), ratio (3/4, 4/3), bilinear): the CIFAR-10 training transform of Wang et al.'s
    nn-frequency-shortcuts train.py, vectorized. Like torchvision's get_params, each image
    draws up to `attempts` (area, log-ratio) boxes of the padded image and takes the first
    that fits, else the whole padded image (its aspect ratio, 1, lies inside the range). The
    flip is applied to the crop (the same distribution as flipping first); resizing is
    grid_sample's bilinear, without torchvision's antialiasing when a crop is shrunk."""
    n, _, h, w = x.shape
    ph, pw = h + 2 * pad, w + 2 * pad
    area = torch.empty(n, attempts).uniform_(0.08, 1.0, generator=generator) * (ph * pw)
    ratio = torch.exp(torch.empty(n, attempts).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator))
    cw_all = torch.sqrt(area * ratio).round()
    ch_all = torch.sqrt(area / ratio).round()
    fits = (cw_all >= 1) & (cw_all <= pw) & (ch_all >= 1) & (ch_all <= ph)
    fits = torch.cat([fits, torch.ones(n, 1, dtype=torch.bool)], 1)  # the fallback: the whole padded image
    cw_all = torch.cat([cw_all, torch.full((n, 1), float(pw))], 1)
    ch_all = torch.cat([ch_all, torch.full((n, 1), float(ph))], 1)
    first = fits.float().argmax(1)  # the first attempt that fits
    pick = torch.arange(n)
    cw, ch = cw_all[pick, first], ch_all[pick, first]
    left = torch.floor(torch.rand(n, generator=generator) * (pw - cw + 1))
    top = torch.floor(torch.rand(n, generator=generator) * (ph - ch + 1))
    flip = torch.rand(n, generator=generator) < 0.5
    sx, sy = cw / pw, ch / ph
    tx, ty = (2 * left + cw) / pw - 1, (2 * top + ch) / ph - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = tx, sy, ty
    padded = F.pad(x, (pad, pad, pad, pad))  # torchvision's Pad: constant 0 (black)
    grid = F.affine_grid(_to_device(theta, x.device).to(x.dtype), [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """On-device random crop (pad 4, reflect) and horizontal flip, vectorized over the batch;
    "resized-crop-flip": RandomResizedCrop(0.7-1) + flip (see _resized_crop_flip);
    "pad-flip-resized-crop": Pad 4 + flip + RandomResizedCrop(0.08-1) (see _pad_flip_resized_crop)."""
    if kind == "none":
        return x
    if kind == "resized-crop-flip":
        return _resized_crop_flip(x, generator)
    if kind == "pad-flip-resized-crop":
        return _pad_flip_resized_crop(x, generator)
    n, c, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = _to_device(torch.randint(0, 2 * pad + 1, (n,), generator=generator), x.device)
    dx = _to_device(torch.randint(0, 2 * pad + 1, (n,), generator=generator), x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if kind == "flip-crop":  # the flip is a reversed column order of the crop (same draws, same order)
        flip = _to_device(torch.rand(n, generator=generator) < 0.5, x.device)
        cols = torch.where(flip[:, None], cols.flip(-1), cols)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    # one gather along each padded image's flattened pixels (about 3x faster than indexing with
    # four broadcast index tensors, then a flip and a select)
    pixel = rows[:, :, None] * (w + 2 * pad) + (dx[:, None] + cols)[:, None, :]
    out = padded.reshape(n, c, -1).gather(2, pixel.reshape(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w)


# ---------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, device: torch.device | str | None = None, batch_size: int = 512,
             amp: bool | None = None, bias_aligned_attribute: bool = False,
             channels_last: bool = False, dist: sd.DistContext | None = None) -> EvalResult:
    """Accuracy, mean loss and per-group accuracy of `model` on `dataset` (counts on device).

    bias_aligned_attribute: attributes are class indices, so also report accuracy on
    bias-aligned (attribute == label) and bias-conflicting samples. channels_last: feed the
    batches in that memory format (for a model converted to it). dist (world_size > 1):
    every rank evaluates its contiguous shard of the samples (a rank may get none) and the
    counts and loss sums are all-reduced, so every rank returns the whole result (counts
    exact, the loss to float tolerance). A collective: every rank must call it.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    use_amp = (device.type == "cuda") if amp is None else amp
    was_training = model.training
    model.eval()
    num_groups = max(int(getattr(dataset, "num_groups", 0) or 0), 1)
    num_attributes = int(getattr(dataset, "num_attributes", 0) or 0)
    # Per-group and [aligned, conflicting] counts through the one group-outcome op; the last
    # group slot holds samples without a known group.
    correct = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    aligned = torch.zeros(2, 2, dtype=torch.int64, device=device)  # [aligned, conflicting] x [correct, count]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    order = None
    if dist is not None and dist.world_size > 1:
        lo, hi = _slice_bounds(len(dataset), dist.rank, dist.world_size)
        order = torch.arange(lo, hi)
    for x, y, a in Batches(dataset, batch_size, device).iterate(order):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        logits = logits.float()
        if num_attributes > 0:
            group = torch.where(a >= 0, y * num_attributes + a, torch.full_like(y, num_groups))
        else:
            group = torch.full_like(y, num_groups)
        hits, losses = group_outcomes(logits, y, group, num_groups + 1, allow_nonfinite=True)
        correct += hits[0]
        counts += torch.bincount(group, minlength=num_groups + 1)
        loss_sum += losses.sum().double()
        if bias_aligned_attribute:
            known = a >= 0
            conflict = (a[known] != y[known]).long()
            aligned[:, 0] += group_outcomes(logits[known], y[known], conflict, 2, allow_nonfinite=True)[0][0]
            aligned[:, 1] += torch.bincount(conflict, minlength=2)
        n += y.numel()
    model.train(was_training)
    if dist is not None and dist.world_size > 1:
        ints = sd.all_reduce_sum_(torch.cat([correct, counts, aligned.flatten(),
                                             torch.tensor([n], dtype=torch.int64, device=device)]), dist)
        g1 = num_groups + 1
        correct, counts, aligned = ints[:g1], ints[g1:2 * g1], ints[2 * g1:2 * g1 + 4].view(2, 2)
        n = int(ints[-1])
        loss_sum = sd.all_reduce_sum_(loss_sum.reshape(1), dist)[0]
    correct, counts = correct.tolist(), counts.tolist()  # python ints: exact ratios, not float32 ones
    groups = {g: correct[g] / counts[g] for g in range(num_groups) if counts[g] > 0 and num_attributes > 0}
    result = EvalResult(
        accuracy=sum(correct) / max(n, 1),
        loss=float(loss_sum.cpu() / max(n, 1)),
        n=n,
        group_accuracy=groups,
        group_counts={g: int(counts[g]) for g in groups},
        worst_group_accuracy=min(groups.values()) if groups else None,
    )
    if bias_aligned_attribute:
        al = aligned.tolist()
        result.aligned_accuracy = al[0][0] / al[0][1] if al[0][1] > 0 else None
        result.conflicting_accuracy = al[1][0] / al[1][1] if al[1][1] > 0 else None
    return result


# ---------------------------------------------------------------------------------------
# Data parallel (dist=): slices of the global batch, synchronized BatchNorm, gathers


def _slice_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous [lo, hi) of n items: balanced (the first n % world ranks get one
    more), ranks in order cover range(n); empty where n < world."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum of the ranks' gradients (each rank's input
    reaches every rank's output)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherRows(torch.autograd.Function):
    """Every rank's rows concatenated in rank order (slices of any size, empty ones too);
    backward sums the ranks' gradients of the whole and hands each rank its own rows."""

    @staticmethod
    def forward(ctx, tensor, sizes, rank):
        ctx.lo, ctx.hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        width = max(sizes)
        padded = tensor.new_zeros((width, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.contiguous())
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.lo:ctx.hi], None, None


def gather_global_batch(tensor: torch.Tensor, dist: sd.DistContext | None) -> torch.Tensor:
    """The rows of every rank's slice of the global batch, in rank order (= the one-process
    batch), with gradients flowing back to each rank's own rows (summed over the ranks'
    losses). For a loss over the whole batch (contrastive negatives, ...) under `train(dist=)`:
    such a loss_fn computes the whole-batch loss on every rank and sets the attribute
    `reduces_over_ranks = True`. `tensor` itself without distribution. A collective."""
    if dist is None or dist.world_size == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.world_size)]
    torch.distributed.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    if not tensor.requires_grad:
        with torch.no_grad():
            return _GatherRows.apply(tensor, sizes, dist.rank)
    return _GatherRows.apply(tensor, sizes, dist.rank)


class _GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU tensors (torch's and DDP's need a GPU): in training, the batch
    mean and (biased) variance of the global batch from all-reduced per-channel sums (mean
    first, then the centered squares: the two passes of one process), gradients through the
    sums (each rank's input reaches every rank's loss). Eval: plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.distributed.is_initialized():
            return super().forward(input)
        self._check_input_dim(input)
        group = torch.distributed.group.WORLD
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
        count = input.new_full((1,), input.numel() // max(input.shape[1], 1))
        sums = _AllReduceSum.apply(torch.cat([input.sum(dims), count]), group)
        total = sums[-1]
        mean = sums[:-1] / total
        centered = input - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), group) / total
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var.dtype), alpha=factor)
        return out


def _sync_batchnorm(model: nn.Module, device: torch.device) -> list:
    """Replace the model's BatchNorm layers (in place, sharing their parameters and buffers)
    by SyncBatchNorm (the gloo version on the CPU); returns what _restore_batchnorm undoes."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and \
                    not isinstance(child, (nn.SyncBatchNorm, _GlooSyncBatchNorm)):
                if device.type == "cuda":
                    sync = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                else:
                    sync = _GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                              child.track_running_stats)
                    sync._parameters.update(child._parameters)  # the same tensors
                    sync._buffers.update(child._buffers)
                    sync.train(child.training)
                setattr(parent, name, sync)
                swaps.append((parent, name, child))
    return swaps


def _restore_batchnorm(swaps: list) -> None:
    """Put the plain BatchNorm modules back, holding the trained parameters and statistics."""
    for parent, name, plain in swaps:
        sync = getattr(parent, name)
        for key in list(plain._parameters):
            plain._parameters[key] = sync._parameters[key]
        for key in list(plain._buffers):
            plain._buffers[key] = sync._buffers[key]
        plain.train(sync.training)
        setattr(parent, name, plain)


# ---------------------------------------------------------------------------------------
# Training


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":  # x0.1 at 50% and 75% of training
        return 0.1 ** int(progress >= 0.5) * 0.1 ** int(progress >= 0.75)
    return 1.0


def _select_score(result: EvalResult, metric: str) -> float:
    if metric == "worst_group_accuracy" and result.worst_group_accuracy is not None:
        return result.worst_group_accuracy
    return result.accuracy


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, map_location="cpu") -> dict:
    """Load a checkpoint written by `train` (weights_only: a .pt never runs code); with
    `model`, also load its weights into it."""
    state = load_state_file(path, map_location=map_location, what="checkpoint")
    if model is not None:
        model.load_state_dict(state["model"] if "model" in state else state)
    return state


# What a last.pt written before a setting existed ran with, where that is not the setting's
# default (a missing setting otherwise counts as its default: the old trainer's behaviour).
_LEGACY_SETTINGS = {"channels_last": False}


def _saved_config(saved: dict | None) -> dict:
    """The config of a last.pt with the settings added since it was written filled in."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return {**defaults, **_LEGACY_SETTINGS, **saved} if saved is not None else {}


def _auto_settings(cfg: TrainConfig, device: torch.device, model: nn.Module, saved: dict | None) -> TrainConfig:
    """cfg with its automatic (None) settings decided: channels_last on for CUDA models with
    2-d convolutions, eval_batch_size 2048 on CUDA and 512 on the CPU. A resumed run keeps
    what its last.pt ran with (saved), so the resume check stays exact."""
    auto = {"channels_last": device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()),
            "eval_batch_size": 2048 if device.type == "cuda" else 512}
    for key in auto:
        if saved and saved.get(key) is not None:
            auto[key] = saved[key]
    return dataclasses.replace(cfg, **{k: v for k, v in auto.items() if getattr(cfg, k) is None})


def _compiled(model: nn.Module) -> nn.Module:
    """torch.compile(model), or the model itself with a warning where torch.compile is unavailable."""
    try:
        return torch.compile(model)
    except Exception as exc:  # e.g. a Python version or platform torch.compile does not support
        warnings.warn(f"compile: torch.compile is unavailable here ({type(exc).__name__}: {exc}); training eagerly",
                      RuntimeWarning, stacklevel=3)
        return model


def _is_compile_error(exc: BaseException) -> bool:
    """An error of torch.compile's machinery (no C++ compiler, no Triton, a backend failure)."""
    return (type(exc).__module__ or "").startswith(("torch._dynamo", "torch._inductor"))


def train(
    model: nn.Module,
    splits,
    config: TrainConfig | None = None,
    *,
    store: Store | None = None,
    progress: bool = True,
    loss_fn: Callable | None = None,
    on_epoch_end: Callable[[int, nn.Module, dict], None] | None = None,
    on_step_end: Callable[[int, nn.Module], None] | None = None,
    dist: sd.DistContext | None = None,
) -> TrainResult:
    """Train `model` on `splits.train`, select on `splits.val`, report on test and extras.

    store (a run_folder.Store, e.g. `run.sub("model")`): where best.pt, last.pt, epoch_NNN.pt
    and history.json go; when the run is resuming and last.pt is there, training continues
    from it (the run folder has already checked that the settings are the same).

    loss_fn(model, x, y, a) -> scalar overrides plain cross-entropy (e.g. for mitigation
    objectives). on_epoch_end(epoch, model, record) runs after each epoch's evaluation;
    on_step_end(global_step, model) after every optimizer step (e.g. to track what the
    model has learned early in training; it must restore model.train() if it changes it).

    dist (a shortcut_fast.distributed.DistContext; None or world_size 1: one process):
    DistributedDataParallel over the ranks, every rank training on its slice of each global
    batch (see the module docstring); the result (weights, history, evaluations) is the
    one-process result to float tolerance, on every rank. The device is the rank's
    (dist.device; config.device must be "auto" or of the same type). Every rank reads the
    store's last.pt (a shared folder); rank 0 alone writes. The model passed to loss_fn is
    the DDP wrapper (the model itself is its `.module`), x/y/a the rank's slice; loss_fn
    returns the slice mean, or, with `loss_fn.reduces_over_ranks = True`, the loss of the
    whole global batch on every rank (gathered with gather_global_batch). Callbacks run on
    every rank. A collective: every rank must call it with the same settings.
    """
    cfg = config or TrainConfig()
    ctx = dist if dist is not None and dist.world_size > 1 else None
    device = resolve_device(cfg.device)
    if ctx is not None:
        if cfg.device != "auto" and device.type != ctx.device.type:
            raise ValueError(f"train: config.device {cfg.device!r} is not the distributed context's device "
                             f"{ctx.device}; use device 'auto' (each rank trains on its own device)")
        device = ctx.device
    state = store.load_state("last.pt", map_location=device) if store is not None else None
    saved = _saved_config(state.get("config")) if state is not None else None
    cfg = _auto_settings(cfg, device, model, saved)
    if ctx is not None:  # same settings, same data and the same last.pt on every rank
        sd.check_same({"config": dataclasses.asdict(cfg), "train_samples": len(splits.train),
                       "resume_epoch": None if state is None else state["epoch"]}, ctx, "training settings")
    use_amp = (device.type == "cuda") if cfg.amp is None else cfg.amp
    seed_everything(cfg.seed)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    swaps, plain_step = [], model  # plain_step: the training step's forward without torch.compile
    if ctx is not None:
        swaps = _sync_batchnorm(model, device)
        # SyncBatchNorm keeps the running statistics equal on every rank: buffers synced at init only
        ddp_args = dict(module=model, device_ids=[device.index] if device.type == "cuda" else None)
        try:
            plain_step = nn.parallel.DistributedDataParallel(**ddp_args, forward_sync_buffers=False)
        except TypeError:  # a PyTorch before forward_sync_buffers
            plain_step = nn.parallel.DistributedDataParallel(**ddp_args, broadcast_buffers=False)
    global_loss = bool(getattr(loss_fn, "reduces_over_ranks", False))
    step_model = _compiled(plain_step) if cfg.compile else plain_step  # `model` elsewhere
    progress = progress and sd.is_main(ctx)
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":  # fixed batch shapes: let cuDNN time its algorithms once per shape
        torch.backends.cudnn.benchmark = True

    train_batches = Batches(splits.train, cfg.batch_size, device, num_workers=cfg.num_workers)
    steps_per_epoch = len(train_batches)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = _make_optimizer(model, cfg)
    plateau = cfg.schedule == "plateau"
    if plateau:  # stepped once per epoch with the epoch's mean training loss (or the validation loss)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                               patience=cfg.plateau_patience)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _lr_factor(cfg, step, total_steps, steps_per_epoch)
        )
    criterion = loss_fn or (lambda m, x, y, a: F.cross_entropy(m(x), y, label_smoothing=cfg.label_smoothing))

    def evaluate_split(dataset) -> EvalResult:
        return evaluate(model, dataset, device=device, batch_size=cfg.eval_batch_size, amp=use_amp,
                        bias_aligned_attribute=bool(getattr(splits, "bias_aligned_attribute", False)),
                        channels_last=cfg.channels_last, dist=ctx)

    def forward_backward(m: nn.Module, x, y, a, weight: float | None = None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = criterion(m, x, y, a)
        optimizer.zero_grad(set_to_none=True)
        if weight is None:
            loss.backward()
        elif weight > 0:  # this rank's share of the global batch mean (DDP averages over ranks)
            (loss * weight).backward()
        else:  # an empty slice (the mean of nothing is nan): no gradient, but DDP's collectives
            (torch.nan_to_num(loss, nan=0.0) * 0.0).backward()
        return loss

    history: list[dict] = []
    best_weights = None
    start_epoch = 0
    best_epoch, best_score = -1, -math.inf
    if state is not None:
        changed = settings_diff(saved, dataclasses.asdict(cfg))
        if changed:  # the run folder refuses this first; a library caller may pass any store
            raise ValueError(f"resume: the training config differs from {store.file('last.pt')} ({'; '.join(changed)})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        best_epoch, best_score = state["best_epoch"], state["best_score"]

    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(splits.train), generator=gen)
        loss_total = torch.zeros((), device=device)
        seen = 0
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        epoch_start = time.perf_counter()
        for step, (x, y, a) in enumerate(train_batches.iterate(order)):
            if step >= steps_per_epoch:
                break
            x = augment_batch(x, cfg.augment, gen)  # the whole global batch: the one-process draws
            n_batch, weight = y.numel(), None
            if ctx is not None:  # this rank's contiguous slice of the global batch
                lo, hi = _slice_bounds(n_batch, ctx.rank, ctx.world_size)
                x, y, a = x[lo:hi], y[lo:hi], a[lo:hi]
                weight = None if global_loss else (hi - lo) * ctx.world_size / n_batch
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                loss = forward_backward(step_model, x, y, a, weight)
            except Exception as exc:  # torch.compile failing at its first call: warn, go on eagerly
                if step_model is plain_step or not _is_compile_error(exc):
                    raise
                warnings.warn(f"compile: torch.compile failed here ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); training eagerly",
                              RuntimeWarning, stacklevel=2)
                step_model = plain_step
                loss = forward_backward(plain_step, x, y, a, weight)
            optimizer.step()
            if not plateau:
                scheduler.step()
            if ctx is None:
                loss_total += loss.detach() * n_batch
            elif global_loss:  # the same whole-batch loss on every rank: counted once
                if ctx.rank == 0:
                    loss_total += loss.detach() * n_batch
            elif y.numel():
                loss_total += loss.detach() * y.numel()
            seen += n_batch
            if on_step_end is not None:
                on_step_end(epoch * steps_per_epoch + step + 1, model)
            bar.update(1)
        train_seconds = time.perf_counter() - epoch_start
        sd.all_reduce_sum_(loss_total, ctx)  # the global batches' loss sum, on every rank
        if not torch.isfinite(loss_total):  # checked once per epoch: no per-step device sync
            raise FloatingPointError(f"training loss became non-finite in epoch {epoch + 1}; "
                                     f"lower the learning rate (lr={cfg.learning_rate})")
        val = evaluate_split(splits.val)
        lr_used = optimizer.param_groups[0]["lr"]
        if plateau:
            scheduler.step(val.loss if cfg.plateau_monitor == "val_loss" else float(loss_total / max(seen, 1)))
        record = {
            "epoch": epoch + 1,
            "train_loss": float(loss_total / max(seen, 1)),
            "val_accuracy": val.accuracy,
            "val_worst_group_accuracy": val.worst_group_accuracy,
            "lr": lr_used if plateau else scheduler.get_last_lr()[0],
            "seconds": train_seconds,
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{val.accuracy:.3f}")
        bar.close()
        score = epoch if cfg.select == "last" else _select_score(val, cfg.select)
        improved = score > best_score
        weights = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                   for k, v in model.state_dict().items()}
        model_config = getattr(model, "build_config", None)  # lets models.model_from_checkpoint rebuild it
        if improved:
            best_epoch, best_score, best_weights = epoch, score, weights
        if store is not None and sd.is_main(ctx):  # rank 0 writes; the others wait below
            if improved:
                store.save_state("best.pt", {"model": weights, "epoch": epoch, "model_config": model_config})
            if cfg.keep_every and (epoch + 1) % cfg.keep_every == 0:
                store.save_state(f"epoch_{epoch + 1:03d}.pt",
                                 {"model": weights, "epoch": epoch, "model_config": model_config})
            store.save_state("last.pt", {
                "model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "history": history, "best_epoch": best_epoch, "best_score": best_score,
                "config": dataclasses.asdict(cfg), "model_config": model_config,
            })
            store.save_json("history.json", history)
        sd.barrier(ctx)  # last.pt of this epoch is complete before any rank goes on
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, record)

    seconds = time.perf_counter() - t0
    if best_weights is not None:
        model.load_state_dict(best_weights)
    elif store is not None and store.has("best.pt"):  # resumed a run that had already finished
        load_checkpoint(store.file("best.pt"), model, map_location=device)
    final = {"test": evaluate_split(splits.test), "val": evaluate_split(splits.val)}
    for name, dataset in (getattr(splits, "extra", None) or {}).items():
        final[name] = evaluate_split(dataset)
    _restore_batchnorm(swaps)  # hand back the plain modules (holding the trained state)
    if cfg.channels_last:  # hand the model back in the default (contiguous) layout
        model.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return TrainResult(
        config=dataclasses.asdict(cfg),
        epochs_run=len(history),
        best_epoch=best_epoch + 1,
        history=history,
        final=final,
        seconds=seconds,
        out_dir=str(store.root) if store is not None else None,
    )
