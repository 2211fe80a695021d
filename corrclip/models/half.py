"""Running one graph in half precision behind an fp32 interface.

`AtPrecision` holds its own half-precision copy of a module: its floating inputs are cast down on the
way in and its floating outputs back to fp32 on the way out, so every decision after it (merging, the
correlation head, SAM's mask filters, the vote) sees fp32 tensors. The copy matters: the stages share
modules (the CLIP visual tower feeds both the trunk, lowered, and the correlation head, which stays fp32).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _cast(x, dtype: torch.dtype):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, tuple):
        return tuple(_cast(v, dtype) for v in x)
    if isinstance(x, list):
        return [_cast(v, dtype) for v in x]
    return x


class AtPrecision(nn.Module):
    """module(*inputs) with weights and activations in `dtype`; floating outputs returned as float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.module = copy.deepcopy(module).to(dtype).eval()

    def forward(self, *inputs):
        return _cast(self.module(*_cast(inputs, self.dtype)), torch.float32)


def lower_stages(owner, stages: dict[str, nn.Module], plan) -> dict[str, nn.Module]:
    """Replaces each stage module of `owner` (an encoder or mask generator: attributes and its `stages`
    map) that the plan lowers with an AtPrecision copy. Returns the new stage map."""
    out = dict(stages)
    for stage, module in stages.items():
        dtype = plan.dtype(stage)
        if dtype == torch.float32 or not isinstance(module, nn.Module):
            continue
        out[stage] = replace_module(owner, module, AtPrecision(module, dtype))
    return out


def replace_module(owner, old: nn.Module, new: nn.Module) -> nn.Module:
    """Points every attribute of `owner` that holds `old` at `new`; returns `new`."""
    for attr, value in list(vars(owner).items()):
        if value is old:
            setattr(owner, attr, new)
    return new
