"""Resize, normalization, windows, padding and the nearest-resampling chain (spec steps 1-4, §12)."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corrclip.runtime.preprocess import (
    PIXEL_MEAN,
    PIXEL_STD,
    cut_window,
    normalize,
    resize_image,
    resize_nearest,
    resized_size,
    sliding_windows,
)
from corrclip.runtime.regions import compact_label_map, window_regions


def test_resized_size_rule():
    assert resized_size(375, 500, 336) == (336, 448)  # VOC example of the spec
    assert resized_size(1024, 2048, 448) == (448, 896)  # Cityscapes
    assert resized_size(100, 2000, 336) == (102, 2048)  # long cap binds: int(100 * 1.024 + 0.5)
    assert resized_size(333, 500, 336) == (336, int(500 * 336 / 333 + 0.5))


def test_resize_is_uint8_opencv_linear():
    img = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    out = resize_image(img, 336)
    assert out.dtype == np.uint8 and out.shape == (336, 448, 3)
    assert np.array_equal(out, cv2.resize(img, (448, 336), interpolation=cv2.INTER_LINEAR))


# mmseg's CLIP configs, which the research code runs: OpenAI's CLIP constants x 255, rounded to 3 decimals.
MMSEG_MEAN, MMSEG_STD = (122.771, 116.746, 104.094), (68.501, 66.632, 70.323)


def test_normalize_constants():
    img = np.full((2, 2, 3), 200, np.uint8)
    x = normalize(img)
    for c in range(3):
        assert x[c, 0, 0].item() == pytest.approx((200 - MMSEG_MEAN[c]) / MMSEG_STD[c], rel=1e-6)


def test_constants_of_each_model_family():
    import open_clip

    from corrclip.models import dino
    from corrclip.models.sam import build_sam
    from corrclip.presets import BACKBONES, OPENAI_ARCH

    assert PIXEL_MEAN == MMSEG_MEAN and PIXEL_STD == MMSEG_STD
    # CLIP: every pretrained CLIP a backbone loads was trained with OpenAI's constants (open_clip's own configs).
    pretrained = [(b.clip_arch, b.clip_weights) for b in BACKBONES.values() if b.clip_arch != "tiny"]
    for arch, tag in pretrained + [(arch, "openai") for arch in OPENAI_ARCH.values()]:
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        assert tuple(round(255 * v, 3) for v in cfg["mean"]) == MMSEG_MEAN, (arch, tag)
        assert tuple(round(255 * v, 3) for v in cfg["std"]) == MMSEG_STD, (arch, tag)
    # DINO: the windows' CLIP normalization is undone and ImageNet's applied.
    assert dino.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert dino.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert dino.IMAGENET_MEAN == (0.485, 0.456, 0.406) and dino.IMAGENET_STD == (0.229, 0.224, 0.225)
    # SAM: segment_anything's pixel constants (0..255 scale).
    sam = build_sam("tiny", "random")
    assert sam.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53], abs=1e-5)
    assert sam.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375], abs=1e-5)


@pytest.mark.parametrize("src,dst", [((336, 336), (42, 42)), ((42, 42), (21, 21)), ((21, 21), (42, 42)),
                                     ((375, 500), (336, 448)), ((17, 35), (35, 17)), ((100, 7), (3, 29))])
def test_resize_nearest_matches_torch(src, dst):
    ids = torch.randint(0, 1000, src)
    ref = F.interpolate(ids[None, None].float(), size=dst, mode="nearest")[0, 0].long()
    assert torch.equal(resize_nearest(ids, dst), ref)
    assert torch.equal(resize_nearest(ids[None].repeat(2, 1, 1), dst)[1], ref)


def literal_windows(h, w, crop, stride):
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


@pytest.mark.parametrize("hw", [(336, 448), (336, 336), (448, 896), (102, 2048), (336, 2000), (500, 337)])
def test_windows_match_mmseg_formula(hw):
    wins = sliding_windows(*hw, 336, 112)
    assert [(w.y1, w.y2, w.x1, w.x2) for w in wins] == literal_windows(*hw, 336, 112)
    for w in wins:
        ph, pw = w.padded_size
        assert ph % 56 == 0 and pw % 56 == 0
        left, right, top, bottom = w.pad
        assert left == (pw - (w.x2 - w.x1)) // 2 and top == (ph - (w.y2 - w.y1)) // 2


def test_cut_window_pads_symmetrically_with_value():
    wins = sliding_windows(102, 400, 336, 112)
    assert wins[0].pad == (0, 0, 5, 5)  # 102 -> 112: 5 on top, 5 at the bottom
    m = torch.zeros(102, 400, dtype=torch.long)
    crop = cut_window(m, wins[0], 7)
    assert crop.shape == (112, 336) and crop[:5].eq(7).all() and crop[5:107].eq(0).all() and crop[107:].eq(7).all()


def test_compact_label_map_keeps_order_and_min():
    lab = np.array([[40, 7], [7, 1000]])
    c, k = compact_label_map(lab)
    assert c.tolist() == [[1, 0], [0, 2]] and k == 3


def test_window_regions_chain():
    """Regions through 336 -> 42 (merge) -> 21 -> 42; the unsegmented id is -1 on the DINO grid."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 336, 336, dtype=torch.long)
    masks[0, :168] = 1
    masks[0, 168:, :100] = 2
    masks[1] = 3  # window 1: a single value -> everything unsegmented (loose rule)
    masks[1, 0:8, 0:8] = 4  # one DINO cell, lost at the CLIP grid? kept: top-left pixel rule
    feats = F.normalize(torch.randn(2, 42 * 42, 4, generator=g), dim=-1)
    reg = window_regions(masks, feats, (42, 42), (21, 21))
    assert reg.region_ids.shape == (2, 42, 42)
    assert (reg.region_ids[0, 21:, 13:] == -1).all()  # id 0 is window 0's smallest
    assert (reg.region_ids[1, 1:, :] == -1).all() and reg.region_ids[1, 0, 0] == 0
    # CLIP grid: window 0 has regions {-1, a, b} (or merged), window 1 {-1, 4 at cell 0}.
    assert reg.membership.shape[0] == 2 and reg.membership.sum(1).eq(1).all()
    assert reg.mct_index[1, 0, 0] == 1 and reg.mct_index[1, 0, 1] == 1 and reg.mct_index[1, 0, 2] == 0
