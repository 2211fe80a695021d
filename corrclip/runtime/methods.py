"""The per-window part of each method. Everything around it (decode, resize, windows, text
embeddings, batching, stitching, classification, voting) is the shared pipeline.

A method turns a batch of normalized windows (and, for CorrCLIP, their region-map crops) into
cosine logits on its feature grid, [B, Q, h, w]; CLIPtrase also returns a region map per window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..presets import Settings
from .regions import window_regions
from .timing import StageTimer


class CorrClip:
    """DINO features -> region merging -> CLIP trunk with mask class tokens -> correlation head."""

    name = "corrclip"
    needs_masks = True

    def __init__(self, dino: Callable, trunk: Callable, head: Callable, patch: int):
        self.dino, self.trunk, self.head, self.patch = dino, trunk, head, patch

    def encode(self, windows: torch.Tensor, masks: torch.Tensor | None, text: torch.Tensor, s: Settings,
               timer: StageTimer) -> tuple[torch.Tensor, None]:
        h, w = windows.shape[-2:]
        with timer("dino"):
            feats = self.dino(windows)
        with timer("regions"):
            reg = window_regions(masks, feats, (h // 8, w // 8), (h // self.patch, w // self.patch), s.merge_eps)
        with timer("clip_trunk"):
            values, mct = self.trunk(windows, reg.membership)
        with timer("corr_head"):
            logits = self.head(feats, reg.region_ids, values, mct, reg.mct_index, text)
        return logits, None


class Dense:
    """One graph from windows to normalized dense features (SC-CLIP); logits are cosines with the text."""

    needs_masks = False

    def __init__(self, name: str, dense: Callable, patch: int):
        self.name, self.dense, self.patch = name, dense, patch

    def encode(self, windows: torch.Tensor, masks: torch.Tensor | None, text: torch.Tensor, s: Settings,
               timer: StageTimer) -> tuple[torch.Tensor, None]:
        h, w = windows.shape[-2:]
        with timer("clip_dense"):
            feats = self.dense(windows)  # [B, n, E]
        logits = feats @ text.to(feats.dtype).t()
        return logits.transpose(1, 2).reshape(len(windows), -1, h // self.patch, w // self.patch), None


class Cliptrase:
    """CLIPtrase: self-correlation CLIP features, clustering of the denoised correlation rows into
    regions (DBSCAN), and a vote inside those regions (the shared vote, on the stitched map)."""

    name = "cliptrase"
    needs_masks = False

    def __init__(self, dense: Callable, patch: int):
        self.dense, self.patch = dense, patch

    def encode(self, windows: torch.Tensor, masks: torch.Tensor | None, text: torch.Tensor, s: Settings,
               timer: StageTimer) -> tuple[torch.Tensor, torch.Tensor]:
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


def build_method(name: str, models, device: torch.device):
    """The torch-backend method objects from built models (corrclip.models.build.Models)."""
    visual = models.clip.visual
    patch = visual.conv1.kernel_size[0]
    if name == "corrclip":
        from ..models.clip import ClipTrunk
        from ..models.corr_head import CorrHead
        from ..models.dino import DinoFeatures

        return CorrClip(DinoFeatures(models.dino), ClipTrunk(visual), CorrHead(visual), patch)
    if name == "sc-clip":
        from ..models.scclip import ScClipConfig, ScClipDense

        cfg = ScClipConfig.for_depth(len(visual.transformer.resblocks))
        return Dense("sc-clip", ScClipDense(visual, cfg).eval(), patch)
    if name == "cliptrase":
        from ..models.cliptrase import CliptraseDense

        return Cliptrase(CliptraseDense(visual).eval(), patch)
    raise ValueError(f"unknown method {name!r}")
