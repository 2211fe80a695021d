"""MaskGenerator keeps exactly the masks SamAutomaticMaskGenerator keeps, in the same order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from corrclip.models.sam import SamEncoder, build_sam
from corrclip.runtime.amg import DECODERS, AmgSettings, MaskGenerator, build_sam2_generator, paint_label_map


@pytest.fixture(scope="module")
def sam() -> Sam:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = build_sam("tiny", "random")
    # Random 2x2 transposed-conv kernels give every mask a 4-pixel checkerboard whose box is the whole
    # image, so NMS would leave one mask. Flat kernels make masks follow image regions instead.
    with torch.no_grad():
        for m in model.mask_decoder.output_upscaling:
            if isinstance(m, torch.nn.ConvTranspose2d):
                m.weight.copy_(m.weight.mean((2, 3), keepdim=True).expand_as(m.weight))
    return model


def shapes_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (40, 60, 80), np.uint8)
    for _ in range(8):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y0 : y0 + rng.integers(6, h // 2), x0 : x0 + rng.integers(6, w // 2)] = rng.integers(0, 256, 3)
    return img


def paint_loop(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The reference: paint masks by ascending area (stable), larger ones last."""
    out = np.zeros(shape, np.int32)
    for label, m in enumerate(sorted(masks, key=lambda m: int(m.sum())), start=1):
        out[m] = label
    return out


CASES = {
    # every stage removes masks; a portrait image (the 1024 frame is padded on the right)
    "filtered": ((80, 48, 3), dict(pred_iou_thresh=0.02, stability_score_thresh=0.05, box_nms_thresh=0.9)),
    # filters off (thresholds <= 0, as in the library): ~40 survivors, incl. empty and 1-pixel masks
    "unfiltered": ((64, 96, 0), dict(pred_iou_thresh=-1.0, stability_score_thresh=-1.0, box_nms_thresh=0.7)),
    # the small-region pass (library fallback) on top
    "small_regions": ((80, 48, 3), dict(pred_iou_thresh=0.02, stability_score_thresh=0.05, box_nms_thresh=0.9,
                                        min_mask_region_area=20)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_masks_as_segment_anything(sam: Sam, case: str) -> None:
    (h, w, seed), kw = CASES[case]
    image = shapes_image(h, w, seed)
    common = dict(points_per_side=6, points_per_batch=16, stability_score_offset=0.005, **kw)
    ref = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **common).generate(image)
    ref_masks = np.stack([r["segmentation"] for r in ref])
    encoded = {}

    def encode_once(x: torch.Tensor) -> torch.Tensor:  # the decoders see the same embedding: encode it once
        if "x" not in encoded:
            encoded["x"] = SamEncoder(sam)(x)
        return encoded["x"]

    for decoder in DECODERS:
        gen = MaskGenerator.from_sam(sam, AmgSettings(decoder=decoder, **common))
        gen.encoder = encode_once
        got = gen.generate(image)

        counts = gen.last_counts
        assert counts["masks"] == 3 * 36 and counts["final"] >= 5, counts
        assert counts["after_stability"] > counts["after_nms"], "NMS removed nothing: the test would be weak"
        if case != "unfiltered":
            assert counts["masks"] > counts["after_iou"] > counts["after_stability"], counts
        # lazy upscaling: the shared decoder upscales only prompts with a mask that passes the IoU filter
        assert counts["upscaled"] >= counts["after_iou"], counts
        if decoder == "reference" or case == "unfiltered":
            assert counts["upscaled"] == counts["masks"], counts

        assert len(got) == len(ref), decoder
        np.testing.assert_array_equal(got.masks.numpy(), ref_masks)
        # The shared decoder sums the same terms in another order: its IoUs (and logits) agree to float
        # rounding, not bit for bit. No logit here is close enough to a threshold for a pixel to flip, so
        # masks, stability scores, boxes and areas are compared exactly.
        tol = dict(rtol=0, atol=0) if decoder == "reference" else dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.iou_preds.numpy(), np.float32([r["predicted_iou"] for r in ref]), **tol)
        np.testing.assert_array_equal(got.stability.numpy(), np.float32([r["stability_score"] for r in ref]))
        xywh = got.boxes.numpy().copy()
        xywh[:, 2:] -= xywh[:, :2]
        np.testing.assert_array_equal(xywh, np.array([r["bbox"] for r in ref]))
        assert got.areas.tolist() == [r["area"] for r in ref]

        np.testing.assert_array_equal(got.label_map(), paint_loop(list(ref_masks), (h, w)))
        assert set(gen.last_timings) >= {"sam_encoder", "prompt_decoding", "mask_postprocess"}


def test_label_map_matches_painting_loop() -> None:
    h, w = 12, 16
    # nested, overlapping, disjoint, and two overlapping masks of equal area (3 and 4: the later one wins)
    boxes = [(0, 0, 6, 8), (2, 2, 10, 12), (4, 4, 6, 8), (0, 10, 4, 14), (2, 12, 6, 16), (7, 7, 9, 9)]
    masks = np.zeros((len(boxes), h, w), bool)
    for m, (y0, x0, y1, x1) in zip(masks, boxes, strict=True):
        m[y0:y1, x0:x1] = True
    got = paint_label_map(torch.from_numpy(masks)).numpy()
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, paint_loop(list(masks), (h, w)))
    assert (got == 0).any() and got.max() == len(boxes)
    assert (got[masks[1]] == len(boxes)).all()  # the largest mask covers all it touches
    assert got[3, 12] == 4 and got[0, 10] == 3  # the tie: stable order, later mask painted last
    assert paint_label_map(torch.zeros(0, h, w, dtype=torch.bool)).eq(0).all()


def test_sam2_missing_is_a_clear_error() -> None:
    try:
        import sam2  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="install the sam2 extra"):
            build_sam2_generator("configs/sam2.1/sam2.1_hiera_t.yaml", None)
    else:
        pytest.skip("sam2 is installed")


def test_sam2_label_map() -> None:
    pytest.importorskip("sam2")
    gen = build_sam2_generator("configs/sam2.1/sam2.1_hiera_t.yaml", None, "cpu",
                               AmgSettings(points_per_side=4, pred_iou_thresh=-1, stability_score_thresh=-1))
    image = shapes_image(64, 96, 0)
    ms = gen.generate(image)
    np.testing.assert_array_equal(ms.label_map(), paint_loop(list(ms.masks.numpy()), (64, 96)))


@pytest.mark.parametrize("decoder", DECODERS)
def test_everything_filtered(sam: Sam, decoder: str) -> None:
    settings = AmgSettings(points_per_side=2, points_per_batch=2, pred_iou_thresh=10.0, decoder=decoder)
    gen = MaskGenerator.from_sam(sam, settings)
    labels = gen.label_map(shapes_image(40, 30, 0))
    assert gen.last_counts["after_iou"] == 0 and labels.shape == (40, 30) and not labels.any()
    assert gen.last_counts["upscaled"] == (0 if decoder == "shared" else 12)


def test_box_nms_off(sam: Sam) -> None:
    """box_nms_thresh <= 0 switches NMS off like the other filters (the library would drop every overlap)."""
    off = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    gen = MaskGenerator.from_sam(sam, AmgSettings(box_nms_thresh=0.0, **off))
    gen.label_map(shapes_image(40, 30, 0))
    assert gen.last_counts["after_nms"] == gen.last_counts["masks"] == 12
