"""AOTInductor packages (`.pt2`, compiled per device type at export: --format aoti)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..bundle import Bundle
from . import Backend, register


class AotiExecutor:
    def __init__(self, path: Path, device: torch.device):
        from torch._inductor import aoti_load_package

        self.device = device
        self.runner = aoti_load_package(str(path))

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Compiled kernels assume the example's (contiguous) strides: a sliced view would be misread.
        out = self.runner(*[a.to(self.device).contiguous() for a in args])
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)  # one output comes back bare


def make(bundle: Bundle, name: str, device: torch.device, precision: str = "fp32") -> AotiExecutor:
    return AotiExecutor(bundle.graph_file(name, f"aoti-{device.type}"), device)


BACKEND = register(Backend(
    name="aoti", summary="AOTInductor packages (export with --format onnx,aoti)",
    reads="aoti", make=make, checks_export="aoti", per_device_files=True,
))
