"""The glue model of an exported Triton repository (corrclip-export --triton-repo): a Triton
Python-backend model that runs the engine's pipeline and calls the repository's ONNX Runtime models
for every graph through Business Logic Scripting (BLS).

It speaks the same protocol as `corrclip serve` (protocol.py), so the same clients work. It runs
inside Triton's Python backend stub, where `triton_python_backend_utils` exists; that Python needs
corrclip and its dependencies installed (README: deploying the repository).
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .protocol import INPUTS, Limits

GRAPH_MODEL_PREFIX = "corrclip_"  # graph `dino` is served as model `corrclip_dino`
BACKEND = "triton-bls"


class BlsExecutor:
    """Runs one graph of the bundle as the sibling Triton model, called like the other executors."""

    def __init__(self, bundle, name: str, device: torch.device | str = "cpu", precision: str = "fp32"):
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        graph = bundle.graphs[name]
        self.pb = pb_utils
        self.model = GRAPH_MODEL_PREFIX + name
        self.inputs = [i["name"] for i in graph["inputs"]]
        self.outputs = list(graph["outputs"])
        self.device = torch.device(device)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors = [self.pb.Tensor(n, np.ascontiguousarray(a.detach().cpu().numpy()))
                   for n, a in zip(self.inputs, args, strict=True)]
        reply = self.pb.InferenceRequest(model_name=self.model, inputs=tensors,
                                         requested_output_names=self.outputs).exec()
        if reply.has_error():
            raise RuntimeError(f"model {self.model}: {reply.error().message()}")
        # as_numpy() views the reply's shared memory, which is released with it: copy.
        return tuple(torch.from_numpy(np.array(self.pb.get_output_tensor_by_name(reply, n).as_numpy())).to(self.device)
                     for n in self.outputs)


class TritonPythonModel:
    """Triton's Python-backend entry points (the repository's corrclip/1/model.py re-exports this)."""

    def initialize(self, args: dict) -> None:
        from ..api import Segmenter
        from ..engine import backends
        from ..runtime.amg import AmgSettings
        from .service import SegmentService

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / "bundle"
        amg = AmgSettings()
        if "points_per_side" in params:
            amg.points_per_side = int(params["points_per_side"])
        # Registered here, not on import: it only works inside Triton, so it is no --backend choice.
        backends.register(backends.Backend(name=BACKEND, summary="graphs as sibling Triton models (BLS)",
                                           reads="onnx", make=BlsExecutor))
        seg = Segmenter.from_bundle(folder, BACKEND, device=params.get("device", "cpu"), amg=amg, text_cache=False)
        limits = Limits(**{f.name: int(params[f.name]) for f in fields(Limits) if f.name in params})
        info = {"method": seg.method, "backbone": seg.backbone.name, "weights": seg.identity,
                "engine": "triton repository", "backend": BACKEND, "random_weights": seg.random_weights}
        self.service = SegmentService(seg, limits, info)
        logging.getLogger("corrclip.serve").info("corrclip BLS model ready (%s)", info)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        arrays = []
        for request in requests:
            tensors = {p.name: pb_utils.get_input_tensor_by_name(request, p.name) for p in INPUTS}
            arrays.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, v) for n, v in out.items()])
                for out in self.service(arrays)]
