"""corrclip-export on the tiny preset: the bundle, its validation, atomicity, and the runtime running
from it (ONNX Runtime and AOTInductor) against the torch reference."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

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
    assert set(mf["graphs"]) == {"dino", "clip_trunk", "corr_head", "clip_text", "sam_encoder", "sam_image_terms",
                                 "sam_prompt_tokens", "sam_prompt_masks"}
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


def _set(path: str, value):
    """An edit of the manifest at a dotted path (value DELETE removes the key)."""
    def edit(mf):
        *parents, last = path.split(".")
        for key in parents:
            mf = mf[int(key)] if isinstance(mf, list) else mf[key]
        if value is DELETE:
            del mf[last]
        else:
            mf[last] = value
    return edit


DELETE = object()
MANIFEST_DEFECTS = {  # defect -> (edit, what the one-line error must say)
    "no graphs": (_set("graphs", DELETE), "the manifest has no 'graphs'"),
    "empty graphs": (_set("graphs", {}), "lists no graphs"),
    "graph not an object": (_set("graphs.dino", "dino.onnx"), "graphs.dino is a string, expected an object"),
    "files not a list": (_set("graphs.dino.files", "dino.onnx"), "graphs.dino.files is a string, expected a list"),
    "no files": (_set("graphs.dino.files", []), "graphs.dino lists no files"),
    "file without hash": (_set("graphs.dino.files.0.sha256", {}), "graphs.dino.files[0] has no sha256 for dino.onnx"),
    "shape not a list": (_set("graphs.corr_head.inputs.0.shape", "B,1764,64"),
                         "graphs.corr_head.inputs[0].shape is a string, expected a list"),
    "input without dtype": (_set("graphs.clip_text.inputs.0.dtype", DELETE),
                            "graphs.clip_text.inputs[0] has no 'dtype'"),
    "outputs not names": (_set("graphs.dino.outputs", [0]), "graphs.dino.outputs must be a list of names"),
    "crop a string": (_set("window.crop", "336"), "window.crop is a string, expected an integer"),
    "dynamic window without max": (_set("window.max", DELETE), "window has no 'max'"),
    "no tokenizer": (_set("clip.tokenizer", DELETE), "clip has no 'tokenizer'"),
    "sam without size": (_set("sam.img_size", DELETE), "sam has no 'img_size'"),
    "method missing": (_set("method", DELETE), "the manifest has no 'method'"),
}


@pytest.mark.parametrize("defect", MANIFEST_DEFECTS)
def test_manifest_structure_is_checked_on_load(bundle, tmp_path, defect):
    """Each defect is refused at load time with one line naming the field (not a KeyError in the runtime)."""
    edit, needle = MANIFEST_DEFECTS[defect]
    mf = json.loads((bundle / "manifest.json").read_text())
    edit(mf)
    (tmp_path / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(BundleError) as e:
        load_bundle(tmp_path)
    msg = str(e.value)
    assert needle in msg and "re-export" in msg and "\n" not in msg


@pytest.mark.parametrize("text,needle", [('{"schema_version": 1, "graphs": {', "is not valid JSON"),
                                         ("[1, 2]", "is not a JSON object")])
def test_manifest_that_is_not_json_or_not_an_object(tmp_path, text, needle):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=needle):
        load_bundle(tmp_path)


def test_missing_graph_file(bundle, tmp_path):
    shutil.copy(bundle / "manifest.json", tmp_path / "manifest.json")  # a valid manifest, no graph files
    with pytest.raises(BundleError, match="file dino.onnx of graph dino is missing; re-export"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("backend,file", [("onnxruntime", "dino.onnx"), ("aoti", "dino.cpu.pt2")])
def test_graph_file_that_cannot_be_loaded(bundle, tmp_path, backend, file):
    """A file whose hash matches the manifest but that the runtime cannot load (truncated when exported,
    another format version): one line naming the graph and the backend."""
    from corrclip.models.checkpoints import sha256

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / file).write_bytes(b"not a graph")
    mf = json.loads((copy / "manifest.json").read_text())
    for entry in mf["graphs"]["dino"]["files"]:
        if entry["file"] == file:
            entry["sha256"][file] = sha256(copy / file)
    (copy / "manifest.json").write_text(json.dumps(mf))
    loaded = load_bundle(copy)  # the hashes agree: loading succeeds, running cannot
    with pytest.raises(BundleError, match="could not load graph dino|cannot load dino.onnx") as e:
        make_executor(loaded, "dino", backend, "cpu")
    assert "re-export" in str(e.value) and "\n" not in str(e.value)


def test_existing_bundle_is_not_overwritten_silently(bundle, capsys):
    before = (bundle / "manifest.json").read_bytes()
    assert export_cli.main(["--backbone", "tiny", "--out", str(bundle)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (bundle / "manifest.json").read_bytes() == before


def test_overwrite_replaces_an_existing_bundle(bundle, tmp_path, monkeypatch):
    """--overwrite: the new bundle takes the old one's place in one rename; nothing of the old one remains."""

    def export_copy(models, args, formats, writer):  # stands in for the graph export: the fixture's files
        for f in bundle.iterdir():
            if f.name != "manifest.json":
                shutil.copy(f, writer.tmp / f.name)
        return json.loads((bundle / "manifest.json").read_text())

    monkeypatch.setattr(export_cli, "export", export_copy)
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert export_cli.main(["--backbone", "tiny", "--sam", "none", "--overwrite", "--out", str(out)]) == 0
    assert not (out / "old.txt").exists() and set(load_bundle(out).graphs) == set(load_bundle(bundle).graphs)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize("flags,needle", [
    (["--format", "onnx,trt"], "unknown --format trt; choose from onnx, aoti"),
    (["--format", "tensorrt"], "TensorRT engines are built from the ONNX graphs at first load"),
    (["--crop", "300"], "--crop must be a positive multiple of 56"),
    (["--crop", "0"], "--crop must be a positive multiple of 56"),
    (["--method", "sc-clip", "--crop", "-224"], "--crop must be a positive multiple of 56"),
    (["--precision", "fp8"], "invalid choice"),
])
def test_bad_export_flags(tmp_path, capsys, flags, needle):
    out = tmp_path / "b"
    try:
        rc = export_cli.main(["--backbone", "tiny", *flags, "--out", str(out)])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    assert rc == 2 and needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


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
    # ... and the package computes what the torch module it was exported from computes.
    from corrclip.export.graphs import method_graphs
    from corrclip.models.build import build_models

    dino = {g.name: g for g in method_graphs("corrclip", build_models("tiny", sam="none"), 336)}["dino"].module
    with torch.no_grad():
        ref = dino(windows)
    torch.testing.assert_close(cpp, ref, atol=1e-4, rtol=1e-4)


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


