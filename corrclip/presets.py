"""Presets shared by every method: which models make a backbone, and the settings every method has.

Each method's per-benchmark settings (and its own extra fields) live with the method, in
corrclip/methods/.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    name: str
    clip_arch: str  # open_clip architecture name
    clip_weights: str  # open_clip pretrained tag used by "official"
    dino: str  # dino_vitb8 | dino_vits8 | tiny
    sam: str  # segment_anything model type: vit_b | vit_l | vit_h | tiny


BACKBONES: dict[str, Backbone] = {
    # The research default: MetaCLIP 2.5B ViT-B/16 (QuickGELU) + DINO ViT-B/8.
    "vit_b": Backbone("vit_b", "ViT-B-16-quickgelu", "metaclip_fullcc", "dino_vitb8", "vit_b"),
    "vit_l": Backbone("vit_l", "ViT-L-14-quickgelu", "metaclip_fullcc", "dino_vitb8", "vit_l"),
    "vit_h": Backbone("vit_h", "ViT-H-14", "laion2b_s32b_b79k", "dino_vitb8", "vit_h"),
    # 6-layer width-64 CLIP, 2-layer DINO, 2-layer SAM: for tests and quick smoke runs only.
    "tiny": Backbone("tiny", "tiny", "random", "tiny", "tiny"),
}

# OpenAI weights for the same trunks, selectable with --clip-weights openai.
OPENAI_ARCH = {"vit_b": "ViT-B-16", "vit_l": "ViT-L-14"}


def backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


@dataclass(frozen=True)
class Settings:
    """Inference settings of one run that the shared pipeline reads (the research code's segmentor
    arguments and data pipeline). Methods subclass it for their own fields."""

    short_side: int = 336  # resize so the short side is this (long side capped at long_cap)
    long_cap: int = 2048
    crop: int = 336  # sliding window
    stride: int = 112
    logit_scale: float = 40.0
    prob_thd: float = 0.0  # pixels whose best class probability is below this become class 0
    area_thd: float | None = None  # drop foreground classes with a smaller share of the foreground (SC-CLIP)
