"""The eight benchmarks as they lie on disk (mmseg's layouts), and their ground truth as mmseg reads it.

The research code evaluates with mmseg datasets (corrclip.md §3): an image folder, a label folder
and, for the Pascal sets, a split file of ids; otherwise every image under the image folder
(recursively, sorted by path). Labels are single-channel PNGs read as uint8 (palette PNGs give
their indices). `reduce_zero_label` maps 0 -> 255 and every other label v -> v - 1, so 255 stays
255; 255 is then ignored by the metric.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message names what was expected."""


@dataclass(frozen=True)
class Layout:
    """Where one benchmark's files are, relative to its root folder ("{split}" is filled in)."""

    name: str
    title: str  # the folder people know it by, for messages
    roots: tuple[str, ...]  # where the root may sit under --data-root ("" = --data-root itself)
    img_dir: str
    ann_dir: str
    split_file: str | None  # one id per line; None: every image under img_dir
    img_suffix: str
    seg_suffix: str
    reduce_zero_label: bool
    num_classes: int
    make_labels: str  # how people produce the label files, for messages
    split_names: dict[str, str] = field(default_factory=dict)  # --split value -> folder token


_VOC_ROOTS = ("", "VOCdevkit/VOC2012", "VOC2012")
_CONTEXT_ROOTS = ("", "VOCdevkit/VOC2010", "VOC2010")
_COCO_ROOTS = ("", "coco_stuff164k", "coco")
_COCO_SPLITS = {"val": "val2017", "train": "train2017"}
_CONTEXT_HINT = "made by mmseg's tools/dataset_converters/pascal_context.py from trainval_merged.json"
_COCO_HINT = "made from COCO-Stuff's stuffthingmaps by mmseg's tools/dataset_converters/coco_stuff164k.py"

LAYOUTS: dict[str, Layout] = {
    "voc21": Layout("voc21", "VOC2012", _VOC_ROOTS, "JPEGImages", "SegmentationClass",
                    "ImageSets/Segmentation/{split}.txt", ".jpg", ".png", False, 21,
                    "the class PNGs of the VOC2012 release"),
    "voc20": Layout("voc20", "VOC2012", _VOC_ROOTS, "JPEGImages", "SegmentationClass",
                    "ImageSets/Segmentation/{split}.txt", ".jpg", ".png", True, 20,
                    "the class PNGs of the VOC2012 release"),
    "context60": Layout("context60", "VOC2010", _CONTEXT_ROOTS, "JPEGImages", "SegmentationClassContext",
                        "ImageSets/SegmentationContext/{split}.txt", ".jpg", ".png", False, 60, _CONTEXT_HINT),
    "context59": Layout("context59", "VOC2010", _CONTEXT_ROOTS, "JPEGImages", "SegmentationClassContext",
                        "ImageSets/SegmentationContext/{split}.txt", ".jpg", ".png", True, 59, _CONTEXT_HINT),
    "coco_stuff": Layout("coco_stuff", "coco_stuff164k", _COCO_ROOTS, "images/{split}", "annotations/{split}",
                         None, ".jpg", "_labelTrainIds.png", False, 171, _COCO_HINT, _COCO_SPLITS),
    # Thing ids -> 1..80, stuff and unlabeled -> 0 (background), as the family's converter writes them.
    "coco_object": Layout("coco_object", "coco_stuff164k", _COCO_ROOTS, "images/{split}", "annotations/{split}",
                          None, ".jpg", "_instanceTrainIds.png", False, 81,
                          "made from the *_labelTrainIds.png by the research code's datasets/cvt_coco_object.py",
                          _COCO_SPLITS),
    "city_scapes": Layout("city_scapes", "cityscapes", ("", "cityscapes"), "leftImg8bit/{split}", "gtFine/{split}",
                          None, "_leftImg8bit.png", "_gtFine_labelTrainIds.png", False, 19,
                          "made by cityscapesscripts' createTrainIdLabelImgs or mmseg's "
                          "tools/dataset_converters/cityscapes.py"),
    "ade20k": Layout("ade20k", "ADEChallengeData2016", ("", "ADEChallengeData2016", "ade/ADEChallengeData2016"),
                     "images/{split}", "annotations/{split}", None, ".jpg", ".png", True, 150,
                     "the annotation PNGs of the ADEChallengeData2016 release",
                     {"val": "validation", "train": "training"}),
}


@dataclass(frozen=True)
class Sample:
    id: str  # image id: a split-file line, or the image path under img_dir without its suffix
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    layout: Layout
    root: Path
    split: str
    samples: tuple[Sample, ...]

    def load_label(self, sample: Sample) -> np.ndarray:
        return load_ground_truth(sample.label, self.layout.reduce_zero_label)


