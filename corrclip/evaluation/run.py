"""`corrclip eval`: mIoU of one benchmark, as the research code measures it.

Reads the benchmark in its mmseg layout (datasets.py), segments every image with the preset's
classes and settings, writes OUT/predictions/<id>.png as it goes (atomically: a killed run
resumes where it stopped), and computes mmseg's IoUMetric (metric.py) from the predictions and the
ground truth. Images whose prediction is already saved are not segmented again: their areas are
recomputed from the saved PNG, so a resumed run gives exactly the metric of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from ..cli_args import add_model_args
from ..distributed import add_ray_args
from .datasets import LAYOUTS

# Flags that do not change any prediction (so a resume may differ in them).
RUN_ONLY = {"command", "out", "data_root", "limit", "ray", "workers", "device", "cache_dir", "no_cache"}
MASK_SUFFIXES = (".npz", ".png", ".npy")

EXAMPLES = """\
examples:
  corrclip eval --preset voc21 --data-root data/VOCdevkit/VOC2012 --out runs/voc21
  corrclip eval --preset voc21 --data-root data --masks data/region_masks/voc --out runs/voc21_sam2
  corrclip eval --preset ade20k --data-root data --limit 50 --points-per-side 8 --out runs/ade_quick
  corrclip eval --preset coco_object --data-root data --out runs/obj --ray          # local Ray, 1 replica/GPU
  corrclip eval --preset city_scapes --data-root /shared/data --out /shared/runs/city --ray auto

