"""The model and engine flags every command shares (segment, bench, eval, label, serve; export takes the
weights group), and the one function that turns them into a Segmenter. Same names, same meanings,
declared once: the choices come from the method and backend registries."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import methods, presets

RANDOM_WARNING = (
    "WARNING: running with RANDOM weights. They exercise the whole pipeline and its timing, but the\n"
    "         label maps mean nothing. Use --weights official (or local files) for real results."
)


class UsageError(ValueError):
    """A bad combination of flags; the message says what to do."""


def add_weights_args(p: argparse.ArgumentParser, *, weights_default: str | None = None) -> None:
    """Which method, which models, which weights (segment, bench, eval, label, serve and export)."""
    g = p.add_argument_group("method and models")
    g.add_argument("--method", default="corrclip", choices=methods.names(),
                   help="; ".join(f"{m}: {methods.get(m).summary}" for m in methods.names()))
    g.add_argument("--backbone", default="vit_b", choices=list(presets.BACKBONES),
                   help="model sizes (default vit_b: MetaCLIP ViT-B/16 + DINO ViT-B/8 + SAM ViT-B; tiny: tests only)")
    g.add_argument("--weights", choices=["official", "random"], default=weights_default,
                   help="official checkpoints (downloaded once) or seeded random weights (default: "
                        f"{weights_default or 'official; random for --backbone tiny'})")
    g.add_argument("--clip-weights", help="open_clip tag (e.g. metaclip_fullcc, openai), ARCH:TAG, or a local file")
    g.add_argument("--clip", dest="clip_weights", help=argparse.SUPPRESS)  # corrclip-export's old spelling
    g.add_argument("--dino-weights", help="local DINO checkpoint (e.g. dino_vitbase8_pretrain.pth)")
    g.add_argument("--sam-weights", help="local SAM checkpoint (e.g. sam_vit_b_01ec64.pth)")
    g.add_argument("--sam", choices=["vit_b", "vit_l", "vit_h", "tiny", "none"],
                   help="SAM model for region masks (default: the backbone's; none = label maps required)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    from .engine import backends

    g = p.add_argument_group("exported engine")
    g.add_argument("--engine", type=Path, help="run an engine bundle from corrclip-export instead of the torch "
                   "models (the method, models and weights are then the bundle's)")
    g.add_argument("--backend", default=None, choices=[backends.TORCH, *backends.names()],
                   help="what runs the graphs: " + "; ".join(f"{b}: {backends.get(b).summary}"
                                                             for b in backends.names())
                   + f" (default: {backends.TORCH} without --engine, onnxruntime with it)")
    add_precision_arg(g)
    g.add_argument("--compile", action="store_true",
                   help="torch backend: run the encoders (DINO, CLIP trunk, SAM encoder) through torch.compile at the "
                        "chosen precision; the first calls' compile time is reported apart (timings compile.<stage>)")


def add_precision_arg(g) -> None:
    from .precision import MODES

    g.add_argument("--precision", choices=MODES, default="fp32",
                   help="fp32: the exact reference (default); bf16/fp16: the encoders in half precision, every "
                        "decision in fp32; auto: the fastest mix within the research code's own rounding on this "
                        "hardware (fp16 encoders on CUDA; on CPUs fp32 + fused attention, SAM's encoder in "
                        "bf16 where AMX/AVX512-BF16 exist). "
                        "Bundles run at their export precision; OpenVINO picks it at load time")


def add_amg_args(p: argparse.ArgumentParser) -> None:
    from .runtime.amg import DECODERS, AmgSettings

    d = AmgSettings()
    g = p.add_argument_group("SAM region masks")
    g.add_argument("--points-per-side", type=int, default=None,
                   help="SAM prompt grid (default 32; 8 is ~10x cheaper, the research code's online setting)")
    g.add_argument("--sam-decoder", choices=DECODERS, default=None,
                   help="shared: the image-side work once per image, equal up to float rounding (default); "
                        "reference: segment_anything's MaskDecoder, once per prompt")
    for name, what in (("pred_iou_thresh", "predicted-IoU"), ("stability_score_thresh", "stability-score"),
                       ("box_nms_thresh", "box-NMS IoU")):
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                       help=f"SAM's {what} threshold (default {getattr(d, name)}; <= 0 switches the filter off)")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("caching")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="folder for cached text embeddings (default $CORRCLIP_CACHE/text or ~/.cache/corrclip/text)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the text embedding cache")


def add_model_args(p: argparse.ArgumentParser, *, weights_default: str | None = None) -> None:
    """Every model/engine flag `segment` has."""
    add_weights_args(p, weights_default=weights_default)
    add_amg_args(p)
    add_engine_args(p)
    add_cache_args(p)


def text_cache(args: argparse.Namespace) -> Path | bool:
    if getattr(args, "no_cache", False):
        return False
    return getattr(args, "cache_dir", None) or True


def amg_settings(args: argparse.Namespace):
    from .runtime.amg import AmgSettings

    s = AmgSettings()
    if getattr(args, "points_per_side", None):
        s.points_per_side = args.points_per_side
    if getattr(args, "sam_decoder", None):
        s.decoder = args.sam_decoder
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        if getattr(args, name, None) is not None:
            setattr(s, name, getattr(args, name))
    return s


def build_segmenter(args: argparse.Namespace, *, masks_given: bool = False):
    """The Segmenter the flags describe. masks_given: every image brings a label map, so SAM is not
    built unless --sam names one. Raises UsageError, WeightsError or BundleError (one-line messages)."""
    from .api import Segmenter
    from .engine import backends

    backend = args.backend or (backends.TORCH if args.engine is None else "onnxruntime")
    if args.engine is not None:
        if backend == backends.TORCH:
            raise UsageError("--backend torch runs the models themselves: drop --engine, or pick a bundle backend "
                             f"({', '.join(backends.names())})")
        if getattr(args, "compile", False):
            raise UsageError("--compile compiles the torch models; a bundle's graphs were compiled when exported "
                             "(corrclip-export --format aoti): drop --compile or --engine")
        return Segmenter.from_bundle(args.engine, backend, device=args.device, amg=amg_settings(args),
                                     text_cache=text_cache(args), precision=getattr(args, "precision", "fp32"))
    if backend != backends.TORCH:
        raise UsageError(f"--backend {backend} runs an exported bundle: add --engine DIR (corrclip-export makes one)")
    sam = "none" if masks_given and not args.sam else args.sam
    return Segmenter(args.backbone, args.weights, clip_weights=args.clip_weights, dino_weights=args.dino_weights,
                     sam_weights=args.sam_weights, sam=sam, amg=amg_settings(args), device=args.device,
                     method=args.method, text_cache=text_cache(args), precision=getattr(args, "precision", "fp32"),
                     compile=getattr(args, "compile", False))


def warn_if_random(seg) -> None:
    if seg.random_weights:
        print(RANDOM_WARNING, file=sys.stderr)
