"""Frequency shortcuts (docs/experiments.md#frequency-shortcuts; Wang et al., ICCV 2023).

Per class c of a frozen classifier:
- ADCS_c: where class c has more spectral energy than the other classes.
- DFM_c, the dominant frequency map, three ways:
  loss      remove each candidate (a conjugate frequency pair, or a p x p patch of the
            shifted spectrum with its mirror) from the class-c images and rank candidates
            by the mean cross-entropy that results; DFM = the top X % of frequencies.
  greedy    walk frequency groups in a fixed order, remove each one tentatively and keep
            the removal when the class-c correct count drops by at most t, measured from
            the count after the last kept removal (reference "last", published) or from the
            original count (reference "base", ours); the frequencies never removed are the
            DFM. Orders: "ours" (conjugate pairs from DC outwards by radius) or "published"
            (the spiral of dfmX-augmentation's removal_order.pkl, see published_removal_order).
  gradient  one backward pass gives a first-order estimate of every candidate's loss
            increase (Parseval: removing x_P changes the loss by about -<dL/dx, x_P>); the
            top candidates are then evaluated exactly and the DFM taken from those.
- TPR_c / FPR_c: filter ALL test images to DFM_c's frequencies; TPR_c = fraction of class-c
  images predicted c, FPR_c = fraction of the other images predicted c. High both: the
  model predicts c from those frequencies whatever the image (a frequency shortcut).
- For datasets with radial bands (synthetic-freq): the band-stop table
  Delta[c, b] = (correct after removing band b - correct originally) / N_c * 100.

Every filter acts around a centre mu (InputCentre): x -> filter(x - mu) + mu. The published
code filters the normalized input (x - m) / s; per channel that is the same as filtering
around mu = m (the filter is linear and s a per-channel scale), so removing DC gives the
mean colour, not black. Default mu: the model's normalization, else the train split's mean
colour ("dataset-mean"); "zero" filters raw pixels.

Fast path: one FFT per image and rank-one updates (ops.remove_frequencies) or batched
masked filtering (ops.band_filter), streamed into an inference copy of the model
(inference_model: BatchNorms folded, channels_last; on the CPU for a long search also
torch.compiled with frozen weights, should_compile) in batches sized from the model's
activations (default_batch_size); only class-c images are evaluated for class c. On the CPU
the forwards are nearly all of the time of both paths, so the gain over the loop is what
the inference copy and the batch size save per forward. `dfm_losses_reference` is the straightforward
per-(class, candidate) loop it replaces (one FFT round trip per candidate).

Distribution (`run_freq_probe(..., dist=)`, a distributed.DistContext with world_size W > 1,
under torchrun): the DFM search is split over the ranks. With at least W classes (and always
for the greedy method, whose walk is sequential within a class) the classes are: each rank
searches a contiguous share of them and the finished ClassDFMs are gathered in class order
(the result is the one-process result exactly). With fewer classes than ranks (loss and
gradient methods) the candidates of each class are: each rank scores a contiguous share of
the class's candidates (the gradient method: of those it re-evaluates exactly; the estimate is
computed on every rank) and the per-candidate losses and counts are gathered in candidate
order before the DFM is chosen; scores equal the one-process ones up to float rounding of
differently composed forward batches. The test accuracy, ADCS, TPR/FPR, band-stop and OOD
tables run on rank 0, which broadcasts the whole result, so every rank returns the same
object. Partial results go to the store with rank suffixes (class_<c>.rank<r>.json, the
loss method's class_<c>.loss-progress.rank<r>.json) and are resumed after an elastic restart.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast.distributed import DistContext, broadcast, check_same, gather, is_main, rank_suffix, shard
from shortcut_fast.experiments._api import ApiResult
from shortcut_fast.experiments.stats import spearman
from shortcut_fast.ops import freq
from shortcut_fast.ops.band_filter import (band_filter, band_filter_chunks, remove_frequencies,
                                          remove_frequencies_chunks)
from shortcut_fast.ops.class_spectrum import ClassSpectrum, adcs
from shortcut_fast.ops.precision import check_precision
from shortcut_fast.report import progress_ticker
from shortcut_fast.run_folder import Store

METHODS = ("loss", "greedy", "gradient")
GREEDY_REFERENCES = ("last", "base")
GREEDY_ORDERS = ("ours", "published")
FILTER_CENTRES = ("dataset-mean", "zero")
ADCS_VARIANTS = ("ours", "published")
# The published ADCS weights the channel differences like an RGB -> gray conversion.
LUMINANCE = (0.2989, 0.587, 0.114)


# ---------------------------------------------------------------------------------------
# The centre filters work around


@dataclass
class InputCentre:
    """Per-channel centre mu the filters act around (x -> filter(x - mu) + mu), and the std
    of the normalization it comes from (used only by the published ADCS, which takes the
    spectrum of the normalized input)."""

    mean: list[float]
    std: list[float] | None = None
    source: str = "zero"

    def tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def is_zero(self) -> bool:
        return not any(self.mean)


def _model_normalization(model: nn.Module):
    """(mean, std) of the first input-normalization module of `model`, or None."""
    from shortcut_fast.models.bridges import Normalize

    for module in model.modules():
        if isinstance(module, Normalize):
            return module.mean.flatten().tolist(), module.std.flatten().tolist()
    return None


@torch.no_grad()
def input_centre(mode: str, model: nn.Module | None, dataset, *, channels: int | None = None,
                 batch_size: int = 1024, device="cpu") -> InputCentre:
    """The centre for `mode`: "zero", or "dataset-mean" = the model's normalization when it
    has one, else the per-channel mean (and std) of `dataset` (the train split), one pass."""
    if mode not in FILTER_CENTRES:
        raise ValueError(f"filter_centre must be one of {FILTER_CENTRES}, got {mode!r}")
    if mode == "zero":
        return InputCentre([0.0] * (channels or 1), None, "zero")
    norm = _model_normalization(model) if model is not None else None
    if norm is not None:
        return InputCentre(norm[0], norm[1], "model normalization")
    if dataset is None or len(dataset) == 0:
        raise ValueError("filter_centre 'dataset-mean' needs a non-empty dataset (the train split) "
                         "or a model with an input normalization")
    total = total_sq = None
    count = 0
    for start in range(0, len(dataset), batch_size):
        x, _, _ = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))), device=device)
        x = x.double()
        s, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel: no scaling
    return InputCentre(mean.tolist(), std.tolist(), f"train split mean ({len(dataset)} images)")


class CentredModel(nn.Module):
    """model(z + mu): feed it centred images z = x - mu, filtered or not."""

    def __init__(self, model: nn.Module, centre: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("centre", centre.reshape(1, -1, 1, 1), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z + self.centre.to(z.dtype))


def centred(model: nn.Module, images: torch.Tensor, centre: InputCentre | None):
    """(model', images') such that filtering images' and running model' filters around the
    centre: images' = x - mu, model'(z) = model(z + mu). No centre (or zero): unchanged."""
    if centre is None or centre.is_zero():
        return model, images
    mu = centre.tensor(images.device)
    if mu.shape[1] != images.shape[1]:
        raise ValueError(f"centre has {mu.shape[1]} channel(s) but the images have {images.shape[1]}")
    return CentredModel(model, mu), images.float() - mu


@dataclass
class Candidates:
    """What the DFM search removes: conjugate pairs (patch 1) or patch masks (patch > 1)."""

    masks: torch.Tensor  # (K, H, W) bool, conjugate-symmetric
    pairs: torch.Tensor | None = None  # (K, 2) when every candidate is one conjugate pair

    @classmethod
    def build(cls, H: int, W: int, patch: int) -> "Candidates":
        if patch == 1:
            pairs = freq.conjugate_pairs(H, W)
            return cls(freq.pair_masks(H, W, pairs), pairs)
        masks, _ = freq.patch_masks(H, W, patch)
        return cls(masks)

    def __len__(self) -> int:
        return self.masks.shape[0]

    def variant_chunks(self, images: torch.Tensor, index: torch.Tensor, max_bytes: int, backend: str,
                       precision: str = "auto"):
        """Chunks of images with candidates[index] removed: (k_slice into index, (k, n, C, H, W))."""
        if self.pairs is not None:
            chunks = remove_frequencies_chunks(images, self.pairs[index], max_bytes=max_bytes, backend=backend)
        else:
            chunks = band_filter_chunks(images, self.masks[index], "stop", max_bytes=max_bytes, backend=backend,
                                        precision=precision)
        for chunk in chunks:
            yield chunk


# Making the inference copy costs about 20 (full-width ResNet-18) to 70 (width 8) image
# forwards on the CPU and saves 10-20 % of each: worth it from a few hundred forwards on.
INFERENCE_COPY_MIN_FORWARDS = 512

# torch.compile of the copy (inductor with the weights frozen into the graph: each conv
# pre-packed and fused with its bias, ReLU and residual add) is another 1.1-1.3x per forward
# on the CPU (full-width ResNet-18, batch 32), but compiling costs 5-15 s. "auto" compiles
# on the CPU from this many FLOPs of planned forwards on (about a minute of one core).
COMPILE_MIN_FLOPS = 1e13
COMPILE_CHOICES = ("auto", "on", "off")
# The compiled copy of a model, reused while the model's weights stay as they were: a
# search compiles once, not once per class.
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


class _ChannelsLastInput(nn.Module):
    """Feeds a channels_last model channels_last input (its first conv would convert it anyway,
    a few % slower)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


