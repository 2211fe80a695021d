"""Precision modes (corrclip/precision.py): what each mode resolves to on each kind of hardware, that fp32
stays the exact reference, and that the half-precision paths stay close to it with every decision in fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from corrclip import Segmenter, precision
from corrclip.models.half import AtPrecision
from corrclip.precision import ENCODERS, Hardware, PrecisionError, bundle_plan, resolve

AMX = Hardware("cpu", "Xeon with AMX", bf16=True, fp16=False, flags=("amx_bf16",))
PLAIN = Hardware("cpu", "EPYC", bf16=False, fp16=False)
H100 = Hardware("cuda", "H100", bf16=True, fp16=True)


def test_fp32_is_exact_everywhere():
    for hw in (AMX, PLAIN, H100):
        plan = resolve("fp32", "cpu", hw)
        assert plan.exact and not plan.fused_attention
        assert all(plan.dtype(s) == torch.float32 for s in ENCODERS)


def test_auto_follows_the_hardware():
    amx = resolve("auto", "cpu", AMX)
    # bf16 on DINO and CLIP went over the fidelity budget: auto lowers only SAM's encoder there
    assert amx.name("sam_encoder") == "bf16" and amx.name("dino") == "fp32" and not amx.exact
    # SC-CLIP's and CLIPtrase's dense graph decides inside itself: auto leaves it fp32
    assert amx.name("clip_dense") == "fp32"
    assert "amx_bf16" in amx.reason
    gpu = resolve("auto", "cuda", H100)
    assert gpu.name("clip_trunk") == "fp16"
    plain = resolve("auto", "cpu", PLAIN)
    assert all(v == "fp32" for v in plain.stages.values()), "no bf16 units: auto must not lower anything"
    assert "no half-precision" in plain.reason


def test_explicit_half_without_units_says_it_is_emulated():
    plan = resolve("bf16", "cpu", PLAIN)
    assert plan.name("dino") == "bf16" and "emulated" in plan.reason
    assert "emulated" not in resolve("bf16", "cpu", AMX).reason


def test_unknown_mode_is_one_line():
    with pytest.raises(PrecisionError, match="choose one of auto, fp32, bf16, fp16"):
        resolve("int8", "cpu", PLAIN)


def test_describe_is_json_and_names_every_stage():
    d = resolve("auto", "cpu", AMX).describe()
    json.dumps(d)
    assert set(d["stages"]) == set(ENCODERS) and d["decisions"] == "fp32"
    assert d["hardware"]["bf16_units"] is True


def test_bundle_plan_runs_the_export_precision():
    fp32 = {"dino": "fp32", "corr_head": "fp32"}
    assert bundle_plan("auto", fp32, "cpu", "onnxruntime").exact
    with pytest.raises(PrecisionError, match="exported at fp32, not bf16"):
        bundle_plan("bf16", fp32, "cpu", "onnxruntime")
    half = {"dino": "fp16", "corr_head": "fp32"}
    assert bundle_plan("fp16", half, "cpu", "onnxruntime").name("dino") == "fp16"


def test_bundle_plan_openvino_lowers_encoders_only():
    graphs = {"sam_encoder": "fp32", "dino": "fp32", "corr_head": "fp32"}
    plan = bundle_plan("auto", graphs, "cpu", "openvino", native=lambda p: True)
    assert plan.name("sam_encoder") == "bf16" and plan.name("dino") == "fp32" and plan.name("corr_head") == "fp32"
    assert bundle_plan("bf16", graphs, "cpu", "openvino", native=lambda p: True).name("dino") == "bf16"
    # no native bf16 (this AMD EPYC): fp32, and the reason says why
    plain = bundle_plan("auto", graphs, "cpu", "openvino", native=lambda p: p == "fp32")
    assert plain.name("sam_encoder") == "fp32" and "no native bf16" in plain.reason


def test_at_precision_keeps_the_original_and_returns_fp32():
    lin = torch.nn.Linear(8, 8)
    low = AtPrecision(lin, torch.bfloat16)
    assert lin.weight.dtype == torch.float32, "the fp32 module must stay fp32 (other stages share it)"
    x = torch.randn(4, 8)
    y = low(x)
    assert y.dtype == torch.float32
    ref = lin(x)
    err = (y - ref).abs().max().item()
    assert 0 < err < 5e-2 * ref.abs().max().item()


def _image_and_regions():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (120, 160, 3)).astype(np.uint8)
    regions = (np.arange(120 * 160).reshape(120, 160) // (120 * 160 // 7)).astype(np.int32)
    return img, regions


@pytest.fixture(scope="module")
def reference():
    img, regions = _image_and_regions()
    seg = Segmenter("tiny", "random", sam="none", text_cache=False, device="cpu")
    return seg.segment(img, "sky, road, car, tree", masks=regions, return_probs=True)[0]


def test_fp32_mode_is_bit_identical_to_the_default(reference):
    img, regions = _image_and_regions()
    seg = Segmenter("tiny", "random", sam="none", text_cache=False, device="cpu", precision="fp32")
    out = seg.segment(img, "sky, road, car, tree", masks=regions, return_probs=True)[0]
    assert np.array_equal(out.probs, reference.probs) and np.array_equal(out.labels, reference.labels)


@pytest.mark.parametrize("mode,budget", [("bf16", 5e-2), ("fp16", 1e-2)])
def test_half_precision_stays_close(reference, mode, budget):
    img, regions = _image_and_regions()
    seg = Segmenter("tiny", "random", sam="none", text_cache=False, device="cpu", precision=mode)
    assert isinstance(seg.pipeline.method.stages["dino"], AtPrecision)
    assert not isinstance(seg.pipeline.method.stages["corr_head"], AtPrecision), "the head decides: fp32"
    out = seg.segment(img, "sky, road, car, tree", masks=regions, return_probs=True)[0]
    diff = np.abs(out.probs - reference.probs).max()
    assert 0 < diff < budget
    assert out.probs.dtype == np.float32


def test_segment_records_what_ran(tmp_path, capsys):
    from PIL import Image

    from corrclip.cli import main

    img, regions = _image_and_regions()
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(regions.astype(np.uint8)).save(tmp_path / "a_masks.png")
    rc = main(["segment", str(tmp_path / "a.png"), "--classes", "a, b", "--masks", str(tmp_path / "a_masks.png"),
               "--backbone", "tiny", "--precision", "bf16", "--no-cache", "--out", str(tmp_path / "out")])
    assert rc == 0
    info = json.loads((tmp_path / "out" / "a.json").read_text())
    ran = info["precision"]
    assert ran["requested"] == "bf16" and ran["stages"]["dino"] == "bf16" and ran["decisions"] == "fp32"
    with pytest.raises(SystemExit):
        main(["segment", str(tmp_path / "a.png"), "--classes", "a, b", "--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_bench_reports_the_plan(tmp_path, capsys):
    from corrclip.cli import main

    out = tmp_path / "b.json"
    rc = main(["bench", "--backbone", "tiny", "--points-per-side", "2", "--synthetic", "1", "--size", "120x90",
               "--runs", "1", "--warmup", "0", "--no-flops", "--precision", "auto", "--device", "cpu",
               "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    plan = precision.resolve("auto", "cpu")
    assert r["precision"]["requested"] == "auto" and r["precision"]["resolved"] == plan.summary()
    assert f"precision auto -> {plan.summary()}" in capsys.readouterr().out


def test_bench_without_masks_is_one_line(capsys):
    from corrclip.cli import main

    rc = main(["bench", "--backbone", "tiny", "--sam", "none", "--runs", "1", "--warmup", "0", "--device", "cpu"])
    assert rc == 2 and "drop --sam none" in capsys.readouterr().err
