"""Triton's CPU interpreter made to compute bfloat16 as the GPU does, so kernels need no interpreter-only branches.

The interpreter stores bfloat16 as uint16 bit patterns. Two of its operations then differ from the GPU
(triton#11584, still so in Triton 3.8):
  * tl.dot multiplies the bit patterns as integers; the GPU multiplies the values (exact products, fp32 sums);
  * casts to and from bfloat16 truncate (float32) or convert the bit pattern as an integer (bool, int, fp16);
    the GPU converts values, rounding to nearest even.
`make_bfloat16_exact` wraps those two builder operations, after probing that they are still wrong (a fixed
Triton is left alone). Only the interpreter is touched; compiled kernels never see this module. Other arithmetic
on bfloat16 values is still done on bit patterns by the interpreter: kernels convert loaded bfloat16 to float32
before computing with it (as they should on the GPU too).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, NaN kept NaN (what cvt.rn.bf16.f32 does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype(np.uint16)


def _probe_is_wrong(builder_cls, handle, tl) -> bool:
    """True when the interpreter's bf16 dot or fp32 -> bf16 cast still differs from the GPU's arithmetic (one bug
    report, one fix upstream: both are probed, and all bf16 conversions are patched together)."""
    a = np.array([[0x3FC0]], dtype=np.uint16)  # 1.5
    acc = handle(np.zeros((1, 1), np.float32), tl.float32)
    dot = builder_cls.create_dot(None, handle(a, tl.bfloat16), handle(a, tl.bfloat16), acc, None, 0)
    cast = builder_cls.cast_impl(None, handle(np.array([1.00390625 + 2**-9], np.float32), tl.float32), tl.bfloat16)
    return float(dot.data[0, 0]) != 2.25 or int(cast.data.view(np.uint16)[0]) != 0x3F81


@functools.cache
def make_bfloat16_exact() -> bool:
    """Patches the interpreter if needed; returns whether it did."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    try:
        wrong = _probe_is_wrong(InterpreterBuilder, TensorHandle, tl)
    except Exception as err:  # the interpreter's internals moved: leave it alone, the bf16 tests will tell
        warnings.warn(f"corrclip: could not probe Triton's interpreter for bfloat16 ({err!r})", RuntimeWarning,
                      stacklevel=2)
        return False
    if not wrong:
        return False
    dot, cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def as_f32(h):
        return TensorHandle(_bf16_bits_to_f32(h.data), tl.float32) if h.dtype.scalar == tl.bfloat16 else h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        src_bf16, dst_bf16 = src.dtype.scalar == tl.bfloat16, dst_type.scalar == tl.bfloat16
        if src_bf16 and not dst_bf16:  # through the float32 value, not the bit pattern
            return cast(self, as_f32(src), dst_type)
        if dst_bf16 and not src_bf16:  # from any value (bool, int, fp16, fp32), rounded to nearest even
            return TensorHandle(_f32_to_bf16_bits(src.data.astype(np.float32)), tl.bfloat16)
        return cast(self, src, dst_type)

    InterpreterBuilder.create_dot = create_dot
    InterpreterBuilder.cast_impl = cast_impl
    return True
