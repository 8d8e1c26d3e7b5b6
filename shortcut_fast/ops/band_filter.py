"""Batched spectral filtering: B images x K frequency masks -> K*B filtered images.

band_filter(x, masks)[k, b] = Re(ifft2(fft2(x[b]) * masks[k])) for "pass" (masks[k] kept),
and with 1 - masks[k] for "stop". Masks live on the unshifted fft2 grid (ops.freq) and must
be conjugate-symmetric so the result is a real image (or pass symmetrize=True).

remove_frequencies(x, freqs)[k, b] removes one conjugate pair {(u, v), (-u, -v)} from
x[b]; it equals band_filter(x, pair_masks(freqs), "stop") but is a rank-one update,
    x - (c / HW) Re(F(u, v) exp(2 pi i (u y / H + v x / W))),  c = 2 (1 if self-conjugate),
so kernels produce K variants without K inverse FFTs.

band_filter_chunks / remove_frequencies_chunks yield the same results in pieces sized to a
memory budget, so a model can consume K*B variants without materializing all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from shortcut_fast.backends import choose_backend, fake_for_compiled
from shortcut_fast.ops import freq
from shortcut_fast.ops._checks import FLOAT_DTYPES, check_finite, check_tensor

IMPLEMENTED = ("torch", "cpp", "cuda", "triton")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
MODES = ("pass", "stop")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# References


def band_filter_reference(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ground truth: one FFT per image, one inverse FFT per (mask, image).

    weights: (K, H, W) real, applied to the spectrum as given (the "pass" form).
    """
    dtype = _compute_dtype(x)
    spectrum = torch.fft.fft2(x.to(dtype))
    return torch.fft.ifft2(spectrum[None] * weights.to(dtype)[:, None, None]).real


def remove_frequencies_reference(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ground truth: band-stop of each conjugate pair through full FFTs."""
    H, W = x.shape[-2:]
    masks = freq.pair_masks(H, W, freqs.cpu()).to(x.device)
    return band_filter_reference(x, (~masks).to(_compute_dtype(x)))


# ---------------------------------------------------------------------------------------
# Argument handling


def _check_images(x, allow_nonfinite: bool) -> None:
    check_tensor("x", x, ndim=4, shape_doc="(B, C, H, W)", dtypes=FLOAT_DTYPES)
    if not allow_nonfinite:
        check_finite("x", x)


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


def _choose(op: str, x: torch.Tensor, backend: str) -> str:
    unsupported = {}
    if x.dtype == torch.float64:
        unsupported["triton"] = "the triton kernels compute in float32; float64 input needs torch/cpp/cuda"
    return choose_backend(op, backend, x.device, IMPLEMENTED, auto_order=AUTO_ORDER, unsupported=unsupported)


# ---------------------------------------------------------------------------------------
# Public ops


@fake_for_compiled("band_filter")
def _band_filter_fake(x, weights):
    return x.new_empty((weights.shape[0], *x.shape), dtype=_compute_dtype(x))


@fake_for_compiled("remove_frequencies")
def _remove_frequencies_fake(x, freqs):
    return x.new_empty((freqs.shape[0], *x.shape), dtype=_compute_dtype(x))


def band_filter(x: torch.Tensor, masks: torch.Tensor, mode: str = "pass", *, backend: str = "auto",
                symmetrize: bool = False, allow_nonfinite: bool = False) -> torch.Tensor:
    """Filter every image with every mask: x (B, C, H, W), masks (K, H, W) -> (K, B, C, H, W).

    masks: bool (kept frequencies) or float weights on the unshifted fft2 grid; "stop"
    uses 1 - masks. Output float32 (float64 for float64 input); math in float32 whatever
    the input dtype. A pass mask and its stop complement sum to the input.
    """
    _check_images(x, allow_nonfinite)
    H, W = x.shape[-2:]
    weights = prepare_masks(masks, H, W, mode, symmetrize=symmetrize, device=x.device, dtype=_compute_dtype(x))
    chosen = _choose("band_filter", x, backend)
    if chosen == "torch":
        return band_filter_reference(x, weights)
    if chosen == "triton":
        from shortcut_fast.kernels import band_filter as triton_kernels

        return triton_kernels.band_filter_op(x.contiguous(), weights.float().contiguous())
    return torch.ops.shortcut_fast.band_filter(x.contiguous(), weights.contiguous())


def remove_frequencies(x: torch.Tensor, freqs, *, backend: str = "auto",
                       allow_nonfinite: bool = False) -> torch.Tensor:
    """Remove one conjugate frequency pair per row of freqs: x (B, C, H, W), freqs (K, 2)
    int (u, v) on the unshifted grid -> (K, B, C, H, W), each image minus that pair."""
    _check_images(x, allow_nonfinite)
    H, W = x.shape[-2:]
    freqs = _check_freqs(freqs, H, W).to(x.device)
    chosen = _choose("remove_frequencies", x, backend)
    if chosen == "torch":
        return remove_frequencies_reference(x, freqs)
    if chosen == "triton":
        from shortcut_fast.kernels import band_filter as triton_kernels

        return triton_kernels.remove_frequencies_op(x.contiguous(), freqs.contiguous())
    return torch.ops.shortcut_fast.remove_frequencies(x.contiguous(), freqs.contiguous())


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
        step = max(1, max_bytes // per_mask)
        for k0 in range(0, K, step):
            yield slice(k0, min(k0 + step, K)), slice(0, B)
    else:
        step = max(1, max_bytes // image_bytes)
        for k in range(K):
            for b0 in range(0, B, step):
                yield slice(k, k + 1), slice(b0, min(b0 + step, B))


def band_filter_chunks(x: torch.Tensor, masks: torch.Tensor, mode: str = "pass", *, max_bytes: int = 256 << 20,
                       backend: str = "auto", symmetrize: bool = False,
                       allow_nonfinite: bool = False) -> Iterator[FilterChunk]:
    """band_filter in pieces of at most max_bytes of output each (masks outer, images inner)."""
    _check_images(x, allow_nonfinite)
    H, W = x.shape[-2:]
    weights = prepare_masks(masks, H, W, mode, symmetrize=symmetrize, device=x.device, dtype=_compute_dtype(x))
    image_bytes = x[0].numel() * torch.finfo(_compute_dtype(x)).bits // 8
    for ks, bs in _chunk_plan(weights.shape[0], x.shape[0], image_bytes, max_bytes):
        # weights are already symmetric and in "pass" form
        yield FilterChunk(ks, bs, band_filter(x[bs], weights[ks], "pass", backend=backend, allow_nonfinite=True))


def remove_frequencies_chunks(x: torch.Tensor, freqs, *, max_bytes: int = 256 << 20, backend: str = "auto",
                              allow_nonfinite: bool = False) -> Iterator[FilterChunk]:
    """remove_frequencies in pieces of at most max_bytes of output each."""
    _check_images(x, allow_nonfinite)
    freqs = _check_freqs(freqs, *x.shape[-2:])
    image_bytes = x[0].numel() * torch.finfo(_compute_dtype(x)).bits // 8
    for ks, bs in _chunk_plan(freqs.shape[0], x.shape[0], image_bytes, max_bytes):
        yield FilterChunk(ks, bs, remove_frequencies(x[bs], freqs[ks], backend=backend, allow_nonfinite=True))
