"""Error (and on a GPU time) of every precision of the matmul-shaped kernels at the benchmark
sizes (shortcut_fast.ops.precision).

For each op and precision: the Triton kernel's result on the benchmark's inputs, its error
against the float64 reference (precision.error: max |result - reference| over the op's scale)
and the tolerance it must stay within (precision.TOLERANCES). On a GPU also the median time
of each precision, which shows whether precision.FASTEST_FIRST (the order "auto" picks from,
set by the tensor cores' peaks) holds for the kernel.

    python -m shortcut_fast.bench.precision [--device cuda] [--quick] [--out FILE]

Sizes: the GPU cases of bench/band_filter.py and bench/class_spectrum.py, one CHUNK of
bench/probe_stats.py's statistics (its D and K), the probe training step of bench/roofline.py
(batch 1,024, D = 512, 1,000 softmax probes of 10 classes). On the CPU the kernels run in
the interpreter (TRITON_INTERPRET=1), which rounds the operands as the GPU does but takes
minutes per large launch: smaller sizes, errors only. Writes bench/results/precision_<device>.json;
exit status 1 when an error is over its tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from shortcut_fast.bench.common import RESULTS_DIR, device_name, device_slug, time_fn
from shortcut_fast.ops import freq
from shortcut_fast.ops import precision as P
from shortcut_fast.ops.band_filter import band_filter
from shortcut_fast.ops.class_spectrum import class_spectrum_sum
from shortcut_fast.ops.probe_stats import probe_stats
from shortcut_fast.ops.probe_training import probe_step


def workloads(device: str, quick: bool) -> list[tuple[str, dict, tuple, dict]]:
    """(op, sizes, positional inputs, options) of every measured case."""
    from shortcut_fast.bench import band_filter as bench_band, class_spectrum as bench_spectrum
    from shortcut_fast.bench.probe_stats import CHUNK, settings

    gpu = device == "cuda" and not quick
    out = []
    g = torch.Generator().manual_seed(0)
    band_cases = bench_band.cases(device, quick) if gpu else [(8, 3, 32, 32, 16), (2, 3, 64, 64, 4)]
    for B, C, H, W, K in band_cases:  # bench/band_filter.py: single conjugate pairs removed
        x = torch.randn(B, C, H, W, generator=g)
        pairs = freq.conjugate_pairs(H, W)
        masks = freq.pair_masks(H, W, pairs[torch.randperm(len(pairs), generator=g)[:K]])
        out.append(("band_filter", dict(B=B, C=C, H=H, W=W, K=K), (x, masks), {"mode": "stop"}))
    spectrum_cases = bench_spectrum.cases(device, quick) if gpu else [(64, 3, 32, 32, 10), (4, 3, 64, 64, 10)]
    for B, C, H, W, K in spectrum_cases:
        x = torch.randn(B, C, H, W, generator=g)
        out.append(("class_spectrum_sum", dict(B=B, C=C, H=H, W=W, K=K),
                    (x, torch.randint(0, K, (B,), generator=g), K), {}))
    _, _, D, K, _ = settings(device, quick)
    N, D, K = (CHUNK, D, K) if gpu else (2048, 128, 256)
    mixing = torch.randn(D, D, generator=g) / D ** 0.5
    x = torch.randn(N, D, generator=g) @ mixing + 0.5  # bench/probe_stats.py's data: correlated, offset
    z = x @ torch.randn(D, K, generator=g) / D ** 0.5 + torch.randn(N, K, generator=g) + 3.0
    out.append(("probe_stats", dict(N=N, D=D, K=K), (x, z), {}))
    N, D, K, C = (1024, 512, 1000, 10) if gpu else (256, 128, 64, 10)
    x = torch.randn(N, D, generator=g)
    inputs = (x, torch.randint(0, C, (N, K), generator=g), torch.randn(K, D, C, generator=g) / D ** 0.5,
              torch.randn(K, C, generator=g), None)
    out.append(("probe_step", dict(N=N, D=D, K=K, C=C), inputs, {"family": "softmax"}))
    return out


def _call(op: str, inputs: tuple, options: dict, precision: str):
    if op == "band_filter":
        return lambda: band_filter(*inputs, options["mode"], backend="triton", precision=precision)
    if op == "class_spectrum_sum":
        return lambda: class_spectrum_sum(*inputs, backend="triton", precision=precision)
    if op == "probe_stats":
        return lambda: probe_stats(*inputs, backend="triton", precision=precision)
    return lambda: probe_step(*inputs, family=options["family"], backend="triton", precision=precision)


def run(device: str = "cpu", quick: bool = False, echo=print) -> list[dict]:
    rows = []
    for op, sizes, inputs, options in workloads(device, quick):
        on_device = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
        for precision in P.PRECISIONS:
            fn = _call(op, on_device, options, precision)
            error = P.error(op, fn(), *inputs, **options)
            row = dict(op=op, sizes=sizes, precision=precision, error=error, tolerance=P.TOLERANCES[op][precision],
                       within=error <= P.TOLERANCES[op][precision], auto=P.AUTO[op] == precision)
            if device == "cuda":
                row["median_ms"] = time_fn(fn, device).median_ms
            rows.append(row)
            timing = f"  {row['median_ms']:8.3f} ms" if "median_ms" in row else ""
            echo(f"{op:<20} {str(sizes):<44} {precision:<7} error {error:.2e} <= {row['tolerance']:.2e} "
                 f"{'ok' if row['within'] else 'OVER'}{timing}{'  (auto)' if row['auto'] else ''}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the CPU's small sizes on any device")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = run(args.device, args.quick)
    out = args.out or RESULTS_DIR / f"precision_{device_slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name(args.device), "quick": args.quick, "auto": P.AUTO,
                               "required": P.REQUIRED, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
