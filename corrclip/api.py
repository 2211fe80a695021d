"""The public Python API.

    from corrclip import Segmenter
    seg = Segmenter("vit_b")                       # official weights (downloaded once)
    out = seg.segment("street.jpg", "sky; cloud, road, car")[0]
    out.labels, out.names                          # [H, W] class indices, class names
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import open_clip
import torch

from . import presets
from .models.checkpoints import WeightsError
from .models.clip import ClipText, ClipTrunk, build_clip
from .models.corr_head import CorrHead
from .models.dino import DinoFeatures, build_dino
from .runtime.image_io import decode_image
from .runtime.pipeline import CorrClipPipeline, Segmentation
from .runtime.text import TextEmbedder
from .vocab import Vocabulary, benchmark_vocabulary, parse_classes

ImageLike = str | os.PathLike | bytes | np.ndarray


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def as_vocabulary(classes: str | Sequence[str] | Vocabulary) -> Vocabulary:
    if isinstance(classes, Vocabulary):
        return classes
    if isinstance(classes, str):
        return parse_classes(classes)
    return parse_classes("\n".join(classes))


class Segmenter:
    """CorrCLIP open-vocabulary segmentation with the torch reference backend.

    weights: "official" (each model's official checkpoint) or "random" (seeded random weights:
    exercises the pipeline and its timing, segments nothing meaningful). clip_weights,
    dino_weights and sam_weights override one model each (a tag or a local file). sam="none"
    builds no mask generator: every call then needs label maps.
    """

    def __init__(self, backbone: str = "vit_b", weights: str | None = None, *, clip_weights: str | None = None,
                 dino_weights: str | None = None, sam_weights: str | None = None, sam: str | None = None,
                 amg=None, device: str | torch.device | None = None, max_windows: int = 8):
        bb = presets.backbone(backbone)
        weights = weights or ("random" if backbone == "tiny" else "official")
        if weights not in ("official", "random"):
            raise WeightsError(f"--weights must be 'official' or 'random', not {weights!r}; "
                               "use --clip-weights/--dino-weights/--sam-weights for local files")
        self.device = torch.device(device) if device is not None else default_device()
        self.backbone = bb
        clip_arch, clip_w = resolve_clip(bb, weights, clip_weights)
        clip = build_clip(clip_arch, clip_w, device=self.device)
        dino = build_dino(bb.dino, dino_weights or weights, device=self.device)
        self.identity = {"backbone": bb.name, "clip": f"{clip_arch}:{clip_w}", "dino": f"{bb.dino}:{dino_weights or weights}"}
        masks = None
        sam = sam or bb.sam
        if sam != "none":
            from .models.sam import build_sam
            from .runtime.amg import AmgSettings, MaskGenerator

            masks = MaskGenerator(build_sam(sam, sam_weights or weights, device=self.device), amg or AmgSettings())
            self.identity["sam"] = f"{sam}:{sam_weights or weights}"
        tokenizer = open_clip.get_tokenizer("ViT-B-16" if clip_arch == "tiny" else clip_arch)
        text = TextEmbedder(ClipText(clip), tokenizer, self.device)
        self.pipeline = CorrClipPipeline(
            DinoFeatures(dino), ClipTrunk(clip.visual), CorrHead(clip.visual), text,
            patch=clip.visual.conv1.kernel_size[0], mask_generator=masks, device=self.device,
            max_windows=max_windows)

    def segment(self, images: ImageLike | Sequence[ImageLike], classes: str | Sequence[str] | Vocabulary | None = None,
                *, preset: str | None = None, masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
                return_probs: bool = False, **overrides) -> list[Segmentation]:
        """Segments one image or a list. `classes` (e.g. "sky; cloud, road, car": commas separate
        classes, semicolons synonyms) or `preset` (a benchmark: its classes and settings).
        `masks`: region label maps at each image's resolution (skips SAM). `overrides`: fields of
        presets.Settings, e.g. prob_thd=0.2."""
        single = isinstance(images, (str, os.PathLike, bytes, np.ndarray)) and not (
            isinstance(images, np.ndarray) and images.ndim == 4)
        batch = [images] if single else list(images)
        decoded = [decode_image(x) if not isinstance(x, np.ndarray) else np.ascontiguousarray(x, np.uint8)
                   for x in batch]
        if classes is None and preset is None:
            raise ValueError("give classes (e.g. 'sky, road, car') or a preset (e.g. 'voc21')")
        vocab = as_vocabulary(classes) if classes is not None else benchmark_vocabulary(preset)
        settings = presets.dataset_settings(preset, **overrides) if preset else presets.Settings(**overrides)
        if masks is not None and (single or isinstance(masks, np.ndarray)):
            masks = [masks]
        if masks is not None and len(masks) != len(decoded):
            raise ValueError(f"got {len(masks)} label maps for {len(decoded)} images")
        return self.pipeline(decoded, vocab, settings, masks, return_probs=return_probs)
