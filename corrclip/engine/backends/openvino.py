"""OpenVINO on the CPU, reading the bundle's ONNX graphs directly: what an Intel-CPU deployment picks.

The inference precision is chosen at load time: "bf16" runs the matrix work on AMX / AVX512-BF16
(OpenVINO's CPU plugin keeps its own fp32 islands, e.g. softmax and normalization statistics);
"fp32" asks for f32 everywhere. A CPU without bf16 units gets f32 (bf16 would be emulated, slower).
Needs the `openvino` extra: pip install 'corrclip[openvino]'.
"""

from __future__ import annotations

import numpy as np
import torch

from ..bundle import Bundle, BundleError
from . import Backend, register

_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _core():
    try:
        import openvino as ov
    except ImportError as e:
        raise BundleError("OpenVINO is not installed: pip install 'corrclip[openvino]' (or use --backend "
                          "onnxruntime)") from e
    return ov.Core()


def cpu_has(precision: str) -> bool:
    """Whether OpenVINO's CPU plugin runs this precision natively here (its optimization capabilities)."""
    if precision == "fp32":
        return True
    return {"bf16": "BF16", "fp16": "FP16"}[precision] in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoExecutor:
    def __init__(self, path, device: torch.device, precision: str = "fp32"):
        if device.type != "cpu":
            raise BundleError("the OpenVINO backend runs on the CPU (--device cpu); on a GPU use onnxruntime or "
                              "tensorrt")
        if precision not in _HINT:
            raise BundleError(f"OpenVINO precision must be one of {', '.join(_HINT)}, not {precision!r}")
        core = _core()
        self.device = device
        self.precision = precision if cpu_has(precision) else "fp32"
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": _HINT[self.precision]})
        except RuntimeError as e:
            raise BundleError(f"OpenVINO cannot load {path.name} ({str(e)[:200]}); re-export the bundle or use "
                              "--backend onnxruntime") from e
        self.inputs = [p.get_any_name() for p in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {n: np.ascontiguousarray(a.detach().cpu().numpy()) for n, a in zip(self.inputs, args, strict=True)}
        result = self.request.infer(feed)
        # Outputs come back as views of the request's buffers: copy before the next call overwrites them.
        return tuple(torch.from_numpy(np.array(result[o], copy=True)) for o in self.compiled.outputs)


def make(bundle: Bundle, name: str, device: torch.device, precision: str = "fp32") -> OpenVinoExecutor:
    return OpenVinoExecutor(bundle.graph_file(name, "onnx"), device, precision)


BACKEND = register(Backend(
    name="openvino", summary="OpenVINO on the CPU from the ONNX graphs (bf16 on AMX/AVX512-BF16 CPUs)",
    reads="onnx", make=make, native_precision=cpu_has,
))
