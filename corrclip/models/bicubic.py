"""Positional-embedding grids resized the way F.interpolate(mode="bicubic", align_corners=False) does,
written as two small matrix products whose sizes enter only through tensors.

F.interpolate takes its scale factor as a Python float, which torch.export freezes to the example's
size; here the grid size stays symbolic, so a graph exported once serves every window size. DINO
always runs this form; CLIP runs F.interpolate in eager torch (its reference numbers) and this form
only while exporting (they agree to ~1e-6: the sums run in another order).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cubic_matrix(out_size: int, in_size: int, step: Tensor) -> Tensor:
    """[out_size, in_size] weights of F.interpolate's bicubic resampling (align_corners=False).

    `step` (0-d) is the input distance per output cell.
    """
    cells = torch.arange(out_size, dtype=step.dtype, device=step.device)
    src = step * (cells + 0.5) - 0.5
    first = src.floor()
    t = src - first
    a = -0.75  # PyTorch's cubic convolution constant

    def near(x: Tensor) -> Tensor:  # kernel for |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # kernel for 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far((1 - t) + 1)], dim=-1)  # [out, 4]
    # Taps past the border repeat the edge value, as F.interpolate clamps its indices.
    taps = (first.long().unsqueeze(-1) + torch.arange(-1, 3, device=step.device)).clamp(0, in_size - 1)
    hits = taps.unsqueeze(-1) == torch.arange(in_size, device=step.device)  # [out, 4, in]
    return (hits.to(weights.dtype) * weights.unsqueeze(-1)).sum(dim=1)


def plus_tenth_step(cells: int, side: float, keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The input step of the research code's scale factor (cells + 0.1) / side, as F.interpolate maps it
    (1 / scale in double, then `dtype`); exactly 1 (the table untouched) where `keep`."""
    scale = (torch.full((), cells, dtype=torch.float64, device=keep.device) + 0.1) / side
    return torch.where(keep, 1.0, torch.reciprocal(scale)).to(dtype)


def resize_grid(table: Tensor, rows: int, cols: int, row_step: Tensor, col_step: Tensor) -> Tensor:
    """[side, side, D] -> [rows, cols, D], rows resampled first, then columns."""
    side, dim = table.shape[0], table.shape[-1]
    by_rows = (cubic_matrix(rows, side, row_step) @ table.reshape(side, side * dim)).reshape(rows, side, dim)
    return cubic_matrix(cols, side, col_step) @ by_rows
