"""Times the fused post-processing kernels against their torch references.

  * stitch + classify + vote: a 2048 x 1024 image (Cityscapes geometry: resized to 896 x 448, 21 windows of 224),
    Q = 171 queries, ~200 regions; Triton vs the torch reference (stitch -> classify -> vote).
  * SAM AMG post-processing: 1024 prompts x 3 masks for the same image; Triton vs the torch reference vs
    segment_anything's own SamAutomaticMaskGenerator post-processing, fed the same decoder outputs.

Each timing: warm-up runs, then the median of timed runs (CUDA events on a GPU). Next to it: the bytes and
FLOPs the path must move / compute (a model, stated below) and the achieved rate against this device's
measured ceilings (device-to-device copy bandwidth, fp32 SGEMM rate). Without CUDA the script still runs:
torch reference and library timings on the CPU (Triton's CPU interpreter is a test tool, not timed), at the
real sizes or, for SAM, reduced ones (--prompts, --sam-size).

    python benchmarks/kernels_post.py [--device cuda] [--repeats 10] [--prompts 1024] [--skip-library]
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable

import numpy as np
import torch

from corrclip.kernels.sam_post import sam_postprocess, sam_postprocess_triton
from corrclip.kernels.stitch_vote import stitch_classify_vote, stitch_classify_vote_triton
from corrclip.runtime.preprocess import resized_size, sliding_windows
from corrclip.runtime.timing import median_seconds as bench

BILERP = 9  # FLOPs of one bilinear blend: 6 multiplies, 3 adds




def ceilings(device: torch.device) -> dict[str, float]:
    """Measured: copy bandwidth (bytes/s, read + write) and fp32 matmul rate (FLOP/s, TF32 off)."""
    gpu = device.type == "cuda"
    n = (1 << 28) if gpu else (1 << 25)  # 1 GiB / 128 MiB of fp32
    x = torch.empty(n, device=device)
    y = torch.empty_like(x)
    bw = 2 * 4 * n / bench(lambda: y.copy_(x), device, 3, 10)
    m = 8192 if gpu else 2048
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    flops = 2 * m ** 3 / bench(lambda: a @ b, device, 2, 5)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"bytes/s": bw, "flop/s": flops}


def row(name: str, seconds: float, nbytes: float, flops: float, ceil: dict[str, float], device: torch.device,
        note: str = "") -> str:
    bw, fl = nbytes / seconds, flops / seconds
    rate = (f"{bw / 1e9:8.1f} GB/s ({100 * bw / ceil['bytes/s']:5.1f}%)  {fl / 1e9:8.1f} GFLOP/s "
            f"({100 * fl / ceil['flop/s']:5.1f}%)")
    return (f"| {name} | {device.type} | {seconds * 1e3:10.2f} | {nbytes / 1e9:7.2f} | {flops / 1e9:7.1f} | {rate} "
            f"| {note} |")


# ---- stitch + classify + vote ----------------------------------------------------------------------------------------

def stitch_vote_inputs(device: torch.device, size: tuple[int, int], q: int, n_regions: int, short: int, crop: int,
                       stride: int):
    g = torch.Generator().manual_seed(0)
    h0, w0 = size
    h, w = resized_size(h0, w0, short)
    windows = sliding_windows(h, w, crop, stride)
    ph, pw = windows[0].padded_size
    logits = (0.3 * torch.randn(len(windows), q, ph // 8, pw // 8, generator=g)).to(device)
    query_class = torch.arange(q).to(device)
    # n_regions blocky regions: a coarse grid of ids, id 0 (unsegmented) among them
    gy = int(round((n_regions * h0 / w0) ** 0.5))
    gx = -(-n_regions // gy)
    coarse = (torch.randperm(gy * gx, generator=g) % n_regions).view(gy, gx)  # every id present
    regions = coarse[torch.arange(h0) * gy // h0][:, torch.arange(w0) * gx // w0].to(device)
    return (logits, windows, (h, w), (h0, w0), query_class, q, 40.0, 0.0, regions, n_regions)


def stitch_vote_model(args) -> dict[str, tuple[float, float]]:
    """(bytes, FLOPs) per path. Triton: window logits once, the fp32 canvas written and read once, regions read
    twice, labels written twice; bilinear blends for the canvas (per covering window) and the output, plus
    scale, subtract, exp, add, compare per query and output pixel. Reference: about 13 passes over
    Q x H0 x W0 fp32 (resize write; scale r+w; softmax 2r+w; scatter_reduce r + int64 index + zero-fill + w;
    argmax r; amax r) plus the same FLOPs."""
    logits, windows, (h, w), (h0, w0), _, q, *_ = args
    cover = sum((win.y2 - win.y1) * (win.x2 - win.x1) for win in windows) / (h * w)
    canvas = q * h * w * 4
    flops = q * h * w * (cover * (BILERP + 1) + 1) + q * h0 * w0 * (BILERP + 5)
    fused = logits.numel() * 4 + 2 * canvas + h0 * w0 * (2 * 8 + 2 * 8)
    full = q * h0 * w0 * 4
    reference = logits.numel() * 4 + 3 * cover * canvas + 13 * full
    return {"triton": (fused, flops), "torch": (reference, flops)}


# ---- SAM post-processing ---------------------------------------------------------------------------------------------

AMG = dict(pred_iou_thresh=0.7, stability_score_thresh=0.7, stability_score_offset=1.0, box_nms_thresh=0.7)


def sam_inputs(device: torch.device, n: int, size: tuple[int, int]):
    """Decoder-like outputs: per prompt 3 nested discs (logit = radius - distance + noise, in low-res pixels)
    inside the image part of the 256 x 256 frame; predicted IoUs uniform in [0, 1]."""
    from segment_anything.utils.transforms import ResizeLongestSide

    g = torch.Generator().manual_seed(0)
    ih, iw = ResizeLongestSide.get_preprocess_shape(size[0], size[1], 1024)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    low = torch.empty(n, 3, 256, 256)
    c = torch.rand(n, 1, 2, generator=g) * torch.tensor([ih / 4, iw / 4])
    r = torch.sort(4 + torch.rand(n, 3, generator=g) * 40, dim=1).values
    for s in range(0, n, 64):  # in slices: bounded memory
        d = ((yy - c[s:s + 64, :, 0, None, None]) ** 2 + (xx - c[s:s + 64, :, 1, None, None]) ** 2).sqrt()
        low[s:s + 64] = r[s:s + 64, :, None, None] - d + 0.5 * torch.randn(d.shape, generator=g)
    return low.to(device), torch.rand(n, 3, generator=g).to(device), (ih, iw)


def library_runner(low: torch.Tensor, iou: torch.Tensor, size: tuple[int, int], device: torch.device
                   ) -> Callable[[], list]:
    """segment_anything's generator (crop_n_layers=0, binary masks) on a tiny SAM whose image encoder and mask
    decoder are replaced by the precomputed outputs: what remains is the library's post-processing."""
    from segment_anything import SamAutomaticMaskGenerator

    from corrclip.models.sam import build_sam

    sam = build_sam("tiny", "random", device=device)
    n = low.shape[0]
    side = int(round(n ** 0.5))
    assert side * side == n, "the library's grid has points_per_side ** 2 prompts"
    sam.image_encoder.forward = lambda x: torch.zeros(1, 32, 64, 64, device=device)
    state = {"next": 0}

    def decoder(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output):
        k = sparse_prompt_embeddings.shape[0]
        s = state["next"] % n
        state["next"] = s + k
        return low[s:s + k], iou[s:s + k]

    sam.mask_decoder.forward = decoder
    gen = SamAutomaticMaskGenerator(sam, points_per_side=side, points_per_batch=64, output_mode="binary_mask", **AMG)
    image = np.zeros((*size, 3), np.uint8)
    return lambda: gen.generate(image)


