"""Masked correlation attention: the heart of CorrCLIP (spec steps 7, 9 and 12).

out[b, i] = sum_j softmax_j(tau * S_ij over allowed j) * values[b, j],   S = F F^T (cosines)

Allowed pairs (the spec's Omega) are decided from region ids alone:
  * i and j lie in the same segmented region, or
  * i or j is unsegmented (id < 0) and S_ij > mean(S), the mean over all N^2 entries.
Every row keeps its diagonal (S_ii = 1 exceeds the mean, or i shares its own region), so a row is
never empty for real features.

This file holds the plain torch reference and, beside it, its Triton path; corrclip.kernels dispatches.
"""

from __future__ import annotations

import functools

import torch

from . import dispatch, triton_common


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


# ---- Triton path -----------------------------------------------------------------------------------------------------
# S = F F^T once per window with cuBLAS (the same call as the reference, so S and mean(S) are the reference's to the
# bit), then one kernel fuses the scope mask, an online softmax and P V on the tensor cores: no softmax weights are
# stored. Why not recompute S inside the kernel: D (2 x 768) does not fit one accumulator, so every D block would
# redo the N^2 C products (2.7x the useful FLOPs in bf16 at BLOCK_D 256); reading S back costs far less (cost model
# in benchmarks/RESULTS.md). Dispatch prefers the reference in "auto" until this is measured faster on a GPU.

tl = None  # triton.language, bound by _triton()


def _attention_kernel(s_ptr, ids_ptr, v_ptr, mean_ptr, out_ptr, n, d, scale,
                      s_sb, s_sm, s_sn, s_ib, s_in, s_vb, s_vn, s_vd, s_ob, s_on, s_od,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows x BLOCK_D value channels of one window, online softmax over key blocks.

    The D blocks of one row block are neighbouring programs (axis 0), so they read the same S tiles through L2.
    """
    pid_d, pid_m, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, chan_ok = rows < n, chans < d
    s_ptr += b.to(tl.int64) * s_sb
    v_ptr += b.to(tl.int64) * s_vb
    id_i = tl.load(ids_ptr + b * s_ib + rows * s_in, mask=row_ok, other=0)
    mean = tl.load(mean_ptr + b).to(tl.float32)
    # A finite start keeps exp2(m_old - m_new) a number while a row has seen only masked keys.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        s = tl.load(s_ptr + rows[:, None] * s_sm + cols[None, :] * s_sn, mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        # The scope rule, from region ids: same segmented region, or an unsegmented end and S above its mean.
        id_j = tl.load(ids_ptr + b * s_ib + cols * s_in, mask=col_ok, other=0)
        same = (id_i[:, None] == id_j[None, :]) & (id_i[:, None] >= 0)
        loose = ((id_i[:, None] < 0) | (id_j[None, :] < 0)) & (s > mean)
        z = tl.where((same | loose) & col_ok[None, :], s * scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # V is D-contiguous (the wrapper sees to it): 16-byte loads along the channels.
        v = tl.load(v_ptr + cols[:, None] * s_vn + chans[None, :] * s_vd, mask=col_ok[:, None] & chan_ok[None, :],
                    other=0.0)
        # In fp16/bf16 the product runs in the value dtype (tensor cores), accumulating in fp32.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    # A real row with no allowed key gives 0/0 = NaN, like the reference's softmax; padded rows are never stored.
    out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    tl.store(out_ptr + b.to(tl.int64) * s_ob + rows[:, None] * s_on + chans[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & chan_ok[None, :])


@functools.cache
def _triton():
    # n and the batch stride of S vary with the window size; D and C do not.
    return triton_common.jit_module(globals(), ("_attention_kernel",), {"_attention_kernel": ("n", "s_sb", "s_sm")})


def _block(size: int, cap: int) -> int:
    """Power of two >= size, clamped to [16, cap] (tl.dot wants every dimension >= 16)."""
    return max(16, min(cap, 1 << (size - 1).bit_length()))


def gpu_blocks(dtype: torch.dtype) -> dict:
    """The GPU launch configuration; aot.py checks registers, spills and shared memory of exactly these.

    fp16/bf16: a 64 x 256 fp32 accumulator (64 registers a thread at 8 warps), so D = 1536 is 6 blocks re-reading S.
    fp32 (the checking path, CUDA-core FMAs): BLOCK_D 128.
    """
    if dtype == torch.float32:
        return dict(block_m=64, block_n=32, block_d=128, num_warps=8, num_stages=2)
    return dict(block_m=64, block_n=64, block_d=256, num_warps=8, num_stages=3)


CPU_BLOCKS = dict(block_m=64, block_n=64, block_d=128, num_warps=4, num_stages=1)  # interpreter: few programs


def _attention_into(out: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, region_ids: torch.Tensor,
                    values: torch.Tensor, tau: float, block_m: int, block_n: int, block_d: int, num_warps: int,
                    num_stages: int) -> torch.Tensor:
    _triton()
    b, n, _ = s.shape
    d = values.shape[2]
    bm, bn, bd = _block(n, block_m), _block(n, block_n), _block(d, block_d)
    grid = (-(-d // bd), -(-n // bm), b)
    triton_common.launch(_attention_kernel, grid, s, region_ids, values, mean, out, n, d,
                         tau * 1.4426950408889634,  # tau * log2(e): exp2 on the GPU's fast path
                         *s.stride(), *region_ids.stride(), *values.stride(), *out.stride(),
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                         # fp32 stays fp32 in the products: TF32 would break the 1e-5 agreement with the reference
                         PRECISION="ieee" if values.dtype == torch.float32 else "tf32",
                         num_warps=num_warps, num_stages=num_stages)
    return out


def masked_correlation_attention_triton(feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor,
                                        tau: float = 4.0, **blocks) -> torch.Tensor:
    """Same contract as `masked_correlation_attention`: S by cuBLAS, mask + softmax + P V fused in Triton.

    blocks: block_m, block_n, block_d, num_warps, num_stages (default: gpu_blocks on CUDA, CPU_BLOCKS else).
    """
    config = gpu_blocks(values.dtype) if triton_common.gpu_config(values.device) else CPU_BLOCKS
    s = feats @ feats.transpose(1, 2)  # [B, N, N], exactly the reference's
    mean = s.mean(dim=(1, 2))
    if values.stride(2) != 1:  # the head hands over a channel-strided view; one copy makes V loads vectorize
        values = values.contiguous()
    out = torch.empty(values.shape, dtype=values.dtype, device=values.device)
    return _attention_into(out, s, mean, region_ids, values, tau, **(config | blocks))


@torch.library.custom_op("corrclip::masked_correlation_attention", mutates_args=())
def masked_correlation_attention_op(feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor,
                                    tau: float) -> torch.Tensor:
    """The Triton path as a torch op (what the entry point calls); falls back to the reference if it fails."""
    return dispatch.run_fused("masked_correlation_attention", masked_correlation_attention_triton,
                              masked_correlation_attention, values.device, feats, region_ids, values, tau)


@masked_correlation_attention_op.register_fake
def _(feats: torch.Tensor, region_ids: torch.Tensor, values: torch.Tensor, tau: float) -> torch.Tensor:
    return values.new_empty(values.shape)
