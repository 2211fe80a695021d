"""The side-by-side harness end to end on the tiny backbone: JSON, Markdown table and PNG chart."""

import importlib
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_harness_writes_report(tmp_path):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    harness = importlib.import_module("harness")
    rc = harness.main(["--backbone", "tiny", "--workloads", "tiny", "--points", "4", "--runs", "1", "--warmup", "0",
                       "--device", "cpu", "--name", "t", "--out", str(tmp_path), "--precision", "fp32,bf16"])
    assert rc == 0
    report = json.loads((tmp_path / "t.json").read_text())
    (config,) = report["results"]
    assert config["workload"] == "tiny" and config["points_per_side"] == 4 and config["image_hw"] == [96, 128]
    assert config["windows_per_image"] == 2  # 96x128 -> 336x448: two 336 windows at stride 112
    assert {"research", "torch"} <= set(config["paths"])
    research = config["paths"]["research"]["total_ms"]["p50"]
    table = (tmp_path / "t.md").read_text()
    for name in ("research", "torch"):
        path = config["paths"][name]
        assert "error" not in path, path
        stages = path["stages_ms"]
        assert set(stages) == set(harness.BAR_STAGES)  # every stage, and "other" for the rest of the wall time
        assert all(v["p50"] >= 0 for v in stages.values()) and stages["corr_head"]["p50"] > 0
        # One run: the total is that run's wall time, the stages and "other" add up to it (2-decimal rounding).
        total = path["total_ms"]["p50"]
        assert path["runs_ms"] == [total] and total > 0
        assert sum(v["p50"] for v in stages.values()) == pytest.approx(total, abs=0.05)
        assert path["images_per_s"] == pytest.approx(1000 / total, rel=1e-3, abs=1e-4)  # rounded to 4 decimals
        assert path["speedup_vs_research"] == pytest.approx(research / total, abs=1e-3)
        assert path["agreement_vs_research"] > 0.99  # same models, same masks
        assert f"| tiny 128x96 | SAM 4x4 | {name} | {total:.0f} |" in table
    fast = config["paths"]["torch-bf16"]
    assert "error" not in fast and config["paths"]["torch"]["agreement_vs_torch_fp32"] == 1.0
    assert fast["speedup_vs_torch_fp32"] == pytest.approx(config["paths"]["torch"]["total_ms"]["p50"]
                                                          / fast["total_ms"]["p50"], abs=1e-3)
    assert 0.5 < fast["agreement_vs_torch_fp32"] <= 1.0
    assert config["paths"]["research"]["speedup_vs_research"] == 1.0
    assert config["paths"]["research"]["agreement_vs_research"] == 1.0
    with Image.open(tmp_path / "t.png") as img:
        img.load()
        pixels = {colour: n for n, colour in img.convert("RGB").getcolors(1 << 20)}
    assert img.size[0] > 500 and img.size[1] > 100
    # The bars are drawn: the largest stage's colour covers far more than its 15x15 legend swatch.
    biggest = max(harness.BAR_STAGES, key=lambda k: config["paths"]["torch"]["stages_ms"][k]["p50"])
    assert pixels.get(harness.COLOURS[harness.BAR_STAGES.index(biggest)], 0) > 1000
