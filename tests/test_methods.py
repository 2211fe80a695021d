"""SC-CLIP and CLIPtrase as methods of the same engine: end to end, shared machinery, bundles."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cliptrase import literal_cluster_regions, reference_dbscan

import corrclip.runtime.pipeline as pipeline_module
from corrclip.api import Segmenter, as_vocabulary
from corrclip.cli import main
from corrclip.export import cli as export_cli
from corrclip.kernels.stitch import stitch
from corrclip.runtime.image_io import decode_image
from corrclip.runtime.preprocess import cut_window, normalize, resize_image, sliding_windows
from corrclip.vocab import benchmark_vocabulary


@pytest.fixture(scope="module")
def image():
    return decode_image("examples/example.jpg")


@pytest.fixture(scope="module")
def blocks():
    """Six flat colour blocks, 240 x 360 (two overlapping 336 windows after the resize): with the tiny random
    weights, unlike a photo, they give SC-CLIP and CLIPtrase features that differ enough across the image for
    several classes and several clusters to appear."""
    img = np.zeros((240, 360, 3), np.uint8)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (255, 255, 0)]):
        r, c = divmod(i, 3)
        img[r * 120:(r + 1) * 120, c * 120:(c + 1) * 120] = colour
    return img


# Presets under which the tiny random weights give several classes on `blocks` (SC-CLIP's VOC21 area and
# probability thresholds send everything to background there).
VARIED = {"sc-clip": "voc20", "cliptrase": "voc21"}
CLASSES = "cup, table, wall, plant, person, sky, car, dog"


@pytest.fixture(scope="module")
def segmenters():
    return {m: Segmenter("tiny", method=m, device="cpu", sam="none") for m in ("corrclip", "sc-clip", "cliptrase")}


def label_map(img):
    lm = np.zeros(img.shape[:2], np.int64)
    lm[50:200, 100:300] = 1
    lm[150:330, 250:480] = 2
    return lm


@pytest.mark.parametrize("method", ["sc-clip", "cliptrase"])
def test_end_to_end(segmenters, blocks, method):
    preset = VARIED[method]
    c = len(benchmark_vocabulary(preset).names)
    out = segmenters[method].segment(blocks, preset=preset, return_probs=True)[0]
    assert out.labels.shape == blocks.shape[:2] and 0 <= out.labels.min() and out.labels.max() < c
    assert len(np.unique(out.labels)) >= 3  # several classes: a check a constant label map fails
    assert out.probs.shape == (c, *blocks.shape[:2])
    expected = {"preprocess", "text", "clip_dense", "stitch_vote"} | ({"regions"} if method == "cliptrase" else set())
    assert set(out.timings) == expected


def test_scclip_end_to_end_against_reference(segmenters, blocks):
    """SC-CLIP through the engine against its parts: the dense graph on each 224 window (checked against a
    literal loop in test_scclip.py), cosine logits with the text, stitched and softmaxed at VOC20's settings."""
    seg = segmenters["sc-clip"]
    vocab = benchmark_vocabulary("voc20")
    s = seg.settings_for("voc20")
    out = seg.segment(blocks, preset="voc20", return_probs=True)[0]
    resized = resize_image(blocks, s.short_side, s.long_cap)
    windows = sliding_windows(*resized.shape[:2], s.crop, s.stride)
    crops = torch.stack([cut_window(normalize(resized), w) for w in windows])
    text = seg.pipeline.text(vocab)
    with torch.no_grad():
        feats = seg.pipeline.method.dense(crops)  # [B, n, E]
    grid = (s.crop // 16, s.crop // 16)
    logits = torch.stack([(f @ text.t()).t().reshape(-1, *grid) for f in feats])
    probs = (stitch(logits, windows, resized.shape[:2], blocks.shape[:2]) * s.logit_scale).softmax(0)
    assert len(windows) == 8 and s.prob_thd == 0 and s.area_thd is None
    np.testing.assert_allclose(out.probs, probs.numpy(), atol=1e-5)
    assert (out.labels == probs.argmax(0).numpy()).mean() >= 0.999


def reference_window_regions(corr, grid, crop, eps, min_samples):
    """CLIPtrase's regions of one window: scikit-learn's DBSCAN and the research script's cluster maps."""
    labels = torch.from_numpy(reference_dbscan(corr.numpy(), eps, min_samples))
    regions = literal_cluster_regions(corr, labels, grid, (crop, crop))
    return torch.full((crop, crop), -1) if regions is None else regions


def reference_paint(window_regions, windows, input_size, output_size):
    """Each pixel takes the region of the last window covering it (later windows win), shifted by the ids
    the earlier windows used (ids from 1, -1 -> 0), then nearest-resampled to the original size."""
    offsets, total = [], 1
    for r in window_regions:
        offsets.append(total)
        total += int(r.max()) + 1
    owner = torch.full(input_size, -1)
    for b, win in enumerate(windows):
        owner[win.y1:win.y2, win.x1:win.x2] = b
    assert (owner >= 0).all()
    canvas = torch.zeros(input_size, dtype=torch.long)
    for y in range(input_size[0]):
        for b in owner[y].unique().tolist():
            win, xs = windows[b], (owner[y] == b).nonzero()[:, 0]
            left, _, top, _ = win.pad
            r = window_regions[b][top + y - win.y1, left + xs - win.x1]
            canvas[y, xs] = torch.where(r >= 0, r + offsets[b], 0)
    out = F.interpolate(canvas[None, None].double(), size=output_size, mode="nearest")[0, 0].long()
    return out, total


def test_cliptrase_end_to_end_against_reference(segmenters, blocks, monkeypatch):
    """CLIPtrase through the engine against a reference built from its parts: class maps times the CLS logits
    (the VOC20 prior), scikit-learn's DBSCAN on each window's correlation rows, the research script's cluster
    maps, windows painted in order, and a torch.mode vote in every painted region."""
    seg = segmenters["cliptrase"]
    vocab = as_vocabulary(CLASSES)
    s = seg.settings_for(None, cls_prior=True)
    painted, paint = [], pipeline_module.paint_window_regions

    def spy(*args):
        painted.append(paint(*args))
        return painted[-1]

    monkeypatch.setattr(pipeline_module, "paint_window_regions", spy)
    out = seg.segment(blocks, vocab, cls_prior=True, return_probs=True)[0]
    fused = seg.segment(blocks, vocab, cls_prior=True)[0]  # the fused stitch-classify-vote path

    resized = resize_image(blocks, s.short_side, s.long_cap)
    windows = sliding_windows(*resized.shape[:2], s.crop, s.stride)
    assert len(windows) == 2 and windows[0].x2 > windows[1].x1  # two windows that overlap
    crops = torch.stack([cut_window(normalize(resized), w) for w in windows])
    text = seg.pipeline.text(vocab)
    grid = (s.crop // 16, s.crop // 16)
    with torch.no_grad():
        feats, cls, corr = seg.pipeline.method.dense(crops)
    logits = torch.stack([((f @ text.t()) * (c @ text.t())).t().reshape(-1, *grid) for f, c in zip(feats, cls)])
    regions = [reference_window_regions(c, grid, s.crop, s.cluster_eps, s.cluster_min_samples) for c in corr]
    ref_map, ref_count = reference_paint(regions, windows, resized.shape[:2], blocks.shape[:2])
    assert len(painted) == 2 and all(torch.equal(m, ref_map) and k == ref_count for m, k in painted)
    assert len(ref_map.unique()) >= 4  # clusters found in both windows

    probs = (stitch(logits, windows, resized.shape[:2], blocks.shape[:2]) * s.logit_scale).softmax(0)
    np.testing.assert_allclose(out.probs, probs.numpy(), atol=1e-5)
    labels = probs.argmax(0)
    for r in ref_map.unique().tolist():
        if r > 0:
            labels[ref_map == r] = torch.mode(labels[ref_map == r]).values
    assert (out.labels == labels.numpy()).mean() >= 0.999 and len(np.unique(out.labels)) >= 3
    assert (fused.labels == out.labels).mean() >= 0.999


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
def test_bundle_matches_torch(bundles, blocks, segmenters, method):
    out = bundles(method)
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["method"] == method and set(mf["graphs"]) == {"clip_dense", "clip_text"}
    # VOC20: CLIPtrase's CLS prior runs on the exported graph's CLS output too.
    ref = segmenters[method].segment(blocks, preset="voc20", return_probs=True)[0]
    eng = Segmenter.from_bundle(out, device="cpu").segment(blocks, preset="voc20", return_probs=True)[0]
    assert len(np.unique(ref.labels)) >= 3  # several classes: agreement means something
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
    assert r["runs"] == 2 and r["method"] == method and r["image_sizes"] == [[120, 160]]
    assert (r["queries"], r["classes"]) == (46, 21)  # voc21 by default
    stages = r["stages_ms"]
    expected = {"preprocess", "text", "stitch_vote"} | (
        {"masks", "masks.preprocess", "masks.sam_encoder", "masks.prompt_decoding", "masks.mask_postprocess", "dino",
         "regions", "clip_trunk", "corr_head"} if method == "corrclip" else {"clip_dense"})
    assert set(stages) == expected
    for v in stages.values():
        assert 0 < v["p50"] <= v["p90"] <= v["p99"]
    # Two runs: p50 is their mean, the stages are timed inside the wall time, images/s = 1 / median wall.
    total = r["total_ms"]["p50"]
    assert sum(v["p50"] for k, v in stages.items() if "." not in k) <= total
    assert r["images_per_s"] == pytest.approx(1000 / total, rel=1e-9)
    key = "clip_trunk" if method == "corrclip" else "clip_dense"
    assert stages[key]["gflop"] > 0
    assert stages[key]["floor_ms_compute"] == pytest.approx(stages[key]["gflop"] * 1e12 / r["ceilings"]["matmul_flops"])
    if method == "corrclip":
        from corrclip.models.sam import build_sam

        encoder = build_sam("tiny", "random").image_encoder
        assert stages["masks.sam_encoder"]["weight_mb"] == pytest.approx(
            sum(p.numel() * p.element_size() for p in encoder.parameters()) / 1e6)
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
