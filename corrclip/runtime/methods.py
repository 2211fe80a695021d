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

    def __init__(self, dino: Callable, trunk: Callable, head: Callable, patch: int, merge: Callable | None = None):
        self.dino, self.trunk, self.head, self.patch = dino, trunk, head, patch
        self.merge_kw = {} if merge is None else {"merge": merge}

    def encode(self, windows: torch.Tensor, masks: torch.Tensor | None, text: torch.Tensor, s: Settings,
               timer: StageTimer) -> tuple[torch.Tensor, None]:
        h, w = windows.shape[-2:]
        with timer("dino"):
            feats = self.dino(windows)
        with timer("regions"):
            reg = window_regions(masks, feats, (h // 8, w // 8), (h // self.patch, w // self.patch), s.merge_eps,
                                 **self.merge_kw)
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
