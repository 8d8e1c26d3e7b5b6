"""Programs per Triton launch at the GPU benchmark sizes (installed as shortcut_fast.bench.occupancy).

Each row is one launch: the op, where its size comes from, the grid the op's own grid
function returns (the function its launch calls, here with the GPU launch sizes even when
the interpreter is on), the program count, and the least time its work takes on an H100 SXM
(bench/roofline.py). A launch should have at least MIN_PROGRAMS programs (twice an H100's
132 SMs); below that it must be launch-bound: work under LAUNCH_BOUND_US, less than the fixed
cost of a launch, which more programs cannot shorten. tests/test_occupancy.py checks every
row and that bench/results/occupancy.json is this table:
    python -m shortcut_fast.bench.occupancy [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "occupancy.json"
DEVICE = "H100 SXM"
# A kernel launch costs a few microseconds however little it does (launch latency, the
# first wave's ramp-up, the tail): work whose least time is below this is bound by it.
LAUNCH_BOUND_US = 2.0


@contextlib.contextmanager
def gpu_launch_sizes():
    """The kernel modules choose their GPU block sizes and grids inside (the interpreter's
    otherwise: it pays per program, so it gets as few as possible)."""
    from shortcut_fast.kernels import ablation, band_filter, class_spectrum, probe_stats, probe_training

    modules = [m for m in (ablation, band_filter, class_spectrum, probe_stats, probe_training)
               if hasattr(m, "INTERPRET")]
    saved = [m.INTERPRET for m in modules]
    for m in modules:
        m.INTERPRET = False
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.INTERPRET = value


def _best_us(phases) -> float:
    from shortcut_fast.bench import roofline

    return roofline.roofline(phases, roofline.PEAKS[DEVICE])["best_ms"] * 1e3


def _sweep_launches(settings: dict) -> list[tuple[str, str, tuple, list]]:
    """channel_ablate and group_outcomes of the ablation-sweep benchmark on a GPU: per block
    of each stage, the activation at the ablation point and the variants per chunk under the
    sweep's GPU default max_bytes."""
    import torch

    from shortcut_fast.bench import roofline
    from shortcut_fast.kernels import ablation
    from shortcut_fast.models import build_model
    from shortcut_fast.surgery.split import split_model
    from shortcut_fast.surgery.sweep import default_max_bytes, variants_per_chunk

    batch, classes, groups = settings["batch"], 10, 4  # bench/ablation_sweep.py: 10 classes, 4 groups
    model = build_model("resnet18", num_classes=classes, width=settings["width"]).eval()
    x0 = torch.zeros(2, 3, 32, 32)
    max_bytes = default_max_bytes(torch.device("cuda"))
    out = []
    chunks = set()
    for stage in settings["stages"]:
        for block in (b for b in model.block_names if b.startswith(stage + ".")):
            for where, layer in (("output", block), ("post-activation", f"{block}.conv1")):
                sm = split_model(model, layer, x0, where=where)
                V = variants_per_chunk(sm, sm.num_channels, batch, max_bytes)
                chunks.add(V)
                if sm.linear is None:  # otherwise the variants come from the next layer's linearity
                    _, C, *rest = sm.prefix(x0).act.shape
                    S = math.prod(rest)
                    out.append(("channel_ablate", f"ablation sweep: {layer} {where}, act ({batch}, {C}, {S}), "
                                                  f"{V} variants", ablation.channel_ablate_grid(batch, C, S, V),
                                roofline.channel_ablate(V, batch, C, S)))
    for V in sorted(chunks | {1}):  # 1: the unablated baseline of every batch
        out.append(("group_outcomes", f"ablation sweep: {V} variant(s) x {batch} images, {classes} classes, "
                                      f"{groups} groups", ablation.group_outcomes_grid(V, batch, classes),
                    roofline.group_outcomes(V, batch, classes, groups)))
    return out


