"""Presets: which models make a backbone, and each benchmark's settings (corrclip.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    """Inference settings of one run (the research code's segmentor arguments and data pipeline)."""

    short_side: int = 336  # resize so the short side is this (long side capped at long_cap)
    long_cap: int = 2048
    crop: int = 336  # sliding window
    stride: int = 112
    logit_scale: float = 40.0
    prob_thd: float = 0.0  # pixels whose best class probability is below this become class 0
    area_thd: float | None = None  # SC-CLIP: drop foreground classes with a smaller share of the foreground
    merge_eps: float = 0.2  # region merging threshold on (max cosine - cosine)


# Per-benchmark settings (configs/cfg_*.py of the research code) and their class lists (vocab.py).
DATASETS: dict[str, Settings] = {
    "voc21": Settings(prob_thd=0.2),
    "voc20": Settings(),
    "context60": Settings(prob_thd=0.15),
    "context59": Settings(),
    "coco_object": Settings(prob_thd=0.25),
    "coco_stuff": Settings(),
    "city_scapes": Settings(short_side=448, crop=224, stride=112),
    "ade20k": Settings(short_side=448),
}


def dataset_settings(name: str, **overrides) -> Settings:
    if name not in DATASETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(DATASETS)}")
    return replace(DATASETS[name], **{k: v for k, v in overrides.items() if v is not None})
