"""Times the Triton masked correlation attention and region merging against their torch references.

  * correlation attention at the real size: N = 1764 tokens (42 x 42 DINO grid), C = 768, D = 2 x 768 (main and
    spatial value paths), B = 2 and 8 windows, bf16 (the fast path) and B = 8 fp32 (the exact path); plus the
    separate bilinear upsampling of the values from the 21 x 21 CLIP grid, which both leave to torch. The Triton
    path is S = F F^T by cuBLAS, then one kernel for mask + softmax + P V: timed whole, S alone, and the kernel
    alone at a few block configurations (the first is the dispatch's; the others are candidates, not AOT-checked).
    corrclip.kernels.dispatch.AUTO keeps the reference until "reference / Triton path" is above 1 here.
  * region merging: the same windows with ~200 regions each.

Each timing: warm-up calls, then the median of timed calls (CUDA events on a GPU). Beside it: the bytes and FLOPs
the operation must move / compute (compulsory traffic; useful FLOPs, and what the kernel executes where it
recomputes), and the achieved rates against this device's ceilings, measured here: a large bf16 matmul for FLOP/s
and a large device-to-device copy for bandwidth. Without CUDA the script still runs: it times the torch references
on the CPU at reduced sizes (Triton's CPU interpreter is a test tool, not a performance path) and says so.

    python benchmarks/kernels_correlation.py [--warmup 5] [--runs 50]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform

import torch
import torch.nn.functional as F

from corrclip.kernels import correlation
from corrclip.kernels.correlation import masked_correlation_attention, masked_correlation_attention_triton
from corrclip.kernels.merging import merge_regions, merge_regions_triton
from corrclip.runtime.timing import median_seconds as bench


def ceilings(device: torch.device, warmup: int, runs: int) -> tuple[float, float]:
    """(FLOP/s of a large matmul: bf16 on a GPU, fp32 on the CPU; bytes/s of a large copy, read + write)."""
    gpu = device.type == "cuda"
    n = 8192 if gpu else 2048
    runs = max(runs // 5, 3) if gpu else 5
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if gpu else torch.float32)
    flops = 2 * n**3 / bench(lambda: a @ a, device, warmup, runs)
    x = torch.empty(1 << (30 if gpu else 28), device=device, dtype=torch.uint8)  # 1 GiB / 256 MiB: past the caches
    y = torch.empty_like(x)
    bandwidth = 2 * x.numel() / bench(lambda: y.copy_(x), device, warmup, runs)
    return flops, bandwidth


def flop_rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.2f} GFLOP/s"


def rate(seconds: float, nbytes: float, flops: float, ceil: tuple[float, float]) -> str:
    peak_flops, peak_bw = ceil
    return (f"{flop_rate(flops / seconds)} ({100 * flops / seconds / peak_flops:.1f}% of peak), "
            f"{nbytes / seconds / 1e9:.1f} GB/s ({100 * nbytes / seconds / peak_bw:.1f}%)")


def row(name: str, seconds: float, nbytes: float, flops: float, ceil: tuple[float, float]) -> None:
    achieved = rate(seconds, nbytes, flops, ceil)
    print(f"| {name} | {seconds * 1e3:.3f} | {nbytes / 1e6:.1f} | {flops / 1e9:.2f} | {achieved} |")


def correlation_inputs(b: int, grid: int, c: int, d: int, clip_grid: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    n = grid * grid
    feats = F.normalize(torch.randn(b, n, c, generator=g, device=device), dim=-1).to(dtype)
    ids = torch.randint(-1, 30, (b, n), generator=g, device=device)  # ~30 merged regions, some unsegmented
    clip_values = torch.randn(b, 2, d // 2, clip_grid, clip_grid, generator=g, device=device).to(dtype)
    return feats, ids, clip_values


def upsample(clip_values: torch.Tensor, grid: int, dtype: torch.dtype) -> torch.Tensor:
    """What CorrHead does before the attention: bilinear to the DINO grid, main | spatial channels, [B, N, D]."""
    b, _, d, _, _ = clip_values.shape
    up = F.interpolate(clip_values.flatten(0, 1), size=(grid, grid), mode="bilinear", align_corners=False)
    return up.reshape(b, 2 * d, grid * grid).transpose(1, 2).to(dtype)


def kernel_candidates(dtype: torch.dtype) -> list[dict]:
    """The dispatch's configuration first, then alternatives worth a measurement."""
    first = correlation.gpu_blocks(dtype)
    others = [dict(block_m=128, block_n=64, block_d=128, num_warps=8, num_stages=3),
              dict(block_m=64, block_n=64, block_d=128, num_warps=4, num_stages=3)]
    return [first] + [c for c in others if c != first and dtype != torch.float32]


