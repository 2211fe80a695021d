"""corrclip-export on the tiny preset: the bundle, its validation, atomicity, and the runtime running
from it (ONNX Runtime and AOTInductor) against the torch reference."""

import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
import torch

from corrclip.api import Segmenter
from corrclip.engine.backends import make_executor
from corrclip.engine.bundle import BundleError, load_bundle
from corrclip.export import cli as export_cli
from corrclip.runtime.image_io import decode_image


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    rc = export_cli.main(["--backbone", "tiny", "--format", "onnx,aoti", "--out", str(out)])
    assert rc == 0
    return out


def test_manifest(bundle):
    mf = json.loads((bundle / "manifest.json").read_text())
    assert mf["schema_version"] == 1 and mf["method"] == "corrclip" and mf["backbone"] == "tiny"
    assert set(mf["graphs"]) == {"dino", "clip_trunk", "corr_head", "clip_text", "sam_encoder", "sam_decoder"}
    head = mf["graphs"]["corr_head"]
    assert head["dynamic_axes"]["mct"] == {"0": "B", "1": "R"} and head["dynamic_axes"]["text"] == {"0": "Q"}
    assert [i["name"] for i in head["inputs"]] == ["feats", "region_ids", "values", "mct", "mct_index", "text"]
    for g in mf["graphs"].values():
        checks = {k: v for k, v in g["parity"].items() if isinstance(v, dict)}
        assert len(checks) >= 2 and all(v["max_rel"] <= g["parity"]["tolerance"] for v in checks.values())
        assert {f["format"] for f in g["files"]} == {"onnx", "aoti-cpu"}
    assert mf["preprocessing"]["pixel_mean"] == [122.771, 116.746, 104.094]
    assert mf["versions"]["torch"] == torch.__version__
    assert {k: mf["window"][k] for k in ("crop", "dynamic", "multiple", "max")} == \
        {"crop": 336, "dynamic": True, "multiple": 56, "max": 2016}
    for name in ("dino", "clip_trunk", "corr_head"):  # every graph that takes windows: checked on non-square ones
        sides = {tuple(map(int, re.search(r"H=(\d+),W=(\d+)", k).groups())) for k in mf["graphs"][name]["parity"]
                 if "@" in k}
        assert (336, 336) in sides and any(h != w for h, w in sides), (name, sides)
    assert mf["graphs"]["dino"]["inputs"][0]["shape"] == ["B", 3, "H", "W"]