class FakeTensorRT:
    """Stands in for the `tensorrt` module: records what the executor asks the builder for."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class BuilderFlag:
        FP16, BF16 = "FP16", "BF16"

    float32, float16, bfloat16, int64, int32, bool = "f32", "f16", "bf16", "i64", "i32", "b"
    __version__ = "10.0.fake"

    def __init__(self):
        self.calls: list[tuple] = []
        fake = self

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, list(lo), list(opt), list(hi)))

        class Config:
            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile",))

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("Builder",))

            def create_network(self, flags):
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network",))
                return b"plan bytes"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", Path(path).name))
                return True

        class Engine:
            def create_execution_context(self):
                return "context"

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                fake.calls.append(("deserialize_cuda_engine", plan))
                return Engine()

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime


def test_tensorrt_engine_build_from_manifest(bundle, tmp_path, monkeypatch):
    """With a fake `tensorrt` (it cannot be installed here): the executor parses the bundle's ONNX file, builds
    one optimization profile from the manifest (min 1 / opt AXIS_OPT / max AXIS_MAX on each dynamic axis, window
    axes from a 56 x 56 window to the crop, the static sizes as exported), caches the plan per GPU and TensorRT
    version, and reloads it without a build."""
    import sys

    from corrclip.engine.backends.tensorrt import TensorRTExecutor

    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setenv("CORRCLIP_CACHE", str(tmp_path))
    loaded = load_bundle(bundle)
    run = TensorRTExecutor(loaded, "corr_head", torch.device("cuda"))
    assert run.inputs == ["feats", "region_ids", "values", "mct", "mct_index", "text"] and run.outputs == ["logits"]
    assert fake.calls[:2] == [("Builder",), ("parse_from_file", "corr_head.onnx")]
    shapes = [c[1:] for c in fake.calls if c[0] == "set_shape"]
    # tiny backbone at crop 336: DINO grid 42 (dim 64), CLIP grid 21 (width 64), text embeddings of 32; the
    # window axes run from a 56 x 56 window (DINO grid 7, CLIP grid 3) to the crop.
    assert shapes == [
        ("feats", [1, 49, 64], [2, 1764, 64], [64, 1764, 64]),
        ("region_ids", [1, 7, 7], [2, 42, 42], [64, 42, 42]),
        ("values", [1, 2, 64, 3, 3], [2, 2, 64, 21, 21], [64, 2, 64, 21, 21]),
        ("mct", [1, 1, 64], [2, 64, 64], [64, 1024, 64]),
        ("mct_index", [1, 7, 7], [2, 42, 42], [64, 42, 42]),
        ("text", [1, 32], [256, 32], [4096, 32]),
    ]
    assert ("set_flag", "FP16") not in fake.calls and fake.calls[-2:] == [
        ("build_serialized_network",), ("deserialize_cuda_engine", b"plan bytes")]
    (plan,) = (tmp_path / "tensorrt").iterdir()
    assert plan.name.startswith("corr_head.Fake_GPU.trt10.0.fake.") and plan.read_bytes() == b"plan bytes"
    fake.calls.clear()
    TensorRTExecutor(loaded, "corr_head", torch.device("cuda"))
    assert fake.calls == [("deserialize_cuda_engine", b"plan bytes")]  # from the cache: no second build
    # An fp16 graph asks for fp16 kernels; float64 inputs (SAM's points) and the CPU are refused in one line.
    loaded.graphs["clip_text"]["precision"] = "fp16"
    TensorRTExecutor(loaded, "clip_text", torch.device("cuda"))
    assert ("set_flag", "FP16") in fake.calls
    assert [c[1:] for c in fake.calls if c[0] == "set_shape"] == [("tokens", [1, 1], [256, 20], [4096, 77])]
    with pytest.raises(BundleError, match="float64 inputs"):
        TensorRTExecutor(loaded, "sam_prompt_tokens", torch.device("cuda"))
    with pytest.raises(BundleError, match="needs a CUDA device"):
        TensorRTExecutor(loaded, "dino", torch.device("cpu"))


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
    assert r["backend"] == backend and r["engine"] == str(bundle) and r["flops_source"] is None
    assert set(r["stages_ms"]) == {"masks", "masks.preprocess", "masks.sam_encoder", "masks.prompt_decoding",
                                   "masks.mask_postprocess", "preprocess", "text", "dino", "regions", "clip_trunk",
                                   "corr_head", "stitch_vote"}
    assert all(0 < v["p50"] <= v["p99"] and "gflop" not in v for v in r["stages_ms"].values())  # no FLOPs: not torch
    assert r["images_per_s"] == pytest.approx(1000 / r["total_ms"]["p50"], rel=1e-9)


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


@needs_openvino
@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_openvino_runs_an_fp32_bundle_at_auto(bundle, precision):
    """--backend openvino --precision auto|bf16 on the fp32 bundle: the plan lowers the encoder graphs to bf16
    only where OpenVINO lists BF16 for this CPU, and otherwise says it falls back to fp32; either way the
    segmentation matches ONNX Runtime's (exactly up to float rounding at fp32, within bf16 rounding at bf16)."""
    from corrclip.engine.backends.openvino import cpu_has
    from corrclip.runtime.amg import AmgSettings

    amg = AmgSettings()
    amg.points_per_side = 4
    image = np.random.default_rng(4).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    ov = Segmenter.from_bundle(bundle, "openvino", device="cpu", amg=amg, precision=precision, text_cache=False)
    ort = Segmenter.from_bundle(bundle, "onnxruntime", device="cpu", amg=amg, text_cache=False)
    plan = ov.plan.describe()
    lowered = {"auto": ("sam_encoder", "dino", "clip_trunk", "clip_text"), "bf16": tuple(plan["stages"])}[precision]
    if cpu_has("bf16"):
        assert all(plan["stages"][s] == "bf16" for s in lowered) and "runs bf16 natively" in plan["reason"]
    else:
        assert set(plan["stages"].values()) == {"fp32"}
        assert "lists no native bf16" in plan["reason"] and "so fp32" in plan["reason"]
    a = ov.segment(image, "cat, dog, sky", return_probs=True)[0]
    b = ort.segment(image, "cat, dog, sky", return_probs=True)[0]
    tol = 5e-2 if cpu_has("bf16") else 1e-4
    assert np.abs(a.probs - b.probs).max() <= tol
    assert (a.labels == b.labels).mean() >= (0.9 if cpu_has("bf16") else 0.999)


