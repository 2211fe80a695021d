"""Masked correlation attention: the heart of CorrCLIP (spec steps 7, 9 and 12).

out[b, i] = sum_j softmax_j(tau * S_ij over allowed j) * values[b, j],   S = F F^T (cosines)

Allowed pairs (the spec's Omega) are decided from region ids alone:
  * i and j lie in the same segmented region, or
  * i or j is unsegmented (id < 0) and S_ij > mean(S), the mean over all N^2 entries.
Every row keeps its diagonal (S_ii = 1 exceeds the mean, or i shares its own region), so a row is
never empty for real features.

This file is the plain torch reference; a fused kernel with the same signature may sit beside it.
"""

from __future__ import annotations

import functools

import torch


def masked_correlation_attention(feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor,
                                 tau: float = 4.0) -> torch.Tensor:
    """feats [B,N,C] (L2-normalized), region_ids [B,N] (int, < 0 = unsegmented), values [B,N,D] -> [B,N,D]."""
    s = feats @ feats.transpose(1, 2)  # [B, N, N]
    mean = s.mean(dim=(1, 2), keepdim=True)
    unseg = region_ids < 0
    same = (region_ids[:, :, None] == region_ids[:, None, :]) & ~unseg[:, :, None]
    loose = (unseg[:, :, None] | unseg[:, None, :]) & (s > mean)
    scores = (tau * s).masked_fill(~(same | loose), float("-inf"))
    weights = scores.softmax(dim=-1).to(values.dtype)
    return weights @ values


# ---- Fused Triton kernel ---------------------------------------------------------------------------------------------
# Triton is imported on first use, not with this module: it decides once, when triton.language is first imported,
# whether kernels compile or run under the CPU interpreter (TRITON_INTERPRET), so tests must be able to choose after
# `import corrclip`; and CPU-only torch builds have no Triton at all.
#
# Under the interpreter (CPU tensors only) bf16 is stored as bit patterns: its tl.dot multiplies the patterns
# (triton#11584) and its fp32 -> bf16 cast truncates. INTERPRETED kernels therefore do the products on float32
# values and round to bf16 by hand, to nearest even as the GPU does, so the CPU tests see the GPU's numerics.

tl = None  # triton.language, bound by _kernel()


def _correlation_kernel(f_ptr, ids_ptr, v_ptr, mean_ptr, out_ptr, n, c, d, scale,
                        s_fb, s_fn, s_fc, s_ib, s_in, s_vb, s_vn, s_vd, s_ob, s_on, s_od,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """One program: BLOCK_M query rows x BLOCK_D value channels of one window, online softmax over key blocks.

    D (2 x 768 at real size) does not fit one accumulator, so D is split over the grid and each D block
    recomputes the score tiles; C is looped in BLOCK_C chunks for the same reason.
    """
    pid_m, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok, chan_ok = rows < n, chans < d
    f_ptr += b * s_fb
    id_i = tl.load(ids_ptr + b * s_ib + rows * s_in, mask=row_ok, other=0)
    mean = tl.load(mean_ptr + b)
    # A finite start keeps exp2(m_old - m_new) a number while a row has seen only masked keys.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c0 in range(0, c, BLOCK_C):
            cc = c0 + offs_c
            q = tl.load(f_ptr + rows[:, None] * s_fn + cc[None, :] * s_fc,
                        mask=row_ok[:, None] & (cc[None, :] < c), other=0.0)
            k = tl.load(f_ptr + cols[:, None] * s_fn + cc[None, :] * s_fc,
                        mask=col_ok[:, None] & (cc[None, :] < c), other=0.0)
            if INTERPRETED:
                q = q.to(tl.float32)
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), s, input_precision=PRECISION)
        # The scope rule, from region ids: same segmented region, or an unsegmented end and S above its mean.
        id_j = tl.load(ids_ptr + b * s_ib + cols * s_in, mask=col_ok, other=0)
        same = (id_i[:, None] == id_j[None, :]) & (id_i[:, None] >= 0)
        loose = ((id_i[:, None] < 0) | (id_j[None, :] < 0)) & (s > mean)
        z = tl.where((same | loose) & col_ok[None, :], s * scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * s_vb + cols[:, None] * s_vn + chans[None, :] * s_vd,
                    mask=col_ok[:, None] & chan_ok[None, :], other=0.0)
        # In fp16/bf16 the second product runs in the value dtype (tensor cores), accumulating in fp32.
        if not INTERPRETED:
            p = p.to(v.dtype)
        elif v.dtype == tl.bfloat16:
            bits = p.to(tl.uint32, bitcast=True)
            p = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
            v = v.to(tl.float32)
        else:
            p = p.to(v.dtype).to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    # A real row with no allowed key gives 0/0 = NaN, like the reference's softmax; padded rows are never stored.
    out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    if INTERPRETED and out_ptr.dtype.element_ty == tl.bfloat16:
        bits = out.to(tl.uint32, bitcast=True)
        out = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    tl.store(out_ptr + b * s_ob + rows[:, None] * s_on + chans[None, :] * s_od, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & chan_ok[None, :])


@functools.cache
def _kernel():
    global tl
    import triton
    import triton.language as tl
    return triton.jit(_correlation_kernel)


def _block(size: int, cap: int) -> int:
    """Power of two >= size, clamped to [16, cap] (tl.dot wants every dimension >= 16)."""
    return max(16, min(cap, 1 << (size - 1).bit_length()))


def _correlation_into(out: torch.Tensor, feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor,
                      tau: float, block_m: int = 64, block_n: int = 64, block_c: int = 64,
                      block_d: int | None = None) -> torch.Tensor:
    """Writes the masked correlation attention into `out` [B,N,D]; any strides (the head passes a transposed view).

    Default blocks, from ptxas's register report for sm_90 at 8 warps: BLOCK_D 256 in fp16/bf16 (no spills), 128 in
    fp32 (a few bytes spilled; fp32 is the checking path). A larger BLOCK_D means fewer D blocks recomputing S.
    """
    kernel = _kernel()
    b, n, c = feats.shape
    d = values.shape[2]
    # mean(S) = sum_ij F_i.F_j / N^2 = |sum_j F_j|^2 / N^2: equal to S.mean() up to rounding, without an N x N pass.
    total = feats.float().sum(dim=1)
    mean = ((total * total).sum(dim=1) / (n * n)).contiguous()
    # fp32 stays fp32 in the products: TF32 would break the 1e-5 agreement with the reference.
    fp32 = torch.float32 in (feats.dtype, values.dtype)
    precision = "ieee" if fp32 else "tf32"
    block_d = block_d or (128 if fp32 else 256)
    bm, bn, bc, bd = _block(n, block_m), _block(n, block_n), _block(c, block_c), _block(d, block_d)
    grid = (-(-n // bm), -(-d // bd), b)
    kernel[grid](feats, region_ids, values, mean, out, n, c, d, tau * 1.4426950408889634,  # tau * log2(e)
                 *feats.stride(), *region_ids.stride(), *values.stride(), *out.stride(),
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, PRECISION=precision,
                 INTERPRETED=feats.device.type == "cpu", num_warps=8)  # only the interpreter takes CPU tensors
    return out


def masked_correlation_attention_triton(feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor,
                                        tau: float = 4.0) -> torch.Tensor:
    """Same contract as `masked_correlation_attention`, fused: no N x N tensor is ever stored."""
    out = torch.empty(values.shape, dtype=values.dtype, device=values.device)
    return _correlation_into(out, feats, region_ids, values, tau)
