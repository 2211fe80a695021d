"""The hot operations of the runtime, each as a plain torch reference (and, beside it, a fused
Triton kernel with the same signature where one exists).

`choose(name)` returns the implementation to call for a device: Triton on CUDA when a kernel
exists and Triton imports, the torch reference elsewhere. `set_backend("torch" | "triton" |
"auto")` forces one for every kernel (tests, benchmarks, debugging).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

# kernel name -> (module, reference function, triton function or None)
KERNELS: dict[str, tuple[str, str, str | None]] = {
    "masked_correlation_attention": ("correlation", "masked_correlation_attention",
                                     "masked_correlation_attention_triton"),
    "merge_regions": ("merging", "merge_regions", "merge_regions_triton"),
    "classify": ("vote", "classify", None),
    "vote": ("vote", "vote", None),
    "stitch": ("stitch", "stitch", None),
    "stitch_classify_vote": ("stitch_vote", "stitch_classify_vote", "stitch_classify_vote_triton"),
    "sam_postprocess": ("sam_post", "sam_postprocess", "sam_postprocess_triton"),
}

_backend = "auto"


def set_backend(backend: str) -> None:
    global _backend
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel backend must be auto, torch or triton, not {backend!r}")
    _backend = backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose(name: str, device: torch.device | str = "cpu") -> Callable:
    module, ref, fused = KERNELS[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    want_triton = _backend == "triton" or (_backend == "auto" and torch.device(device).type == "cuda")
    if want_triton and fused is not None and triton_available():
        return getattr(mod, fused)
    if _backend == "triton" and fused is None:
        raise RuntimeError(f"no Triton kernel for {name}; use set_backend('auto') or 'torch'")
    return getattr(mod, ref)
