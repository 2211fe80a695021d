"""corrclip-export on the tiny preset: the bundle, its validation, atomicity, and the runtime running
from it (ONNX Runtime and AOTInductor) against the torch reference."""

import importlib.util
import json
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
    inputs = head.make_inputs({"B": 3, "R": 11, "Q": 21}, torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = head.module(*inputs)
    for backend in ("onnxruntime", "aoti"):
        (out,) = make_executor(load_bundle(bundle), "corr_head", backend)(*inputs)
        assert float((out - ref).abs().max()) < 1e-4


def test_bundle_refuses_other_window_sizes(bundle):
    img, lm = _inputs()
    eng = Segmenter.from_bundle(bundle, device="cpu")
    with pytest.raises(ValueError, match="re-export with --crop 224"):
        eng.segment(img, preset="city_scapes", masks=lm)


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
                       "sam_encoder": False, "sam_decoder": False}
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
