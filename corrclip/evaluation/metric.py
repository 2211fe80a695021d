"""mmseg's IoUMetric (mIoU, mAcc, aAcc), without mmseg.

Per image: drop pixels whose label is the ignore index (255); count, per class, the pixels where
prediction and label agree (intersection), the predicted pixels and the labelled pixels. Label
values outside 0..C-1 other than 255 stay in (their predictions count as predicted area) but
count in no class's label area, as mmseg's torch.histc does. Over the dataset the counts are
summed; IoU = intersection / union and Acc = intersection / label area per class; a class whose
denominator is zero gets NaN and is left out of the mean; aAcc = sum intersection / sum label area.
Results are in percent, rounded to 2 decimals.

mmseg sums float32 histograms and divides in float32; we sum exact int64 counts and divide in
float64 (float32 rounds counts above 2**24, which can move a result by 0.01 when it sits on a
rounding boundary, on datasets as large as COCO).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .datasets import IGNORE_INDEX

# Rows of the per-class area array.
INTERSECT, UNION, PRED, LABEL = range(4)


def image_areas(pred: np.ndarray, label: np.ndarray, num_classes: int,
                ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """[4, C] int64: intersection, union, predicted and labelled pixels per class for one image."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction is {pred.shape} but the label map is {label.shape}")
    keep = label != ignore_index
    p = pred[keep].astype(np.int64)
    g = label[keep].astype(np.int64)

    def hist(values: np.ndarray) -> np.ndarray:
        return np.bincount(values[(values >= 0) & (values < num_classes)], minlength=num_classes)

    out = np.zeros((4, num_classes), np.int64)
    out[INTERSECT] = hist(p[p == g])
    out[PRED] = hist(p)
    out[LABEL] = hist(g)
    out[UNION] = out[PRED] + out[LABEL] - out[INTERSECT]
    return out


def summarize(areas: np.ndarray, names: Sequence[str]) -> dict:
    """mIoU, mAcc, aAcc (percent, 2 decimals) and the per-class table from summed [4, C] areas."""
    areas = np.asarray(areas, dtype=np.int64)
    inter, union, pred, label = (areas[i].astype(np.float64) for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / label
        a_acc = inter.sum() / label.sum()
    per_class = [
        {"class": name, "IoU": _pct(iou[c]), "Acc": _pct(acc[c]), "intersection": int(areas[INTERSECT, c]),
         "union": int(areas[UNION, c]), "predicted": int(areas[PRED, c]), "labelled": int(areas[LABEL, c])}
        for c, name in enumerate(names)
    ]
    return {"mIoU": _pct(_nanmean(iou)), "mAcc": _pct(_nanmean(acc)), "aAcc": _pct(a_acc), "per_class": per_class}


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _pct(x: float) -> float | None:
    """Percent with 2 decimals; None (JSON null) for NaN."""
    return None if np.isnan(x) else float(np.round(float(x) * 100.0, 2))  # mmseg: np.round(x * 100, 2)
