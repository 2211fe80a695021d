"""Build every model of a backbone preset from the user's weight choices (shared by the runtime
and the exporter)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import presets
from .checkpoints import WeightsError, sha256
from .clip import build_clip
from .dino import build_dino


@dataclass
class Models:
    backbone: presets.Backbone
    clip: nn.Module
    clip_arch: str
    dino: nn.Module | None
    sam: nn.Module | None
    identity: dict[str, str] = field(default_factory=dict)  # what was loaded, for manifests and summaries
    weight_files: dict[str, str] = field(default_factory=dict)  # local checkpoint file -> sha256


def resolve_clip(bb: presets.Backbone, weights: str, clip_weights: str | None) -> tuple[str, str]:
    """(open_clip architecture, weights) from the backbone preset and the user's flags.

    clip_weights may be an open_clip tag for the preset's architecture, "openai" (switches to the
    OpenAI-trained architecture of the same size), "ARCH:TAG", or a local file.
    """
    if clip_weights is None:
        return bb.clip_arch, bb.clip_weights if weights == "official" else weights
    if clip_weights == "openai":
        if bb.name not in presets.OPENAI_ARCH:
            raise WeightsError(f"no OpenAI CLIP for backbone {bb.name}; OpenAI weights exist for vit_b and vit_l")
        return presets.OPENAI_ARCH[bb.name], "openai"
    if ":" in clip_weights and not os.path.exists(clip_weights):
        arch, tag = clip_weights.split(":", 1)
        return arch, tag
    return bb.clip_arch, clip_weights


def build_models(backbone: str = "vit_b", weights: str | None = None, *, clip_weights: str | None = None,
                 dino_weights: str | None = None, sam_weights: str | None = None, sam: str | None = None,
                 dino: str | None = None, device: torch.device | str = "cpu") -> Models:
    """weights: "official" or "random" for every model; the per-model flags override one model
    each with a tag or a local file. sam="none" skips SAM."""
    bb = presets.backbone(backbone)
    weights = weights or ("random" if backbone == "tiny" else "official")
    if weights not in ("official", "random"):
        raise WeightsError(f"--weights must be 'official' or 'random', not {weights!r}; "
                           "use --clip-weights/--dino-weights/--sam-weights for local files")
    clip_arch, clip_w = resolve_clip(bb, weights, clip_weights)
    clip = build_clip(clip_arch, clip_w, device=device)
    dino_name = dino or bb.dino
    identity = {"backbone": bb.name, "clip": f"{clip_arch}:{clip_w}"}
    dino_model = None
    if dino_name != "none":
        dino_model = build_dino(dino_name, dino_weights or weights, device=device)
        identity["dino"] = f"{dino_name}:{dino_weights or weights}"
    sam_model = None
    sam = sam or bb.sam
    if sam != "none":
        from .sam import build_sam

        sam_model = build_sam(sam, sam_weights or weights, device=device)
        identity["sam"] = f"{sam}:{sam_weights or weights}"
    files = {f: sha256(f) for f in (clip_weights, dino_weights, sam_weights) if f and os.path.isfile(f)}
    return Models(bb, clip, clip_arch, dino_model, sam_model, identity, files)
