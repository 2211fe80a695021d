"""Triton device functions shared by several kernels, written as plain functions and turned into
`triton.jit` functions by each kernel module's loader (Triton is imported lazily: its interpreter
or compiled mode is fixed at first import)."""

from __future__ import annotations

import functools

tl = None  # triton.language, bound by language()


@functools.cache
def language():
    global tl
    import triton.language

    tl = triton.language
    return tl


def jit_module(namespace: dict, names: tuple[str, ...]):
    """Binds `tl` in a kernel module and replaces its plain device functions and kernels (and the
    shared `_taps`) by their triton.jit versions; a kernel resolves callees by global name."""
    import triton

    namespace["tl"] = language()
    namespace["_taps"] = triton.jit(bilinear_taps)
    for name in names:
        namespace[name] = triton.jit(namespace[name])
    return triton


def bilinear_taps(dst, scale, n_in):
    """F.interpolate's bilinear source taps (align_corners=False): index pair and weights per output index."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # src >= 0, so truncation is floor
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, 1.0 - l1, l1
