"""mmseg's IoUMetric: against a literal per-pixel implementation, and on a case computed by hand."""

import numpy as np
import pytest

from corrclip.evaluation.datasets import reduce_zero_label
from corrclip.evaluation.metric import image_areas, summarize


def literal_metric(preds, labels, num_classes):
    """IoUMetric written as the issue states it, one pixel at a time (no numpy)."""
    inter, pred_area, label_area = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for pred, label in zip(preds, labels):
        for p, g in zip(pred.ravel().tolist(), label.ravel().tolist()):
            if g == 255:
                continue
            if 0 <= p < num_classes:
                pred_area[p] += 1
            if 0 <= g < num_classes:
                label_area[g] += 1
                if p == g:
                    inter[g] += 1
    iou, acc = [], []
    for c in range(num_classes):
        union = pred_area[c] + label_area[c] - inter[c]
        iou.append(inter[c] / union if union else None)
        acc.append(inter[c] / label_area[c] if label_area[c] else None)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return round(100 * sum(xs) / len(xs), 2) if xs else None

    return {"mIoU": mean(iou), "mAcc": mean(acc), "aAcc": round(100 * sum(inter) / sum(label_area), 2),
            "IoU": [None if x is None else round(100 * x, 2) for x in iou]}


def ours(preds, labels, num_classes):
    total = sum(image_areas(p, g, num_classes) for p, g in zip(preds, labels))
    return summarize(total, [f"c{i}" for i in range(num_classes)])


@pytest.mark.parametrize("seed", range(4))
def test_metric_matches_literal_implementation(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    preds, labels = [], []
    for _ in range(5):
        h, w = rng.integers(5, 30, 2)
        # Predictions never use class 6; labels hold 255 (ignored) and 9 (out of range, not ignored).
        preds.append(rng.integers(0, 6, (h, w)))
        g = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
        g[rng.random((h, w)) < 0.2] = 255
        g[rng.random((h, w)) < 0.05] = 9
        labels.append(g)
    labels[0][:] = np.where(labels[0] == 5, 4, labels[0])  # keep some classes rare
    got, want = ours(preds, labels, num_classes), literal_metric(preds, labels, num_classes)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == want[key], key
    assert [c["IoU"] for c in got["per_class"]] == want["IoU"]


def test_metric_hand_computed_three_images():
    # Five classes; 3 is predicted once but never labelled (IoU 0, Acc NaN), 4 appears nowhere (NaN).
    labels = [np.array([[0, 0], [1, 255]]), np.array([[2, 2], [2, 0]]), np.array([[255, 255], [1, 1]])]
    preds = [np.array([[0, 1], [1, 2]]), np.array([[2, 2], [0, 0]]), np.array([[0, 0], [3, 1]])]
    # Per class over the three images (the 255 pixels drop out):
    #   intersection 2, 2, 2, 0, 0   predicted 3, 3, 2, 1, 0   labelled 3, 3, 3, 0, 0
    #   union        4, 4, 3, 1, 0   IoU 1/2, 1/2, 2/3, 0, NaN   Acc 2/3, 2/3, 2/3, NaN, NaN
    # mIoU = (0.5 + 0.5 + 0.6667 + 0) / 4 = 41.67; mAcc = 66.67; aAcc = 6 / 9 = 66.67
    got = ours(preds, labels, 5)
    assert (got["mIoU"], got["mAcc"], got["aAcc"]) == (41.67, 66.67, 66.67)
    assert [c["IoU"] for c in got["per_class"]] == [50.0, 50.0, 66.67, 0.0, None]
    assert [c["Acc"] for c in got["per_class"]] == [66.67, 66.67, 66.67, None, None]
    assert [c["union"] for c in got["per_class"]] == [4, 4, 3, 1, 0]


def test_all_ignored_gives_nan_not_a_crash():
    got = ours([np.zeros((2, 2), int)], [np.full((2, 2), 255, np.uint8)], 3)
    assert got["mIoU"] is None and got["mAcc"] is None and got["aAcc"] is None


def test_reduce_zero_label():
    disk = np.array([[0, 1, 2], [150, 254, 255]], np.uint8)
    assert reduce_zero_label(disk).tolist() == [[255, 0, 1], [149, 253, 255]]
