"""The two heavy encoders side by side in one process: torch eager, torch.compile, ONNX Runtime, OpenVINO.

    python benchmarks/encoders.py [--backbone vit_b] [--threads 2] [--runs 3] [--json out.json]

DINO on two crop x crop windows (336) and SAM's image encoder at 1024, seeded random weights (timing does
not depend on weight values). Each encoder is exported to ONNX once into a temporary folder (only these
two graphs: a whole bundle takes far longer); every path gets the same input and is compared with torch
eager fp32 (max |delta| / max |eager|). Compile time (torch.compile's first call) and export time are
reported apart from the steady-state medians. OpenVINO bf16 runs only where its CPU plugin lists BF16
(AMX / AVX512-BF16); otherwise the report says so. The machine may be shared: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from corrclip.engine.backends.onnxruntime import OrtExecutor
from corrclip.export.formats import write_onnx
from corrclip.export.graphs import method_graphs
from corrclip.models.build import build_models
from corrclip.precision import detect
from corrclip.runtime.timing import median_seconds


def cpu_model() -> dict:
    hw = detect("cpu")
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")
    return {"name": hw.name, "flags": [f for f in wanted if f in flags], "bf16_units": hw.bf16}


def error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def bench_graph(graph, example: tuple[torch.Tensor, ...], runs: int, folder: Path) -> list[dict]:
    rows = []
    with torch.inference_mode():
        ref = graph.module(*example)
        eager = median_seconds(lambda: graph.module(*example), "cpu", 0, runs)
    rows.append({"path": "torch eager fp32", "ms": 1000 * eager, "max_rel": 0.0})

    compiled = torch.compile(graph.module)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = compiled(*example)
        first = time.perf_counter() - t0
        t = median_seconds(lambda: compiled(*example), "cpu", 0, runs)
    rows.append({"path": "torch.compile fp32", "ms": 1000 * t, "max_rel": error(out, ref),
                 "first_call_s": first})

    t0 = time.perf_counter()
    (onnx_file,) = write_onnx(graph, example, folder)[:1]
    export_s = time.perf_counter() - t0
    ort = OrtExecutor(folder / onnx_file, torch.device("cpu"))
    (out,) = ort(*example)
    t = median_seconds(lambda: ort(*example), "cpu", 0, runs)
    rows.append({"path": "onnxruntime fp32", "ms": 1000 * t, "max_rel": error(out, ref), "export_s": export_s})

    try:
        from corrclip.engine.backends.openvino import OpenVinoExecutor, cpu_has
    except ImportError:
        return rows
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not cpu_has("bf16"):
            rows.append({"path": "openvino bf16", "skipped": "OpenVINO's CPU plugin lists no BF16 on this CPU"})
            continue
        ov = OpenVinoExecutor(folder / onnx_file, torch.device("cpu"), precision)
        (out,) = ov(*example)
        t = median_seconds(lambda ov=ov: ov(*example), "cpu", 0, runs)
        rows.append({"path": f"openvino {precision}", "ms": 1000 * t, "max_rel": error(out, ref)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="vit_b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--crop", type=int, default=336)
    ap.add_argument("--only", default="dino,sam_encoder", help="comma list of graphs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = build_models(args.backbone, "random", device="cpu")
    wanted = args.only.split(",")
    graphs = {g.name: g for g in method_graphs("corrclip", models, args.crop) if g.name in wanted}
    examples = {"dino": (torch.randn(2, 3, args.crop, args.crop, generator=torch.Generator().manual_seed(0)),),
                "sam_encoder": graphs["sam_encoder"].make_inputs({}, torch.Generator().manual_seed(0))
                if "sam_encoder" in graphs else None}
    report = {"cpu": cpu_model(), "threads": args.threads, "backbone": args.backbone, "runs": args.runs,
              "torch": torch.__version__, "graphs": {}}
    print(f"{report['cpu']['name']} ({', '.join(report['cpu']['flags'])}), {args.threads} threads, "
          f"{args.backbone} random weights, median of {args.runs}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            shape = "x".join(map(str, examples[name][0].shape))
            rows = bench_graph(graphs[name], examples[name], args.runs, Path(tmp))
            report["graphs"][name] = {"input": shape, "rows": rows}
            eager = rows[0]["ms"]
            print(f"\n{name} [{shape}]")
            print(f"{'path':<22}{'ms':>10}{'vs eager':>10}{'max rel err':>13}  note")
            for r in rows:
                if "skipped" in r:
                    print(f"{r['path']:<22}{'-':>10}{'-':>10}{'-':>13}  {r['skipped']}")
                    continue
                note = (f"first call {r['first_call_s']:.1f} s" if "first_call_s" in r else
                        f"ONNX export {r['export_s']:.1f} s" if "export_s" in r else "")
                print(f"{r['path']:<22}{r['ms']:10.0f}{eager / r['ms']:9.2f}x{r['max_rel']:13.1e}  {note}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
