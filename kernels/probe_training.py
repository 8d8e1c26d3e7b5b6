"""Triton kernel of probe_step: forward, loss and gradient of K linear probes on one
minibatch, in one launch (shortcut_fast.ops.probe_training).

All probes read the same minibatch x (N, D). Probe k has weight W[k] (D, C) and bias
b[k] (C,); logistic and Gaussian probes are the case C = 1. Flattening the probes gives
one (D, K*C) matrix, so the logits of every probe are one matmul Z = x W + b. For a
residual R = dLoss_n/dZ (per sample) the gradient of the mean loss is
    dW = x^T R / N,   db = sum_n R / N,
and the three families differ only in the epilogue that turns Z into (loss, R):
    softmax   p = softmax(Z[k]),    loss = logsumexp(Z[k]) - Z[k, y],  R = p - onehot(y)
    logistic  s = sigmoid(z),       loss = softplus(z) - y z,          R = s - y
    gaussian  mu = z, v = log_var,  loss = (log 2 pi + v + (y - mu)^2 e^-v) / 2,
                                    R = (mu - y) e^-v,  dv = (1 - (y - mu)^2 e^-v) / 2

Grid: (column blocks, D blocks). A column block holds BLOCK_P whole probes (BLOCK_P *
BLOCK_C columns, classes padded to a power of two) so the softmax over classes stays in
registers. Each program loops over the minibatch in BLOCK_N rows: it recomputes the
(BLOCK_N, BLOCK_P*BLOCK_C) logits tile over all of D (BLOCK_K features at a time), applies
the epilogue and adds
x[rows, d_block]^T R to its (BLOCK_D, BLOCK_P*BLOCK_C) gradient tile. Recomputing the
logits per D block costs (D / BLOCK_D) extra forward passes but needs no N x K*C buffer
and no atomics: every output element has exactly one writer (loss, db and dlog_var are
written by the programs with D block 0). Math in float32; the two products at the
precision asked for (kernels/_dot.py), "ieee" (exact float32 products) by default.

When column and D blocks are fewer than MIN_PROGRAMS (a few probes: 16 softmax probes of
512 features are 32 programs), a third grid axis splits the minibatch into contiguous row
ranges (probe_step_grid); each split writes its own partial loss and gradients, summed
afterwards. One split writes the outputs themselves.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from shortcut_fast.kernels import INTERPRET, MIN_PROGRAMS
from shortcut_fast.kernels._dot import dot

FAMILY_CODES = {"softmax": 0, "logistic": 1, "gaussian": 2}
# A column block holds whole probes, so C (padded to a power of two) columns must fit one
# register tile next to a (BLOCK_D, C) gradient tile.
MAX_CLASSES = 256
_LOG_2PI = math.log(2 * math.pi)


@triton.jit
def _probe_step_kernel(
    x_ptr, t_ptr, w_ptr, b_ptr, lv_ptr,
    loss_ptr, gw_ptr, gb_ptr, glv_ptr,
    N, D, K, C, ROWS,  # ROWS: minibatch rows per split (the third grid axis)
    stride_xn, stride_xd, stride_tn, stride_tk,
    stride_wk, stride_wd, stride_wc, stride_bk, stride_bc,
    inv_n, log_2pi,
    FAMILY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    BLOCK_J: tl.constexpr = BLOCK_P * BLOCK_C
    pid_j = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_start = pid_s * ROWS
    n_stop = tl.minimum(n_start + ROWS, N)
    # each split writes its own partial outputs (K, D, C), (K, C), (K,), (K,)
    gw_ptr += pid_s.to(tl.int64) * K * D * C
    gb_ptr += pid_s * K * C
    loss_ptr += pid_s * K
    glv_ptr += pid_s * K

    # Columns of this block: probe p_of[j], class c_of[j].
    jj = tl.arange(0, BLOCK_J)
    p_of = pid_j * BLOCK_P + jj // BLOCK_C
    c_of = jj % BLOCK_C
    col_ok = (p_of < K) & (c_of < C)
    probes = pid_j * BLOCK_P + tl.arange(0, BLOCK_P)
    probe_ok = probes < K
    d_blk = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_blk_ok = d_blk < D

    bias = tl.load(b_ptr + p_of * stride_bk + c_of * stride_bc, mask=col_ok, other=0.0).to(tl.float32)
    if FAMILY == 2:
        log_var = tl.load(lv_ptr + probes, mask=probe_ok, other=0.0).to(tl.float32)
        inv_var = tl.exp(-log_var)

    grad_w = tl.zeros((BLOCK_D, BLOCK_J), dtype=tl.float32)
    grad_b = tl.zeros((BLOCK_J,), dtype=tl.float32)
    loss = tl.zeros((BLOCK_P,), dtype=tl.float32)
    grad_lv = tl.zeros((BLOCK_P,), dtype=tl.float32)

    for n0 in range(n_start, n_stop, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rows_ok = rows < n_stop
        # Logits of this column block for these rows, over all of D.
        z = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            d = d0 + tl.arange(0, BLOCK_K)
            d_ok = d < D
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd,
                         mask=rows_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + p_of[None, :] * stride_wk + d[:, None] * stride_wd + c_of[None, :] * stride_wc,
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            z += dot(xt, wt, PRECISION)
        z += bias[None, :]
        valid = rows_ok[:, None] & probe_ok[None, :]
        target = tl.load(t_ptr + rows[:, None] * stride_tn + probes[None, :] * stride_tk,
                         mask=valid, other=0.0).to(tl.float32)

        if FAMILY == 0:
            classes = tl.arange(0, BLOCK_C)
            z3 = tl.reshape(z, (BLOCK_N, BLOCK_P, BLOCK_C))
            class_ok = (classes < C)[None, None, :]
            z3 = tl.where(class_ok, z3, float("-inf"))
            z_max = tl.max(z3, axis=2)
            e = tl.where(class_ok, tl.exp(z3 - z_max[:, :, None]), 0.0)
            s = tl.sum(e, axis=2)
            onehot = classes[None, None, :] == target.to(tl.int32)[:, :, None]
            z_target = tl.sum(tl.where(onehot, z3, 0.0), axis=2)
            sample_loss = tl.log(s) + z_max - z_target
            r3 = e / s[:, :, None] - onehot.to(tl.float32)
            r3 = tl.where(valid[:, :, None], r3, 0.0)
            # The select makes r a 2-D tensor of its own before it meets the tensor cores: fed
            # the reshape directly, sm_90's tf32 operand layout of a (.., .., 2 or 4) tile does
            # not exist and compilation fails. Padded columns are 0 already.
            r = tl.where(col_ok[None, :], tl.reshape(r3, (BLOCK_N, BLOCK_J)), 0.0)
        elif FAMILY == 1:
            # C == BLOCK_C == 1: the columns are the probes.
            sample_loss = tl.maximum(z, 0.0) - z * target + tl.log(1.0 + tl.exp(-tl.abs(z)))
            r = tl.where(valid, tl.sigmoid(z) - target, 0.0)
        else:
            diff = z - target
            sq = diff * diff * inv_var[None, :]
            sample_loss = 0.5 * (log_2pi + log_var[None, :] + sq)
            r = tl.where(valid, diff * inv_var[None, :], 0.0)
            grad_lv += tl.sum(tl.where(valid, 0.5 * (1.0 - sq), 0.0), axis=0)

        loss += tl.sum(tl.where(valid, sample_loss, 0.0), axis=0)
        grad_b += tl.sum(r, axis=0)
        xd = tl.load(x_ptr + rows[:, None] * stride_xn + d_blk[None, :] * stride_xd,
                     mask=rows_ok[:, None] & d_blk_ok[None, :], other=0.0).to(tl.float32)
        grad_w += dot(tl.trans(xd), r, PRECISION)

    # Gradients are written contiguous (K, D, C).
    gw_offsets = p_of[None, :] * (D * C) + d_blk[:, None] * C + c_of[None, :]
    tl.store(gw_ptr + gw_offsets, grad_w * inv_n, mask=d_blk_ok[:, None] & col_ok[None, :])
    if pid_d == 0:
        tl.store(gb_ptr + p_of * C + c_of, grad_b * inv_n, mask=col_ok)
        tl.store(loss_ptr + probes, loss * inv_n, mask=probe_ok)
        tl.store(glv_ptr + probes, grad_lv * inv_n, mask=probe_ok)


def _blocks(K: int, D: int, C: int, precision: str = "ieee") -> dict:
    """Constexprs and warps of a launch. tl.dot needs every dimension >= 16; ~64 columns
    (whole probes) per program keep registers in check. The float32 ("ieee") tl.dot runs on
    FMAs that hold whole K-slices of both operands in registers, so on a GPU the K of both
    products (BLOCK_K of the logits, BLOCK_N of the gradient) is 16 and 8 warps share the
    tiles: with 64 the softmax kernel spilled 2-5 KB on sm_90 from 100 classes on and
    ptxas fell to 32 registers and a 5-16 KB stack on sm_80. "tf32x3" splits every operand
    in two: with 128 columns or more its gradient tile has 32 rows (64 spilled 64-368 bytes
    on sm_80/sm_90 at 256 classes). The interpreter pays per loop step, so it takes 64."""
    block_c = triton.next_power_of_2(C)
    block_p = max(min(triton.next_power_of_2(K), max(1, 64 // block_c)), -(-16 // block_c))
    wide = precision == "tf32x3" and block_p * block_c >= 128
    block_d = max(16, min(32 if wide else 64, triton.next_power_of_2(D)))
    step = 64 if INTERPRET else 16
    return dict(BLOCK_N=step, BLOCK_D=block_d, BLOCK_K=min(step, block_d), BLOCK_P=block_p, BLOCK_C=block_c,
                num_warps=4 if INTERPRET else 8)


# A split takes at least this many minibatch rows: its partial gradients cost a write and a
# read of (K, D, C) each, which fewer rows would not pay for.
_MIN_SPLIT_ROWS = 64


def probe_step_grid(N: int, D: int, K: int, C: int, precision: str = "ieee") -> tuple[int, int, int]:
    """The launch grid: (column blocks, D blocks, splits of the N rows). The splits bring the
    programs to MIN_PROGRAMS on a GPU (one on the interpreter), each at least
    _MIN_SPLIT_ROWS rows; every split gets some."""
    blocks = _blocks(K, D, C, precision)
    cols, d_blocks = triton.cdiv(K, blocks["BLOCK_P"]), max(1, triton.cdiv(D, blocks["BLOCK_D"]))
    splits = min(triton.cdiv(1 if INTERPRET else MIN_PROGRAMS, max(1, cols * d_blocks)),
                 triton.cdiv(N, _MIN_SPLIT_ROWS))
    splits = triton.cdiv(N, triton.cdiv(N, max(splits, 1))) if N else 1
    return cols, d_blocks, splits


# Registered as a torch.library op so it composes with torch.compile (fake below).
@torch.library.triton_op("shortcut_fast::probe_step_triton", mutates_args=())
def probe_step_op(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  log_var: torch.Tensor, family: int,
                  precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, D), targets (N, K) float32 (class index / 0-1 label / value), weight (K, D, C),
    bias (K, C), log_var (K,) (read for the Gaussian family only), family code (FAMILY_CODES).
    Returns (loss (K,), grad_weight (K, D, C), grad_bias (K, C), grad_log_var (K,)), float32.
    precision: of the logits' and the gradient's products (shortcut_fast.ops.precision).

    Launch-bound for a few logistic or Gaussian probes: 16 of them on a batch of 1,024 x 512
    is 34 MFLOP, under a microsecond of an H100; its 128 programs (rows of 64 samples) cannot
    be more without splitting below what the partial gradients cost.
    """
    N, D = x.shape
    K, _, C = weight.shape
    grid = probe_step_grid(N, D, K, C, precision) if N and K else (0, 0, 1)
    splits = grid[2]
    parts = (splits,) if splits > 1 else ()  # partial outputs per split, summed below
    loss = torch.zeros((*parts, K), device=x.device, dtype=torch.float32)
    grad_w = torch.zeros((*parts, K, D, C), device=x.device, dtype=torch.float32)
    grad_b = torch.zeros((*parts, K, C), device=x.device, dtype=torch.float32)
    grad_lv = torch.zeros((*parts, K), device=x.device, dtype=torch.float32)
    if N == 0 or K == 0:
        return loss, grad_w, grad_b, grad_lv
    torch.library.wrap_triton(_probe_step_kernel)[grid](
        x, targets, weight, bias, log_var,
        loss, grad_w, grad_b, grad_lv,
        N, D, K, C, triton.cdiv(N, splits),
        x.stride(0), x.stride(1), targets.stride(0), targets.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2), bias.stride(0), bias.stride(1),
        1.0 / N, _LOG_2PI,
        FAMILY=family, PRECISION=precision, **_blocks(K, D, C, precision),
    )
    if splits == 1:
        return loss, grad_w, grad_b, grad_lv
    return loss.sum(0), grad_w.sum(0), grad_b.sum(0), grad_lv.sum(0)


@probe_step_op.register_fake
def _(x, targets, weight, bias, log_var, family, precision="ieee"):
    K, D, C = weight.shape
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((K,), **f32), x.new_empty((K, D, C), **f32), x.new_empty((K, C), **f32),
            x.new_empty((K,), **f32))
