"""`corrclip request`: segment images through a running `corrclip serve`, writing what `segment` writes.

Per image, --out receives NAME_labels.png (palette PNG, value = class index), NAME_overlay.png
(colours and a legend, drawn here) and NAME.json (classes, pixel shares, per-stage times, the
settings and model the server used). Images go to the server concurrently (--concurrency), so the
server's dynamic batcher can put them into shared batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EPILOG = """examples:
  corrclip request photo.jpg --classes 'sky; cloud, road, car, tree' --out out/
  corrclip request img/*.jpg --preset voc21 --out out/ --concurrency 8
  corrclip request a.jpg --classes 'cat, dog' --masks a_regions.png --url 127.0.0.1:8000 --out out/"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("request", help="segment images through a running `corrclip serve`",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__, epilog=EPILOG)
    p.add_argument("images", nargs="+", type=Path, help="image files (sent as they are; the server decodes them)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--classes", help="class names, e.g. 'sky; cloud, road, car' or @file.txt (one class per line)")
    what.add_argument("--preset", help="a benchmark's classes and settings, e.g. voc21, ade20k")
    p.add_argument("--masks", nargs="+", type=Path, help="region label maps, one per image or a folder with "
                   "NAME.png/.npz/.npy (as for segment)")
    p.add_argument("--prob-thd", type=float, default=None, help="probability below which a pixel becomes class 0")
    p.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address (default 127.0.0.1:8000)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one response (default 600)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..cli import _mask_paths
    from ..vocab import VocabularyError, load_classes_file
    from .client import Client, ServeError

    classes = args.classes
    if classes is not None and classes.startswith("@"):
        try:  # the server takes the CLI syntax: one class per line is that syntax too, synonyms stay "; "
            vocab = load_classes_file(classes[1:])
        except VocabularyError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        classes = "\n".join("; ".join(names) for names in vocab.classes)
    masks = _mask_paths(args)
    if isinstance(masks, str):
        print(f"error: {masks}", file=sys.stderr)
        return 2
    with Client(args.url, timeout=args.timeout) as probe:
        if not probe.ready():
            print(f"error: no ready corrclip server at {args.url}; start one with `corrclip serve` (or pass --url)",
                  file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    local = threading.local()

    def one(item: tuple[Path, Path | None]) -> tuple[Path, str | None]:
        path, mask_path = item
        if not hasattr(local, "client"):
            local.client = Client(args.url, timeout=args.timeout)
        try:
            image = _read_image(path)
            label_map = _read_masks(mask_path, image) if mask_path else None
            start = time.perf_counter()
            result = local.client.segment(path.read_bytes(), classes, preset=args.preset, masks=label_map,
                                          prob_thd=args.prob_thd)
            _write(args.out, path, image, result, args.url, time.perf_counter() - start)
        except (ServeError, ValueError, OSError) as e:
            return path, str(e)
        return path, None

    failures = []
    with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        items = list(zip(args.images, masks))
        for path, error in tqdm(pool.map(one, items), total=len(items), desc="request", unit="img",
                                disable=len(items) < 2):
            if error:
                failures.append(f"{path}: {error}")
                tqdm.write(f"failed {path}: {error}", file=sys.stderr)
    done = len(args.images) - len(failures)
    if done:
        print(f"wrote {done} result(s) to {args.out}/")
    if failures:
        print(f"{len(failures)} of {len(args.images)} image(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def _read_image(path: Path):
    from ..runtime.image_io import decode_image

    return decode_image(path)  # for the overlay drawn here, and to check a label map's size before sending


def _read_masks(path: Path, image):
    from ..runtime.image_io import load_label_map

    return load_label_map(path, image.shape[:2])


def _write(out: Path, path: Path, image, result, url: str, seconds: float) -> None:
    from ..runtime.visualize import make_palette, overlay, save_label_png, summary

    stem = path.stem
    palette = make_palette(max(256, len(result.names)))
    save_label_png(out / f"{stem}_labels.png", result.labels, palette)
    overlay(image, result.labels, result.names, palette).save(out / f"{stem}_overlay.png")
    model, info = result.info["model"], result.info
    extra = {"file": str(path), "backbone": model["backbone"], "weights": model["weights"],
             "engine": model["engine"], "backend": model.get("backend"), "method": model["method"],
             "random_weights": model["random_weights"],
             "settings": info["settings"],
             "server": {"url": url, "round_trip_seconds": seconds, "batch": info["batch"],
                        "request_seconds": info["request_seconds"]}}
    (out / f"{stem}.json").write_text(json.dumps(summary(result.names, result.labels, info["stage_seconds"], extra),
                                                 indent=2))
