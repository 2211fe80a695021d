"""The correlation head: from trunk outputs and DINO features to per-window cosine logits.

Spec steps 12-15: upsample the value paths (main and spatial) bilinearly to the DINO grid, apply
the masked correlation attention, the last block's out_proj (no residual, no MLP), give every
patch its region's MCT (semantic branch), ln_post each branch, fuse main + 1.0 spatial + 0.5
semantic, project, normalize, and take cosines with the text embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import masked_correlation_attention


class CorrHead(nn.Module):
    """Inputs (one row per window):
      feats        [B, N, C]        normalized DINO q+k features, N = H*W
      region_ids   [B, H, W] int    merged regions on the DINO grid, < 0 = unsegmented
      values       [B, 2, D, h, w]  value paths (main, spatial) on the CLIP grid
      mct          [B, R, D]        region tokens after the full last block
      mct_index    [B, H, W] int    which region token each DINO patch takes
      text         [Q, E]           normalized text embeddings
    Output: logits [B, Q, H, W], cosines (not yet scaled).
    """

    def __init__(self, visual: nn.Module, tau: float = 4.0, alpha: float = 1.0, beta: float = 0.5):
        super().__init__()
        self.out_proj = visual.transformer.resblocks[-1].attn.out_proj
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.tau, self.alpha, self.beta = tau, alpha, beta
        # The kernels' entry point: Triton or the torch reference, by device at call time; export traces the reference.
        self.attention = masked_correlation_attention

    def forward(self, feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor, mct: torch.Tensor,
                mct_index: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, hh, ww = region_ids.shape
        d = values.shape[2]
        up = F.interpolate(values.flatten(0, 1), size=(hh, ww), mode="bilinear", align_corners=False)
        up = up.reshape(b, 2 * d, hh * ww).transpose(1, 2)  # [B, N, 2D]: main | spatial channels
        y = self.attention(feats, region_ids.flatten(1), up.to(feats.dtype), self.tau).to(values.dtype)
        y = self.out_proj(y.reshape(b, hh * ww, 2, d))
        sem = torch.gather(mct, 1, mct_index.flatten(1)[:, :, None].expand(-1, -1, d))
        z = self.ln_post(y[:, :, 0]) + self.alpha * self.ln_post(y[:, :, 1]) + self.beta * self.ln_post(sem)
        z = F.normalize(z @ self.proj, dim=-1)
        logits = z @ text.to(z.dtype).t()  # [B, N, Q]
        return logits.transpose(1, 2).reshape(b, -1, hh, ww)