def launches() -> list[tuple[str, str, tuple, list]]:
    """(op, size, grid, roofline phases) of every launch at the GPU benchmark sizes."""
    from shortcut_fast.bench import ablation_sweep, band_filter as bf, class_spectrum as cs, distributed
    from shortcut_fast.bench import probe_stats as ps, roofline
    from shortcut_fast.kernels import ablation, band_filter, class_spectrum, probe_stats, probe_training

    out = []
    for B, C, H, W, K in cs.cases("cuda", False):
        out.append(("class_spectrum_sum", f"class-spectrum bench: x ({B}, {C}, {H}, {W}), {K} classes",
                    class_spectrum.class_spectrum_grid(B, C, H, W), roofline.class_spectrum(B, C, H, W, K)))
    for B, C, H, W, K in bf.cases("cuda", False):
        out.append(("band_filter", f"band-filter bench: x ({B}, {C}, {H}, {W}), {K} masks",
                    band_filter.band_filter_grid(B, C, H, W, K), roofline.band_filter(B, C, H, W, K)))
        out.append(("remove_frequencies", f"band-filter bench: x ({B}, {C}, {H}, {W}), {K} pairs",
                    band_filter.remove_frequencies_grid(B, C, H, W, K), roofline.remove_frequencies(B, C, H, W, K)))
    # Probe statistics: the V-information bench (chunks of ps.CHUNK rows), the complexity pass
    # of the distributed bench (one call per ResNet-18 block and batch), and few targets.
    _, _, D, K, _ = ps.settings("cuda", False)
    stats = [("probe-stats bench", ps.CHUNK, D, K)]
    p = distributed._params("cuda", False)["probe_stats"]
    widths = roofline.model_cost(p["width"]).channels
    blocks = roofline.model_cost(p["width"]).blocks
    targets = int(p["directions"].split(":")[1])
    for D in sorted({widths[b] for b in blocks}):
        stats.append((f"complexity pass (distributed bench): ResNet-18 w{p['width']} block", p["batch"], D, targets))
    stats += [("few targets", ps.CHUNK, D, 10) for D in (64, 512)]
    for source, N, D, K in stats:
        out.append(("probe_stats", f"{source}: x ({N}, {D}), z ({N}, {K})", probe_stats.probe_stats_grid(N, D, K),
                    roofline.probe_stats(N, D, K)))
    # Probe training: the step bench/roofline.py tabulates (no benchmark times it yet), and 16 probes.
    (step,) = [r["sizes"] for r in roofline.gpu_rows() if r["workload"] == "probe_step"]
    steps = [("softmax", step["N"], step["D"], step["K"], step["C"])]
    steps += [(family, step["N"], step["D"], 16, 10 if family == "softmax" else 1)
              for family in probe_training.FAMILY_CODES]
    for family, N, D, K, C in steps:
        out.append(("probe_step", f"{family}: x ({N}, {D}), {K} probes" + (f", {C} classes" if C > 1 else ""),
                    probe_training.probe_step_grid(N, D, K, C), roofline.probe_step(N, D, K, C)))
    out += _sweep_launches(ablation_sweep.settings("cuda", False))
    # DeNetDM's evaluation (bench/denetdm.py: 4 conflict ratios x 3 seeds = 12 members, batches
    # of 1,024 images, 10 classes): one reduction for the 3 heads of every member, 100 cells each.
    M, batch, classes, heads = 12, 1024, 10, 3
    out.append(("group_outcomes", f"DeNetDM evaluation: {heads} heads x ({M} members x {batch} images), "
                                  f"{classes} classes, {M * classes ** 2} groups",
                ablation.group_outcomes_grid(heads, M * batch, classes),
                roofline.group_outcomes(heads, M * batch, classes, M * classes ** 2)))
    return out


def table() -> list[dict]:
    """One row per launch: op, size, grid, programs and least time on DEVICE (microseconds)."""
    with gpu_launch_sizes():
        found = launches()
    return [{"op": op, "size": size, "grid": list(grid), "programs": math.prod(grid),
             "best_us": round(_best_us(phases), 3)} for op, size, grid, phases in found]


def report() -> dict:
    from shortcut_fast.kernels import MIN_PROGRAMS

    return {"what": f"programs per Triton launch at the GPU benchmark sizes; at least {MIN_PROGRAMS} (twice an "
                    f"H100's 132 SMs) unless the work's least time on an {DEVICE} (best_us, bench/roofline.py) "
                    f"is under {LAUNCH_BOUND_US} us: launch-bound",
            "command": "python -m shortcut_fast.bench.occupancy",
            "min_programs": MIN_PROGRAMS, "launch_bound_us": LAUNCH_BOUND_US, "rows": table()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    out = report()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in out["rows"]:
        print(f"{r['op']:<20} {r['programs']:>7}  {r['best_us']:>10.2f} us  {r['size']}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
