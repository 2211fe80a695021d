"""From per-window low-res logits to the final label map in one pass (spec steps 15-18, fused).

The reference composes stitch -> classify -> vote. The Triton path never stores Q x H0 x W0
probabilities:
  1. canvas kernel: every input-size pixel sums the bilinear taps of the windows covering it and
     divides by their count (the stitch canvas, Q x H x W in fp32; H x W is the resized image,
     about 1/5 of the original at Cityscapes' 2048 x 1024 -> 896 x 448);
  2. classify kernel: every output pixel takes 4 canvas taps per query (the second bilinear
     resize), keeps an online softmax over the queries and the class of the best query, applies
     prob_thd, writes its label and adds it to a [region, class] histogram with atomics;
  3. majority kernel: argmax per region row (ties -> smallest class);
  4. gather kernel: segmented pixels take their region's winner, region 0 keeps its own label.

Why the class of the best query is the argmax class: a class's probability is the max over its
queries, exp(s_q - m) / Z, monotonic in the query logit s_q, so the best class owns the best query,
and the best probability is exp(0) / Z = 1 / Z. Only classes whose probabilities round to the same
float can come out differently from the reference (which then picks the lower class).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import dispatch, triton_common
from .stitch import stitch
from .vote import classify, vote


def stitch_classify_vote(window_logits: torch.Tensor, windows: Sequence, input_size: tuple[int, int],
                         output_size: tuple[int, int], query_class: torch.Tensor, num_classes: int,
                         logit_scale: float, prob_thd: float, regions: torch.Tensor, num_regions: int
                         ) -> torch.Tensor:
    """window_logits [B,Q,h,w] -> labels [H0,W0] long: stitch, classify, vote (the plain torch reference).

    windows: runtime.preprocess.Window-like (y1, y2, x1, x2, pad=(l, r, t, b), padded_size);
    query_class [Q] long; regions [H0,W0] long compact ids (0 = unsegmented), ids < num_regions.
    """
    full = stitch(window_logits, windows, input_size, output_size)
    labels, _ = classify(full, query_class, num_classes, logit_scale, prob_thd)
    return vote(labels, regions, num_regions, num_classes)


# ---- Triton path -----------------------------------------------------------------------------------------------------
# The functions below are plain Python until _triton() swaps each for its triton.jit version (triton_common).

tl = None  # triton.language, bound by _triton()
_JIT = ("_bilerp", "_canvas_kernel", "_classify_kernel", "_majority_kernel", "_gather_kernel")
_taps = triton_common.bilinear_taps  # shared with the other kernels; jitted like the rest


def _bilerp(base, row, ya, yb, xa, xb, wya, wyb, wxa, wxb, mask):
    """[BLOCK_Q, BLOCK_P] bilinear values: base [BLOCK_Q, 1] plane pointers, taps per pixel; torch's operation order."""
    v_aa = tl.load(base + (ya * row + xa)[None, :], mask=mask, other=0.0)
    v_ab = tl.load(base + (ya * row + xb)[None, :], mask=mask, other=0.0)
    v_ba = tl.load(base + (yb * row + xa)[None, :], mask=mask, other=0.0)
    v_bb = tl.load(base + (yb * row + xb)[None, :], mask=mask, other=0.0)
    return (wya[None, :] * (wxa[None, :] * v_aa + wxb[None, :] * v_ab)
            + wyb[None, :] * (wxa[None, :] * v_ba + wxb[None, :] * v_bb))