class _FixedBatch(nn.Module):
    """Batches of exactly `batch` images through `compiled` (compiled for that shape, so it
    never recompiles), any other batch (a chunk's last) through `eager`."""

    def __init__(self, compiled: nn.Module, eager: nn.Module, batch: int):
        super().__init__()
        self.compiled, self.eager, self.batch = compiled, eager, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch:
            return self.eager(x)
        import torch._inductor.config as inductor_config

        # a recompile (a guard that fails on another kind of input tensor) stays frozen
        with inductor_config.patch(freezing=True):
            return self.compiled(x)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to float rounding (a rewrite that changes the function differs far more)."""
    got, want = got.float(), want.float()
    return got.shape == want.shape and bool(((got - want).abs().max() <= 1e-3 * (1 + want.abs().max())).item())


def inference_model(model: nn.Module, sample: torch.Tensor, *, compile_batch: int | None = None) -> nn.Module:
    """The model the search's forwards run: a copy with every BatchNorm that only follows a conv
    (or Linear) folded into it and, for image models, channels_last weights and input
    (together 1.1-1.2x faster per image than the model as built, ResNet-18 on the CPU at
    batch 32). The losses change by float rounding only. `model` itself when fx cannot
    trace it or when the copy's logits on `sample` differ from the model's beyond rounding.
    compile_batch: also torch.compile the copy for batches of that size (compiled_copy).
    The model is not modified."""
    if isinstance(model, CentredModel):
        inner = inference_model(model.model, sample + model.centre.to(sample.dtype), compile_batch=compile_batch)
        return CentredModel(inner, model.centre)
    if compile_batch is not None and (cached := _cached_compiled(model, sample, compile_batch)) is not None:
        return cached  # the next class of a search: no folding again
    from torch.fx.experimental.optimization import fuse

    from shortcut_fast.surgery.split import trace

    with torch.inference_mode(False), torch.no_grad():  # parameters of the copy: ordinary tensors
        try:
            fast = fuse(torch.fx.GraphModule(model, trace(model, set())), no_trace=True).eval()
        except Exception:  # untraceable (data-dependent control flow, ...): run the model as it is
            return model
        if sample.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in fast.modules()):
            fast = _ChannelsLastInput(fast.to(memory_format=torch.channels_last))
        sample = sample.clone()
        if not _close(fast(sample), model(sample)):
            return model  # a rewrite that changes the function
    return fast if compile_batch is None else compiled_copy(model, fast, sample, compile_batch)


def _weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `model` is replaced or updated in place."""
    return tuple((name, t.data_ptr(), t._version) for name, t in model.state_dict(keep_vars=True).items())


def _compiled_key(model: nn.Module, sample: torch.Tensor, batch: int) -> tuple:
    return batch, tuple(sample.shape[1:]), sample.dtype, str(sample.device), _weights_key(model)


def _cached_compiled(model: nn.Module, sample: torch.Tensor, batch: int) -> nn.Module | None:
    cached = _COMPILED.get(model)
    return cached[1] if cached is not None and cached[0] == _compiled_key(model, sample, batch) else None


def compiled_copy(model: nn.Module, fast: nn.Module, sample: torch.Tensor, batch: int) -> nn.Module:
    """`fast` (the inference copy of `model`) with batches of `batch` run through
    torch.compile (inductor, weights frozen). Compiled once per model and weights (and
    sample shape), in inference mode as the search calls it. `fast` itself where
    torch.compile cannot run here (no C++ compiler, an unsupported platform) or where the
    compiled logits differ from the copy's beyond rounding: the results are the same."""
    if (cached := _cached_compiled(model, sample, batch)) is not None:
        return cached
    with torch.inference_mode():  # an inference tensor, as the search's variants are (else a recompile)
        x = sample[:1].expand(batch, *sample.shape[1:]).clone()
    cpp_log = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU machines
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        # compiled at the first call; freezing as a config patch (_FixedBatch): torch.compile's
        # options= did not reach inductor's freezing pass in torch 2.14 (plain convolutions came out)
        copy = _FixedBatch(torch.compile(fast, dynamic=False), fast, batch)
        with torch.inference_mode():
            ok = _close(copy(x), fast(x))
    except Exception as exc:  # torch.compile's machinery unavailable here: the folded copy
        warnings.warn(f"compile: torch.compile failed here ({type(exc).__name__}: {str(exc)[:200]}); the search "
                      f"runs the uncompiled copy (same results, slower)", RuntimeWarning, stacklevel=2)
        return fast
    finally:
        cpp_log.setLevel(level)
    if not ok:
        return fast
    _COMPILED[model] = (_compiled_key(model, sample, batch), copy)
    return copy


