"""`corrclip label`: label a whole image collection (folders, globs, manifests of millions of files).

Per image it writes segment's outputs (NAME_labels.png, optionally NAME_overlay.png and NAME.json)
into OUT/<shard>/, where the shard is the first 3 hex digits of a hash of the image's absolute
path (4096 folders: a million images put about 250 in each). NAME is the file's stem plus 8 more
hash digits, so equal stems from different folders never collide. OUT/index.tsv gets one line per
finished image (source path, output name, size, class pixel counts): it maps outputs back to
inputs, and a resumed run skips what it lists without looking at any other file. Inputs are
streamed: a folder is walked as it is labelled, never listed whole up front.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from .cli_args import add_model_args
from .distributed import add_ray_args

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MASK_SUFFIXES = (".png", ".npz", ".npy")
INDEX = "index.tsv"
FAILURES = "failures.tsv"
RUN_ONLY = {"command", "out", "sources", "ray", "workers", "device", "cache_dir", "no_cache"}
RAY_CHUNK = 50_000  # tasks per Ray Data pipeline run: bounds the driver's task list

EXAMPLES = """\
examples:
  corrclip label photos/ --classes 'sky; cloud, road, car, tree' --out labels/
  corrclip label 'shoots/**/*.jpg' --preset ade20k --overlay --out labels/
  corrclip label manifest.txt --classes @classes.txt --json --out /shared/labels --ray auto
  corrclip label imgs/ --classes 'cat, dog' --masks regions/ --sam none --out labels/

