"""`corrclip-export`: official (or random, or local) weights -> an engine bundle.

    corrclip-export --backbone vit_b --out bundles/vit_b
    corrclip-export --backbone tiny --format onnx,aoti --out bundles/tiny
    corrclip-export --backbone vit_b --weights random --sam none --out bundles/vit_b_nosam
    corrclip-export --backbone vit_b --out bundles/vit_b --triton-repo triton/vit_b   # + a Triton repository
    corrclip-export --bundle bundles/vit_b --triton-repo triton/vit_b                  # from an existing bundle

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

from .. import __version__, methods
from ..cli_args import add_weights_args
from ..engine.bundle import SCHEMA_VERSION, Bundle, BundleError, BundleWriter
from ..models.build import Models
from ..models.checkpoints import WeightsError
from ..models.half import AtPrecision
from ..precision import MODES, export_plan
from .formats import FORMATS, stored_format
from .graphs import AXIS_MAX, Graph, method_graphs

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}  # max |a - b| / max |torch|
FLIP_CEILING = 1e-2  # what a graph's allowed share of rows (Graph.flip_rows) may still differ by
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ParityError(RuntimeError):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corrclip-export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export CorrCLIP's graphs (CLIP text, CLIP trunk, DINO, correlation head, SAM encoder and "
                    "decoder) into an engine bundle that `corrclip segment --engine DIR` and C/C++ hosts run.",
        epilog=__doc__.split("\n\n")[1])
    add_weights_args(p)
    p.add_argument("--dino", choices=["dino_vitb8", "dino_vits8", "tiny"], help="DINO model (default: the backbone's)")
    p.add_argument("--format", default="onnx", help=f"comma list of {', '.join(FORMATS)} (default onnx; onnx is "
                   "always written; TensorRT engines are built from the ONNX graphs on the target GPU)")
    p.add_argument("--precision", choices=MODES, default="fp32",
                   help="fp32 (default): every graph exact; bf16/fp16: the encoder graphs (DINO, CLIP trunk and text, "
                        "SAM encoder) compute in half precision behind fp32 inputs and outputs, the decision graphs "
                        "(correlation head, SAM prompts) stay fp32; auto: fp16 encoders when exporting on a CUDA "
                        "device with tensor cores, fp32 otherwise (OpenVINO lowers fp32 graphs to bf16 at load "
                        "time on CPUs with bf16 units)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--crop", type=int, default=None,
                   help="window size the graphs are built for (default: the method's, 336 or 224 for sc-clip)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--out", type=Path, help="bundle folder to create")
    p.add_argument("--triton-repo", type=Path, help="also write a model repository for a stock tritonserver: the "
                   "ONNX graphs as ONNX Runtime models + the `corrclip` glue model (Python backend)")
    p.add_argument("--bundle", type=Path, help="with --triton-repo: write it from this existing bundle (no export)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.bundle is not None:
        return _triton_repo(args.bundle, args) if args.triton_repo else _usage("--bundle needs --triton-repo DIR")
    if args.out is None:
        return _usage("give --out DIR (the bundle to create)")
    args.device = args.device or "cpu"  # the device to export and compile (AOTInductor) on
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        hint = " (TensorRT engines are built from the ONNX graphs at first load: export onnx)" \
            if "tensorrt" in bad else ""
        print(f"error: unknown --format {', '.join(bad)}; choose from {', '.join(FORMATS)}{hint}", file=sys.stderr)
        return 2
    formats = ["onnx"] + [f for f in formats if f != "onnx"]  # C/C++ hosts and most backends read ONNX
    method = methods.get(args.method)
    if args.crop is None:
        args.crop = method.defaults.crop
    if args.crop <= 0 or args.crop % 56:
        print(f"error: --crop must be a positive multiple of 56 (DINO's 8 and CLIP's 14/16 patches); got {args.crop}",
              file=sys.stderr)
        return 2
    try:
        models = methods.build_models(method, args.backbone, args.weights, clip_weights=args.clip_weights,
                                      dino_weights=args.dino_weights, sam_weights=args.sam_weights, sam=args.sam,
                                      dino=args.dino, device=args.device)
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
    return _triton_repo(args.out, args) if args.triton_repo else 0


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _triton_repo(bundle: Path, args: argparse.Namespace) -> int:
    from ..serve.triton_repo import RepositoryError, write_repository

    try:
        write_repository(bundle, args.triton_repo, overwrite=args.overwrite)
    except (RepositoryError, BundleError) as e:
        return _usage(str(e))
    print(f"Triton model repository written to {args.triton_repo}/ (serve: tritonserver --model-repository "
          f"{args.triton_repo}; see README)")
    return 0


def export(models: Models, args: argparse.Namespace, formats: list[str], writer: BundleWriter) -> dict:
    from tqdm import tqdm

    plan = export_plan(args.precision, args.device)
    args.export_plan = plan
    graphs = method_graphs(args.method, models, args.crop)
    entries = {}
    for graph in tqdm(graphs, desc="export", unit="graph"):
        precision = plan.name(graph.name)  # "fp32" for every graph that is not an encoder
        dtype = DTYPES[precision]
        if dtype != torch.float32:
            # Half precision inside, fp32 at the graph's inputs and outputs (Cast nodes at both ends): every
            # executor feeds it what the runtime holds, and the decisions after it see fp32.
            graph = graph.__class__(**{**graph.__dict__, "module": AtPrecision(graph.module, dtype)})
        gen = torch.Generator().manual_seed(0)
        example = graph.make_inputs(graph.sizes[0], gen)
        start = time.perf_counter()
        files = []
        for fmt in formats:
            written = FORMATS[fmt](graph, _to(example, args.device if fmt == "aoti" else "cpu"), writer.tmp,
                                   device=args.device, opset=args.opset)
            files.append({"format": stored_format(fmt, args.device), "file": written[0], "written": written})
        seconds = time.perf_counter() - start
        parity = check_parity(graph, writer.tmp, files, dtype, args.device)
        for f in files:
            f["sha256"] = writer.hashes(f.pop("written"))
        entries[graph.name] = {
            "files": files, "precision": precision, "export_seconds": round(seconds, 2),
            "inputs": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."),
                        "shape": _symbolic(t.shape, graph.dynamic.get(n, {}))}
                       for n, t in zip(graph.input_names, example)],
            "outputs": graph.output_names, "dynamic_axes": graph.dynamic, "parity": parity,
            "bytes": sum((writer.tmp / r).stat().st_size for f in files for r in f["sha256"]),
        }
    return manifest_for(models, args, entries)


def check_parity(graph: Graph, folder: Path, files: list[dict], dtype: torch.dtype, device: str) -> dict:
    """Runs each exported file at both shapes against torch, with the backend that verifies its format
    (engine/backends: checks_export); raises ParityError past tolerance."""
    from ..engine import backends

    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    tol = TOLERANCE[precision]
    report = {"tolerance": tol}
    runners = {}
    for f in files:
        fmt = f["format"].split("-")[0]  # "aoti-cpu" -> "aoti"
        checker = backends.checker_for(fmt)
        if checker is None:
            raise ParityError(f"no backend verifies {fmt} files (engine/backends: checks_export)")
        run_on = torch.device(device if checker.per_device_files else "cpu")
        partial = Bundle(folder, {"graphs": {graph.name: {"files": [f], "inputs": [], "precision": precision}}})
        try:
            runners[fmt] = (checker.make(partial, graph.name, run_on), run_on)
        except BundleError as e:  # e.g. ONNX Runtime's CPU provider has no bf16 kernels
            reason = (str(e.__cause__ or e).strip().splitlines() or [""])[0][:200]
            raise ParityError(f"{checker.name} cannot run graph {graph.name} at {precision} ({reason}), so its "
                              "parity cannot be checked; export with another --precision (CPUs run bf16 from an fp32 "
                              "bundle: --backend openvino --precision bf16)") from e
    for i, sizes in enumerate(graph.sizes):
        # inputs as the runtime holds them (fp32): a lowered graph casts them itself, like its torch module
        inputs = graph.make_inputs(sizes, torch.Generator().manual_seed(100 + i))
        with torch.no_grad():
            ref = graph.module(*_to(inputs, device))
        ref = [r.float().cpu() for r in (ref if isinstance(ref, tuple) else (ref,))]
        for fmt, (run, run_on) in runners.items():
            outs = [o.float().cpu() for o in run(*_to(inputs, run_on))]
            rel = [(o - r).abs() / r.abs().max().clamp(min=1e-12) for o, r in zip(outs, ref)]
            err = max(float(e.max()) for e in rel)
            abs_err = max(float((o - r).abs().max()) for o, r in zip(outs, ref))
            # Share of rows (all axes but the last) past tolerance: a rounding-flipped decision moves whole tokens.
            over = max(float(e.reshape(-1, e.shape[-1] if e.dim() else 1).amax(-1).gt(tol).float().mean())
                       for e in rel)
            key = f"{fmt}@{','.join(f'{k}={v}' for k, v in sizes.items()) or 'static'}"
            report[key] = {"max_abs": abs_err, "max_rel": err, "rows_over_tolerance": over}
            flipped = over <= graph.flip_rows and err <= FLIP_CEILING
            if not (err <= tol or flipped):
                raise ParityError(f"graph {graph.name} ({fmt}) differs from torch by {err:.2e} (relative) at {key}, "
                                  f"above the tolerance {tol:.0e}"
                                  + (f" ({over:.1%} of rows past it)" if graph.flip_rows else ""))
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
    method = methods.get(args.method)
    settings = method.settings(None, crop=args.crop)
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
        "window": {"crop": args.crop, "dynamic": True, "multiple": PAD_MULTIPLE, "max": AXIS_MAX["H"],
                   "note": "the graphs take any H x W window, sides multiples of `multiple` up to `max`; `crop` is "
                           "the default window the bundle was made and checked with"},
        "preprocessing": {"pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD, "pad_multiple": PAD_MULTIPLE,
                          "short_side": settings.short_side, "long_cap": settings.long_cap,
                          "stride": settings.stride, "resize": "opencv INTER_LINEAR on uint8"},
        "hyperparameters": method.hyperparameters(settings),
        "graphs": graphs,
        "versions": {"corrclip": __version__, "torch": torch.__version__, "onnx": version("onnx"),
                     "onnxruntime": version("onnxruntime"), "onnxscript": version("onnxscript"),
                     "open_clip_torch": version("open_clip_torch"), "segment_anything": version("segment-anything"),
                     "timm": version("timm"), "python": platform.python_version()},
        "exported_on": {"device": args.device, "opset": args.opset, "precision": args.precision,
                        "precision_plan": args.export_plan.describe() if hasattr(args, "export_plan") else None},
    }


def print_table(manifest: dict) -> None:
    print(f"\n{'graph':<12} {'file':<24} {'MB':>8} {'export s':>9} {'max rel err':>12}")
    for name, g in manifest["graphs"].items():
        checks = [v for v in g["parity"].values() if isinstance(v, dict)]
        over = max(v.get("rows_over_tolerance", 0.0) for v in checks)
        note = f"  ({over:.2%} of rows past {g['parity']['tolerance']:.0e}: flipped thresholds)" if over else ""
        print(f"{name:<12} {g['files'][0]['file']:<24} {g['bytes'] / 1e6:8.1f} {g['export_seconds']:9.1f} "
              f"{max(v['max_rel'] for v in checks):12.2e}{note}")


def _to(t: tuple[torch.Tensor, ...], device: str) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(device) for x in t)


def _symbolic(shape: torch.Size, axes: dict[int, str]) -> list:
    return [axes.get(i, int(s)) for i, s in enumerate(shape)]


if __name__ == "__main__":
    sys.exit(main())
