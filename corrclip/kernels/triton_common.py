"""What every Triton kernel module shares: the lazy loader, the launch (or its recording), and device functions.

Triton is imported on first use, not with the kernel modules: it decides once, when it is first imported, whether
kernels compile or run under the CPU interpreter (TRITON_INTERPRET=1), so tests must be able to choose after
`import corrclip`; and CPU-only torch builds have no Triton at all. Kernel modules therefore hold plain functions
that `jit_module` turns into triton.jit functions on first use (a kernel resolves its callees by global name).

Kernels are written once, for the GPU: under the interpreter, `interpreter.py` makes bfloat16 behave as on the GPU.

Launches go through `launch`, which `recording()` turns into a list of what would have been launched: the
ahead-of-time compile check (aot.py) runs each op's launch code on CPU example tensors that way, so it compiles
exactly what the GPU dispatch launches (kernels, block sizes, warps, stages, argument types).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

tl = None  # triton.language, bound by language()


@functools.cache
def language():
    global tl
    import triton.language
    from triton import knobs

    if knobs.runtime.interpret:
        from . import interpreter

        interpreter.make_bfloat16_exact()
    tl = triton.language
    return tl


def jit_module(namespace: dict, names: tuple[str, ...], do_not_specialize: dict[str, tuple[str, ...]] | None = None):
    """Binds `tl` in a kernel module and replaces its plain device functions and kernels (and the shared `_taps`)
    by their triton.jit versions. do_not_specialize: kernel -> its per-image size arguments, which would otherwise
    compile one variant per divisibility by 16 (a new image size would recompile)."""
    import triton

    namespace["tl"] = language()
    namespace["_taps"] = triton.jit(bilinear_taps)
    for name in names:
        keep_generic = (do_not_specialize or {}).get(name, ())
        namespace[name] = triton.jit(namespace[name], do_not_specialize=list(keep_generic))
    return triton


# ---- launching, or recording for the ahead-of-time check ------------------------------------------------------------

@dataclass
class Launch:
    kernel: Any  # a triton JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict = field(default_factory=dict)  # constexprs and launch options (num_warps, num_stages)


_recorded: list[Launch] | None = None


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside: launches are recorded, not run, and `gpu_config` answers True for CPU tensors too."""
    global _recorded
    before, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = before


def gpu_config(device: torch.device) -> bool:
    """Whether to use the GPU launch configuration (block sizes, warps) for tensors on `device`.

    The CPU interpreter pays per program, not per element, so CPU tensors get larger blocks by default; tests
    also run the GPU configuration on the CPU by passing its block sizes explicitly."""
    return device.type == "cuda" or _recorded is not None


def nonblocking_to(rows: list[list[int]], device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A small host table on `device` without blocking the host: pinned memory, asynchronous copy."""
    table = torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


# ---- device functions shared by several kernels ----------------------------------------------------------------------

def bilinear_taps(dst, scale, n_in):
    """F.interpolate's bilinear source taps (align_corners=False): index pair and weights per output index."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # src >= 0, so truncation is floor
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, 1.0 - l1, l1
