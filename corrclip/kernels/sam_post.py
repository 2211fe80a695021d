"""SAM automatic-mask-generation post-processing on the device (one crop, binary masks).

For the decoder outputs of all point prompts of one image: predicted-IoU filter, upsampling of the
survivors exactly as Sam.postprocess_masks (256 -> 1024 bilinear, crop to the resized input, bilinear
to the original size), stability score, stability filter, boxes, box NMS, areas, and the label map
CorrCLIP builds from the kept masks (ranked by ascending area, larger masks painted over smaller
ones, labels 1..K, 0 = no mask). Kept set and order are those of segment_anything's
SamAutomaticMaskGenerator with crop_n_layers=0.

The Triton path never stores an upsampled mask: a stats kernel evaluates the two bilinear resizes
on the fly per output tile (16 low-res taps per pixel) and accumulates the stability counts, area
and box of every candidate with atomics; after the NMS (torchvision) a paint kernel re-evaluates
only the kept masks, skipping tiles outside each mask's box.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score
from torchvision.ops import batched_nms

from . import triton_common


@dataclass
class SamMasks:
    """The kept masks of one image, in the generator's order (NMS order: decreasing predicted IoU)."""

    keep: torch.Tensor  # [K] long: indices into the flattened [P * 3] decoder outputs
    iou_preds: torch.Tensor  # [K] float
    stability: torch.Tensor  # [K] float
    boxes: torch.Tensor  # [K, 4] long, XYXY inclusive pixel coordinates
    areas: torch.Tensor  # [K] long, pixels
    label_map: torch.Tensor  # int32 [H0, W0]: ascending-area ranks 1..K, larger masks win, 0 = no mask
    masks: torch.Tensor | None = None  # bool [K, H0, W0], only when asked for
    num_stable: int = 0  # candidates that passed the IoU and stability filters (before NMS)


