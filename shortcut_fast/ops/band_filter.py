"""Batched spectral filtering: B images x K frequency masks -> K*B filtered images.

band_filter(x, masks)[k, b] = Re(ifft2(fft2(x[b]) * masks[k])) for "pass" (masks[k] kept),
and with 1 - masks[k] for "stop". Masks live on the unshifted fft2 grid (ops.freq) and must
be conjugate-symmetric so the result is a real image (or pass symmetrize=True).

remove_frequencies(x, freqs)[k, b] removes one conjugate pair {(u, v), (-u, -v)} from
x[b]; it equals band_filter(x, pair_masks(freqs), "stop") but is a rank-one update,
    x - (c / HW) Re(F(u, v) exp(2 pi i (u y / H + v x / W))),  c = 2 (1 if self-conjugate),
so kernels produce K variants without K inverse FFTs.

precision (shortcut_fast.ops.precision): the triton kernel of band_filter is a DFT written as
matmuls, whose products run at the precision asked for; "auto" is AUTO["band_filter"] on a
GPU, "ieee" elsewhere. remove_frequencies is elementwise (no products to round): it takes
the argument for symmetry and computes in float32 whatever its value. The other backends
are exact in their dtype (precision ignored).

band_filter_chunks / remove_frequencies_chunks yield the same results in pieces sized to a
memory budget, so a model can consume K*B variants without materializing all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from shortcut_fast.backends import compiled_op, define_op, dispatch, triton_kernel
from shortcut_fast.ops import freq
from shortcut_fast.ops._checks import FLOAT_DTYPES, check_finite, check_output_fits, check_tensor
from shortcut_fast.ops.precision import check_precision, ignores_precision, resolve

MODES = ("pass", "stop")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# References


# On the CPU the reference's inverse FFTs run over chunks of masks whose complex spectra hold
# about this many bytes: one (K, B, C, H, W) product falls out of cache, and ran slower than a
# plain loop of per-mask FFT round trips (B=128, 3x32x32, K=64); in chunks it runs about as
# fast as that loop or faster, with one forward FFT instead of K.
REFERENCE_CHUNK_BYTES = 4 << 20


def band_filter_reference(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ground truth: one FFT per image, one inverse FFT per (mask, image).

    weights: (K, H, W) real, applied to the spectrum as given (the "pass" form).
    """
    dtype = _compute_dtype(x)
    if x.numel() == 0:  # the FFT libraries reject empty transforms
        return x.new_zeros((weights.shape[0], *x.shape), dtype=dtype)
    spectrum = torch.fft.fft2(x.to(dtype))
    weights = weights.to(dtype)
    K = weights.shape[0]
    step = K if x.device.type != "cpu" else max(1, REFERENCE_CHUNK_BYTES // (spectrum.numel() * spectrum.element_size()))
    out = torch.empty((K, *x.shape), dtype=dtype, device=x.device)
    for k in range(0, K, step):
        out[k:k + step] = torch.fft.ifft2(spectrum[None] * weights[k:k + step, None, None]).real
    return out


def remove_frequencies_reference(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ground truth: band-stop of each conjugate pair through full FFTs."""
    H, W = x.shape[-2:]
    masks = freq.pair_masks(H, W, freqs.cpu()).to(x.device)
    return band_filter_reference(x, (~masks).to(_compute_dtype(x)))


# ---------------------------------------------------------------------------------------
# Argument handling


def _check_images(x) -> None:
    check_tensor("x", x, ndim=4, shape_doc="(B, C, H, W)", dtypes=FLOAT_DTYPES)


def _check_fits(op: str, x: torch.Tensor, K: int, allow_nonfinite: bool) -> None:
    """The (K, B, C, H, W) output must fit in memory: checked from shapes alone, before the
    value checks and the kernels allocate anything. Then the NaN/Inf check of x."""
    check_output_fits(op, (K, *x.shape), _compute_dtype(x), x.device,
                      f"use {op}_chunks(..., max_bytes=...), which yields the same result in pieces")
    if not allow_nonfinite:
        check_finite("x", x)


def _num_masks(masks) -> int:
    """K of (K, H, W) masks (1 for one (H, W) mask); prepare_masks checks the rest."""
    return masks.shape[0] if isinstance(masks, torch.Tensor) and masks.dim() == 3 else 1


def prepare_masks(masks, H: int, W: int, mode: str = "pass", *, symmetrize: bool = False,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """Validate masks and return (K, H, W) spectrum weights for `mode` ("pass" form)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dim() == 2:
        masks = masks[None]
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (H, W) or masks.shape[0] < 1:
        raise ValueError(f"masks must have shape (K, {H}, {W}) or ({H}, {W}) with K >= 1 to match x, "
                         f"got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool and masks.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"masks must be bool or float32/float64 weights, got {masks.dtype}")
    if not freq.is_conjugate_symmetric(masks):
        if not symmetrize:
            raise ValueError("masks must be conjugate-symmetric (mask[u, v] == mask[-u, -v]) so filtered images "
                             "stay real; build them with shortcut_fast.ops.freq or pass symmetrize=True")
        masks = freq.symmetrize(masks)
    weights = masks.to(device=device, dtype=dtype)
    return 1 - weights if mode == "stop" else weights


def _check_freqs(freqs, H: int, W: int) -> torch.Tensor:
    freqs = torch.as_tensor(freqs)
    if freqs.dim() == 1 and freqs.numel() == 2:
        freqs = freqs[None]
    if freqs.dim() != 2 or freqs.shape[1] != 2 or freqs.shape[0] < 1:
        raise ValueError(f"freqs must have shape (K, 2) of (u, v) indices with K >= 1, got {tuple(freqs.shape)}")
    if freqs.dtype.is_floating_point or freqs.dtype == torch.bool:
        raise TypeError(f"freqs must hold integer (u, v) indices, got {freqs.dtype}")
    freqs = freqs.long()
    u, v = freqs[:, 0], freqs[:, 1]
    if bool(((u < 0) | (u >= H) | (v < 0) | (v >= W)).any()):
        raise ValueError(f"freqs must lie on the unshifted grid: u in [0, {H}), v in [0, {W}); "
                         f"got u in [{int(u.min())}, {int(u.max())}], v in [{int(v.min())}, {int(v.max())}]")
    return freqs


def _unsupported(x: torch.Tensor) -> dict:
    if x.dtype == torch.float64:
        return {"triton": "the triton kernels compute in float32; float64 input needs torch/cpp/cuda"}
    return {}


# ---------------------------------------------------------------------------------------
# Public ops


def band_filter(x: torch.Tensor, masks: torch.Tensor, mode: str = "pass", *, backend: str = "auto",
                precision: str = "auto", symmetrize: bool = False, allow_nonfinite: bool = False) -> torch.Tensor:
    """Filter every image with every mask: x (B, C, H, W), masks (K, H, W) -> (K, B, C, H, W).

    masks: bool (kept frequencies) or float weights on the unshifted fft2 grid; "stop"
    uses 1 - masks. Output float32 (float64 for float64 input); math in float32 whatever
    the input dtype. A pass mask and its stop complement sum to the input (up to the
    precision's error). precision: of the triton kernel's products (module docstring).
    """
    _check_images(x)
    precision = resolve("band_filter", precision, x.device)
    _check_fits("band_filter", x, _num_masks(masks), allow_nonfinite)
    H, W = x.shape[-2:]
    weights = prepare_masks(masks, H, W, mode, symmetrize=symmetrize, device=x.device, dtype=_compute_dtype(x))
    run = dispatch("band_filter", backend, x.device, _BAND_FILTER, unsupported=_unsupported(x))
    return run(x.contiguous(), weights.contiguous(), precision)


# Every image filtered by every real spectrum weight: x (B,C,H,W), weights (K,H,W) in the
# compute dtype -> (K,B,C,H,W), out[k,b,c] = Re(ifft2(fft2(x[b,c]) * weights[k])), weights
# conjugate-symmetric. Compute dtype: float64 for float64 x, else float32.
@define_op("band_filter(Tensor x, Tensor weights) -> Tensor")
def _band_filter_fake(x, weights):
    return x.new_empty((weights.shape[0], *x.shape), dtype=_compute_dtype(x))


# Every implementation takes (x, weights, precision); only triton has precisions.
_BAND_FILTER = {
    "torch": ignores_precision(band_filter_reference),
    "cpp": ignores_precision(compiled_op("band_filter")),
    "cuda": ignores_precision(compiled_op("band_filter")),
    "triton": triton_kernel("band_filter", "band_filter_triton"),  # float32 weights (no float64 on triton)
}


def remove_frequencies(x: torch.Tensor, freqs, *, backend: str = "auto", precision: str = "auto",
                       allow_nonfinite: bool = False) -> torch.Tensor:
    """Remove one conjugate frequency pair per row of freqs: x (B, C, H, W), freqs (K, 2)
    int (u, v) on the unshifted grid -> (K, B, C, H, W), each image minus that pair.
    precision: checked, no effect (an elementwise update in float32: module docstring)."""
    _check_images(x)
    check_precision(precision)
    H, W = x.shape[-2:]
    freqs = _check_freqs(freqs, H, W).to(x.device)
    _check_fits("remove_frequencies", x, freqs.shape[0], allow_nonfinite)
    run = dispatch("remove_frequencies", backend, x.device, _REMOVE_FREQUENCIES, unsupported=_unsupported(x))
    return run(x.contiguous(), freqs.contiguous())


# Each image minus one conjugate frequency pair per row of freqs (K,2) int64 (u,v) -> (K,B,C,H,W).
@define_op("remove_frequencies(Tensor x, Tensor freqs) -> Tensor")
def _remove_frequencies_fake(x, freqs):
    return x.new_empty((freqs.shape[0], *x.shape), dtype=_compute_dtype(x))


_REMOVE_FREQUENCIES = {
    "torch": remove_frequencies_reference,
    "cpp": compiled_op("remove_frequencies"),
    "cuda": compiled_op("remove_frequencies"),
    "triton": triton_kernel("band_filter", "remove_frequencies_triton"),
}


# ---------------------------------------------------------------------------------------
# Streaming


@dataclass
class FilterChunk:
    """One piece of a K x B result: masks[k_slice] applied to images[b_slice]."""

    k_slice: slice
    b_slice: slice
    images: torch.Tensor  # (k, b, C, H, W)


def _chunk_plan(K: int, B: int, image_bytes: int, max_bytes: int) -> Iterator[tuple[slice, slice]]:
    if max_bytes < image_bytes:
        raise ValueError(f"max_bytes must hold at least one filtered image ({image_bytes} bytes), got {max_bytes}")
    per_mask = B * image_bytes
    if per_mask <= max_bytes:
        step = max(1, max_bytes // per_mask) if per_mask else K  # B = 0: one empty chunk
        for k0 in range(0, K, step):
            yield slice(k0, min(k0 + step, K)), slice(0, B)
    else:
        step = max(1, max_bytes // image_bytes)
        for k in range(K):
            for b0 in range(0, B, step):
                yield slice(k, k + 1), slice(b0, min(b0 + step, B))


def band_filter_chunks(x: torch.Tensor, masks: torch.Tensor, mode: str = "pass", *, max_bytes: int = 256 << 20,
                       backend: str = "auto", precision: str = "auto", symmetrize: bool = False,
                       allow_nonfinite: bool = False) -> Iterator[FilterChunk]:
    """band_filter in pieces of at most max_bytes of output each (masks outer, images inner)."""
    _check_images(x)
    check_precision(precision)
    if not allow_nonfinite:
        check_finite("x", x)
    H, W = x.shape[-2:]
    weights = prepare_masks(masks, H, W, mode, symmetrize=symmetrize, device=x.device, dtype=_compute_dtype(x))
    image_bytes = math.prod(x.shape[1:]) * _compute_dtype(x).itemsize
    for ks, bs in _chunk_plan(weights.shape[0], x.shape[0], image_bytes, max_bytes):
        # weights are already symmetric and in "pass" form
        yield FilterChunk(ks, bs, band_filter(x[bs], weights[ks], "pass", backend=backend, precision=precision,
                                              allow_nonfinite=True))


def remove_frequencies_chunks(x: torch.Tensor, freqs, *, max_bytes: int = 256 << 20, backend: str = "auto",
                              precision: str = "auto", allow_nonfinite: bool = False) -> Iterator[FilterChunk]:
    """remove_frequencies in pieces of at most max_bytes of output each (precision: no effect)."""
    _check_images(x)
    check_precision(precision)
    if not allow_nonfinite:
        check_finite("x", x)
    freqs = _check_freqs(freqs, *x.shape[-2:])
    image_bytes = math.prod(x.shape[1:]) * _compute_dtype(x).itemsize
    for ks, bs in _chunk_plan(freqs.shape[0], x.shape[0], image_bytes, max_bytes):
        yield FilterChunk(ks, bs, remove_frequencies(x[bs], freqs[ks], backend=backend, allow_nonfinite=True))