def load_ground_truth(path: str | os.PathLike, reduce: bool) -> np.ndarray:
    """The ground truth as the metric sees it: uint8 HxW, reduce_zero_label applied, 255 = ignore."""
    gt = read_label_png(Path(path))
    return reduce_zero_label(gt) if reduce else gt


def reduce_zero_label(gt: np.ndarray) -> np.ndarray:
    """mmseg's rule: 0 -> 255, v -> v - 1 for the rest, and 255 stays 255."""
    out = gt.astype(np.uint8, copy=True)
    out[out == 0] = 255
    out = out - 1  # uint8: 255 -> 254
    out[out == 254] = 255
    return out


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG's values as uint8 HxW (palette PNGs give indices, as mmseg's Pillow loader does)."""
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not a readable PNG; re-extract the dataset") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot read the label PNG ({e}); re-extract the dataset") from None
    if arr.ndim != 2:
        raise DatasetError(f"{path}: label map has shape {arr.shape}; mmseg labels are single-channel PNGs of "
                           "class ids (palette or greyscale), not colour images")
    if arr.size and arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
        # mmseg casts to uint8 and would silently wrap such values; refuse instead.
        raise DatasetError(f"{path}: label values {arr.min()}..{arr.max()} do not fit in 0..255")
    return arr.astype(np.uint8)


def open_dataset(preset: str, data_root: str | os.PathLike, split: str = "val") -> Dataset:
    """Finds the benchmark under data_root and lists its samples; DatasetError names what is missing."""
    if preset not in LAYOUTS:
        raise DatasetError(f"unknown preset {preset!r}; choose one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[preset]
    token = layout.split_names.get(split, split)
    img_rel = layout.img_dir.format(split=token)
    base = Path(data_root)
    if not base.is_dir():
        raise DatasetError(f"{base}: --data-root folder not found")
    candidates = [base / r if r else base for r in layout.roots]
    root = next((c for c in candidates if (c / img_rel).is_dir()), None)
    if root is None:
        tried = ", ".join(str(c / img_rel) for c in candidates)
        raise DatasetError(f"{preset}: no image folder {img_rel}/ found (tried {tried}); --data-root must be the "
                           f"{layout.title} folder or a folder above it")
    ann_dir = root / layout.ann_dir.format(split=token)
    if not ann_dir.is_dir():
        raise DatasetError(f"{ann_dir}: label folder not found; {preset} needs {layout.ann_dir.format(split=token)}/ "
                           f"({layout.make_labels})")
    img_dir = root / img_rel
    if layout.split_file is not None:
        ids = _read_split_file(root / layout.split_file.format(split=token), preset)
    else:
        ids = _scan_images(img_dir, layout.img_suffix)
    samples = tuple(Sample(i, img_dir / f"{i}{layout.img_suffix}", ann_dir / f"{i}{layout.seg_suffix}") for i in ids)
    _check_files(samples, layout, img_dir, ann_dir)
    return Dataset(layout, root, split, samples)


def _read_split_file(path: Path, preset: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: split file not found; {preset} lists its image ids there (one per line)")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: split file lists no image ids; write one id per line")
    bad = next((i for i in ids if os.path.isabs(i) or ".." in Path(i).parts), None)
    if bad is not None:
        raise DatasetError(f"{path}: id {bad!r} is not a plain file name; list ids like 2007_000033")
    return ids


def _scan_images(img_dir: Path, suffix: str) -> list[str]:
    """Ids of every file under img_dir ending in suffix, sorted by path (mmseg's order)."""
    rels = []
    for folder, _, files in os.walk(img_dir):
        for name in files:
            if name.endswith(suffix):
                rel = os.path.relpath(os.path.join(folder, name), img_dir).replace(os.sep, "/")
                rels.append(rel)
    if not rels:
        raise DatasetError(f"{img_dir}: no *{suffix} images found")
    return [r[: -len(suffix)] for r in sorted(rels)]


def _check_files(samples: tuple[Sample, ...], layout: Layout, img_dir: Path, ann_dir: Path) -> None:
    """Every image and label must exist: a metric over a silently smaller set would mislead."""
    for kind, paths, folder, pattern in (
        ("image", [s.image for s in samples], img_dir, f"*{layout.img_suffix}"),
        ("label", [s.label for s in samples], ann_dir, f"*{layout.seg_suffix}"),
    ):
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            continue
        if kind == "label" and len(missing) == len(paths):
            raise DatasetError(f"{folder}: no {pattern} label files for the {len(paths)} images; "
                               f"{layout.name} needs them ({layout.make_labels})")
        raise DatasetError(f"{missing[0]}: {kind} file not found ({len(missing)} of {len(paths)} {kind}s missing "
                           f"in {folder})")