A manifest is a text file with one image path per line (relative paths are taken from the
manifest's folder; blank lines and lines starting with # are skipped). Run the same command again
after an interruption: finished images are skipped.
"""


class SourceError(ValueError):
    pass


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label", help="label a whole image collection (resumable, sharded outputs, optional Ray)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__, epilog=EXAMPLES)
    p.add_argument("sources", nargs="+", help="image files, folders (walked recursively), globs (quote them; ** "
                   "recurses) or manifest files (one path per line)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--classes", help="class names, e.g. 'sky; cloud, road, car' or @file.txt (one class per line)")
    what.add_argument("--preset", help="a benchmark's classes and settings (voc21, ade20k, ...)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; reused to resume)")
    p.add_argument("--masks", type=Path, help="folder of region maps NAME.png/.npz/.npy, by image stem; images "
                   "without one get SAM masks (or fail with --sam none)")
    p.add_argument("--prob-thd", type=float, default=None, help="probability below which a pixel becomes class 0")
    p.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png (colours and a legend)")
    p.add_argument("--json", action="store_true", help="also write NAME.json (class shares, timings, settings)")
    add_model_args(p)
    add_ray_args(p)
    p.set_defaults(run=run)


def _fail(msg: object) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def output_name(source: str) -> tuple[str, str, str]:
    """(key, shard, name) for an image path: key = hash of the absolute path, shard = its first 3 hex
    digits, name = file stem + 8 more hex digits."""
    key = hashlib.sha1(os.path.abspath(source).encode("utf-8", "surrogateescape")).hexdigest()
    return key[:16], key[:3], f"{Path(source).stem}_{key[3:11]}"


def iter_sources(sources: list[str]) -> Iterator[str]:
    """Image paths from files, folders, globs and manifests, streamed (folders sorted per directory)."""
    for src in sources:
        path = Path(src)
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                yield str(path)
            else:
                yield from _manifest(path)
        elif glob.has_magic(src):
            for hit in glob.iglob(src, recursive=True):
                if Path(hit).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(hit):
                    yield hit
        else:
            raise SourceError(f"{src}: no such file, folder or glob match")


def _walk(folder: Path) -> Iterator[str]:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.is_dir(follow_symlinks=False):  # as os.walk: linked folders are not entered (no cycles)
            yield from _walk(Path(e.path))
        elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
            yield e.path


def _manifest(path: Path) -> Iterator[str]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise SourceError(f"{path}: cannot read the manifest ({e.strerror})") from None
    with f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if n == 1 and "\x00" in line:
                raise SourceError(f"{path}: neither an image (by its suffix) nor a text manifest of image paths")
            yield line if os.path.isabs(line) else str(path.parent / line)


def _check_sources(sources: list[str]) -> None:
    for src in sources:
        if not (os.path.exists(src) or (glob.has_magic(src) and next(glob.iglob(src, recursive=True), None))):
            raise SourceError(f"{src}: no such file, folder or glob match")


def _count(sources: list[str]) -> int | None:
    """Total images when it is cheap to know (files and manifests only): the progress bar's ETA."""
    total = 0
    for src in sources:
        path = Path(src)
        if not path.is_file():
            return None
        if path.suffix.lower() in IMAGE_SUFFIXES:
            total += 1
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                total += sum(1 for line in f if line.strip() and not line.lstrip().startswith("#"))
    return total


class Index:
    """OUT/index.tsv: source, output (shard/name), height, width, class:pixels,... per finished image."""

    def __init__(self, out: Path, num_classes: int):
        self.path = out / INDEX
        self.keys: set[str] = set()
        self.pixels = np.zeros(num_classes, np.int64)
        self.images_with = np.zeros(num_classes, np.int64)
        if self.path.is_file():
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    self._count(line)
        self.file = open(self.path, "a", encoding="utf-8", errors="surrogateescape")
        if self.file.tell() and not self._ends_with_newline():
            self.file.write("\n")  # a line cut by a kill: start clean after it

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _count(self, line: str) -> bool:
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 5 or not line.endswith("\n"):
            return False  # cut by a kill; the image is redone or recovered from its label PNG
        source, _, _, _, counts = parts
        self.keys.add(output_name(source)[0])
        for item in filter(None, counts.split(",")):
            c, n = item.split(":")
            self.pixels[int(c)] += int(n)
            self.images_with[int(c)] += 1
        return True

    def add(self, source: str, output: str, labels_hw: tuple[int, int], counts: dict[int, int]) -> None:
        cells = ",".join(f"{c}:{n}" for c, n in sorted(counts.items()))
        line = f"{source}\t{output}\t{labels_hw[0]}\t{labels_hw[1]}\t{cells}\n"
        self._count(line)
        self.file.write(line)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _class_counts(labels: np.ndarray) -> dict[int, int]:
    counts = np.bincount(labels.ravel().astype(np.int64))
    return {int(c): int(counts[c]) for c in np.flatnonzero(counts)}


def _read(task: dict) -> tuple[np.ndarray, np.ndarray | None]:
    from .runtime.image_io import decode_image, load_label_map

    image = decode_image(task["source"])
    masks = load_label_map(task["masks"], image.shape[:2]) if task["masks"] else None
    return image, masks


def _write(task: dict, image, labels: np.ndarray, timings: dict, meta: dict, *, names: list[str],
           with_overlay: bool, with_json: bool) -> dict:
    from .outputs import write_segmentation
    from .runtime.visualize import make_palette

    info = {"file": task["source"], "backbone": meta["backbone"], "weights": meta["identity"],
            "engine": meta["engine"], "backend": meta["backend"], "method": meta["method"],
            "random_weights": meta["random_weights"], "settings": meta["settings"]}
    write_segmentation(Path(task["folder"]), task["name"], image, labels, names, make_palette(max(256, len(names))),
                       timings, info, with_overlay=with_overlay, with_json=with_json)
    return {"task": task, "shape": list(labels.shape), "counts": _class_counts(labels)}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import methods
    from .cli_args import UsageError
    from .distributed import RayMissing, RayRunError, connect, require_ray, run_ray
    from .engine.bundle import BundleError
    from .jobs import Job, Worker, needs_masks, run_local
    from .models.checkpoints import WeightsError
    from .outputs import OutputError, claim_output_folder, run_config
    from .vocab import VocabularyError, benchmark_vocabulary, load_classes_file, parse_classes

    started = time.perf_counter()
    try:
        if args.ray:
            require_ray()
        if args.preset:
            vocab = benchmark_vocabulary(args.preset)
            methods.get(args.method).settings(args.preset)  # an unknown preset fails here, before any model
        else:
            vocab = load_classes_file(args.classes[1:]) if args.classes.startswith("@") else parse_classes(args.classes)
        _check_sources(args.sources)
        if args.masks and not args.masks.is_dir():
            raise SourceError(f"{args.masks}: --masks folder not found")
        index_file = args.out / INDEX
        started_before = index_file.is_file() and index_file.stat().st_size > 0
        claim_output_folder(args.out, run_config(args, RUN_ONLY), "labels", started_before)
    except (VocabularyError, SourceError, OutputError, RayMissing, ValueError, OSError) as e:
        return _fail(e)
    if not args.masks and needs_masks(args):
        return _fail("--sam none needs --masks DIR (region maps by image stem), or drop --sam none")
    names = list(vocab.names)
    overrides = {"prob_thd": args.prob_thd} if args.prob_thd is not None else {}
    job = Job(args, vocab, args.preset, _read,
              partial(_write, names=names, with_overlay=args.overlay, with_json=args.json), overrides,
              write_needs_image=args.overlay)
    index = Index(args.out, vocab.num_classes)
    failures = open(args.out / FAILURES, "w", encoding="utf-8", errors="surrogateescape")
    stats = {"new": 0, "skipped": 0, "recovered": 0, "failed": 0, "meta": None}
    bar = tqdm(total=_count(args.sources), desc="label", unit="img", dynamic_ncols=True)

    def pending() -> Iterator[dict]:
        """Tasks for images not done yet; done ones are counted on the bar."""
        for source in iter_sources(args.sources):
            key, shard, name = output_name(source)
            if key in index.keys:
                stats["skipped"] += 1
                bar.update()
                continue
            folder = args.out / shard
            done = folder / f"{name}_labels.png"
            if done.is_file():  # finished, but killed before its index line: recover the line
                labels = _load_png(done)
                index.add(source, f"{shard}/{name}", labels.shape, _class_counts(labels))
                stats["recovered"] += 1
                bar.update()
                continue
            yield {"source": source, "folder": str(folder), "name": name, "masks": _mask_for(args.masks, source)}

    def collect(result: dict, worker_meta: dict) -> None:
        stats["meta"] = worker_meta
        task = result["task"]
        if "error" in result:
            stats["failed"] += 1
            failures.write(f"{task['source']}\t{result['error']}\n")
            failures.flush()
            tqdm.write(f"skipped {task['source']}: {result['error']}", file=sys.stderr)
        else:
            stats["new"] += 1
            index.add(task["source"], f"{Path(task['folder']).name}/{task['name']}", tuple(result["shape"]),
                      {int(c): n for c, n in result["counts"].items()})
        bar.update()

    try:
        if args.ray:
            connect(args.ray)
            for chunk in _chunks(pending(), RAY_CHUNK):
                for result, worker_meta in run_ray(job, chunk, args.ray, args.workers):
                    collect(result, worker_meta)
        else:
            tasks = pending()
            first = next(tasks, None)
            if first is not None:  # build the model only when there is work
                worker = Worker(job, warn=True)
                for result, worker_meta in run_local(job, itertools.chain([first], tasks), worker):
                    collect(result, worker_meta)
    except (UsageError, WeightsError, BundleError, RayMissing, RayRunError, SourceError) as e:
        return _fail(e)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted; {index.path} lists what is done: run the same command again to continue",
              file=sys.stderr)
        raise
    finally:
        bar.close()
        index.close()
        failures.close()
    summary = _summary(args, index, names, stats, time.perf_counter() - started)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, args.out)
    return 1 if stats["failed"] else 0


