"""`corrclip-export`: official (or random, or local) weights -> an engine bundle.

    corrclip-export --backbone vit_b --out bundles/vit_b
    corrclip-export --backbone tiny --format onnx,aoti --out bundles/tiny
    corrclip-export --backbone vit_b --weights random --sam none --out bundles/vit_b_nosam

Every graph is exported, then run by ONNX Runtime (and the AOTInductor runner) on fresh random
inputs at two shapes per dynamic axis and compared with torch; the errors go into the manifest,
and a graph whose error exceeds its tolerance fails the export (nothing is published).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from .. import __version__, presets
from ..engine.bundle import SCHEMA_VERSION, BundleError, BundleWriter
from ..models.build import Models, build_models
from ..models.checkpoints import WeightsError
from .formats import write_aoti, write_onnx
from .graphs import Graph, method_graphs

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}  # max |a - b| / max |torch|
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ParityError(RuntimeError):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corrclip-export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export CorrCLIP's graphs (CLIP text, CLIP trunk, DINO, correlation head, SAM encoder and "
                    "decoder) into an engine bundle that `corrclip segment --engine DIR` and C/C++ hosts run.",
        epilog=__doc__.split("\n\n")[1])
    p.add_argument("--method", default="corrclip", choices=list(presets.METHODS),
                   help="corrclip (default), sc-clip or cliptrase (CLIP only: no DINO or SAM graphs)")
    p.add_argument("--backbone", default="vit_b", choices=list(presets.BACKBONES))
    p.add_argument("--clip", help="CLIP as ARCH:WEIGHTS (open_clip tag or local file), e.g. ViT-B-16:openai")
    p.add_argument("--dino", choices=["dino_vitb8", "dino_vits8", "tiny"], help="DINO model (default: the backbone's)")
    p.add_argument("--dino-weights", help="local DINO checkpoint")
    p.add_argument("--sam", choices=["vit_b", "vit_l", "vit_h", "tiny", "none"],
                   help="SAM model (default: the backbone's); none = the bundle needs user label maps")
    p.add_argument("--sam-weights", help="local SAM checkpoint")
    p.add_argument("--weights", choices=["official", "random"], default=None,
                   help="default weights of every model (default: official; random for tiny)")
    p.add_argument("--format", default="onnx", help="comma list of onnx, aoti, tensorrt (default onnx)")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--crop", type=int, default=None,
                   help="window size the graphs are built for (default: the method's, 336 or 224 for sc-clip)")
    p.add_argument("--device", default="cpu", help="device to export/compile on (AOTInductor builds for it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("onnx", "aoti", "tensorrt")]
    if bad or "onnx" not in formats:
        print(f"error: --format takes onnx plus optionally aoti and tensorrt (got {args.format!r})", file=sys.stderr)
        return 2
    if args.crop is None:
        args.crop = presets.DEFAULTS[args.method].crop
    if args.crop <= 0 or args.crop % 56:
        print(f"error: --crop must be a positive multiple of 56 (DINO's 8 and CLIP's 14/16 patches); got {args.crop}",
              file=sys.stderr)
        return 2
    try:
        clip, sam, dino = args.clip, args.sam, args.dino
        if args.method != "corrclip":  # CLIP only, OpenAI weights like the research code
            sam, dino = "none", "none"
            if clip is None and args.backbone in presets.OPENAI_ARCH:
                random = (args.weights or "official") == "random"
                clip = f"{presets.OPENAI_ARCH[args.backbone]}:{'random' if random else 'openai'}"
        models = build_models(args.backbone, args.weights, clip_weights=clip, dino_weights=args.dino_weights,
                              sam_weights=args.sam_weights, sam=sam, dino=dino, device=args.device)
        writer = BundleWriter(args.out, overwrite=args.overwrite)
    except (WeightsError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.weights or ("random" if args.backbone == "tiny" else "official")) == "random":
        print("WARNING: exporting RANDOM weights: the bundle runs and times like the real one, "
              "but segments nothing meaningful.", file=sys.stderr)
    try:
        manifest = export(models, args, formats, writer)
    except (ParityError, BundleError, RuntimeError) as e:
        writer.abort()
        print(f"error: {e}\nnothing was written to {args.out}", file=sys.stderr)
        return 1
    except BaseException:
        writer.abort()
        raise
    writer.commit(manifest)
    print_table(manifest)
    print(f"bundle written to {args.out}/")
    return 0


def export(models: Models, args: argparse.Namespace, formats: list[str], writer: BundleWriter) -> dict:
    from tqdm import tqdm

    dtype = DTYPES[args.precision]
    graphs = method_graphs(args.method, models, args.crop)
    entries = {}
    for graph in tqdm(graphs, desc="export", unit="graph"):
        if dtype != torch.float32:
            graph.module.to(dtype)
        gen = torch.Generator().manual_seed(0)
        example = _cast(graph.make_inputs(graph.sizes[0], gen), dtype)
        start = time.perf_counter()
        files = [{"format": "onnx", "files": write_onnx(graph, example, writer.tmp, args.opset)}]
        if "aoti" in formats:
            files.append({"format": f"aoti-{torch.device(args.device).type}",
                          "files": write_aoti(graph, _to(example, args.device), writer.tmp, args.device)})
        seconds = time.perf_counter() - start
        parity = check_parity(graph, writer.tmp, files, dtype, args.device)
        for f in files:
            f["file"] = f["files"][0]
            f["sha256"] = writer.hashes(f.pop("files"))
        entries[graph.name] = {
            "files": files, "precision": args.precision, "export_seconds": round(seconds, 2),
            "inputs": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."),
                        "shape": _symbolic(t.shape, graph.dynamic.get(n, {}))}
                       for n, t in zip(graph.input_names, example)],
            "outputs": graph.output_names, "dynamic_axes": graph.dynamic, "parity": parity,
            "bytes": sum((writer.tmp / r).stat().st_size for f in files for r in f["sha256"]),
        }
    if "tensorrt" in formats:
        print("note: TensorRT plans are built on the target GPU at first load (engine/tensorrt.py); "
              "this machine has no TensorRT", file=sys.stderr)
    return manifest_for(models, args, entries)


def check_parity(graph: Graph, folder: Path, files: list[dict], dtype: torch.dtype, device: str) -> dict:
    """Runs each exported file at both shapes against torch; raises ParityError past tolerance."""
    import onnxruntime as ort

    from ..engine.executors import AotiExecutor

    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    tol = TOLERANCE[precision]
    report = {"tolerance": tol}
    opts = ort.SessionOptions()
    if dtype == torch.float16:
        # The CPU provider's layout optimizations crash the process (SIGSEGV) on fp16 transformer graphs
        # (onnxruntime 1.32, cf. microsoft/onnxruntime#15494); the level below them is safe.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    try:
        sess = ort.InferenceSession(str(folder / files[0]["files"][0]), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ParityError(f"ONNX Runtime's CPU provider cannot run graph {graph.name} at {precision} ({reason}), so "
                          "its parity cannot be checked; export with --precision fp32 or fp16") from e
    aoti = AotiExecutor(folder / files[1]["files"][0], torch.device(device)) if len(files) > 1 else None
    for i, sizes in enumerate(graph.sizes):
        inputs = _cast(graph.make_inputs(sizes, torch.Generator().manual_seed(100 + i)), dtype)
        with torch.no_grad():
            ref = graph.module(*_to(inputs, device))
        ref = [r.float().cpu() for r in (ref if isinstance(ref, tuple) else (ref,))]
        runs = {"onnx": [torch.from_numpy(o).float() for o in sess.run(
            None, {n: t.numpy() for n, t in zip(graph.input_names, inputs)})]}
        if aoti is not None:
            runs["aoti"] = [o.float().cpu() for o in aoti(*_to(inputs, device))]
        for fmt, outs in runs.items():
            err = max(float((o - r).abs().max() / r.abs().max().clamp(min=1e-12)) for o, r in zip(outs, ref))
            abs_err = max(float((o - r).abs().max()) for o, r in zip(outs, ref))
            key = f"{fmt}@{','.join(f'{k}={v}' for k, v in sizes.items()) or 'static'}"
            report[key] = {"max_abs": abs_err, "max_rel": err}
            if not err <= tol:
                raise ParityError(f"graph {graph.name} ({fmt}) differs from torch by {err:.2e} (relative) at {key}, "
                                  f"above the tolerance {tol:.0e}")
    return report


def manifest_for(models: Models, args: argparse.Namespace, graphs: dict) -> dict:
    import importlib.metadata as md

    from ..runtime.preprocess import PAD_MULTIPLE, PIXEL_MEAN, PIXEL_STD

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    visual = models.clip.visual
    settings = presets.dataset_settings(None, args.method, crop=args.crop)
    return {
        "schema_version": SCHEMA_VERSION,
        "method": args.method,
        "backbone": models.backbone.name,
        "weights": models.identity,
        "weight_files": models.weight_files,
        "clip": {"arch": models.clip_arch, "patch": visual.conv1.kernel_size[0], "width": visual.conv1.out_channels,
                 "embed_dim": int(visual.proj.shape[1]),
                 "tokenizer": "ViT-B-16" if models.clip_arch == "tiny" else models.clip_arch},
        "dino": None if models.dino is None else {"patch": 8, "dim": int(models.dino.embed_dim)},
        "sam": None if models.sam is None else {
            "img_size": models.sam.image_encoder.img_size,
            "pixel_mean": models.sam.pixel_mean.flatten().tolist(),
            "pixel_std": models.sam.pixel_std.flatten().tolist()},
        "window": {"crop": args.crop, "note": "graphs are built for crop x crop windows"},
        "preprocessing": {"pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD, "pad_multiple": PAD_MULTIPLE,
                          "short_side": settings.short_side, "long_cap": settings.long_cap,
                          "stride": settings.stride, "resize": "opencv INTER_LINEAR on uint8"},
        "hyperparameters": {"tau": 4.0, "alpha": 1.0, "beta": 0.5, "merge_eps": settings.merge_eps,
                            "logit_scale": settings.logit_scale, "templates": 80} if args.method == "corrclip"
        else {"settings": settings.__dict__, "templates": 80},
        "graphs": graphs,
        "versions": {"corrclip": __version__, "torch": torch.__version__, "onnx": version("onnx"),
                     "onnxruntime": version("onnxruntime"), "onnxscript": version("onnxscript"),
                     "open_clip_torch": version("open_clip_torch"), "segment_anything": version("segment-anything"),
                     "timm": version("timm"), "python": platform.python_version()},
        "exported_on": {"device": args.device, "opset": args.opset, "precision": args.precision},
    }


def print_table(manifest: dict) -> None:
    print(f"\n{'graph':<12} {'file':<24} {'MB':>8} {'export s':>9} {'max rel err':>12}")
    for name, g in manifest["graphs"].items():
        errs = [v["max_rel"] for k, v in g["parity"].items() if isinstance(v, dict)]
        print(f"{name:<12} {g['files'][0]['file']:<24} {g['bytes'] / 1e6:8.1f} {g['export_seconds']:9.1f} "
              f"{max(errs):12.2e}")


def _cast(t: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(dtype) if x.dtype == torch.float32 else x for x in t)


def _to(t: tuple[torch.Tensor, ...], device: str) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(device) for x in t)


def _symbolic(shape: torch.Size, axes: dict[int, str]) -> list:
    return [axes.get(i, int(s)) for i, s in enumerate(shape)]


if __name__ == "__main__":
    sys.exit(main())
