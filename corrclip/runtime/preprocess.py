"""From a decoded image to normalized sliding windows, the way the research pipeline does it.

Spec steps 1 and 4 with the checked details of corrclip.md §12:
  * the resize works on the uint8 image with OpenCV's INTER_LINEAR (fixed-point, rounded back to
    uint8) to int(x * s + 0.5) per side, s = min(long_cap / long, short / short_side);
  * normalization uses the mmseg config constants (CLIP mean/std x 255, rounded to 3 decimals);
  * windows follow mmseg's slide formula in row-major order; a window side that is not a multiple
    of 56 is zero-padded (left/top = floor(pad / 2)), its region map with the pad id.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

PIXEL_MEAN = (122.771, 116.746, 104.094)
PIXEL_STD = (68.501, 66.632, 70.323)
PAD_MULTIPLE = 56  # lcm(8, 14): DINO's patch and CLIP L/14's patch


def resized_size(h: int, w: int, short: int, long_cap: int = 2048) -> tuple[int, int]:
    scale = min(long_cap / max(h, w), short / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: np.ndarray, short: int, long_cap: int = 2048) -> np.ndarray:
    """uint8 HxWx3 -> uint8 resized so the short side is `short` (long side capped)."""
    h, w = resized_size(image.shape[0], image.shape[1], short, long_cap)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def normalize(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 [3, H, W] with the CLIP mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(3, 1, 1)
    return (x - mean) / std


def resize_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Integer map [..., h, w] -> [..., H, W] with PyTorch's 'nearest' rule (spec §12.3).

    Source index = min(floor(dst * float32(in / out)), in - 1): for 336 -> 42 that is the top-left
    pixel of each cell. Computed on float32 coordinates exactly like F.interpolate, on the ids
    themselves (no float round trip of large ids).
    """
    in_h, in_w = labels.shape[-2:]
    if (in_h, in_w) == tuple(size):
        return labels
    dev = labels.device
    ys = _nearest_index(in_h, size[0], dev)
    xs = _nearest_index(in_w, size[1], dev)
    return labels[..., ys[:, None], xs[None, :]]


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    idx = torch.floor(torch.arange(n_out, dtype=torch.float32) * scale).long()
    return idx.clamp_(max=n_in - 1).to(device)


@dataclass(frozen=True)
class Window:
    """One sliding window: its box in the resized image and the padding added around it."""

    y1: int
    y2: int
    x1: int
    x2: int
    pad: tuple[int, int, int, int]  # left, right, top, bottom

    @property
    def padded_size(self) -> tuple[int, int]:
        left, right, top, bottom = self.pad
        return self.y2 - self.y1 + top + bottom, self.x2 - self.x1 + left + right


def sliding_windows(h: int, w: int, crop: int, stride: int) -> list[Window]:
    """mmseg's slide grid: ceil(max(size - crop, 0) / stride) + 1 windows per axis, last one flush."""
    rows = -(-max(h - crop, 0) // stride) + 1
    cols = -(-max(w - crop, 0) // stride) + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            windows.append(Window(y1, y2, x1, x2, _pad_for(y2 - y1, x2 - x1)))
    return windows


def _pad_for(h: int, w: int) -> tuple[int, int, int, int]:
    ph = -h % PAD_MULTIPLE
    pw = -w % PAD_MULTIPLE
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def cut_window(image: torch.Tensor, win: Window, value: float | int = 0) -> torch.Tensor:
    """[..., H, W] -> the window's crop, padded with `value` (0 for pixels, the pad id for masks)."""
    crop = image[..., win.y1:win.y2, win.x1:win.x2]
    if any(win.pad):
        crop = F.pad(crop, win.pad, value=value)
    return crop
