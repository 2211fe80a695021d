"""ONNX Runtime: CPU here; CUDA / TensorRT execution providers when onnxruntime-gpu is installed, with
IO binding so device tensors are not copied through the host (the GPU path is untested here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..bundle import Bundle, BundleError
from . import Backend, register

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
       torch.int32: np.int32, torch.bool: np.bool_}
_ORT_FLOAT = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}


class OrtExecutor:
    def __init__(self, path: Path, device: torch.device, providers: Sequence[str] | None = None,
                 precision: str = "fp32"):
        import onnxruntime as ort

        self.device = device
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda":
                providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] \
                    + providers
        missing = [p for p in providers if p not in available]
        if missing:
            raise BundleError(f"ONNX Runtime here lacks {', '.join(missing)} (has {', '.join(available)}); "
                              "install onnxruntime-gpu for CUDA/TensorRT providers")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if precision == "fp16":
            # The CPU provider's layout optimizations crash the process (SIGSEGV) on fp16 transformer graphs
            # (onnxruntime 1.32, cf. microsoft/onnxruntime#15494); the level below them is safe.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for unreadable graphs
            raise BundleError(f"ONNX Runtime cannot load {path.name} ({type(e).__name__}: {str(e)[:200]}); "
                              "re-export the bundle") from e
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        # Graphs written by corrclip-export take and give fp32 (a lowered graph casts inside). A graph cast
        # whole to fp16 (older bundles, other exporters) gets its floating inputs cast to what it declares,
        # and its fp16 outputs back to fp32, so the runtime after it always sees fp32.
        self.input_types = [_ORT_FLOAT.get(i.type) for i in self.session.get_inputs()]
        self.on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = tuple(a.to(t) if t is not None and a.is_floating_point() and a.dtype != t else a
                     for a, t in zip(args, self.input_types, strict=True))
        if not self.on_gpu:
            feed = {n: a.detach().cpu().numpy() for n, a in zip(self.inputs, args, strict=True)}
            return tuple(_fp32(torch.from_numpy(o).to(self.device)) for o in self.session.run(self.outputs, feed))
        # IO binding: hand ONNX Runtime the device pointers of contiguous torch tensors, and take the
        # outputs back through DLPack, so nothing crosses the host.
        binding = self.session.io_binding()
        keep = []
        for name, a in zip(self.inputs, args, strict=True):
            a = a.contiguous()
            keep.append(a)
            binding.bind_input(name, device_type="cuda", device_id=a.device.index or 0,
                               element_type=_NP[a.dtype], shape=tuple(a.shape), buffer_ptr=a.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, device_type="cuda", device_id=self.device.index or 0)
        self.session.run_with_iobinding(binding)
        return tuple(_fp32(torch.from_dlpack(o._ortvalue.to_dlpack())) for o in binding.get_outputs())


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def make(bundle: Bundle, name: str, device: torch.device, precision: str = "fp32") -> OrtExecutor:
    # The graph runs at the precision it was exported in (ONNX Runtime cannot change it at load time).
    exported = bundle.graphs[name].get("precision", "fp32")
    return OrtExecutor(bundle.graph_file(name, "onnx"), device, precision=exported)


BACKEND = register(Backend(
    name="onnxruntime", summary="ONNX Runtime (CPU; CUDA/TensorRT providers with onnxruntime-gpu)",
    reads="onnx", make=make, checks_export="onnx",
))
