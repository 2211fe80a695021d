"""Region merging on the DINO grid, for every window of a batch at once (spec step 8).

The research code runs sklearn's DBSCAN (eps 0.2, min_samples 1, metric precomputed) on
D = max(A) - A, A the cosine matrix of region-mean features, leaving out the window's smallest id
("unsegmented"). With min_samples 1 every point is a core point, so DBSCAN's clusters are exactly
the connected components of the graph {D_rs <= eps} (eps inclusive), numbered in the order of
their lowest member. We compute those components with a fixed number of boolean matrix squarings:
no sklearn, no host round trip, and no Python loop over windows or regions.

This file holds the plain torch reference and, beside it, its Triton path; corrclip.kernels dispatches.
"""

from __future__ import annotations

import functools
import math

import torch

from . import dispatch, triton_common


def merge_regions(feats: torch.Tensor, local_ids: torch.Tensor, num_regions: int,
                  eps: float = 0.2) -> torch.Tensor:
    """feats [B,N,C] normalized; local_ids [B,N] in 0..R_b-1, sorted by original id (0 = the window's
    smallest, which plays "unsegmented"); num_regions = max R_b over the batch.

    Returns merged ids [B,N]: -1 for the window's smallest region, else the DBSCAN cluster index.
    """
    b, n, c = feats.shape
    r = num_regions
    # Region means, then L2-normalized (sum / count keeps the research code's mean explicitly).
    sums = feats.new_zeros(b, r, c).scatter_add_(1, local_ids[:, :, None].expand(-1, -1, c), feats)
    counts = torch.zeros(b, r, dtype=feats.dtype, device=feats.device).scatter_add_(
        1, local_ids, torch.ones_like(local_ids, dtype=feats.dtype))
    means = torch.nn.functional.normalize(sums / counts.clamp(min=1)[:, :, None], dim=-1)
    valid = _valid(counts)
    pair = valid[:, :, None] & valid[:, None, :]
    a = means @ means.transpose(1, 2)
    a_max = a.masked_fill(~pair, float("-inf")).amax(dim=(1, 2), keepdim=True)
    eye = torch.eye(r, dtype=torch.bool, device=feats.device)
    reach = (((a_max - a) <= eps) | eye) & pair  # a region is always its own neighbour
    return _label_components(reach, valid, local_ids)


def _valid(counts: torch.Tensor) -> torch.Tensor:
    """Regions that take part in merging: present in the window, and not region 0 (the smallest id)."""
    valid = counts > 0
    valid[:, 0] = False
    return valid


