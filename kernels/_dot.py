"""tl.dot at a precision (shortcut_fast.ops.precision): the one place a kernel turns a
precision name into the operands its matmuls read. Every precision accumulates in float32.

    ieee    float32 operands, exact float32 products (FMA units, no tensor cores)
    tf32x3  each operand split into a tf32 part and a tf32 remainder, three tensor-core
            products (the two remainders' product dropped): about float32 accuracy
    tf32    float32 operands as the tensor cores read them: the top 10 mantissa bits
    bf16    operands rounded to bfloat16 (7 mantissa bits), tensor-core products

The interpreter (TRITON_INTERPRET=1) ignores input_precision and multiplies bfloat16 tiles
wrongly, so there the operands are rounded here as the GPU would (bit operations on the
float32 values) and multiplied in float32: what the CPU tests check is the rounding the GPU
applies, with at most float32 noise of its own. tf32 is emulated by truncation (the 13 low
bits dropped, the larger error of the two ways the tensor cores may read a float32); bf16 by
round-to-nearest-even, what the conversion does; tf32x3 as a round-to-nearest tf32 part
plus a truncated tf32 remainder, the product of the two remainders dropped.
"""
from __future__ import annotations

import triton
import triton.language as tl

from shortcut_fast.kernels import INTERPRET

EMULATE = tl.constexpr(INTERPRET)


@triton.jit
def _tf32_truncated(a):
    return (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_nearest(a):
    # round half away from zero on the 13 dropped bits (cvt.rna.tf32.f32)
    return ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_nearest_even(a):
    bits = a.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """a @ b of float32 tiles, products at PRECISION, accumulated in float32."""
    if PRECISION == "bf16":
        if EMULATE:
            out = tl.dot(_bf16_nearest_even(a), _bf16_nearest_even(b), input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PRECISION == "tf32":
        if EMULATE:
            out = tl.dot(_tf32_truncated(a), _tf32_truncated(b), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision="tf32")
    elif PRECISION == "tf32x3":
        if EMULATE:
            a_hi = _tf32_nearest(a)
            b_hi = _tf32_nearest(b)
            a_lo = _tf32_truncated(a - a_hi)
            b_lo = _tf32_truncated(b - b_hi)
            out = tl.dot(a_hi, b_lo, input_precision="ieee")
            out += tl.dot(a_lo, b_hi, input_precision="ieee")
            out += tl.dot(a_hi, b_hi, input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision="tf32x3")
    else:  # "ieee"; the ops (shortcut_fast.ops.precision) check the name before any launch
        out = tl.dot(a, b, input_precision="ieee")
    return out
