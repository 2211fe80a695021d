"""Stitching window logits into one image (spec steps 15-16).

Each window's logits are bilinearly upsampled to the (padded) window size, the padding removed,
summed into a canvas at the input size and divided by the per-pixel window count; the canvas is
then bilinearly resized to the original image size. All resizes: align_corners=False, no antialias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def stitch(window_logits: torch.Tensor, windows: Sequence, input_size: tuple[int, int],
           output_size: tuple[int, int]) -> torch.Tensor:
    """window_logits [B, Q, H, W] (DINO grid) for one image's windows -> [Q, H0, W0].

    `windows` are runtime.preprocess.Window-like: y1, y2, x1, x2, pad (l, r, t, b), padded_size.
    """
    q = window_logits.shape[1]
    canvas = window_logits.new_zeros(q, *input_size)
    count = window_logits.new_zeros(1, *input_size)
    for logits, win in zip(window_logits, windows, strict=True):
        up = F.interpolate(logits[None], size=win.padded_size, mode="bilinear", align_corners=False)[0]
        left, _, top, _ = win.pad
        up = up[:, top: top + win.y2 - win.y1, left: left + win.x2 - win.x1]
        canvas[:, win.y1:win.y2, win.x1:win.x2] += up
        count[:, win.y1:win.y2, win.x1:win.x2] += 1
    canvas = canvas / count
    return F.interpolate(canvas[None], size=output_size, mode="bilinear", align_corners=False)[0]
