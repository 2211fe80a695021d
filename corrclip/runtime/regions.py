"""Region maps through the resampling chain: original -> input -> DINO grid -> CLIP grid.

What the encoders need per window (spec steps 2, 8, 9, 10 and 13):
  * merged region ids on the DINO grid, the window's smallest id marked -1 ("unsegmented"),
    for the scope rule of the correlation attention;
  * region membership on the CLIP grid (one mask class token per region, the unsegmented one
    included), for the trunk;
  * for every DINO patch, the index of its region token: the CLIP-grid map nearest-upsampled
    back to the DINO grid (small regions that vanish at the CLIP grid lose their token).

Ids are compacted (sorted order preserved) so arbitrary user label values work; the padding id is
larger than every real id, as the research code's 10000 is for any realistic mask count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..kernels import merge_regions
from .preprocess import resize_nearest


def compact_label_map(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Any integer map -> ids 0..K-1 in sorted order of the original values (0 = the minimum)."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64), len(uniq)


def compact_per_window(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, ...] integer maps -> per-window ids 0..R_b-1 (sorted order kept), and max R_b."""
    b = ids.shape[0]
    flat = ids.reshape(b, -1)
    # Rank of each value among its window's distinct values: sort each row, count value changes. One host read
    # (R, a shape for what follows), where a global torch.unique needed two.
    ordered, where = flat.sort(dim=1)
    change = torch.ones_like(ordered, dtype=torch.long)
    change[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = change.cumsum(dim=1) - 1
    local = torch.empty_like(rank).scatter_(1, where, rank)
    return local.reshape(ids.shape), int(rank[:, -1].max()) + 1


@dataclass
class WindowRegions:
    region_ids: torch.Tensor  # [B, H, W] merged ids on the DINO grid, -1 = unsegmented
    membership: torch.Tensor  # [B, R, n] bool on the CLIP grid
    mct_index: torch.Tensor  # [B, H, W] region-token index of each DINO patch


def window_regions(masks: torch.Tensor, feats: torch.Tensor, dino_grid: tuple[int, int],
                   clip_grid: tuple[int, int], eps: float = 0.2, merge=merge_regions) -> WindowRegions:
    """masks [B, h, w] window crops of the input-size label map (padded with the pad id);
    feats [B, H*W, C] the windows' normalized DINO features."""
    b = masks.shape[0]
    on_dino = resize_nearest(masks, dino_grid)
    local, r = compact_per_window(on_dino)
    merged = merge(feats, local.reshape(b, -1), r, eps).reshape(b, *dino_grid)
    on_clip, r_clip = compact_per_window(resize_nearest(merged, clip_grid))
    membership = torch.zeros(b, r_clip, on_clip[0].numel(), dtype=torch.bool, device=masks.device)
    membership.scatter_(1, on_clip.reshape(b, 1, -1), True)
    return WindowRegions(merged, membership, resize_nearest(on_clip, dino_grid))
