"""Writing one graph in one format: ONNX (dynamo exporter) and AOTInductor packages.

Each writer returns the file it wrote (relative to the bundle folder). The same torch.export
program feeds ONNX and AOTInductor, so both see exactly the same graph.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import torch
from torch.export import Dim

from .graphs import Graph, export_dim

# Beyond this many bytes of weights, ONNX's 2 GB protobuf limit needs external data.
EXTERNAL_DATA_BYTES = 1_500_000_000


def dynamic_shapes(graph: Graph) -> tuple:
    dims: dict[str, Dim] = {}
    shapes = tuple({ax: export_dim(sym, dims) for ax, sym in graph.dynamic.get(name, {}).items()} or None
                   for name in graph.input_names)
    # A module taking *inputs (models/half.AtPrecision, a lowered graph) receives them as one tuple argument.
    params = inspect.signature(graph.module.forward).parameters.values()
    return (shapes,) if any(p.kind is p.VAR_POSITIONAL for p in params) else shapes


def exported_program(graph: Graph, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(graph.module, example, dynamic_shapes=dynamic_shapes(graph), strict=False)


def write_onnx(graph: Graph, example: tuple[torch.Tensor, ...], folder: Path, *, device: str = "cpu",
               opset: int = 18) -> list[str]:
    path = folder / f"{graph.name}.onnx"
    big = sum(p.numel() * p.element_size() for p in graph.module.parameters()) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.module, example, str(path), input_names=graph.input_names,
                          output_names=graph.output_names, dynamic_shapes=dynamic_shapes(graph),
                          opset_version=opset, dynamo=True, external_data=big, verbose=False)
    files = [path.name]
    if (folder / f"{path.name}.data").exists():
        files.append(f"{path.name}.data")
    return files


def write_aoti(graph: Graph, example: tuple[torch.Tensor, ...], folder: Path, *, device: str = "cpu",
               opset: int = 18) -> list[str]:
    from torch._inductor import aoti_compile_and_package

    path = folder / f"{graph.name}.{device}.pt2"
    with _quiet():
        aoti_compile_and_package(exported_program(graph, example), package_path=str(path))
    return [path.name]


# --format name -> writer. Each writes one graph and returns its files (the first is the graph file). The
# backend that verifies a format's files against torch at export declares it (engine/backends: checks_export).
FORMATS = {"onnx": write_onnx, "aoti": write_aoti}


def stored_format(fmt: str, device: str) -> str:
    """The format name a manifest stores: AOTInductor packages are compiled for one device type."""
    return f"aoti-{torch.device(device).type}" if fmt == "aoti" else fmt


class _quiet:
    """The exporters log pages of INFO/WARNING lines per graph; the export table says what matters."""

    def __enter__(self):
        self.prev = logging.root.manager.disable
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        logging.disable(self.prev)