def forward_flops(model: nn.Module, sample: torch.Tensor) -> float:
    """FLOPs of one forward of `model` per image of `sample`: twice the multiply-adds of its
    convolutions and Linear layers, counted by hooks (torch's FlopCounterMode would import
    torch._dynamo into every search; the other layers' work is small beside these)."""
    macs = [0]

    def conv(m, inputs, out):
        macs[0] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear(m, inputs, out):
        macs[0] += out.numel() * m.in_features

    handles = [m.register_forward_hook(conv if isinstance(m, nn.modules.conv._ConvNd) else linear)
               for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.inference_mode():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return 2 * macs[0] / max(1, sample.shape[0])


def should_compile(choice: str, model: nn.Module, sample: torch.Tensor, forwards: int) -> bool:
    """compile "on", "off" or "auto": on the CPU when `forwards` image forwards of `model`
    hold at least COMPILE_MIN_FLOPS (GPUs: off, the forwards run bf16 through cuDNN and
    the compiled path has not been measured there)."""
    if choice != "auto":
        return choice == "on"
    return sample.device.type == "cpu" and forwards * forward_flops(model, sample[:1]) >= COMPILE_MIN_FLOPS


def _forward_stats(model: nn.Module, variants: torch.Tensor, label: int, batch_size: int, amp: bool):
    """Per-variant (summed over images) cross-entropy and correct counts for (k, n, C, H, W)."""
    k, n = variants.shape[:2]
    flat = variants.reshape(k * n, *variants.shape[2:])
    losses = torch.empty(k * n, device=flat.device)
    correct = torch.empty(k * n, dtype=torch.bool, device=flat.device)
    for start in range(0, k * n, batch_size):
        x = flat[start:start + batch_size]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        target = torch.full((x.shape[0],), label, device=x.device, dtype=torch.long)
        losses[start:start + x.shape[0]] = F.cross_entropy(logits, target, reduction="none")
        correct[start:start + x.shape[0]] = logits.argmax(1) == label
    return losses.view(k, n).sum(1), correct.view(k, n).sum(1)


@torch.inference_mode()
def candidate_losses(model: nn.Module, images: torch.Tensor, label: int, candidates: Candidates,
                     index: torch.Tensor | None = None, *, batch_size: int = 128, max_bytes: int = 32 << 20,
                     backend: str = "auto", precision: str = "auto", amp: bool = False,
                     compile: str = "auto", progress: Callable[[int], None] | None = None,
                     checkpoint: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                     resume_from: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Mean cross-entropy and correct count of class-`label` images with each candidate removed.

    index: which candidates (default all). resume_from: (losses, correct) of an earlier,
    interrupted call (NaN / -1 where not done); only the rest is computed. compile: whether
    the inference copy is also torch.compiled (should_compile; results equal up to rounding).
    checkpoint(losses, correct) is called after each chunk.
    Returns (mean loss (K,), correct count (K,)) over `index`.
    """
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {compile!r}")
    model.eval()
    index = torch.arange(len(candidates)) if index is None else index
    losses = torch.full((len(index),), float("nan"))
    correct = torch.full((len(index),), -1, dtype=torch.long)
    if resume_from is not None:
        losses, correct = resume_from[0].clone(), resume_from[1].clone()
        losses[correct < 0] = float("nan")
    todo = (correct < 0).nonzero().flatten()
    n = images.shape[0]
    if len(todo) * n >= INFERENCE_COPY_MIN_FORWARDS:
        compile_batch = batch_size if should_compile(compile, model, images, len(todo) * n) else None
        model = inference_model(model, images[:1], compile_batch=compile_batch)
    for chunk in candidates.variant_chunks(images, index[todo], max_bytes, backend, precision):
        loss_sum, hits = _forward_stats(model, chunk.images, label, batch_size, amp)
        rows = todo[chunk.k_slice]
        if chunk.b_slice != slice(0, n):  # a chunk covers part of the images of one candidate
            losses[rows] = torch.nan_to_num(losses[rows], nan=0.0) + loss_sum.cpu() / n
            correct[rows] = correct[rows].clamp(min=0) + hits.cpu()
        else:
            losses[rows] = loss_sum.cpu() / n
            correct[rows] = hits.cpu()
        if progress is not None and chunk.b_slice.stop == n:
            progress(len(rows))
        if checkpoint is not None and chunk.b_slice.stop == n:
            checkpoint(losses, correct)
    return losses, correct


def dfm_from_scores(scores: torch.Tensor, candidates: Candidates, top_percent: float) -> torch.Tensor:
    """Union of the best-scored candidates until it holds top_percent % of the frequencies."""
    H, W = candidates.masks.shape[1:]
    target = max(1, round(H * W * top_percent / 100))
    mask = torch.zeros(H, W, dtype=torch.bool)
    order = torch.argsort(torch.nan_to_num(scores, nan=-math.inf), descending=True, stable=True)
    for k in order.tolist():
        if int(mask.sum()) >= target:
            break
        mask |= candidates.masks[k]
    return mask


def dfm_losses_reference(model: nn.Module, images: torch.Tensor, label: int, candidates: Candidates, *,
                         batch_size: int = 512) -> torch.Tensor:
    """The loop the fast path replaces: for every candidate, an FFT round trip of the class's
    images with that candidate removed, then a forward pass (mean cross-entropy per candidate)."""
    model.eval()
    losses = []
    with torch.inference_mode():
        for k in range(len(candidates)):
            keep = (~candidates.masks[k]).to(images.device, torch.float32)
            filtered = torch.fft.ifft2(torch.fft.fft2(images.float()) * keep).real
            total = 0.0
            for start in range(0, images.shape[0], batch_size):
                x = filtered[start:start + batch_size]
                target = torch.full((x.shape[0],), label, device=x.device, dtype=torch.long)
                total += float(F.cross_entropy(model(x).float(), target, reduction="sum"))
            losses.append(total / images.shape[0])
    return torch.tensor(losses)


# ---------------------------------------------------------------------------------------
# Greedy and gradient variants


def _spiral(n: int) -> torch.Tensor:
    """(n, n) int64: 1..n*n numbered clockwise from the top-left corner inwards."""
    s = torch.zeros(n, n, dtype=torch.long)
    top, left, bottom, right, k = 0, 0, n - 1, n - 1, 1
    while top <= bottom and left <= right:
        for j in range(left, right + 1):
            s[top, j], k = k, k + 1
        for i in range(top + 1, bottom + 1):
            s[i, right], k = k, k + 1
        if top < bottom:
            for j in range(right - 1, left - 1, -1):
                s[bottom, j], k = k, k + 1
        if left < right:
            for i in range(bottom - 1, top, -1):
                s[i, left], k = k, k + 1
        top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
    return s


def published_removal_order(H: int, W: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The greedy walk of dfmX-augmentation (Compute_DFM_CIFAR.py with DFMs/removal_order.pkl).

    That file ranks the 32 x 32 shifted spectrum: a clockwise spiral from the top-left
    corner inwards on the left half (columns < n/2), the mirrored value (of the conjugate
    partner) on the right half, 0 on the right part of the first (Nyquist) row. The walk
    removes the highest value first; entries sharing a value go together (conjugate pairs);
    the v = 0 and Nyquist columns and the first row's left part are single entries whose
    partner is walked separately (the published filter then takes the real part, i.e. half
    of the pair); 0 entries are removed from the start and never tested. Built here for any
    even square grid (it equals the released file at 32 x 32).

    Returns (groups in walk order, each (g, 2) int64 (u, v) on the unshifted grid;
    always-removed (r, 2)).
    """
    if H != W or H % 2:
        raise ValueError(f"greedy_order 'published' is defined for square images with an even side (the released "
                         f"order is for 32 x 32), got {H} x {W}")
    n, h = H, H // 2
    spiral = _spiral(n)
    value = spiral.clone()
    i = torch.arange(n)[:, None].expand(n, n)
    j = torch.arange(n)[None, :].expand(n, n)
    right = j >= h
    value[right] = spiral[(n - i[right]) % n, (n - j[right]) % n]
    value[0, h + 1:] = 0
    unshift = lambda rows, cols: torch.stack([(rows + h) % n, (cols + h) % n], dim=1)  # noqa: E731
    groups = []
    for v in torch.unique(value[value > 0]).flip(0).tolist():
        rows, cols = (value == v).nonzero(as_tuple=True)
        groups.append(unshift(rows, cols))
    rows, cols = (value == 0).nonzero(as_tuple=True)
    return groups, unshift(rows, cols)


class GreedyRule:
    """Whether a tentative removal is kept: the class's correct count after it must be at
    least reference - tolerance. reference "last" (published): the count after the last
    kept removal (the original count before any), so the total drop is not bounded by the
    tolerance; "base" (ours): always the original count."""

    def __init__(self, base_correct: int, tolerance: int, reference: str = "last"):
        if reference not in GREEDY_REFERENCES:
            raise ValueError(f"greedy_reference must be one of {GREEDY_REFERENCES}, got {reference!r}")
        self.reference, self.tolerance, self.count = reference, tolerance, int(base_correct)

    def accepts(self, hits: torch.Tensor) -> torch.Tensor:
        return self.count - hits <= self.tolerance

    def keep(self, hits: int) -> None:
        if self.reference == "last":
            self.count = int(hits)


def greedy_walk(n_groups: int, trial_hits: Callable[[list[int]], torch.Tensor], commit: Callable[[int], None],
                rule: GreedyRule, *, max_speculation: int = 64,
                progress: Callable[[int], None] | None = None) -> tuple[list[int], int]:
    """Walk groups 0..n_groups-1 in order; returns (kept removals, evaluations).

    trial_hits(idx): correct counts with each group of idx removed on top of every kept
    removal so far; commit(k): keep the removal of idx[k] of the last trial_hits call.
    Batched speculatively but exact: the next m groups are tried against the current state
    at once; decisions are taken in order up to the first kept removal (which changes the
    state and, for reference "last", the reference), and m adapts to the run of rejections.
    """
    removed, i, m, evaluations = [], 0, 8, 0
    while i < n_groups:
        idx = list(range(i, min(i + m, n_groups)))
        hits = trial_hits(idx).cpu()
        evaluations += len(idx)
        accepted = rule.accepts(hits).nonzero().flatten()
        if len(accepted):
            k = int(accepted[0])
            commit(k)
            rule.keep(int(hits[k]))
            removed.append(idx[k])
            step, m = k + 1, max(1, min(max_speculation, 2 * (k + 1)))
        else:
            step, m = len(idx), min(max_speculation, 2 * m)
        i += step
        if progress is not None:
            progress(step)
    return removed, evaluations


@torch.inference_mode()
def greedy_dfm(model: nn.Module, images: torch.Tensor, label: int, *, tolerance: int = 6, reference: str = "last",
               order: str = "ours", batch_size: int = 512, backend: str = "auto", precision: str = "auto",
               amp: bool = False, max_speculation: int = 64,
               progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """The greedy DFM (H, W) bool: the frequencies whose removal was never kept (GreedyRule).

    order "ours": conjugate pairs from DC outwards (freq.conjugate_pairs), removed by rank-one
    updates of the current images. order "published": published_removal_order; the kept
    spectrum is the binary published mask, applied as the real part of the masked inverse
    FFT (a lone entry of a pair counts half), so that DFM need not be conjugate-symmetric.
    Images are filtered as given (centre them with `centred` first).
    """
    if order not in GREEDY_ORDERS:
        raise ValueError(f"greedy_order must be one of {GREEDY_ORDERS}, got {order!r}")
    model.eval()
    H, W = images.shape[-2:]
    _, base = _forward_stats(model, images[None], label, batch_size, amp)
    rule = GreedyRule(int(base[0]), tolerance, reference)
    images = images.float()
    kept = torch.ones(H, W, dtype=torch.bool)
    state = {"current": images, "variants": None, "idx": None}
    if order == "ours":
        pairs = freq.conjugate_pairs(H, W)
        groups = [pairs[k:k + 1] for k in range(len(pairs))]
        masks = lambda idx: freq.pair_masks(H, W, pairs[idx])  # noqa: E731
        always = torch.zeros(0, 2, dtype=torch.long)

        def trial_hits(idx):
            state["idx"] = idx
            state["variants"] = remove_frequencies(state["current"], pairs[idx].to(images.device), backend=backend,
                                                   allow_nonfinite=True)
            return _forward_stats(model, state["variants"], label, batch_size, amp)[1]
    else:
        groups, always = published_removal_order(H, W)
        kept[always[:, 0], always[:, 1]] = False

        def masks(idx):
            out = torch.zeros(len(idx), H, W, dtype=torch.bool)
            for r, g in enumerate(idx):
                out[r, groups[g][:, 0], groups[g][:, 1]] = True
            return out

        def trial_hits(idx):
            state["idx"] = idx
            weights = _real_part_weights(kept[None] & ~masks(idx))
            state["variants"] = band_filter(images, weights, "pass", backend=backend, precision=precision,
                                            allow_nonfinite=True)
            return _forward_stats(model, state["variants"], label, batch_size, amp)[1]

    def commit(k):
        kept.logical_and_(~masks(state["idx"][k:k + 1])[0])
        state["current"] = state["variants"][k]

    _, evaluations = greedy_walk(len(groups), trial_hits, commit, rule, max_speculation=max_speculation,
                                 progress=progress)
    if order == "ours":
        final_images = state["current"]
    else:
        final_images = band_filter(images, _real_part_weights(kept[None]), "pass", backend=backend,
                                   precision=precision, allow_nonfinite=True)[0]
    _, final = _forward_stats(model, final_images[None], label, batch_size, amp)
    return kept, {"base_correct": int(base[0]), "final_correct": int(final[0]), "evaluations": evaluations,
                  "groups": len(groups), "always_removed": len(always), "reference": reference, "order": order}


def _real_part_weights(masks: torch.Tensor) -> torch.Tensor:
    """Spectrum weights equal to masking with a binary (possibly asymmetric) mask and taking
    the real part of the inverse FFT: for a real image Re(ifft(F m)) = ifft(F (m + m~) / 2),
    m~ the conjugate mirror, so a frequency kept without its partner weighs 1/2."""
    m = masks.float()
    return 0.5 * (m + freq.mirror(m))


def gradient_scores(model: nn.Module, images: torch.Tensor, label: int, candidates: Candidates, *,
                    batch_size: int = 512) -> torch.Tensor:
    """First-order estimate of each candidate's increase of the summed class loss when removed.

    With g = dL/dx and spectra G, X: removing the frequencies P changes the loss by about
    -<g, x_P> = -(1/HW) sum_{f in P} Re(conj(G(f)) X(f)), for every candidate from one
    backward pass and two FFTs.
    """
    model.eval()
    H, W = images.shape[-2:]
    density = torch.zeros(H, W, dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].float().detach().requires_grad_(True)
        target = torch.full((x.shape[0],), label, device=x.device, dtype=torch.long)
        loss = F.cross_entropy(model(x).float(), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        contribution = (torch.fft.fft2(g.double()).conj() * torch.fft.fft2(x.detach().double())).real
        density += contribution.sum(dim=(0, 1)) / (H * W)
    masks = candidates.masks.to(images.device, torch.float64)
    return -(masks.flatten(1) @ density.flatten()).cpu().float() / images.shape[0]


# ---------------------------------------------------------------------------------------
# Tables


@torch.inference_mode()
def predict_filtered(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, mode: str, *,
                     batch_size: int = 512, max_bytes: int = 256 << 20, backend: str = "auto",
                     precision: str = "auto", amp: bool = False) -> torch.Tensor:
    """Predictions (K, N) of the model on every image filtered by every mask."""
    model.eval()
    preds = torch.empty(masks.shape[0], images.shape[0], dtype=torch.long)
    for chunk in band_filter_chunks(images, masks, mode, max_bytes=max_bytes, backend=backend, precision=precision):
        k, n = chunk.images.shape[:2]
        flat = chunk.images.reshape(k * n, *chunk.images.shape[2:])
        out = []
        for start in range(0, flat.shape[0], batch_size):
            with torch.autocast(flat.device.type, dtype=torch.bfloat16, enabled=amp):
                out.append(model(flat[start:start + batch_size]).argmax(1))
        preds[chunk.k_slice, chunk.b_slice] = torch.cat(out).view(k, n).cpu()
    return preds


def shortcut_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, dfms: torch.Tensor,
                   classes: Sequence[int] | None = None, *, centre: InputCentre | None = None, **kwargs) -> list[dict]:
    """TPR_c and FPR_c of every class's DFM over ALL images (docs/experiments.md#frequency-shortcuts),
    filtered around `centre`.

    dfms[i] is the DFM of class classes[i] (default: class i), so a subset such as
    classes=[3] scores DFM 0 as class 3's. A DFM that is not conjugate-symmetric (the
    published greedy order) filters as the published code does: real part of the inverse FFT.
    """
    classes = list(range(dfms.shape[0])) if classes is None else [int(c) for c in classes]
    if len(classes) != dfms.shape[0]:
        raise ValueError(f"classes must name one class per DFM: {len(classes)} classes for {dfms.shape[0]} DFMs")
    model, images = centred(model, images, centre)
    preds = predict_filtered(model, images, _real_part_weights(dfms), "pass", **kwargs)
    labels = labels.cpu()
    rows = []
    for i, c in enumerate(classes):
        is_c = labels == c
        positives, negatives = int(is_c.sum()), int((~is_c).sum())
        tp = int((preds[i][is_c] == c).sum())
        fp = int((preds[i][~is_c] == c).sum())
        rows.append({"class": c, "dfm_size": int(dfms[i].sum()),
                     "tpr": tp / positives if positives else float("nan"),
                     "fpr": fp / negatives if negatives else float("nan"),
                     "positives": positives, "negatives": negatives})
    return rows


def band_stop_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    n_bands: int = 4, *, centre: InputCentre | None = None, **kwargs) -> dict:
    """Delta[c][b] = (correct with band b removed - correct originally) / N_c * 100, bands
    removed around `centre`."""
    model, images = centred(model, images, centre)
    H, W = images.shape[-2:]
    masks = freq.band_masks(H, W, n_bands)
    stopped = predict_filtered(model, images, masks, "stop", **kwargs)
    original = predict_filtered(model, images, torch.ones(1, H, W, dtype=torch.bool), "pass", **kwargs)[0]
    labels = labels.cpu()
    delta = []
    for c in range(num_classes):
        is_c = labels == c
        n_c = max(int(is_c.sum()), 1)
        base = int((original[is_c] == c).sum())
        delta.append([(int((stopped[b][is_c] == c).sum()) - base) / n_c * 100 for b in range(n_bands)])
    band_accuracy = [float((stopped[b] == labels).float().mean()) for b in range(n_bands)]
    return {"delta": delta, "accuracy_band_stopped": band_accuracy,
            "accuracy": float((original == labels).float().mean())}


@torch.inference_mode()
def band_pass_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, n_bands: int = 4, *,
                       centre: InputCentre | None = None, **kwargs) -> list[float]:
    """Accuracy with only band b kept (around `centre`), for every band (what the model can
    read from each band)."""
    model, images = centred(model, images, centre)
    H, W = images.shape[-2:]
    preds = predict_filtered(model, images, freq.band_masks(H, W, n_bands), "pass", **kwargs)
    return [float((p == labels.cpu()).float().mean()) for p in preds]


# ---------------------------------------------------------------------------------------
# The experiment


@dataclass
class FreqProbeConfig:
    method: str = "loss"
    patch: int = 1
    top_percent: float = 5.0
    classes: list[int] | None = None
    tolerance: int = 6
    greedy_reference: str = "last"  # published; "base": ours (see GreedyRule)
    greedy_order: str = "ours"  # or "published" (published_removal_order)
    filter_centre: str = "dataset-mean"  # or "zero" (raw pixels); see input_centre
    adcs: str = "ours"  # or "published" (adcs_published)
    candidates: int | None = None  # gradient: how many top candidates to evaluate exactly
    verify_gradient: bool = False  # gradient: also run the exact ranking and report agreement
    max_images_per_class: int | None = None
    batch_size: int | None = None  # None: default_batch_size(device, model, one image)
    max_bytes: int | None = None  # variants materialized at once; None: default_max_bytes(device)
    backend: str = "auto"
    precision: str = "auto"  # of the filtering and spectrum kernels' products (ops.precision)
    amp: bool = False
    compile: str = "auto"  # torch.compile the loss search's inference copy: "auto" (should_compile), "on", "off"
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.patch, int) or self.patch < 1:
            raise ValueError(f"patch must be an int >= 1, got {self.patch!r}")
        if not 0 < self.top_percent <= 100:
            raise ValueError(f"top_percent must be in (0, 100], got {self.top_percent!r}")
        for name, allowed in (("greedy_reference", GREEDY_REFERENCES), ("greedy_order", GREEDY_ORDERS),
                              ("filter_centre", FILTER_CENTRES), ("adcs", ADCS_VARIANTS),
                              ("compile", COMPILE_CHOICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_precision(self.precision)
        if self.method == "greedy" and self.patch != 1:
            raise ValueError("method 'greedy' walks single frequency pairs: patch must be 1")

    def resolved(self, device, model: nn.Module | None = None, sample: torch.Tensor | None = None) -> "FreqProbeConfig":
        """A copy with the device-dependent defaults filled in (the CPU batch sized from
        `model` on `sample` when given: default_batch_size)."""
        return dataclasses.replace(self, batch_size=self.batch_size or default_batch_size(device, model, sample),
                                   max_bytes=self.max_bytes or default_max_bytes(device))


# On the CPU a forward batch is sized so that its largest activation holds about this many
# bytes: per image, full-width ResNet-18 (256 KiB in its largest activation) ran fastest
# at batch 32 and width 16 (64 KiB) at 32-128, both 1.4-2x faster than at batch 512 (the
# activations stay in cache); 8 MiB gives them 32 and 128.
CPU_ACTIVATION_BYTES = 8 << 20


def activation_bytes(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes per image of the largest output of any leaf module in one forward of `sample`
    (0 when no leaf module returns a tensor)."""
    largest = [0]

    def hook(_module, _args, out):
        if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == sample.shape[0]:
            largest[0] = max(largest[0], out.numel() * out.element_size() // sample.shape[0])

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was = model.training
    try:
        with torch.inference_mode():
            model.eval()(sample)  # eval: a BatchNorm in training mode would update its statistics
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return largest[0]


def default_batch_size(device, model: nn.Module | None = None, sample: torch.Tensor | None = None) -> int:
    """Forward batch of the search. GPUs: 1024. CPU: 128 without a model, else the power of
    two (8..1024) whose largest activation (activation_bytes of `sample`, one image) stays
    within CPU_ACTIVATION_BYTES."""
    if torch.device(device).type == "cuda":
        return 1024
    if model is None or sample is None:
        return 128
    per_image = activation_bytes(model, sample[:1])
    if per_image <= 0:
        return 128
    return 1 << min(10, max(3, (CPU_ACTIVATION_BYTES // per_image).bit_length() - 1))


def default_max_bytes(device) -> int:
    return (1 << 30) if torch.device(device).type == "cuda" else (32 << 20)


@dataclass
class ClassDFM:
    label: int
    images: int
    method: str
    dfm: list[list[int]]  # kept (u, v) frequencies on the unshifted grid
    dfm_size: int
    scores: list[float] | None = None  # per candidate (loss / gradient estimate)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class FreqProbeResult(ApiResult):
    """What run_freq_probe / run return; summary() and write(folder) as in the module's `run`."""

    config: dict
    image_shape: tuple
    num_classes: int
    test_accuracy: float
    adcs: list  # (K, H, W) ints, unshifted grid
    classes: list[ClassDFM]
    shortcut: list[dict]
    band_stop: dict | None = None
    ood: dict | None = None
    learning: dict | None = None  # BandLearningTracker.summary() when the model was trained here
    seconds: float = 0.0
    released_dfm_sizes: list[int] | None = None  # the published DFM sizes of this dataset, to compare with

    _command = "freq-probe"

    def _summary(self, data: str, out: Path | None) -> str:
        return summary(self, data, out)

    def _write(self, out: Path, record: dict) -> None:
        from shortcut_fast.report import write_json

        write_json({**record, "result": self}, out / "result.json")
        write_figures(self, out)


# The sizes of the released CIFAR-10 DFMs of classes 0..9 (nis-research/dfmX-augmentation DFMs/resnet18.pkl:
# the published greedy rule and spiral order on 1,000 test images per class).
RELEASED_CIFAR10_DFM_SIZES = (459, 561, 368, 395, 112, 410, 158, 468, 202, 413)

# DFM search defaults: the paper's on CIFAR-10 under the paper recipe, ours elsewhere.
PAPER_PROBE = dict(method="greedy", patch=1, greedy_reference="last", greedy_order="published",
                   max_images_per_class=None)
OUR_PROBE = dict(method="loss", patch=2, greedy_reference="last", greedy_order="ours", max_images_per_class=100)


def released_dfm_sizes(dataset: str) -> list[int] | None:
    """The published DFM sizes for `dataset` (CIFAR-10 only), else None."""
    return list(RELEASED_CIFAR10_DFM_SIZES) if str(dataset).strip().lower() == "cifar10" else None


def probe_defaults(dataset: str, recipe: str, **given) -> tuple[dict, str | None]:
    """The DFM search settings (method, patch, greedy_reference, greedy_order,
    max_images_per_class) for `dataset` under the training recipe `recipe`: on CIFAR-10 under
    `paper`, the published search (greedy rule over single frequency pairs, reference "last",
    the published spiral order, every test image of a class); elsewhere ours (loss method on
    2x2 patches, 100 images per class). `given`: options set explicitly (None: not given;
    max_images_per_class 0: all images); they win. Returns (settings, a line for the terminal
    or None)."""
    paper = str(dataset).strip().lower() == "cifar10" and recipe == "paper"
    settings = dict(PAPER_PROBE if paper else OUR_PROBE)
    note = None
    if paper and given.get("method") is None and given.get("patch") not in (None, 1):
        settings["method"] = "loss"  # the published greedy rule walks single pairs only
        note = f"--patch {given['patch']}: the loss method (the published greedy rule walks single frequency pairs)"
    for key, value in given.items():
        if key not in settings:
            raise TypeError(f"probe_defaults: unknown option {key!r}")
        if value is not None:
            settings[key] = value
    if settings["max_images_per_class"] == 0:
        settings["max_images_per_class"] = None
    if paper and note is None:
        defaults = [k for k in PAPER_PROBE if given.get(k) is None]
        if defaults:
            note = ("cifar10, paper recipe: the published DFM search by default ("
                    + ", ".join(f"{k.replace('_', '-')} {settings[k] if settings[k] is not None else 'all'}"
                                for k in defaults) + "); explicit options override")
    return settings, note


def _class_images(dataset, label: int, limit: int | None, seed: int, device) -> torch.Tensor:
    index = (dataset.labels.cpu() == label).nonzero().flatten()
    if limit is not None and index.numel() > limit:
        g = torch.Generator().manual_seed(seed * 7919 + label)
        index = index[torch.randperm(index.numel(), generator=g)[:limit]].sort().values
    x, _, _ = dataset.get_batch(index, device=device)  # in-memory or file-backed: uint8 travels, not float
    return x


def _all_images(dataset, device):
    x, y, _ = dataset.get_batch(torch.arange(len(dataset)), device=device)
    return x, y


def class_spectra(dataset, num_classes: int, *, backend: str = "auto", precision: str = "auto",
                  batch_size: int = 512, device="cpu", progress: bool = False, centre: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> ClassSpectrum:
    """One streaming pass over `dataset`: the per-class mean |FFT| accumulator of
    (x - centre) / scale (per channel; None: 0 and 1)."""
    acc = ClassSpectrum(num_classes, backend=backend, precision=precision)
    bar = progress_ticker(len(dataset), "class spectra", progress)
    for start in range(0, len(dataset), batch_size):
        x, y, _ = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))), device=device)
        if centre is not None:
            x = x - centre.to(x.device).view(1, -1, 1, 1)
        if scale is not None:
            x = x / scale.to(x.device).view(1, -1, 1, 1)
        acc.update(x, y)
        bar(len(y))
    bar(None)
    return acc


