"""Batched spectral filtering: B images x K masks -> K*B filtered images.

Baseline (docs/performance.md#baselines): a Python loop over masks, each a torch.fft round trip of the
batch. The floor is the output write, K*B*C*H*W float32 values.
"""
from __future__ import annotations

import torch

from shortcut_fast.backends import backend_status
from shortcut_fast.bench.common import BenchRow, hbm_fraction, record, time_fn
from shortcut_fast.ops import freq
from shortcut_fast.ops.band_filter import band_filter, remove_frequencies


def _loop_baseline(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    out = torch.empty((keep.shape[0], *x.shape), device=x.device)
    for k in range(keep.shape[0]):
        out[k] = torch.fft.ifft2(torch.fft.fft2(x) * keep[k]).real
    return out


def cases(device: str, quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(B, C, H, W, K) of each timed case (bench/roofline.py reads them too)."""
    if quick:
        return [(32, 3, 32, 32, 16)]
    if device == "cpu":
        return [(128, 3, 32, 32, 64), (16, 3, 64, 64, 16)]
    return [(256, 3, 32, 32, 512), (64, 3, 224, 224, 16)]


def run(device: str = "cpu", quick: bool = False):
    backends = ["cpp", "torch"] if device == "cpu" else ["cuda", "triton", "torch"]
    rows = []
    for B, C, H, W, K in cases(device, quick):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, C, H, W, generator=g).to(device)
        pairs = freq.conjugate_pairs(H, W)[torch.randperm(len(freq.conjugate_pairs(H, W)), generator=g)[:K]]
        masks = freq.pair_masks(H, W, pairs).to(device)
        keep = (~masks).float()
        want = _loop_baseline(x, keep)
        baseline = time_fn(lambda: _loop_baseline(x, keep), device)
        out_bytes = want.numel() * 4
        for op_name, fn in (("band_filter", lambda b: band_filter(x, masks, "stop", backend=b)),
                            ("remove_frequencies", lambda b: remove_frequencies(x, pairs, backend=b))):
            for backend in backends:
                if not backend_status(backend, device):
                    continue
                got = fn(backend)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
                t = time_fn(lambda: fn(backend), device)
                achieved = {"output GB/s": out_bytes / t.median_ms / 1e6}
                fraction = hbm_fraction(out_bytes, t.median_ms, device)
                if fraction is not None:
                    achieved["fraction_of_hbm"] = fraction
                rows.append(record(BenchRow(
                    workload=op_name, sizes=dict(B=B, C=C, H=H, W=W, K=K), dtype="float32", backend=backend,
                    baseline="python loop of torch.fft round trips, one per mask", median_ms=t.median_ms,
                    p20_ms=t.p20_ms, p80_ms=t.p80_ms, baseline_ms=baseline.median_ms,
                    ratio=baseline.median_ms / t.median_ms, achieved=achieved, quick=quick), device))
    return rows
