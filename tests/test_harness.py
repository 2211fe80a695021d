"""The side-by-side harness end to end on the tiny backbone: JSON, Markdown table and PNG chart."""

import importlib
import json
import sys
from pathlib import Path

from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_harness_writes_report(tmp_path):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    harness = importlib.import_module("harness")
    rc = harness.main(["--backbone", "tiny", "--workloads", "tiny", "--points", "4", "--runs", "1", "--warmup", "0",
                       "--device", "cpu", "--name", "t", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "t.json").read_text())
    (config,) = report["results"]
    assert config["workload"] == "tiny" and config["points_per_side"] == 4
    assert {"research", "torch"} <= set(config["paths"])
    for name in ("research", "torch"):
        path = config["paths"][name]
        assert "error" not in path, path
        for stage in ("masks", "preprocess", "dino", "regions", "clip_trunk", "corr_head", "stitch_vote"):
            assert path["stages_ms"][stage]["p50"] >= 0
        assert path["total_ms"]["p50"] > 0 and path["speedup_vs_research"] > 0
        assert path["agreement_vs_research"] > 0.99  # same models, same masks
    assert "| research |" in (tmp_path / "t.md").read_text()
    with Image.open(tmp_path / "t.png") as img:
        img.load()
        assert img.size[0] > 500 and img.size[1] > 100