def adcs_published(class_sums: torch.Tensor) -> torch.Tensor:
    """The ADCS of the published code (nn-frequency-shortcuts, Evaluation/compute_ADCS.py).

    class_sums: (K, C, H, W) SUMS of |FFT| over each class's images (C = 3: RGB, weighted
    LUMINANCE after differencing; C = 1: that channel). For every class c and every j,
    INCLUDING j = c: +1 where the weighted S_c - S_j > 0, else -1 (ties count -1). The j = c
    term and the ties are the published bug: every map is shifted by -1 relative to
    sum over j != c of sign(...), values in [-K, K - 2]. Returns int64 (K, H, W).
    """
    if class_sums.dim() != 4:
        raise ValueError(f"class_sums must have shape (K, C, H, W), got {tuple(class_sums.shape)}")
    C = class_sums.shape[1]
    if C == 3:
        weights = torch.tensor(LUMINANCE, dtype=class_sums.dtype, device=class_sums.device)
    elif C == 1:
        weights = torch.ones(1, dtype=class_sums.dtype, device=class_sums.device)
    else:
        raise ValueError(f"class_sums must have 3 (RGB) or 1 channel(s) for the luminance weighting, got {C}")
    gray = torch.einsum("kchw,c->khw", class_sums, weights)  # weighting commutes with the difference
    diff = gray[:, None] - gray[None, :]
    return torch.where(diff > 0, 1, -1).sum(dim=1).to(torch.int64)


