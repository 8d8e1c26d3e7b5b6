"""Class-wise spectrum accumulation: compiled/Triton kernels vs the PyTorch reference.

Bytes the op must move: read B*C*H*W input values, write K*C*H*W float32 sums. The
reference moves far more (complex spectrum and |.| temporaries), and the fast paths
compute only the half spectrum (Hermitian symmetry).
"""
from __future__ import annotations

import torch

from shortcut_fast.backends import backend_status
from shortcut_fast.bench.common import BenchRow, hbm_fraction, record, time_fn
from shortcut_fast.ops import class_spectrum_sum, class_spectrum_sum_reference

def cases(device: str, quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(B, C, H, W, K) of each timed case (bench/roofline.py reads them too)."""
    if quick:
        return [(256, 3, 32, 32, 10)]
    return [(2048, 3, 32, 32, 10), (64, 3, 224, 224, 10)] if device == "cpu" else [(4096, 3, 32, 32, 10),
                                                                                 (256, 3, 224, 224, 10)]


def run(device: str = "cpu", quick: bool = False):
    backends = ["cpp"] if device == "cpu" else ["cuda", "triton"]
    rows = []
    for B, C, H, W, K in cases(device, quick):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, C, H, W, generator=g).to(device)
        labels = torch.randint(0, K, (B,), generator=g).to(device)
        want = class_spectrum_sum_reference(x, labels, K)
        baseline = time_fn(lambda: class_spectrum_sum_reference(x, labels, K), device)
        for backend in backends:
            if not backend_status(backend, device):
                continue
            got = class_spectrum_sum(x, labels, K, backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * max(H, W))
            t = time_fn(lambda: class_spectrum_sum(x, labels, K, backend=backend), device)
            moved = x.numel() * 4 + K * C * H * W * 4
            achieved = {"GB/s": moved / t.median_ms / 1e6}
            fraction = hbm_fraction(moved, t.median_ms, device)
            if fraction is not None:
                achieved["fraction_of_hbm"] = fraction
            rows.append(record(BenchRow(
                workload="class_spectrum_sum", sizes=dict(B=B, C=C, H=H, W=W, K=K), dtype="float32",
                backend=backend, baseline="torch reference (fft2+abs+index_add)", median_ms=t.median_ms,
                p20_ms=t.p20_ms, p80_ms=t.p80_ms, baseline_ms=baseline.median_ms,
                ratio=baseline.median_ms / t.median_ms, achieved=achieved, quick=quick), device))
    return rows
