"""What a method is: everything the engine needs to know about it, declared in one place.

A method module (corrclip/methods/corrclip.py, scclip.py, cliptrase.py) builds one `Method` and
registers it. The API, the exporter, the CLI and bench read methods only through this registry, so
adding a method is one new module.

The per-window encoder is the method's part of the shared pipeline (runtime/pipeline.py): it turns
a batch of normalized windows (and their region-map crops when `needs_masks`) into cosine logits
[B, Q, h, w] on its feature grid, plus optionally its own region map per window (CLIPtrase).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from ..presets import OPENAI_ARCH, Settings


class Encoder(Protocol):
    name: str
    needs_masks: bool  # takes region-map crops (SAM masks or user label maps)
    stages: Mapping[str, Callable]  # stage name -> the graph it runs (for bench's weight bytes)

    def encode(self, windows: torch.Tensor, masks: torch.Tensor | None, text: torch.Tensor, s: Settings,
               timer) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help
    uses_dino: bool
    uses_regions: bool  # region masks: SAM, or user label maps
    openai_clip: bool  # CLIP weights default to OpenAI's (as the method's research code), not the backbone's
    defaults: Settings  # settings without a benchmark preset
    presets: dict[str, Settings]  # benchmark name -> settings
    build_encoder: Callable[[Any, torch.device], Encoder]  # (models.build.Models, device) -> torch encoder
    graphs: Callable[[Any, int], list]  # (Models, crop) -> the export.graphs.Graph list of its bundle
    from_graphs: Callable[[dict[str, Callable], dict], Encoder]  # (graph name -> executor, manifest) -> encoder
    hyperparameters: Callable[[Settings], dict] = field(default=lambda s: {"settings": s.__dict__})  # manifest

    def settings(self, preset: str | None = None, **overrides) -> Settings:
        """A benchmark's settings (None: the method's defaults), with overrides (None values ignored)."""
        if preset is not None and preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(self.presets)}")
        base = self.defaults if preset is None else self.presets[preset]
        fields = set(base.__dataclass_fields__)
        unknown = sorted(k for k, v in overrides.items() if v is not None and k not in fields)
        if unknown:
            raise ValueError(f"{self.name} has no setting {', '.join(unknown)}; it has {', '.join(sorted(fields))}")
        s = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        if s.stride > s.crop:
            raise ValueError(f"stride {s.stride} is larger than the crop {s.crop}: some pixels would lie in no "
                             "window; use a stride no larger than the crop")
        return s

    def clip_weights(self, backbone: str, weights: str | None, clip_weights: str | None) -> str | None:
        """The CLIP weights to build: the user's choice, else OpenAI's for methods whose research code uses them."""
        if clip_weights is not None or not self.openai_clip or backbone not in OPENAI_ARCH:
            return clip_weights
        return f"{OPENAI_ARCH[backbone]}:random" if weights == "random" else "openai"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def build_models(method: Method, backbone: str = "vit_b", weights: str | None = None, *,
                 clip_weights: str | None = None, dino_weights: str | None = None, sam_weights: str | None = None,
                 sam: str | None = None, dino: str | None = None, device: torch.device | str = "cpu"):
    """The models a method needs (models.build.build_models with its rules applied)."""
    from ..models.build import build_models as build

    return build(backbone, weights, clip_weights=method.clip_weights(backbone, weights, clip_weights),
                 dino_weights=dino_weights, sam_weights=sam_weights,
                 sam=sam if method.uses_regions else "none", dino=dino if method.uses_dino else "none",
                 device=device)