def compute_adcs(dataset, num_classes: int, *, backend: str = "auto", precision: str = "auto",
                 batch_size: int = 512, device="cpu", variant: str = "ours",
                 centre: InputCentre | None = None) -> torch.Tensor:
    """ADCS maps of a dataset around `centre`.

    "ours": spectra of x - mu, class means, channels averaged (ops.adcs); a class without
    images scores 0 against the others. "published": spectra of the normalized input
    (x - mu) / std as the published code takes them (std of the centre; none for a zero
    centre), class sums, adcs_published.
    """
    if variant not in ADCS_VARIANTS:
        raise ValueError(f"adcs must be one of {ADCS_VARIANTS}, got {variant!r}")
    mu = None if centre is None or centre.is_zero() else torch.tensor(centre.mean)
    scale = torch.tensor(centre.std) if variant == "published" and centre is not None and centre.std else None
    acc = class_spectra(dataset, num_classes, backend=backend, precision=precision, batch_size=batch_size,
                        device=device, centre=mu, scale=scale)
    if variant == "published":
        return adcs_published(acc.sums)
    return adcs(acc.mean().nan_to_num(0.0))


def _split_losses(model: nn.Module, images: torch.Tensor, label: int, candidates: Candidates,
                  index: torch.Tensor | None, dist: DistContext | None, **kw):
    """candidate_losses over `index` (default all), its entries split over the ranks of `dist`
    in contiguous shares and the (losses, correct) gathered back in index order on every rank.
    One process: candidate_losses itself."""
    if dist is None or dist.world_size == 1:
        return candidate_losses(model, images, label, candidates, index, **kw)
    index = torch.arange(len(candidates)) if index is None else index
    mine = shard(len(index), dist, f"the candidates of class {label}")
    part = candidate_losses(model, images, label, candidates, index[mine.start:mine.stop], **kw)
    parts = gather(part, dist)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def class_dfm(model: nn.Module, images: torch.Tensor, label: int, cfg: FreqProbeConfig, *,
              store: Store | None = None, progress=None, centre: InputCentre | None = None,
              dist: DistContext | None = None, progress_file: str | None = None) -> ClassDFM:
    """One class's DFM by cfg.method, filtering around `centre` (None: the images as given;
    run_freq_probe passes the centre of cfg.filter_centre). The loss method saves its progress
    within the class in `store` and, when the run is resuming, continues from it.

    dist (world_size > 1): the candidates of this class are split over the ranks (loss and
    gradient methods; every rank must call this for the same class) and the scores gathered;
    each rank's progress file carries its rank suffix. The greedy method ignores dist (its
    walk is sequential: run_freq_probe splits classes instead). progress_file: the store name
    of the loss method's progress (default class_<label>.loss-progress<rank suffix>.json)."""
    t0 = time.perf_counter()
    cfg = cfg.resolved(images.device, model, images[:1])
    model, images = centred(model, images, centre)
    H, W = images.shape[-2:]
    common = dict(batch_size=cfg.batch_size, backend=cfg.backend, precision=cfg.precision, amp=cfg.amp)
    if cfg.method == "greedy":
        keep, details = greedy_dfm(model, images, label, tolerance=cfg.tolerance, reference=cfg.greedy_reference,
                                   order=cfg.greedy_order, progress=progress, **common)
        return ClassDFM(label, images.shape[0], "greedy", keep.nonzero().tolist(), int(keep.sum()), None, details,
                        time.perf_counter() - t0)

    candidates = Candidates.build(H, W, cfg.patch)
    exact_kw = dict(common, max_bytes=cfg.max_bytes, compile=cfg.compile)  # candidate_losses' settings
    details: dict = {"candidates": len(candidates), "patch": cfg.patch}
    if cfg.method == "loss":
        mine = shard(len(candidates), dist, f"the candidates of class {label}")
        resume_from = None
        progress_file = progress_file or f"class_{label}.loss-progress{rank_suffix(dist)}.json"
        saved = store.load_json(progress_file) if store is not None else None
        if saved is not None and saved.get("range", [mine.start, mine.stop]) == [mine.start, mine.stop]:
            # resume a class cut short (a share saved under another world size is not reused)
            resume_from = (torch.tensor([float("nan") if v is None else v for v in saved["losses"]]),
                           torch.tensor(saved["correct"], dtype=torch.long))
            if progress is not None:
                progress(int((resume_from[1] >= 0).sum()))
        last_save = [0.0]
        share = {} if dist is None or dist.world_size == 1 else {"range": [mine.start, mine.stop]}

        def save(losses, correct):  # at most every few seconds: progress within a long class
            if store is not None and time.perf_counter() - last_save[0] > 5:
                store.save_json(progress_file, {"label": label, **share, "losses": losses, "correct": correct})
                last_save[0] = time.perf_counter()

        index = None if not share else torch.arange(mine.start, mine.stop)
        losses, correct = candidate_losses(model, images, label, candidates, index, progress=progress,
                                           checkpoint=save, resume_from=resume_from, **exact_kw)
        if share:  # every rank's share, in candidate order
            parts = gather((losses, correct), dist)
            losses, correct = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        scores = losses
        details["correct_after_removal"] = correct.tolist()
    else:  # gradient pre-ranking, exact re-evaluation of the top candidates
        estimate = gradient_scores(model, images, label, candidates, batch_size=cfg.batch_size)
        estimate = broadcast(estimate, dist)  # one ranking on every rank (GPU sums need not agree bitwise)
        per_candidate = float(candidates.masks.flatten(1).sum(1).float().mean())
        needed = math.ceil(H * W * cfg.top_percent / 100 / per_candidate)
        n_exact = min(len(candidates), cfg.candidates or max(16, 3 * needed))
        top = torch.argsort(estimate, descending=True)[:n_exact]
        exact, _ = _split_losses(model, images, label, candidates, top, dist, progress=progress, **exact_kw)
        # Exactly evaluated candidates rank first (by exact loss), the rest by their estimate.
        scores = torch.full((len(candidates),), -math.inf)
        scores[top] = exact
        rest = torch.ones(len(candidates), dtype=torch.bool)
        rest[top] = False
        scores[rest] = estimate[rest] - estimate.abs().max() - exact.abs().max() - 1  # below every exact one
        details.update(exact_evaluations=n_exact, estimate=estimate.tolist(),
                       spearman_estimate_vs_exact_on_evaluated=spearman(estimate[top], exact))
        if cfg.verify_gradient:
            full, _ = _split_losses(model, images, label, candidates, None, dist, **exact_kw)
            exact_dfm = dfm_from_scores(full, candidates, cfg.top_percent)
            fast_dfm = dfm_from_scores(scores, candidates, cfg.top_percent)
            details.update(spearman_estimate_vs_exact_all=spearman(estimate, full),
                           dfm_jaccard_vs_exact=float((exact_dfm & fast_dfm).sum() / (exact_dfm | fast_dfm).sum()))
    keep = dfm_from_scores(scores, candidates, cfg.top_percent)
    return ClassDFM(label, images.shape[0], cfg.method, keep.nonzero().tolist(), int(keep.sum()),
                    [float(s) for s in scores], details, time.perf_counter() - t0)


