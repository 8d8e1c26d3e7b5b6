"""DFM search for one class over all frequency pairs of 32x32 images, ResNet-18.

Baseline: the per-(class, candidate) loop (shortcut_fast.experiments.freq_probe.
dfm_losses_reference): one FFT round trip of the class's images per candidate, then a
forward pass. It is already batched over images, so it is a stronger baseline than the
published per-image, per-channel loop. Fast paths: the streamed rank-one search (same
losses, checked first) and the gradient pre-ranking with exact re-evaluation of the top
candidates (its agreement with the exact ranking is recorded).
"""
from __future__ import annotations

import torch

from shortcut_fast.bench.common import BenchRow, record, wall_ms
from shortcut_fast.experiments import freq_probe as fp
from shortcut_fast.models import build_model


def settings(device: str, quick: bool) -> tuple[int, int]:
    """(model width, images) (bench/roofline.py reads them too). The CPU can afford a narrow
    ResNet-18 and few images; the GPU runs the real one."""
    return (8, 8) if quick else ((16, 32) if device == "cpu" else (64, 500))


def run(device: str = "cpu", quick: bool = False):
    width, images_per_class = settings(device, quick)
    batch = fp.default_batch_size(device)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=width).to(device).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(images_per_class, 3, 32, 32, generator=g).to(device)
    candidates = fp.Candidates.build(32, 32, 1)
    amp = device == "cuda"

    slow, slow_ms = wall_ms(lambda: fp.dfm_losses_reference(model, images, 3, candidates, batch_size=batch), device)
    fast_fn = lambda: fp.candidate_losses(model, images, 3, candidates, batch_size=batch,  # noqa: E731
                                          max_bytes=fp.default_max_bytes(device))[0]
    fast_fn()  # warm-up (kernel compilation on the GPU)
    fast, fast_ms = wall_ms(fast_fn, device)
    torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-4)
    order = slow[torch.argsort(fast, descending=True)]
    ties_ok = bool((order[1:] <= order[:-1] + 1e-4).all())
    sizes = dict(classes=1, images=images_per_class, candidates=len(candidates), H=32, W=32,
                 model=f"resnet18(width={width})")
    rows = [record(BenchRow(
        workload="dfm_search_loss", sizes=sizes, dtype="float32", backend="auto",
        baseline="per-candidate FFT round trip + forward (dfm_losses_reference)", median_ms=fast_ms,
        p20_ms=fast_ms, p80_ms=fast_ms, baseline_ms=slow_ms, ratio=slow_ms / fast_ms,
        achieved={"forwards/s": len(candidates) * images_per_class / fast_ms * 1e3,
                  "same_ranking_up_to_ties": ties_ok}, quick=quick), device)]

    cfg = fp.FreqProbeConfig(method="gradient", patch=1, batch_size=batch, amp=amp)
    (grad_entry, grad_ms) = wall_ms(lambda: fp.class_dfm(model, images, 3, cfg), device)
    exact_dfm = fp.dfm_from_scores(slow, candidates, cfg.top_percent)
    grad_dfm = torch.zeros(32, 32, dtype=torch.bool)
    idx = torch.tensor(grad_entry.dfm)
    grad_dfm[idx[:, 0], idx[:, 1]] = True
    jaccard = float((exact_dfm & grad_dfm).sum() / (exact_dfm | grad_dfm).sum())
    rows.append(record(BenchRow(
        workload="dfm_search_gradient", sizes=sizes, dtype="float32", backend="auto",
        baseline="per-candidate FFT round trip + forward (dfm_losses_reference)", median_ms=grad_ms,
        p20_ms=grad_ms, p80_ms=grad_ms, baseline_ms=slow_ms, ratio=slow_ms / grad_ms,
        achieved={"exact_evaluations": grad_entry.details["exact_evaluations"],
                  "spearman_on_evaluated": grad_entry.details["spearman_estimate_vs_exact_on_evaluated"],
                  "dfm_jaccard_vs_exact": jaccard}, quick=quick), device))
    return rows