# ---- the Triton model repository (corrclip-export --triton-repo) ---------------------------------

TRITON_TYPES = {1: "TYPE_FP32", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 11: "TYPE_FP64"}


def _triton_config(path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())  # Triton's own schema, strict


def test_triton_repository_matches_the_graphs(bundle, tmp_path):
    import onnx

    from corrclip.serve.protocol import INPUTS, OUTPUTS

    repo = tmp_path / "repo"
    assert export_cli.main(["--bundle", str(bundle), "--triton-repo", str(repo)]) == 0
    assert export_cli.main(["--bundle", str(bundle), "--triton-repo", str(repo)]) == 2  # no silent overwrite
    load_bundle(repo / "corrclip" / "1" / "bundle")  # the glue's manifest: every path and hash resolves
    batched = {}
    for name in load_bundle(bundle).graphs:
        cfg = _triton_config(repo / f"corrclip_{name}" / "config.pbtxt")
        graph = onnx.load(str(repo / f"corrclip_{name}" / "1" / "model.onnx"), load_external_data=False).graph
        assert cfg.name == f"corrclip_{name}" and cfg.backend == "onnxruntime"
        batched[name] = cfg.max_batch_size > 0
        assert cfg.HasField("dynamic_batching") == batched[name]
        for ours, theirs in ((cfg.input, graph.input), (cfg.output, graph.output)):
            assert [t.name for t in ours] == [t.name for t in theirs]
            for t, o in zip(ours, theirs):
                dims = [d.dim_value or -1 for d in o.type.tensor_type.shape.dim]
                assert list(t.dims) == (dims[1:] if batched[name] else dims), (name, t.name)
                assert model_config_name(t.data_type) == TRITON_TYPES[o.type.tensor_type.elem_type]
    assert batched == {"dino": True, "clip_trunk": True, "clip_text": True, "corr_head": False,
                       "sam_encoder": False, "sam_image_terms": False, "sam_prompt_tokens": False,
                       "sam_prompt_masks": False}
    glue = _triton_config(repo / "corrclip" / "config.pbtxt")
    assert glue.backend == "python" and glue.max_batch_size == 8
    assert [t.name for t in glue.input] == [p.name for p in INPUTS]
    assert [t.name for t in glue.output] == [p.name for p in OUTPUTS]
    assert glue.dynamic_batching.default_queue_policy.max_queue_size == 32


