"""SAM prompt decoding side by side: segment_anything's MaskDecoder ("reference", once per prompt) and the
shared-image decoder ("shared", models/sam_shared_decoder.py), in one process, on one image embedding.

Reports, for the AMG's point grid:
  - counted FLOPs (torch FlopCounterMode) of mask generation, per decoder stage, for both decoders;
  - wall time of prompt decoding for both (same embedding, alternating runs, median);
  - the lazy-upscaling saving of the shared decoder with the predicted-IoU filter on (default thresholds),
    against the same decoder with the filters off (where every prompt's masks are upscaled).
Random weights: timing and FLOPs do not depend on weight values, but the IoU predictions do: with random
weights no mask passes the 0.7 IoU filter, so the lazy saving measured here is its upper bound.

    python benchmarks/sam_decoder.py --backbone vit_b --points-per-side 32 --json benchmarks/results/sam_decoder.json
    python benchmarks/sam_decoder.py --backbone tiny --points-per-side 8 --no-timing
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from corrclip.bench import synthetic_image
from corrclip.models.sam import build_sam
from corrclip.runtime.amg import AmgSettings, MaskGenerator

FILTERS_OFF = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.0)
# the reference decoder's stages: module names under SamDecoder.mask_decoder
REFERENCE_STAGES = {"block 1": "transformer.layers.0", "block 2": "transformer.layers.1",
                    "final attention": "transformer.final_attn_token_to_image",
                    "upscaling conv 1": "output_upscaling.0", "upscaling conv 2": "output_upscaling.3"}
# the shared decoder's stages: SharedDecoder methods
SHARED_STAGES = {"image terms (once)": "image_terms", "block 1": "_block1", "block 2": "_block2",
                 "block 2 norm4": "_block2_norm", "final attention": "_final_attention",
                 "upscaling + masks": "prompt_masks"}


def count_reference(gen: MaskGenerator, image) -> dict[str, float]:
    with FlopCounterMode(display=False, depth=None) as fc:
        gen.label_map(image)
    by_module = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    root = "SamDecoder.mask_decoder"
    out = {name: by_module.get(f"{root}.{m}", 0) for name, m in REFERENCE_STAGES.items()}
    out["heads, hypernetwork product, prompts"] = by_module.get("SamDecoder", 0) - sum(out.values())
    out["SAM encoder"] = by_module.get("SamEncoder", 0)
    out["total mask generation"] = fc.get_total_flops()
    return out


def count_shared(gen: MaskGenerator, image) -> dict[str, float]:
    counts: dict[str, float] = defaultdict(float)
    stages = gen.shared

    def counted(fn, name):
        def run(*a, **k):
            with FlopCounterMode(display=False) as fc:
                out = fn(*a, **k)
            counts[name] += fc.get_total_flops()
            return out
        return run

    decoders = {id(m.dec): m.dec for m in (stages.image_terms, stages.prompt_tokens, stages.prompt_masks)}
    for dec in decoders.values():
        for name, method in SHARED_STAGES.items():
            setattr(dec, method, counted(getattr(dec, method), name))
    with FlopCounterMode(display=False, depth=None) as fc:
        gen.label_map(image)
    for dec in decoders.values():
        for method in SHARED_STAGES.values():
            delattr(dec, method)  # back to the class's methods
    prompt_tokens = sum(sum(v.values()) for k, v in fc.get_flop_counts().items() if k == "SamPromptTokens")
    out = dict(counts)
    out["heads, hypernetworks, prompts"] = prompt_tokens - sum(v for k, v in counts.items()
                                                               if SHARED_STAGES[k].startswith("_"))
    out["SAM encoder"] = sum(fc.get_flop_counts().get("SamEncoder", {}).values())
    out["total mask generation"] = fc.get_total_flops()
    return out


def decode_seconds(gen: MaskGenerator, image) -> float:
    gen._decode(image)
    return gen.last_timings["prompt_decoding"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=256)
    p.add_argument("--size", default="500x375", help="WxH of the synthetic image (default VOC-like 500x375)")
    p.add_argument("--runs", type=int, default=1, help="timed runs per decoder (alternating; median)")
    p.add_argument("--no-timing", action="store_true", help="count FLOPs only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sam = build_sam(args.backbone, "random")
    w, h = (int(v) for v in args.size.lower().split("x"))
    image = synthetic_image(w, h, 0)
    base = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch)
    gens = {(d, f): MaskGenerator.from_sam(sam, AmgSettings(decoder=d, **base, **(FILTERS_OFF if f == "off" else {})))
            for d in ("reference", "shared") for f in ("off", "on")}
    report: dict = {"backbone": args.backbone, "weights": "random", "points": args.points_per_side ** 2,
                    "image": [h, w], "cpu": _cpu(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        report["flops_filters_off"] = {"reference": count_reference(gens["reference", "off"], image),
                                       "shared": count_shared(gens["shared", "off"], image)}
        on = count_shared(gens["shared", "on"], image)
        report["flops_filters_on_shared"] = on | {"upscaled prompts": gens["shared", "on"].last_counts["upscaled"] // 3}
        _print_flops(report)
        if not args.no_timing:
            emb = gens["shared", "off"].encoder(_preprocessed(gens["shared", "off"], image))
            for gen in gens.values():  # one encoder run for all: only prompt decoding is timed
                gen.encoder = lambda x, e=emb: e
            times = defaultdict(list)
            for key in (("shared", "off"), ("shared", "on")):  # warm-up (the reference's minutes need none)
                decode_seconds(gens[key], image)
            for _ in range(args.runs):
                for key in (("reference", "off"), ("shared", "off"), ("shared", "on")):
                    times[key].append(decode_seconds(gens[key], image))
                    print(f"  {key[0]:>9} decoder, filters {key[1]:>3}: {times[key][-1]:8.2f} s", flush=True)
            med = {f"{d}, filters {f}": statistics.median(v) for (d, f), v in times.items()}
            report["prompt_decoding_s"] = med
            report["speedup_filters_off"] = med["reference, filters off"] / med["shared, filters off"]
            report["lazy_saving_s"] = med["shared, filters off"] - med["shared, filters on"]
            report["upscaled_prompts_filters_on"] = gens["shared", "on"].last_counts["upscaled"] // 3
            print(f"prompt decoding, {report['points']} prompts: reference {med['reference, filters off']:.2f} s, "
                  f"shared {med['shared, filters off']:.2f} s ({report['speedup_filters_off']:.2f}x); shared with "
                  f"filters on {med['shared, filters on']:.2f} s ({report['upscaled_prompts_filters_on']} prompts "
                  "upscaled)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _preprocessed(gen: MaskGenerator, image):
    from corrclip.models.sam import preprocess_image

    return preprocess_image(image, gen.img_size, gen.pixel_mean, gen.pixel_std)[0]


def _print_flops(r: dict) -> None:
    n = r["points"]
    not_per_prompt = ("SAM encoder", "total mask generation", "image terms (once)", "upscaled prompts")
    print(f"\n{r['backbone']} (random weights), {n} prompts: counted GFLOP (FlopCounterMode), total and per prompt")
    for title, table in (("filters off, reference decoder", r["flops_filters_off"]["reference"]),
                         ("filters off, shared decoder", r["flops_filters_off"]["shared"]),
                         ("filters on, shared decoder", r["flops_filters_on_shared"])):
        print(f"  {title}")
        for k, v in table.items():
            if k == "upscaled prompts":
                print(f"    {k:<38}{v:10d}")
                continue
            per = "" if k in not_per_prompt else f"{v / n / 1e9:10.3f}"
            print(f"    {k:<38}{v / 1e9:10.1f}{per}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
