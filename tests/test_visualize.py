"""Palette, label PNGs, the overlay with its legend, and the JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corrclip.runtime.visualize import (
    LEGEND_MAX_ITEMS,
    legend_entries,
    make_palette,
    overlay,
    render_legend,
    save_label_png,
    summary,
)

RNG = np.random.default_rng(0)


def test_palette_is_the_voc_palette_and_distinct() -> None:
    palette = make_palette(1000)
    assert palette.shape == (1000, 3) and palette.dtype == np.uint8
    assert palette[:6].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]]
    assert palette[15].tolist() == [192, 128, 128]  # VOC "person"
    assert len({tuple(c) for c in palette}) == 1000
    np.testing.assert_array_equal(make_palette(21), palette[:21])
    assert make_palette(0).shape == (0, 3)


def test_palette_png_round_trip(tmp_path: Path) -> None:
    labels = RNG.integers(0, 21, (30, 50))
    palette = RNG.integers(0, 256, (21, 3), dtype=np.uint8)
    path = tmp_path / "labels.png"
    save_label_png(path, labels, palette)
    with Image.open(path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), labels)
        stored = np.asarray(im.getpalette()[: 21 * 3], dtype=np.uint8).reshape(21, 3)
        np.testing.assert_array_equal(stored, palette)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), palette[labels])


def test_many_classes_are_saved_as_16_bit(tmp_path: Path) -> None:
    labels = RNG.integers(0, 1000, (30, 50))
    labels[0, 0] = 999
    path = tmp_path / "labels.png"
    save_label_png(path, labels)
    with Image.open(path) as im:
        assert im.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(im), labels)
    with pytest.raises(ValueError):
        save_label_png(path, labels - 1)


def _scene() -> tuple[np.ndarray, np.ndarray, list[str]]:
    image = RNG.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    labels = np.zeros((60, 80), dtype=np.int64)
    labels[:, 40:] = 2  # half the image
    labels[:15, :40] = 5  # an eighth
    names = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus"]
    return image, labels, names


def test_legend_entries_list_present_classes_by_share() -> None:
    _, labels, names = _scene()
    entries = legend_entries(labels, names)
    assert [(i, n) for i, n, _ in entries] == [(2, "bicycle"), (0, "background"), (5, "bottle")]
    assert [s for _, _, s in entries] == pytest.approx([0.5, 0.375, 0.125])
    with pytest.raises(ValueError):
        legend_entries(labels, names[:3])  # label 5 has no name


def test_overlay_size_blend_and_legend() -> None:
    image, labels, names = _scene()
    palette = make_palette(len(names))
    out = overlay(image, labels, names, palette, alpha=0.5)
    legend = render_legend(legend_entries(labels, names), palette, image.shape[0])
    assert out.mode == "RGB"
    assert out.size == (image.shape[1] + legend.width, max(image.shape[0], legend.height))
    pixels = np.asarray(out)
    expected = np.rint(0.5 * image + 0.5 * palette[labels].astype(np.float64)).astype(np.uint8)
    assert np.abs(pixels[:60, :80].astype(int) - expected).max() <= 1
    np.testing.assert_array_equal(pixels[: legend.height, 80:], np.asarray(legend))

    # The swatches of present classes are drawn, and no swatch for an absent class.
    colours = {tuple(c) for c in np.asarray(legend).reshape(-1, 3).tolist()}
    for present in (0, 2, 5):
        assert tuple(palette[present].tolist()) in colours
    for absent in (1, 3, 4, 6):
        assert tuple(palette[absent].tolist()) not in colours


def test_overlay_alpha_extremes() -> None:
    image, labels, names = _scene()
    palette = make_palette(len(names))
    np.testing.assert_array_equal(np.asarray(overlay(image, labels, names, palette, alpha=0.0))[:60, :80], image)
    np.testing.assert_array_equal(
        np.asarray(overlay(image, labels, names, palette, alpha=1.0))[:60, :80], palette[labels]
    )
    with pytest.raises(ValueError):
        overlay(image, labels[:, :10], names, palette)


def test_legend_stays_readable_with_150_classes() -> None:
    names = [f"class number {i}" for i in range(150)]
    labels = np.arange(150 * 40).reshape(60, 100) % 150
    image = np.zeros((60, 100, 3), dtype=np.uint8)
    entries = legend_entries(labels, names)
    assert len(entries) == 150
    capped = render_legend(entries, None, 60)
    one_row = render_legend(entries[:1], None, 60)
    out = overlay(image, labels, names, None)
    assert out.width == 100 + capped.width
    # 30 rows and "+120 more" in columns of 10: 4 columns, not 150 rows or 15 columns.
    assert LEGEND_MAX_ITEMS == 30
    assert capped.width < 5 * one_row.width
    assert capped.height < 400


def test_summary_is_json_and_counts_pixels() -> None:
    _, labels, names = _scene()
    report = summary(names, labels, {"decode": 0.0125, "encode": 1.5}, {"model": "ViT-B/16", "n": np.int64(3)})
    json.dumps(report)  # plain JSON types only
    assert report["image"] == {"height": 60, "width": 80}
    assert [c["name"] for c in report["classes"]] == ["bicycle", "background", "bottle"]
    assert [c["pixels"] for c in report["classes"]] == [2400, 1800, 600]
    assert report["classes"][2] == {"index": 5, "name": "bottle", "pixels": 600, "percent": 12.5}
    assert report["timings_ms"] == {"decode": 12.5, "encode": 1500.0}
    assert report["model"] == "ViT-B/16" and report["n"] == 3
    with pytest.raises(ValueError):
        summary(names, labels, {}, {"classes": []})
