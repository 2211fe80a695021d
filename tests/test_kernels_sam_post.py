"""SAM AMG post-processing: the torch reference against segment_anything's generator, the Triton path
(interpreted on the CPU) against the reference and float64."""


import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.transforms import ResizeLongestSide
from triton_support import interpreted

from corrclip.kernels import choose, set_backend
from corrclip.kernels.sam_post import sam_postprocess, sam_postprocess_triton, upscale_logits
from corrclip.models.sam import build_sam

NEAR = 1e-5  # upsampled logits closer than this to the mask threshold may land on either side in float32


def input_size(h0: int, w0: int) -> tuple[int, int]:
    return ResizeLongestSide.get_preprocess_shape(h0, w0, 1024)


def blobs(n: int, size: tuple[int, int], g: torch.Generator, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-like outputs: n prompts x 3 discs (logit = (radius - distance) / 4 + noise) inside the image part
    of the 256 x 256 frame, and random predicted IoUs."""
    ih, iw = input_size(*size)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    c = torch.rand(n, 3, 2, generator=g) * torch.tensor([ih / 4, iw / 4])
    r = 3 + torch.rand(n, 3, generator=g) * 40
    d = ((yy - c[..., 0, None, None]) ** 2 + (xx - c[..., 1, None, None]) ** 2).sqrt()
    low = (r[..., None, None] - d) / 4 + noise * torch.randn(n, 3, 256, 256, generator=g)
    return low, torch.rand(n, 3, generator=g)


# ---- the reference against segment_anything's SamAutomaticMaskGenerator ----------------------------------------------

@pytest.fixture(scope="module")
def sam():
    return build_sam("tiny", "random")


def run_library(sam, image: np.ndarray, monkeypatch, **kw):
    """The library's generator (one crop, binary masks) and the decoder outputs it saw, in its flatten order."""
    gen = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **kw)
    seen = []
    predict = gen.predictor.predict_torch

    def recording(*args, **kwargs):
        masks, iou, low = predict(*args, **kwargs)
        seen.append((low, iou))
        return masks, iou, low

    monkeypatch.setattr(gen.predictor, "predict_torch", recording)
    anns = gen.generate(image)
    low, iou = (torch.cat(parts) for parts in zip(*seen))
    return gen, anns, low, iou


def paint_sequentially(masks: list[np.ndarray]) -> np.ndarray:
    """CorrCLIP's label map the slow way: paint masks in ascending area (stable), larger ones on top."""
    out = np.zeros(masks[0].shape, np.int32) if masks else None
    for rank, i in enumerate(sorted(range(len(masks)), key=lambda i: masks[i].sum())):
        out[masks[i]] = rank + 1
    return out