def _dfm_mask(entry: ClassDFM, H: int, W: int) -> torch.Tensor:
    mask = torch.zeros(H, W, dtype=torch.bool)
    if entry.dfm:
        idx = torch.tensor(entry.dfm)
        mask[idx[:, 0], idx[:, 1]] = True
    return mask


def run_freq_probe(model: nn.Module, splits, cfg: FreqProbeConfig, *, store: Store | None = None,
                   device="cpu", ood_sets: dict | None = None, band_table: bool = False,
                   progress: bool = True, centre: InputCentre | None = None,
                   dist: DistContext | None = None) -> FreqProbeResult:
    """ADCS, DFMs, the TPR/FPR table, the band-stop table and OOD transfer for a frozen model.

    Every filter acts around `centre` (default: input_centre(cfg.filter_centre, model,
    splits.train)); it is recorded in the result's config. With a store (e.g. `run.partial` of a RunFolder), each finished class is saved as
    class_<c>.json (and the loss method's progress within a class); a resuming run picks
    them up instead of redoing them.

    dist (a distributed.DistContext with world_size > 1, under torchrun): the DFM search is
    split over the ranks (classes, or the candidates of each class when there are fewer
    classes than ranks; module docstring), the settings are compared across ranks first, the
    store files carry the rank suffix (class_<c>.rank<r>.json), and every rank returns the
    same result (rank 0's, broadcast). A world size larger than the work is refused.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    distributed = dist is not None and dist.world_size > 1
    if distributed:
        check_same({"config": dataclasses.asdict(cfg), "device": device.type, "band_table": band_table,
                    "ood_sets": sorted(ood_sets or {}),
                    "centre": None if centre is None else dataclasses.asdict(centre),
                    "image_shape": list(splits.image_shape), "test_size": len(splits.test)}, dist,
                   "freq-probe settings")
    main = is_main(dist)
    progress = progress and main
    model = model.to(device).eval()
    cfg = cfg.resolved(device, model, torch.zeros(1, *splits.image_shape, device=device))
    test = splits.test
    H, W = splits.image_shape[-2:]
    num_classes = splits.num_classes
    classes = list(range(num_classes)) if cfg.classes is None else list(cfg.classes)
    for c in classes:
        if not 0 <= c < num_classes:
            raise ValueError(f"classes must lie in [0, {num_classes}), got {c}")
    kw = dict(batch_size=cfg.batch_size, max_bytes=cfg.max_bytes, backend=cfg.backend, precision=cfg.precision,
              amp=cfg.amp)
    # Classes over ranks when there are enough of them (always for greedy: its walk is
    # sequential), else the candidates of every class over ranks (class_dfm with dist).
    by_class = not distributed or cfg.method == "greedy" or len(classes) >= dist.world_size
    what = (f"the classes of the DFM search (method {cfg.method!r} splits classes only)" if cfg.method == "greedy"
            else "the classes of the DFM search")
    mine = shard(len(classes), dist, what) if by_class else range(len(classes))
    if centre is None:
        centre = input_centre(cfg.filter_centre, model, splits.train, channels=splits.image_shape[0], device=device)
    if main:
        x_test, y_test = _all_images(test, device)
        with torch.inference_mode():
            test_accuracy = float((predict_filtered(model, x_test, torch.ones(1, H, W, dtype=torch.bool), "pass",
                                                    **kw)[0] == y_test.cpu()).float().mean())
        adcs_map = compute_adcs(test, num_classes, backend=cfg.backend, precision=cfg.precision, device=device,
                                variant=cfg.adcs, centre=centre)

    suffix = rank_suffix(dist)
    entries: list[ClassDFM] = []
    for c in (classes[i] for i in mine):
        done = store.load_json(f"class_{c}{suffix}.json") if store is not None else None
        if not by_class:  # a class every rank works on: finished when any rank saved it
            saved = [d for d in gather(done, dist) if d is not None]
            done = saved[0] if saved else None
        if done is not None:
            entries.append(ClassDFM(**done))
            continue
        images = _class_images(test, c, cfg.max_images_per_class, cfg.seed, device)
        if images.shape[0] == 0:
            raise ValueError(f"class {c} has no test images")
        if cfg.method == "greedy" and cfg.greedy_order == "published":
            total = len(published_removal_order(H, W)[0])
        elif cfg.method == "greedy" or cfg.patch == 1:
            total = len(freq.conjugate_pairs(H, W))
        else:
            total = len(Candidates.build(H, W, cfg.patch))
        if not by_class and cfg.method == "loss":
            total = len(shard(total, dist, f"the candidates of class {c}"))  # rank 0's share
        tick = progress_ticker(total, f"class {c} ({cfg.method})", progress)
        progress_file = f"class_{c}.loss-progress{suffix}.json"
        entry = class_dfm(model, images, c, cfg, store=store, progress=tick, centre=centre,
                          dist=None if by_class else dist, progress_file=progress_file)
        tick(None)
        if store is not None:
            store.save_json(f"class_{c}{suffix}.json", entry)
            store.discard(progress_file)
        entries.append(entry)
    if distributed and by_class:  # every rank's classes, in rank order = class order
        entries = [e for part in gather(entries, dist) for e in part]
    if not main:  # rank 0 computes the tables and hands every rank the whole result
        return broadcast(None, dist)

    dfms = torch.stack([_dfm_mask(e, H, W) for e in entries]) if entries else None
    table = []
    if dfms is not None:
        table = shortcut_table(model, x_test, y_test, dfms, [e.label for e in entries], centre=centre, **kw)
    band = band_stop_table(model, x_test, y_test, num_classes, centre=centre, **kw) if band_table else None
    ood = None
    if ood_sets and dfms is not None:
        ood = {}
        for name, dataset in ood_sets.items():
            xo, yo = _all_images(dataset, device)
            ood[name] = shortcut_table(model, xo, yo, dfms, [e.label for e in entries], centre=centre, **kw)
    result = FreqProbeResult(
        config={**cfg.__dict__, "centre": dataclasses.asdict(centre)}, image_shape=tuple(splits.image_shape), num_classes=num_classes,
        test_accuracy=test_accuracy, adcs=adcs_map.tolist(), classes=entries, shortcut=table, band_stop=band,
        ood=ood, seconds=time.perf_counter() - t0)
    return broadcast(result, dist) if distributed else result


# ---------------------------------------------------------------------------------------
# Figures and the terminal summary


def write_figures(result: FreqProbeResult, out: Path) -> None:
    """ADCS maps, DFMs, TPR/FPR bars, the band-stop heat map and the band learning curves."""
    from shortcut_fast.ops.freq import shifted
    from shortcut_fast.report import plot_bars, plot_curves, plot_heatmap, plot_maps

    H, W = result.image_shape[-2:]
    names = [f"class {e.label}" for e in result.classes]
    scores = torch.tensor(result.adcs)
    plot_maps([shifted(s.float()) for s in scores], [f"class {c}" for c in range(result.num_classes)],
              out / "adcs.png", suptitle="ADCS (centred spectrum)", cmap="RdBu_r", symmetric=True)
    dfms = []
    for e in result.classes:
        m = torch.zeros(H, W)
        if e.dfm:
            idx = torch.tensor(e.dfm)
            m[idx[:, 0], idx[:, 1]] = 1
        dfms.append(shifted(m))
    if dfms:
        plot_maps(dfms, names, out / "dfm.png", suptitle=f"DFMs ({result.config['method']}, centred)",
                  cmap="gray_r")
    labels = [str(row["class"]) for row in result.shortcut]
    if labels:
        plot_bars({"TPR": [r["tpr"] for r in result.shortcut], "FPR": [r["fpr"] for r in result.shortcut]},
                  labels, out / "tpr_fpr.png", ylabel="rate", title="DFM-filtered test set", ylim=(0, 1))
    if result.band_stop:
        plot_heatmap(result.band_stop["delta"], [f"class {c}" for c in range(result.num_classes)],
                     [f"B{b + 1}" for b in range(len(result.band_stop["delta"][0]))], out / "band_stop.png",
                     title="band-stop: change in correct predictions (%)", colorbar_label="Delta %")
    if result.learning and result.learning.get("steps"):
        acc = result.learning["band_pass_accuracy"]
        curves = {f"B{b + 1} only": [a[b] for a in acc] for b in range(len(acc[0]))}
        for b in range(len(acc[0]) if result.learning.get("band_stop_accuracy") else 0):
            curves[f"B{b + 1} removed"] = [a[b] for a in result.learning["band_stop_accuracy"]]
        curves["clean"] = result.learning["clean_accuracy"]
        plot_curves(curves, out / "learning_order.png", x=result.learning["steps"], xlabel="training step",
                    ylabel="val accuracy", title="band-pass (B only) and band-stop (B removed)")


def summary(result: FreqProbeResult, data: str, out: Path | None = None) -> str:
    """The terminal report: DFM sizes with TPR/FPR, band-stop, learning order, OOD (and, with
    `out`, where result.json was written)."""
    from shortcut_fast.report import format_table

    lines = []
    lines.append(f"\nfreq-probe on {data}: test accuracy {result.test_accuracy:.4f}, method {result.config['method']}, "
               f"{result.seconds:.1f} s")
    centre = result.config.get("centre")
    if centre:
        lines.append(f"filters around mu = [{', '.join(f'{m:.3f}' for m in centre['mean'])}] ({centre['source']}); "
                     f"ADCS {result.config.get('adcs', 'ours')}")
    released = result.released_dfm_sizes
    if result.shortcut and released:
        rows = [[r["class"], r["dfm_size"], released[r["class"]] if r["class"] < len(released) else "-", r["tpr"],
                 r["fpr"]] for r in result.shortcut]
        lines.append(format_table(rows, ["class", "DFM size", "released DFM size", "TPR", "FPR"]))
        lines.append("released DFM size: the published CIFAR-10 DFMs (greedy rule, spiral order, 1,000 test images "
                     "per class, their own ResNet-18), for comparison")
    elif result.shortcut:
        rows = [[r["class"], r["dfm_size"], r["tpr"], r["fpr"]] for r in result.shortcut]
        lines.append(format_table(rows, ["class", "DFM size", "TPR", "FPR"]))
    if result.band_stop:
        n_bands = len(result.band_stop["delta"][0])
        lines.append("\nband-stop Delta (% of class images, change in correct predictions):")
        rows = [[c] + row for c, row in enumerate(result.band_stop["delta"])]
        rows.append(["acc"] + [a * 100 for a in result.band_stop["accuracy_band_stopped"]])
        lines.append(format_table(rows, ["class"] + [f"stop B{b + 1}" for b in range(n_bands)]))
    if result.learning and result.learning.get("learned_first_band"):
        step = result.learning["first_step_above_threshold"]
        lines.append(f"\nlearned first (band-pass, ours): B{result.learning['learned_first_band']} "
                     f"(its band-pass accuracy leads at step {step})")
        if result.learning.get("learned_first_band_by_band_stop"):
            lines.append(f"learned first (band-stop, spec): B{result.learning['learned_first_band_by_band_stop']} "
                         f"(removing it costs the most at step {step})")
    for name, rows in (result.ood or {}).items():
        lines.append(f"\nOOD {name}:")
        lines.append(format_table([[r["class"], r["tpr"], r["fpr"]] for r in rows], ["class", "TPR", "FPR"]))
    if out is not None:
        lines.append(f"\nwrote {Path(out) / 'result.json'} and figures in {out}")
    return "\n".join(lines)


class BandLearningTracker:
    """Trainer step hook: every `every` steps, on a fixed evaluation set, the accuracy with
    only band b kept (band-pass, ours) and with band b removed (band-stop, the spec's
    measure), for each band, and the clean accuracy. At the first snapshot where the model
    clearly beats chance, the band learned first is the one whose band-pass accuracy leads,
    and by band-stop the one whose removal costs the most.

    centre: the InputCentre the bands are filtered around, or a function of the model that
    gives it (resolved at the first snapshot; e.g. input_centre for the model's normalization).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, every: int, *,
                 until: int | None = None, n_bands: int = 4,
                 centre: InputCentre | Callable[[nn.Module], InputCentre] | None = None, **kw):
        self.images, self.labels, self.every, self.n_bands, self.kw = images, labels, every, n_bands, kw
        self.until = until  # the early steps are what matters; later snapshots only cost time
        self.centre = centre
        self.chance = 1 / num_classes
        self.steps: list[int] = []
        self.band_pass: list[list[float]] = []
        self.band_stop: list[list[float]] = []
        self.clean: list[float] = []

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every or (self.until is not None and step > self.until):
            return
        if callable(self.centre) and not isinstance(self.centre, InputCentre):
            self.centre = self.centre(model)
        was_training = model.training
        net, images = centred(model, self.images, self.centre)
        H, W = images.shape[-2:]
        bands = freq.band_masks(H, W, self.n_bands)
        masks = torch.cat([bands, ~bands, torch.ones(1, H, W, dtype=torch.bool)])  # pass, stop, clean
        preds = predict_filtered(net, images, masks, "pass", **self.kw)
        accuracy = (preds == self.labels.cpu()).float().mean(1).tolist()
        model.train(was_training)
        n = self.n_bands
        self.steps.append(step)
        self.band_pass.append(accuracy[:n])
        self.band_stop.append(accuracy[n:2 * n])
        self.clean.append(accuracy[-1])

    def state_dict(self) -> dict:
        return {"steps": self.steps, "band_pass": self.band_pass, "band_stop": self.band_stop, "clean": self.clean}

    def load_state_dict(self, state: dict) -> None:
        if "band_stop" not in state:
            raise ValueError("the saved band learning snapshots have no band-stop accuracy (written by an older "
                             "version): start the run again with --overwrite")
        self.steps, self.clean = list(state["steps"]), list(state["clean"])
        self.band_pass, self.band_stop = list(state["band_pass"]), list(state["band_stop"])

    def summary(self) -> dict:
        threshold = self.chance + 0.25 * (1 - self.chance)
        first = next((i for i, acc in enumerate(self.clean) if acc >= threshold), None)
        by_pass = by_stop = None
        if first is not None:
            by_pass = int(torch.tensor(self.band_pass[first]).argmax()) + 1  # readable alone the best
            by_stop = int(torch.tensor(self.band_stop[first]).argmin()) + 1  # missed the most when removed
        return {"steps": self.steps, "band_pass_accuracy": self.band_pass, "band_stop_accuracy": self.band_stop,
                "clean_accuracy": self.clean, "threshold": threshold,
                "first_step_above_threshold": None if first is None else self.steps[first],
                "learned_first_band": by_pass, "learned_first_band_by_band_stop": by_stop}


