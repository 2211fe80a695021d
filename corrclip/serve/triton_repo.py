"""A model repository for a stock `tritonserver`, written from an engine bundle.

    DIR/corrclip/config.pbtxt            Python backend, the `corrclip` protocol, dynamic batching, limits
    DIR/corrclip/1/model.py              imports the glue (corrclip.serve.bls: decode, windows, stitch, vote)
    DIR/corrclip/1/bundle/manifest.json  the bundle's manifest, its files pointing at the models below
    DIR/corrclip_<graph>/config.pbtxt    ONNX Runtime backend, one per graph of the bundle
    DIR/corrclip_<graph>/1/model.onnx

A graph model gets Triton's dynamic batcher when every input and output is batched along axis 0
by the same dynamic axis (dino, clip_trunk, clip_text, clip_dense); the others (corr_head, whose
text input has no batch axis, and SAM's fixed-shape graphs) run with max_batch_size 0. Graph models
leave instance_group to Triton, which places them on every GPU it has, else on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..engine.bundle import MANIFEST, load_bundle
from ..export.graphs import AXIS_MAX
from .bls import GRAPH_MODEL_PREFIX
from .protocol import INPUTS, MODEL_NAME, OUTPUTS, Limits

# ONNX TensorProto element types -> Triton data types
_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64",
                   9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}
_PORT_TYPE = {bytes: "TYPE_STRING", np.bool_: "TYPE_BOOL", np.float32: "TYPE_FP32"}

MODEL_PY = '''"""corrclip's glue model for Triton's Python backend: the code is corrclip.serve.bls."""

from corrclip.serve.bls import TritonPythonModel  # noqa: F401
'''


class RepositoryError(RuntimeError):
    pass


def write_repository(bundle_path: str | os.PathLike, out: str | os.PathLike, *, max_batch: int = 8,
                     max_queue_delay_us: int = 2000, limits: Limits | None = None, points_per_side: int | None = None,
                     overwrite: bool = False) -> Path:
    """Writes the repository into a temporary sibling of `out` and renames it into place when complete."""
    bundle = load_bundle(bundle_path)
    limits = limits or Limits()
    out = Path(out)
    if out.exists() and not overwrite:
        raise RepositoryError(f"{out} exists; pass --overwrite to replace it or choose another --triton-repo")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        manifest = json.loads(json.dumps(bundle.manifest))
        for name, graph in bundle.graphs.items():
            model = GRAPH_MODEL_PREFIX + name
            version = tmp / model / "1"
            version.mkdir(parents=True)
            entry = next(e for e in graph["files"] if e["format"] == "onnx")
            sha = {}
            for rel, digest in entry["sha256"].items():
                # The graph file becomes model.onnx; external data keeps its name (the graph refers to it).
                target = version / ("model.onnx" if rel == entry["file"] else rel)
                _link_or_copy(bundle.path / rel, target)
                sha[f"../../../{model}/1/{target.name}"] = digest
            (tmp / model / "config.pbtxt").write_text(graph_config(model, version / "model.onnx"))
            manifest["graphs"][name]["files"] = [{"format": "onnx", "file": f"../../../{model}/1/model.onnx",
                                                  "sha256": sha}]
        glue = tmp / MODEL_NAME / "1"
        (glue / "bundle").mkdir(parents=True)
        (glue / "bundle" / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (glue / "model.py").write_text(MODEL_PY)
        (tmp / MODEL_NAME / "config.pbtxt").write_text(
            glue_config(max_batch, max_queue_delay_us, limits, points_per_side))
        load_bundle(glue / "bundle")  # the glue's view of the graphs must load: every path and hash
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # graphs are large (ViT-H: GBs); a hard link costs nothing
    except OSError:
        shutil.copy2(src, dst)


def _onnx_ports(path: Path) -> tuple[list[tuple[str, int, list]], list[tuple[str, int, list]]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def ports(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in v.type.tensor_type.shape.dim])
                for v in values if v.name not in initializers]

    return ports(graph.input), ports(graph.output)


def graph_config(model: str, onnx_path: Path) -> str:
    inputs, outputs = _onnx_ports(onnx_path)
    first = {dims[0] if dims else None for _, _, dims in inputs + outputs}
    batched = len(first) == 1 and isinstance(next(iter(first)), str)
    max_batch = AXIS_MAX.get(next(iter(first)), 64) if batched else 0
    lines = [f'name: "{model}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch}"]
    for kind, ports in (("input", inputs), ("output", outputs)):
        blocks = []
        for name, elem, dims in ports:
            if elem not in _ONNX_TO_TRITON:
                raise RepositoryError(f"{model}: {kind} {name} has ONNX element type {elem}, which has no Triton type")
            shown = [d if isinstance(d, int) and d > 0 else -1 for d in (dims[1:] if batched else dims)]
            blocks.append(f'  {{ name: "{name}" data_type: {_ONNX_TO_TRITON[elem]} dims: {shown} }}')
        lines.append(f"{kind} [\n" + ",\n".join(blocks) + "\n]")
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def glue_config(max_batch: int, max_queue_delay_us: int, limits: Limits, points_per_side: int | None) -> str:
    def port(p) -> str:
        kind = _PORT_TYPE[p.dtype]
        return f'  {{ name: "{p.name}" data_type: {kind} dims: [ 1 ]{" optional: true" if p.optional else ""} }}'

    params = {k: str(v) for k, v in asdict(limits).items()} | {"device": "cpu"}
    if points_per_side:
        params["points_per_side"] = str(points_per_side)
    lines = [f'name: "{MODEL_NAME}"', 'backend: "python"', f"max_batch_size: {max_batch}",
             "input [\n" + ",\n".join(port(p) for p in INPUTS) + "\n]",
             "output [\n" + ",\n".join(port(p) for p in OUTPUTS) + "\n]",
             f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} "
             f"default_queue_policy {{ max_queue_size: {limits.max_queue} }} }}",
             # The glue is host code (decode, resize, stitch); the graphs it calls run where Triton put them.
             "instance_group [ { kind: KIND_CPU count: 1 } ]"]
    lines += [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]
    return "\n".join(lines) + "\n"
