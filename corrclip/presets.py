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
    merge_eps: float = 0.2  # CorrCLIP: region merging threshold on (max cosine - cosine)
    cluster_eps: float = 1.1  # CLIPtrase: DBSCAN on correlation rows (336: 1.1 / 7, 224: 0.7 / 3)
    cluster_min_samples: int = 7
    cls_prior: bool = False  # CLIPtrase on VOC20: multiply class maps by the CLS logits


METHODS = ("corrclip", "sc-clip", "cliptrase")

# Per-benchmark settings (configs/cfg_*.py of each research code base). The class lists are the
# CorrCLIP files for every method (vocab.py).
CORRCLIP = {
    "voc21": Settings(prob_thd=0.2),
    "voc20": Settings(),
    "context60": Settings(prob_thd=0.15),
    "context59": Settings(),
    "coco_object": Settings(prob_thd=0.25),
    "coco_stuff": Settings(),
    "city_scapes": Settings(short_side=448, crop=224, stride=112),
    "ade20k": Settings(short_side=448),
}
_SC = Settings(crop=224, stride=112)
SCCLIP = {
    "voc21": replace(_SC, logit_scale=50.0, prob_thd=0.15, area_thd=0.1),
    "voc20": _SC,
    "context60": replace(_SC, prob_thd=0.15),
    "context59": _SC,
    "coco_object": replace(_SC, logit_scale=55.0, prob_thd=0.35),
    "coco_stuff": _SC,
    "city_scapes": replace(_SC, short_side=560),
    "ade20k": _SC,
}
# CLIPtrase scores a centre crop at 336 (or 224); our engine runs its per-window method over
# non-overlapping 336 windows of the whole image (README: protocol difference). Logit scale 100.
_TR = Settings(crop=336, stride=336, logit_scale=100.0, cluster_eps=1.1, cluster_min_samples=7)
CLIPTRASE = {name: _TR for name in CORRCLIP} | {"voc20": replace(_TR, cls_prior=True)}
DEFAULTS = {"corrclip": Settings(), "sc-clip": _SC, "cliptrase": _TR}
DATASETS = {"corrclip": CORRCLIP, "sc-clip": SCCLIP, "cliptrase": CLIPTRASE}


def dataset_settings(name: str | None, method: str = "corrclip", **overrides) -> Settings:
    """A benchmark's settings for a method (name None: the method's defaults), with overrides."""
    if method not in DATASETS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if name is not None and name not in DATASETS[method]:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(DATASETS[method])}")
    base = DEFAULTS[method] if name is None else DATASETS[method][name]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
