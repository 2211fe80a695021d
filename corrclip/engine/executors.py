"""Executors: run a named graph of a bundle on a backend, called the same way whatever runs it.

    run = make_executor(bundle, "dino", backend="onnxruntime", device="cpu")
    (feats,) = run(windows)                       # torch tensors in, tuple of torch tensors out

Backends: "onnxruntime" (CPU here; CUDA / TensorRT execution providers when onnxruntime-gpu is
installed, with IO binding so device tensors are not copied through the host), "aoti"
(AOTInductor packages), "tensorrt" (engines built from the ONNX graphs; see tensorrt.py).
The torch backend needs no bundle: the runtime calls the modules directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .bundle import Bundle, BundleError

BACKENDS = ("onnxruntime", "aoti", "tensorrt")

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
       torch.bool: np.bool_}


class OrtExecutor:
    def __init__(self, path: Path, device: torch.device, providers: Sequence[str] | None = None):
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
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.on_gpu:
            feed = {n: a.detach().cpu().numpy() for n, a in zip(self.inputs, args, strict=True)}
            return tuple(torch.from_numpy(o).to(self.device) for o in self.session.run(self.outputs, feed))
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
        return tuple(torch.from_dlpack(o._ortvalue.to_dlpack()) for o in binding.get_outputs())


class AotiExecutor:
    def __init__(self, path: Path, device: torch.device):
        from torch._inductor import aoti_load_package

        self.device = device
        self.runner = aoti_load_package(str(path))

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Compiled kernels assume the example's (contiguous) strides: a sliced view would be misread.
        out = self.runner(*[a.to(self.device).contiguous() for a in args])
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)  # one output comes back bare


def make_executor(bundle: Bundle, name: str, backend: str = "onnxruntime", device: torch.device | str = "cpu"):
    device = torch.device(device)
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} "
                          "(or torch, without --engine)")
    try:
        if backend == "onnxruntime":
            return OrtExecutor(bundle.graph_file(name, "onnx"), device)
        if backend == "aoti":
            return AotiExecutor(bundle.graph_file(name, f"aoti-{device.type}"), device)
        from .tensorrt import TensorRTExecutor

        return TensorRTExecutor(bundle, name, device)
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - each runtime raises its own types for a file it cannot load
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise BundleError(f"{bundle.path}: {backend} could not load graph {name} ({type(e).__name__}: {reason}); "
                          "re-export the bundle with this corrclip and torch") from e
