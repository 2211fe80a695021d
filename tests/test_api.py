"""Segmenter.segment's inputs and refusals: paths, bytes, arrays, 4-D batches; unknown method, no classes,
and label maps that do not match the images."""

import io

import numpy as np
import pytest
from PIL import Image

from corrclip.api import Segmenter


@pytest.fixture(scope="module")
def seg():
    return Segmenter("tiny", sam="none", device="cpu")


def regions(h, w, seed):
    lm = np.zeros((h, w), np.int64)
    lm[: h // 2] = 1 + seed
    lm[:, w // 3:] = 5
    return lm


IMAGES = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(2)]


def test_paths_bytes_arrays_and_4d_batches_agree(seg, tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(IMAGES[0]).save(png)
    buffer = io.BytesIO()
    Image.fromarray(IMAGES[1]).save(buffer, format="PNG")
    lms = [regions(48, 64, 0), regions(48, 64, 1)]
    ref = [seg.segment(img, "cat, dog, sky", masks=lm, return_probs=True)[0] for img, lm in zip(IMAGES, lms)]
    for images, masks, which in [(str(png), lms[0], [0]),
                                 (np.stack(IMAGES), lms, [0, 1]),  # one [N, H, W, 3] array = N images
                                 ([png, buffer.getvalue()], lms, [0, 1])]:  # a Path and encoded bytes
        out = seg.segment(images, "cat, dog, sky", masks=masks, return_probs=True)
        assert len(out) == len(which)
        for o, i in zip(out, which):
            assert np.array_equal(o.labels, ref[i].labels)
            np.testing.assert_allclose(o.probs, ref[i].probs, atol=1e-5)


def test_refusals(seg):
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of corrclip, sc-clip, cliptrase"):
        Segmenter("tiny", method="nope", device="cpu")
    with pytest.raises(ValueError, match="give classes .* or a preset"):
        seg.segment(IMAGES[0], masks=regions(48, 64, 0))
    with pytest.raises(ValueError, match="got 1 label maps for 2 images"):
        seg.segment(IMAGES, "cat, dog", masks=[regions(48, 64, 0)])
    with pytest.raises(ValueError, match="no region masks"):
        seg.segment(IMAGES[0], "cat, dog")  # sam="none" and no label map