def bench_correlation(b, grid, c, d, clip_grid, dtype, device, ceil, warmup, runs, fused: bool) -> None:
    n = grid * grid
    feats, ids, clip_values = correlation_inputs(b, grid, c, d, clip_grid, dtype, device)
    values = upsample(clip_values, grid, dtype)
    size = dtype.itemsize
    name = f"B={b} {str(dtype).removeprefix('torch.')}"
    useful = b * (2 * n * n * c + 2 * n * n * d)  # S = F F^T, then P V (softmax and masks: O(N^2), not counted)
    nbytes = b * (n * c + 2 * n * d) * size + b * n * 8  # read F, V, ids; write the output
    t_ref = bench(lambda: masked_correlation_attention(feats, ids, values), device, warmup, runs)
    row(f"attention {name}: torch reference ({b} x {n} x {n} scores = {size * b * n * n / 1e6:.0f} MB each)",
        t_ref, nbytes, useful, ceil)
    up_bytes = b * (2 * (d // 2) * clip_grid**2 + n * d) * size
    up_flops = b * n * d * 9  # one bilinear blend per output element: 6 multiplies, 3 adds
    t_up = bench(lambda: upsample(clip_values, grid, dtype), device, warmup, runs)
    row(f"upsampling of V {name} (separate step)", t_up, up_bytes, up_flops, ceil)
    if not fused:
        print(f"upsampling / reference attention at {name}: {100 * t_up / t_ref:.1f}%")
        return
    ref = masked_correlation_attention(feats, ids, values)
    out = masked_correlation_attention_triton(feats, ids, values)
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    t_path = bench(lambda: masked_correlation_attention_triton(feats, ids, values), device, warmup, runs)
    row(f"attention {name}: Triton path (S by cuBLAS + mean + V copy + fused kernel)", t_path, nbytes, useful, ceil)
    s_flops, s_bytes = b * 2 * n * n * c, b * (n * c + n * n) * size
    t_s = bench(lambda: feats @ feats.transpose(1, 2), device, warmup, runs)
    row(f"attention {name}: S = F F^T alone (cuBLAS)", t_s, s_bytes, s_flops, ceil)
    s = feats @ feats.transpose(1, 2)
    mean, vc = s.mean(dim=(1, 2)), values.contiguous()
    for cfg in kernel_candidates(dtype):
        dest = torch.empty_like(vc)
        reads = math.ceil(d / cfg["block_d"])  # each D block reads its rows of S (L2 may absorb some)
        k_bytes = b * (reads * n * n * size + n * d * size * 2 + n * 8)
        t_k = bench(lambda cfg=cfg, dest=dest: correlation._attention_into(dest, s, mean, ids, vc, 4.0, **cfg),
                    device, warmup, runs)
        label = ", ".join(f"{k}={v}" for k, v in cfg.items())
        row(f"attention {name}: fused kernel alone ({label}; S read {reads}x)", t_k, k_bytes, b * 2 * n * n * d, ceil)
    print(f"attention {name}: reference / Triton path {t_ref / t_path:.2f}x; relative error {err:.1e}; "
          f"upsampling / Triton path {100 * t_up / t_path:.1f}%")


def bench_merging(b, grid, c, r, dtype, device, ceil, warmup, runs, fused: bool) -> None:
    n = grid * grid
    g = torch.Generator(device=device).manual_seed(1)
    feats = F.normalize(torch.randn(b, n, c, generator=g, device=device), dim=-1).to(dtype)
    local = torch.randint(0, r, (b, n), generator=g, device=device)
    size = dtype.itemsize
    closure = math.ceil(math.log2(r)) * 2 * r**3  # the components, torch in both paths
    useful = b * (n * c + 2 * r * r * c + closure)  # scatter-add, Gram of the means, closure
    nbytes = b * (n * c * size + n * 8 * 2 + r * c * 4 + r * r)  # feats, ids in and out, means, graph
    t_ref = bench(lambda: merge_regions(feats, local, r), device, warmup, runs)
    row(f"merging B={b}, R={r}: torch reference", t_ref, nbytes, useful, ceil)
    if fused:
        t_fused = bench(lambda: merge_regions_triton(feats, local, r), device, warmup, runs)
        row(f"merging B={b}, R={r}: Triton means + graph, torch components", t_fused, nbytes, useful, ceil)
        print(f"merging reference / fused at B={b}: {t_ref / t_fused:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    versions = f"torch {torch.__version__}, triton {_triton_version()}, Python {platform.python_version()}"
    print(f"# {datetime.date.today()} on {torch.cuda.get_device_name() if gpu else platform.processor() or 'CPU'}; "
          f"{versions}; {torch.get_num_threads()} CPU threads")
    if not gpu:
        print("NO GPU AVAILABLE: timing only the torch references, on the CPU, at reduced sizes "
              "(Triton runs on the CPU only under its interpreter, which is not a performance path).")
    ceil = ceilings(device, args.warmup, args.runs)
    print(f"measured ceilings: {'bf16' if gpu else 'fp32'} matmul {flop_rate(ceil[0])}, "
          f"copy {ceil[1] / 1e9:.1f} GB/s (read + write)")
    print("\n| operation | median ms | MB (compulsory) | GFLOP (useful) | achieved vs ceilings |")
    print("|---|---|---|---|---|")
    if gpu:  # the real sizes
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 path is the exact one
        for b, dtype in ((2, torch.bfloat16), (8, torch.bfloat16), (8, torch.float32)):
            bench_correlation(b, 42, 768, 1536, 21, dtype, device, ceil, args.warmup, args.runs, True)
        for b in (2, 8):
            bench_merging(b, 42, 768, 200, torch.bfloat16, device, ceil, args.warmup, args.runs, True)
    else:  # a quarter of the tokens (21 x 21 grid), full channel widths; fp32, the CPU's fast path
        runs = max(args.runs // 10, 3)
        bench_correlation(2, 21, 768, 1536, 11, torch.float32, device, ceil, 1, runs, False)
        bench_correlation(2, 42, 768, 1536, 21, torch.float32, device, ceil, 1, 5, False)  # full N, B = 2
        bench_merging(2, 42, 768, 200, torch.float32, device, ceil, 1, runs, False)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


if __name__ == "__main__":
    main()
