"""Region merging (spec step 8) against the research code's own call: scikit-learn's DBSCAN (eps 0.2,
min_samples 1, metric precomputed) on max(A) - A of the region means, the window's smallest id left out."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN

from corrclip.kernels.merging import merge_regions
from corrclip.runtime.regions import compact_per_window


def reference_merge(feats, window_ids, eps=0.2):
    """feats [N,C], window_ids [N] raw ids -> merged ids (-1 for the smallest id), one window at a time."""
    values = sorted(set(window_ids.tolist()))
    means = []
    for v in values:
        m = feats[window_ids == v].mean(0)
        means.append(m / m.norm())
    out = torch.full_like(window_ids, -1)
    rest = values[1:]
    if not rest:
        return out
    a = torch.stack(means[1:]) @ torch.stack(means[1:]).T
    dist = (a.max() - a).numpy()
    labels = DBSCAN(eps=eps, min_samples=1, metric="precomputed").fit(dist).labels_.tolist()
    for v, lab in zip(rest, labels):
        out[window_ids == v] = lab
    return out


@pytest.mark.parametrize("num_ids", [1, 2, 3, 12, 40])
def test_merge_matches_sklearn_dbscan(num_ids):
    g = torch.Generator().manual_seed(num_ids)
    b, n, c = 3, 64, 6
    # Clustered features so that some regions merge and others do not.
    centers = F.normalize(torch.randn(4, c, generator=g), dim=-1)
    raw = torch.randint(0, num_ids, (b, n), generator=g) * 7 + 3  # arbitrary, non-contiguous ids
    raw[1, :5] = 1000  # window 1 has a pad-like large id
    feats = F.normalize(centers[(raw // 7) % 4] + 0.15 * torch.randn(b, n, c, generator=g), dim=-1)
    local, r = compact_per_window(raw)
    merged = merge_regions(feats, local, r, 0.2)
    merged_any = False
    for w in range(b):
        ref = reference_merge(feats[w], raw[w])
        assert merged[w].tolist() == ref.tolist()
        merged_any |= len(set(ref.tolist())) < len(set(raw[w].tolist()))
    if num_ids >= 12:
        assert merged_any, "test data should make some regions merge"


def test_compact_per_window_keeps_order():
    ids = torch.tensor([[5, 9, 5, 100], [2, 2, 2, 2]])
    local, r = compact_per_window(ids)
    assert local.tolist() == [[0, 1, 0, 2], [0, 0, 0, 0]] and r == 3
