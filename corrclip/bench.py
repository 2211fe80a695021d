"""`corrclip bench`: per-stage latency, throughput, memory, FLOPs and the floors they imply.

Stage times come from the pipeline's StageTimer: CUDA events read after one synchronize on a GPU,
host clocks on the CPU. FLOPs are COUNTED with torch's FlopCounterMode on one extra run (torch
backend only; exported graphs run outside torch). Bytes are a lower bound computed analytically:
the weights each stage must read once per call (activations not included). Floors use this
machine's matrix rate and copy bandwidth, measured at start-up by two small microbenchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .cli_args import add_model_args
from .runtime.timing import median_seconds

STAGE_ORDER = ("masks", "masks.sam_encoder", "masks.prompt_decoding", "masks.mask_postprocess", "preprocess", "text",
               "dino", "regions", "clip_trunk", "corr_head", "clip_dense", "stitch_vote")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure per-stage latency, throughput and memory",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="examples:\n"
               "  corrclip bench --backbone vit_b --weights random --synthetic 1 --size 500x375 --preset voc21\n"
               "  corrclip bench --engine bundles/vit_b --backend onnxruntime --images a.jpg --json out.json\n"
               "  corrclip bench --backbone tiny --runs 20 --points-per-side 8 --classes 150")
    add_model_args(p, weights_default="random")  # timing does not depend on weight values
    inp = p.add_mutually_exclusive_group()
    inp.add_argument("--images", nargs="+", type=Path, help="image files")
    inp.add_argument("--synthetic", type=int, default=1, help="N synthetic images (default 1)")
    p.add_argument("--size", default="500x375", help="WxH of synthetic images (default 500x375, VOC-like)")
    p.add_argument("--batch", type=int, default=1, help="images per call (throughput)")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--preset", default=None, help="benchmark classes and settings (e.g. voc21, ade20k)")
    vocab.add_argument("--classes", type=int, default=None, help="K synthetic class names")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-flops", action="store_true", help="skip the extra FLOP-counting run")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.set_defaults(run=run)


def synthetic_image(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth colour blobs: structure SAM and the encoders treat like a photo, unlike white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * max(h, w)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 255, 3)
    img = img / img.max() * 255
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def device_ceilings(device: torch.device) -> dict[str, float]:
    """Matrix rate (FLOP/s, fp32 on CPU, bf16 on CUDA) and copy bandwidth (bytes/s), measured."""
    n = 2048 if device.type == "cuda" else 768
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.empty(64 * 2**20 // 4, device=device)
    y = torch.empty_like(x)

    mm = median_seconds(lambda: [a @ b for _ in range(4 if device.type == "cuda" else 1)], device, 1, 5)
    cp = median_seconds(lambda: y.copy_(x), device, 1, 5)
    return {"matmul_flops": (4 if device.type == "cuda" else 1) * 2 * n**3 / mm, "copy_bytes": 2 * x.numel() * 4 / cp,
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def weight_bytes(seg) -> dict[str, int]:
    """Weights each stage reads once per call (a lower bound on its bytes moved); torch modules only."""
    return {stage: sum(t.numel() * t.element_size() for t in mod.parameters())
            for stage, mod in seg.stages.items() if isinstance(mod, torch.nn.Module)}


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def run(args: argparse.Namespace) -> int:
    from .cli_args import UsageError, build_segmenter
    from .engine.bundle import BundleError
    from .models.checkpoints import WeightsError
    from .runtime.image_io import decode_image
    from .vocab import BENCHMARKS, Vocabulary, benchmark_vocabulary

    try:
        seg = build_segmenter(args)
    except (UsageError, WeightsError, BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if seg.needs_masks:  # bench has no --masks: the region masks must come from SAM
        print(f"error: {seg.method} needs region masks and bench makes them with SAM: drop --sam none "
              "(e.g. --points-per-side 8 for a cheaper grid)", file=sys.stderr)
        return 2
    device, backend = seg.device, seg.backend
    if args.images:
        images = [decode_image(p) for p in args.images]
    else:
        w, h = (int(v) for v in args.size.lower().split("x"))
        images = [synthetic_image(w, h, i) for i in range(args.synthetic)]
    if args.classes:
        names = [n for n in benchmark_vocabulary("coco_stuff").names] + [f"thing {i}" for i in range(args.classes)]
        vocab = Vocabulary(tuple((n,) for n in names[: args.classes]))
    else:
        vocab = benchmark_vocabulary(args.preset or "voc21")
    settings = seg.settings_for(args.preset if args.preset in BENCHMARKS else None)
    batches = [images[i: i + args.batch] for i in range(0, len(images), args.batch)]

    def call(batch, count_flops=False):
        with torch.inference_mode():
            return seg.run(batch, vocab, settings, count_flops=count_flops)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # One-off compile time (--compile: timings "compile.<stage>", already taken out of the stage entries),
    # summed over every call, warm-up included: reported apart from the steady-state percentiles.
    compile_s: dict[str, float] = {}

    def set_aside(timings: dict[str, float]) -> dict[str, float]:
        for k in [k for k in timings if k.startswith("compile.")]:
            compile_s[k.removeprefix("compile.")] = compile_s.get(k.removeprefix("compile."), 0.0) + timings.pop(k)
        return timings

    for i in range(args.warmup):
        set_aside(call(batches[i % len(batches)])[0].timings)
    stage_runs: dict[str, list[float]] = {}
    walls = []
    for i in range(args.runs):
        batch = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = call(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        for k, v in set_aside(res[0].timings).items():
            stage_runs.setdefault(k, []).append(v)
    flops = {}
    if not args.no_flops and backend == "torch":
        flops = call(batches[0], count_flops=True)[0].flops or {}
    ceilings = device_ceilings(device)
    wbytes = weight_bytes(seg) if backend == "torch" else {}
    stages = {}
    for k in sorted(stage_runs, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99):
        entry = percentiles(stage_runs[k])
        if k in flops:
            entry["gflop"] = flops[k] / 1e9
            entry["floor_ms_compute"] = 1000 * flops[k] / ceilings["matmul_flops"]
        if k in wbytes:
            entry["weight_mb"] = wbytes[k] / 1e6
            entry["floor_ms_bytes"] = 1000 * wbytes[k] / ceilings["copy_bytes"]
        stages[k] = entry
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": backend, "method": seg.method, "engine": str(args.engine) if args.engine else None,
        "backbone": seg.backbone.name, "weights": seg.identity, "precision": seg.plan.describe(),
        "compiled": seg.compiled, "compile_s": compile_s,
        "batch": args.batch, "image_sizes": [
            list(im.shape[:2]) for im in images], "queries": vocab.num_queries, "classes": vocab.num_classes,
        "points_per_side": seg.amg.points_per_side if seg.amg is not None else None, "warmup": args.warmup,
        "runs": args.runs, "amg": dataclasses.asdict(seg.amg) if seg.amg is not None else None,
        # masks left after each step of the last run (e.g. how many prompts' masks were upscaled)
        "amg_counts": getattr(seg.pipeline.mask_generator, "last_counts", None),
        "stages_ms": stages, "total_ms": percentiles(walls), "images_per_s": args.batch / float(np.median(walls)),
        "peak_host_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "ceilings": ceilings, "flops_source": "counted (torch FlopCounterMode)" if flops else None,
        "bytes_source": "analytic lower bound: weights read once per call" if wbytes else None,
        "torch": torch.__version__,
    }
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def print_report(r: dict) -> None:
    sam = f"{r['points_per_side']}x{r['points_per_side']} SAM points" if r["points_per_side"] else "no SAM"
    if r.get("amg"):
        sam += f" ({r['amg']['decoder']} decoder)"
    print(f"\n{r['backbone']} / {r['method']} / {r['backend']} on {r['device']}: batch {r['batch']}, "
          f"{r['queries']} queries, {sam}, {r['runs']} runs")
    p = r["precision"]
    print(f"precision {p['requested']} -> {p['resolved']} ({p['reason']})")
    if r.get("compile_s"):
        print("compiled (torch.compile); compile time apart from the times below: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()))
    print(f"{'stage':<24}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'GFLOP':>10}{'floor ms':>10}")
    for k, v in r["stages_ms"].items():
        floor = max(v.get("floor_ms_compute", 0.0), v.get("floor_ms_bytes", 0.0))
        gflop = f"{v['gflop']:10.1f}" if "gflop" in v else f"{'':>10}"
        fl = f"{floor:10.1f}" if floor else f"{'':>10}"
        print(f"{k:<24}{v['p50']:10.1f}{v['p90']:10.1f}{v['p99']:10.1f}{gflop}{fl}")
    t = r["total_ms"]
    print(f"{'total (wall)':<24}{t['p50']:10.1f}{t['p90']:10.1f}{t['p99']:10.1f}")
    mem = f", peak device {r['peak_device_mb']:.0f} MB" if r["peak_device_mb"] is not None else ""
    print(f"{r['images_per_s']:.2f} images/s, peak host {r['peak_host_mb']:.0f} MB{mem}; ceilings: "
          f"{r['ceilings']['matmul_flops'] / 1e9:.0f} GFLOP/s ({r['ceilings']['matmul_dtype']}), "
          f"{r['ceilings']['copy_bytes'] / 1e9:.1f} GB/s")
