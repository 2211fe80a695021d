"""Classify and vote: from full-resolution cosine logits to the final label map (spec steps 17-18).

classify: softmax(logit_scale * logits) over the queries, a class's probability is the max over
its queries (background synonyms), argmax (ties -> lowest class), and pixels whose best
probability is below prob_thd become class 0.
vote: every region of the original (unmerged) label map except its smallest id takes the majority
class of its pixels; ties go to the smallest class index (what torch.mode returns on the CPU).

These are the plain torch references; a fused kernel with the same signatures may sit beside them.
"""

from __future__ import annotations

import torch


def classify(logits: torch.Tensor, query_class: torch.Tensor, num_classes: int, logit_scale: float,
             prob_thd: float, area_thd: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [Q, H, W], query_class [Q] -> (labels [H, W] long, class probabilities [C, H, W]).

    area_thd (SC-CLIP): a foreground class survives only if its argmax area is strictly above
    area_thd x the foreground argmax area; the others' probabilities are multiplied by 0.
    """
    p = (logits * logit_scale).softmax(dim=0)
    index = query_class.view(-1, 1, 1).expand_as(p)
    probs = p.new_zeros((num_classes, *p.shape[1:])).scatter_reduce_(0, index, p, "amax", include_self=False)
    labels = probs.argmax(dim=0)
    if area_thd is not None:
        areas = torch.bincount(labels.flatten(), minlength=num_classes)
        foreground = areas[1:].sum()
        weak = areas <= area_thd * foreground
        weak[0] = False  # background is never suppressed
        probs = probs * (~weak).to(probs.dtype).view(-1, 1, 1)
        labels = probs.argmax(dim=0)
    labels = labels.masked_fill(probs.amax(dim=0) < prob_thd, 0)
    return labels, probs


def vote(labels: torch.Tensor, regions: torch.Tensor, num_regions: int, num_classes: int) -> torch.Tensor:
    """labels [H, W] long, regions [H, W] compact ids (0 = unsegmented, kept per pixel) -> [H, W]."""
    hist = torch.bincount((regions * num_classes + labels).flatten(), minlength=num_regions * num_classes)
    winner = hist.view(num_regions, num_classes).argmax(dim=1)
    return torch.where(regions > 0, winner[regions], labels)
