"""CLIPtrase: self-correlation CLIP features, DBSCAN clustering of the denoised correlation rows into
regions, and a vote inside those regions (specs/cliptrase.md; the shared vote, on the stitched map).
Bundle graphs: clip_dense (features, CLS, correlation), clip_text.

Protocol difference (README): the engine runs the per-window method over non-overlapping 336
windows of the whole image, not the paper's centre crop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..presets import Settings
from .base import Method, register


@dataclass(frozen=True)
class CliptraseSettings(Settings):
    cluster_eps: float = 1.1  # DBSCAN on correlation rows (336: 1.1 / 7, 224: 0.7 / 3)
    cluster_min_samples: int = 7
    cls_prior: bool = False  # VOC20: multiply class maps by the CLS logits


_TR = CliptraseSettings(crop=336, stride=336, logit_scale=100.0)
PRESETS = {name: _TR for name in ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff",
                                  "city_scapes", "ade20k")} | {"voc20": replace(_TR, cls_prior=True)}


class CliptraseEncoder:
    name = "cliptrase"
    needs_masks = False

    def __init__(self, dense: Callable, patch: int):
        self.dense, self.patch = dense, patch
        self.stages = {"clip_dense": dense}

    def encode(self, windows: torch.Tensor, masks: torch.Tensor | None, text: torch.Tensor, s: CliptraseSettings,
               timer) -> tuple[torch.Tensor, torch.Tensor]:
        from ..kernels.cliptrase_post import cluster_regions
        from ..kernels.dbscan import dbscan

        b, (h, w) = len(windows), windows.shape[-2:]
        gh, gw = h // self.patch, w // self.patch
        with timer("clip_dense"):
            feats, cls, corr = self.dense(windows)
        logits = (feats @ text.to(feats.dtype).t()).transpose(1, 2).reshape(b, -1, gh, gw)
        if s.cls_prior:  # VOC20 in the research script: an image-level prior from the CLS logits
            logits = logits * (cls @ text.to(cls.dtype).t())[:, :, None, None]
        with timer("regions"):
            regions = []
            for i in range(b):  # a handful of windows per image; clustering is per window
                labels = dbscan(corr[i].float(), s.cluster_eps, s.cluster_min_samples)
                r = cluster_regions(corr[i].float(), labels, (gh, gw), (h, w))
                regions.append(r if r is not None else torch.full((h, w), -1, dtype=torch.long, device=windows.device))
        return logits, torch.stack(regions)


def build_encoder(models, device: torch.device) -> CliptraseEncoder:
    from ..models.cliptrase import CliptraseDense

    visual = models.clip.visual
    return CliptraseEncoder(CliptraseDense(visual).eval(), visual.conv1.kernel_size[0])


def from_graphs(run: dict[str, Callable], manifest: dict) -> CliptraseEncoder:
    return CliptraseEncoder(run["clip_dense"], manifest["clip"]["patch"])


def graphs(models, crop: int) -> list:
    from ..export.graphs import dense_graph, text_graph
    from ..models.cliptrase import CliptraseDense

    return [dense_graph(CliptraseDense(models.clip.visual), ["feats", "cls", "corr"], crop), text_graph(models)]


METHOD = register(Method(
    name="cliptrase",
    summary="CLIP only, self-correlation clustering and a region vote",
    uses_dino=False, uses_regions=False, openai_clip=True,
    defaults=_TR, presets=PRESETS,
    build_encoder=build_encoder, graphs=graphs, from_graphs=from_graphs,
))