def _canvas_kernel(logits_ptr, geom_ptr, canvas_ptr, n_win, q, h, w, H, W,
                   BLOCK_Q: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """One program: BLOCK_Q queries x a TILE_H x TILE_W canvas tile; windows summed in order, then / count.

    geom: per window y1, y2, x1, x2, top pad, left pad, padded height, padded width (int32)."""
    pid_t, pid_q = tl.program_id(0), tl.program_id(1)
    n_tx = tl.cdiv(W, TILE_W)
    ty, tx = (pid_t // n_tx) * TILE_H, (pid_t % n_tx) * TILE_W
    offs = tl.arange(0, TILE_H * TILE_W)
    y, x = ty + offs // TILE_W, tx + offs % TILE_W
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pix_ok, q_ok = (y < H) & (x < W), qs < q
    acc = tl.zeros([BLOCK_Q, TILE_H * TILE_W], tl.float32)
    count = tl.zeros([TILE_H * TILE_W], tl.float32)
    for b in range(n_win):
        y1, y2 = tl.load(geom_ptr + b * 8 + 0), tl.load(geom_ptr + b * 8 + 1)
        x1, x2 = tl.load(geom_ptr + b * 8 + 2), tl.load(geom_ptr + b * 8 + 3)
        # a pixel is covered by a few windows only (4 with stride = crop / 2): skip the others
        if (y1 < ty + TILE_H) & (y2 > ty) & (x1 < tx + TILE_W) & (x2 > tx):
            top, left = tl.load(geom_ptr + b * 8 + 4), tl.load(geom_ptr + b * 8 + 5)
            # in / out in float32, correctly rounded, as ATen computes the scale of F.interpolate
            sy = tl.math.div_rn(h.to(tl.float32), tl.load(geom_ptr + b * 8 + 6).to(tl.float32))
            sx = tl.math.div_rn(w.to(tl.float32), tl.load(geom_ptr + b * 8 + 7).to(tl.float32))
            inside = pix_ok & (y >= y1) & (y < y2) & (x >= x1) & (x < x2)
            # position in the padded window, upsampled from the h x w logits
            ya, yb, wya, wyb = _taps(y - y1 + top, sy, h)
            xa, xb, wxa, wxb = _taps(x - x1 + left, sx, w)
            base = logits_ptr + b * q * h * w + qs[:, None] * (h * w)
            m = q_ok[:, None] & inside[None, :]
            v = _bilerp(base, w, ya, yb, xa, xb, wya, wyb, wxa, wxb, m)
            acc += tl.where(m, v, 0.0)  # + 0.0 leaves a sum unchanged: same order as the reference
            count += inside.to(tl.float32)
    # an uncovered pixel gives 0/0 = NaN, like the reference; lanes outside the canvas divide by 1
    out = acc / tl.where(pix_ok, count, 1.0)[None, :]
    plane = qs[:, None].to(tl.int64) * (H * W)  # Q x H x W can pass 2**31 for large vocabularies
    tl.store(canvas_ptr + plane + (y * W + x)[None, :], out, mask=q_ok[:, None] & pix_ok[None, :])


def _classify_kernel(canvas_ptr, qclass_ptr, regions_ptr, labels_ptr, hist_ptr, q, H, W, H0, W0, n_cls,
                     sy, sx, logit_scale, prob_thd, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: BLOCK_P output pixels; queries streamed in BLOCK_Q chunks with an online softmax."""
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = pix < H0 * W0
    ya, yb, wya, wyb = _taps(pix // W0, sy, H)
    xa, xb, wxa, wxb = _taps(pix % W0, sx, W)
    m_i = tl.full([BLOCK_P], float("-inf"), tl.float32)
    z_i = tl.zeros([BLOCK_P], tl.float32)
    best = tl.zeros([BLOCK_P], tl.int32)
    for q0 in range(0, q, BLOCK_Q):
        qs = q0 + tl.arange(0, BLOCK_Q)
        q_ok = qs < q
        base = canvas_ptr + qs[:, None].to(tl.int64) * (H * W)
        m = q_ok[:, None] & pix_ok[None, :]
        v = _bilerp(base, W, ya, yb, xa, xb, wya, wyb, wxa, wxb, m)
        s = tl.where(q_ok[:, None], v * logit_scale, float("-inf"))
        cls = tl.load(qclass_ptr + qs, mask=q_ok, other=n_cls)
        c_max = tl.max(s, 0)
        # lowest class among this chunk's best queries (a tie of logits is a tie of probabilities)
        c_best = tl.min(tl.where(s == c_max[None, :], cls[:, None], n_cls), 0)
        m_new = tl.maximum(m_i, c_max)
        z_i = z_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[None, :]), 0)
        best = tl.where(c_max > m_i, c_best, tl.where(c_max == m_i, tl.minimum(best, c_best), best))
        m_i = m_new
    label = tl.where(1.0 / z_i < prob_thd, 0, best)
    tl.store(labels_ptr + pix, label.to(tl.int64), mask=pix_ok)
    region = tl.load(regions_ptr + pix, mask=pix_ok, other=0)
    # region 0 keeps its per-pixel labels, so it needs no counts
    # Relaxed: the counts are read only after the kernel, so no ordering is needed, only atomicity.
    tl.atomic_add(hist_ptr + region * n_cls + label, 1, mask=pix_ok & (region > 0), sem="relaxed")


def _majority_kernel(hist_ptr, winner_ptr, n_reg, n_cls, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    counts = tl.load(hist_ptr + rows[:, None] * n_cls + cols[None, :],
                     mask=(rows[:, None] < n_reg) & (cols[None, :] < n_cls), other=-1)
    # tl.argmax returns the first maximum: ties go to the smallest class, as torch.argmax does
    tl.store(winner_ptr + rows, tl.argmax(counts, 1).to(tl.int64), mask=rows < n_reg)


def _gather_kernel(regions_ptr, winner_ptr, labels_ptr, n, BLOCK: tl.constexpr):
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    region = tl.load(regions_ptr + pix, mask=pix < n, other=0)
    seg = (pix < n) & (region > 0)
    tl.store(labels_ptr + pix, tl.load(winner_ptr + region, mask=seg, other=0), mask=seg)


def _scale(n_in: int, n_out: int) -> float:
    """in / out rounded to float32 as ATen computes it (a Python float would be rounded from float64)."""
    return (torch.tensor(n_in, dtype=torch.float32) / n_out).item()


@dataclass(frozen=True)
class _Window:
    """The window fields the reference reads, rebuilt from a geometry table (fallback path)."""

    y1: int
    y2: int
    x1: int
    x2: int
    pad: tuple[int, int, int, int]  # left, right, top, bottom (right and bottom unused)
    padded_size: tuple[int, int]


def window_geometry(windows: Sequence, device: torch.device) -> torch.Tensor:
    """int32 [B, 8] on `device`: y1, y2, x1, x2, top pad, left pad, padded height, padded width per window."""
    rows = [[w.y1, w.y2, w.x1, w.x2, w.pad[2], w.pad[0], *w.padded_size] for w in windows]
    return triton_common.nonblocking_to(rows, device).reshape(len(rows), 8)


def _windows(geometry: torch.Tensor) -> list[_Window]:
    return [_Window(y1, y2, x1, x2, (left, 0, top, 0), (ph, pw))
            for y1, y2, x1, x2, top, left, ph, pw in geometry.tolist()]


# The launch configuration; aot.py checks registers, spills and shared memory of GPU_BLOCKS on sm_90/80.
GPU_BLOCKS = dict(block_p=128, block_q=8, tile=(8, 32))  # 2048-element tiles, about 15 live per thread at 4 warps
CPU_BLOCKS = dict(block_p=4096, block_q=32, tile=(64, 64))  # the interpreter pays per program, not per element


@functools.cache
def _triton():
    per_image = {"_canvas_kernel": ("n_win", "q", "h", "w", "H", "W"),
                 "_classify_kernel": ("q", "H", "W", "H0", "W0", "n_cls"),
                 "_majority_kernel": ("n_reg", "n_cls"), "_gather_kernel": ("n",)}
    return triton_common.jit_module(globals(), _JIT, per_image)


def _stitch_classify_vote_geometry(window_logits: torch.Tensor, geometry: torch.Tensor, input_size: Sequence[int],
                                   output_size: Sequence[int], query_class: torch.Tensor, num_classes: int,
                                   logit_scale: float, prob_thd: float, regions: torch.Tensor, num_regions: int,
                                   block_p: int | None = None, block_q: int | None = None,
                                   tile: Sequence[int] | None = None) -> torch.Tensor:
    triton = _triton()
    dev = window_logits.device
    config = GPU_BLOCKS if triton_common.gpu_config(dev) else CPU_BLOCKS
    block_p, block_q = block_p or config["block_p"], block_q or config["block_q"]
    th, tw = tile or config["tile"]
    logits = window_logits.float().contiguous()
    n_win, q, h, w = logits.shape
    (H, W), (H0, W0) = input_size, output_size
    canvas = torch.empty(q, H, W, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(H, th) * triton.cdiv(W, tw), triton.cdiv(q, block_q))
    triton_common.launch(_canvas_kernel, grid, logits, geometry.contiguous(), canvas, n_win, q, h, w, H, W,
                         BLOCK_Q=block_q, TILE_H=th, TILE_W=tw)

    regions = regions.contiguous()
    qclass = query_class.to(device=dev, dtype=torch.int32).contiguous()
    labels = torch.empty(H0, W0, dtype=torch.int64, device=dev)
    hist = torch.zeros(num_regions, num_classes, dtype=torch.int32, device=dev)
    triton_common.launch(_classify_kernel, (triton.cdiv(H0 * W0, block_p),), canvas, qclass, regions, labels, hist, q,
                         H, W, H0, W0, num_classes, _scale(H, H0), _scale(W, W0), float(logit_scale), float(prob_thd),
                         BLOCK_Q=block_q, BLOCK_P=block_p)

    winner = torch.empty(num_regions, dtype=torch.int64, device=dev)
    block_c = triton.next_power_of_2(num_classes)
    block_r = max(1, min(64, 4096 // block_c))
    triton_common.launch(_majority_kernel, (triton.cdiv(num_regions, block_r),), hist, winner, num_regions,
                         num_classes, BLOCK_R=block_r, BLOCK_C=block_c)
    triton_common.launch(_gather_kernel, (triton.cdiv(H0 * W0, 1024),), regions, winner, labels, H0 * W0, BLOCK=1024)
    return labels


def stitch_classify_vote_triton(window_logits: torch.Tensor, windows: Sequence, input_size: tuple[int, int],
                                output_size: tuple[int, int], query_class: torch.Tensor, num_classes: int,
                                logit_scale: float, prob_thd: float, regions: torch.Tensor, num_regions: int,
                                block_p: int | None = None, block_q: int | None = None,
                                tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Same contract as `stitch_classify_vote`; stores the input-size canvas, never Q x H0 x W0 probabilities.

    block_p output pixels and tile (canvas rows, columns; powers of two) per program, block_q queries per step
    (default: GPU_BLOCKS on CUDA, CPU_BLOCKS else).
    """
    geometry = window_geometry(windows, window_logits.device)
    return _stitch_classify_vote_geometry(window_logits, geometry, input_size, output_size, query_class, num_classes,
                                          logit_scale, prob_thd, regions, num_regions, block_p, block_q, tile)


def _reference_geometry(window_logits: torch.Tensor, geometry: torch.Tensor, input_size: Sequence[int],
                        output_size: Sequence[int], *args) -> torch.Tensor:
    return stitch_classify_vote(window_logits, _windows(geometry), tuple(input_size), tuple(output_size), *args)


@torch.library.custom_op("corrclip::stitch_classify_vote", mutates_args=())
def stitch_classify_vote_op(window_logits: torch.Tensor, geometry: torch.Tensor, input_size: list[int],
                            output_size: list[int], query_class: torch.Tensor, num_classes: int, logit_scale: float,
                            prob_thd: float, regions: torch.Tensor, num_regions: int) -> torch.Tensor:
    """The Triton path as a torch op (geometry: window_geometry); falls back to the reference if it fails."""
    return dispatch.run_fused("stitch_classify_vote", _stitch_classify_vote_geometry, _reference_geometry,
                              window_logits.device, window_logits, geometry, input_size, output_size, query_class,
                              num_classes, logit_scale, prob_thd, regions, num_regions)


@stitch_classify_vote_op.register_fake
def _(window_logits, geometry, input_size, output_size, query_class, num_classes, logit_scale, prob_thd, regions,
      num_regions):
    return regions.new_empty(tuple(output_size), dtype=torch.int64)
