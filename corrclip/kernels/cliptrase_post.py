"""CLIPtrase's cluster maps (spec cliptrase.md eq. 5 and "Precise semantics" 6).

From DBSCAN labels over the rows of the denoised correlation S' to a region id per output pixel:
per-cluster mean of member rows (noise excluded) -> grid -> bilinear x4 -> 7x7 median filter with
scipy's mode='reflect' borders -> bilinear to the output size -> argmax (ties -> lowest id).
All float32, as in the research code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UPSAMPLE = 4  # the research code's `ratio`; the median window is 2 * ratio - 1


def _symmetric_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Source indices of a length-n axis padded by r on both sides, half-sample symmetric
    (d c b a | a b c d | d c b a), i.e. scipy.ndimage mode='reflect', valid for any r."""
    i = torch.arange(-r, n + r, device=device).remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def median_filter_2d(x: torch.Tensor, size: int = 7) -> torch.Tensor:
    """x [K,H,W] -> per-map size x size median, equal to scipy.ndimage.median_filter(x[k], size,
    mode='reflect'). Odd sizes only: the median is then an element, so the result is exact."""
    if size % 2 == 0:
        raise ValueError(f"median filter size must be odd, not {size}")
    r = size // 2
    h, w = x.shape[-2:]
    p = x.index_select(-2, _symmetric_index(h, r, x.device)).index_select(-1, _symmetric_index(w, r, x.device))
    windows = p.unfold(-2, size, 1).unfold(-2, size, 1)  # [K, H, W, size, size]
    return windows.reshape(*windows.shape[:-2], size * size).median(dim=-1).values


def cluster_regions(corr: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int],
                    out_size: tuple[int, int]) -> torch.Tensor | None:
    """corr S' [N,N], labels [N] (0..K-1, noise -1, as dbscan returns) on an (h, w) grid ->
    region ids [S,S] long in 0..K-1, or None when every point is noise (the caller then keeps the
    per-pixel predictions)."""
    k = int(labels.max()) + 1  # one host sync: the number of maps is a shape
    if k <= 0:
        return None
    h, w = grid
    corr = corr.float()
    member = (labels[None, :] == torch.arange(k, device=labels.device)[:, None]).float()  # [K, N]
    maps = (member @ corr) / member.sum(1, keepdim=True)  # mean of each cluster's rows
    maps = F.interpolate(maps.view(1, k, h, w), size=(UPSAMPLE * h, UPSAMPLE * w), mode="bilinear",
                         align_corners=False)[0]
    maps = median_filter_2d(maps, 2 * UPSAMPLE - 1)
    maps = F.interpolate(maps[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    return maps.argmax(dim=0)
