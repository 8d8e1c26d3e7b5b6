"""Triton kernels of channel_ablate and group_outcomes (shortcut_fast.ops.ablation).

channel_ablate_op(act (P, C, S), mask (V, C) bool, rep (C,) | (P, C, S)) -> (V, P, C, S)
-------------------------------------------------------------------------------
The op copies values, so the kernel moves raw bits: act and rep are viewed as int16 /
int32 of the same size (float16, bfloat16 and float32 pass through unchanged, bit-exact,
and the interpreter needs no bfloat16 support). A program loads one BLOCK of act (and of
rep) once and writes it for a run of variants, choosing per element between act and rep
by mask[v, c]: act is read once, each output element written once, the floor of the op.
Grid: (act blocks, variant groups); variant groups are added only when act alone has too
few blocks to fill the device.

group_outcomes_op(logits (V, B, L), labels, groups, G) -> correct (V, G), loss (V, G)
-------------------------------------------------------------------------------
A program takes BLOCK_B samples of one variant and walks L in BLOCK_L chunks with an
online log-sum-exp and a running first argmax (a later chunk wins only with a strictly
larger maximum; tl.argmax breaks ties to the left within a chunk). Per-sample results are
reduced into (V, G) with atomics: for small G one masked sum and one scalar atomic per
group and program, otherwise one atomic per sample. Counts accumulate in int32 (at most B
per cell) and are widened to int64; float32 atomics make the loss sum order (not the
counts) depend on scheduling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shortcut_fast.kernels import INTERPRET

_BITS = {2: torch.int16, 4: torch.int32}
# Groups up to this count are reduced in registers (one atomic per group and program).
_SMALL_G = 16


@triton.jit
def _channel_ablate_kernel(act_ptr, mask_ptr, rep_ptr, out_ptr, N, C, S, V, V_PER_PROG,
                           FULL_REP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # N < 2^31 (checked by the op)
    ok = offs < N
    c = (offs // S) % C
    a = tl.load(act_ptr + offs, mask=ok, other=0)
    if FULL_REP:
        r = tl.load(rep_ptr + offs, mask=ok, other=0)
    else:
        r = tl.load(rep_ptr + c, mask=ok, other=0)
    v0 = tl.program_id(1) * V_PER_PROG
    for i in range(0, V_PER_PROG):
        v = v0 + i
        if v < V:
            m = tl.load(mask_ptr + v * C + c, mask=ok, other=0)
            tl.store(out_ptr + v.to(tl.int64) * N + offs, tl.where(m != 0, r, a), mask=ok)


_ABLATE_BLOCK = 1024


def channel_ablate_grid(P: int, C: int, S: int, V: int) -> tuple[int, int]:
    """The launch grid: (blocks of act, variant groups); each group writes cdiv(V, groups)
    variants."""
    n_blocks = triton.cdiv(P * C * S, _ABLATE_BLOCK)
    # Enough programs to fill a GPU; in the interpreter, as few as possible (each is slow).
    target = 1 if INTERPRET else 2048
    groups = min(V, max(1, triton.cdiv(target, n_blocks)), 65535)
    return n_blocks, triton.cdiv(V, triton.cdiv(V, groups))


@torch.library.triton_op("shortcut_fast::channel_ablate_triton", mutates_args=())
def channel_ablate_op(act: torch.Tensor, mask: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """act (P, C, S) float16/bfloat16/float32, mask (V, C) bool, replacement (C,) or
    (P, C, S) in act's dtype -> (V, P, C, S)."""
    if act.element_size() not in _BITS:
        raise TypeError(f"channel_ablate_triton: act must be float16/bfloat16/float32, got {act.dtype}")
    P, C, S = act.shape
    V = mask.shape[0]
    N = P * C * S
    if N >= 2**31:
        raise ValueError(f"channel_ablate_triton: act has {N} elements; at most 2^31 - 1 per call")
    bits = _BITS[act.element_size()]
    out = torch.empty((V, P, C, S), dtype=bits, device=act.device)
    if out.numel() == 0:
        return out.view(act.dtype)
    a = act.contiguous().view(bits)
    r = replacement.to(act.dtype).contiguous().view(bits)
    m = mask.contiguous().view(torch.uint8)
    grid = channel_ablate_grid(P, C, S, V)
    torch.library.wrap_triton(_channel_ablate_kernel)[grid](
        a, m, r, out, N, C, S, V, triton.cdiv(V, grid[1]), FULL_REP=r.dim() == 3, BLOCK=_ABLATE_BLOCK)
    return out.view(act.dtype)


@channel_ablate_op.register_fake
def _(act, mask, replacement):
    return act.new_empty((mask.shape[0], *act.shape))


