"""The fidelity budget's instruments (benchmarks/fidelity.py) and the research-style half-precision option.

Tiny random models, one small image with a synthetic label map: the research path in fp16/bf16 moves its
probabilities a little off its fp32 run (not zero, not much); identical paths agree exactly; a path with a
perturbed stage is caught in its labels and in that stage's error, and nowhere else.
"""

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corrclip.api import as_vocabulary
from corrclip.methods.corrclip import CorrClipSettings as Settings
from corrclip.models.build import build_models

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
fidelity = importlib.import_module("fidelity")
harness = importlib.import_module("harness")
research_style = importlib.import_module("research_style")

VOCAB = "sky; cloud, road, car, tree, person"
HW = (112, 112)  # one 336 x 336 window after resizing


@pytest.fixture(scope="module")
def inputs():
    return harness.synthetic_image(*HW, 0), harness.synthetic_label_map(*HW, 30, 0)


@pytest.fixture(scope="module")
def research_fp32(inputs):
    return research_run("fp32", inputs)


def research_run(precision, inputs):
    img, lm = inputs
    path = research_style.ResearchStylePath(build_models("tiny", "random", sam="none"), precision=precision,
                                            keep_probs=True)
    labels, _ = path.segment(img, as_vocabulary(VOCAB), Settings(), lm)
    path.close()
    return path, labels, path.last_probs.float()


def test_research_default_stays_fp32_on_cpu():
    path = research_style.ResearchStylePath(build_models("tiny", "random", sam="none"))
    assert path.precision == "fp32" and not path.half
    assert path.dino.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert research_style.half_precision("cpu") in ("fp16", "bf16")
    with pytest.raises(ValueError):
        research_style.ResearchStylePath(build_models("tiny", "random", sam="none"), precision="int8")


@pytest.mark.parametrize("precision,max_dprob,min_agree", [("fp16", 5e-3, 0.995), ("bf16", 0.1, 0.9)])
def test_research_half_differs_a_little(inputs, research_fp32, precision, max_dprob, min_agree):
    _, ref_labels, ref_probs = research_fp32
    path, labels, probs = research_run(precision, inputs)
    dtype = research_style.RESEARCH_DTYPES[precision]
    assert path.dino.blocks[0].attn.qkv.weight.dtype == dtype  # weights, not only activations
    assert path.visual.transformer.resblocks[0].attn.in_proj_weight.dtype == dtype
    dprob = float((probs - ref_probs).abs().max())
    assert 0 < dprob < max_dprob
    assert (labels == ref_labels).mean() >= min_agree


def test_rel_error_and_prevote():
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert fidelity.rel_error(ref, ref.clone()) == 0
    assert fidelity.rel_error((ref, torch.tensor([1, 2])), (ref + torch.tensor([0.0, 0.4, 0.0]), None)) == \
        pytest.approx(0.1)
    probs = np.array([[[0.5, 0.1]], [[0.3, 0.15]], [[0.2, 0.75]]])
    assert fidelity.prevote_labels(probs, 0.0).tolist() == [[0, 2]]
    assert fidelity.prevote_labels(probs, 0.6).tolist() == [[0, 2]]
    assert fidelity.prevote_labels(probs, 0.8).tolist() == [[0, 0]]


def test_plan_for_one_stage():
    plan = fidelity.plan_for("bf16:dino", torch.device("cpu"), fused_ok=False)
    assert plan.name("dino") == "bf16" and plan.name("clip_trunk") == "fp32" and not plan.fused_attention
    assert fidelity.plan_for("bf16", torch.device("cpu"), fused_ok=False).name("clip_trunk") == "bf16"


def test_agreement_identical_and_perturbed(inputs, tmp_path):
    args = argparse.Namespace(backbone="tiny", weights="random", masks="synthetic", points=8)
    vocab, settings = as_vocabulary(VOCAB), Settings(prob_thd=0.1)
    img, lm = inputs
    cpu = torch.device("cpu")
    plan = fidelity.plan_for("fp32", cpu, fused_ok=False)
    fidelity.Memo.cache.clear()
    ref = fidelity.run_segmenter(fidelity.build_segmenter(args, plan, cpu, tmp_path), [img], [lm], vocab, settings)
    same = fidelity.run_segmenter(fidelity.build_segmenter(args, plan, cpu, tmp_path), [img], [lm], vocab, settings)
    assert fidelity.agreement(ref, same, settings.prob_thd) == {"final_diff": 0.0, "prevote_diff": 0.0,
                                                                "max_dprob": 0.0}
    assert set(fidelity.stage_errors(ref, same).values()) == {0.0}

    # A path whose DINO features carry noise: its labels move, the dino error shows it, the text does not.
    seg = fidelity.build_segmenter(args, plan, cpu, tmp_path)
    enc = seg.pipeline.method
    dino = enc.dino.module
    g = torch.Generator().manual_seed(0)
    noisy = fidelity.Memo(lambda w: F.normalize(dino(w) + 0.2 * torch.randn(dino(w).shape, generator=g), dim=-1),
                          ("dino", "noisy"))
    enc.dino = enc.stages["dino"] = noisy
    bad = fidelity.run_segmenter(seg, [img], [lm], vocab, settings)
    a = fidelity.agreement(ref, bad, settings.prob_thd)
    assert a["final_diff"] > 0 and a["prevote_diff"] > 0 and a["max_dprob"] > 0
    err = fidelity.stage_errors(ref, bad)
    assert err["dino"] > 0.05 and err["clip_text"] == 0.0
    assert err["clip_trunk"] == 0.0  # fp32 trunk, re-run on the reference's regions where the noise moved them