def check_against_library(gen, anns, ref, size):
    assert len(anns) == len(ref.keep) > 0
    points = gen.point_grids[0] * np.array([[size[1], size[0]]])
    for i, a in enumerate(anns):
        assert a["predicted_iou"] == ref.iou_preds[i].item()
        assert a["stability_score"] == ref.stability[i].item()
        assert a["area"] == ref.areas[i].item()
        x0, y0, x1, y1 = ref.boxes[i].tolist()
        assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert np.array_equal(a["segmentation"], ref.masks[i].numpy())
        assert np.allclose(a["point_coords"][0], points[ref.keep[i].item() // 3])  # point-major, 3 masks each
    assert np.array_equal(paint_sequentially([a["segmentation"] for a in anns]), ref.label_map.numpy())


def test_reference_matches_library_tiny_sam(sam, monkeypatch):
    """The real (random-weight) tiny SAM; thresholds loosened to its near-zero logits and IoUs."""
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    kw = dict(points_per_side=4, pred_iou_thresh=0.05, stability_score_thresh=0.3, stability_score_offset=0.02,
              box_nms_thresh=0.7)
    gen, anns, low, iou = run_library(sam, image, monkeypatch, **kw)
    args = (input_size(60, 90), (60, 90), 0.05, 0.3, 0.02, sam.mask_threshold, 0.7)
    ref = sam_postprocess(low, iou, *args, return_masks=True)
    check_against_library(gen, anns, ref, (60, 90))


def test_reference_matches_library_many_masks(sam, monkeypatch):
    """Injected decoder outputs (discs) through the library's own generator: many kept masks, a mask threshold
    of 0.5 (SAM's mask_threshold), NMS at work."""
    g = torch.Generator().manual_seed(0)
    size = (70, 100)
    monkeypatch.setattr(sam, "mask_threshold", 0.5)
    monkeypatch.setattr(sam.image_encoder, "forward", lambda x: torch.zeros(1, 32, 64, 64))

    def decoder(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output):
        return blobs(sparse_prompt_embeddings.shape[0], size, g)

    monkeypatch.setattr(sam.mask_decoder, "forward", decoder)
    image = np.zeros((*size, 3), np.uint8)
    kw = dict(points_per_side=6, points_per_batch=16, pred_iou_thresh=0.3, stability_score_thresh=0.6,
              stability_score_offset=1.0, box_nms_thresh=0.5)
    gen, anns, low, iou = run_library(sam, image, monkeypatch, **kw)
    ref = sam_postprocess(low, iou, input_size(*size), size, 0.3, 0.6, 1.0, 0.5, 0.5, return_masks=True)
    assert len(anns) >= 10
    check_against_library(gen, anns, ref, size)


# ---- Triton against the reference and float64, fresh random inputs --------------------------------------------------

# name: (original size, prompts, pred_iou_thresh, stability_score_thresh, offset, mask_threshold, box_nms_thresh)
CASES = {
    "landscape": ((75, 100), 8, 0.3, 0.5, 1.0, 0.0, 0.7),
    "portrait_ragged": ((121, 37), 10, 0.3, 0.6, 1.0, 0.0, 0.8),
    "square_upsampled_threshold": ((33, 33), 8, 0.2, 0.5, 0.5, 0.5, 0.7),
    "filters_off": ((50, 64), 5, 0.0, 0.0, 1.0, 0.0, 0.9),
    "nothing_survives": ((40, 50), 4, 2.0, 0.5, 1.0, 0.0, 0.7),
}


def near_threshold(low, keep, size, mask_threshold, dtype=torch.float32):
    """Pixels where some kept mask's upsampled logit sits within NEAR of the threshold (either side may win)."""
    if keep.numel() == 0:
        return torch.zeros(size, dtype=torch.bool)
    logits = upscale_logits(low.flatten(0, 1)[keep].to(dtype), input_size(*size), size)
    return ((logits - mask_threshold).abs() < NEAR).any(0)


@interpreted
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, poisoned):
    size, n, *thr = CASES[name]
    low, iou = blobs(n, size, torch.Generator().manual_seed(len(name)))
    args = (input_size(*size), size, *thr)
    ref = sam_postprocess(low, iou, *args)
    out = sam_postprocess_triton(low, iou, *args)
    assert torch.equal(out.keep, ref.keep) and torch.equal(out.iou_preds, ref.iou_preds)
    assert torch.equal(out.boxes, ref.boxes) and out.boxes.dtype == torch.long
    assert torch.equal(out.areas, ref.areas)
    torch.testing.assert_close(out.stability, ref.stability, rtol=0, atol=0, equal_nan=True)
    sure = ~near_threshold(low, ref.keep, size, thr[3])
    assert sure.float().mean() > 0.999
    assert torch.equal(out.label_map[sure], ref.label_map[sure]) and out.label_map.dtype == torch.int32
    if name == "nothing_survives":
        assert out.keep.numel() == 0 and out.boxes.shape == (0, 4) and (out.label_map == 0).all()
    else:
        assert out.keep.numel() >= 3 and out.label_map.max() == out.keep.numel()


@interpreted
@pytest.mark.parametrize("name", ["landscape", "portrait_ragged"])
def test_triton_matches_float64(name, poisoned):
    size, n, *thr = CASES[name]
    low, iou = blobs(n, size, torch.Generator().manual_seed(7))
    args = (input_size(*size), size, *thr)
    ref = sam_postprocess(low.double(), iou, *args)
    out = sam_postprocess_triton(low, iou, *args)
    assert torch.equal(out.keep, ref.keep) and torch.equal(out.boxes, ref.boxes)
    near = near_threshold(low, ref.keep, size, thr[3], torch.float64)
    assert near.float().mean() < 1e-3
    assert torch.equal(out.label_map[~near], ref.label_map[~near])
    assert (out.areas - ref.areas).abs().max() <= near.sum()
    torch.testing.assert_close(out.stability, ref.stability.float(), rtol=0, atol=1e-3)


@interpreted
def test_triton_return_masks_and_dispatch():
    size = (40, 60)
    low, iou = blobs(4, size, torch.Generator().manual_seed(3))
    args = (input_size(*size), size, 0.2, 0.5, 1.0, 0.0, 0.7)
    ref = sam_postprocess(low, iou, *args, return_masks=True)
    out = sam_postprocess_triton(low, iou, *args, return_masks=True)
    assert torch.equal(out.masks, ref.masks) and torch.equal(ref.masks.flatten(1).sum(1), ref.areas)
    set_backend("triton")
    try:
        assert choose("sam_postprocess", "cpu") is sam_postprocess_triton
    finally:
        set_backend("auto")
    assert choose("sam_postprocess", "cpu") is sam_postprocess
