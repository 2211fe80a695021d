"""SC-CLIP (Self-Calibrated CLIP) dense features, after shared/specs/sc-clip.md §2 (5) and its
"Precise semantics".

Per window, with X^l the output of block l (1-based) and P^l its patch rows:
  * blocks 1..L-1 run unmodified and every output is kept (`outs[i]` is block i+1);
  * anomalous patches of P^{L-1} (simplified LOF, or the older top-10-by-norm rule) are replaced by
    the mean of their valid 3x3 neighbours ("repair");
  * S_mid, the cosine matrix of the repaired P^{pre+1}, pre-aggregates the repaired P^{L-1} and is
    the prior of the modified last-block attention (K-K softmax + S_mid softmax, no Q, no residual,
    no MLP);
  * pass 1: that attention on the pre-aggregated stream + res_cls * CLS^{L-1};
    pass 2: the same attention on the sum of the multi-level block outputs + res_cls * their CLS sum;
    both post-aggregated with the cosine matrix of the (unrepaired) P^{post+1};
  * ln_post(Y1' + Y2') @ proj, L2-normalized.

Everything is batched over windows (the research code only runs batch 1) and free of
data-dependent Python control flow, so the graph exports with torch.export / ONNX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import _heads, _merge_heads, embed_windows


@dataclass(frozen=True)
class ScClipConfig:
    """0-based indices into the list of kept block outputs (blocks 1..L-1): index i is block i+1."""

    pre_adjust_idx: int  # S_mid / pre-aggregation source (repaired)
    post_adjust_idx: int  # post-aggregation source (not repaired)
    multi_start_idx: int  # multi-level sum: outputs multi_start_idx .. multi_end_idx-1
    multi_end_idx: int
    res_cls: float  # weight of the CLS token re-added after each last-block pass
    beta: float = 0.4  # aggregation keeps cosines >= beta
    lof_k: int = 30
    contamination: float = 0.05
    anomaly: str = "lof"  # "lof" (current research code) or "norm" (first commit: top-10 by L2 norm)

    def __post_init__(self):
        if self.anomaly not in ("lof", "norm"):
            raise ValueError(f"anomaly must be 'lof' or 'norm', not {self.anomaly!r}")

    @classmethod
    def for_depth(cls, depth: int, **overrides) -> ScClipConfig:
        """Research presets: 12 blocks (ViT-B/16) and 24 (ViT-L/14, from SC-CLIP issue #5).

        6 blocks is our tiny test CLIP, no research value: it keeps the B/16 layout relative to the
        five kept outputs: S_mid from the second-to-last kept one (like block 9 of 11), post source
        block 2, multi-level blocks 2..4 (like 4..10: early-middle, excluding the anomaly layer).
        """
        presets = {
            12: (8, 3, 3, 10, 0.3),
            24: (16, 6, 8, 19, 0.1),
            6: (3, 1, 1, 4, 0.3),
        }
        if depth not in presets:
            raise ValueError(f"no SC-CLIP preset for a {depth}-block ViT (known: {sorted(presets)})")
        return cls(*presets[depth], **overrides)


# --------------------------------------------------------------------------------------------
# Shared with the CLIPtrase graph: the image-tower pieces that run unmodified.


def vanilla_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One unmodified open_clip block on batch-first tokens, written out so it exports the same way
    whatever the block's batch_first setting."""
    attn = blk.attn
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (_heads(t, attn.num_heads) for t in qkv.split(x.shape[-1], dim=-1))
    x = x + blk.ls_1(attn.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v))))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


# --------------------------------------------------------------------------------------------
# Anomaly detection and repair (spec eq. 1-2)