def test_refuses_corrupted_or_foreign_bundles(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    load_bundle(copy)
    (copy / "dino.onnx").write_bytes((copy / "dino.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)
    mf = json.loads((bundle / "manifest.json").read_text())
    mf["schema_version"] = 999
    shutil.copytree(bundle, tmp_path / "other")
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(BundleError, match="re-export"):
        load_bundle(tmp_path / "other")
    with pytest.raises(BundleError, match="corrclip-export"):
        load_bundle(tmp_path)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def boom(graph, *a, **k):
        raise export_cli.ParityError(f"graph {graph.name} differs (simulated)")

    monkeypatch.setattr(export_cli, "check_parity", boom)
    out = tmp_path / "b"
    assert export_cli.main(["--backbone", "tiny", "--sam", "none", "--out", str(out)]) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_bundle_is_not_overwritten_silently(bundle, capsys):
    assert export_cli.main(["--backbone", "tiny", "--out", str(bundle)]) == 2
    assert "--overwrite" in capsys.readouterr().err


needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino extra absent")


def _inputs():
    img = decode_image("examples/example.jpg")
    rng = np.random.default_rng(0)
    lm = np.zeros(img.shape[:2], np.int64)
    for k in range(1, 15):
        y, x = rng.integers(0, img.shape[0] - 40), rng.integers(0, img.shape[1] - 40)
        lm[y: y + rng.integers(10, 120), x: x + rng.integers(10, 160)] = k
    return img, lm


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti", pytest.param("openvino", marks=needs_openvino)])
def test_runtime_from_bundle_matches_torch(bundle, backend):
    img, lm = _inputs()
    ref = Segmenter("tiny", device="cpu").segment(img, preset="voc21", masks=lm, return_probs=True)[0]
    eng = Segmenter.from_bundle(bundle, backend, device="cpu")
    out = eng.segment(img, preset="voc21", masks=lm, return_probs=True)[0]
    assert (out.labels == ref.labels).mean() >= 0.999
    np.testing.assert_allclose(out.probs, ref.probs, atol=2e-4)
    # SAM from the bundle too: same label maps as the torch mask generator.
    from corrclip.runtime.amg import AmgSettings

    loose = AmgSettings(points_per_side=4, pred_iou_thresh=-10, stability_score_thresh=-10)
    ref_masks = Segmenter("tiny", device="cpu", amg=loose).pipeline.mask_generator.label_map(img)
    eng = Segmenter.from_bundle(bundle, backend, device="cpu", amg=loose)
    eng_masks = eng.pipeline.mask_generator.label_map(img)
    assert ref_masks.max() > 0 and (eng_masks == ref_masks).mean() >= 0.999


def test_head_logits_within_1e4(bundle):
    """The fp32 logits of the exported head agree with torch within 1e-4 on fresh inputs."""
    from corrclip.export.graphs import method_graphs
    from corrclip.models.build import build_models

    graphs = {g.name: g for g in method_graphs("corrclip", build_models("tiny", sam="none"), 336)}
    head = graphs["corr_head"]
    inputs = head.make_inputs({"B": 3, "R": 11, "Q": 21, "H": 280, "W": 392}, torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = head.module(*inputs)
    for backend in ("onnxruntime", "aoti"):
        (out,) = make_executor(load_bundle(bundle), "corr_head", backend)(*inputs)
        assert float((out - ref).abs().max()) < 1e-4


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_bundle_takes_windows_of_a_wide_image(bundle, backend):
    """Aspect ratio 10: the 2048 long-side cap leaves a 205-pixel short side, so the windows are 224 x 336
    (padded), not the bundle's 336 x 336; the bundle runs them as the torch path does."""
    from corrclip.runtime.preprocess import resized_size, sliding_windows

    img = np.random.default_rng(3).integers(0, 256, (40, 400, 3), dtype=np.uint8)
    lm = (np.arange(400)[None, :] // 37 + 11 * (np.arange(40)[:, None] // 13)).astype(np.int64)
    assert {w.padded_size for w in sliding_windows(*resized_size(40, 400, 336), 336, 112)} == {(224, 336)}
    ref = Segmenter("tiny", device="cpu", sam="none").segment(img, "cat, dog, sky", masks=lm, return_probs=True)[0]
    eng = Segmenter.from_bundle(bundle, backend, device="cpu")
    out = eng.segment(img, "cat, dog, sky", masks=lm, return_probs=True)[0]
    assert (out.labels == ref.labels).mean() >= 0.999
    np.testing.assert_allclose(out.probs, ref.probs, atol=2e-4)


def test_bundle_with_fixed_windows_says_re_export(bundle, tmp_path):
    """A bundle exported before windows were dynamic takes only crop x crop windows: the error says to re-export
    it, not to pass the --crop already in use."""
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    mf = json.loads((old / "manifest.json").read_text())
    mf["window"] = {"crop": 336, "note": "graphs are built for crop x crop windows"}
    (old / "manifest.json").write_text(json.dumps(mf))
    img, lm = _inputs()
    with pytest.raises(ValueError, match=r"takes only 336x336 windows .* re-export the bundle") as e:
        Segmenter.from_bundle(old, device="cpu").segment(img[:, :40], "cat, dog", masks=lm[:, :40])
    assert "--crop 336" not in str(e.value)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_host_runs_aoti_package(bundle, tmp_path):
    """examples/cpp/run_aoti loads an exported package and gives Python's numbers."""
    import os
    import subprocess
    import sys

    from corrclip.engine.tensorfile import load_tensors, save_tensors

    exe = tmp_path / "run_aoti"
    env = {**os.environ, "OUT": str(exe), "PYTHON": sys.executable}
    subprocess.run(["bash", "examples/cpp/build.sh"], check=True, env=env, capture_output=True)
    windows = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    save_tensors(tmp_path / "in.cct", [windows])
    pkg = load_bundle(bundle).graph_file("dino", "aoti-cpu")
    subprocess.run([str(exe), str(pkg), str(tmp_path / "in.cct"), str(tmp_path / "out.cct")], check=True,
                   capture_output=True)
    (cpp,) = load_tensors(tmp_path / "out.cct")
    (py,) = make_executor(load_bundle(bundle), "dino", "aoti")(windows)
    assert cpp.shape == py.shape == (2, 42 * 42, 64)
    torch.testing.assert_close(cpp, py, atol=1e-6, rtol=1e-6)


def test_tensor_file_round_trip(tmp_path):
    from corrclip.engine.tensorfile import load_tensors, save_tensors

    ts = [torch.randn(2, 3), torch.arange(5), torch.tensor([True, False]), torch.randn(1, 2).half()]
    save_tensors(tmp_path / "t.cct", ts)
    for a, b in zip(ts, load_tensors(tmp_path / "t.cct")):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_segment_cli_with_engine(bundle, tmp_path, capsys):
    from PIL import Image

    from corrclip.cli import main

    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(img)
    lm = tmp_path / "a.npz"
    np.savez(lm, instance_mask=(np.arange(60 * 80).reshape(60, 80) // 1200).astype(np.int32))
    rc = main(["segment", str(img), "--classes", "a, b", "--masks", str(lm), "--engine", str(bundle),
               "--out", str(tmp_path / "out")])
    assert rc == 0 and (tmp_path / "out" / "a_labels.png").is_file()
    assert "RANDOM weights" in capsys.readouterr().err
    assert main(["segment", str(img), "--classes", "a", "--engine", str(tmp_path), "--out", str(tmp_path)]) == 2


def test_tensorrt_backend_is_explained_when_absent(bundle):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BundleError, match="TensorRT is not installed"):
            make_executor(load_bundle(bundle), "dino", "tensorrt", "cpu")
    else:  # pragma: no cover - only where TensorRT exists (never on our CI)
        pytest.skip("TensorRT present: covered by a GPU run, not by CI")


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_bench_runs_on_bundle_backends(bundle, backend, tmp_path):
    from corrclip.cli import main

    out = tmp_path / "b.json"
    rc = main(["bench", "--engine", str(bundle), "--backend", backend, "--synthetic", "1", "--size", "120x90",
               "--points-per-side", "4", "--runs", "2", "--warmup", "0", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["backend"] == backend and r["stages_ms"]["corr_head"]["p50"] > 0 and r["flops_source"] is None


def test_tensorrt_profiles_are_consistent(bundle):
    """One window per profile end (56 x 56, then the crop): every window-derived axis agrees with it."""
    from corrclip.engine.backends.tensorrt import profile_shapes

    mf = load_bundle(bundle).manifest
    shapes = {(g, i["name"]): profile_shapes(i["shape"], mf) for g, e in mf["graphs"].items() for i in e["inputs"]}
    for end, side in zip(range(3), (56, 336, 336)):
        cells, grid = side // 8, side // 16
        assert shapes["dino", "windows"][end][2:] == [side, side]
        assert shapes["clip_trunk", "regions"][end][2] == grid * grid
        assert shapes["corr_head", "feats"][end][1] == cells * cells
        assert shapes["corr_head", "region_ids"][end][1:] == shapes["corr_head", "mct_index"][end][1:] == [cells] * 2
        assert shapes["corr_head", "values"][end][3:] == [grid, grid]
    assert shapes["corr_head", "text"] == ([1, 32], [256, 32], [4096, 32])


@needs_openvino
def test_openvino_precision_is_applied(bundle):
    """bf16 inference precision changes the numbers (it ran), within the bf16 export tolerance of fp32."""
    from corrclip.engine.backends.openvino import cpu_has

    windows = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    (f32,) = make_executor(load_bundle(bundle), "dino", "openvino", "cpu", "fp32")(windows)
    (ort,) = make_executor(load_bundle(bundle), "dino", "onnxruntime", "cpu")(windows)
    assert float((f32 - ort).abs().max()) < 1e-4
    if not cpu_has("bf16"):
        pytest.skip("no bf16 units on this CPU: OpenVINO falls back to f32")
    (bf16,) = make_executor(load_bundle(bundle), "dino", "openvino", "cpu", "bf16")(windows)
    err = float((bf16 - ort).abs().max() / ort.abs().max())
    assert 0 < err < 5e-2
