"""Region merging on the DINO grid, for every window of a batch at once (spec step 8).

The research code runs sklearn's DBSCAN (eps 0.2, min_samples 1, metric precomputed) on
D = max(A) - A, A the cosine matrix of region-mean features, leaving out the window's smallest id
("unsegmented"). With min_samples 1 every point is a core point, so DBSCAN's clusters are exactly
the connected components of the graph {D_rs <= eps} (eps inclusive), numbered in the order of
their lowest member. We compute those components with a fixed number of boolean matrix squarings:
no sklearn, no host round trip, and no Python loop over windows or regions.

This file is the plain torch reference; a fused kernel with the same signature may sit beside it.
"""

from __future__ import annotations

import math

import torch


def merge_regions(feats: torch.Tensor, local_ids: torch.Tensor, num_regions: int,
                  eps: float = 0.2) -> torch.Tensor:
    """feats [B,N,C] normalized; local_ids [B,N] in 0..R_b-1, sorted by original id (0 = the window's
    smallest, which plays "unsegmented"); num_regions = max R_b over the batch.

    Returns merged ids [B,N]: -1 for the window's smallest region, else the DBSCAN cluster index.
    """
    b, n, c = feats.shape
    r = num_regions
    # Region means, then L2-normalized (sum / count keeps the research code's mean explicitly).
    sums = feats.new_zeros(b, r, c).scatter_add_(1, local_ids[:, :, None].expand(-1, -1, c), feats)
    counts = torch.zeros(b, r, dtype=feats.dtype, device=feats.device).scatter_add_(
        1, local_ids, torch.ones_like(local_ids, dtype=feats.dtype))
    present = counts > 0
    means = torch.nn.functional.normalize(sums / counts.clamp(min=1)[:, :, None], dim=-1)
    # Region 0 (the smallest id) is left out of merging.
    valid = present.clone()
    valid[:, 0] = False
    pair = valid[:, :, None] & valid[:, None, :]
    a = means @ means.transpose(1, 2)
    a_max = a.masked_fill(~pair, float("-inf")).amax(dim=(1, 2), keepdim=True)
    eye = torch.eye(r, dtype=torch.bool, device=feats.device)
    reach = (((a_max - a) <= eps) | eye) & pair  # a region is always its own neighbour
    # Transitive closure by repeated squaring: after k steps, paths of length up to 2^k are found.
    for _ in range(max(1, math.ceil(math.log2(max(r, 2))))):
        reach = reach | (reach.float() @ reach.float() > 0)
    # A region's component is named by its lowest member; clusters are numbered by that member.
    root = torch.where(valid, reach.float().argmax(dim=2), torch.zeros_like(counts, dtype=torch.long))
    is_root = valid & (root == torch.arange(r, device=feats.device))
    cluster_of_root = torch.cumsum(is_root.long(), dim=1) - 1
    cluster = torch.gather(cluster_of_root, 1, root)
    cluster = torch.where(valid, cluster, torch.full_like(cluster, -1))
    return torch.gather(cluster, 1, local_ids)
