"""CLIPtrase dense features, after shared/specs/cliptrase.md eq. (1)-(3) and "Precise semantics" 8.

  * blocks 1..L-2 run unmodified;
  * block L-1 runs unmodified too, but its input also yields the semantic correlation map
    S = mean_h (cos(q_h, q_h) + cos(k_h, k_h) + cos(v_h, v_h)) / 3 over CLS + patches;
  * block L attends with A_h = softmax(q q^T/sqrt d) + softmax(k k^T/sqrt d) + softmax(v v^T/sqrt d)
    (a sum, rows sum to 3), keeping the residual and the MLP;
  * ln_post on every token, proj, L2-normalize; patches and CLS are returned separately;
  * the denoised patch correlation S'_ij = max(0, S_ij - S_CLS,j) feeds DBSCAN downstream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .clip import _heads, _merge_heads, embed_windows
from .scclip import vanilla_block


def _qkv_heads(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head q, k, v [B,H,T,hd] of ln_1(x), biases included."""
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (_heads(t, attn.num_heads) for t in qkv.split(x.shape[-1], dim=-1))
    return q, k, v


def qkv_correlation(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [B,T,D] (the block's input) -> S [B,T,T], eq. (1).

    Cosines as torch.cosine_similarity computes them: each vector divided by max(norm, 1e-8).
    """
    s = 0
    for t in _qkv_heads(block, x):
        t = F.normalize(t, dim=-1, eps=1e-8)
        s = s + t @ t.transpose(-2, -1)
    return (s / 3).mean(dim=1)


def self_correlation_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [B,T,D] -> W_o concat_h(A_h v_h) + b_o with A_h the q-q + k-k + v-v softmax sum, eq. (2).

    The research code scales the left operand by 1/sqrt(d) before each product; same value.
    """
    q, k, v = _qkv_heads(block, x)
    scale = 1 / math.sqrt(q.shape[-1])
    a = sum((t * scale @ t.transpose(-2, -1)).softmax(dim=-1) for t in (q, k, v))
    return block.attn.out_proj(_merge_heads(a @ v))


class CliptraseDense(nn.Module):
    """windows [B,3,h,w] -> (patch features [B,n,E], CLS feature [B,E], S' [B,n,n]).

    Features are L2-normalized; S' is the CLS-denoised block-(L-1) correlation among patches.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.blocks = visual.transformer.resblocks

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        visual = self.visual
        x = embed_windows(visual, windows)
        for blk in self.blocks[:-2]:
            x = vanilla_block(blk, x)
        s = qkv_correlation(self.blocks[-2], x)  # side output only: the block itself is vanilla
        x = vanilla_block(self.blocks[-2], x)

        last = self.blocks[-1]
        x = x + last.ls_1(self_correlation_attention(last, x))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        x = visual.ln_post(x)
        if visual.proj is not None:
            x = x @ visual.proj
        x = F.normalize(x, dim=-1)

        # eq. (3): remove each column patch's correlation with CLS ("global" component).
        corr = (s[:, 1:, 1:] - s[:, :1, 1:]).clamp_min(0)
        return x[:, 1:], x[:, 0], corr
