"""Masked correlation attention: the heart of CorrCLIP (spec steps 7, 9 and 12).

out[b, i] = sum_j softmax_j(tau * S_ij over allowed j) * values[b, j],   S = F F^T (cosines)

Allowed pairs (the spec's Omega) are decided from region ids alone:
  * i and j lie in the same segmented region, or
  * i or j is unsegmented (id < 0) and S_ij > mean(S), the mean over all N^2 entries.
Every row keeps its diagonal (S_ii = 1 exceeds the mean, or i shares its own region), so a row is
never empty for real features.

This file is the plain torch reference; a fused kernel with the same signature may sit beside it.
"""

from __future__ import annotations

import torch


def masked_correlation_attention(feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor,
                                 tau: float = 4.0) -> torch.Tensor:
    """feats [B,N,C] (L2-normalized), region_ids [B,N] (int, < 0 = unsegmented), values [B,N,D] -> [B,N,D]."""
    s = feats @ feats.transpose(1, 2)  # [B, N, N]
    mean = s.mean(dim=(1, 2), keepdim=True)
    unseg = region_ids < 0
    same = (region_ids[:, :, None] == region_ids[:, None, :]) & ~unseg[:, :, None]
    loose = (unseg[:, :, None] | unseg[:, None, :]) & (s > mean)
    scores = (tau * s).masked_fill(~(same | loose), float("-inf"))
    weights = scores.softmax(dim=-1).to(values.dtype)
    return weights @ values
