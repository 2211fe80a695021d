"""Model and engine flags shared by every command, and the Segmenter they describe.

PROVISIONAL copy on the issue-14 branch: issue 9 lands the real module on main with the same two
names (`add_model_args`, `build_segmenter`); at merge time main's version replaces this file.
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
    p.add_argument("--method", default="corrclip", choices=["corrclip", "sc-clip", "cliptrase"],
                   help="corrclip (CLIP + DINO + SAM regions, default), sc-clip, cliptrase")
    p.add_argument("--backbone", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"],
                   help="model sizes (default vit_b: MetaCLIP ViT-B/16 + DINO ViT-B/8 + SAM ViT-B)")
    p.add_argument("--weights", choices=["official", "random"], default=None,
                   help="official checkpoints or seeded random weights (default: official; random for tiny)")
    p.add_argument("--clip-weights", help="open_clip tag (e.g. metaclip_fullcc, openai), ARCH:TAG, or a local file")
    p.add_argument("--dino-weights", help="local DINO checkpoint (e.g. dino_vitbase8_pretrain.pth)")
    p.add_argument("--sam-weights", help="local SAM checkpoint (e.g. sam_vit_b_01ec64.pth)")
    p.add_argument("--sam", choices=["vit_b", "vit_l", "vit_h", "tiny", "none"],
                   help="SAM model for region masks (default: the backbone's; none = --masks required)")
    p.add_argument("--points-per-side", type=int, default=None, help="SAM prompt grid (default 32)")
    p.add_argument("--engine", type=Path, help="run an engine bundle from corrclip-export")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "aoti", "tensorrt"],
                   help="how to run --engine's graphs (default onnxruntime)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def build_segmenter(args: argparse.Namespace):
    """The Segmenter the flags describe; raises WeightsError / BundleError / ValueError on bad flags."""
    from .api import Segmenter

    amg = None
    if args.points_per_side:
        from .runtime.amg import AmgSettings

        amg = AmgSettings(points_per_side=args.points_per_side)
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
