"""SC-CLIP and CLIPtrase as methods of the same engine: end to end, shared machinery, bundles."""

import json

import numpy as np
import pytest

import corrclip.runtime.pipeline as pipeline_module
from corrclip.api import Segmenter
from corrclip.cli import main
from corrclip.export import cli as export_cli
from corrclip.runtime.image_io import decode_image


@pytest.fixture(scope="module")
def image():
    return decode_image("examples/example.jpg")


@pytest.fixture(scope="module")
def segmenters():
    return {m: Segmenter("tiny", method=m, device="cpu", sam="none") for m in ("corrclip", "sc-clip", "cliptrase")}


def label_map(img):
    lm = np.zeros(img.shape[:2], np.int64)
    lm[50:200, 100:300] = 1
    lm[150:330, 250:480] = 2
    return lm


@pytest.mark.parametrize("method", ["sc-clip", "cliptrase"])
def test_end_to_end(segmenters, image, method):
    out = segmenters[method].segment(image, preset="voc21", return_probs=True)[0]
    assert out.labels.shape == image.shape[:2] and 0 <= out.labels.min() and out.labels.max() < 21
    assert out.probs.shape == (21, *image.shape[:2])
    assert "clip_dense" in out.timings and "dino" not in out.timings and "masks" not in out.timings
    if method == "cliptrase":
        assert "regions" in out.timings


def test_methods_use_their_settings(segmenters):
    assert segmenters["sc-clip"].settings_for("voc21").area_thd == 0.1
    assert segmenters["sc-clip"].settings_for("voc21").crop == 224
    assert segmenters["cliptrase"].settings_for("voc20").cls_prior
    assert segmenters["corrclip"].settings_for("voc21").prob_thd == 0.2


def test_three_methods_share_one_code_path(segmenters, image, monkeypatch):
    """Windows, stitching, classification and voting are the pipeline's functions for every method."""
    calls = {}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.setdefault(name, set()).add(current)
            return fn(*a, **k)
        monkeypatch.setattr(pipeline_module, name, wrapped)

    for name in ("sliding_windows", "resize_image", "stitch", "classify", "vote", "stitch_classify_vote"):
        spy(name, getattr(pipeline_module, name))
    for current in ("corrclip", "sc-clip", "cliptrase"):
        seg = segmenters[current]
        seg.segment(image, "cup, table", masks=label_map(image), return_probs=True)
        seg.segment(image, "cup, table", masks=label_map(image))
    everyone = {"corrclip", "sc-clip", "cliptrase"}
    assert calls["sliding_windows"] == calls["resize_image"] == calls["stitch"] == calls["classify"] == everyone
    assert {"corrclip", "cliptrase"} <= calls["vote"]  # the methods with regions vote the same way
    assert type(segmenters["sc-clip"].pipeline) is type(segmenters["corrclip"].pipeline)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One bundle per method, exported on first use."""
    made = {}

    def get(method):
        if method not in made:
            out = tmp_path_factory.mktemp("bundles") / method
            assert export_cli.main(["--method", method, "--backbone", "tiny", "--out", str(out)]) == 0
            made[method] = out
        return made[method]

    return get


@pytest.mark.parametrize("method", ["sc-clip", "cliptrase"])
def test_bundle_matches_torch(bundles, image, segmenters, method):
    out = bundles(method)
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["method"] == method and set(mf["graphs"]) == {"clip_dense", "clip_text"}
    ref = segmenters[method].segment(image, preset="voc21", return_probs=True)[0]
    eng = Segmenter.from_bundle(out, device="cpu").segment(image, preset="voc21", return_probs=True)[0]
    assert (eng.labels == ref.labels).mean() >= 0.999
    np.testing.assert_allclose(eng.probs, ref.probs, atol=1e-3)


def test_scclip_bundle_takes_a_small_image(bundles, segmenters):
    """200x150 at short side 224 with 336 windows: the windows are 224 x 336, the bundle runs them like torch."""
    from corrclip.runtime.preprocess import resized_size, sliding_windows

    img = np.random.default_rng(5).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    settings = dict(short_side=224, crop=336)
    assert {w.padded_size for w in sliding_windows(*resized_size(150, 200, 224), 336, 112)} == {(224, 336)}
    ref = segmenters["sc-clip"].segment(img, "cat, dog, grass, sky", return_probs=True, **settings)[0]
    eng = Segmenter.from_bundle(bundles("sc-clip"), device="cpu")
    out = eng.segment(img, "cat, dog, grass, sky", return_probs=True, **settings)[0]
    assert (out.labels == ref.labels).mean() >= 0.999
    np.testing.assert_allclose(out.probs, ref.probs, atol=1e-3)


def test_cli_method_flag(tmp_path):
    rc = main(["segment", "examples/example.jpg", "--classes", "cup, table", "--method", "sc-clip", "--backbone",
               "tiny", "--out", str(tmp_path)])
    assert rc == 0
    assert json.loads((tmp_path / "example.json").read_text())["method"] == "sc-clip"


@pytest.mark.parametrize("method", ["corrclip", "sc-clip"])
def test_bench(tmp_path, method, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backbone", "tiny", "--method", method, "--synthetic", "1", "--size", "160x120",
               "--points-per-side", "4", "--runs", "2", "--warmup", "0", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["runs"] == 2 and r["total_ms"]["p50"] > 0 and r["images_per_s"] > 0
    stages = r["stages_ms"]
    key = "clip_trunk" if method == "corrclip" else "clip_dense"
    assert stages[key]["p50"] > 0 and stages[key]["gflop"] > 0 and stages[key]["floor_ms_compute"] > 0
    if method == "corrclip":
        assert "masks" in stages and stages["masks.sam_encoder"]["weight_mb"] > 0
    assert "p99" in capsys.readouterr().out


def test_random_weights_never_download_openai_clip(monkeypatch):
    """SC-CLIP/CLIPtrase default to OpenAI's CLIP architecture; with --weights random that must stay offline."""
    import open_clip

    from corrclip.models.clip import build_clip

    seen = []

    def spy(name, pretrained=None, **kw):
        seen.append((name, pretrained))
        if pretrained:
            raise AssertionError(f"tried to fetch {name}:{pretrained}")
        return build_clip("tiny", "random")  # stands in for the full-size architecture: no weights needed

    monkeypatch.setattr(open_clip, "create_model", spy)
    seg = Segmenter("vit_b", "random", method="sc-clip", device="cpu")
    assert seen == [("ViT-B-16", None)] and seg.identity["clip"] == "ViT-B-16:random"
