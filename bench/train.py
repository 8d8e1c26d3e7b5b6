"""Training the CIFAR ResNet-18: the trainer's step path against a plain DataLoader loop.

Workload (training the CIFAR ResNet-18, docs/performance.md#baselines): models.resnet18 (width 64 on a
GPU, 16 on the CPU, 8 with --quick) behind a CIFAR-10 mean/std normalization, on random
uint8 3x32x32 images with random labels (10 classes), cross-entropy, SGD (lr 0.05, momentum
0.9, Nesterov, weight decay 5e-4, constant schedule), random crop (pad 4, reflect) +
horizontal flip.
- fast path: shortcut_fast.train.train as the experiments call it: the uint8 images
  resident on the device, each batch gathered, converted and augmented there (augment
  "flip-crop"), the normalization inside the model, on CUDA bf16 autocast, channels_last
  and cuDNN benchmark (the trainer's defaults there), no host sync inside a step; on CUDA
  also with compile=True (a second row).
- baseline: the usual torchvision loop: a Dataset of HWC uint8 images turned into PIL
  images per sample (as torchvision.datasets.CIFAR10 does), transforms RandomCrop(32,
  padding=4, padding_mode="reflect"), RandomHorizontalFlip, ToTensor, Normalize on the host,
  a DataLoader per batch (collate; on CUDA pinned memory and worker processes), then
  .to(device), model.train(), float32 NCHW, torch.optim.SGD with the same settings. The
  epoch loss is summed on the device (no .item() per step), which only helps the baseline.
Checked first: augmentation off, float32, channels_last off (TF32 off on a GPU), the same
initialization and batch order: the first CHECK_STEPS steps' losses of the trainer and the
loop agree to LOSS_TOLERANCE. Then both are timed per step (from the end of one optimizer
step to the end of the next: batch gather, augmentation, forward, backward, update; CUDA
events on a GPU, wall clock on the CPU); the first epoch warms up (allocator, cuDNN
benchmark, compilation, DataLoader workers) and the median over the steps of the second
epoch gives images/s = batch / median step time. On the (shared) CPU the two paths are
timed in CPU_ROUNDS alternating rounds and each keeps its best round; every round's median
is recorded.
Why the CPU ratio is small: the model's forward and backward are the same computation in both
paths, so the trainer can at most remove the loop's data time. On the CPU the row records the
loop's data time per step (from the end of one optimizer step to the batch on the device:
loader, PIL transforms, collate, copy), its share of the loop's step, the ceiling this puts on
the ratio, 1 / (1 - share), and the trainer's own data time per batch (gather from the
resident uint8 images, conversion, flip-crop), timed apart.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from shortcut_fast.bench.common import BenchRow, record
from shortcut_fast.bench.roofline import peak_flops
from shortcut_fast.data import ImageDataset
from shortcut_fast.models import build_model
from shortcut_fast.models.bridges import Normalize
from shortcut_fast.train import TrainConfig, _make_optimizer, train

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
LR, SEED, EPOCHS = 0.05, 0, 2
CHECK_STEPS = 4
LOSS_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3}  # max |loss difference| over the checked steps (float32)
GOAL_IMAGES_PER_S = 25_000  # the goal on one H100/H200 (docs/performance.md#gpu-goals)
# CPU timing on one intra-op thread (as bench/denetdm.py): on the shared, oversubscribed
# 2-core machine two threads spin-wait on each other and inflate wall times erratically.
CPU_THREADS = 1
CPU_ROUNDS = 3


# ---------------------------------------------------------------------------------------
# The baseline: a torchvision-style Dataset and a DataLoader loop


class PILImages(Dataset):
    """HWC uint8 images and labels; __getitem__ makes a PIL image and applies `transform`
    (what torchvision.datasets.CIFAR10 does)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