@triton.jit
def _group_outcomes_kernel(logits_ptr, labels_ptr, groups_ptr, correct_ptr, loss_ptr, B, L, G, N_BBLOCKS,
                           SMALL_G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
    # One flat grid axis (up to 2^31 - 1 programs): sample block fastest, then the variant.
    pid = tl.program_id(0)
    v = pid // N_BBLOCKS
    b = (pid % N_BBLOCKS) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < B
    row = logits_ptr + (v.to(tl.int64) * B + b) * L
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_B,), tl.int32)
    total = tl.zeros((BLOCK_B,), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        x = tl.load(row[:, None] + cols[None, :], mask=b_ok[:, None] & (cols < L)[None, :],
                    other=float("-inf")).to(tl.float32)
        x = tl.where(b_ok[:, None], x, 0.0)  # rows past B: finite, discarded below
        chunk_max = tl.max(x, axis=1)
        chunk_arg = tl.argmax(x, axis=1, tie_break_left=True).to(tl.int32) + l0
        new_best = tl.maximum(best, chunk_max)
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(x - new_best[:, None]), axis=1)
        arg = tl.where(chunk_max > best, chunk_arg, arg)  # strict: earlier chunks win ties
        best = new_best
    y = tl.load(labels_ptr + b, mask=b_ok, other=0)
    g = tl.load(groups_ptr + b, mask=b_ok, other=0)
    x_y = tl.load(row + y, mask=b_ok, other=0.0).to(tl.float32)
    loss = tl.where(b_ok, tl.log(total) + best - x_y, 0.0)
    hit = tl.where(b_ok & (arg == y), 1, 0).to(tl.int32)
    out = v * G
    if SMALL_G:
        for k in range(0, G):
            in_k = b_ok & (g == k)
            tl.atomic_add(loss_ptr + out + k, tl.sum(tl.where(in_k, loss, 0.0), axis=0))
            tl.atomic_add(correct_ptr + out + k, tl.sum(tl.where(in_k, hit, 0), axis=0))
    else:
        tl.atomic_add(loss_ptr + out + g, loss, mask=b_ok)
        tl.atomic_add(correct_ptr + out + g, hit, mask=b_ok)


def _group_outcomes_blocks(B: int, L: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_L, num_warps). On a GPU a program holds 4096 logits, which 8 warps
    keep in registers (4 warps spill 88-596 bytes on sm_80 and sm_90); the interpreter pays
    per program, so it gets larger tiles."""
    block_l = min(triton.next_power_of_2(L), 128 if INTERPRET else 64)
    block_b = max(1, min(triton.next_power_of_2(B), (16384 if INTERPRET else 4096) // block_l))
    return block_b, block_l, 4 if INTERPRET else 8


def group_outcomes_grid(V: int, B: int, L: int) -> tuple[int]:
    """The launch grid: one program per BLOCK_B samples of one variant."""
    return (triton.cdiv(B, _group_outcomes_blocks(B, L)[0]) * V,)


@torch.library.triton_op("shortcut_fast::group_outcomes_triton", mutates_args=())
def group_outcomes_op(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                      num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (V, B, L) float16/bfloat16/float32, labels and groups (B,) int64 ->
    correct (V, G) int64, loss (V, G) float32.

    Launch-bound where it is used: a sweep chunk (up to 15 variants x 1,024 images x 10
    classes in the ablation bench) or DeNetDM's evaluation batch (3 heads x 12 members x
    1,024 images) is at most 1.5 MB of logits, under a microsecond of an H100's memory time,
    less than the launch itself costs; more than its 4-144 programs would not shorten it.
    """
    if logits.dtype == torch.float64:
        raise TypeError("group_outcomes_triton: the kernel computes in float32; float64 logits need torch/cpp/cuda")
    V, B, L = logits.shape
    correct = torch.zeros((V, num_groups), dtype=torch.int32, device=logits.device)
    loss = torch.zeros((V, num_groups), dtype=torch.float32, device=logits.device)
    if V and B:
        block_b, block_l, warps = _group_outcomes_blocks(B, L)
        grid = group_outcomes_grid(V, B, L)
        torch.library.wrap_triton(_group_outcomes_kernel)[grid](
            logits.contiguous(), labels.contiguous(), groups.contiguous(), correct, loss, B, L, num_groups, grid[0] // V,
            SMALL_G=num_groups <= _SMALL_G, BLOCK_B=block_b, BLOCK_L=block_l, num_warps=warps)
    return correct.to(torch.int64), loss


@group_outcomes_op.register_fake
def _(logits, labels, groups, num_groups):
    V = logits.shape[0]
    return (logits.new_empty((V, num_groups), dtype=torch.int64),
            logits.new_empty((V, num_groups), dtype=torch.float32))
