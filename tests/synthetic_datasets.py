"""Tiny benchmarks in each of the eight mmseg on-disk layouts, with their truth in evaluation space.

The truth (class ids 0..C-1, 255 = ignored) is drawn first and then *encoded* the way each
release stores it (reduce_zero_label sets store id + 1 with 0 for "ignore"; VOC uses palette
PNGs), so a test can check the readers against labels it never read from disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from corrclip.evaluation.datasets import LAYOUTS
from corrclip.runtime.visualize import make_palette


def _truth(rng: np.random.Generator, h: int, w: int, num_classes: int) -> np.ndarray:
    """A few rectangles of random classes, a border of 255 (ignored) as VOC has."""
    t = np.full((h, w), rng.integers(0, num_classes), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        t[y: y + rng.integers(3, h // 2 + 3), x: x + rng.integers(3, w // 2 + 3)] = rng.integers(0, num_classes)
    t[0, :] = 255
    return t


def _encode(truth: np.ndarray, reduce: bool, rng: np.random.Generator) -> np.ndarray:
    if not reduce:
        return truth
    disk = truth.astype(np.int64) + 1
    # Ignored pixels: 0 on disk (what reduce_zero_label is for), some of them stored as 255 too.
    disk[truth == 255] = np.where(rng.random(int((truth == 255).sum())) < 0.5, 0, 255)
    return disk.astype(np.uint8)


def make_dataset(data: Path, preset: str, n: int = 2, size: tuple[int, int] = (24, 24), seed: int = 0
                 ) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Writes `preset`'s layout under data/ (as mmseg's default folder names) plus region maps.

    Returns (dataset root, region-map folder, {image id: truth in evaluation space}).
    """
    layout = LAYOUTS[preset]
    rng = np.random.default_rng(seed)
    root = data / layout.roots[1]
    split = layout.split_names.get("val", "val")
    img_dir = root / layout.img_dir.format(split=split)
    ann_dir = root / layout.ann_dir.format(split=split)
    masks = data / "region_masks" / preset
    masks.mkdir(parents=True, exist_ok=True)
    truths: dict[str, np.ndarray] = {}
    ids = []
    for i in range(n):
        image_id = f"frankfurt/frankfurt_000000_{i:06d}" if preset == "city_scapes" else f"2007_{i:06d}"
        ids.append(image_id)
        h, w = size
        truth = _truth(rng, h, w, layout.num_classes)
        truths[image_id] = truth
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image_path = img_dir / f"{image_id}{layout.img_suffix}"
        label_path = ann_dir / f"{image_id}{layout.seg_suffix}"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_path, quality=95) if image_path.suffix == ".jpg" else \
            Image.fromarray(image).save(image_path)
        disk = _encode(truth, layout.reduce_zero_label, rng)
        if preset.startswith("voc"):
            png = Image.fromarray(disk, mode="P")
            png.putpalette(make_palette(256).tobytes())
            png.save(label_path)
        else:
            Image.fromarray(disk).save(label_path)
        regions = np.zeros((h, w), np.int32)
        regions[h // 3:, : w // 2] = 1
        regions[: h // 2, w // 2:] = 2
        np.savez(masks / f"{image_path.name[: -len(image_path.suffix)]}.npz", instance_mask=regions)
    if layout.split_file:
        split_file = root / layout.split_file.format(split="val")
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("".join(f"{i}\n" for i in ids))
    return root, masks, truths
