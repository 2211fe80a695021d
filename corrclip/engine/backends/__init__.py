"""The backend registry: what runs a bundle's graphs, each backend declared in its own module.

    run = make_executor(bundle, "dino", backend="onnxruntime", device="cpu")
    (feats,) = run(windows)                       # torch tensors in, tuple of torch tensors out

A backend declares its name, the bundle file format it reads, whether it takes float64 inputs
(graphs that need them run on `float64_fallback` instead), which export format it verifies at
export time, and how to build an executor. The CLI's --backend choices and the exporter's parity
check come from here; adding a backend is one module that calls `register`. "torch" (running the
modules directly, without a bundle) is not a bundle backend; the API handles it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..bundle import Bundle, BundleError

Executor = Callable[..., tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str  # one line for --help
    reads: str  # bundle file format: "onnx", or "aoti" (stored per device type as "aoti-cpu", "aoti-cuda")
    # (bundle, graph name, device, precision) -> executor. Graphs run at the precision they were exported in;
    # a backend that picks its inference precision at load time (OpenVINO) takes `precision` from the API.
    make: Callable[..., Executor]
    float64: bool = True  # False: graphs with float64 inputs (SAM's decoder points) run on float64_fallback
    float64_fallback: str = "onnxruntime"
    checks_export: str | None = None  # export format this backend verifies against torch when a bundle is written
    per_device_files: bool = False  # files are compiled for a device type (AOTInductor)
    # A backend that picks the inference precision of fp32 graphs at load time (OpenVINO): precision name ->
    # whether it runs natively on this machine (corrclip.precision.bundle_plan). None: graphs run as exported.
    native_precision: Callable[[str], bool] | None = None

    def file_format(self, device: torch.device) -> str:
        return f"{self.reads}-{device.type}" if self.per_device_files else self.reads


_REGISTRY: dict[str, Backend] = {}
TORCH = "torch"  # the modules themselves, no bundle


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise BundleError(f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)} "
                          f"(or {TORCH}, without --engine)")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def checker_for(export_format: str) -> Backend | None:
    """The backend that verifies an export format's files at export time."""
    return next((b for b in _REGISTRY.values() if b.checks_export == export_format), None)


def make_executor(bundle: Bundle, name: str, backend: str = "onnxruntime", device: torch.device | str = "cpu",
                  precision: str = "fp32") -> Executor:
    """An executor for graph `name`; a graph with float64 inputs goes to the fallback of a backend without float64."""
    device = torch.device(device)
    b = get(backend)
    graph = bundle.graphs.get(name, {})
    if not b.float64 and any(i.get("dtype") == "float64" for i in graph.get("inputs", [])):
        b = get(b.float64_fallback)
    try:
        return b.make(bundle, name, device, precision)
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - each runtime raises its own types for a file it cannot load
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise BundleError(f"{bundle.path}: {b.name} could not load graph {name} ({type(e).__name__}: {reason}); "
                          "re-export the bundle with this corrclip and torch") from e


for _module in ("onnxruntime", "aoti", "openvino", "tensorrt"):  # each registers itself
    importlib.import_module(f"{__name__}.{_module}")
