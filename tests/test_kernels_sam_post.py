"""SAM AMG post-processing: the torch reference against segment_anything's generator, the Triton path
(interpreted on the CPU, compiled on CUDA) against the reference on the same device and float64."""


import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import batched_mask_to_box
from segment_anything.utils.transforms import ResizeLongestSide

from corrclip.kernels.sam_post import GPU_BLOCKS, sam_postprocess, sam_postprocess_triton, upscale_logits
from corrclip.models.sam import build_sam

NEAR = 1e-5  # upsampled logits closer than this to a threshold may land on either side in float32


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
    "few_prompts": ((40, 70), 3, 0.3, 0.5, 1.0, 0.0, 0.7),  # for the interpreter at GPU tiles (~80 ms a tile)
}


def upsampled64(low: torch.Tensor, ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float64 upsampled logits [K, H0, W0] of the candidates `ids`, on the CPU."""
    if ids.numel() == 0:
        return torch.zeros(0, *size, dtype=torch.float64)
    return upscale_logits(low.flatten(0, 1)[ids.cpu()].double(), input_size(*size), size)


def stability_slack(up: torch.Tensor, thr: float, offset: float) -> torch.Tensor:
    """How far each candidate's stability score (intersections / unions) can move when its near-threshold pixels
    (within NEAR of thr + offset or thr - offset) land on the other side: |d(I/U)| <= (dI + dU) / (U - dU)."""
    def count(x):
        return x.flatten(1).sum(1).double()

    n_hi, n_lo = count((up - thr - offset).abs() < NEAR), count((up - thr + offset).abs() < NEAR)
    return (n_hi + n_lo) / (count(up > thr - offset) - n_lo).clamp(min=1)


def check_data(low, iou, size, pred_iou_thresh, stability_thresh, offset, thr):
    """The test data itself: no candidate's stability may sit within reach of the stability threshold (slack 0: the
    same counts, the same float32 ratio, the same decision), else the kept set could legitimately differ."""
    cand = torch.arange(iou.numel())
    if pred_iou_thresh > 0:
        cand = cand[iou.flatten() > pred_iou_thresh]
    up = upsampled64(low, cand, size)
    stab = ((up > thr + offset).flatten(1).sum(1) / (up > thr - offset).flatten(1).sum(1)).double()
    slack = stability_slack(up, thr, offset)
    ok = (slack == 0) | ((stab - stability_thresh).abs() > slack + 1e-6)
    assert ok[~stab.isnan()].all() or stability_thresh <= 0


def assert_same_masks(out, ref, low, size, thr, offset):
    """out (Triton) against ref (the reference on the same device, or float64). Compiled bilinear taps (FMA
    contraction, approximate reciprocals) and float32 sums in another order can put an upsampled logit that sits
    within NEAR of a threshold on the other side. So the kept set and its order must be equal, and areas, stability
    scores, boxes and the label map may differ only as far as those near-threshold pixels allow (usually not)."""
    assert torch.equal(out.keep.cpu(), ref.keep.cpu()) and torch.equal(out.iou_preds.cpu(), ref.iou_preds.cpu())
    assert out.boxes.dtype == torch.long and out.label_map.dtype == torch.int32 and out.areas.dtype == torch.long
    up = upsampled64(low, ref.keep, size)
    near = (up - thr).abs() < NEAR
    assert ((out.areas.cpu() - ref.areas.cpu()).abs() <= near.flatten(1).sum(1)).all()
    slack = stability_slack(up, thr, offset) + 1e-6  # + float32 rounding of the ratio
    assert ((out.stability.cpu().double() - ref.stability.cpu().double()).abs() <= slack).all()
    # A box lies between the box of the surely-on pixels and that of the maybe-on ones.
    outer, inner = batched_mask_to_box((up > thr) | near), batched_mask_to_box((up > thr) & ~near)
    has_inner = ((up > thr) & ~near).flatten(1).any(1)
    for boxes in (out.boxes.cpu(), ref.boxes.cpu()):
        assert (boxes[:, :2] >= outer[:, :2]).all() and (boxes[:, 2:] <= outer[:, 2:]).all()
        assert (boxes[has_inner, :2] <= inner[has_inner, :2]).all()
        assert (boxes[has_inner, 2:] >= inner[has_inner, 2:]).all()
    sure = ~near.any(0)
    assert sure.float().mean() > 0.999
    assert torch.equal(out.label_map.cpu()[sure], ref.label_map.cpu()[sure])


def run_case(name: str, seed: int, device, reference_dtype=torch.float32, **blocks):
    size, n, *thr = CASES[name]
    low, iou = blobs(n, size, torch.Generator().manual_seed(seed))
    check_data(low, iou, size, thr[0], thr[1], thr[2], thr[3])
    args = (input_size(*size), size, *thr)
    ref = sam_postprocess(low.to(device, reference_dtype), iou.to(device), *args)
    out = sam_postprocess_triton(low.to(device), iou.to(device), *args, **blocks)
    assert out.label_map.device == low.to(device).device
    assert_same_masks(out, ref, low, size, thr[3], thr[2])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, device, poisoned):
    out = run_case(name, len(name), device)
    if name == "nothing_survives":
        assert out.keep.numel() == 0 and out.boxes.shape == (0, 4) and (out.label_map == 0).all()
    else:
        assert out.keep.numel() >= 3 and out.label_map.max() == out.keep.numel()


@pytest.mark.parametrize("name", ["landscape", "portrait_ragged"])
def test_triton_matches_float64(name, device, poisoned):
    run_case(name, 7, device, reference_dtype=torch.float64)


@pytest.mark.parametrize("tiles", [GPU_BLOCKS["tiles"], 4])
def test_gpu_blocks(tiles, device, poisoned):
    """The GPU tiles (16 x 64) on both devices: 40 x 70 is 3 x 2 tiles, the last row and column ragged; with the
    GPU's 16 tiles a program, one partial group per candidate; with 4, two groups, the last partial."""
    out = run_case("few_prompts", 5, device, tile=GPU_BLOCKS["tile"], tiles=tiles)
    assert out.keep.numel() >= 2


def test_triton_return_masks(device):
    size = (40, 60)
    low, iou = blobs(4, size, torch.Generator().manual_seed(3))
    args = (input_size(*size), size, 0.2, 0.5, 1.0, 0.0, 0.7)
    ref = sam_postprocess(low.to(device), iou.to(device), *args, return_masks=True)
    out = sam_postprocess_triton(low.to(device), iou.to(device), *args, return_masks=True)
    assert torch.equal(out.masks, ref.masks) and torch.equal(ref.masks.flatten(1).sum(1), ref.areas)
