"""DFM search at CIFAR-10 scale: the exact loss-based DFMs of 10 classes x 1,000 images over
every conjugate frequency pair of a 32x32 spectrum (514 candidates), full ResNet-18.

Workload (the headline goal, docs/performance.md#gpu-goals: the exact loss DFMs of all 10 classes, 1,000
images each, every frequency pair, full ResNet-18, under 60 s on one H100/H200): random
CIFAR-shaped images (uint8 -> [0, 1]) and a randomly initialized models.resnet18 (width 64;
the search costs the same for any weights), 5,140,000 model forwards in all.
- fast path: experiments.freq_probe.class_dfm(method "loss") per class, i.e.
  candidate_losses: one FFT per image, each pair removed by a rank-one update, the variants
  streamed into the search's inference copy of the model (BatchNorms folded, channels_last)
  in batches (its device defaults: batch 1024 and 1 GiB of variants on a GPU; on the CPU
  32 MiB and the batch sized from the model's largest activation, 32 at full width); on a
  GPU bf16 autocast and a channels_last model.
- baseline: the per-(class, candidate) loop dfm_losses_reference (one FFT round trip of the
  class's images per candidate, then the forward), with the same model and precision (run
  under the same autocast on a GPU).
Checked first, in float32 (TF32 off, no autocast): the fast losses equal the baseline's
(rtol 1e-3, atol 1e-4) and rank alike up to ties, on 1 class x CHECK_IMAGES images and every
candidate on a GPU, on the timed subset on the CPU. On a GPU the bf16 DFMs are also compared
with the float32 ones on the checked images (Jaccard of the top-5 % maps, Spearman of the
losses).
- GPU: the full size is timed (one wall-clock run after a warm-up on a small subset); the
  baseline is timed on one class of 1,000 images and scaled by 10 (every class costs the same).
- CPU: the full size would take days. A subset is timed on both paths (1 class x 32 images x
  32 of the 514 pairs, spread evenly over the radius order, the full-width ResNet-18; both
  paths CPU_ROUNDS times, alternately, medians) and
  the full size extrapolated from the time per forward (the achieved fields named
  "extrapolated_*"; the fast one adds the one-off compile). Both paths are given the CPU
  default batch sized from the model (default_batch_size: 32 images per forward at full
  width, the class's 32 images for the loop). The fast path runs its inference copy
  torch.compiled (compile "on": at the full size "auto" compiles, the subset alone is below
  COMPILE_MIN_FLOPS); the compile is timed apart (compile_s) in the warm-up. Both run the
  same 1,024 forwards, so the row also records the ceiling: the loop's time outside its
  forwards (its FFT round trips, timed alone: baseline_nonforward_ms), the speedup of the
  fast path's inference copy per forward (against the model as built, forward_speedup
  compiled and forward_speedup_folded without compile, timed interleaved on the same batch)
  and the ratio they allow (ratio_ceiling = forward_speedup x baseline / (baseline -
  nonforward)), with both paths' FLOP rates against one core's fastest measured fp32 rate
  (common.cpu_fp32_rate) and the share of the compiled forward spent in convolutions.
"""
from __future__ import annotations

import os
import statistics

import torch

from shortcut_fast.bench.common import BenchRow, alternating_wall_ms, cpu_fp32_rate, record, wall_ms
from shortcut_fast.bench.roofline import peak_flops
from shortcut_fast.experiments import freq_probe as fp
from shortcut_fast.experiments.stats import spearman
from shortcut_fast.models import build_model

FULL = dict(classes=10, images=1000, candidates=514)
WIDTH = 64  # the full-width ResNet-18
GOAL_S = 60.0
CHECK_IMAGES = 64
CPU_THREADS = 1  # as bench/denetdm.py: stable wall times on the shared 2-core machine
CPU_ROUNDS = 3


def _images(classes: int, n: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, 256, (classes, n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device).float() / 255)


