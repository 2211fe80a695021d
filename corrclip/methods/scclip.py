"""SC-CLIP: anomaly-token repair (LOF), self-adjusting aggregation and multi-level fusion; CLIP only,
the low-latency mode (specs/sc-clip.md). One dense graph from windows to normalized features;
logits are one matmul with the text. Bundle graphs: clip_dense, clip_text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..presets import Settings
from .base import Method, register

_SC = Settings(crop=224, stride=112)
# configs/cfg_*.py of the research code (class lists: the CorrCLIP files, vocab.py)
PRESETS = {
    "voc21": replace(_SC, logit_scale=50.0, prob_thd=0.15, area_thd=0.1),
    "voc20": _SC,
    "context60": replace(_SC, prob_thd=0.15),
    "context59": _SC,
    "coco_object": replace(_SC, logit_scale=55.0, prob_thd=0.35),
    "coco_stuff": _SC,
    "city_scapes": replace(_SC, short_side=560),
    "ade20k": _SC,
}


class DenseEncoder:
    """One graph from windows to normalized dense features [B, n, E]; logits are cosines with the text."""

    needs_masks = False

    def __init__(self, name: str, dense: Callable, patch: int):
        self.name, self.dense, self.patch = name, dense, patch
        self.stages = {"clip_dense": dense}

    def encode(self, windows: torch.Tensor, masks: torch.Tensor | None, text: torch.Tensor, s: Settings,
               timer) -> tuple[torch.Tensor, None]:
        h, w = windows.shape[-2:]
        with timer("clip_dense"):
            feats = self.dense(windows)  # [B, n, E]
        logits = feats @ text.to(feats.dtype).t()
        return logits.transpose(1, 2).reshape(len(windows), -1, h // self.patch, w // self.patch), None


def build_encoder(models, device: torch.device) -> DenseEncoder:
    from ..models.scclip import ScClipConfig, ScClipDense

    visual = models.clip.visual
    cfg = ScClipConfig.for_depth(len(visual.transformer.resblocks))
    return DenseEncoder("sc-clip", ScClipDense(visual, cfg).eval(), visual.conv1.kernel_size[0])


def from_graphs(run: dict[str, Callable], manifest: dict) -> DenseEncoder:
    return DenseEncoder("sc-clip", lambda w: run["clip_dense"](w)[0], manifest["clip"]["patch"])


def graphs(models, crop: int) -> list:
    from ..export.graphs import dense_graph, text_graph
    from ..models.scclip import ScClipDense

    # The whole forward up to the (normalized) features is one graph. Its thresholds flip on rounding
    # differences, moving a few tokens (about 0.3% at 336x448 windows): allow 1% of them past tolerance.
    return [dense_graph(ScClipDense(models.clip.visual), ["feats"], crop, flip_rows=0.01), text_graph(models)]


METHOD = register(Method(
    name="sc-clip",
    summary="CLIP only: the low-latency mode (anomaly repair, self-adjusting aggregation)",
    uses_dino=False, uses_regions=False, openai_clip=True,
    defaults=_SC, presets=PRESETS,
    build_encoder=build_encoder, graphs=graphs, from_graphs=from_graphs,
))