class EpochOrder(Sampler):
    """The trainer's batch order: torch.randperm(n, generator seeded by seed * 100_003 + epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def host_transform(augment: bool):
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()] if augment else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def plain_loop(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, device: str, *,
               augment: bool, workers: int, max_steps: int | None = None, on_step=None,
               on_data=None) -> list[torch.Tensor]:
    """The baseline training; returns the per-step losses (device tensors). on_step(epoch, step)
    runs after every optimizer step; on_data(epoch, step, seconds) gets each step's data time:
    from the end of the previous step to the batch on the device (loader, collate, copy)."""
    sampler = EpochOrder(len(labels), cfg.seed)
    loader = DataLoader(PILImages(images, labels, host_transform(augment)), batch_size=cfg.batch_size,
                        sampler=sampler, num_workers=workers, pin_memory=device == "cuda",
                        persistent_workers=workers > 0)
    reference = _make_optimizer(model, cfg).defaults  # the trainer's SGD settings, spelled out below
    optimizer = torch.optim.SGD(model.parameters(), lr=reference["lr"], momentum=reference["momentum"],
                                weight_decay=reference["weight_decay"], nesterov=reference["nesterov"])
    model.to(device).train()
    losses = []
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros((), device=device)
        fetched = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            if max_steps is not None and step >= max_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if on_data is not None:
                on_data(epoch, step, time.perf_counter() - fetched)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * y.numel()
            losses.append(loss.detach())
            if on_step is not None:
                on_step(epoch, step)
            fetched = time.perf_counter()
    return losses


# ---------------------------------------------------------------------------------------
# Data, model, the trainer's side


def _data(n: int, n_eval: int):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n + n_eval, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n + n_eval,), generator=g)
    train_set = ImageDataset(images[:n], labels[:n], num_classes=10, name="random-cifar")
    held_out = ImageDataset(images[n:], labels[n:], num_classes=10, name="random-cifar")
    return images[:n], labels[:n], SimpleNamespace(train=train_set, val=held_out, test=held_out)


def _models(width: int):
    """(the trainer's model: normalization + ResNet-18, the loop's model: the same ResNet-18
    weights; the loop normalizes on the host)."""
    torch.manual_seed(SEED)
    net = build_model("resnet18", num_classes=10, width=width)
    return nn.Sequential(Normalize(CIFAR_MEAN, CIFAR_STD), copy.deepcopy(net)), net


def _trainer_config(device: str, batch: int, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=EPOCHS, batch_size=batch, lr=LR, schedule="constant", augment="flip-crop",
                                 seed=SEED, device=device), **kw})


class StepClock:
    """Per-step times from marks taken after every optimizer step: CUDA events (recorded in
    stream order, no sync) or perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks: dict[int, list] = {}

    def mark(self, epoch: int) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.setdefault(epoch, []).append(ev)
        else:
            self.marks.setdefault(epoch, []).append(time.perf_counter())

    def step_ms(self, epoch: int) -> list[float]:
        marks = self.marks[epoch]
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def _quantiles(ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return statistics.median(ms), q[1], q[7]


def check(device: str = "cpu", *, width: int = 8, batch: int = 32, steps: int = CHECK_STEPS) -> dict:
    """The trainer and the plain loop, augmentation off, float32 NCHW, from the same init and
    batch order: the first `steps` losses of both (raises when they differ beyond LOSS_TOLERANCE)."""
    images, labels, splits = _data(batch * steps, batch)
    fast_model, loop_model = _models(width)
    cfg = _trainer_config(device, batch, epochs=1, augment="none", amp=False, channels_last=False,
                          max_steps_per_epoch=steps)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fast = []

        def recorded(m, x, y, a):  # the default criterion, its value kept
            loss = F.cross_entropy(m(x), y)
            fast.append(loss.detach())
            return loss

        train(fast_model, splits, cfg, loss_fn=recorded, progress=False)
        loop = plain_loop(loop_model, images, labels, cfg, device, augment=False, workers=0, max_steps=steps)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    fast, loop = torch.stack(fast).double().cpu(), torch.stack(loop).double().cpu()
    diff = float((fast - loop).abs().max())
    if not diff <= LOSS_TOLERANCE[device]:
        raise RuntimeError(f"trainer and plain loop losses differ by {diff:.3g} (> {LOSS_TOLERANCE[device]}) over "
                           f"{steps} steps: {fast.tolist()} vs {loop.tolist()}; not timing a wrong answer")
    return {"steps": steps, "max_abs_loss_diff": diff, "tolerance": LOSS_TOLERANCE[device], "width": width,
            "batch": batch, "losses": fast.tolist(), "loop_losses": loop.tolist()}


def _train_flops_per_image(model: nn.Module, device: str) -> float:
    """FLOPs of one training step per image (forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).to(device).train()
    x = torch.rand(2, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(m(x), torch.zeros(2, dtype=torch.long, device=device)).backward()
    return counter.get_total_flops() / 2


def _time_trainer(width, batch, n, device, *, compile: bool = False):
    images, labels, splits = _data(n, batch)
    fast_model, _ = _models(width)
    clock = StepClock(device)
    steps = n // batch
    cfg = _trainer_config(device, batch, compile=compile)
    result = train(fast_model, splits, cfg, progress=False, on_step_end=lambda s, m: clock.mark((s - 1) // steps))
    return clock.step_ms(EPOCHS - 1), result.config


def _time_loop(width, batch, n, device, workers):
    """Step times of the timed epoch and, for the same steps, the data times (host wall time;
    on a GPU the device may still be busy meanwhile, so they are a share of the step on the CPU only)."""
    images, labels, _ = _data(n, batch)
    _, loop_model = _models(width)
    clock = StepClock(device)
    data_ms: dict[int, list[float]] = {}
    plain_loop(loop_model, images, labels, _trainer_config(device, batch), device, augment=True, workers=workers,
               on_step=lambda epoch, step: clock.mark(epoch),
               on_data=lambda epoch, step, s: data_ms.setdefault(epoch, []).append(s * 1e3))
    # step_ms[i] runs from the end of step i to the end of step i + 1: its data time is data_ms[i + 1]
    return clock.step_ms(EPOCHS - 1), data_ms[EPOCHS - 1][1:]


def _trainer_data_ms(batch, n, device) -> list[float]:
    """Per batch of one epoch, the trainer's own data work before the forward: the gather from
    the resident uint8 images, the float conversion and the flip-crop augmentation (train.train
    does exactly this per step; timed apart, as the trainer has no hook between it and the model)."""
    from shortcut_fast.train import Batches, augment_batch

    _, _, splits = _data(n, batch)
    batches = Batches(splits.train, batch, torch.device(device))
    gen = torch.Generator().manual_seed(SEED * 100_003)
    order = torch.randperm(n, generator=gen)
    out, t = [], time.perf_counter()
    for x, _, _ in batches.iterate(order):
        augment_batch(x, "flip-crop", gen)
        if device == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
    return out


def run(device: str = "cpu", quick: bool = False):
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        return _run(device, quick)
    finally:
        torch.set_num_threads(threads)


def _run(device: str, quick: bool):
    if quick:
        width, batch, steps, workers = 8, 32, 4, 0
    elif device == "cuda":
        width, batch, steps, workers = 64, 512, 96, min(8, os.cpu_count() or 1)
    else:
        width, batch, steps, workers = 16, 64, 8, 0
    n = batch * steps  # whole batches only: every timed step has the same size
    checked = check(device, width=width, batch=min(batch, 64))
    fast_model, _ = _models(width)
    flops = _train_flops_per_image(fast_model, device)
    peak = peak_flops(torch.cuda.get_device_name(), "bf16") if device == "cuda" else None
    variants = (False, True) if device == "cuda" and not quick else (False,)
    # On the shared CPU the paths are timed in alternating rounds and each keeps its best
    # round (a burst of load from elsewhere hits one round, not both paths' best).
    rounds = 1 if device == "cuda" or quick else CPU_ROUNDS
    loop_runs, loop_data, fast_runs, configs = [], [], {c: [] for c in variants}, {}
    for _ in range(rounds):
        step_ms, data_ms = _time_loop(width, batch, n, device, workers)
        loop_runs.append(step_ms)
        loop_data.append(data_ms)
        for compiled in variants:
            step_ms, configs[compiled] = _time_trainer(width, batch, n, device, compile=compiled)
            fast_runs[compiled].append(step_ms)
    kept = min(range(rounds), key=lambda r: _quantiles(loop_runs[r])[0])
    loop_ms = loop_runs[kept]
    base_med = _quantiles(loop_ms)[0]
    # The model's forward and backward are the same computation in both paths, so the trainer
    # can at most remove the loop's data time: ratio <= 1 / (1 - data share of the loop's step).
    data_share = sum(loop_data[kept]) / sum(loop_ms)
    trainer_data = _trainer_data_ms(batch, n, device) if device == "cpu" else None
    rows = []
    for compiled in variants:
        step_ms = min(fast_runs[compiled], key=lambda ms: _quantiles(ms)[0])
        cfg = configs[compiled]
        med, p20, p80 = _quantiles(step_ms)
        ips = batch / med * 1e3
        achieved = {"images/s": ips, "baseline_images/s": batch / base_med * 1e3,
                    "TFLOP/s": flops * ips / 1e12, "train_flops_per_image": flops,
                    "timed_steps": len(step_ms), "baseline_timed_steps": len(loop_ms), "rounds": rounds,
                    "round_medians_ms": [_quantiles(ms)[0] for ms in fast_runs[compiled]],
                    "baseline_round_medians_ms": [_quantiles(ms)[0] for ms in loop_runs],
                    "check_steps": checked["steps"], "check_max_abs_loss_diff": checked["max_abs_loss_diff"],
                    "check_tolerance": checked["tolerance"], "check_width": checked["width"],
                    "check_batch": checked["batch"]}
        if device == "cuda":
            achieved.update({"goal_images/s": GOAL_IMAGES_PER_S, "meets_goal": ips >= GOAL_IMAGES_PER_S,
                             "fraction_of_bf16_peak": flops * ips / peak if peak else None})
        else:
            achieved.update({"cpu_threads": torch.get_num_threads(),
                             "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                             "baseline_data_ms_per_step": statistics.median(loop_data[kept]),
                             "baseline_data_share": data_share,
                             "ceiling_ratio": 1 / (1 - data_share),
                             "trainer_data_ms_per_step": statistics.median(trainer_data)})
        rows.append(record(BenchRow(
            workload="train_step",
            sizes=dict(model=f"resnet18(width={width})", width=width, batch=batch, images=n, H=32, W=32,
                       augment="flip-crop", amp=bool(device == "cuda"), channels_last=bool(cfg["channels_last"]),
                       workers=workers),
            dtype="bfloat16 autocast" if device == "cuda" else "float32",
            backend="compile" if compiled else "eager",
            baseline="DataLoader loop (PIL images, host transforms RandomCrop/Flip/ToTensor/Normalize, "
                     f"{workers} workers, float32 NCHW)",
            median_ms=med, p20_ms=p20, p80_ms=p80, baseline_ms=base_med, ratio=base_med / med,
            achieved=achieved, quick=quick), device))
    return rows
