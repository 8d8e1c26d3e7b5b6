"""Triton kernel of class_spectrum_sum: a fused DFT + |.| + per-class accumulation.

Triton has no FFT (and the CPU interpreter no complex dtype), so the 2-D DFT is written
as real matmuls with cos/sin tables, tiled over output frequencies:
    F = (Ch - i Sh) X (Cw - i Sw)^T
      = (Ch X Cw^T - Sh X Sw^T) - i (Ch X Sw^T + Sh X Cw^T)
One program computes a (BLOCK_U, BLOCK_V) tile of |F| for one (image, channel) and adds
it to out[label, channel] with atomics. The work is O(HW(H+W)) per image-channel; for
small images (CIFAR, 32x32) it is one tile per image and fully fused.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from shortcut_fast.kernels._cache import cached
from shortcut_fast.kernels._dot import dot


@triton.jit
def _class_spectrum_kernel(
    x_ptr, labels_ptr, out_ptr,
    cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr,
    C, H, W, num_classes,
    stride_xb, stride_xc, stride_xh, stride_xw,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_image_channel = tl.program_id(0)
    pid_tile = tl.program_id(1)
    b = pid_image_channel // C
    c = pid_image_channel % C
    tiles_v = tl.cdiv(W, BLOCK_V)
    u = (pid_tile // tiles_v) * BLOCK_U + tl.arange(0, BLOCK_U)
    v = (pid_tile % tiles_v) * BLOCK_V + tl.arange(0, BLOCK_V)
    u_ok = u < H
    v_ok = v < W

    re = tl.zeros((BLOCK_U, BLOCK_V), dtype=tl.float32)
    im = tl.zeros((BLOCK_U, BLOCK_V), dtype=tl.float32)
    x_base = x_ptr + b * stride_xb + c * stride_xc
    for y0 in range(0, H, BLOCK_Y):
        y = y0 + tl.arange(0, BLOCK_Y)
        y_ok = y < H
        # Row transform of this strip of rows: T = X[y, :] (Cw - i Sw)^T.
        t_cos = tl.zeros((BLOCK_Y, BLOCK_V), dtype=tl.float32)
        t_sin = tl.zeros((BLOCK_Y, BLOCK_V), dtype=tl.float32)
        for x0 in range(0, W, BLOCK_X):
            xs = x0 + tl.arange(0, BLOCK_X)
            xs_ok = xs < W
            pixels = tl.load(
                x_base + y[:, None] * stride_xh + xs[None, :] * stride_xw,
                mask=y_ok[:, None] & xs_ok[None, :], other=0.0,
            ).to(tl.float32)
            table_offsets = xs[:, None] * W + v[None, :]
            table_mask = xs_ok[:, None] & v_ok[None, :]
            cos_w = tl.load(cos_w_ptr + table_offsets, mask=table_mask, other=0.0)
            sin_w = tl.load(sin_w_ptr + table_offsets, mask=table_mask, other=0.0)
            t_cos += dot(pixels, cos_w, PRECISION)
            t_sin += dot(pixels, sin_w, PRECISION)
        # Column transform: F += (Ch - i Sh)[u, y] (t_cos - i t_sin).
        col_offsets = u[:, None] * H + y[None, :]
        col_mask = u_ok[:, None] & y_ok[None, :]
        cos_h = tl.load(cos_h_ptr + col_offsets, mask=col_mask, other=0.0)
        sin_h = tl.load(sin_h_ptr + col_offsets, mask=col_mask, other=0.0)
        re += dot(cos_h, t_cos, PRECISION) - dot(sin_h, t_sin, PRECISION)
        im -= dot(cos_h, t_sin, PRECISION) + dot(sin_h, t_cos, PRECISION)

    magnitude = tl.sqrt(re * re + im * im)
    label = tl.load(labels_ptr + b)
    # Labels are validated by the caller; the guard keeps a bad one from writing out of bounds.
    ok = u_ok[:, None] & v_ok[None, :] & (label >= 0) & (label < num_classes)
    out_offsets = ((label * C + c) * H + u[:, None]) * W + v[None, :]
    tl.atomic_add(out_ptr + out_offsets, magnitude, mask=ok)


def _dft_tables(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2 pi j k / n as (n, n) float32, computed in float64 for accuracy."""

    def build(device):
        k = torch.arange(n, dtype=torch.float64, device=device)
        # Reduce j*k mod n first so large n keeps full accuracy.
        angle = (2 * math.pi / n) * torch.remainder(k[:, None] * k[None, :], n)
        return torch.cos(angle).to(torch.float32), torch.sin(angle).to(torch.float32)

    return cached(("dft", n), like, build)


def _blocks(H: int, W: int) -> dict:
    """Output tile BLOCK_U x BLOCK_V, the strips BLOCK_Y x BLOCK_X the transforms run in, and
    warps. tl.dot needs every dimension >= 16. Its float32 ("ieee") form runs on FMAs that
    hold whole K-slices of both operands in registers, so the strips (the K of every dot)
    are 16: with 64 x 64 tiles and strips the kernel spilled 5-64 KB on sm_80/sm_90. The
    row transform is recomputed once per u tile, so the tile is tall: 64 x 32 (8 warps) is
    the largest that compiles without spills and does the work of 64 x 64."""
    block_u = max(16, min(64, triton.next_power_of_2(H)))
    block_v = max(16, min(32, triton.next_power_of_2(W)))
    return dict(BLOCK_U=block_u, BLOCK_V=block_v, BLOCK_Y=16, BLOCK_X=16,
                num_warps=8 if block_u * block_v >= 2048 else 4)


def class_spectrum_grid(B: int, C: int, H: int, W: int) -> tuple[int, int]:
    """The launch grid: (image-channels, output tiles of one spectrum)."""
    blocks = _blocks(H, W)
    return B * C, triton.cdiv(H, blocks["BLOCK_U"]) * triton.cdiv(W, blocks["BLOCK_V"])


# Registered as a torch.library op so it composes with torch.compile (fake below).
@torch.library.triton_op("shortcut_fast::class_spectrum_sum_triton", mutates_args=())
def class_spectrum_sum_op(x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          precision: str = "ieee") -> torch.Tensor:
    """x (B, C, H, W), labels (B,) int64 in [0, num_classes) -> (num_classes, C, H, W) float32
    sums of |fft2(x)| per class. precision: of the DFT products (shortcut_fast.ops.precision,
    kernels/_dot.py)."""
    B, C, H, W = x.shape
    out = torch.zeros((num_classes, C, H, W), device=x.device, dtype=torch.float32)
    if B == 0 or C == 0:
        return out
    cos_h, sin_h = _dft_tables(H, x)
    cos_w, sin_w = _dft_tables(W, x)
    blocks = _blocks(H, W)
    torch.library.wrap_triton(_class_spectrum_kernel)[class_spectrum_grid(B, C, H, W)](
        x, labels, out, cos_h, sin_h, cos_w, sin_w,
        C, H, W, num_classes,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        PRECISION=precision, **blocks,
    )
    return out


@class_spectrum_sum_op.register_fake
def _(x, labels, num_classes, precision="ieee"):
    return x.new_empty((num_classes, *x.shape[1:]), dtype=torch.float32)