def upscale_logits(low_res: torch.Tensor, input_size: tuple[int, int], orig_size: tuple[int, int],
                   img_size: int = 1024) -> torch.Tensor:
    """[K,256,256] -> [K,H0,W0], the arithmetic of Sam.postprocess_masks (to img_size, crop, resize)."""
    x = F.interpolate(low_res[None], (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, orig_size, mode="bilinear", align_corners=False)[0]


def _iou_filter(iou_preds: torch.Tensor, thresh: float) -> torch.Tensor:
    """Indices of the candidates passing the predicted-IoU filter (a threshold <= 0 switches it off)."""
    ids = torch.arange(iou_preds.numel(), device=iou_preds.device)
    return ids[iou_preds > thresh] if thresh > 0.0 else ids


def paint_ranked(masks: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """int32 [H, W]: masks ranked by ascending area (stable) get 1..K; a pixel takes its highest covering rank."""
    k, h, w = masks.shape
    rank = torch.empty(k, dtype=torch.int32, device=masks.device)
    rank[torch.sort(areas, stable=True).indices] = torch.arange(1, k + 1, dtype=torch.int32, device=masks.device)
    label = torch.zeros(h, w, dtype=torch.int32, device=masks.device)
    for start in range(0, k, 64):  # bounded memory: 64 masks of int32 at a time
        part = masks[start:start + 64] * rank[start:start + 64, None, None]
        label = torch.maximum(label, part.amax(0))
    return label


def sam_postprocess(low_res_logits: torch.Tensor, iou_preds: torch.Tensor, input_size: tuple[int, int],
                    orig_size: tuple[int, int], pred_iou_thresh: float, stability_score_thresh: float,
                    stability_score_offset: float, mask_threshold: float, box_nms_thresh: float,
                    img_size: int = 1024, return_masks: bool = False, chunk: int = 64) -> SamMasks:
    """low_res_logits [P,3,256,256], iou_preds [P,3] (any leading shape; point-major as the library flattens)
    -> SamMasks. The plain torch reference: the library's own helpers on `chunk` upsampled masks at a time.
    """
    low = low_res_logits.flatten(0, -3)
    dtype = torch.float64 if low.dtype == torch.float64 else torch.float32  # float64: accuracy checks
    iou = iou_preds.flatten().float()
    cand = _iou_filter(iou, pred_iou_thresh)
    ids, stabs, masks, boxes = [], [], [], []
    for start in range(0, cand.numel(), chunk):
        sel = cand[start:start + chunk]
        logits = upscale_logits(low[sel].to(dtype), input_size, orig_size, img_size)
        stab = calculate_stability_score(logits, mask_threshold, stability_score_offset)
        if stability_score_thresh > 0.0:
            ok = stab >= stability_score_thresh
            sel, logits, stab = sel[ok], logits[ok], stab[ok]
        m = logits > mask_threshold
        ids.append(sel)
        stabs.append(stab)
        masks.append(m)
        boxes.append(batched_mask_to_box(m).long())
    dev, (h0, w0) = low.device, orig_size
    if not ids:
        ids, stabs = [cand], [iou.new_empty(0)]
        masks, boxes = [torch.zeros(0, h0, w0, dtype=torch.bool, device=dev)], [cand.new_empty(0, 4)]
    ids, stab, masks, boxes = torch.cat(ids), torch.cat(stabs), torch.cat(masks), torch.cat(boxes)
    order = batched_nms(boxes.float(), iou[ids], torch.zeros_like(ids), iou_threshold=box_nms_thresh)
    masks = masks[order]
    areas = masks.flatten(1).sum(1)
    return SamMasks(ids[order], iou[ids[order]], stab[order], boxes[order], areas, paint_ranked(masks, areas),
                    masks if return_masks else None, num_stable=int(ids.numel()))


# ---- Triton path -----------------------------------------------------------------------------------------------------
# The functions below are plain Python until _triton() swaps each for its triton.jit version (triton_common).

tl = None  # triton.language, bound by _triton()
_JIT = ("_mix", "_upsampled", "_stats_kernel", "_paint_kernel")
_taps = triton_common.bilinear_taps  # shared with the other kernels; jitted like the rest


def _mix(plane, ra, rb, wra, wrb, ca, cb, wca, wcb, LOW: tl.constexpr):
    """One bilinear step from the LOW x LOW plane: rows ra/rb [T, 1], columns ca/cb [1, T]; F.interpolate's order."""
    v_aa = tl.load(plane + ra * LOW + ca)
    v_ab = tl.load(plane + ra * LOW + cb)
    v_ba = tl.load(plane + rb * LOW + ca)
    v_bb = tl.load(plane + rb * LOW + cb)
    return wra * (wca * v_aa + wcb * v_ab) + wrb * (wca * v_ba + wcb * v_bb)


def _upsampled(plane, oy, ox, ih, iw, sy, sx, low_scale, LOW: tl.constexpr):
    """Sam.postprocess_masks at output pixels oy [T, 1] x ox [1, T], never storing the img_size frame.

    Each output pixel blends 4 pixels of the cropped img_size frame, each of which blends 4 low-res pixels.
    """
    ya, yb, wya, wyb = _taps(oy, sy, ih)  # rows and columns of the cropped img_size frame
    xa, xb, wxa, wxb = _taps(ox, sx, iw)
    r_aa, r_ab, w_raa, w_rab = _taps(ya, low_scale, LOW)  # their low-res rows and columns
    r_ba, r_bb, w_rba, w_rbb = _taps(yb, low_scale, LOW)
    c_aa, c_ab, w_caa, w_cab = _taps(xa, low_scale, LOW)
    c_ba, c_bb, w_cba, w_cbb = _taps(xb, low_scale, LOW)
    v_aa = _mix(plane, r_aa, r_ab, w_raa, w_rab, c_aa, c_ab, w_caa, w_cab, LOW)
    v_ab = _mix(plane, r_aa, r_ab, w_raa, w_rab, c_ba, c_bb, w_cba, w_cbb, LOW)
    v_ba = _mix(plane, r_ba, r_bb, w_rba, w_rbb, c_aa, c_ab, w_caa, w_cab, LOW)
    v_bb = _mix(plane, r_ba, r_bb, w_rba, w_rbb, c_ba, c_bb, w_cba, w_cbb, LOW)
    return wya * (wxa * v_aa + wxb * v_ab) + wyb * (wxa * v_ba + wxb * v_bb)


def _stats_kernel(low_ptr, cand_ptr, counts_ptr, box_ptr, H0, W0, ih, iw, sy, sx, low_scale, thr, hi, lo,
                  LOW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, TILES: tl.constexpr):
    """One program: TILES consecutive TILE_H x TILE_W output tiles of one candidate. Its counts (>hi, >lo, >thr) and
    box are accumulated per lane in registers and reduced once: 7 atomics a program, not 7 a tile (relaxed: they
    are read only after the kernel, so they need atomicity, not ordering)."""
    group, k = tl.program_id(0), tl.program_id(1)
    n_tx = tl.cdiv(W0, TILE_W)
    n_tiles = tl.cdiv(H0, TILE_H) * n_tx
    plane = low_ptr + tl.load(cand_ptr + k).to(tl.int64) * (LOW * LOW)
    big = H0 + W0
    n_hi = tl.zeros([TILE_H, TILE_W], tl.int32)
    n_lo = tl.zeros([TILE_H, TILE_W], tl.int32)
    n_on = tl.zeros([TILE_H, TILE_W], tl.int32)
    x0 = tl.full([TILE_H, TILE_W], big, tl.int32)
    y0 = tl.full([TILE_H, TILE_W], big, tl.int32)
    x1 = tl.full([TILE_H, TILE_W], -1, tl.int32)
    y1 = tl.full([TILE_H, TILE_W], -1, tl.int32)
    for tile in range(group * TILES, tl.minimum(group * TILES + TILES, n_tiles)):
        oy = (tile // n_tx) * TILE_H + tl.arange(0, TILE_H)[:, None]
        ox = (tile % n_tx) * TILE_W + tl.arange(0, TILE_W)[None, :]
        inside = (oy < H0) & (ox < W0)
        # clamped coordinates keep every tap in the plane; `inside` drops the extra lanes
        v = _upsampled(plane, tl.minimum(oy, H0 - 1), tl.minimum(ox, W0 - 1), ih, iw, sy, sx, low_scale, LOW)
        on = inside & (v > thr)
        n_hi += (inside & (v > hi)).to(tl.int32)
        n_lo += (inside & (v > lo)).to(tl.int32)
        n_on += on.to(tl.int32)
        x0 = tl.minimum(x0, tl.where(on, ox, big))
        y0 = tl.minimum(y0, tl.where(on, oy, big))
        x1 = tl.maximum(x1, tl.where(on, ox, -1))
        y1 = tl.maximum(y1, tl.where(on, oy, -1))
    tl.atomic_add(counts_ptr + k * 3 + 0, tl.sum(tl.sum(n_hi, 1), 0), sem="relaxed")
    tl.atomic_add(counts_ptr + k * 3 + 1, tl.sum(tl.sum(n_lo, 1), 0), sem="relaxed")
    tl.atomic_add(counts_ptr + k * 3 + 2, tl.sum(tl.sum(n_on, 1), 0), sem="relaxed")
    tl.atomic_min(box_ptr + k * 4 + 0, tl.min(tl.min(x0, 1), 0), sem="relaxed")
    tl.atomic_min(box_ptr + k * 4 + 1, tl.min(tl.min(y0, 1), 0), sem="relaxed")
    tl.atomic_max(box_ptr + k * 4 + 2, tl.max(tl.max(x1, 1), 0), sem="relaxed")
    tl.atomic_max(box_ptr + k * 4 + 3, tl.max(tl.max(y1, 1), 0), sem="relaxed")


def _paint_kernel(low_ptr, order_ptr, box_ptr, label_ptr, n_keep, H0, W0, ih, iw, sy, sx, low_scale, thr,
                  LOW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """One program: one output tile; kept masks in ascending-area order, later (larger) ones overwrite."""
    tile = tl.program_id(0)
    n_tx = tl.cdiv(W0, TILE_W)
    ty, tx = (tile // n_tx) * TILE_H, (tile % n_tx) * TILE_W
    oy = ty + tl.arange(0, TILE_H)[:, None]
    ox = tx + tl.arange(0, TILE_W)[None, :]
    inside = (oy < H0) & (ox < W0)
    cy, cx = tl.minimum(oy, H0 - 1), tl.minimum(ox, W0 - 1)
    label = tl.zeros([TILE_H, TILE_W], tl.int32)
    for r in range(n_keep):
        # the box holds every pixel above thr, so a tile outside it cannot change
        x0, y0 = tl.load(box_ptr + r * 4 + 0), tl.load(box_ptr + r * 4 + 1)
        x1, y1 = tl.load(box_ptr + r * 4 + 2), tl.load(box_ptr + r * 4 + 3)
        if (x0 < tx + TILE_W) & (x1 >= tx) & (y0 < ty + TILE_H) & (y1 >= ty):
            plane = low_ptr + tl.load(order_ptr + r).to(tl.int64) * (LOW * LOW)
            v = _upsampled(plane, cy, cx, ih, iw, sy, sx, low_scale, LOW)
            label = tl.where(v > thr, r + 1, label)
    tl.store(label_ptr + oy * W0 + ox, label, mask=inside)


def _scale(n_in: int, n_out: int) -> float:
    """in / out rounded to float32 as ATen computes it (a Python float would be rounded from float64)."""
    return (torch.tensor(n_in, dtype=torch.float32) / n_out).item()


def _f32(x: float) -> float:
    """A threshold as the float32 the reference compares with (tensor > python scalar runs in float32)."""
    return torch.tensor(x, dtype=torch.float32).item()


# The launch configuration; aot.py checks registers, spills and shared memory of GPU_BLOCKS on sm_90/80.
GPU_BLOCKS = dict(tile=(16, 64), tiles=16)  # 16 tiles of 1024 pixels per stats program
CPU_BLOCKS = dict(tile=(128, 128), tiles=4)  # the interpreter pays per program, not per element


@functools.cache
def _triton():
    per_image = ("H0", "W0", "ih", "iw")
    return triton_common.jit_module(globals(), _JIT, {"_stats_kernel": per_image,
                                                      "_paint_kernel": ("n_keep", *per_image)})


@torch.library.custom_op("corrclip::sam_mask_stats", mutates_args=())
def sam_mask_stats(low: torch.Tensor, cand: torch.Tensor, sizes: list[int], scales: list[float],
                   thresholds: list[float], blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per candidate (low planes `cand`): counts [K, 3] int32 of upsampled logits > hi, > lo, > thr, and its box
    [K, 4] int32 (x0, y0, x1, y1; empty: (H0 + W0, H0 + W0, -1, -1)). sizes: H0, W0, ih, iw; scales: sy, sx and
    low / img_size; thresholds: thr, hi, lo (float32 values); blocks: tile height, width, tiles per program."""
    triton = _triton()
    (h0, w0, _, _), (th, tw, tiles) = sizes, blocks
    counts = torch.zeros(cand.numel(), 3, dtype=torch.int32, device=low.device)
    box = torch.empty(cand.numel(), 4, dtype=torch.int32, device=low.device)
    box[:, :2], box[:, 2:] = h0 + w0, -1  # fills on the device, no host table
    if cand.numel():
        n_tiles = triton.cdiv(h0, th) * triton.cdiv(w0, tw)
        triton_common.launch(_stats_kernel, (triton.cdiv(n_tiles, tiles), cand.numel()), low, cand, counts, box,
                             *sizes, *scales, *thresholds, LOW=low.shape[-1], TILE_H=th, TILE_W=tw, TILES=tiles)
    return counts, box


@sam_mask_stats.register_fake
def _(low, cand, sizes, scales, thresholds, blocks):
    return cand.new_empty(cand.shape[0], 3, dtype=torch.int32), cand.new_empty(cand.shape[0], 4, dtype=torch.int32)


@torch.library.custom_op("corrclip::sam_paint", mutates_args=())
def sam_paint(low: torch.Tensor, order: torch.Tensor, boxes: torch.Tensor, sizes: list[int], scales: list[float],
              thr: float, blocks: list[int]) -> torch.Tensor:
    """int32 [H0, W0]: the low planes `order` (ascending area) painted 1..K where their upsampled logit > thr,
    later ones on top; boxes [K, 4] int32 let a tile skip the masks that cannot reach it."""
    triton = _triton()
    (h0, w0, _, _), (th, tw, _) = sizes, blocks
    label = torch.empty(h0, w0, dtype=torch.int32, device=low.device)
    triton_common.launch(_paint_kernel, (triton.cdiv(h0, th) * triton.cdiv(w0, tw),), low, order, boxes, label,
                         order.numel(), *sizes, *scales, thr, LOW=low.shape[-1], TILE_H=th, TILE_W=tw)
    return label


@sam_paint.register_fake
def _(low, order, boxes, sizes, scales, thr, blocks):
    return low.new_empty(sizes[0], sizes[1], dtype=torch.int32)


def sam_postprocess_triton(low_res_logits: torch.Tensor, iou_preds: torch.Tensor, input_size: tuple[int, int],
                           orig_size: tuple[int, int], pred_iou_thresh: float, stability_score_thresh: float,
                           stability_score_offset: float, mask_threshold: float, box_nms_thresh: float,
                           img_size: int = 1024, return_masks: bool = False, chunk: int = 64,
                           tile: tuple[int, int] | None = None, tiles: int | None = None) -> SamMasks:
    """Same contract as `sam_postprocess`; no upsampled mask is stored (unless return_masks, done in torch).

    tile (output rows, columns; powers of two) and tiles per stats program: GPU_BLOCKS on CUDA, CPU_BLOCKS else.
    The filters and the NMS have data-dependent sizes, so they read back to the host as the reference does.
    """
    low = low_res_logits.flatten(0, -3).float().contiguous()
    iou = iou_preds.flatten().float()
    dev, n_low = low.device, low.shape[-1]
    config = GPU_BLOCKS if triton_common.gpu_config(dev) else CPU_BLOCKS
    (th, tw), tiles = tile or config["tile"], tiles or config["tiles"]
    (ih, iw), (h0, w0) = input_size, orig_size
    sizes, scales = [h0, w0, ih, iw], [_scale(ih, h0), _scale(iw, w0), _scale(n_low, img_size)]

    cand = _iou_filter(iou, pred_iou_thresh)
    thresholds = [_f32(mask_threshold), _f32(mask_threshold + stability_score_offset),
                  _f32(mask_threshold - stability_score_offset)]
    counts, box = sam_mask_stats(low, cand, sizes, scales, thresholds, [th, tw, tiles])
    stab = counts[:, 0] / counts[:, 1]  # int / int -> float32, as calculate_stability_score
    ok = stab >= stability_score_thresh if stability_score_thresh > 0.0 else torch.ones_like(stab, dtype=torch.bool)
    ids, stab, areas, box = cand[ok], stab[ok], counts[ok, 2].long(), box[ok].long()
    box = box * (box[:, 2:] >= box[:, :2]).all(1, keepdim=True)  # empty mask -> [0, 0, 0, 0] like the library

    num_stable = int(ids.numel())
    order = batched_nms(box.float(), iou[ids], torch.zeros_like(ids), iou_threshold=box_nms_thresh)
    ids, stab, areas, box = ids[order], stab[order], areas[order], box[order]
    ranked = torch.sort(areas, stable=True).indices
    label = sam_paint(low, ids[ranked].contiguous(), box[ranked].to(torch.int32).contiguous(), sizes, scales,
                      thresholds[0], [th, tw, tiles])
    masks = None
    if return_masks:  # for callers that need the bitmaps (small-region removal): torch, kept masks only
        masks = torch.zeros(ids.numel(), h0, w0, dtype=torch.bool, device=dev)
        for s in range(0, ids.numel(), chunk):
            masks[s:s + chunk] = upscale_logits(low[ids[s:s + chunk]], input_size, orig_size, img_size) > mask_threshold
    return SamMasks(ids, iou[ids], stab, box, areas, label, masks, num_stable=num_stable)
