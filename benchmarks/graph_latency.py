"""Per-graph latency of a bundle's backends against torch eager, same inputs, one process.

    python benchmarks/graph_latency.py BUNDLE [--runs 3] [--device cpu]

Rebuilds the torch modules with the bundle's backbone and seeded random weights (timing does not
depend on weight values), feeds every backend the export-time example shapes, and prints the
median time per graph and the ratio to torch eager. Only meaningful for random-weight bundles or
when the same weights are given; it never compares outputs (the export's parity check does).
"""

from __future__ import annotations

import argparse

import torch

from corrclip.engine.backends import make_executor
from corrclip.engine.bundle import load_bundle
from corrclip.export.graphs import method_graphs
from corrclip.models.build import build_models
from corrclip.runtime.timing import median_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    bundle = load_bundle(args.bundle, verify_hashes=False)
    mf = bundle.manifest
    method = mf["method"]
    sam = "none" if mf.get("sam") is None else mf["weights"]["sam"].split(":")[0]
    models = build_models(mf["backbone"], "random", sam=sam, dino=None if method == "corrclip" else "none",
                          clip_weights=mf["weights"]["clip"] if method != "corrclip" else None, device=device)
    graphs = {g.name: g for g in method_graphs(method, models, mf["window"]["crop"])}
    formats = {f["format"] for g in mf["graphs"].values() for f in g["files"]}
    backends = ["onnxruntime"] + (["aoti"] if f"aoti-{device.type}" in formats else [])
    header = " ".join(f"{b + ' ms':>15} {'ratio':>6}" for b in backends)
    print(f"{'graph':<12} {'shape':<22} {'torch ms':>10} {header}")
    for name in mf["graphs"]:
        g = graphs[name]
        inputs = tuple(t.to(device) for t in g.make_inputs(g.sizes[0], torch.Generator().manual_seed(0)))
        with torch.inference_mode():
            ref = median_seconds(lambda g=g, inputs=inputs: g.module(*inputs), device, 1, args.runs)
        row = f"{name:<12} {str(g.sizes[0]):<22} {1000 * ref:10.1f} "
        for b in backends:
            run = make_executor(bundle, name, b, device)
            t = median_seconds(lambda run=run, inputs=inputs: run(*inputs), device, 1, args.runs)
            row += f"{1000 * t:15.1f} {t / ref:6.2f}"
        print(row)


if __name__ == "__main__":
    main()