def lof_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [B,N,D] -> simplified LOF [B,N]: mean over the k nearest j (self excluded) of kd_i / kd_j.

    Distances are squared Euclidean. Always fp32: the research code's fp16 distances overflow past
    ~256, we follow the math. The Gram form avoids the research code's N x N x D difference tensor;
    it agrees to rounding.
    """
    x = x.float()
    n = x.shape[1]
    k = min(k, n - 1)
    sq = x.square().sum(-1)
    d = (sq[:, :, None] + sq[:, None, :] - 2 * x @ x.transpose(1, 2)).clamp_min(0)
    # Excluding self explicitly rather than dropping the first of k+1: same kd and same scores
    # (a zero-distance duplicate j has kd_j = kd_i), and robust to rounding on the diagonal.
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    knn_d, knn_i = d.masked_fill(eye, float("inf")).topk(k, dim=-1, largest=False)
    kd = knn_d[..., -1]  # k-distance of every token (topk sorts ascending)
    kd_neighbours = kd.gather(1, knn_i.flatten(1)).view_as(knn_i)
    return (kd[..., None] / kd_neighbours).mean(-1)


def anomalies(scores: torch.Tensor, contamination: float) -> torch.Tensor:
    """scores [B,N] -> bool [B,N]: score > the (1 - contamination) quantile (linear interpolation).

    torch.quantile's exact arithmetic (rank in fp32, lerp between neighbours), written with sort so
    it exports; the rank is a tensor, so N (the window size) stays dynamic in an exported graph.
    Strict >: when nothing exceeds the quantile nothing is flagged.
    """
    n = scores.shape[-1]
    rank = torch.full((), 1.0 - contamination, dtype=torch.float32, device=scores.device) \
        * torch.full((), n - 1, dtype=torch.float32, device=scores.device)
    lo, hi = rank.floor(), rank.ceil()
    s = scores.sort(dim=-1).values
    q = torch.lerp(s.index_select(-1, lo.long().view(1)), s.index_select(-1, hi.long().view(1)), rank - lo)
    return scores > q


def norm_anomalies(x: torch.Tensor, k: int = 10) -> torch.Tensor:
    """x [B,N,D] -> bool [B,N]: the k tokens with the largest L2 norm (SC-CLIP's first commit)."""
    norms = x.float().norm(dim=-1)
    return torch.zeros_like(norms, dtype=torch.bool).scatter(1, norms.topk(k, dim=-1).indices, True)


def _neighbour_sum(g: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> sum over the 8 neighbours (zero outside the grid), centre excluded."""
    h, w = g.shape[-2:]
    p = F.pad(g, (1, 1, 1, 1))
    return sum(p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def repair(x: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """x [B,N,D] row-major on an (h, w) grid, mask [B,N] -> x with every masked token replaced by
    the mean of its in-grid, unmasked 8-neighbours; left alone when it has none.

    Token t sits at (t // w, t % w). The research code decodes with the grid's first dimension,
    which is the same thing on its square windows and wrong on others; we use the correct layout.
    """
    b, n, d = x.shape
    h, w = grid
    valid = (~mask).to(x.dtype).view(b, 1, h, w)
    total = _neighbour_sum(x.transpose(1, 2).reshape(b, d, h, w) * valid)
    count = _neighbour_sum(valid)
    mean = (total / count.clamp_min(1)).flatten(2).transpose(1, 2)
    return torch.where((mask & (count.flatten(1) > 0))[..., None], mean, x)


# --------------------------------------------------------------------------------------------
# Self-adjusting aggregation and the last-block attention (spec eq. 3-4)


def cosine_matrix(f: torch.Tensor) -> torch.Tensor:
    """f [B,N,D] -> pairwise cosine similarities [B,N,N]."""
    f = F.normalize(f, dim=-1)
    return f @ f.transpose(1, 2)


def aggregation_weights(sim: torch.Tensor, beta: float) -> torch.Tensor:
    """Cosines below beta zeroed (== beta kept), rows divided by rowsum + 1e-6."""
    s = torch.where(sim >= beta, sim, torch.zeros_like(sim))
    return s / (s.sum(-1, keepdim=True) + 1e-6)


def adaptive_aggregate(feats_source: torch.Tensor, x: torch.Tensor, beta: float) -> torch.Tensor:
    """Agg(x) = S_hat x with S_hat the thresholded, row-normalized cosine matrix of feats_source."""
    return aggregation_weights(cosine_matrix(feats_source), beta) @ x


def similarity_prior(s_mid: torch.Tensor) -> torch.Tensor:
    """softmax_row(M), M = 3 (S_mid - mean(S_mid)) over all N^2 entries, M < 0 -> -inf.

    The diagonal (cosine 1 >= mean) always survives, so no row is all -inf.
    """
    m = 3 * (s_mid - s_mid.mean(dim=(-2, -1), keepdim=True))
    return m.masked_fill(m < 0, float("-inf")).softmax(dim=-1)


def custom_attention(block: nn.Module, x_patches: torch.Tensor, s_mid: torch.Tensor) -> torch.Tensor:
    """The modified last block: x [B,N,D], raw S_mid [B,N,N] -> W_o concat_h(A_h V_h) + b_o.

    A_h = (softmax(K_h K_h^T / sqrt(head_dim)) + softmax(M)) / 2. Q is never needed; there is no
    residual and no MLP.
    """
    attn = block.attn
    d = x_patches.shape[-1]
    kv = F.linear(block.ln_1(x_patches), attn.in_proj_weight[d:], attn.in_proj_bias[d:])
    k, v = (_heads(t, attn.num_heads) for t in kv.split(d, dim=-1))
    kk = (k @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])).softmax(dim=-1)
    a = (kk + similarity_prior(s_mid)[:, None]) / 2
    return attn.out_proj(_merge_heads(a @ v))


# --------------------------------------------------------------------------------------------


class ScClipDense(nn.Module):
    """windows [B,3,h,w] -> L2-normalized dense patch features [B, n, E] on the CLIP grid."""

    def __init__(self, visual: nn.Module, cfg: ScClipConfig | None = None):
        super().__init__()
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.patch = visual.conv1.kernel_size[0]
        kept = len(self.blocks) - 1
        self.cfg = cfg = cfg or ScClipConfig.for_depth(len(self.blocks))
        if not (0 <= cfg.pre_adjust_idx < kept and 0 <= cfg.post_adjust_idx < kept
                and 0 <= cfg.multi_start_idx < cfg.multi_end_idx <= kept):
            raise ValueError(f"{cfg} does not fit the {kept} kept block outputs of this ViT")

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        cfg, visual = self.cfg, self.visual
        grid = (windows.shape[-2] // self.patch, windows.shape[-1] // self.patch)
        x = embed_windows(visual, windows)
        outs = []
        for blk in self.blocks[:-1]:
            x = vanilla_block(blk, x)
            outs.append(x)
        last = self.blocks[-1]

        p = outs[-1][:, 1:]
        if cfg.anomaly == "lof":
            mask = anomalies(lof_scores(p, cfg.lof_k), cfg.contamination)
        else:
            mask = norm_anomalies(p)
        s_mid = cosine_matrix(repair(outs[cfg.pre_adjust_idx][:, 1:], mask, grid))
        z = aggregation_weights(s_mid, cfg.beta) @ repair(p, mask, grid)
        post = aggregation_weights(cosine_matrix(outs[cfg.post_adjust_idx][:, 1:]), cfg.beta)

        y1 = post @ (custom_attention(last, z, s_mid) + cfg.res_cls * outs[-1][:, :1])
        r = sum(outs[cfg.multi_start_idx:cfg.multi_end_idx])  # full token sets, none repaired
        y2 = post @ (custom_attention(last, r[:, 1:], s_mid) + cfg.res_cls * r[:, :1])

        o = visual.ln_post(y1 + y2)
        if visual.proj is not None:
            o = o @ visual.proj
        return F.normalize(o, dim=-1)
