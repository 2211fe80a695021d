"""The method and backend registries: a fourth method and a fifth backend are one module each.

The toy method and the toy backend are declared here, in the test file only, and run through
`corrclip segment`, `corrclip-export`, `corrclip bench` and `Segmenter.from_bundle` without touching
any other file.
"""

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from corrclip import methods
from corrclip.api import Segmenter
from corrclip.cli import main
from corrclip.engine import backends
from corrclip.export import cli as export_cli
from corrclip.presets import Settings


class VanillaDense(nn.Module):
    """Plain CLIP dense features: every block as trained, ln_post, proj, normalized (a MaskCLIP-like toy)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        from corrclip.models.clip import embed_windows

        x = embed_windows(self.visual, windows)
        for blk in self.visual.transformer.resblocks:
            x = blk(x)
        return F.normalize(self.visual.ln_post(x[:, 1:]) @ self.visual.proj, dim=-1)


class ToyEncoder:
    name = "toy"
    needs_masks = False

    def __init__(self, dense: Callable, patch: int):
        self.dense, self.patch = dense, patch
        self.stages = {"toy_dense": dense}
        self.calls = 0

    def encode(self, windows, masks, text, s, timer):
        self.calls += 1
        h, w = windows.shape[-2:]
        with timer("toy_dense"):
            feats = self.dense(windows)
        logits = (feats @ text.t()).transpose(1, 2)
        return logits.reshape(len(windows), -1, h // self.patch, w // self.patch), None


def _graphs(models, crop):
    from corrclip.export.graphs import dense_graph, text_graph

    return [dense_graph(VanillaDense(models.clip.visual), ["feats"], crop), text_graph(models)]


TOY = methods.Method(
    name="toy", summary="test-only vanilla CLIP", uses_dino=False, uses_regions=False, openai_clip=False,
    defaults=Settings(crop=224, stride=224), presets={"voc21": Settings(crop=224, stride=224, prob_thd=0.1)},
    build_encoder=lambda models, device: ToyEncoder(VanillaDense(models.clip.visual).eval(), 16),
    graphs=_graphs,
    from_graphs=lambda run, mf: ToyEncoder(lambda w: run["clip_dense"](w)[0], mf["clip"]["patch"]),
)


class Recording:
    """A backend that runs ONNX Runtime and records which graphs it ran; it has no float64."""

    ran: list[str] = []

    def __init__(self, bundle, name, device, precision="fp32"):
        self.name = name
        self.inner = backends.get("onnxruntime").make(bundle, name, device, precision)

    def __call__(self, *args):
        Recording.ran.append(self.name)
        return self.inner(*args)


TOY_BACKEND = backends.Backend(name="recording", summary="test-only", reads="onnx", make=Recording, float64=False)


@pytest.fixture
def toy():
    methods.register(TOY)
    backends.register(TOY_BACKEND)
    Recording.ran = []
    yield
    methods.unregister("toy")
    backends.unregister("recording")


def test_toy_method_runs_through_api_cli_export_and_bench(toy, tmp_path):
    seg = Segmenter("tiny", method="toy", device="cpu")
    assert not seg.needs_masks and not seg.has_mask_generator  # uses_regions=False: no SAM built
    assert seg.settings_for("voc21").prob_thd == 0.1
    img = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    out = seg.segment(img, "cat, dog, grass", return_probs=True)[0]
    assert seg.pipeline.method.calls == 1 and out.labels.shape == (100, 150)
    assert "toy_dense" in out.timings

    rc = main(["segment", "examples/example.jpg", "--classes", "cup, table", "--method", "toy", "--backbone", "tiny",
               "--out", str(tmp_path / "seg")])
    assert rc == 0 and json.loads((tmp_path / "seg" / "example.json").read_text())["method"] == "toy"

    bundle = tmp_path / "bundle"
    assert export_cli.main(["--method", "toy", "--backbone", "tiny", "--out", str(bundle)]) == 0
    mf = json.loads((bundle / "manifest.json").read_text())
    assert mf["method"] == "toy" and mf["window"]["crop"] == 224 and set(mf["graphs"]) == {"clip_dense", "clip_text"}

    eng = Segmenter.from_bundle(bundle, "recording", device="cpu")
    got = eng.segment(img, "cat, dog, grass", return_probs=True)[0]
    assert {"clip_dense", "clip_text"} <= set(Recording.ran)
    np.testing.assert_allclose(got.probs, out.probs, atol=1e-4)

    report = tmp_path / "bench.json"
    rc = main(["bench", "--method", "toy", "--backbone", "tiny", "--size", "120x90", "--runs", "1", "--warmup", "0",
               "--no-flops", "--device", "cpu", "--json", str(report)])
    r = json.loads(report.read_text())
    assert rc == 0 and r["method"] == "toy" and r["stages_ms"]["toy_dense"]["p50"] > 0
    assert r["points_per_side"] is None  # no SAM for a method without regions


def test_unknown_names_are_one_line_errors(capsys):
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of corrclip, sc-clip, cliptrase"):
        methods.get("nope")
    with pytest.raises(SystemExit):
        main(["segment", "x.jpg", "--classes", "a", "--method", "nope", "--out", "o"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no setting merge_eps"):
        methods.get("sc-clip").settings(None, merge_eps=0.3)
    with pytest.raises(ValueError, match="stride 336 is larger than the crop 224"):
        methods.get("cliptrase").settings("voc21", crop=224)


def test_backend_without_float64_falls_back_for_sam_decoder(toy):
    class FakeBundle:
        graphs = {"sam_decoder": {"inputs": [{"name": "point_coords", "dtype": "float64"}]},
                  "dino": {"inputs": [{"name": "windows", "dtype": "float32"}]}}

    made = []
    backends.register(backends.Backend(name="onnxruntime", summary="spy", reads="onnx",
                                       make=lambda b, n, d, p: made.append(("ort", n)), checks_export="onnx"))
    backends.register(backends.Backend(name="recording", summary="spy", reads="onnx", float64=False,
                                       make=lambda b, n, d, p: made.append(("rec", n))))
    try:
        backends.make_executor(FakeBundle(), "sam_decoder", "recording")
        backends.make_executor(FakeBundle(), "dino", "recording")
    finally:
        import corrclip.engine.backends.onnxruntime as ort_module

        backends.register(ort_module.BACKEND)
    assert made == [("ort", "sam_decoder"), ("rec", "dino")]


def test_cli_choices_come_from_the_registries(toy, capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = capsys.readouterr().out
    assert "{corrclip,sc-clip,cliptrase,toy}" in text and "recording" in text and "openvino" in text
