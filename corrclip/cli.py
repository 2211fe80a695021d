"""`corrclip` command line: segment images with any class names.

Examples:
  corrclip segment photo.jpg --classes "sky; cloud, road, car, tree" --out out/
  corrclip segment img/*.jpg --preset voc21 --out out/
  corrclip segment photo.jpg --preset ade20k --masks photo_regions.png --out out/
  corrclip segment examples/example.jpg --preset voc21 --backbone vit_b --weights random --out out/
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from . import __version__
from .cli_args import add_model_args


def _segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment", help="segment images with any class names",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Segment images with open-vocabulary class names (CorrCLIP).\n\n"
            "Per image, writes into --out:\n"
            "  NAME_labels.png   palette PNG, pixel value = class index (order of --classes)\n"
            "  NAME_overlay.png  the image with class colours and a legend\n"
            "  NAME.json         classes, pixel share per class, per-stage times\n"
            "NAME is the image's file stem (with its folder's name in front when two images\n"
            "share a stem). A failing image is reported and skipped; the others go on.\n\n"
            "Classes: commas separate classes, semicolons separate synonyms of one class; a\n"
            "class's score is the best of its names. The first class doubles as 'background'\n"
            "when --prob-thd is set: pixels whose best probability is lower get class 0."),
        epilog=(
            "examples:\n"
            "  corrclip segment photo.jpg --classes 'sky; cloud, road, car, tree' --out out/\n"
            "  corrclip segment a.jpg b.jpg --preset voc21 --out out/\n"
            "  corrclip segment a.jpg --classes 'cat, dog' --masks a_regions.png --sam none --out out/\n"
            "  corrclip segment a.jpg --preset voc21 --backbone tiny --out out/   # seconds, random weights"))
    p.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, BMP, TIFF, WebP, ...)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--classes", help="class names, e.g. 'sky; cloud, road, car' or @file.txt (one class per line)")
    what.add_argument("--preset", help="a benchmark's classes and settings: voc21, voc20, context60, context59, "
                      "coco_object, coco_stuff, city_scapes, ade20k")
    p.add_argument("--masks", nargs="+", type=Path, help="region label maps (PNG/NPZ 'instance_mask'/NPY), one per "
                   "image or a folder with NAME.png/.npz; skips SAM for those images")
    p.add_argument("--prob-thd", type=float, default=None, help="probability below which a pixel becomes class 0")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    add_model_args(p)
    p.set_defaults(run=_segment)


# Subcommand modules: each has add_parser(subparsers), which sets `run` (args -> exit code) as a default.
COMMANDS = ("corrclip.cli", "corrclip.bench", "corrclip.evaluation.run", "corrclip.label", "corrclip.serve.server",
            "corrclip.serve.request")


def add_parser(sub: argparse._SubParsersAction) -> None:
    _segment_parser(sub)


def main(argv: list[str] | None = None) -> int:
    import importlib

    parser = argparse.ArgumentParser(
        prog="corrclip", description="Training-free open-vocabulary semantic segmentation (CorrCLIP engine).")
    parser.add_argument("--version", action="version", version=f"corrclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import methods
    from .cli_args import UsageError, build_segmenter, warn_if_random
    from .engine.bundle import BundleError
    from .models.checkpoints import WeightsError
    from .outputs import write_segmentation
    from .runtime.image_io import ImageError, decode_image, load_label_map
    from .runtime.visualize import make_palette
    from .vocab import VocabularyError, benchmark_vocabulary, load_classes_file, parse_classes

    try:
        if args.preset:
            vocab = benchmark_vocabulary(args.preset)
            methods.get(args.method).settings(args.preset)  # fail early on an unknown preset
        else:
            vocab = load_classes_file(args.classes[1:]) if args.classes.startswith("@") else parse_classes(args.classes)
    except (VocabularyError, ValueError, OSError) as e:
        return _fail(str(e))
    masks = _mask_paths(args)
    if isinstance(masks, str):
        return _fail(masks)
    try:
        seg = build_segmenter(args, masks_given=all(m is not None for m in masks))
        settings = seg.settings_for(args.preset, prob_thd=args.prob_thd)
    except (UsageError, WeightsError, BundleError, ValueError) as e:
        return _fail(str(e))
    warn_if_random(seg)
    args.out.mkdir(parents=True, exist_ok=True)
    palette = make_palette(max(256, vocab.num_classes))
    failures: list[str] = []
    totals: dict[str, float] = {}
    jobs = list(zip(args.images, masks, output_stems(args.images)))
    for path, mask_path, stem in tqdm(jobs, desc="segment", unit="img", disable=len(masks) < 2):
        try:
            image = decode_image(path)
            label_map = load_label_map(mask_path, image.shape[:2]) if mask_path else None
            if label_map is None and seg.needs_masks:
                raise ImageError(f"{path}: no region masks; pass --masks or drop --sam none")
            result = seg.run([image], vocab, settings, [label_map])[0]
            write_segmentation(args.out, stem, image, result.labels, result.names, palette, result.timings,
                               {"file": str(path), "backbone": seg.backbone.name, "weights": seg.identity,
                                "engine": str(args.engine) if args.engine else None, "backend": seg.backend,
                                "method": seg.method, "random_weights": seg.random_weights,
                                "precision": seg.plan.describe(), "settings": settings.__dict__})
        except Exception as e:  # noqa: BLE001 - one image's failure, whatever it is, must not lose the others
            # ImageError messages already start with the file they are about (the image or its label map).
            known = isinstance(e, (ImageError, ValueError, OSError))
            failures.append(str(e) if isinstance(e, ImageError) else
                            f"{path}: {e}" if known else f"{path}: {type(e).__name__}: {e}")
            tqdm.write(f"skipped: {failures[-1]}", file=sys.stderr)
            continue
        for k, v in result.timings.items():
            totals[k] = totals.get(k, 0.0) + v
        tqdm.write(_time_line(path, result.timings))
    done = len(masks) - len(failures)
    if done:
        print(f"wrote {done} result(s) to {args.out}/ ; mean per image:")
        for k, v in totals.items():
            print(f"  {k:<26} {1000 * v / done:9.1f} ms")
    if failures:
        print(f"{len(failures)} of {len(masks)} image(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def _time_line(path: Path, timings: dict[str, float]) -> str:
    main = {k: v for k, v in timings.items() if "." not in k}
    parts = " ".join(f"{k}={1000 * v:.0f}ms" for k, v in main.items())
    return f"{path.name}: total={1000 * sum(main.values()):.0f}ms {parts}"


def output_stems(images: list[Path]) -> list[str]:
    """A distinct output name per input image: its file stem where no other image has that stem, else the
    parent folder's name and the stem (a/x.jpg, b/x.jpg -> a_x, b_x), else a running number (x_1, x_2)."""
    stems = Counter(p.stem for p in images)
    names = [p.stem if stems[p.stem] == 1 else f"{p.absolute().parent.name}_{p.stem}" for p in images]
    repeats = Counter(names)
    taken = {n for n in names if repeats[n] == 1}
    out = []
    for name in names:
        if repeats[name] > 1:  # same folder name and stem, or one file given twice
            k = 1
            while f"{name}_{k}" in taken:
                k += 1
            name = f"{name}_{k}"
        taken.add(name)
        out.append(name)
    return out


def _mask_paths(args: argparse.Namespace) -> list[Path | None] | str:
    if not args.masks:
        return [None] * len(args.images)
    if len(args.masks) == 1 and args.masks[0].is_dir():
        folder = args.masks[0]
        out: list[Path | None] = []
        for img in args.images:
            found = [p for ext in (".png", ".npz", ".npy") if (p := folder / f"{img.stem}{ext}").is_file()]
            out.append(found[0] if found else None)
        return out
    if len(args.masks) != len(args.images):
        return f"got {len(args.masks)} --masks for {len(args.images)} images: give one per image, or a folder"
    return list(args.masks)


if __name__ == "__main__":
    sys.exit(main())