def model_config_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


# PyTriton's tritonserver has only the Python backend; this stand-in runs each graph model's
# model.onnx with ONNX Runtime in Python, so the glue model and the repository's configs are
# exercised end to end. The real onnxruntime backend is not run here.
ORT_STAND_IN = '''from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        replies = []
        for request in requests:
            feed = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            outs = self.session.run(self.outputs, feed)
            replies.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in zip(self.outputs, outs)]))
        return replies
'''


def test_triton_repository_serves_a_request(bundle, tmp_path, monkeypatch):
    pytest.importorskip("pytriton")
    import os
    import socket
    import sysconfig
    from pathlib import Path

    from pytriton.triton import Triton, TritonConfig

    from corrclip.serve.client import Client
    from corrclip.serve.server import use_this_libpython
    from corrclip.serve.triton_repo import write_repository

    repo = write_repository(bundle, tmp_path / "repo")
    for cfg in repo.glob("corrclip_*/config.pbtxt"):
        cfg.write_text(cfg.read_text().replace('backend: "onnxruntime"', 'backend: "python"'))
        (cfg.parent / "1" / "model.py").write_text(ORT_STAND_IN)
    use_this_libpython()
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, sysconfig.get_paths()["purelib"]]))  # for the stubs
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    image = tmp_path / "a.png"
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(rgb).save(image)
    regions = (np.arange(64)[:, None] // 16 * 4 + np.arange(64)[None, :] // 16).astype(np.int64)
    config = TritonConfig(model_repository=repo, http_address="127.0.0.1", http_port=ports[0],
                          grpc_address="127.0.0.1", grpc_port=ports[1], metrics_address="127.0.0.1",
                          metrics_port=ports[2], exit_timeout_secs=3, log_file=tmp_path / "triton.log")
    with Triton(config=config) as triton:
        triton.run()
        with Client(f"127.0.0.1:{ports[0]}") as client:
            assert client.ready()
            served = client.segment(image, "cat, dog, grass", masks=regions)
    local = Segmenter.from_bundle(repo / "corrclip" / "1" / "bundle", "onnxruntime", device="cpu",
                                  text_cache=False).segment(str(image), "cat, dog, grass", masks=regions)[0]
    assert served.names == ["cat", "dog", "grass"] and np.array_equal(served.labels, local.labels)
    assert served.info["model"]["engine"] == "triton repository" and served.info["stage_seconds"]["corr_head"] > 0
