"""Every Triton kernel compiles for Hopper (sm_90, H100/H200) and Ampere (sm_80) at the launch configuration the GPU
dispatch uses, without a GPU: no register spills, shared memory within a block's maximum, tensor-core instructions
for the half-precision products (corrclip.kernels.aot, run where Triton compiles: a fresh process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_support import triton_mode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One compiling process per architecture, side by side (CPU-bound: ~10 s each on a quiet core)."""
    if triton_mode() is None:
        pytest.skip("Triton is not installed")
    folder = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    runs = {arch: subprocess.Popen([sys.executable, "-m", "corrclip.kernels.aot", "--arch", str(arch), "--json",
                                    str(folder / f"{arch}.json")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for arch in (90, 80)}
    logs, rows = {}, []
    for arch, proc in runs.items():
        logs[arch] = proc.communicate(timeout=600)[0]
        assert (folder / f"{arch}.json").exists(), logs[arch]
        rows += json.loads((folder / f"{arch}.json").read_text())
        logs[arch] = (proc.returncode, logs[arch])
    return logs, rows


def test_every_kernel_compiles_within_the_limits(reports):
    logs, rows = reports
    for returncode, log in logs.values():
        assert returncode == 0, log
    kernels = {"_attention_kernel", "_region_means_kernel", "_region_graph_kernel", "_canvas_kernel",
               "_classify_kernel", "_majority_kernel", "_gather_kernel", "_stats_kernel", "_paint_kernel"}
    for arch in (90, 80):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels
    for r in rows:
        assert r["registers"] > 0, r  # a ptxas report was read
        assert r["problems"] == [] and r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, r
        assert r["shared"] <= {90: 227, 80: 163}[r["arch"]] * 1024 and r["registers"] <= 255, r


def test_half_precision_products_use_tensor_cores(reports):
    _, rows = reports
    dots = ("_attention_kernel", "_region_means_kernel")
    half = [r for r in rows if r["kernel"] in dots and r["dtype"] == "bfloat16"]
    assert {(r["kernel"], r["arch"], r["tensor_cores"]) for r in half} == {
        ("_attention_kernel", 90, "wgmma"), ("_region_means_kernel", 90, "wgmma"),
        ("_attention_kernel", 80, "mma"), ("_region_means_kernel", 80, "mma")}


def test_the_gpu_block_sizes_are_the_ones_compiled(reports):
    """The report's configurations are the dispatch's GPU constants (not the interpreter's CPU ones)."""
    from corrclip.kernels import correlation, sam_post, stitch_vote

    _, rows = reports
    config = {(r["kernel"], r["config"]) for r in rows}
    g, s, c = stitch_vote.GPU_BLOCKS, sam_post.GPU_BLOCKS, correlation.gpu_blocks
    assert ("_classify_kernel", f"BLOCK_Q={g['block_q']}, BLOCK_P={g['block_p']}") in config
    assert ("_canvas_kernel", f"BLOCK_Q={g['block_q']}, TILE_H={g['tile'][0]}, TILE_W={g['tile'][1]}") in config
    assert ("_stats_kernel", f"LOW=256, TILE_H={s['tile'][0]}, TILE_W={s['tile'][1]}, TILES={s['tiles']}") in config
    b = c(torch.bfloat16)
    assert any(k == "_attention_kernel" and f"BLOCK_D={b['block_d']}" in v and f"num_stages={b['num_stages']}" in v
               for k, v in config)
