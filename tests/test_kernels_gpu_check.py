"""benchmarks/gpu_check.sh, the prepared device check: its dry run, its step loop and its report, on the CPU."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    res = run("--dry-run", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    steps = [line for line in res.stdout.splitlines() if line.startswith("[")]
    names = [line[1:line.index("]")] for line in steps]
    assert names[:2] == ["environment", "kernel_tests_compiled"] and names[-1] == "harness"
    assert all(" timeout " in line for line in steps)
    text = res.stdout
    assert "TRITON_INTERPRET unset" in text and f"{sys.executable} -m pytest" in text
    for test in ("dispatch", "correlation", "merging", "stitch_vote", "sam_post", "aot"):
        assert f"tests/test_kernels_{test}.py" in text
    assert "benchmarks/kernels_correlation.py" in text and "benchmarks/kernels_post.py" in text
    for grid in (8, 32):
        for precision in ("bf16", "fp32"):
            assert f"--points-per-side {grid} --precision {precision}" in text
    assert text.count("--backbone vit_b --weights random") == 5  # 4 x bench, the harness
    assert "benchmarks/harness.py" in text and "--device cuda" in text
    assert not (tmp_path / "out").exists()
    assert os.stat(SCRIPT).st_mode & stat.S_IXUSR, "gpu_check.sh must be executable"


def test_wheels_are_installed_first(tmp_path):
    (tmp_path / "whl").mkdir()
    res = run("--dry-run", "--wheels", str(tmp_path / "whl"), str(tmp_path / "out"))
    first = next(line for line in res.stdout.splitlines() if line.startswith("["))
    assert first.startswith("[wheels]") and "--no-index --no-deps" in first and str(tmp_path / "whl") in first


def test_bad_command_lines():
    assert run().returncode == 2
    res = run("--frobnicate", "x")
    assert res.returncode == 2 and "unknown option --frobnicate" in res.stderr


def test_runs_steps_and_reports(tmp_path):
    """On a machine without a GPU: the environment step fails, the rest is skipped, the report says so."""
    out = tmp_path / "out"
    res = run("--budget", "60", str(out), PATH=f"{tmp_path}:{os.environ['PATH']}")  # no nvidia-smi here anyway
    report = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["steps"]}
    md = (out / "gpu_check.md").read_text()
    if statuses["environment"] == "ok":  # a GPU machine running the suite: nothing to check here
        return
    assert res.returncode == 1
    assert set(statuses.values()) - {statuses["environment"]} == {"skipped (no usable GPU)"}
    assert len(statuses) == 10 and "| harness | skipped (no usable GPU) | 0 |" in md
