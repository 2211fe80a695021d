"""What the batch commands leave in --out: per-image files written atomically, and the run's settings.

Each file is written under a temporary name and renamed into place, so a killed run never leaves a
half-written file under a final name; the label PNG is written last and marks the image done. A
killed run may leave hidden `.NAME.PID.tmp` files behind, which nothing reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .runtime.visualize import overlay, save_label_png, summary

RUN_FILE = "run.json"


class OutputError(ValueError):
    """An output folder that cannot be used for this run; the message says what to do."""


def atomic_save(path: Path, save: Callable[[Path], None]) -> None:
    """save(tmp) writes the file; it then appears at `path` in one rename (same folder, same filesystem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_labels(path: Path, labels: np.ndarray, palette: np.ndarray | None) -> None:
    """Class indices as a palette PNG (uint16 greyscale past 256 classes), atomically."""
    atomic_save(path, lambda tmp: save_label_png(tmp, labels, palette))


def write_segmentation(folder: Path, name: str, image: np.ndarray, labels: np.ndarray, names: list[str],
                       palette: np.ndarray, timings: Mapping[str, float], info: Mapping[str, Any], *,
                       with_overlay: bool = True, with_json: bool = True) -> Path:
    """`segment`'s per-image files: NAME.json, NAME_overlay.png, then NAME_labels.png (the done marker)."""
    if with_json:
        text = json.dumps(summary(names, labels, timings, info), indent=2)
        atomic_save(folder / f"{name}.json", lambda tmp: tmp.write_text(text))
    if with_overlay:
        picture = overlay(image, labels, names, palette)
        atomic_save(folder / f"{name}_overlay.png", lambda tmp: picture.save(tmp, format="PNG"))
    path = folder / f"{name}_labels.png"
    save_labels(path, labels, palette)
    return path


def claim_output_folder(out: Path, config: Mapping[str, Any], what: str, has_outputs: bool) -> None:
    """Records the run's settings in OUT/run.json, or checks them against those of the run whose
    outputs (`has_outputs`) are already there: resuming with other settings would mix two runs."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_FILE
    config = json.loads(json.dumps(dict(config), default=str))  # the form it has once read back
    if has_outputs and path.is_file():
        try:
            before = json.loads(path.read_text()).get("config", {})
        except (json.JSONDecodeError, AttributeError):
            raise OutputError(f"{path}: unreadable; delete it (and the {what} beside it) to start over") from None
        changed = [f"{k}: {before.get(k)!r} then, {config.get(k)!r} now" for k in sorted(set(before) | set(config))
                   if before.get(k) != config.get(k)]
        if changed:
            raise OutputError(f"{out} holds {what} of a run with other settings ({'; '.join(changed)}); use another "
                              f"--out, or delete {path} to mix them")
        return
    atomic_save(path, lambda tmp: tmp.write_text(json.dumps({"config": config}, indent=2)))


def run_config(args: Any, exclude: set[str]) -> dict[str, Any]:
    """The flags that decide a run's outputs: every argparse value except those in `exclude`."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in exclude and not callable(v)}


def record_in_run_file(out: Path, **fields: Any) -> dict[str, Any]:
    """Adds fields (e.g. the model identity, once known) to OUT/run.json; returns its whole content."""
    path = out / RUN_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(json.loads(json.dumps(fields, default=str)))
    atomic_save(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))
    return data