def _forward_flops(model: torch.nn.Module, device: str) -> float:
    return fp.forward_flops(model, torch.rand(2, 3, 32, 32, device=device))


def _nonforward_ms(images: torch.Tensor, candidates: fp.Candidates) -> float:
    """The reference loop's work outside its forwards: its per-candidate FFT round trips."""
    def loop():
        for k in range(len(candidates)):
            keep = (~candidates.masks[k]).to(images.device, torch.float32)
            torch.fft.ifft2(torch.fft.fft2(images.float()) * keep).real.contiguous()

    loop()
    return min(wall_ms(loop, images.device.type)[1] for _ in range(3))


def _forward_speedups(model, images: torch.Tensor, batch: int, repeats: int = 7) -> dict:
    """Per-forward time of the model as built over that of the search's inference copy,
    compiled for `batch` (as the timed search ran it) and folded only, interleaved on the
    same batch (medians of `repeats`)."""
    nets = {"model": model, "compiled": fp.inference_model(model, images[:1], compile_batch=batch),
            "folded": fp.inference_model(model, images[:1])}
    times: dict[str, list[float]] = {name: [] for name in nets}
    with torch.inference_mode():
        x = images[:batch].clone()  # an inference tensor, as the search's variants
        for _ in range(repeats + 1):  # the first round warms up
            for name, net in nets.items():
                times[name].append(wall_ms(lambda: net(x), images.device.type)[1])
    base = statistics.median(times["model"][1:])
    return {"forward_speedup": base / statistics.median(times["compiled"][1:]),
            "forward_speedup_folded": base / statistics.median(times["folded"][1:])}


