"""Counterfactual localization: the 2L + 2 variants trained as one stacked ensemble against
the same variants trained one after another.

Workload (docs/experiments.md#layer-wise-localization): ResNet-20 on 32x32 images, L = its
10 blocks + the head, the variants of experiments.localization.make_variants (clean, skew,
skew@l, clean@l for every block l: 2L + 2 = 24 trainings), SGD with momentum and weight decay, the same
batches (clean images and a copy with a label-aligned patch) for every variant.
- fast path: ensemble.train_variants(stacked=True): one vmap(functional_call) forward and
  backward for all variants per step, BN buffers stacked, foreach SGD.
- baseline: train_variants(stacked=False): every variant a plain module with its own
  torch.optim.SGD, trained one after another on the same batches.
Checked first: every parameter and buffer of every variant agrees between the two (max
absolute difference recorded; float32, TF32 off on a GPU so both paths round alike). Then
both are timed from the same initialization (one run each after a one-step warm-up; a
training cannot be repeated cheaply) and the row records the ratio and the step
throughput (ensemble steps/s: each advances all V variants; variant-steps/s = V x that).
"""
from __future__ import annotations

import torch

from shortcut_fast.bench.common import BenchRow, record, wall_ms
from shortcut_fast.ensemble import block_parameter_groups, train_variants
from shortcut_fast.experiments.localization import HEAD, make_variants
from shortcut_fast.models import build_model

TOLERANCE = 1e-3  # max |stacked - loop| over every tensor of every variant (float32 training)


def _batches(n_steps: int, batch: int, classes: int, device: str):
    """batches(epoch): fixed random images and labels; the skewed copy carries a patch whose
    intensity encodes the label (a label-aligned shortcut)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_steps, batch, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n_steps, batch), generator=g)
    xs = x.clone()
    xs[:, :, :, :4, :4] = (y.float() / (classes - 1))[:, :, None, None, None]
    x, xs, y = x.to(device), xs.to(device), y.to(device)

    def batches(epoch, steps=n_steps):
        return [(x[i], xs[i], y[i]) for i in range(steps)]

    return batches


def _max_diff(a: list[dict], b: list[dict]) -> float:
    return max((sa[k].double() - sb[k].double()).abs().max().item()
               for sa, sb in zip(a, b) for k in sa if sa[k].is_floating_point())


def run(device: str = "cpu", quick: bool = False):
    if quick:
        width, batch, steps = 4, 32, 2
    elif device == "cuda":
        width, batch, steps = 16, 128, 30  # the standard ResNet-20 width
    else:
        width, batch, steps = 8, 64, 4
    classes = 10
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=classes, width=width).to(device)
    blocks = list(model.block_names)
    units = blocks + [HEAD]
    variants = make_variants(units, units, False)
    groups = block_parameter_groups(model, blocks)
    V = variants.num_variants
    batches = _batches(steps, batch, classes, device)
    kw = dict(epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-4, progress=False)

    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        warm = lambda e: batches(e, 1)  # noqa: E731  (allocator, cuDNN algorithm choice)
        train_variants(model, variants, groups, warm, stacked=True, **kw)
        train_variants(model, variants, groups, warm, stacked=False, **kw)
        fast, fast_ms = wall_ms(lambda: train_variants(model, variants, groups, batches, stacked=True, **kw), device)
        slow, slow_ms = wall_ms(lambda: train_variants(model, variants, groups, batches, stacked=False, **kw),
                                device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    diff = _max_diff(fast, slow)
    if not diff <= TOLERANCE:
        raise RuntimeError(f"stacked and one-after-another training differ by {diff:.3g} (> {TOLERANCE}); "
                           f"not timing a wrong answer")
    moved = _max_diff(fast, [model.state_dict()] * V)  # how far training moved the weights (scale of diff)
    ensemble_steps = steps / (fast_ms / 1e3)
    row = BenchRow(
        workload="localization_ensemble",
        sizes=dict(model=f"resnet20(width={width})", H=32, W=32, batch=batch, steps=steps, blocks=len(units),
                   variants=V),
        dtype="float32",
        backend="stacked (vmap)",
        baseline="the same variants one after another (plain modules, torch.optim.SGD)",
        median_ms=fast_ms, p20_ms=fast_ms, p80_ms=fast_ms,
        baseline_ms=slow_ms,
        ratio=slow_ms / fast_ms,
        achieved={"max_abs_diff": diff, "max_weight_change": moved, "ensemble_steps_per_s": ensemble_steps,
                  "variant_steps_per_s": V * ensemble_steps,
                  "baseline_variant_steps_per_s": V * steps / (slow_ms / 1e3),
                  "tf32": False},
        quick=quick,
    )
    return [record(row, device)]
