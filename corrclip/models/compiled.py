"""Encoder stages through torch.compile (Inductor, CPU and CUDA), with the compile cost kept apart.

`Compiled` wraps one stage module. A call that made Dynamo compile (the first, and the first of a new
window shape) is timed whole into `compile_seconds`; `set_aside_compile_time` then moves that time out of
the pipeline's stage entries into "compile.<stage>", so steady-state stage times never carry it.
Shapes: dynamic=None, Dynamo's default. The first shape compiles a static graph; the first call with
another shape (window size, window count) recompiles once with those axes symbolic, and later shapes
reuse it: a new window size does not recompile again. If compiling fails (no C++ compiler for Inductor
on a CPU, an unsupported operator), the stage warns in one line and runs eager from then on.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

# Stages worth compiling: the heavy matrix work. The text tower is not among them: its embeddings are
# cached per vocabulary, so compiling it would cost more than it ever saves.
COMPILED_STAGES = ("dino", "clip_trunk", "sam_encoder", "clip_dense")
# Where each stage's time lands in a Segmentation's timings (runtime/pipeline.py, runtime/amg.py).
TIMING_KEYS = {"dino": ("dino",), "clip_trunk": ("clip_trunk",), "clip_dense": ("clip_dense",),
               "sam_encoder": ("masks", "masks.sam_encoder"), "clip_text": ("text",)}


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Compiled(nn.Module):
    """module(*inputs) through torch.compile; eager (after a one-line warning) if compiling fails."""

    def __init__(self, module: nn.Module, stage: str, device: torch.device | str = "cpu"):
        super().__init__()
        self.module = module
        self.stage = stage
        self.device = torch.device(device)
        # a plain attribute, not a child module: state_dict and .to() see the module once
        object.__setattr__(self, "compiled", torch.compile(module))
        self.compile_seconds = 0.0  # time of the calls that compiled, not yet set aside
        self.failed: str | None = None  # why it runs eager

    def forward(self, *inputs):
        if self.compiled is None:
            return self.module(*inputs)
        before = _graphs_compiled()
        t0 = self._clock()
        try:
            out = self.compiled(*inputs)
        except Exception as e:  # noqa: BLE001 - Dynamo/Inductor raise many types; eager re-raises real errors
            object.__setattr__(self, "compiled", None)
            self.failed = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            print(f"warning: torch.compile failed for {self.stage} ({type(e).__name__}: {self.failed}); "
                  "running it eager", file=sys.stderr)
            return self.module(*inputs)
        if _graphs_compiled() != before:
            self.compile_seconds += self._clock() - t0
        return out

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def set_aside_compile_time(timings: list[dict[str, float]], modules) -> None:
    """Moves the time of the calls that compiled out of each stage's timing entries into "compile.<stage>"
    (the whole call: compilation plus that call's own run, which compilation dominates), in every result
    of one pipeline call (they share its timings)."""
    for m in modules:
        if not isinstance(m, Compiled) or not m.compile_seconds:
            continue
        seconds, m.compile_seconds = m.compile_seconds, 0.0
        for t in timings:
            t[f"compile.{m.stage}"] = t.get(f"compile.{m.stage}", 0.0) + seconds
            for key in TIMING_KEYS.get(m.stage, ()):
                if key in t:
                    t[key] = max(0.0, t[key] - seconds)


def compile_stages(owner, stages: dict, device: torch.device | str) -> dict:
    """Replaces each stage module of `owner` (attributes and its `stages` map) named in COMPILED_STAGES with
    a Compiled wrapper (around the AtPrecision copy where the plan lowered it). Returns the new stage map."""
    from .half import replace_module

    out = dict(stages)
    for stage, module in stages.items():
        if stage in COMPILED_STAGES and isinstance(module, nn.Module):
            out[stage] = replace_module(owner, module, Compiled(module, stage, device))
    return out