layouts under --data-root (the dataset folder itself, or a folder above it):
  voc21, voc20        VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt}
  context60/59        VOC2010/{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt}
  coco_stuff          coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png}
  coco_object         coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_instanceTrainIds.png}
  city_scapes         cityscapes/{leftImg8bit/val/*/*_leftImg8bit.png, gtFine/val/*/*_gtFine_labelTrainIds.png}
  ade20k              ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="mIoU on a benchmark (mmseg's layouts and IoUMetric)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Segment a benchmark's images with its preset (classes and settings) and compute mIoU,\n"
            "mAcc and aAcc exactly as mmseg's IoUMetric does (255 ignored, areas summed over the set).\n\n"
            "Writes OUT/metrics.json, OUT/metrics.md and OUT/predictions/<image id>.png (class\n"
            "indices). Run the same command again after an interruption: saved predictions are kept\n"
            "and the metric is the same as an uninterrupted run's. The published number for the same\n"
            "method and backbone is printed beside ours, with the settings in which the runs differ."),
        epilog=EXAMPLES)
    p.add_argument("--preset", required=True, choices=list(LAYOUTS), help="the benchmark (classes, settings, layout)")
    p.add_argument("--data-root", required=True, type=Path, help="the dataset folder, or a folder above it")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; reused to resume)")
    p.add_argument("--split", default="val", help="val (default) or train; ADE's validation/training and "
                   "COCO's val2017/train2017 folders are found from these names")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (mmseg's order)")
    p.add_argument("--masks", type=Path, help="folder of precomputed region maps, one per image: STEM.npz (key "
                   "instance_mask, as the research code's region_masks/<dataset>/), STEM.png or STEM.npy; "
                   "SAM is then not built")
    p.add_argument("--prob-thd", type=float, default=None, help="override the preset's probability threshold")
    add_model_args(p)
    add_ray_args(p)
    p.set_defaults(run=run)


def _fail(msg: object) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..distributed import RayMissing, RayRunError, ray_info, require_ray, run_ray
    from ..engine.bundle import BundleError
    from ..jobs import Job, Worker, needs_masks, run_local
    from ..models.checkpoints import WeightsError
    from ..outputs import OutputError, claim_output_folder, record_in_run_file, run_config
    from ..vocab import benchmark_vocabulary
    from .datasets import DatasetError, open_dataset
    from .metric import summarize

    started = time.perf_counter()
    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit must be at least 1, got {args.limit}")
    try:
        if args.ray:
            require_ray()
    except RayMissing as e:
        return _fail(e)
    try:
        dataset = open_dataset(args.preset, args.data_root, args.split)
        samples = dataset.samples[: args.limit] if args.limit else dataset.samples
        masks = _mask_files(args.masks, samples) if args.masks else [None] * len(samples)
    except DatasetError as e:
        return _fail(e)
    if not args.masks and needs_masks(args):
        return _fail("--sam none needs --masks DIR (a region map per image), or drop --sam none")
    vocab = benchmark_vocabulary(args.preset)
    layout = dataset.layout
    if vocab.num_classes != layout.num_classes:
        return _fail(f"{args.preset}: the class file has {vocab.num_classes} classes, the dataset {layout.num_classes}")
    overrides = {"prob_thd": args.prob_thd} if args.prob_thd is not None else {}
    pred_dir = args.out / "predictions"
    try:
        started_before = pred_dir.is_dir() and next(pred_dir.rglob("*.png"), None) is not None
        claim_output_folder(args.out, run_config(args, RUN_ONLY), "predictions", started_before)
    except OutputError as e:
        return _fail(e)
    tasks, done = [], []
    for sample, mask in zip(samples, masks, strict=True):
        pred = pred_dir / f"{sample.id}.png"
        if pred.is_file():
            done.append((sample, pred))
        else:
            tasks.append({"id": sample.id, "image": str(sample.image), "label": str(sample.label),
                          "masks": str(mask) if mask else "", "pred": str(pred)})
    job = Job(args, vocab, args.preset, _read, partial(_write, reduce=layout.reduce_zero_label,
                                                       num_classes=layout.num_classes), overrides,
              masks_given=args.masks is not None)

    try:
        worker = Worker(job, warn=True) if tasks and not args.ray else None  # before the bar, so warnings come first
    except (WeightsError, BundleError, ValueError) as e:
        return _fail(e)
    total = np.zeros((4, layout.num_classes), np.int64)
    bar = None
    try:
        # Resumed images count from their saved predictions and labels, exactly as new ones do.
        for sample, pred in tqdm(done, desc="re-reading saved predictions", unit="img", disable=len(done) < 100):
            total += _areas(pred, sample.label, layout.reduce_zero_label, layout.num_classes)
        bar = tqdm(total=len(samples), initial=len(done), desc=f"eval {args.preset}", unit="img", dynamic_ncols=True)
        meta = None
        if tasks:
            results = run_ray(job, tasks, args.ray, args.workers) if args.ray else run_local(job, tasks, worker)
            for result, meta in results:
                if "error" in result:
                    return _fail(f"{result['error']} ({bar.n} predictions are kept in {pred_dir}; fix this and run "
                                 "the same command again to continue)")
                if bar.n == len(done):
                    record_in_run_file(args.out, meta=meta)
                total += np.asarray(result["areas"], np.int64)
                bar.update()
        else:
            meta = json.loads((args.out / "run.json").read_text()).get("meta") or Worker(job).meta
    except (DatasetError, WeightsError, BundleError, RayMissing, RayRunError, ValueError) as e:
        return _fail(e)
    finally:
        if bar is not None:
            bar.close()

    metrics = summarize(total, list(vocab.names))
    report = _report(args, dataset, len(samples), metrics, meta, time.perf_counter() - started, len(done))
    if args.ray:
        report["ray"] = ray_info()
    _write_reports(args.out, report)
    _print(report, args.out)
    return 0


def _mask_files(folder: Path, samples) -> list[Path]:
    """Each image's region map in folder (research layout: region_masks/<dataset>/<image stem>.npz)."""
    if not folder.is_dir():
        from .datasets import DatasetError

        raise DatasetError(f"{folder}: --masks folder not found")
    found, missing = [], []
    for s in samples:
        stem = s.image.name[: -len(s.image.suffix)] if s.image.suffix else s.image.name
        cands = [folder / f"{name}{ext}" for name in (stem, s.id) for ext in MASK_SUFFIXES]
        hit = next((c for c in cands if c.is_file()), None)
        found.append(hit)
        if hit is None:
            missing.append(cands[0])
    if missing:
        from .datasets import DatasetError

        raise DatasetError(f"{missing[0]}: region map not found ({len(missing)} of {len(samples)} images have none "
                           f"in {folder}; give one per image as STEM.npz, STEM.png or STEM.npy)")
    return found


def _read(task: dict) -> tuple[np.ndarray, np.ndarray | None]:
    from ..runtime.image_io import decode_image, load_label_map

    image = decode_image(task["image"])
    masks = load_label_map(task["masks"], image.shape[:2]) if task["masks"] else None
    return image, masks


def _areas(pred, label_path, reduce: bool, num_classes: int, image_name: str | None = None) -> np.ndarray:
    """One image's [4, C] areas; pred is the label array or its saved PNG."""
    from PIL import Image

    from .datasets import DatasetError, load_ground_truth
    from .metric import image_areas

    if isinstance(pred, Path):
        with Image.open(pred) as im:
            pred = np.asarray(im)
    gt = load_ground_truth(label_path, reduce)
    if gt.shape != pred.shape:
        what = f"the image {image_name}" if image_name else "its prediction"
        raise DatasetError(f"{label_path}: label map is {gt.shape[0]}x{gt.shape[1]} but {what} is "
                           f"{pred.shape[0]}x{pred.shape[1]} (HxW); the dataset's images and labels must match")
    return image_areas(pred, gt, num_classes)


def _write(task: dict, image, labels: np.ndarray, timings: dict, meta: dict, *, reduce: bool,
           num_classes: int) -> dict:
    from ..outputs import save_labels
    from ..runtime.visualize import make_palette

    areas = _areas(labels, task["label"], reduce, num_classes, image_name=task["image"])
    save_labels(Path(task["pred"]), labels, make_palette(256))
    return {"id": task["id"], "areas": areas.tolist()}


def _report(args, dataset, n_images: int, metrics: dict, meta: dict, elapsed: float, resumed: int) -> dict:
    from .. import __version__, methods
    from . import reported

    method, backbone, identity, settings = meta["method"], meta["backbone"], meta["identity"], meta["settings"]
    random_weights = meta["random_weights"]
    grid = None if args.masks or not methods.get(method).uses_regions else (args.points_per_side or 32)
    preset_settings = asdict(methods.get(method).settings(args.preset))
    changed = [f"{k} {settings[k]} (preset {v})" for k, v in preset_settings.items() if settings.get(k) != v]
    subset = []
    if n_images < len(dataset.samples):
        subset.append(f"first {n_images} of {len(dataset.samples)} images (--limit)")
    if args.split != "val":
        subset.append(f"split {args.split} (reported: val)")
    precision = getattr(args, "precision", None) or "fp32"
    rep = reported.find(method, backbone, args.preset, grid)
    masks = f"precomputed region maps in {args.masks}" if args.masks else (
        f"SAM {identity.get('sam', '?')} online, {grid}x{grid} points" if grid else None)
    report = {
        "preset": args.preset, "split": args.split, "images": n_images, "dataset_images": len(dataset.samples),
        "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"], "aAcc": metrics["aAcc"],
        "method": method, "backbone": backbone, "weights": identity, "random_weights": random_weights,
        "engine": meta["engine"], "backend": meta["backend"],
        "precision": precision, "masks": masks, "settings": settings,
        "reported": None, "differences": [],
        "per_class": metrics["per_class"],
        "data_root": str(dataset.root), "resumed_images": resumed, "elapsed_s": round(elapsed, 1),
        "versions": _versions(args),
        "protocol": "mmseg IoUMetric: label 255 ignored, per-class areas summed over the dataset, NaN classes "
                    "left out of the means",
    }
    report["versions"]["corrclip"] = __version__
    if rep is not None:
        report["reported"] = {"mIoU": rep.miou[args.preset], "setting": rep.setting, "source": rep.source}
        report["differences"] = reported.differences(
            rep, clip=identity.get("clip", "?"), random_weights=random_weights,
            masks=str(args.masks) if args.masks else None, online_grid=grid, precision=precision,
            changed_settings=changed, subset=" and ".join(subset) or None)
    return report


