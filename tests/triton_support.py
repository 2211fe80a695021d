"""Shared by the Triton kernel tests: where the kernels run in this process.

Triton either compiles (CUDA tensors only) or interprets on the CPU (CPU tensors only), fixed for the process when
it is first imported; conftest.py turns the interpreter on where there is no GPU. The `device` fixture
(conftest.py) runs each kernel test on the one device that works here and skips the other, saying why.
"""

import functools
import os

import torch


@functools.cache
def triton_mode() -> str | None:
    """"interpreted", "compiled", or None where Triton is not installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    try:
        from triton import knobs

        interpret = knobs.runtime.interpret
    except (ImportError, AttributeError):  # Triton before 3.4
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "interpreted" if interpret else "compiled"


def device_skip_reason(device: str) -> str | None:
    """Why kernel tests cannot run on `device` ("cpu" or "cuda") in this process, or None when they can."""
    mode = triton_mode()
    if mode is None:
        return "Triton is not installed"
    if device == "cpu" and mode != "interpreted":
        return "Triton compiles in this process (GPU machine): CPU tensors cannot run; TRITON_INTERPRET=1 would"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device: the kernels run interpreted on the CPU here"
    if device == "cuda" and mode == "interpreted":
        return "TRITON_INTERPRET=1: the kernels are interpreted, CUDA tensors cannot run"
    return None
