"""The research-style path (benchmarks/research_style.py) computes what our Segmenter computes.

Same tiny random models, user label maps (no SAM): labels must agree on >= 99.9% of pixels. With
random weights the final labels barely depend on the regions, so the window logits (before
stitching and voting) and the merging are also compared directly.
"""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corrclip.api import Segmenter, as_vocabulary
from corrclip.kernels.merging import merge_regions
from corrclip.methods.corrclip import CorrClipSettings as Settings
from corrclip.models.build import build_models
from corrclip.runtime.timing import StageTimer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def blobs(h, w, seed):
    """Smooth colour blobs: structure, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32) + rng.uniform(0, 255, 3)
    for _ in range(8):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - g) + rng.uniform(0, 255, 3) * g
    return np.clip(img, 0, 255).astype(np.uint8)


def boxes(h, w, n, seed):
    """Overlapping boxes with arbitrary ids; most pixels stay unsegmented (0), so per-pixel labels matter."""
    rng = np.random.default_rng(seed)
    lm = np.zeros((h, w), np.int64)
    for k in range(1, n + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        lm[y: y + rng.integers(1, h // 3 + 2), x: x + rng.integers(1, w // 3 + 2)] = 5 * k + 3
    return lm


@pytest.fixture(scope="module")
def paths():
    research = bench_module("research_style").ResearchStylePath(build_models("tiny", "random", sam="none"))
    yield research, Segmenter("tiny", "random", sam="none", device="cpu")
    research.close()


VOCAB = "sky; cloud; haze, road, car, tree"  # synonyms on the first class only, as the research code allows


@pytest.mark.parametrize("hw", [(333, 500), (200, 120)])
@pytest.mark.parametrize("prob_thd", [0.0, 0.3])
def test_labels_match_segmenter(paths, hw, prob_thd):
    research, ours = paths
    img, lm = blobs(*hw, hw[0]), boxes(*hw, 6, hw[1])
    labels, timings = research.segment(img, as_vocabulary(VOCAB), Settings(prob_thd=prob_thd), lm)
    expected = ours.segment(img, VOCAB, masks=lm, prob_thd=prob_thd)[0].labels
    assert labels.shape == hw and labels.dtype == np.int32
    assert len(np.unique(expected)) > 1  # a real comparison, not one class everywhere
    assert (labels == expected).mean() >= 0.999
    assert {"preprocess", "text", "dino", "regions", "clip_trunk", "corr_head", "stitch_vote"} <= set(timings)


def test_window_logits_match_engine(paths):
    """One window through both: the research loops (joint mask, outer products) vs the batched modules."""
    research, ours = paths
    s = Settings()
    vocab = as_vocabulary(VOCAB)
    img, lm = blobs(200, 120, 3), boxes(200, 120, 6, 4)
    item = ours.pipeline._prepare(img, lm, s, StageTimer())
    text = ours.pipeline.text(vocab)
    own_text = research.text(vocab)  # its own path: open_clip's encode_text, 77 tokens, one class at a time
    torch.testing.assert_close(own_text, text, atol=2e-6, rtol=1e-5)
    with torch.inference_mode():
        expected, _ = ours.pipeline.method.encode(torch.stack(item.crops), torch.stack(item.mask_crops), text, s,
                                                  StageTimer())
        for crop, mask, want in zip(item.crops, item.mask_crops, expected):
            got = research._window(crop[None], mask, own_text, s, StageTimer())
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_pure_python_dbscan_matches_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    dbscan = bench_module("research_style").dbscan_precomputed
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.normal(size=(int(rng.integers(1, 25)), 4))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        a = x @ x.T
        dist = np.maximum(a.max() - a, 0)
        for min_samples in (1, 2):
            ref = sklearn_cluster.DBSCAN(eps=0.6, min_samples=min_samples, metric="precomputed").fit(dist).labels_
            assert dbscan(dist.tolist(), 0.6, min_samples) == ref.tolist()


def test_merge_matches_engine_kernel(paths):
    """Features with real cluster structure, so some regions merge and some do not."""
    research, _ = paths
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    ids = torch.randint(0, 9, (400,), generator=g) * 3 + 2  # 9 regions, sparse ids, the smallest = "unsegmented"
    region_centre = torch.randint(0, 4, (40,), generator=g)
    feats = centres[region_centre[ids]] + 0.3 * torch.randn(400, 16, generator=g)
    feats = torch.nn.functional.normalize(feats, dim=-1)
    merged = research._merge(ids, feats, 0.2)
    local = torch.unique(ids, return_inverse=True)[1]
    ours = merge_regions(feats[None], local[None], 9, 0.2)[0]
    assert len(torch.unique(merged)) < 9  # something merged
    # Same partition, and the smallest id is the "unsegmented" one in both.
    pairs = set(zip(merged.tolist(), ours.tolist()))
    assert len(pairs) == len(torch.unique(merged)) == len(torch.unique(ours))
    assert torch.equal(merged == ids.min(), ours == -1)
