"""End to end on the tiny preset: image shapes, batches of mixed sizes, voting, probabilities."""

import time

import numpy as np
import pytest

from corrclip.api import Segmenter, as_vocabulary


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter("tiny", sam="none", device="cpu")


def boxes_label_map(h, w, n, seed):
    rng = np.random.default_rng(seed)
    lm = np.zeros((h, w), np.int64)
    for k in range(1, n + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        lm[y: y + rng.integers(1, h // 2 + 2), x: x + rng.integers(1, w // 2 + 2)] = 5 * k + 3
    return lm


def image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw", [(333, 500), (50, 40), (40, 800), (336, 336)])
def test_shapes(segmenter, hw):
    """Includes an image smaller than the crop and one so elongated that windows are padded."""
    img, lm = image(*hw, 0), boxes_label_map(*hw, 6, 1)
    start = time.perf_counter()
    out = segmenter.segment(img, "sky; cloud, road, car, tree", masks=lm, return_probs=True)[0]
    wall = time.perf_counter() - start
    assert out.labels.shape == hw and out.labels.dtype == np.int32
    assert out.labels.min() >= 0 and out.labels.max() < 4
    assert out.names == ["sky", "road", "car", "tree"]
    assert out.probs.shape == (4, *hw) and np.all(out.probs <= 1) and np.all(out.probs >= 0)
    # Every stage ran and was timed (masks were given: no SAM stage), within the call's own wall time.
    assert set(out.timings) == {"preprocess", "text", "dino", "regions", "clip_trunk", "corr_head", "stitch_vote"}
    assert all(v > 0 for v in out.timings.values()) and sum(out.timings.values()) <= wall
    # Voting: every pixel of a segmented region (not the smallest id) carries one label.
    for v in np.unique(lm)[1:]:
        assert len(np.unique(out.labels[lm == v])) == 1


def test_batch_of_mixed_sizes_equals_single_runs(segmenter):
    shapes = [(333, 500), (200, 120), (336, 336)]
    imgs = [image(*s, i) for i, s in enumerate(shapes)]
    lms = [boxes_label_map(*s, 5, 10 + i) for i, s in enumerate(shapes)]
    batch = segmenter.segment(imgs, "cat, dog, grass", masks=lms, return_probs=True)
    for i in range(3):
        single = segmenter.segment(imgs[i], "cat, dog, grass", masks=lms[i], return_probs=True)[0]
        np.testing.assert_allclose(batch[i].probs, single.probs, atol=1e-5)
        assert (batch[i].labels == single.labels).mean() > 0.999


def test_prob_threshold_sends_pixels_to_class_zero(segmenter):
    img, lm = image(120, 160, 3), np.zeros((120, 160), np.int64)  # one region = unsegmented: no vote
    classes = "a, b, c, d, e, f, g, h"
    low = segmenter.segment(img, classes, masks=lm, return_probs=True)[0]
    best = low.probs.max(0)
    thd = float(np.median(best))
    high = segmenter.segment(img, classes, masks=lm, prob_thd=thd, return_probs=True)[0]
    below = best < thd
    assert below.any() and (~below).any()
    assert np.all(high.labels[below] == 0)
    assert np.array_equal(high.labels[~below], low.labels[~below])


def test_preset_vocabulary_and_settings(segmenter):
    img, lm = image(100, 150, 4), boxes_label_map(100, 150, 3, 5)
    out = segmenter.segment(img, preset="voc21", masks=lm)[0]
    assert len(out.names) == 21 and out.names[0] == "background"
    assert as_vocabulary(["sky; cloud", "road"]).num_queries == 3


def test_bundle_window_limits():
    """A bundle's graphs take any window in multiples of 56 up to its max; a larger --crop is refused in one line."""
    from corrclip.runtime.pipeline import check_window

    spec = {"crop": 336, "dynamic": True, "multiple": 56, "max": 2016}
    for h, w, crop in ((224, 336, 336), (336, 224, 336), (56, 2016, 2048), (448, 448, 448)):
        check_window(spec, h, w, crop)
    with pytest.raises(ValueError, match="up to 2016x2016 pixels .* use a smaller --crop"):
        check_window(spec, 336, 2072, 2072)