def sam_model(low, iou, input_size, size, kept) -> dict[str, tuple[float, float]]:
    """(bytes, FLOPs) per path, for the candidates passing the IoU filter. An output pixel is 4 intermediate
    bilinear blends plus 1 (5 x 9 FLOPs) and 3 compares. Triton: each candidate's 256 x 256 plane read once for
    the stats, each kept one again for the label map (written once, int32); FLOPs over all candidates' pixels
    plus the kept masks' box areas. Torch: per candidate the 1024 x 1024 intermediate written and its crop
    read, the H0 x W0 logits written and read 3 times (2 stability compares, threshold), 3 bool maps written,
    4 bool passes for the box; then the kept masks read once for the label map. The library: the same, but
    every mask is upsampled (its IoU filter comes after), and its RLE work runs on the CPU (not counted)."""
    n_cand = int((iou.flatten() > AMG["pred_iou_thresh"]).sum())
    (ih, iw), (h0, w0) = input_size, size
    px, plane = h0 * w0, 256 * 256 * 4
    box_px = float(((kept.boxes[:, 2:] - kept.boxes[:, :2] + 1).prod(1)).sum()) if len(kept.keep) else 0.0
    flops = (n_cand * px + box_px) * (5 * BILERP + 3)
    fused = (n_cand + len(kept.keep)) * plane + 4 * px
    per_mask = plane + 1024 * 1024 * 4 + ih * iw * 4 + px * (4 + 3 * 4 + 3 + 4)
    torch_bytes = n_cand * per_mask + len(kept.keep) * px + 4 * px
    # the library upsamples every mask before its IoU filter
    library = low.shape[0] * 3 * (plane + 1024 * 1024 * 4 + ih * iw * 4 + px * 4) + n_cand * px * (3 * 4 + 3 + 4)
    return {"triton": (fused, flops), "torch": (torch_bytes, flops), "library": (library, flops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=None, help="SAM prompts (a square); default 1024, 64 on CPU")
    ap.add_argument("--sam-size", type=int, nargs=2, default=None, help="SAM image H W; default 1024 2048")
    ap.add_argument("--skip-library", action="store_true")
    ap.add_argument("--skip-stitch", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    warmup = a.warmup if a.warmup is not None else (3 if gpu else 1)
    repeats = a.repeats if a.repeats is not None else (20 if gpu else 3)
    prompts = a.prompts or (1024 if gpu else 64)
    sam_size = tuple(a.sam_size or (1024, 2048))

    import segment_anything  # noqa: F401

    try:
        import triton
        tri = triton.__version__
    except ImportError:
        tri = "absent"
    print(f"# {datetime.date.today()}  torch {torch.__version__}  triton {tri}  device: "
          + (torch.cuda.get_device_name(dev) if gpu else "CPU only, no GPU available: Triton paths not timed"))
    print(f"# threads {torch.get_num_threads()}  warm-up {warmup}  median of {repeats}")
    ceil = ceilings(dev)
    print(f"# measured ceilings: copy {ceil['bytes/s'] / 1e9:.1f} GB/s, fp32 matmul {ceil['flop/s'] / 1e9:.1f} GFLOP/s")
    print("| path | device | median ms | GB (model) | GFLOP | achieved vs ceilings | note |")
    print("|---|---|---|---|---|---|---|")

    if not a.skip_stitch:
        run_stitch_vote(dev, ceil, warmup, repeats)
    run_sam(dev, ceil, warmup, repeats, prompts, sam_size, a.skip_library)


def run_stitch_vote(dev: torch.device, ceil: dict[str, float], warmup: int, repeats: int) -> None:
    gpu = dev.type == "cuda"
    args = stitch_vote_inputs(dev, (1024, 2048), 171, 200, short=448, crop=224, stride=112)
    model = stitch_vote_model(args)
    what = f"stitch+classify+vote 2048x1024, {len(args[1])} windows, Q=171, 200 regions"
    t = bench(lambda: stitch_classify_vote(*args), dev, warmup, repeats)
    print(row(f"{what}: torch reference", t, *model["torch"], ceil, dev))
    if gpu:
        ref = stitch_classify_vote(*args)
        out = stitch_classify_vote_triton(*args)
        tt = bench(lambda: stitch_classify_vote_triton(*args), dev, warmup, repeats)
        note = f"speed-up {t / tt:.1f}x; {(out != ref).float().mean().item():.1e} of pixels differ"
        print(row(f"{what}: Triton", tt, *model["triton"], ceil, dev, note))


def run_sam(dev: torch.device, ceil: dict[str, float], warmup: int, repeats: int, prompts: int,
            sam_size: tuple[int, int], skip_library: bool) -> None:
    gpu = dev.type == "cuda"
    low, iou, input_size = sam_inputs(dev, prompts, sam_size)
    post = (input_size, sam_size, AMG["pred_iou_thresh"], AMG["stability_score_thresh"],
            AMG["stability_score_offset"], 0.0, AMG["box_nms_thresh"])
    kept = sam_postprocess(low, iou, *post)
    model = sam_model(low, iou, input_size, sam_size, kept)
    what = f"SAM post {prompts}x3 masks -> {sam_size[1]}x{sam_size[0]}, {len(kept.keep)} kept"
    t = bench(lambda: sam_postprocess(low, iou, *post), dev, warmup, repeats)
    print(row(f"{what}: torch reference", t, *model["torch"], ceil, dev))
    if not skip_library:
        run = library_runner(low, iou, sam_size, dev)
        assert len(run()) == len(kept.keep), "the library kept a different number of masks"
        t_lib = bench(run, dev, min(warmup, 1), max(1, min(repeats, 3)))
        note = f"includes its RLE round trip on the CPU; the reference is {t_lib / t:.1f}x faster"
        print(row(f"{what}: segment_anything generator", t_lib, *model["library"], ceil, dev, note))
    if gpu:
        out = sam_postprocess_triton(low, iou, *post)
        tt = bench(lambda: sam_postprocess_triton(low, iou, *post), dev, warmup, repeats)
        note = (f"speed-up {t / tt:.1f}x; same kept masks: {torch.equal(out.keep, kept.keep)}; "
                f"{(out.label_map != kept.label_map).float().mean().item():.1e} of pixels differ")
        print(row(f"{what}: Triton", tt, *model["triton"], ceil, dev, note))


if __name__ == "__main__":
    main()
