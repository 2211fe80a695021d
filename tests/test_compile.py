"""--compile: the tiny backbone's encoders through torch.compile (Inductor on the CPU) give eager's output
within a tolerance, alone and at a lowered precision; the compile time is reported apart; a stage whose
compilation fails runs eager after one warning."""

import numpy as np
import pytest
import torch

from corrclip.api import Segmenter
from corrclip.models.compiled import Compiled, set_aside_compile_time

IMAGE = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
CLASSES = "cat, dog, sky, road"
# Inductor compiles C++ for the CPU: ~45 s for these two with a warm cache (/tmp/torchinductor_$USER), several
# minutes on two shared cores with a cold one.
compiles = pytest.mark.slow


REGIONS = (np.arange(90 * 120).reshape(90, 120) // (90 * 120 // 6)).astype(np.int32)


def _run(seg: Segmenter, image=IMAGE, regions=REGIONS):
    return seg.segment(image, CLASSES, masks=regions if seg.needs_masks else None, return_probs=True)[0]


@pytest.fixture(scope="module")
def eager():
    return Segmenter("tiny", device="cpu", sam="none", text_cache=False)


def _amg():
    from corrclip.runtime.amg import AmgSettings

    s = AmgSettings()
    s.points_per_side = 4
    return s


def test_compiled_equals_eager(eager):
    """Same labels and probabilities as eager fp32 within 1e-4 (Inductor reorders float sums); the first call's
    compile time is in compile.<stage>, later calls have none and take less than it. Label maps given (no SAM):
    Inductor's C++ builds on a cold cache are the cost of this test; the slow one below adds SAM and a size."""
    seg = Segmenter("tiny", device="cpu", sam="none", text_cache=False, compile=True)
    assert {k for k, m in seg.stages.items() if isinstance(m, Compiled)} == {"dino", "clip_trunk"}
    ref, out = _run(eager), _run(seg)
    compile_keys = {k for k in out.timings if k.startswith("compile.")}
    assert compile_keys == {"compile.dino", "compile.clip_trunk"}
    np.testing.assert_allclose(out.probs, ref.probs, atol=1e-4)
    assert (out.labels == ref.labels).mean() >= 0.999
    again = _run(seg)
    assert not any(k.startswith("compile.") for k in again.timings)
    assert again.timings["dino"] < out.timings["compile.dino"]
    np.testing.assert_allclose(again.probs, out.probs, atol=1e-6)


@compiles
def test_compiled_sam_and_another_size():
    """SAM's encoder compiled too, and another image size (other windows) stays within tolerance of eager."""
    eager = Segmenter("tiny", device="cpu", amg=_amg(), text_cache=False)
    seg = Segmenter("tiny", device="cpu", amg=_amg(), text_cache=False, compile=True)
    assert {k for k, m in seg.stages.items() if isinstance(m, Compiled)} == {"masks.sam_encoder", "dino", "clip_trunk"}
    np.testing.assert_allclose(_run(seg).probs, _run(eager).probs, atol=1e-4)
    other = np.ascontiguousarray(IMAGE[:70, :100])
    np.testing.assert_allclose(_run(seg, other).probs, _run(eager, other).probs, atol=1e-4)


@compiles
def test_compiled_at_bf16_matches_eager_bf16():
    """torch.compile of the AtPrecision-lowered modules: what compiles is the bf16 copy, within bf16 rounding of
    the eager bf16 run (a tolerance a wrong precision or a wrong module would fail)."""
    eager16 = Segmenter("tiny", device="cpu", sam="none", text_cache=False, precision="bf16")
    comp16 = Segmenter("tiny", device="cpu", sam="none", text_cache=False, precision="bf16", compile=True)
    assert comp16.stages["dino"].module.dtype == torch.bfloat16
    lm = np.zeros(IMAGE.shape[:2], np.int64)
    lm[:45] = 1
    lm[:, 60:] += 2
    ref = eager16.segment(IMAGE, CLASSES, masks=lm, return_probs=True)[0]
    out = comp16.segment(IMAGE, CLASSES, masks=lm, return_probs=True)[0]
    assert np.abs(out.probs - ref.probs).max() < 2e-2


def test_compile_failure_falls_back_to_eager(capsys):
    class Broken(torch.nn.Module):
        def forward(self, x):
            return x * 2

    wrapped = Compiled(Broken(), "dino")

    def fail(*a):
        raise RuntimeError("no C++ compiler\nsecond line")

    object.__setattr__(wrapped, "compiled", fail)
    assert torch.equal(wrapped(torch.ones(2)), torch.full((2,), 2.0))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.compile failed for dino (RuntimeError: no C++ compiler); running it eager" \
        in err
    assert wrapped.compiled is None and torch.equal(wrapped(torch.ones(2)), torch.full((2,), 2.0))


def test_compile_time_is_moved_out_of_the_stage_entries():
    m = Compiled(torch.nn.Identity(), "sam_encoder")
    m.compile_seconds = 3.0
    timings = [{"masks": 5.0, "masks.sam_encoder": 4.0, "dino": 1.0}, {"masks": 5.0, "masks.sam_encoder": 4.0}]
    set_aside_compile_time(timings, [m, "not a module"])
    assert timings[0] == {"masks": 2.0, "masks.sam_encoder": 1.0, "dino": 1.0, "compile.sam_encoder": 3.0}
    assert timings[1]["compile.sam_encoder"] == 3.0 and m.compile_seconds == 0.0


def test_compile_flag_refused_with_a_bundle(tmp_path, capsys):
    from corrclip.cli import main

    rc = main(["bench", "--engine", str(tmp_path), "--compile", "--device", "cpu"])
    assert rc == 2 and "--compile compiles the torch models" in capsys.readouterr().err
