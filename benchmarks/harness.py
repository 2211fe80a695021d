r"""Side by side, end to end: the research-style CorrCLIP path against our engine paths, same process, same inputs.

On a GPU machine (random weights need no download; --weights official needs the checkpoints cached):
    python benchmarks/harness.py --backbone vit_b --workloads voc,ade,city --points 32,8 \
        --runs 20 --warmup 3 --device cuda --name gpu_vit_b [--engine BUNDLE_DIR] [--batch 8]
Paths: research (benchmarks/research_style.py), torch (corrclip.Segmenter), and with --engine the bundle on
onnxruntime and aoti. Workloads: voc 500x375 (voc21), ade short side 448 (ade20k), city 2048x1024 (crop 224),
synthetic deterministic images; masks from each path's SAM (--points), or --masks synthetic: the same label maps
given to every path (the research code's evaluated path loads precomputed masks; random-weight SAM finds none).
Text embeddings are computed once before timing, as the research code does at start-up. Writes
benchmarks/results/<name>.json, .md (p50/p90 per stage, speedup vs research in the same run) and .png (bars).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from research_style import ResearchStylePath

from corrclip import methods
from corrclip.api import Segmenter
from corrclip.models.build import build_models
from corrclip.presets import Settings
from corrclip.runtime.amg import AmgSettings
from corrclip.runtime.pipeline import STAGES
from corrclip.runtime.preprocess import resized_size, sliding_windows
from corrclip.vocab import Vocabulary, benchmark_vocabulary

RESULTS = Path(__file__).resolve().parent / "results"
BAR_STAGES = (*STAGES, "other")  # "other": wall time outside the named stages
COLOURS = ((78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79), (237, 201, 72),
           (176, 122, 161), (255, 157, 167), (186, 176, 172))


@dataclass(frozen=True)
class Workload:
    height: int
    width: int
    preset: str


WORKLOADS = {
    "voc": Workload(375, 500, "voc21"),
    "ade": Workload(448, 597, "ade20k"),
    "city": Workload(1024, 2048, "city_scapes"),
    "tiny": Workload(96, 128, "voc21"),  # tests and smoke runs
}

# A path: (images, label maps or None) -> (labels per image, seconds per stage summed over the images).
Runner = Callable[[list[np.ndarray], list[np.ndarray] | None], tuple[list[np.ndarray], dict[str, float]]]


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour blobs over a gradient plus a few flat rectangles: structure for SAM, deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = rng.uniform(0, 255, 3) * (yy / h)[..., None] + rng.uniform(0, 255, 3) * (1 - yy / h)[..., None]
    for _ in range(10):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - g) + rng.uniform(0, 255, 3) * g
    for _ in range(4):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        img[y:y + int(rng.integers(h // 10 + 1, h // 3 + 2)), x:x + int(rng.integers(w // 10 + 1, w // 3 + 2))] = \
            rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_label_map(h: int, w: int, regions: int, seed: int) -> np.ndarray:
    """Voronoi cells of `regions` random sites (ids 1..), about 15% of cells left unsegmented (0).

    A stand-in for precomputed masks (the research code's evaluated path loads SAM2 label maps from
    disk), for when SAM with random weights finds no mask at all. Built at 1/4 size, then upsampled.
    """
    rng = np.random.default_rng(seed + 1000)
    sh, sw = max(h // 4, 1), max(w // 4, 1)
    yy, xx = np.mgrid[0:sh, 0:sw]
    best = np.full((sh, sw), np.inf)
    ids = np.zeros((sh, sw), np.int64)
    for k, (py, px) in enumerate(rng.uniform(0, 1, (regions, 2)) * [sh, sw], start=1):
        d = (yy - py) ** 2 + (xx - px) ** 2
        closer = d < best
        best[closer], ids[closer] = d[closer], k
    ids[(rng.random(regions + 1) < 0.15)[ids]] = 0
    rows, cols = np.arange(h) * sh // h, np.arange(w) * sw // w
    return ids[rows[:, None], cols[None, :]]


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def research_runner(path: ResearchStylePath, vocab: Vocabulary, settings: Settings) -> Runner:
    def run(images, label_maps):
        labels, seconds = [], defaultdict(float)
        for i, img in enumerate(images):  # batch 1, as the research code
            out, times = path.segment(img, vocab, settings, None if label_maps is None else label_maps[i])
            labels.append(out)
            for k, v in times.items():
                seconds[k] += v
        return labels, dict(seconds)
    return run


def segmenter_runner(seg: Segmenter, vocab: Vocabulary, settings: Settings) -> Runner:
    def run(images, label_maps):
        out = seg.segment(images, vocab, masks=label_maps, **asdict(settings))
        return [o.labels for o in out], dict(out[0].timings)  # one timer for the whole batch
    return run


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p90 = np.percentile(np.asarray(values) * 1e3, [50, 90])
    return {"p50": round(float(p50), 2), "p90": round(float(p90), 2)}


def measure(run: Runner, images: list[np.ndarray], label_maps: list[np.ndarray] | None, warmup: int, runs: int,
            device: torch.device) -> dict:
    for _ in range(warmup):
        run(images, label_maps)
    totals, stages, detail, labels = [], defaultdict(list), defaultdict(list), []
    for _ in range(runs):
        t0 = _sync(device)
        labels, seconds = run(images, label_maps)
        total = _sync(device) - t0
        totals.append(total)
        named = {k: seconds.get(k, 0.0) for k in STAGES}
        named["other"] = max(total - sum(named.values()), 0.0)
        for k, v in named.items():
            stages[k].append(v)
        for k, v in seconds.items():
            if k not in STAGES:
                detail[k].append(v)  # sub-stages, e.g. masks.sam_encoder
    total = percentiles(totals)
    return {
        "total_ms": total,
        "stages_ms": {k: percentiles(v) for k, v in stages.items()},
        "detail_ms": {k: percentiles(v) for k, v in detail.items()},
        "runs_ms": [round(t * 1e3, 2) for t in totals],
        "images_per_s": round(len(images) / (total["p50"] / 1e3), 4),
        "labels": labels,
    }


def run_config(paths: dict[str, tuple[Runner, bool]], research: ResearchStylePath, segs: dict[str, Segmenter],
               name: str, points: int | None, args, device: torch.device) -> dict:
    """One workload at one SAM setting (points None: synthetic label maps given to every path)."""
    wl = WORKLOADS[name]
    settings = methods.get("corrclip").settings(wl.preset)
    images = [synthetic_image(wl.height, wl.width, seed) for seed in range(args.batch)]
    if points is None:
        given = [synthetic_label_map(wl.height, wl.width, args.regions, seed) for seed in range(args.batch)]
    else:
        research.set_points(points)
        for seg in segs.values():
            if seg.amg is not None:
                seg.amg.points_per_side = points
        # Paths without a mask generator (a bundle exported without SAM) get the research path's label maps.
        lacking = any(not own for _, own in paths.values())
        given = [research.generate_mask(img) for img in images] if lacking else None
    h, w = resized_size(wl.height, wl.width, settings.short_side, settings.long_cap)
    config = {"workload": name, "preset": wl.preset, "image_hw": [wl.height, wl.width], "points_per_side": points,
              "masks": "sam" if points is not None else f"synthetic ({args.regions} cells)", "batch": args.batch,
              "windows_per_image": len(sliding_windows(h, w, settings.crop, settings.stride)), "paths": {}}
    for path_name, (run, own_masks) in paths.items():
        own_masks = own_masks and points is not None
        print(f"  {name} masks={config['masks'] if points is None else points} {path_name} ...", flush=True)
        try:
            result = measure(run, images, None if own_masks else given, args.warmup, args.runs, device)
        except Exception as e:  # noqa: BLE001 - an engine path that cannot run this workload is reported, not fatal
            config["paths"][path_name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        result["masks_given"] = not own_masks
        config["paths"][path_name] = result
        if path_name == "research":
            config["regions_per_image"] = research.last_regions  # SAM label-map ids, "unsegmented" included
    ref = config["paths"].get("research", {})
    for result in config["paths"].values():
        if "error" in result or "total_ms" not in ref:
            continue
        result["speedup_vs_research"] = round(ref["total_ms"]["p50"] / result["total_ms"]["p50"], 3)
        same = [np.mean(a == b) for a, b in zip(result["labels"], ref["labels"])]
        result["agreement_vs_research"] = round(float(np.mean(same)), 6)
    ours = config["paths"].get("torch", {})
    for result in config["paths"].values():  # every path against our exact fp32 reference, same inputs
        if "error" in result or "total_ms" not in ours:
            continue
        result["speedup_vs_torch_fp32"] = round(ours["total_ms"]["p50"] / result["total_ms"]["p50"], 3)
        same = [np.mean(a == b) for a, b in zip(result["labels"], ours["labels"])]
        result["agreement_vs_torch_fp32"] = round(float(np.mean(same)), 6)
    for result in config["paths"].values():
        result.pop("labels", None)
    return config


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---- reports --------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# {report['name']}", "",
             f"{report['date']}, backbone **{a['backbone']}** ({a['weights']} weights), device {a['device']}, "
             f"warm-up {a['warmup']}, runs {a['runs']}, batch {a['batch']}; torch {report['machine']['torch']}.",
             "Times in ms (p50, and p90 for the total); speedup = research-style total p50 / path total p50 "
             "(same run); agreement = share of pixels with the research-style path's labels; vs fp32 = speedup and "
             "label agreement against our exact fp32 torch path.", "",
             "| workload | masks | path | total p50 | total p90 | speedup | img/s | "
             + " | ".join(BAR_STAGES) + " | agreement | vs fp32 |",
             "|" + "---|" * (9 + len(BAR_STAGES))]
    for c in report["results"]:
        for path, r in c["paths"].items():
            masks = f"SAM {c['points_per_side']}x{c['points_per_side']}" if c["points_per_side"] else c["masks"]
            head = f"| {c['workload']} {c['image_hw'][1]}x{c['image_hw'][0]} | {masks} | {path} |"
            if "error" in r:
                lines.append(f"{head} error: {r['error'][:120]} |" + " |" * (5 + len(BAR_STAGES)))
                continue
            stages = " | ".join(f"{r['stages_ms'][k]['p50']:.0f}" for k in BAR_STAGES)
            lines.append(f"{head} {r['total_ms']['p50']:.0f} | {r['total_ms']['p90']:.0f} | "
                         f"{r.get('speedup_vs_research', float('nan')):.2f}x | {r['images_per_s']:.3g} | {stages} | "
                         f"{100 * r.get('agreement_vs_research', float('nan')):.2f}% | "
                         f"{r.get('speedup_vs_torch_fp32', float('nan')):.2f}x, "
                         f"{100 * r.get('agreement_vs_torch_fp32', float('nan')):.2f}% |")
    return "\n".join(lines) + "\n"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = max(span, 1e-9) / ticks
    mag = 10 ** np.floor(np.log10(raw))
    return float(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))


def chart(report: dict, path: Path) -> None:
    """Stacked horizontal bars, one panel per workload x points, one bar per path, one segment per stage."""
    font, bold = _font(13), _font(15)
    width, left, right, bar_h, gap = 1100, 130, 170, 26, 10
    panels = [(c, [(p, r) for p, r in c["paths"].items() if "error" not in r]) for c in report["results"]]
    heights = [60 + len(bars) * (bar_h + gap) + 45 for _, bars in panels]
    legend_h = 60
    img = Image.new("RGB", (width, 40 + sum(heights) + legend_h), "white")
    d = ImageDraw.Draw(img)
    a = report["args"]
    d.text((10, 10), f"{report['name']}: backbone {a['backbone']}, {a['device']}, p50 per stage (ms)", fill="black",
           font=bold)
    y = 40
    for (c, bars), ph in zip(panels, heights):
        masks = f"SAM {c['points_per_side']}x{c['points_per_side']} points" if c["points_per_side"] else \
            f"{c['masks']} label maps given"
        d.text((10, y), f"{c['workload']} {c['image_hw'][1]}x{c['image_hw'][0]} ({c['preset']}), {masks}, "
                        f"{c['windows_per_image']} windows, batch {c['batch']}", fill="black", font=bold)
        top = y + 30
        span = max([sum(r["stages_ms"][k]["p50"] for k in BAR_STAGES) for _, r in bars] + [1.0])
        step = _nice_step(span)
        axis_max = step * np.ceil(span / step)
        scale = (width - left - right) / axis_max
        axis_y = top + len(bars) * (bar_h + gap)
        for i in range(int(round(axis_max / step)) + 1):  # grid and ticks in ms
            x = left + i * step * scale
            d.line([(x, top - 4), (x, axis_y)], fill=(225, 225, 225))
            d.text((x, axis_y + 4), f"{i * step:,.0f}", fill="black", font=font, anchor="ma")
        d.line([(left, axis_y), (width - right, axis_y)], fill="black")
        d.text(((left + width - right) / 2, axis_y + 20), "ms", fill="black", font=font, anchor="ma")
        for j, (name, r) in enumerate(bars):
            by = top + j * (bar_h + gap)
            speed = r.get("speedup_vs_research")
            d.text((left - 8, by + bar_h / 2), name, fill="black", font=font, anchor="rm")
            x = float(left)
            for k, colour in zip(BAR_STAGES, COLOURS):
                seg = r["stages_ms"][k]["p50"] * scale
                if seg > 0:
                    d.rectangle([x, by, x + seg, by + bar_h], fill=colour)
                x += seg
            label = f"{r['total_ms']['p50']:,.0f} ms" + (f"  ({speed:.2f}x)" if speed is not None else "")
            d.text((x + 6, by + bar_h / 2), label, fill="black", font=font, anchor="lm")
        y += ph
    x = 10
    for k, colour in zip(BAR_STAGES, COLOURS):  # legend
        d.rectangle([x, y + 10, x + 14, y + 24], fill=colour)
        d.text((x + 18, y + 17), k, fill="black", font=font, anchor="lm")
        x += 26 + int(d.textlength(k, font=font))
    img.save(path)


# ---- entry ----------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_b")
    p.add_argument("--weights", default="random", help="random (no download) or official")
    p.add_argument("--workloads", default="voc", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--points", default="32,8", help="SAM points per side, comma list")
    p.add_argument("--masks", default="sam", choices=("sam", "synthetic"),
                   help="sam: each path runs its SAM; synthetic: the same Voronoi label maps given to every path")
    p.add_argument("--regions", type=int, default=100, help="cells of the synthetic label maps")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="images per call (our paths batch them; research loops)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32",
                   help="comma list of --precision modes for our torch path (fp32 is 'torch', others 'torch-MODE')")
    p.add_argument("--engine", help="an exported bundle folder: adds its backends as paths")
    p.add_argument("--backends", default="onnxruntime,aoti", help="bundle backends to run with --engine")
    p.add_argument("--name", default=None, help="output file stem (default: <device>_<backbone>)")
    p.add_argument("--out", default=str(RESULTS))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    points = [int(p) for p in args.points.split(",")]
    name = args.name or f"{device.type}_{args.backbone}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"building models ({args.backbone}, {args.weights}) on {device} ...", flush=True)
    research = ResearchStylePath(build_models(args.backbone, args.weights, device=device), device, points[0])
    segs = {}
    for mode in [m.strip() for m in args.precision.split(",") if m.strip()]:
        key = "torch" if mode == "fp32" else f"torch-{mode}"
        segs[key] = Segmenter(args.backbone, args.weights, device=device, precision=mode,
                              amg=AmgSettings(points_per_side=points[0]))
        print(f"  {key}: {segs[key].plan.summary()} ({segs[key].plan.reason})", flush=True)
    errors = {}
    if args.engine:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            try:
                segs[backend] = Segmenter.from_bundle(args.engine, backend, device=device,
                                                      amg=AmgSettings(points_per_side=points[0]))
            except Exception as e:  # noqa: BLE001 - e.g. a backend not installed: report it, time the rest
                errors[backend] = f"{type(e).__name__}: {str(e)[:300]}"
    results = []
    for wl in workloads:
        preset = WORKLOADS[wl].preset
        vocab, settings = benchmark_vocabulary(preset), methods.get("corrclip").settings(preset)
        paths = {"research": (research_runner(research, vocab, settings), True)}
        for key, seg in segs.items():
            paths[key] = (segmenter_runner(seg, vocab, settings), seg.has_mask_generator)
        research.text(vocab)  # once, before timing: the research code embeds its classes at start-up
        for seg in segs.values():
            seg.text_embeddings(vocab)
        for p in points if args.masks == "sam" else [None]:
            config = run_config(paths, research, segs, wl, p, args, device)
            config["paths"].update({k: {"error": v} for k, v in errors.items()})
            results.append(config)
    report = {"name": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/harness.py", *(argv if argv is not None else sys.argv[1:])]),
              "args": vars(args), "machine": machine(), "results": results}
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / f"{name}.md").write_text(table)
    chart(report, out / f"{name}.png")
    print(table)
    print(f"wrote {out / name}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
