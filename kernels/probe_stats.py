"""Triton kernel of probe_stats (shortcut_fast.ops.probe_stats): linear-probe statistics of a chunk.

    probe_stats_op(x, z) = (x^T x, x^T z, sum_n x, sum_n z, sum_n z^2)

One fused tiled kernel computes the single product

    G = [X | 1]^T [X | Z]            (D + 1, D + K)

over a loop on sample blocks: rows 0..D-1 of G are x^T x and x^T z, row D (the column of
ones) holds the column sums of x and of z, all from the same tl.dot tiles. The programs
whose row block contains the ones row also accumulate the column sums of squares of the
[X | Z] tiles they already hold in registers, so sum z^2 costs no extra read. x^T x is
symmetric: tiles strictly below its diagonal are skipped and mirrored on the host, which
saves up to half the work when D >> K. Inputs are float32, accumulation is float32; the
products are exact float32 ("ieee") unless another precision is asked for (kernels/_dot.py).

Grid (probe_stats_grid): (row blocks of G, column blocks, splits of the samples). When the
tiles that do work (those below the diagonal exit at once) are fewer than MIN_PROGRAMS, as
for a few hundred features and targets, the N samples are split into contiguous ranges (of
at least _MIN_SPLIT_ROWS rows) and each split writes its own partial G, summed afterwards;
one split writes G itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shortcut_fast.kernels import INTERPRET, MIN_PROGRAMS
from shortcut_fast.kernels._dot import dot


@triton.jit
def _probe_stats_kernel(
    x_ptr,  # (N, D) float32 contiguous
    z_ptr,  # (N, K) float32 contiguous
    g_ptr,  # (D + 1, D + K) float32 output: [X | 1]^T [X | Z]
    sq_ptr,  # (D + K,) float32 output: column sums of squares of [X | Z]
    N, D, K, ROWS,  # ROWS: samples per split (the third grid axis); partial G / sq per split
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    j0 = pid_j * BLOCK_J
    n_start = pid_s * ROWS
    n_stop = tl.minimum(n_start + ROWS, N)
    g_ptr += pid_s.to(tl.int64) * (D + 1) * (D + K)
    sq_ptr += pid_s * (D + K)
    # A tile strictly below the diagonal of x^T x, and not holding the ones row: mirrored
    # on the host instead of computed.
    below = (j0 + BLOCK_J <= D) & (m0 >= j0 + BLOCK_J) & (m0 + BLOCK_M <= D)
    if not below:
        has_ones = (m0 <= D) & (D < m0 + BLOCK_M)
        rows = m0 + tl.arange(0, BLOCK_M)  # rows of G: features, D is the ones row
        cols = j0 + tl.arange(0, BLOCK_J)  # columns of G: features of x, then targets of z
        is_x_col = cols < D
        is_z_col = (cols >= D) & (cols < D + K)
        ones_row = (rows == D)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
        sq = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for n0 in range(n_start, n_stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < n_stop
            n64 = n.to(tl.int64)
            # A^T tile (BLOCK_N, BLOCK_M): x[n, rows], ones in the ones row; x is row-major
            # so the loads run along the contiguous feature axis.
            a = tl.load(x_ptr + n64[:, None] * D + rows[None, :], mask=n_ok[:, None] & (rows < D)[None, :],
                        other=0.0)
            a = tl.where(ones_row & n_ok[:, None], 1.0, a)
            # B tile (BLOCK_N, BLOCK_J): x columns then z columns (disjoint masks).
            b = tl.load(x_ptr + n64[:, None] * D + cols[None, :], mask=n_ok[:, None] & is_x_col[None, :],
                        other=0.0)
            b += tl.load(z_ptr + n64[:, None] * K + (cols - D)[None, :], mask=n_ok[:, None] & is_z_col[None, :],
                         other=0.0)
            acc += dot(tl.trans(a), b, PRECISION)
            if has_ones:
                sq += tl.sum(b * b, axis=0)
        out_ok = (rows <= D)[:, None] & (cols < D + K)[None, :]
        tl.store(g_ptr + rows.to(tl.int64)[:, None] * (D + K) + cols[None, :], acc, mask=out_ok)
        if has_ones:
            tl.store(sq_ptr + cols, sq, mask=cols < D + K)


def _blocks(D: int, K: int, precision: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_J, BLOCK_N, num_warps). tl.dot needs every dimension >= 16; the
    interpreter pays per program, so it gets fewer, larger tiles. BLOCK_N is the K of the
    product: "ieee" runs on FMAs holding whole K-slices of both operands in registers and
    "tf32x3" splits each operand in two, so both take 16 (32 spilled 128-672 bytes on
    sm_80/sm_90); plain "tf32" and "bf16" (half the operand registers) keep 32."""
    if INTERPRET:
        return 64, 64, 64, 4
    block = 128 if D + K >= 1024 else 64
    return block, block, 32 if precision in ("tf32", "bf16") else 16, 8 if block == 128 else 4