def _label_components(reach: torch.Tensor, valid: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
    """reach [B,R,R] bool graph, valid [B,R] -> per-token cluster ids [B,N] (-1 outside the graph)."""
    r = reach.shape[1]
    # Transitive closure by repeated squaring: after k steps, paths of length up to 2^k are found.
    for _ in range(max(1, math.ceil(math.log2(max(r, 2))))):
        reach = reach | (reach.float() @ reach.float() > 0)
    # A region's component is named by its lowest member; clusters are numbered by that member.
    root = torch.where(valid, reach.float().argmax(dim=2), torch.zeros_like(valid, dtype=torch.long))
    is_root = valid & (root == torch.arange(r, device=reach.device))
    cluster_of_root = torch.cumsum(is_root.long(), dim=1) - 1
    cluster = torch.gather(cluster_of_root, 1, root)
    cluster = torch.where(valid, cluster, torch.full_like(cluster, -1))
    return torch.gather(cluster, 1, local_ids)


# ---- Triton path -----------------------------------------------------------------------------------------------------
# Region means and the eps-graph in Triton; the connected components stay in torch (_label_components): ~log2(R)
# batched R x R boolean matmuls, O(R^3 log R) on R ~ 200 regions, a few cuBLAS calls; a Triton union-find would need a
# grid-wide sync per round and win nothing. The one-hot operand of the means is exact in any dtype.

tl = None  # triton.language, bound by _triton()


def _region_means_kernel(f_ptr, ids_ptr, means_ptr, counts_ptr, n, c, r,
                         s_fb, s_fn, s_fc, s_ib, s_in, s_mb, s_mr, s_mc, s_cb, s_cr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                         PRECISION: tl.constexpr):
    """One program: BLOCK_R regions x BLOCK_C channels of one window. Sums are one-hot [R, N] @ feats [N, C] on the
    tensor cores, a fixed summation order (no atomics), so the means come out the same every run."""
    pid_r, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    regions = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    sums = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    counts = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, n, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        ids = tl.load(ids_ptr + b * s_ib + toks * s_in, mask=toks < n, other=-1)
        f = tl.load(f_ptr + b * s_fb + toks[:, None] * s_fn + chans[None, :] * s_fc,
                    mask=(toks[:, None] < n) & (chans[None, :] < c), other=0.0)
        onehot = regions[:, None] == ids[None, :]
        sums = tl.dot(onehot.to(f.dtype), f, sums, input_precision=PRECISION)
        counts += tl.sum(onehot.to(tl.float32), 1)
    means = sums / tl.maximum(counts, 1.0)[:, None]
    tl.store(means_ptr + b * s_mb + regions[:, None] * s_mr + chans[None, :] * s_mc, means,
             mask=(regions[:, None] < r) & (chans[None, :] < c))
    if pid_c == 0:
        tl.store(counts_ptr + b * s_cb + regions * s_cr, counts, mask=regions < r)


def _region_graph_kernel(means_ptr, counts_ptr, reach_ptr, r, c, eps,
                         s_mb, s_mr, s_mc, s_cb, s_cr, s_rb, s_rr, s_rs,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_R rows of one window's graph reach = ((max A - A <= eps) | I) & valid pairs, A the cosines of
    the region means. The max runs over all valid pairs, so a first pass visits every tile; the second recomputes this
    program's row of tiles (A costs 2 R^2 C ~ 60 MFLOP at R = 200: simpler to redo than to store and sync on)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    means_ptr += b * s_mb
    offs = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    a_max = tl.full([], float("-inf"), tl.float32)
    for phase in tl.static_range(2):
        # phase 0: every row tile, for the max; phase 1: this program's row tile, thresholded and stored.
        first = 0 if phase == 0 else pid * BLOCK_R
        last = r if phase == 0 else first + 1
        for r0 in range(first, last, BLOCK_R):
            rows = r0 + offs
            count_r = tl.load(counts_ptr + b * s_cb + rows * s_cr, mask=rows < r, other=0.0)
            valid_r = (count_r > 0) & (rows > 0)
            for s0 in range(0, r, BLOCK_R):
                cols = s0 + offs
                count_s = tl.load(counts_ptr + b * s_cb + cols * s_cr, mask=cols < r, other=0.0)
                valid_s = (count_s > 0) & (cols > 0)
                gram = tl.zeros([BLOCK_R, BLOCK_R], tl.float32)
                sq_r = tl.zeros([BLOCK_R], tl.float32)
                sq_s = tl.zeros([BLOCK_R], tl.float32)
                for c0 in range(0, c, BLOCK_C):
                    cc = c0 + offs_c
                    m_r = tl.load(means_ptr + rows[:, None] * s_mr + cc[None, :] * s_mc,
                                  mask=(rows[:, None] < r) & (cc[None, :] < c), other=0.0)
                    m_s = tl.load(means_ptr + cols[:, None] * s_mr + cc[None, :] * s_mc,
                                  mask=(cols[:, None] < r) & (cc[None, :] < c), other=0.0)
                    gram = tl.dot(m_r, tl.trans(m_s), gram, input_precision=PRECISION)
                    sq_r += tl.sum(m_r * m_r, 1)
                    sq_s += tl.sum(m_s * m_s, 1)
                # Cosines of the means; the 1e-12 floor is F.normalize's.
                a = gram / (tl.maximum(tl.sqrt(sq_r), 1e-12)[:, None] * tl.maximum(tl.sqrt(sq_s), 1e-12)[None, :])
                pair = valid_r[:, None] & valid_s[None, :]
                if phase == 0:
                    a_max = tl.maximum(a_max, tl.max(tl.max(tl.where(pair, a, float("-inf")), 1), 0))
                else:
                    reach = (((a_max - a) <= eps) | (rows[:, None] == cols[None, :])) & pair
                    tl.store(reach_ptr + b * s_rb + rows[:, None] * s_rr + cols[None, :] * s_rs, reach.to(tl.int8),
                             mask=(rows[:, None] < r) & (cols[None, :] < r))


@functools.cache
def _triton():
    # n (tokens) and r (regions) vary per window size and per image; so do the strides that contain them.
    varying = ("n", "r", "s_fb", "s_ib", "s_mb", "s_cb")
    return triton_common.jit_module(globals(), ("_region_means_kernel", "_region_graph_kernel"),
                                    {"_region_means_kernel": varying,
                                     "_region_graph_kernel": ("r", "s_mb", "s_cb", "s_rb", "s_rr")})


def _block(size: int, cap: int) -> int:
    """Power of two >= size, clamped to [16, cap] (tl.dot wants every dimension >= 16)."""
    return max(16, min(cap, 1 << (size - 1).bit_length()))


# The launch configuration on every device; aot.py checks registers, spills and shared memory of these on sm_90/80
# (ptxas: 64-wide channel blocks at 4 warps, and 64-region graph rows, spill on sm_80 in fp32).
MEANS_BLOCKS = dict(block_r=64, block_n=64, block_c=32, num_warps=8)
GRAPH_BLOCKS = dict(block_r=32, block_c=32, num_warps=4)


def _region_means_into(means: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, local_ids: torch.Tensor,
                       block_r: int = 64, block_n: int = 64, block_c: int = 32, num_warps: int = 8) -> None:
    """means [B,R,C] fp32 and counts [B,R] fp32 of the regions 0..R-1 of every window."""
    _triton()
    b, n, c = feats.shape
    r = means.shape[1]
    br, bn, bc = _block(r, block_r), _block(n, block_n), _block(c, block_c)
    triton_common.launch(
        _region_means_kernel, (-(-r // br), -(-c // bc), b),
        feats, local_ids, means, counts, n, c, r, *feats.stride(), *local_ids.stride(), *means.stride(),
        *counts.stride(), BLOCK_R=br, BLOCK_N=bn, BLOCK_C=bc,
        PRECISION="ieee" if feats.dtype == torch.float32 else "tf32",  # TF32's 10-bit mantissa could flip pairs at eps
        num_warps=num_warps)


def _region_graph_into(reach: torch.Tensor, means: torch.Tensor, counts: torch.Tensor, eps: float,
                       block_r: int = 32, block_c: int = 32, num_warps: int = 4) -> None:
    """reach [B,R,R] int8 (0/1): the eps-graph of the valid regions' mean cosines, diagonal included."""
    _triton()
    b, r, c = means.shape
    br, bc = _block(r, block_r), _block(c, block_c)
    triton_common.launch(_region_graph_kernel, (-(-r // br), b), means, counts, reach, r, c, eps, *means.stride(),
                         *counts.stride(), *reach.stride(), BLOCK_R=br, BLOCK_C=bc, PRECISION="ieee",
                         num_warps=num_warps, num_stages=2)


def merge_regions_triton(feats: torch.Tensor, local_ids: torch.Tensor, num_regions: int,
                         eps: float = 0.2) -> torch.Tensor:
    """Same contract as `merge_regions`: region means and the eps-graph in Triton, the components in torch."""
    b, n, c = feats.shape
    means = torch.empty(b, num_regions, c, dtype=torch.float32, device=feats.device)
    counts = torch.empty(b, num_regions, dtype=torch.float32, device=feats.device)
    reach = torch.empty(b, num_regions, num_regions, dtype=torch.int8, device=feats.device)
    _region_means_into(means, counts, feats, local_ids, **MEANS_BLOCKS)
    _region_graph_into(reach, means, counts, eps, **GRAPH_BLOCKS)
    return _label_components(reach.bool(), _valid(counts), local_ids)


@torch.library.custom_op("corrclip::merge_regions", mutates_args=())
def merge_regions_op(feats: torch.Tensor, local_ids: torch.Tensor, num_regions: int, eps: float) -> torch.Tensor:
    """The Triton path as a torch op (what the entry point calls); falls back to the reference if it fails."""
    return dispatch.run_fused("merge_regions", merge_regions_triton, merge_regions, feats.device, feats, local_ids,
                              num_regions, eps)


@merge_regions_op.register_fake
def _(feats: torch.Tensor, local_ids: torch.Tensor, num_regions: int, eps: float) -> torch.Tensor:
    return torch.empty_like(local_ids)
