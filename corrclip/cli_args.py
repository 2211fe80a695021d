"""The model and engine flags every command shares, and the Segmenter they describe.

INTERIM (issue 15 branch): a stand-in with the names issue 9 lands on main
(`add_model_args(parser, *, bench=False)`, `build_segmenter(args)`); main's version replaces this
file when the branches merge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RANDOM_WARNING = (
    "WARNING: running with RANDOM weights. They exercise the whole pipeline and its timing, but the\n"
    "         label maps mean nothing. Use --weights official (or local files) for real results."
)


def add_model_args(p: argparse.ArgumentParser, *, bench: bool = False) -> None:
    p.add_argument("--method", default="corrclip", choices=["corrclip", "sc-clip", "cliptrase"])
    p.add_argument("--backbone", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    p.add_argument("--weights", choices=["official", "random"], default=None)
    p.add_argument("--clip-weights")
    p.add_argument("--dino-weights")
    p.add_argument("--sam-weights")
    p.add_argument("--sam", choices=["vit_b", "vit_l", "vit_h", "tiny", "none"])
    p.add_argument("--points-per-side", type=int, default=None)
    p.add_argument("--engine", type=Path)
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "aoti", "tensorrt"])
    p.add_argument("--device", default=None)


def build_segmenter(args: argparse.Namespace):
    from .api import Segmenter
    from .runtime.amg import AmgSettings

    amg = AmgSettings(points_per_side=args.points_per_side) if args.points_per_side else None
    if args.engine is not None:
        seg = Segmenter(engine=args.engine, backend=args.backend, amg=amg, device=args.device)
        if "random" in json.dumps(seg.identity):
            print(RANDOM_WARNING, file=sys.stderr)
        return seg
    weights = args.weights or ("random" if args.backbone == "tiny" else "official")
    if weights == "random":
        print(RANDOM_WARNING, file=sys.stderr)
    return Segmenter(args.backbone, weights, clip_weights=args.clip_weights, dino_weights=args.dino_weights,
                     sam_weights=args.sam_weights, sam=args.sam, amg=amg, device=args.device, method=args.method)
