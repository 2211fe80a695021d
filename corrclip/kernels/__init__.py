"""The hot operations of the runtime, each with one entry point here.

An entry point picks, at call time and from its input (dispatch.py), the op's plain torch reference or its Triton
path; both sit side by side in the op's module (correlation, merging, stitch_vote, sam_post), under the same name
for the reference and `<name>_triton` for the Triton path. Call the entry points; call a module's functions only
to pin one implementation (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import correlation, merging, stitch_vote
from .dispatch import backend, get_backend, set_backend, use_fused

__all__ = ["backend", "get_backend", "masked_correlation_attention", "merge_regions", "sam_postprocess",
           "set_backend", "stitch_classify_vote"]


def masked_correlation_attention(feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor,
                                 tau: float = 4.0) -> torch.Tensor:
    """CorrCLIP's masked correlation attention (correlation.py): feats [B,N,C], region_ids [B,N], values [B,N,D]."""
    if use_fused("masked_correlation_attention", values):
        return torch.ops.corrclip.masked_correlation_attention(feats, region_ids, values, tau)
    return correlation.masked_correlation_attention(feats, region_ids, values, tau)


def merge_regions(feats: torch.Tensor, local_ids: torch.Tensor, num_regions: int, eps: float = 0.2) -> torch.Tensor:
    """Region merging on the DINO grid (merging.py): feats [B,N,C], local ids [B,N] -> merged ids [B,N]."""
    if use_fused("merge_regions", feats):
        return torch.ops.corrclip.merge_regions(feats, local_ids, num_regions, eps)
    return merging.merge_regions(feats, local_ids, num_regions, eps)


def stitch_classify_vote(window_logits: torch.Tensor, windows: Sequence, input_size: tuple[int, int],
                         output_size: tuple[int, int], query_class: torch.Tensor, num_classes: int,
                         logit_scale: float, prob_thd: float, regions: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Window logits [B,Q,h,w] -> the voted label map [H0,W0] (stitch_vote.py)."""
    if use_fused("stitch_classify_vote", window_logits):
        geometry = stitch_vote.window_geometry(windows, window_logits.device)
        return torch.ops.corrclip.stitch_classify_vote(window_logits, geometry, list(input_size), list(output_size),
                                                       query_class, num_classes, float(logit_scale), float(prob_thd),
                                                       regions, num_regions)
    return stitch_vote.stitch_classify_vote(window_logits, windows, input_size, output_size, query_class, num_classes,
                                            logit_scale, prob_thd, regions, num_regions)


def sam_postprocess(low_res_logits: torch.Tensor, iou_preds: torch.Tensor, *args, **kwargs):
    """SAM automatic-mask post-processing (sam_post.py) -> sam_post.SamMasks. Its filters and NMS have
    data-dependent sizes, so the op is no single torch op: its two kernels are (torch.ops.corrclip.sam_*), and a
    failure of either falls back to the reference for the whole op."""
    from . import dispatch, sam_post  # segment_anything and torchvision: imported when first needed

    if use_fused("sam_postprocess", low_res_logits):
        return dispatch.run_fused("sam_postprocess", sam_post.sam_postprocess_triton, sam_post.sam_postprocess,
                                  low_res_logits.device, low_res_logits, iou_preds, *args, **kwargs)
    return sam_post.sam_postprocess(low_res_logits, iou_preds, *args, **kwargs)
