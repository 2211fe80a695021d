"""TensorRT backend: engines built from a bundle's ONNX graphs, cached per GPU and TensorRT version.

UNTESTED: TensorRT cannot be installed on the machines this project is developed and tested on
(the registry's `tensorrt` packages download from a host they cannot reach, and no GPU is there).
This follows TensorRT 10's documented Python API (Builder / OnnxParser / optimization profiles /
execute_async_v3 with tensor addresses).

Optimization profiles come from the manifest (`profile_shapes`): every dynamic axis gets min 1, a
typical opt (AXIS_OPT) and the exporter's upper bound as max (export/graphs.py AXIS_MAX); the
window axes (H, W and the grids and token counts derived from them) take their min from a 56 x 56
window and their opt and max from the bundle's crop x crop window, so one profile is consistent
across inputs, and the engine's memory is not sized for 2016-pixel windows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ...export.graphs import AXIS_MAX, WINDOW_AXES, window_axes
from ...runtime.preprocess import PAD_MULTIPLE
from ..bundle import Bundle, BundleError
from . import Backend, register

AXIS_OPT = {"B": 2, "R": 64, "Q": 256, "P": 256, "L": 20}


def profile_shapes(shape: list, manifest: dict) -> tuple[list[int], list[int], list[int]]:
    """(min, opt, max) of one input of the manifest (`shape`: sizes and axis symbols)."""
    patch = manifest["clip"]["patch"]
    crop = manifest["window"]["crop"]
    smallest, largest = window_axes(PAD_MULTIPLE, PAD_MULTIPLE, patch), window_axes(crop, crop, patch)
    bounds = []
    for d in shape:
        if not isinstance(d, str):
            bounds.append((d, d, d))
        elif d in WINDOW_AXES:
            bounds.append((smallest[d], largest[d], largest[d]))
        else:
            bounds.append((1, AXIS_OPT[d], AXIS_MAX[d]))
    lo, opt, hi = (list(b) for b in zip(*bounds))
    return lo, opt, hi


def plan_cache_dir() -> Path:
    return Path(os.environ.get("CORRCLIP_CACHE", Path.home() / ".cache" / "corrclip")) / "tensorrt"


class TensorRTExecutor:
    def __init__(self, bundle: Bundle, name: str, device: torch.device):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BundleError("TensorRT is not installed: pip install tensorrt (10.x) on a machine with an NVIDIA "
                              "GPU, or use --backend onnxruntime") from e
        if device.type != "cuda":
            raise BundleError("the TensorRT backend needs a CUDA device (--device cuda)")
        self.trt, self.device, self.manifest = trt, device, bundle.manifest
        graph = bundle.graphs[name]
        if any(i["dtype"] == "float64" for i in graph["inputs"]):
            raise BundleError(f"graph {name} takes float64 inputs, which TensorRT does not support; "
                              "run it with onnxruntime")
        self.inputs = [i["name"] for i in graph["inputs"]]
        self.outputs = list(graph["outputs"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        plan = self._plan(bundle, name, graph)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(f"TensorRT could not load the cached plan of {name}; delete {plan_cache_dir()}")
        self.context = self.engine.create_execution_context()

    def _plan(self, bundle: Bundle, name: str, graph: dict) -> bytes:
        trt = self.trt
        onnx_file = bundle.graph_file(name, "onnx")
        digest = next(e["sha256"][e["file"]] for e in graph["files"] if e["format"] == "onnx")
        gpu = torch.cuda.get_device_name(self.device).replace(" ", "_")
        key = hashlib.sha256(f"{digest}{gpu}{trt.__version__}{graph['precision']}".encode()).hexdigest()[:16]
        path = plan_cache_dir() / f"{name}.{gpu}.trt{trt.__version__}.{key}.plan"
        if path.is_file():
            return path.read_bytes()
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(f"TensorRT could not parse {onnx_file.name}: {errors}")
        config = builder.create_builder_config()
        if graph["precision"] == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif graph["precision"] == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        profile = builder.create_optimization_profile()
        for inp in graph["inputs"]:
            profile.set_shape(inp["name"], *profile_shapes(inp["shape"], self.manifest))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BundleError(f"TensorRT failed to build an engine for {name}; see the log above")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(plan))
        return bytes(plan)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trt = self.trt
        keep = []
        for name, a in zip(self.inputs, args, strict=True):
            a = a.to(self.device).contiguous()
            keep.append(a)
            if not self.context.set_input_shape(name, tuple(a.shape)):
                raise BundleError(f"input {name} of shape {tuple(a.shape)} is outside this TensorRT engine's profile "
                                  f"(windows up to the bundle's crop, {self.manifest['window']['crop']}); use a "
                                  "smaller --crop or --backend onnxruntime")
            self.context.set_tensor_address(name, a.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            types = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                     trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
            dtype = types[self.engine.get_tensor_dtype(name)]
            out = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return tuple(outs)


def make(bundle: Bundle, name: str, device: torch.device, precision: str = "fp32") -> TensorRTExecutor:
    return TensorRTExecutor(bundle, name, device)


BACKEND = register(Backend(
    name="tensorrt", summary="TensorRT engines built on the target GPU from the ONNX graphs (UNTESTED here)",
    reads="onnx", make=make, float64=False,  # SAM's decoder (float64 points) then runs on ONNX Runtime
))
