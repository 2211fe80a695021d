"""Stitching, scores, background synonyms, threshold and voting (spec steps 15-18) against loops."""

import pytest
import torch
import torch.nn.functional as F

from corrclip.kernels.stitch import stitch
from corrclip.kernels.vote import classify, vote
from corrclip.runtime.preprocess import Window, sliding_windows


def test_classify_matches_loops():
    g = torch.Generator().manual_seed(0)
    q, h, w = 7, 5, 6
    logits = torch.rand(q, h, w, generator=g) * 0.3
    query_class = torch.tensor([0, 0, 0, 1, 2, 3, 3])  # background with 3 synonyms, class 3 with 2
    labels, probs = classify(logits, query_class, 4, 40.0, 0.5)
    for y in range(h):
        for x in range(w):
            z = [40.0 * float(logits[k, y, x]) for k in range(q)]
            e = [torch.tensor(v).exp().item() for v in z]
            p = [v / sum(e) for v in e]
            cls = [max(p[0:3]), p[3], p[4], max(p[5:7])]
            assert probs[:, y, x].tolist() == pytest.approx(cls, rel=1e-4, abs=1e-6)
            best = max(range(4), key=lambda c: (cls[c], -c))
            expected = 0 if max(cls) < 0.5 else best
            assert labels[y, x] == expected


def test_vote_majority_ties_and_unsegmented():
    labels = torch.tensor([[1, 1, 2, 3], [2, 2, 3, 3], [0, 4, 4, 0]])
    regions = torch.tensor([[1, 1, 1, 2], [1, 1, 2, 2], [0, 3, 3, 0]])
    out = vote(labels, regions, 4, 5)
    # region 1: labels 1,1,2,2,2... -> {1:2, 2:3} -> 2; region 2: all 3; region 3: {4:2}; 0 kept.
    assert out.tolist() == [[2, 2, 2, 3], [2, 2, 3, 3], [0, 4, 4, 0]]
    tie = vote(torch.tensor([[3, 1, 3, 1]]), torch.tensor([[1, 1, 1, 1]]), 2, 4)
    assert tie.tolist() == [[1, 1, 1, 1]]  # tie between 1 and 3 -> smallest


def test_vote_matches_torch_mode_loop():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 6, (40, 50), generator=g)
    regions = torch.randint(0, 9, (40, 50), generator=g)
    out = vote(labels, regions, 9, 6)
    ref = labels.clone()
    for r in range(1, 9):
        m = regions == r
        ref[m] = torch.mode(labels[m]).values  # the research code's vote (CPU: smallest on ties)
    assert torch.equal(out, ref)


def literal_stitch(window_logits, windows, size, out_size):
    q = window_logits.shape[1]
    preds = torch.zeros(1, q, *size)
    count = torch.zeros(1, 1, *size)
    for lg, win in zip(window_logits, windows):
        up = F.interpolate(lg[None], size=win.padded_size, mode="bilinear", align_corners=False)
        left, right, top, bottom = win.pad
        up = up[:, :, top: up.shape[2] - bottom, left: up.shape[3] - right]
        preds += F.pad(up, (win.x1, size[1] - win.x2, win.y1, size[0] - win.y2))
        count[:, :, win.y1:win.y2, win.x1:win.x2] += 1
    return F.interpolate(preds / count, size=out_size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("size", [(336, 448), (336, 336), (224, 1500)])
def test_stitch_matches_literal(size):
    windows = sliding_windows(*size, 336, 112)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(windows), 3, *[s // 8 for s in windows[0].padded_size], generator=g)
    out = stitch(logits, windows, size, (100, 130))
    torch.testing.assert_close(out, literal_stitch(logits, windows, size, (100, 130)))
    assert isinstance(windows[0], Window)


def test_area_filter_matches_loops():
    g = torch.Generator().manual_seed(5)
    logits = 0.01 * torch.rand(4, 6, 7, generator=g)
    logits[1] += 0.1
    logits[3, :3] += 0.2
    logits[2, 0, 0] += 0.3  # class 2 wins a single pixel: below 10% of the foreground
    qc = torch.arange(4)
    labels, probs = classify(logits, qc, 4, 40.0, 0.0, area_thd=0.1)
    base, p = classify(logits, qc, 4, 40.0, 0.0)
    areas = [int((base == c).sum()) for c in range(4)]
    fg = sum(areas[1:])
    keep = [c == 0 or areas[c] > 0.1 * fg for c in range(4)]
    assert not keep[2]
    for y in range(6):
        for x in range(7):
            scores = [float(p[c, y, x]) * keep[c] for c in range(4)]
            assert labels[y, x] == max(range(4), key=lambda c: (scores[c], -c))
    assert torch.all(probs[2] == 0)
