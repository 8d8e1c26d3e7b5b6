"""Roofline of every benchmarked kernel: the least a workload must do, and so the best time a GPU allows.

For each workload the benchmarks time, the functions below give the bytes it must move
(each input read once, each output written once, at the dtypes the benchmark uses) and the
FLOPs of its algorithm, in phases of one precision each. On a GPU of known peaks (PEAKS,
vendor figures) a phase takes at least max(bytes / bandwidth, flops / peak at its
precision); the best possible time of the workload is the sum over its phases, and its bound
is that of the phase that dominates it. `record` (bench/common.py) adds these fields to every
row, with the measured fraction best / measured; `shortcut-fast bench --roofline` prints the
table for an H100 SXM at the GPU benchmark sizes without running anything and writes it to
bench/results/roofline_h100.json (docs/performance.md#roofline renders it).

Counting conventions: a complex FFT of N points costs 5 N log2 N real flops, a real-input one
half that; a matmul 2 m n k; model forwards are counted by torch's FlopCounterMode (the
convolutions and matmuls, 2 flops per multiply-add; normalizations and activations are not
counted). A bool mask is one byte, an index eight.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "roofline_h100.json"
TABLE_DEVICE = "H100 SXM"
PRECISIONS = ("fp64", "fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Peaks:
    """Vendor peak figures of one GPU: HBM bytes/s and dense FLOP/s per precision."""

    bandwidth: float
    flops: dict


# Dense figures (the datasheets print the tensor-core ones with 2:4 sparsity: half of those).
# fp64 is the FP64 tensor-core peak (cuBLAS and cuSOLVER use it); fp32 the non-tensor peak
# (float32 matmuls with TF32 off, Triton "ieee" dots, FFTs); tf32 and bf16 the dense tensor-core peaks.
# H100 SXM / PCIe: NVIDIA's H100 datasheet as tabulated at
#   https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html (SXM 3,350 GB/s, PCIe 2,000 GB/s;
#   FP64 tensor 67 / 51, FP32 67 / 51, TF32 989* / 756*, BF16 1,979* / 1,513*, * with sparsity),
#   exact dense SXM figures (66.9, 494.7, 989.4) from https://glennklockwood.com/garden/processors/h100
# H200 (SXM): the H100 SXM's GH100 compute with 4.8 TB/s HBM3e,
#   https://itkb.uw.cz/2026/06/nvidia-h200-vs-b300-precisions-cores.html (dense: FP64 tensor 67, BF16 989)
#   and https://lzwjava.github.io/nvidia-h200-gpu-specs-en (3.35 vs 4.8 TB/s). The H200 NVL (a
#   600 W card) runs lower clocks: not in this table.
# A100 SXM 80GB: https://glennklockwood.com/garden/processors/A100 (from NVIDIA's A100 datasheet:
#   FP64 tensor 19.5, FP32 19.5, TF32 156, BF16 312; 2.039 TB/s HBM2e) and
#   https://www.thundercompute.com/blog/nvidia-a100-specs-full-guide (2,039 GB/s).
PEAKS = {
    "H100 SXM": Peaks(3.35e12, {"fp64": 66.9e12, "fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12}),
    "H100 PCIe": Peaks(2.0e12, {"fp64": 51e12, "fp32": 51e12, "tf32": 378e12, "bf16": 756e12}),
    "H200": Peaks(4.8e12, {"fp64": 66.9e12, "fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12}),
    "A100 SXM 80GB": Peaks(2.039e12, {"fp64": 19.5e12, "fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12}),
}


def match_device(name: str) -> str | None:
    """The PEAKS entry of a torch.cuda.get_device_name(), or None for a GPU whose figures
    differ or are unknown (H100 NVL, H200 NVL, GH200, A100 40GB or PCIe, others)."""
    n = name.upper()
    if "GH200" in n or "NVL" in n:  # other memory or clocks than the cards below
        return None
    if "H200" in n:
        return "H200"
    if "H100" in n:
        if "PCIE" in n:
            return "H100 PCIe"
        return "H100 SXM" if "SXM" in n or "HBM3" in n else None
    if "A100" in n and "80GB" in n and "SXM" in n:
        return "A100 SXM 80GB"
    return None


def peak_flops(device_name: str, precision: str) -> float | None:
    """A GPU's peak FLOP/s at a precision (None when unknown): for the benchmarks' own fractions."""
    key = match_device(device_name)
    return PEAKS[key].flops[precision] if key else None


def peak_bandwidth(device_name: str) -> float | None:
    key = match_device(device_name)
    return PEAKS[key].bandwidth if key else None


# ---------------------------------------------------------------------------------------
# Work of each kernel


@dataclass(frozen=True)
class Phase:
    """Part of a workload at one precision: the bytes it must move and the flops it must do."""

    name: str
    bytes: float
    flops: float
    precision: str


def rfft2_flops(H: int, W: int) -> float:
    """A real-input 2-D FFT of H x W points: half of a complex one's 5 N log2 N."""
    n = H * W
    return 2.5 * n * math.log2(n) if n > 1 else 0.0


