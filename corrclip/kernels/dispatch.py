"""One kernel dispatch: which implementation of a hot op runs, decided at call time from its input.

Every hot op has one entry point (corrclip.kernels.<op>) that asks `use_fused` and then runs either its torch
reference or its Triton path:
  * export traces (torch.export, the ONNX exporters, TorchScript tracing) and float64 take the reference, so
    exported graphs hold plain torch ops and run anywhere;
  * otherwise "auto" takes the Triton path for CUDA tensors where AUTO says so and Triton is installed, and the
    reference for everything else;
  * `set_backend("torch" | "triton" | "auto")`, or `with backend(...)`, overrides for tests and benchmarks.
    "triton" runs the kernels on any device (CPU tensors only under TRITON_INTERPRET=1) and lets their errors
    through instead of falling back.

The Triton paths are torch custom ops (torch.ops.corrclip.*, with fake implementations), so torch.compile traces
through them. `run_fused` launches on the inputs' device (tensors on cuda:1 launch on cuda:1 whatever the current
device) and, when a kernel fails to compile or launch in "auto", warns once and uses the reference from then on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

BACKENDS = ("auto", "torch", "triton")

# Whether "auto" takes the Triton path on CUDA, per op. The correlation attention stays on the reference until its
# kernel is measured faster on a GPU (benchmarks/RESULTS.md, "cost model"); the others never store what their
# references store (Q x H0 x W0 probabilities, upsampled masks), so they are taken for memory even unmeasured.
AUTO: dict[str, bool] = {
    "masked_correlation_attention": False,
    "merge_regions": True,
    "stitch_classify_vote": True,
    "sam_postprocess": True,
}
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 is the accuracy-checking path

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # not imported here: see triton_common
_backend = "auto"
_failed: set[str] = set()  # ops whose kernel failed in "auto": reference from then on


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """`with backend("triton"): ...` forces one backend inside the block (tests, benchmarks)."""
    before = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def _tracing_for_export() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def use_fused(op: str, x: torch.Tensor) -> bool:
    """Whether `op` on an input like `x` runs its Triton path."""
    if _tracing_for_export() or x.dtype not in FUSED_DTYPES or _backend == "torch":
        return False
    if _backend == "triton":
        if not TRITON_INSTALLED:
            raise RuntimeError("kernel backend 'triton' needs Triton: pip install triton, or set_backend('auto')")
        return True
    return x.device.type == "cuda" and AUTO[op] and TRITON_INSTALLED and op not in _failed


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device and its current stream: make that the inputs' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def run_fused(op: str, fused: Callable, reference: Callable, device: torch.device, *args: Any, **kwargs: Any) -> Any:
    """fused(*args, **kwargs) on `device`; in "auto", a failure warns once and runs the reference instead."""
    try:
        with _on_device(device):
            return fused(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:  # the reference needs more memory, not less: the caller decides
        raise
    except Exception as err:
        if _backend == "triton":
            raise
        if op not in _failed:
            _failed.add(op)
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            warnings.warn(f"corrclip: the Triton kernel for {op} failed ({type(err).__name__}: {reason}); "
                          "using the torch reference from now on", RuntimeWarning, stacklevel=2)
    return reference(*args, **kwargs)


def reset_failures() -> None:
    """Forget kernel failures (tests)."""
    _failed.clear()