def _versions(args) -> dict:
    import open_clip
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "open_clip": open_clip.__version__}
    if args.engine:
        try:
            import onnxruntime

            v["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
    return v


def _fmt(x: float | None) -> str:
    return "nan" if x is None else f"{x:.2f}"


def _write_reports(out: Path, r: dict) -> None:
    from ..outputs import atomic_save

    text = json.dumps(r, indent=2)
    atomic_save(out / "metrics.json", lambda tmp: tmp.write_text(text))
    lines = [f"# corrclip eval: {r['preset']} ({r['split']}, {r['images']} images)", "",
             "| run | mIoU | mAcc | aAcc |", "| --- | --- | --- | --- |",
             f"| ours: {r['method']} {r['backbone']}, {r['backend']}, {r['precision']} | {_fmt(r['mIoU'])} | "
             f"{_fmt(r['mAcc'])} | {_fmt(r['aAcc'])} |"]
    if r["reported"]:
        lines.append(f"| reported: {r['reported']['setting']} ({r['reported']['source']}) | "
                     f"{r['reported']['mIoU']} | | |")
    lines.append("")
    if r["random_weights"]:
        lines += ["**Random weights: these numbers measure nothing.**", ""]
    if r["differences"]:
        lines += ["Our run differs from the reported one in:", ""] + [f"- {d}" for d in r["differences"]] + [""]
    lines += [f"Weights: `{json.dumps(r['weights'])}`; masks: {r['masks'] or 'none (CLIP-only method)'}; "
              f"settings: `{json.dumps(r['settings'])}`.", "", f"Protocol: {r['protocol']}.", "",
              "| class | IoU | Acc |", "| --- | --- | --- |"]
    lines += [f"| {c['class']} | {_fmt(c['IoU'])} | {_fmt(c['Acc'])} |" for c in r["per_class"]]
    md = "\n".join(lines) + "\n"
    atomic_save(out / "metrics.md", lambda tmp: tmp.write_text(md))


def _print(r: dict, out: Path) -> None:
    print(f"{r['preset']} {r['split']}, {r['images']} images: mIoU {_fmt(r['mIoU'])}  mAcc {_fmt(r['mAcc'])}  "
          f"aAcc {_fmt(r['aAcc'])}   ({r['method']} {r['backbone']}, {r['masks'] or 'no masks'})")
    if r["reported"]:
        print(f"reported: mIoU {r['reported']['mIoU']}  ({r['reported']['setting']}; {r['reported']['source']})")
        if r["differences"]:
            print("our settings differ from the reported run: " + "; ".join(r["differences"]))
    else:
        print(f"reported: none for {r['method']} {r['backbone']} on {r['preset']}")
    if r["random_weights"]:
        print("RANDOM weights: these numbers measure nothing.", file=sys.stderr)
    print(f"wrote {out}/metrics.json, {out}/metrics.md, {out}/predictions/")