# ---------------------------------------------------------------------------------------
# The Python API (docs/api.md): Config, Result, run

Config = FreqProbeConfig
Result = FreqProbeResult


def run(model: nn.Module, data, config: FreqProbeConfig | None = None, *, progress: bool = False,
        **kw) -> FreqProbeResult:
    """Probe a trained classifier for frequency shortcuts: ADCS, DFMs, TPR/FPR, band-stop.

    model: any nn.Module mapping (N, C, H, W) images to logits, already trained (it is only
    evaluated). data: anything shortcut_fast.data.as_splits accepts (a dataset name, a
    DatasetSplits, ...); the DFMs and tables are measured on its test split. config: a
    Config (default Config()). kw: run_freq_probe's own options (device, ood_sets, band_table
    (default True, as the command line), centre, store). Returns a Result: summary(),
    write(folder) (result.json and the figures, as the command line writes them).
    """
    from shortcut_fast.experiments import _api

    cfg, splits, name = _api.model_inputs(model, data, config, FreqProbeConfig, "freq_probe", kw)
    kw.setdefault("band_table", True)
    result = run_freq_probe(model, splits, cfg, progress=progress, **kw)
    if isinstance(data, str):
        result.released_dfm_sizes = released_dfm_sizes(data)
    _api.attach(result, "freq-probe", name, splits, model)
    return result