def _conv_share(model, images: torch.Tensor, batch: int) -> float:
    """Share of one forward of the search's compiled copy spent in convolutions (torch.profiler)."""
    from torch.profiler import profile

    net = fp.inference_model(model, images[:1], compile_batch=batch)
    with torch.inference_mode():
        x = images[:batch].clone()
        net(x)
        with profile() as prof:
            net(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / max(total, 1e-9)


def _subset(candidates: fp.Candidates, index: torch.Tensor) -> fp.Candidates:
    return fp.Candidates(candidates.masks[index], candidates.pairs[index])


def _check(model, images, candidates, index, batch, max_bytes, compile="auto", rounds: int = 1) -> dict:
    """float32 fast losses against the per-candidate loop on `images` (one class); raises on a
    mismatch. `rounds` > 1: both paths timed that many times, alternately (medians; the
    shared machine's speed drifts by 10-20 % between runs of several seconds)."""
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    last_slow = []

    def slow():
        last_slow[:] = [fp.dfm_losses_reference(model, images, 0, _subset(candidates, index), batch_size=batch)]
        return last_slow[0]

    def fast():  # checked in every round against the loop's losses of the same round
        losses = fp.candidate_losses(model, images, 0, candidates, index, batch_size=batch, max_bytes=max_bytes,
                                     compile=compile)[0]
        torch.testing.assert_close(losses, last_slow[0], rtol=1e-3, atol=1e-4)
        return losses

    try:
        out, runs = alternating_wall_ms({"slow": slow, "fast": fast}, rounds, images.device.type)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    fast, slow = out["fast"], out["slow"]
    order = slow[torch.argsort(fast, descending=True)]
    return {"fast": fast, "slow": slow, "fast_ms": statistics.median(runs["fast"]),
            "slow_ms": statistics.median(runs["slow"]), "fast_ms_runs": runs["fast"], "slow_ms_runs": runs["slow"],
            "max_abs_loss_diff": float((fast - slow).abs().max()),
            "same_ranking_up_to_ties": bool((order[1:] <= order[:-1] + 1e-4).all())}


def run(device: str = "cpu", quick: bool = False):
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        return _run_full(quick, "cuda") if device == "cuda" else _run_cpu(quick)
    finally:
        torch.set_num_threads(threads)


def _model(width: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=width).to(device).eval()
    return model.to(memory_format=torch.channels_last) if device == "cuda" else model


def _run_cpu(quick: bool):
    width, n, k = (8, 4, 8) if quick else (WIDTH, 32, 32)
    model = _model(width, "cpu")
    candidates = fp.Candidates.build(32, 32, 1)
    index = torch.linspace(0, len(candidates) - 1, k).round().long()  # evenly over the radius order
    images = _images(1, n, "cpu")[0]
    batch, max_bytes = fp.default_batch_size("cpu", model, images[:1]), fp.default_max_bytes("cpu")
    fp.candidate_losses(model, images[:2], 0, candidates, index[:1], batch_size=batch, max_bytes=max_bytes)  # warm-up
    _, compile_ms = wall_ms(lambda: fp.inference_model(model, images[:1], compile_batch=batch), "cpu")
    got = _check(model, images, candidates, index, batch, max_bytes, "on", CPU_ROUNDS)  # the timed runs are checked
    # The baseline's forwards hold min(n, batch) images; the fast path's hold `batch` variants.
    # Where they differ the fast path is also timed with forward batches of n (alongside).
    extra = {}
    if batch != n:
        _, same_batch_ms = wall_ms(lambda: fp.candidate_losses(model, images, 0, candidates, index, batch_size=n,
                                                               max_bytes=max_bytes, compile="on"), "cpu")
        extra = {"fast_ms_at_baseline_batch": same_batch_ms, "ratio_at_baseline_batch": got["slow_ms"] / same_batch_ms}
    # The ceiling: both paths run the same forwards, so the fast path gains only the loop's
    # time outside them and what its inference copy saves per forward.
    nonforward_ms = _nonforward_ms(images, _subset(candidates, index))
    speedups = _forward_speedups(model, images, batch)
    conv_share = _conv_share(model, images, batch)
    same_forwards = got["slow_ms"] / max(got["slow_ms"] - nonforward_ms, 1e-9)
    forwards = n * k
    full_forwards = FULL["classes"] * FULL["images"] * FULL["candidates"]
    flops = _forward_flops(model, "cpu")
    row = BenchRow(
        workload="dfm_search_cifar",
        sizes=dict(classes=1, images=n, candidates=k, H=32, W=32, model=f"resnet18(width={width})",
                   full=dict(FULL), timed="subset: every forward of the full size costs the same"),
        dtype="float32", backend="auto",
        baseline="per-candidate FFT round trip + forward (dfm_losses_reference)",
        median_ms=got["fast_ms"], p20_ms=got["fast_ms"], p80_ms=got["fast_ms"], baseline_ms=got["slow_ms"],
        ratio=got["slow_ms"] / got["fast_ms"],
        achieved={"forwards/s": forwards / got["fast_ms"] * 1e3,
                  "baseline_forwards/s": forwards / got["slow_ms"] * 1e3,
                  "GFLOP/s": flops * forwards / got["fast_ms"] / 1e6,
                  "extrapolated_full_s": got["fast_ms"] / 1e3 * full_forwards / forwards + compile_ms / 1e3,
                  "compile_s": compile_ms / 1e3,
                  "baseline_extrapolated_full_s": got["slow_ms"] / 1e3 * full_forwards / forwards,
                  "fast_ms_runs": got["fast_ms_runs"], "baseline_ms_runs": got["slow_ms_runs"],
                  "max_abs_loss_diff": got["max_abs_loss_diff"],
                  "same_ranking_up_to_ties": got["same_ranking_up_to_ties"],
                  "forward_batch": batch, "baseline_forward_batch": min(batch, n), **extra,
                  "baseline_nonforward_ms": nonforward_ms, "ceiling_same_forwards": same_forwards,
                  **speedups, "ratio_ceiling": speedups["forward_speedup"] * same_forwards,
                  "baseline_GFLOP/s": flops * forwards / got["slow_ms"] / 1e6, **cpu_fp32_rate(),
                  "compiled_forward_convolution_share": conv_share,
                  "cpu_threads": torch.get_num_threads(),
                  "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        quick=quick)
    return [record(row, "cpu")]


def _run_full(quick: bool, device: str = "cuda"):
    """The full size on a GPU (callable on the CPU with quick=True as a smoke run of this code)."""
    classes, n, width = (2, 16, 8) if quick else (FULL["classes"], FULL["images"], WIDTH)
    model = _model(width, device)
    candidates = fp.Candidates.build(32, 32, 1)
    every = torch.arange(len(candidates))
    images = _images(classes, n, device)
    batch, max_bytes = fp.default_batch_size(device), fp.default_max_bytes(device)
    m = min(CHECK_IMAGES, n)

    # checked in float32 on one class; then the bf16 DFMs against the float32 ones
    fp.candidate_losses(model, images[0, :m], 0, candidates, every[:8], batch_size=batch, max_bytes=max_bytes)
    got = _check(model, images[0, :m], candidates, every, batch, max_bytes)
    bf16 = fp.candidate_losses(model, images[0, :m], 0, candidates, batch_size=batch, max_bytes=max_bytes, amp=True)[0]
    top = fp.FreqProbeConfig().top_percent
    exact_dfm, bf16_dfm = (fp.dfm_from_scores(s, candidates, top) for s in (got["slow"], bf16))
    jaccard = float((exact_dfm & bf16_dfm).sum() / (exact_dfm | bf16_dfm).sum())

    # the full search: every class through class_dfm, bf16 autocast
    cfg = fp.FreqProbeConfig(method="loss", patch=1, amp=True)
    fp.class_dfm(model, images[0, :m], 0, cfg)  # warm-up at the timed settings
    entries, fast_ms = wall_ms(lambda: [fp.class_dfm(model, images[c], c, cfg) for c in range(classes)], device)
    with torch.autocast(device, dtype=torch.bfloat16):
        slow0, slow0_ms = wall_ms(lambda: fp.dfm_losses_reference(model, images[0], 0, candidates, batch_size=batch),
                                  device)
    fast0 = torch.tensor(entries[0].scores)
    forwards = classes * n * len(candidates)
    flops = _forward_flops(model, device)
    peak = peak_flops(torch.cuda.get_device_name(), "bf16") if device == "cuda" else None
    seconds = fast_ms / 1e3
    row = BenchRow(
        workload="dfm_search_cifar",
        sizes=dict(classes=classes, images=n, candidates=len(candidates), H=32, W=32, model=f"resnet18(width={width})",
                   full=dict(FULL), timed="full size"),
        dtype="bfloat16 autocast", backend="auto",
        baseline=f"per-candidate FFT round trip + forward (dfm_losses_reference, same autocast), timed on 1 class "
                 f"and scaled x{classes}",
        median_ms=fast_ms, p20_ms=fast_ms, p80_ms=fast_ms, baseline_ms=slow0_ms * classes,
        ratio=slow0_ms * classes / fast_ms,
        achieved={"seconds": seconds, "goal_s": GOAL_S, "meets_goal": seconds < GOAL_S,
                  "per_class_s": [e.seconds for e in entries],
                  "forwards/s": forwards / seconds, "TFLOP/s": flops * forwards / seconds / 1e12,
                  "fraction_of_bf16_peak": flops * forwards / seconds / peak if peak else None,
                  "class0_max_abs_loss_diff_vs_baseline": float((fast0 - slow0).abs().max()),
                  "check_images": m, "check_candidates": len(candidates),
                  "check_float32_max_abs_loss_diff": got["max_abs_loss_diff"],
                  "check_same_ranking_up_to_ties": got["same_ranking_up_to_ties"],
                  "bf16_dfm_jaccard_vs_float32": jaccard,
                  "bf16_spearman_vs_float32": spearman(bf16, got["slow"])},
        quick=quick)
    return [record(row, device)]