# A split of the samples takes at least this many rows: fewer would make the partial G it
# writes as costly as the products it computes.
_MIN_SPLIT_ROWS = 64


def _skipped_tiles(D: int, block_m: int, block_j: int) -> int:
    """Programs whose tile lies strictly below the diagonal of x^T x (the kernel's `below`)."""
    return sum(1 for j0 in range(0, D + 1 - block_j, block_j)
               for m0 in range(0, D + 1 - block_m, block_m) if m0 >= j0 + block_j)


def probe_stats_grid(N: int, D: int, K: int, precision: str = "ieee") -> tuple[int, int, int]:
    """The launch grid: (row blocks of G, column blocks, splits of the N samples). The splits
    bring the programs that do work to MIN_PROGRAMS on a GPU (one on the interpreter), each
    at least _MIN_SPLIT_ROWS samples; every split gets some."""
    block_m, block_j, _, _ = _blocks(D, K, precision)
    rows, cols = triton.cdiv(D + 1, block_m), triton.cdiv(D + K, block_j)
    working = max(1, rows * cols - _skipped_tiles(D, block_m, block_j))
    splits = min(triton.cdiv(1 if INTERPRET else MIN_PROGRAMS, working), triton.cdiv(N, _MIN_SPLIT_ROWS))
    splits = triton.cdiv(N, triton.cdiv(N, max(splits, 1))) if N else 1
    return rows, cols, splits


@torch.library.triton_op("shortcut_fast::probe_stats_triton", mutates_args=())
def probe_stats_op(x: torch.Tensor, z: torch.Tensor, precision: str = "ieee") -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, D), z (N, K) float32 contiguous -> (x^T x, x^T z, sum x, sum z, sum z^2), float32.

    precision: of the products (shortcut_fast.ops.precision, kernels/_dot.py), "ieee"
    (float32 products, default), "tf32x3" (about float32 accuracy on tensor cores), "tf32" or
    "bf16".

    Launch-bound for the narrowest layers: a batch of 1,024 samples of 64 features and 256
    targets (a ResNet-18 stem block in the complexity pass) is 42 MFLOP, under a microsecond
    of an H100, and its 160 programs (rows of 64 samples) cannot be more without splitting
    below what a partial G costs.
    """
    N, D = x.shape
    K = z.shape[1]
    x = x.to(torch.float32).contiguous()
    z = z.to(torch.float32).contiguous()
    grid = probe_stats_grid(N, D, K, precision)
    splits = grid[2]
    parts = (splits,) if splits > 1 else ()  # a partial G per split, summed below
    # zeros: skipped tiles and the programs without the ones row leave their parts at 0
    g = torch.zeros((*parts, D + 1, D + K), device=x.device, dtype=torch.float32)
    sq = torch.zeros((*parts, D + K), device=x.device, dtype=torch.float32)
    if N > 0 and D + K > 0:
        block_m, block_j, block_n, warps = _blocks(D, K, precision)
        torch.library.wrap_triton(_probe_stats_kernel)[grid](
            x, z, g, sq, N, D, K, triton.cdiv(N, splits),
            BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_N=block_n, PRECISION=precision, num_warps=warps,
        )
    if splits > 1:
        g, sq = g.sum(0), sq.sum(0)
    xx = g[:D, :D]
    xx = torch.triu(xx) + torch.triu(xx, 1).mT  # skipped lower tiles are zeros: mirror the upper triangle
    # separate storages: outputs of a torch.library op may not alias each other
    return xx, g[:D, D:].clone(), g[D, :D].clone(), g[D, D:].clone(), sq[D:].clone()


@probe_stats_op.register_fake
def _(x, z, precision="ieee"):
    D, K = x.shape[1], z.shape[1]
    new = lambda *shape: x.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(D, D), new(D, K), new(D), new(K), new(K)
