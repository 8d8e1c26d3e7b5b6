"""Triton kernels of band_filter and remove_frequencies (shortcut_fast.ops.band_filter).

band_filter_op(x, weights)[k, b, c] = Re(ifft2(fft2(x[b, c]) * weights[k]))
-------------------------------------------------------------------------------
The spectrum of every image is computed once, outside the kernel, with torch.fft.rfft2
(the images are real, so the columns v > W/2 are redundant). Triton has no FFT, so the
masked inverse DFT is written as real matmuls with cos/sin tables. With Y = w_k * X
Hermitian (x real, w_k conjugate-symmetric), the terms at (u, v) and (-u, -v) have equal
real parts, so only the columns v in [0, W/2] are needed:

    out[y, x] = sum_{v <= W/2} c_v/(HW) Re(T[y, v] e^{2 pi i v x / W}),
    T[y, v]   = sum_u e^{2 pi i u y / H} Y[u, v]                 (stage 1, complex)

with c_v = 1 for v = 0 and v = W/2 (W even), else 2. The DC and Nyquist columns are both
Hermitian in u, so their stage-1 results are real; they are packed into one complex column
Z[u, 0] = Y[u, 0] + i Y[u, W/2], leaving exactly WP = ceil(W/2) packed columns:

    stage 1: Tr = Ch Yr - Sh Yi,  Ti = Sh Yr + Ch Yi        (Ch[y,u] = cos 2 pi yu/H, Sh = sin)
    stage 2: out = Tr Cw - Ti Sw                              (Cw[p,x] = c_p cos(2 pi px/W)/HW,
                                                               Sw likewise; row 0 carries the
                                                               Nyquist column: Sw[0,x] = -(-1)^x/HW)

That is 2 H^2 W + H W^2 multiply-adds per output image (half of the full complex round
trip). One program computes a (BLOCK_Y, BLOCK_X) tile of one output image (k, b, c); it
loops over packed column blocks v, and for each runs stage 1 over all u blocks and adds
stage 2 into the output tile held in registers. (u, v) blocks whose mask tile is all
zero are skipped through per-block flags computed once per call. Images that fit one
tile (H <= 32, W <= 64: CIFAR, MNIST) take a path that loads the tables and the image
spectrum once per program and filters it with K_GROUP masks.

The weights must be conjugate-symmetric (the API guarantees it): for other weights the
result is not Re(ifft2(...)) of the full spectrum.

remove_frequencies_op(x, freqs)[k, b, c] = x[b, c] minus one conjugate pair
-------------------------------------------------------------------------------
    out[y, x] = x[y, x] - Re(A e^{i a_y} e^{i b_x}),  A = c_k F(u_k, v_k) / HW,
    a_y = 2 pi ((u_k y) mod H) / H,  b_x = 2 pi ((v_k x) mod W) / W,
with c_k = 1 for a self-conjugate frequency, else 2. F(u, v) for every (k, b, c) is
gathered from one rfft2 outside the kernel; a single elementwise kernel writes all
K*B*C outputs. The phase is separable, so each program gathers BLOCK_Y + BLOCK_X cos/sin
pairs per k from tables of cos/sin(2 pi j / n) (exact, and no sin/cos in the kernel, whose
slow path for large arguments spilled registers) and does two multiply-adds per pixel: the
kernel is bound by its output writes. Each program loads its x tile once and writes it for
K_GROUP frequencies.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from shortcut_fast.kernels._cache import cached
from shortcut_fast.kernels._dot import dot
# Masks per program when the image is a single tile (tables and spectrum loaded once).
_BAND_K_GROUP = 8


# ---------------------------------------------------------------------------------------
# band_filter


@triton.jit
def _program_coordinates(N_TILES, TILES_X, N_KGROUPS, K_GROUP: tl.constexpr, BLOCK_Y: tl.constexpr,
                         BLOCK_X: tl.constexpr):
    """Decode the flat program id of both kernels: output tile fastest, then the group of
    K_GROUP masks, then the image-channel. Returns (first mask, image-channel, rows, cols)."""
    pid = tl.program_id(0)
    tile = pid % N_TILES
    rest = pid // N_TILES
    k0 = (rest % N_KGROUPS) * K_GROUP
    bc = rest // N_KGROUPS
    y = (tile // TILES_X) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    x = (tile % TILES_X) * BLOCK_X + tl.arange(0, BLOCK_X)
    return k0, bc, y, x


@triton.jit
def _load_spectrum(spec_base, u, v, u_ok, v_ok, WR, NYQ, FIRST_BLOCK, HAS_NYQ: tl.constexpr):
    """Image spectrum X[u, v] on a (BLOCK_U, BLOCK_V) block of packed columns, plus the
    Nyquist column X[u, W/2] (BLOCK_U,) that packed column 0 carries (zeros elsewhere)."""
    uv_ok = u_ok[:, None] & v_ok[None, :]
    s_off = (u[:, None] * WR + v[None, :]) * 2
    x_re = tl.load(spec_base + s_off, mask=uv_ok, other=0.0)
    x_im = tl.load(spec_base + s_off + 1, mask=uv_ok, other=0.0)
    n_re = tl.zeros_like(u).to(tl.float32)
    n_im = tl.zeros_like(u).to(tl.float32)
    if HAS_NYQ:
        if FIRST_BLOCK:
            n_off = (u * WR + NYQ) * 2
            n_re = tl.load(spec_base + n_off, mask=u_ok, other=0.0)
            n_im = tl.load(spec_base + n_off + 1, mask=u_ok, other=0.0)
    return x_re, x_im, n_re, n_im


@triton.jit
def _apply_weights(w_base, u, v, u_ok, v_ok, W, NYQ, x_re, x_im, n_re, n_im, FIRST_BLOCK, HAS_NYQ: tl.constexpr):
    """Y = w X on packed columns; column 0 becomes Z[u, 0] = Y[u, 0] + i Y[u, W/2]."""
    w = tl.load(w_base + u[:, None] * W + v[None, :], mask=u_ok[:, None] & v_ok[None, :], other=0.0)
    y_re = w * x_re
    y_im = w * x_im
    if HAS_NYQ:
        if FIRST_BLOCK:
            w_n = tl.load(w_base + u * W + NYQ, mask=u_ok, other=0.0)
            first = (v == 0)[None, :]
            y_re = tl.where(first, y_re - (w_n * n_im)[:, None], y_re)
            y_im = tl.where(first, y_im + (w_n * n_re)[:, None], y_im)
    return y_re, y_im


@triton.jit
def _band_filter_kernel(
    spec_ptr,  # (BC, H, WR, 2) float32: rfft2 of the images, real/imag interleaved
    w_ptr,  # (K, H, W) float32 spectrum weights
    nz_uv_ptr,  # (K, NUB, NVB) int32: 1 where the packed weight block (u, v) is nonzero
    nz_v_ptr,  # (K, NVB) int32: 1 where any block of packed column block v is nonzero
    out_ptr,  # (K, BC, H, W) float32
    ch_ptr, sh_ptr,  # (H, H) cos/sin(2 pi y u / H)
    cw_ptr, sw_ptr,  # (WP, W) scaled cos/sin(2 pi p x / W), see the module docstring
    K, BC, H, W, WR, WP, NUB, NVB, TILES_X, N_TILES, N_KGROUPS,
    HAS_NYQ: tl.constexpr, SINGLE_TILE: tl.constexpr, K_GROUP: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One flat grid axis (axis 0 allows 2^31 - 1 programs): output tile fastest, then the
    # group of K_GROUP masks, then the image-channel, so neighbouring programs share one
    # image spectrum (and its L2 lines) and walk the masks.
    k0, bc, y, x = _program_coordinates(N_TILES, TILES_X, N_KGROUPS, K_GROUP, BLOCK_Y, BLOCK_X)
    y_ok = y < H
    x_ok = x < W
    out_ok = y_ok[:, None] & x_ok[None, :]
    out_off = y[:, None] * W + x[None, :]
    spec_base = spec_ptr + bc.to(tl.int64) * H * WR * 2
    NYQ = W // 2  # the Nyquist column, used when W is even

    if SINGLE_TILE:
        # The whole image is one (u, v) block and one output tile (H <= 32, W <= 64, e.g.
        # CIFAR, MNIST): load the tables and the image spectrum once, reuse for K_GROUP masks.
        u = tl.arange(0, BLOCK_U)
        v = tl.arange(0, BLOCK_V)
        u_ok = u < H
        v_ok = v < WP
        e_off = y[:, None] * H + u[None, :]
        e_ok = y_ok[:, None] & u_ok[None, :]
        c_h = tl.load(ch_ptr + e_off, mask=e_ok, other=0.0)
        s_h = tl.load(sh_ptr + e_off, mask=e_ok, other=0.0)
        t_off = v[:, None] * W + x[None, :]
        t_ok = v_ok[:, None] & x_ok[None, :]
        c_w = tl.load(cw_ptr + t_off, mask=t_ok, other=0.0)
        s_w = tl.load(sw_ptr + t_off, mask=t_ok, other=0.0)
        x_re, x_im, n_re, n_im = _load_spectrum(spec_base, u, v, u_ok, v_ok, WR, NYQ, True, HAS_NYQ)
        for i in range(0, K_GROUP):
            k = k0 + i
            if k < K:
                acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
                if tl.load(nz_v_ptr + k) != 0:
                    w_base = w_ptr + k.to(tl.int64) * H * W
                    y_re, y_im = _apply_weights(w_base, u, v, u_ok, v_ok, W, NYQ, x_re, x_im, n_re, n_im,
                                                True, HAS_NYQ)
                    t_re = dot(c_h, y_re, PRECISION)
                    t_re -= dot(s_h, y_im, PRECISION)
                    t_im = dot(s_h, y_re, PRECISION)
                    t_im += dot(c_h, y_im, PRECISION)
                    acc = dot(t_re, c_w, PRECISION)
                    acc -= dot(t_im, s_w, PRECISION)
                out_base = out_ptr + (k.to(tl.int64) * BC + bc) * H * W
                tl.store(out_base + out_off, acc, mask=out_ok)
    else:
        for i in range(0, K_GROUP):
            k = k0 + i
            if k < K:
                w_base = w_ptr + k.to(tl.int64) * H * W
                acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
                for vb in range(0, NVB):
                    if tl.load(nz_v_ptr + k * NVB + vb) != 0:
                        v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
                        v_ok = v < WP
                        t_re = tl.zeros((BLOCK_Y, BLOCK_V), dtype=tl.float32)
                        t_im = tl.zeros((BLOCK_Y, BLOCK_V), dtype=tl.float32)
                        # Stage 1: T[y, v] = sum_u E_H[y, u] (w X)[u, v] for this column block.
                        for ub in range(0, NUB):
                            if tl.load(nz_uv_ptr + (k * NUB + ub) * NVB + vb) != 0:
                                u = ub * BLOCK_U + tl.arange(0, BLOCK_U)
                                u_ok = u < H
                                first = vb == 0
                                x_re, x_im, n_re, n_im = _load_spectrum(spec_base, u, v, u_ok, v_ok, WR, NYQ,
                                                                        first, HAS_NYQ)
                                y_re, y_im = _apply_weights(w_base, u, v, u_ok, v_ok, W, NYQ, x_re, x_im,
                                                            n_re, n_im, first, HAS_NYQ)
                                e_off = y[:, None] * H + u[None, :]
                                e_ok = y_ok[:, None] & u_ok[None, :]
                                c_h = tl.load(ch_ptr + e_off, mask=e_ok, other=0.0)
                                s_h = tl.load(sh_ptr + e_off, mask=e_ok, other=0.0)
                                t_re += dot(c_h, y_re, PRECISION)
                                t_re -= dot(s_h, y_im, PRECISION)
                                t_im += dot(s_h, y_re, PRECISION)
                                t_im += dot(c_h, y_im, PRECISION)
                        # Stage 2: out += Tr Cw - Ti Sw (c_p / HW folded into the tables).
                        t_off = v[:, None] * W + x[None, :]
                        t_ok = v_ok[:, None] & x_ok[None, :]
                        c_w = tl.load(cw_ptr + t_off, mask=t_ok, other=0.0)
                        s_w = tl.load(sw_ptr + t_off, mask=t_ok, other=0.0)
                        acc += dot(t_re, c_w, PRECISION)
                        acc -= dot(t_im, s_w, PRECISION)
                out_base = out_ptr + (k.to(tl.int64) * BC + bc) * H * W
                tl.store(out_base + out_off, acc, mask=out_ok)


# ---------------------------------------------------------------------------------------
# remove_frequencies


@triton.jit
def _remove_frequencies_kernel(
    x_ptr,  # (BC, H, W) images, any float dtype, contiguous
    coef_ptr,  # (K, BC, 2) float32: c_k F(u_k, v_k) / HW, real and imaginary part
    freq_ptr,  # (K, 2) int64 (u, v)
    cos_h_ptr, sin_h_ptr,  # (H,) cos/sin(2 pi j / H)
    cos_w_ptr, sin_w_ptr,  # (W,) cos/sin(2 pi j / W)
    out_ptr,  # (K, BC, H, W) float32
    K, BC, H, W, TILES_X, N_TILES, N_KGROUPS,
    K_GROUP: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    k0, bc, y, x = _program_coordinates(N_TILES, TILES_X, N_KGROUPS, K_GROUP, BLOCK_Y, BLOCK_X)
    ok = (y < H)[:, None] & (x < W)[None, :]
    offsets = y[:, None] * W + x[None, :]
    pixels = tl.load(x_ptr + bc.to(tl.int64) * H * W + offsets, mask=ok, other=0.0).to(tl.float32)
    for i in range(0, K_GROUP):
        k = k0 + i
        if k < K:
            u = tl.load(freq_ptr + 2 * k)
            v = tl.load(freq_ptr + 2 * k + 1)
            kbc = k.to(tl.int64) * BC + bc
            a_re = tl.load(coef_ptr + kbc * 2)
            a_im = tl.load(coef_ptr + kbc * 2 + 1)
            # Exact integer phase reduction, then one table entry per row and per column (the
            # index is in range for the padding rows and columns too).
            row = (u * y) % H
            col = (v * x) % W
            cos_r = tl.load(cos_h_ptr + row)
            sin_r = tl.load(sin_h_ptr + row)
            p_re = a_re * cos_r - a_im * sin_r  # A e^{i a_y}
            p_im = a_re * sin_r + a_im * cos_r
            cos_c = tl.load(cos_w_ptr + col)
            sin_c = tl.load(sin_w_ptr + col)
            wave = p_re[:, None] * cos_c[None, :] - p_im[:, None] * sin_c[None, :]
            tl.store(out_ptr + kbc * H * W + offsets, pixels - wave, mask=ok)


# ---------------------------------------------------------------------------------------
# Host side


def _build_tables(H: int, W: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Ch, Sh (H, H) and the scaled half-spectrum tables Cw, Sw (WP, W), float32.

    Angles are reduced exactly (integer j*k mod n) and evaluated in float64.
    """
    yu = torch.arange(H, dtype=torch.float64, device=device)
    angle_h = (2 * math.pi / H) * torch.remainder(yu[:, None] * yu[None, :], H)
    WP = (W + 1) // 2
    p = torch.arange(WP, dtype=torch.float64, device=device)
    xs = torch.arange(W, dtype=torch.float64, device=device)
    angle_w = (2 * math.pi / W) * torch.remainder(p[:, None] * xs[None, :], W)
    scale = torch.full((WP, 1), 2.0 / (H * W), dtype=torch.float64, device=device)
    scale[0] = 1.0 / (H * W)
    cos_w = scale * torch.cos(angle_w)
    sin_w = scale * torch.sin(angle_w)
    if W % 2 == 0:  # the Nyquist column rides in the imaginary part of packed column 0
        sin_w[0] = -torch.cos(math.pi * xs) / (H * W)
    return tuple(t.to(torch.float32).contiguous()
                 for t in (torch.cos(angle_h), torch.sin(angle_h), cos_w, sin_w))