def _mask_for(folder: Path | None, source: str) -> str:
    if folder is None:
        return ""
    stem = Path(source).stem
    return next((str(p) for ext in MASK_SUFFIXES if (p := folder / f"{stem}{ext}").is_file()), "")


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _chunks(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _summary(args, index: Index, names: list[str], stats: dict, elapsed: float) -> dict:
    total = int(index.pixels.sum())
    classes = [{"class": names[c], "index": int(c), "pixels": int(index.pixels[c]),
                "percent": round(100.0 * index.pixels[c] / total, 3) if total else 0.0,
                "images": int(index.images_with[c])} for c in np.argsort(-index.pixels, kind="stable")
               if index.pixels[c]]
    return {"images_done": len(index.keys), "new": stats["new"], "already_done": stats["skipped"] + stats["recovered"],
            "failed": stats["failed"], "elapsed_s": round(elapsed, 1),
            "images_per_s": round(stats["new"] / elapsed, 3) if elapsed > 0 else None,
            "model": stats["meta"], "classes": classes, "index": str(index.path),
            "failures": str(args.out / FAILURES) if stats["failed"] else None}


def _print_summary(s: dict, out: Path) -> None:
    print(f"labelled {s['new']} new image(s) in {s['elapsed_s']} s ({s['images_per_s']} img/s); "
          f"{s['already_done']} were already done; {s['images_done']} in {out}/{INDEX}")
    top = ", ".join(f"{c['class']} {c['percent']}%" for c in s["classes"][:8])
    if top:
        print(f"pixel shares over all labelled images: {top}")
    if s["failed"]:
        print(f"{s['failed']} image(s) failed; see {s['failures']} (they are retried on the next run)",
              file=sys.stderr)
