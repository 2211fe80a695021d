"""Turning a label map into things people look at: palette PNGs, overlays with a legend, JSON summaries."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LEGEND_MAX_ITEMS = 30  # beyond this a legend is unreadable; the rest is summed into "+N more"
LEGEND_MIN_ROWS = 10  # a short image still gets a legend column of this many rows
_PAD = 8
_GAP = 6
_NAME_CHARS = 32  # longer names are cut so one odd name does not widen the whole panel


def make_palette(n: int) -> np.ndarray:
    """n distinct colours as uint8 [n, 3]: the PASCAL VOC palette (index 0 black, 1 dark red, ...).

    Each index's bits are spread over R, G and B from the most significant bit down, so the map
    from index to colour is one-to-one for n up to 2**24 and the same on every run.
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    code = np.arange(n, dtype=np.int64)
    palette = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((code >> channel) & 1) << (7 - bit)
        code >>= 3
    return palette.astype(np.uint8)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "biu":
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    return labels


def _palette_for(palette: np.ndarray | None, n: int) -> np.ndarray:
    """A uint8 [>= n, 3] palette: the given colours first, the VOC palette for any missing rows."""
    full = make_palette(max(n, 0))
    if palette is not None:
        given = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:n]
        full[: len(given)] = given
    return full


def save_label_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write labels as a PNG that keeps the class indices exactly.

    Labels in 0..255 give a palette ('P' mode) PNG: viewers show the colours, while reading it
    back with PIL gives the indices. Labels up to 65535 give a 16-bit greyscale PNG instead
    (PNG palettes hold at most 256 colours), which looks black in most viewers but keeps the ids.
    """
    labels = _check_labels(labels)
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"labels must lie in 0..65535 to be saved as PNG, got {lo}..{hi}")
    if hi < 256:
        im = Image.fromarray(labels.astype(np.uint8), mode="P")
        im.putpalette(_palette_for(palette, 256).tobytes())
    else:
        im = Image.fromarray(labels.astype(np.uint16))  # mode I;16
    im.save(path, format="PNG")


def _font(size: int = 14) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _class_counts(labels: np.ndarray, names: Sequence[str]) -> list[tuple[int, int]]:
    """(class index, pixel count) for each class present, largest first; ties keep class order."""
    labels = _check_labels(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"labels must lie in 0..{len(names) - 1} (one per name), got {labels.min()}..{labels.max()}")
    counts = np.bincount(labels.ravel(), minlength=len(names))
    present = [(int(i), int(counts[i])) for i in np.flatnonzero(counts)]
    present.sort(key=lambda item: (-item[1], item[0]))  # stable order between runs
    return present


def legend_entries(labels: np.ndarray, names: Sequence[str]) -> list[tuple[int, str, float]]:
    """(class index, name, pixel share 0..1) for each class present, largest share first."""
    total = max(np.asarray(labels).size, 1)
    return [(i, names[i], count / total) for i, count in _class_counts(labels, names)]


def _share_text(share: float) -> str:
    pct = 100.0 * share
    return "<0.1%" if 0 < pct < 0.05 else f"{pct:.1f}%"


def render_legend(
    entries: Sequence[tuple[int, str, float]],
    palette: np.ndarray | None,
    height: int,
    max_items: int = LEGEND_MAX_ITEMS,
) -> Image.Image:
    """A white panel listing entries as swatch, name and share, in as many columns as `height` needs.

    At most `max_items` entries are drawn; the rest become one "+N more" row with their total share.
    The panel is at least `height` tall (taller only when even LEGEND_MIN_ROWS rows do not fit).
    """
    font = _font()
    top, bottom = font.getbbox("Ag")[1], font.getbbox("Ag")[3]
    row_h = (bottom - top) + 2 * _GAP
    swatch = row_h - _GAP
    colours = _palette_for(palette, max((i for i, _, _ in entries), default=0) + 1)

    rows: list[tuple[tuple[int, int, int] | None, str]] = []
    for index, name, share in entries[:max_items]:
        label = name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 3] + "..."
        rows.append((tuple(int(c) for c in colours[index]), f"{label}  {_share_text(share)}"))
    rest = entries[max_items:]
    if rest:
        rows.append((None, f"+{len(rest)} more  {_share_text(sum(s for _, _, s in rest))}"))
    if not rows:
        rows.append((None, "no classes"))

    rows_per_col = max(LEGEND_MIN_ROWS, (height - 2 * _PAD) // row_h)
    n_cols = math.ceil(len(rows) / rows_per_col)
    text_w = max(math.ceil(font.getlength(text)) for _, text in rows)
    col_w = swatch + _GAP + text_w + _PAD
    width = _PAD + n_cols * col_w
    panel_h = max(height, 2 * _PAD + min(len(rows), rows_per_col) * row_h)

    panel = Image.new("RGB", (width, panel_h), "white")
    draw = ImageDraw.Draw(panel)
    for k, (colour, text) in enumerate(rows):
        x = _PAD + (k // rows_per_col) * col_w
        y = _PAD + (k % rows_per_col) * row_h
        if colour is not None:
            draw.rectangle(
                [x, y + _GAP // 2, x + swatch - 1, y + _GAP // 2 + swatch - 1],
                fill=colour,
                outline=(64, 64, 64),
            )
        # Align the text's ink box with the swatch whatever the font's internal top offset is.
        draw.text((x + swatch + _GAP, y + _GAP - top), text, fill="black", font=font)
    return panel


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """The image blended with its class colours, and a legend of the classes present on the right.

    The result is (image width + legend width) wide and at least the image's height; the legend
    is sorted by pixel share and capped at LEGEND_MAX_ITEMS rows plus "+N more".
    """
    image = np.asarray(image)
    labels = _check_labels(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels are {labels.shape} but the image is {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    entries = legend_entries(labels, names)  # also checks the labels index into names
    colours = _palette_for(palette, len(names))[labels].astype(np.float32)
    blended = np.rint((1.0 - alpha) * image.astype(np.float32) + alpha * colours).astype(np.uint8)
    h, w = labels.shape
    legend = render_legend(entries, palette, h)

    canvas = Image.new("RGB", (w + legend.width, max(h, legend.height)), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    canvas.paste(legend, (w, 0))
    return canvas


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays, tuples and paths as plain JSON types; everything else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def summary(
    names: Sequence[str],
    labels: np.ndarray,
    timings: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-serialisable report of one segmentation.

    `timings` maps stage name -> seconds (e.g. time.perf_counter differences); the report gives
    them in milliseconds. `extra` keys are added at the top level and may not shadow the standard
    keys ("image", "classes", "timings_ms").
    """
    labels = _check_labels(labels)
    h, w = labels.shape
    total = max(h * w, 1)
    classes = [
        {"index": i, "name": names[i], "pixels": count, "percent": round(100.0 * count / total, 3)}
        for i, count in _class_counts(labels, names)
    ]
    report: dict[str, Any] = {
        "image": {"height": int(h), "width": int(w)},
        "classes": classes,
        "timings_ms": {str(k): round(float(v) * 1000.0, 3) for k, v in timings.items()},
    }
    for key, value in (extra or {}).items():
        if key in report:
            raise ValueError(f"extra key {key!r} would overwrite a standard summary field")
        report[str(key)] = _jsonable(value)
    return report
