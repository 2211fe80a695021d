"""The eight mmseg layouts: found from --data-root, listed in mmseg's order, labels decoded as mmseg does."""

import numpy as np
import pytest
from PIL import Image
from synthetic_datasets import make_dataset

from corrclip.evaluation.datasets import LAYOUTS, DatasetError, open_dataset


@pytest.mark.parametrize("preset", list(LAYOUTS))
def test_layout_reads_back_the_truth(tmp_path, preset):
    root, _, truths = make_dataset(tmp_path / "data", preset, n=3)
    for data_root in (tmp_path / "data", root):  # a folder above the dataset, or the dataset itself
        ds = open_dataset(preset, data_root)
        assert ds.root == root
        assert [s.id for s in ds.samples] == sorted(truths)
        for s in ds.samples:
            assert np.array_equal(ds.load_label(s), truths[s.id]), s.id


def test_scan_order_is_sorted_path_order(tmp_path):
    root, _, _ = make_dataset(tmp_path / "data", "ade20k", n=3)
    img = root / "images/validation"
    ann = root / "annotations/validation"
    for name in ("b_0", "a_9", "sub/c"):  # mmseg walks recursively and sorts by path
        (img / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24)).save(img / f"{name}.jpg")
        (ann / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (24, 24)).save(ann / f"{name}.png")
    ids = [s.id for s in open_dataset("ade20k", tmp_path / "data").samples]
    assert ids == sorted(ids) and {"a_9", "b_0", "sub/c"} <= set(ids)


def _break(root, preset):
    """Each case: (what to break, text the one-line error must contain)."""
    cases = {
        "voc21": (lambda: (root / "ImageSets/Segmentation/val.txt").unlink(), "ImageSets/Segmentation/val.txt"),
        "voc20": (lambda: _rmtree(root / "SegmentationClass"), "SegmentationClass"),
        "context59": (lambda: (root / "SegmentationClassContext/2007_000001.png").unlink(), "2007_000001.png"),
        "coco_object": (lambda: [p.rename(p.with_name(p.name.replace("_instanceTrainIds", "_labelTrainIds")))
                                 for p in (root / "annotations/val2017").iterdir()], "_instanceTrainIds.png"),
        "ade20k": (lambda: _rmtree(root / "images"), "images/validation"),
        "city_scapes": (lambda: (root / "gtFine/val/frankfurt/frankfurt_000000_000000_gtFine_labelTrainIds.png")
                        .write_bytes(b"not a png"), "not a readable PNG"),
    }
    return cases[preset]


def _rmtree(path):
    import shutil

    shutil.rmtree(path)


@pytest.mark.parametrize("preset", ["voc21", "voc20", "context59", "coco_object", "ade20k", "city_scapes"])
def test_bad_layouts_say_what_is_expected(tmp_path, preset):
    root, _, _ = make_dataset(tmp_path / "data", preset)
    breaker, needle = _break(root, preset)
    breaker()
    with pytest.raises(DatasetError) as e:
        ds = open_dataset(preset, tmp_path / "data")
        for s in ds.samples:
            ds.load_label(s)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_colour_label_maps_are_refused(tmp_path):
    root, _, _ = make_dataset(tmp_path / "data", "ade20k", n=1)
    label = next((root / "annotations/validation").iterdir())
    Image.new("RGB", (24, 24), (1, 2, 3)).save(label)
    ds = open_dataset("ade20k", root)
    with pytest.raises(DatasetError, match="single-channel"):
        ds.load_label(ds.samples[0])