def _tables(H: int, W: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return cached(("band_filter", H, W), like, lambda device: _build_tables(H, W, device))


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _band_blocks(H: int, W: int, precision: str) -> tuple[int, int, int, int]:
    # tl.dot needs every dimension >= 16. The output tile spans up to 128 columns, so images
    # up to 128 wide run stage 1 once per strip of 32 rows (no recomputation across x tiles);
    # the fp32 accumulator is at most 32 x 128 (16 registers a thread with 8 warps). Wider
    # images tile x and recompute stage 1 per x tile (W / 128 times). "tf32x3" splits every
    # operand in two: its column blocks are 16 wide (32 spilled 92-280 bytes on sm_80/sm_90).
    block_x = _pow2(W, 16, 128)
    block_y = _pow2(H, 16, 32)
    block_u = _pow2(H, 16, 32)
    block_v = _pow2((W + 1) // 2, 16, 16 if precision == "tf32x3" else 32)
    return block_y, block_x, block_u, block_v


def _block_flags(weights: torch.Tensor, W: int, block_u: int, block_v: int):
    """Per-(k, u block, v block) flags of the packed half-spectrum weights being nonzero."""
    K, H = weights.shape[:2]
    WP = (W + 1) // 2
    nonzero = weights[:, :, :WP] != 0
    if W % 2 == 0:
        nonzero = torch.cat([nonzero[:, :, :1] | (weights[:, :, W // 2:W // 2 + 1] != 0), nonzero[:, :, 1:]], 2)
    nub, nvb = triton.cdiv(H, block_u), triton.cdiv(WP, block_v)
    padded = torch.nn.functional.pad(nonzero, (0, nvb * block_v - WP, 0, nub * block_u - H))
    nz_uv = padded.reshape(K, nub, block_u, nvb, block_v).any(4).any(2)
    return nz_uv.to(torch.int32).contiguous(), nz_uv.any(1).to(torch.int32).contiguous()


def _band_layout(H: int, W: int, K: int, precision: str) -> tuple[int, ...]:
    """(BLOCK_Y, BLOCK_X, BLOCK_U, BLOCK_V, u blocks, v blocks, x tiles, output tiles, single
    tile, K_GROUP, k groups) of a band_filter launch: shapes only."""
    block_y, block_x, block_u, block_v = _band_blocks(H, W, precision)
    nub, nvb = triton.cdiv(H, block_u), triton.cdiv((W + 1) // 2, block_v)
    tiles_x = triton.cdiv(W, block_x)
    n_tiles = triton.cdiv(H, block_y) * tiles_x
    single = nub == 1 and nvb == 1 and n_tiles == 1
    k_group = min(_BAND_K_GROUP, triton.next_power_of_2(K)) if single else 1
    return block_y, block_x, block_u, block_v, nub, nvb, tiles_x, n_tiles, single, k_group, triton.cdiv(K, k_group)


def band_filter_grid(B: int, C: int, H: int, W: int, K: int, precision: str = "ieee") -> tuple[int]:
    """The launch grid: one program per (image-channel, group of masks, output tile)."""
    *_, n_tiles, _, _, n_kgroups = _band_layout(H, W, K, precision)
    return (B * C * n_kgroups * n_tiles,)


# Registered as torch.library ops so they compose with torch.compile (fakes below).
@torch.library.triton_op("shortcut_fast::band_filter_triton", mutates_args=())
def band_filter_op(x: torch.Tensor, weights: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """x (B, C, H, W) float32/16/bf16 contiguous, weights (K, H, W) float32 contiguous and
    conjugate-symmetric -> (K, B, C, H, W) float32 Re(ifft2(fft2(x) * weights[k])).

    precision: of the products (shortcut_fast.ops.precision.PRECISIONS, kernels/_dot.py),
    "ieee" (float32 exact, default), "tf32x3" (about float32 accuracy on tensor cores),
    "tf32" or "bf16".
    """
    B, C, H, W = x.shape
    K = weights.shape[0]
    out = torch.empty((K, B, C, H, W), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    BC = B * C
    WR, WP = W // 2 + 1, (W + 1) // 2
    spectrum = torch.view_as_real(torch.fft.rfft2(x.to(torch.float32))).contiguous()  # (B, C, H, WR, 2)
    weights = weights.to(torch.float32).contiguous()
    (block_y, block_x, block_u, block_v, nub, nvb, tiles_x, n_tiles, single, k_group,
     n_kgroups) = _band_layout(H, W, K, precision)
    nz_uv, nz_v = _block_flags(weights, W, block_u, block_v)
    cos_h, sin_h, cos_w, sin_w = _tables(H, W, x)
    torch.library.wrap_triton(_band_filter_kernel)[band_filter_grid(B, C, H, W, K, precision)](
        spectrum, weights, nz_uv, nz_v, out, cos_h, sin_h, cos_w, sin_w,
        K, BC, H, W, WR, WP, nub, nvb, tiles_x, n_tiles, n_kgroups,
        HAS_NYQ=W % 2 == 0, SINGLE_TILE=single, K_GROUP=k_group,
        BLOCK_Y=block_y, BLOCK_X=block_x, BLOCK_U=block_u, BLOCK_V=block_v,
        PRECISION=precision,
        # 8 warps once the output tile (and, on the single-tile path, the hoisted tables)
        # would need more than ~64 registers a thread with 4.
        num_warps=8 if block_y * block_x >= 2048 else 4,
    )
    return out


@band_filter_op.register_fake
def _(x, weights, precision="ieee"):
    return x.new_empty((weights.shape[0], *x.shape), dtype=torch.float32)


def _pair_coefficients(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(K, B*C, 2) float32: c_k F(u_k, v_k) / HW of every image-channel, from one rfft2."""
    B, C, H, W = x.shape
    spectrum = torch.fft.rfft2(x.to(torch.float32))  # (B, C, H, W // 2 + 1)
    u, v = freqs[:, 0], freqs[:, 1]
    stored = v <= W // 2  # else use F(u, v) = conj(F(-u, -v))
    F = spectrum[:, :, torch.where(stored, u, (H - u) % H), torch.where(stored, v, (W - v) % W)]  # (B, C, K)
    F = torch.where(stored, F, F.conj().resolve_conj())
    self_conjugate = ((2 * u) % H == 0) & ((2 * v) % W == 0)
    scale = torch.where(self_conjugate, 1.0, 2.0).to(torch.float32) / (H * W)
    coef = F.permute(2, 0, 1) * scale[:, None, None]
    return torch.view_as_real(coef.contiguous()).reshape(freqs.shape[0], B * C, 2).contiguous()


def _phase_tables(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2 pi j / n, j < n, as (n,) float32, evaluated in float64."""

    def build(device):
        angle = (2 * math.pi / n) * torch.arange(n, dtype=torch.float64, device=device)
        return torch.cos(angle).to(torch.float32), torch.sin(angle).to(torch.float32)

    return cached(("phase", n), like, build)


def _remove_blocks(H: int, W: int) -> tuple[int, int]:
    block_x = _pow2(W, 16, 128)
    block_y = _pow2(H, 1, max(1, 4096 // block_x))
    return block_y, block_x


def _remove_layout(H: int, W: int, K: int) -> tuple[int, ...]:
    """(BLOCK_Y, BLOCK_X, K_GROUP, k groups, x tiles, output tiles) of a remove_frequencies
    launch: shapes only."""
    block_y, block_x = _remove_blocks(H, W)
    k_group = min(8, triton.next_power_of_2(K))
    tiles_x = triton.cdiv(W, block_x)
    return block_y, block_x, k_group, triton.cdiv(K, k_group), tiles_x, triton.cdiv(H, block_y) * tiles_x


def remove_frequencies_grid(B: int, C: int, H: int, W: int, K: int) -> tuple[int]:
    """The launch grid: one program per (image-channel, group of frequencies, output tile)."""
    *_, n_kgroups, _, n_tiles = _remove_layout(H, W, K)
    return (B * C * n_kgroups * n_tiles,)


@torch.library.triton_op("shortcut_fast::remove_frequencies_triton", mutates_args=())
def remove_frequencies_op(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) float32/16/bf16 contiguous, freqs (K, 2) int64 (u, v) on the unshifted
    grid -> (K, B, C, H, W) float32: each image minus the conjugate pair {(u, v), (-u, -v)}."""
    B, C, H, W = x.shape
    K = freqs.shape[0]
    out = torch.empty((K, B, C, H, W), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    BC = B * C
    freqs = freqs.to(device=x.device, dtype=torch.int64).contiguous()
    coef = _pair_coefficients(x, freqs)
    block_y, block_x, k_group, n_kgroups, tiles_x, n_tiles = _remove_layout(H, W, K)
    cos_h, sin_h = _phase_tables(H, x)
    cos_w, sin_w = _phase_tables(W, x)
    torch.library.wrap_triton(_remove_frequencies_kernel)[remove_frequencies_grid(B, C, H, W, K)](
        x, coef, freqs, cos_h, sin_h, cos_w, sin_w, out,
        K, BC, H, W, tiles_x, n_tiles, n_kgroups,
        K_GROUP=k_group, BLOCK_Y=block_y, BLOCK_X=block_x,
        # 8 pixels a thread: 4 warps for a 32 x 32 tile, 16 for 4096 pixels (8 warps
        # spilled on sm_90 there with 8 frequencies a program).
        num_warps=max(4, min(16, block_y * block_x // 256)),
    )
    return out


@remove_frequencies_op.register_fake
def _(x, freqs):
    return x.new_empty((freqs.shape[0], *x.shape), dtype=torch.float32)