def class_spectrum(B: int, C: int, H: int, W: int, K: int) -> list[Phase]:
    """Per-class sums of |FFT| (float32 x, int64 labels -> (K, C, H, W) float32): one real
    FFT per image-channel, then on the half spectrum |.| (3 flops and a square root) and one
    add into the class sum; the other half is its mirror."""
    half = H * (W // 2 + 1)
    return [Phase("class spectrum", B * C * H * W * 4 + B * 8 + K * C * H * W * 4,
                  B * C * (rfft2_flops(H, W) + 5 * half), "fp32")]


def band_filter(B: int, C: int, H: int, W: int, K: int) -> list[Phase]:
    """Every image through every mask (float32 x, K bool masks -> (K, B, C, H, W) float32):
    one real FFT per image-channel; per output image, the half spectrum times the mask
    (2 flops a point) and one inverse real FFT."""
    half = H * (W // 2 + 1)
    return [Phase("band filter", B * C * H * W * 4 + K * H * W + K * B * C * H * W * 4,
                  B * C * rfft2_flops(H, W) + K * B * C * (2 * half + rfft2_flops(H, W)), "fp32")]


def remove_frequencies(B: int, C: int, H: int, W: int, K: int) -> list[Phase]:
    """Each image minus one conjugate pair per row of freqs (float32 x, (K, 2) int64 ->
    (K, B, C, H, W) float32): one real FFT per image-channel for the coefficients, then per
    output pixel x - Re(A e^{i a_y} e^{i b_x}), two multiply-adds (separable phases)."""
    return [Phase("remove frequencies", B * C * H * W * 4 + K * 2 * 8 + K * B * C * H * W * 4,
                  B * C * rfft2_flops(H, W) + K * B * C * H * W * 4, "fp32")]


def probe_stats(N: int, D: int, K: int, precision: str = "fp32") -> list[Phase]:
    """Sufficient statistics of one split (float32 x (N, D), z (N, K) -> x^T x, x^T z, sum x,
    sum z, sum z^2, float32): both full products, as the GEMM computes them (the bench's own
    2 N D (D + K)), and the column sums."""
    return [Phase("statistics", N * (D + K) * 4 + (D * D + D * K + D + 2 * K) * 4,
                  2 * N * D * (D + K) + N * (D + 3 * K), precision)]


def ridge_fit(D: int, K: int, L: int) -> list[Phase]:
    """fit_linear_probes in float64 from the train and held-out statistics: eigh of the D x D
    Gram matrix (~9 D^3, the symmetric QR algorithm with eigenvectors), the held-out Gram
    matrix rotated into its eigenbasis (4 D^3), V^T X^T z for both splits and the weights
    (3 x 2 D^2 K), and the held-out quadratic form for every alpha (L x 2 D^2 K). Reads both
    splits' float32 statistics, writes weights (D, K), R^2 grid (K, L) and per-target values."""
    return [Phase("ridge fit", 2 * (D * D + D * K + D + 2 * K) * 4 + (D * K + K * L + 4 * K) * 8,
                  13 * D ** 3 + (6 + 2 * L) * D * D * K, "fp64")]


def vinfo_probes(n_train: int, n_heldout: int, D: int, K: int, alphas: int, precision: str = "fp32") -> list[Phase]:
    """The probe benchmark's fast path: the statistics of both splits, then the ridge fit."""
    (stats,) = probe_stats(n_train + n_heldout, D, K, precision)
    # Two splits write two sets of statistics.
    stats = Phase(stats.name, stats.bytes + (D * D + D * K + D + 2 * K) * 4, stats.flops, precision)
    return [stats, *ridge_fit(D, K, alphas)]


def probe_step(N: int, D: int, K: int, C: int) -> list[Phase]:
    """One fused training step of K softmax probes (float32 x (N, D), int64 targets (N, K),
    weight (K, D, C), bias (K, C) -> loss (K,), gradients): logits and the weight gradient
    (2 N D C each per probe), softmax, loss and logit gradient (~5 flops per logit). The
    Triton kernel's dots are "ieee" float32."""
    params = K * D * C + K * C
    return [Phase("probe step", N * D * 4 + N * K * 8 + params * 4 + (K + params) * 4,
                  4 * N * D * K * C + 5 * N * K * C, "fp32")]


def channel_ablate(V: int, P: int, C: int, S: int) -> list[Phase]:
    """V masked copies of a float32 activation (P, C, S) with a (V, C) bool mask and a (C,)
    replacement: reads the activation once, writes every copy."""
    return [Phase("channel ablate", P * C * S * 4 + V * C + C * 4 + V * P * C * S * 4, 0, "fp32")]


def group_outcomes(V: int, B: int, L: int, G: int) -> list[Phase]:
    """Per-(variant, group) outcomes of float32 logits (V, B, L) with int64 labels and groups
    (B,) -> (V, G) int64 counts and float32 losses: a max, an exponential and a sum per logit."""
    return [Phase("group outcomes", V * B * L * 4 + B * 16 + V * G * 12, 3 * V * B * L, "fp32")]


# ---------------------------------------------------------------------------------------
# Model workloads: ablation sweeps and DFM searches are bound by the ResNet forwards they run


@dataclass(frozen=True)
class ModelCost:
    flops: float  # one image's forward
    params: int
    modules: dict  # module name -> forward flops of one image (within the model)
    channels: dict  # block or conv name -> output channels; "<conv>.in" -> input channels
    blocks: tuple


def _width(model: str) -> int:
    m = re.fullmatch(r"resnet18\(width=(\d+)\)", model)
    if not m:
        raise ValueError(f"no roofline for model {model!r} (resnet18(width=N) only)")
    return int(m.group(1))


@functools.lru_cache(maxsize=None)
def model_cost(width: int, H: int = 32, W: int = 32) -> ModelCost:
    """Forward flops per module of the CIFAR ResNet-18 the benchmarks build, for one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from shortcut_fast.models import build_model

    model = build_model("resnet18", num_classes=10, width=width).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, H, W))
    root = type(model).__name__
    modules = {name[len(root) + 1:]: float(sum(ops.values()))
               for name, ops in counter.get_flop_counts().items() if name.startswith(root + ".")}
    channels = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            channels[name], channels[name + ".in"] = module.out_channels, module.in_channels
    for name in model.block_names:  # a block's output channels: those of its last conv
        convs = [c for c in channels if c.startswith(name + ".") and not c.endswith(".in") and "shortcut" not in c]
        channels[name] = channels[convs[-1]]
    return ModelCost(float(counter.get_total_flops()), sum(p.numel() for p in model.parameters()), modules,
                     channels, tuple(model.block_names))


def _after(cost: ModelCost, block: str) -> float:
    """Forward flops of everything after `block` (the later blocks and the head)."""
    done = cost.blocks[:cost.blocks.index(block) + 1]
    return cost.flops - sum(cost.modules.get(b, 0.0) for b in done)


def ablation_sweep(images: int, model: str, stage: str, where: str, groups: int = 4, H: int = 32, W: int = 32,
                   precision: str = "tf32") -> list[Phase]:
    """channel_ablation_sweep over every channel of each block of a stage: one full forward
    per image (prefix and unablated outputs, shared by the layers), then per variant (one
    channel) and image the network after the ablation point. where "output": after the
    block; "post-activation" (the block's conv1 after BN and ReLU): the next conv is linear,
    so a variant costs it with one input channel, then the rest. Reads the images, labels,
    groups and weights, writes (variant, group) counts and losses."""
    cost = model_cost(_width(model), H, W)
    blocks = [b for b in cost.blocks if b.startswith(stage + ".")]
    if not blocks:
        raise ValueError(f"no blocks in stage {stage!r}")
    per_image, variants = cost.flops, 0
    for b in blocks:
        if where == "output":
            v, suffix = cost.channels[b], _after(cost, b)
        elif where == "post-activation":
            v = cost.channels[f"{b}.conv1"]
            suffix = cost.modules[f"{b}.conv2"] / cost.channels[f"{b}.conv2.in"] + _after(cost, b)
        else:
            raise ValueError(f"where must be 'output' or 'post-activation', got {where!r}")
        per_image += v * suffix
        variants += v
    return [Phase("model forwards", images * (3 * H * W * 4 + 2 * 8) + cost.params * 4 + variants * groups * 16,
                  images * per_image, precision)]


def dfm_search(classes: int, images: int, candidates: int, model: str, H: int = 32, W: int = 32,
               precision: str = "tf32") -> list[Phase]:
    """The exact loss DFM search: one real FFT per image-channel, then per (image, candidate
    pair) the image minus that pair (two multiply-adds a pixel) and one model forward. Reads
    the float32 images and the weights once, writes one loss per (class, candidate)."""
    cost = model_cost(_width(model), H, W)
    n = classes * images
    return [Phase("model forwards", n * 3 * H * W * 4 + cost.params * 4 + classes * candidates * 4,
                  n * 3 * rfft2_flops(H, W) + n * candidates * (cost.flops + 3 * H * W * 4), precision)]


# ---------------------------------------------------------------------------------------
# The Triton DFT kernels do more arithmetic than an FFT: their own floor


def triton_flops(workload: str, sizes: dict) -> float | None:
    """Flops of the Triton kernel where it computes DFTs as dense real matmuls (Triton has
    no FFT), float32 "ieee" dots: kernels/class_spectrum.py (full spectrum; each block of
    64 output rows redoes the row transform) and kernels/band_filter.py (2 H^2 W + H W^2
    multiply-adds per output image after torch's rfft2 of the images)."""
    s = sizes
    if workload == "class_spectrum_sum":
        H, W = s["H"], s["W"]
        return s["B"] * s["C"] * (math.ceil(H / 64) * 4 * H * W * W + 8 * H * H * W + 4 * H * W)
    if workload == "band_filter":
        H, W = s["H"], s["W"]
        return s["B"] * s["C"] * rfft2_flops(H, W) + s["K"] * s["B"] * s["C"] * (4 * H * H * W + 2 * H * W * W)
    return None


# ---------------------------------------------------------------------------------------
# Rows


def _conv_precision(dtype: str, tf32_conv: bool) -> str:
    return "bf16" if "bfloat16" in dtype else ("tf32" if tf32_conv else "fp32")


def workload_phases(workload: str, sizes: dict, dtype: str = "float32", *, tf32_matmul: bool = False,
                    tf32_conv: bool = True) -> list[Phase] | None:
    """The phases of a benchmark row (its workload, sizes and dtype as recorded), or None for
    a workload without a roofline (training, ensembles, distributed runs, the gradient DFM
    search, whose work depends on how many candidates it re-evaluates). tf32_matmul /
    tf32_conv: torch.backends.cuda.matmul.allow_tf32 / torch.backends.cudnn.allow_tf32 (torch's
    defaults: float32 matmuls in float32, convolutions in TF32)."""
    s = sizes
    if workload == "class_spectrum_sum":
        return class_spectrum(s["B"], s["C"], s["H"], s["W"], s["K"])
    if workload == "band_filter":
        return band_filter(s["B"], s["C"], s["H"], s["W"], s["K"])
    if workload == "remove_frequencies":
        return remove_frequencies(s["B"], s["C"], s["H"], s["W"], s["K"])
    if workload == "vinfo_probes":
        return vinfo_probes(s["n_train"], s["n_heldout"], s["D"], s["K"], s["alphas"],
                            "tf32" if tf32_matmul else "fp32")
    if workload == "probe_stats":
        return probe_stats(s["N"], s["D"], s["K"], "tf32" if tf32_matmul else "fp32")
    if workload == "probe_step":
        return probe_step(s["N"], s["D"], s["K"], s["C"])
    if workload.startswith("ablation_sweep_"):
        return ablation_sweep(s["images"], s["model"], s["stage"], s["where"], s.get("groups", 4), s.get("H", 32),
                              s.get("W", 32), _conv_precision(dtype, tf32_conv))
    if workload in ("dfm_search_loss", "dfm_search_cifar"):
        return dfm_search(s["classes"], s["images"], s["candidates"], s["model"], s.get("H", 32), s.get("W", 32),
                          _conv_precision(dtype, tf32_conv))
    return None


def phase_ms(phase: Phase, peaks: Peaks) -> tuple[float, str]:
    """(best milliseconds, "memory" or "compute") of one phase on a GPU."""
    memory = phase.bytes / peaks.bandwidth
    compute = phase.flops / peaks.flops[phase.precision]
    return max(memory, compute) * 1e3, "memory" if memory >= compute else "compute"


def roofline(phases: list[Phase], peaks: Peaks | None) -> dict:
    """bytes, flops and precision of the phases; with peaks also the bound and best time
    (the sum of the phases' best times; the bound of the phase that takes longest)."""
    out = {"bytes": sum(p.bytes for p in phases), "flops": sum(p.flops for p in phases),
           "precision": "+".join(dict.fromkeys(p.precision for p in phases))}
    if peaks is not None:
        timed = [phase_ms(p, peaks) for p in phases]
        out["bound"] = max(timed)[1]
        out["best_ms"] = sum(ms for ms, _ in timed)
    if len(phases) > 1:
        out["phases"] = [{**asdict(p), **({"best_ms": ms, "bound": bound} if peaks else {})}
                         for p, (ms, bound) in zip(phases, timed if peaks else [(None, None)] * len(phases))]
    return out


def row_roofline(workload: str, sizes: dict, dtype: str, backend: str, median_ms: float, device: str) -> dict | None:
    """The roofline fields of one benchmark row (None for a workload without one). On a GPU
    of known peaks: bound, best_ms and fraction = best / measured; on the CPU only bytes and
    flops (no CPU peaks are tabulated)."""
    import torch

    cuda = device == "cuda"
    # The TF32 switches only act on CUDA tensors.
    phases = workload_phases(workload, sizes, dtype, tf32_matmul=cuda and torch.backends.cuda.matmul.allow_tf32,
                             tf32_conv=cuda and torch.backends.cudnn.allow_tf32)
    if phases is None:
        return None
    if not cuda:
        return roofline(phases, None)
    name = torch.cuda.get_device_name()
    key = match_device(name)
    out = roofline(phases, PEAKS.get(key))
    if key is None:
        out["note"] = f"no peak figures for {name}: no best time"
        return out
    out["device"] = key
    out["fraction"] = out["best_ms"] / median_ms if median_ms > 0 else None
    kernel = triton_flops(workload, sizes) if backend == "triton" else None
    if kernel is not None:  # its own arithmetic at float32 may exceed the memory floor
        out["kernel_flops"] = kernel
        out["kernel_best_ms"] = max(out["bytes"] / PEAKS[key].bandwidth, kernel / PEAKS[key].flops["fp32"]) * 1e3
    return out


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def ms_text(ms: float) -> str:
    return f"{ms / 1e3:.3g} s" if ms >= 1e3 else (f"{ms:.3g} ms" if ms >= 1 else f"{ms * 1e3:.3g} us")


def summary(r: dict) -> str:
    """One line for `shortcut-fast bench`: what the row must move and compute, and on a GPU of
    known peaks the best time and the measured fraction of it."""
    text = f"roofline: {_si(r['bytes'], 'B')}, {_si(r['flops'], 'FLOP')} {r['precision']}"
    if "best_ms" in r and r.get("fraction") is not None:
        text += f" -> best {ms_text(r['best_ms'])} ({r['bound']}-bound on {r['device']}), measured at {r['fraction']:.0%}"
        if "kernel_best_ms" in r:
            text += f"; this kernel's own arithmetic needs {ms_text(r['kernel_best_ms'])}"
    elif "note" in r:
        text += f" ({r['note']})"
    return text


# ---------------------------------------------------------------------------------------
# The table at the GPU benchmark sizes


def gpu_rows() -> list[dict]:
    """(label, workload, sizes, dtype) of every GPU benchmark row with a roofline, from the
    benchmarks' own size settings, plus the probe-training step no benchmark times yet."""
    from shortcut_fast.bench import ablation_sweep as ab, band_filter as bf, class_spectrum as cs, dfm_cifar as dc
    from shortcut_fast.bench import dfm_search as ds, probe_stats as ps

    rows = []
    for B, C, H, W, K in cs.cases("cuda", False):
        rows.append(dict(label="class spectrum", workload="class_spectrum_sum", sizes=dict(B=B, C=C, H=H, W=W, K=K),
                         text=f"B={B}, {C}x{H}x{W}, {K} classes"))
    for B, C, H, W, K in bf.cases("cuda", False):
        for workload in ("band_filter", "remove_frequencies"):
            rows.append(dict(label=workload.replace("_", " "), workload=workload,
                             sizes=dict(B=B, C=C, H=H, W=W, K=K), text=f"B={B}, {C}x{H}x{W}, K={K}"))
    n_train, n_heldout, D, K, _ = ps.settings("cuda", False)
    text = f"N = {n_train:,} + {n_heldout:,} held-out, D = {D}, K = {K:,}, {len(ps.ALPHA_FACTORS)} alphas"
    rows.append(dict(label="V-information probes (statistics + ridge fit)", workload="vinfo_probes",
                     sizes=dict(n_train=n_train, n_heldout=n_heldout, D=D, K=K, alphas=len(ps.ALPHA_FACTORS)),
                     text=text + ", float32 matmuls"))
    rows.append(dict(label="probe statistics alone, TF32", workload="probe_stats", tf32_matmul=True,
                     sizes=dict(N=n_train + n_heldout, D=D, K=K), text=f"N = {n_train + n_heldout:,}, D = {D}, "
                                                                          f"K = {K:,} (both splits)"))
    rows.append(dict(label="probe training step (no benchmark yet)", workload="probe_step",
                     sizes=dict(N=1024, D=512, K=1000, C=10),
                     text="batch 1,024 (train_probes' default), D = 512, 1,000 softmax probes, 10 classes"))
    s = ab.settings("cuda", False)
    for stage in s["stages"]:
        for where in ("output", "post-activation"):
            rows.append(dict(label=f"ablation sweep, {stage} " + ("block outputs" if where == "output"
                                                                  else "conv1 post-activation"),
                             workload=f"ablation_sweep_{where.replace('-', '_')}",
                             sizes=dict(images=s["images"], H=32, W=32, model=f"resnet18(width={s['width']})",
                                        stage=stage, where=where, groups=4),
                             text=f"ResNet-18 w{s['width']}, {s['images']:,} images, 4 groups"))
    width, images = ds.settings("cuda", False)
    rows.append(dict(label="DFM search, loss (exact)", workload="dfm_search_loss",
                     sizes=dict(classes=1, images=images, candidates=514, model=f"resnet18(width={width})"),
                     text=f"1 class, {images} images, 514 pairs, ResNet-18 w{width}"))
    full = dc.FULL
    rows.append(dict(label="DFM search, CIFAR scale", workload="dfm_search_cifar", dtype="bfloat16 autocast",
                     sizes=dict(full, model=f"resnet18(width={dc.WIDTH})"),
                     text=f"{full['classes']} classes x {full['images']:,} images x {full['candidates']} pairs, "
                          f"ResNet-18 w{dc.WIDTH}, bf16"))
    return rows


def table(device: str = TABLE_DEVICE) -> dict:
    """The roofline of every GPU benchmark row on `device` (a PEAKS key), torch's default
    TF32 settings unless a row says otherwise."""
    peaks = PEAKS[device]
    out = []
    for row in gpu_rows():
        phases = workload_phases(row["workload"], row["sizes"], row.get("dtype", "float32"),
                                 tf32_matmul=row.get("tf32_matmul", False))
        entry = {k: row[k] for k in ("label", "workload", "sizes", "text")}
        entry.update(roofline(phases, peaks))
        kernel = triton_flops(row["workload"], row["sizes"])
        if kernel is not None:
            entry["triton_flops"] = kernel
            entry["triton_best_ms"] = max(entry["bytes"] / peaks.bandwidth, kernel / peaks.flops["fp32"]) * 1e3
        out.append(entry)
    return {"device": device, "bandwidth": peaks.bandwidth, "peaks": peaks.flops, "rows": out}


def format_table(t: dict) -> str:
    p = t["peaks"]
    lines = [f"Roofline on an {t['device']} ({t['bandwidth'] / 1e12:.3g} TB/s; TFLOP/s fp64 {p['fp64'] / 1e12:.3g}, "
             f"fp32 {p['fp32'] / 1e12:.3g}, tf32 {p['tf32'] / 1e12:.4g}, bf16 {p['bf16'] / 1e12:.4g}) at the GPU "
             f"benchmark sizes:",
             f"{'workload':<46} {'bytes':>9} {'FLOPs':>11} {'precision':<10} {'bound':<8} {'best':>9}  sizes"]
    for r in t["rows"]:
        lines.append(f"{r['label']:<46} {_si(r['bytes'], 'B'):>9} {_si(r['flops'], 'FLOP'):>11} {r['precision']:<10} "
                     f"{r['bound']:<8} {ms_text(r['best_ms']):>9}  {r['text']}")
        if "triton_best_ms" in r:
            lines.append(f"{'':<4}the Triton kernel's DFT matmuls: {_si(r['triton_flops'], 'FLOP')} fp32, "
                         f"at least {ms_text(r['triton_best_ms'])}")
    return "\n".join(lines)


def write_table(path: Path | None = None) -> dict:
    t = table()
    path = RESULTS if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(t, indent=1) + "\n")
    return t
