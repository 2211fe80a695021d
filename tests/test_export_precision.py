"""corrclip-export's checks that need no whole bundle: the parity check rejecting a changed graph, the one-line
bf16 refusal, and export at a precision (encoder graphs lowered, decision graphs fp32). Apart from
test_export.py so that the two pytest workers share the export work."""

import numpy as np
import pytest
import torch

from corrclip.engine.backends import make_executor
from corrclip.engine.bundle import load_bundle
from corrclip.export import cli as export_cli


def test_parity_check_rejects_a_changed_graph(tmp_path, monkeypatch, capsys):
    """The real parity check, fed an ONNX file whose largest weight no longer equals the torch module's: the
    export fails naming the graph, publishes nothing, and an existing folder at --out survives --overwrite."""
    import onnx
    from onnx import numpy_helper

    from corrclip.export import formats

    write_onnx = formats.FORMATS["onnx"]

    def write_then_perturb(graph, example, folder, **kw):
        files = write_onnx(graph, example, folder, **kw)
        model = onnx.load(str(folder / files[0]))
        weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        w = numpy_helper.to_array(weight)
        noise = np.random.default_rng(0).standard_normal(w.shape).astype(w.dtype)
        weight.CopyFrom(numpy_helper.from_array(w + 1e-2 * w.std() * noise, weight.name))
        onnx.save(model, str(folder / files[0]))
        return files

    monkeypatch.setitem(formats.FORMATS, "onnx", write_then_perturb)
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("the previous bundle")
    assert export_cli.main(["--backbone", "tiny", "--sam", "none", "--overwrite", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "graph dino (onnx) differs from torch" in err and "above the tolerance 1e-04" in err
    assert "nothing was written" in err
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no .partial or .old folder left behind
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "the previous bundle"


def test_check_parity_at_bf16_says_why_it_cannot(tmp_path):
    """ONNX Runtime's CPU provider has no bf16 kernels: one clear line instead of ONNX Runtime's exception."""
    from corrclip.export.formats import write_onnx
    from corrclip.export.graphs import Graph

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    graph = Graph("mlp", mlp.to(torch.bfloat16), ["x"], ["y"], {"x": {0: "B"}},
                  lambda s, g: (torch.randn(s["B"], 8, generator=g),), ({"B": 3}, {"B": 1}))
    example = (torch.randn(3, 8, dtype=torch.bfloat16),)
    written = write_onnx(graph, example, tmp_path)
    files = [{"format": "onnx", "file": written[0], "written": written}]
    with pytest.raises(export_cli.ParityError, match="onnxruntime cannot run graph mlp at bf16 .*another --precision"):
        export_cli.check_parity(graph, tmp_path, files, torch.bfloat16, "cpu")


def test_fp16_export_lowers_encoders_and_keeps_decisions_fp32(tmp_path, monkeypatch):
    """--precision fp16: the encoder graphs (here DINO and the text tower) compute in fp16 behind fp32 inputs and
    outputs, parity-checked against torch at fp16 (ONNX Runtime's CPU provider used to crash on such graphs);
    the correlation head, a decision graph, stays fp32 and exact. The manifest says which is which."""
    import onnx

    from corrclip.export import graphs as export_graphs

    def some(method, models, crop):
        return [g for g in export_graphs.method_graphs(method, models, crop) if g.name in ("dino", "clip_text",
                                                                                          "corr_head")]

    monkeypatch.setattr(export_cli, "method_graphs", some)
    out = tmp_path / "b"
    assert export_cli.main(["--backbone", "tiny", "--sam", "none", "--precision", "fp16", "--out", str(out)]) == 0
    mf = load_bundle(out).manifest
    assert mf["exported_on"]["precision"] == "fp16"
    assert {n: g["precision"] for n, g in mf["graphs"].items()} == {"dino": "fp16", "clip_text": "fp16",
                                                                     "corr_head": "fp32"}
    for name, g in mf["graphs"].items():
        checks = [v for v in g["parity"].values() if isinstance(v, dict)]
        tol = 2e-2 if g["precision"] == "fp16" else 1e-4
        assert g["parity"]["tolerance"] == tol and len(checks) >= 2
        if g["precision"] == "fp16":
            assert all(1e-5 < v["max_rel"] <= tol for v in checks), name  # fp16 rounding shows, within tolerance
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        # fp32 at the interface whatever runs inside; fp16 weights only in the lowered graphs
        assert {t.type.tensor_type.elem_type for t in model.graph.output} == {onnx.TensorProto.FLOAT}
        halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
        assert bool(halves) == (g["precision"] == "fp16"), name
    windows = torch.randn(1, 3, 112, 168, generator=torch.Generator().manual_seed(3))
    (feats,) = make_executor(load_bundle(out), "dino", "onnxruntime", "cpu")(windows)
    assert feats.dtype == torch.float32


def test_export_precision_plan():
    """auto exports fp32 graphs for a CPU target (OpenVINO lowers them at load time) and fp16 encoders for CUDA;
    bf16/fp16 lower exactly the encoder graphs."""
    from corrclip import precision

    cpu = precision.export_plan("auto", "cpu")
    assert cpu.exact and "OpenVINO lowers them to bf16 at load time" in cpu.reason
    bf16 = precision.export_plan("bf16", "cpu")
    assert {s for s, v in bf16.stages.items() if v == "bf16"} == set(precision.ENCODERS)
    assert bf16.name("corr_head") == bf16.name("sam_prompt_masks") == bf16.name("sam_image_terms") == "fp32"
    with pytest.raises(precision.PrecisionError, match="unknown precision 'fp8'"):
        precision.export_plan("fp8", "cpu")
    # A bundle of fp16 encoder graphs runs at fp16 (or auto); fp32 or bf16 is refused in one line.
    exported = {"dino": "fp16", "clip_trunk": "fp16", "corr_head": "fp32"}
    assert precision.bundle_plan("auto", exported, "cpu", "onnxruntime").name("dino") == "fp16"
    for mode in ("fp32", "bf16"):
        with pytest.raises(precision.PrecisionError, match=f"exported at fp16, not {mode}: re-export"):
            precision.bundle_plan(mode, exported, "cpu", "onnxruntime")
