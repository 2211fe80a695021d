"""`corrclip serve`: the engine as model `corrclip` on Triton Inference Server, through PyTriton.

Triton owns the network side: HTTP and gRPC endpoints (KServe v2 protocol), the dynamic batcher
that gathers concurrent requests into one call, the queue limit that turns excess requests away,
health (/v2/health/live, /v2/health/ready) and Prometheus metrics (:METRICS_PORT/metrics). PyTriton
runs Triton as a child process and hands each batch to SegmentService in this process, where the
models and the text-embedding cache live.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
from pathlib import Path

from .. import __version__
from .protocol import INPUTS, MODEL_NAME, OUTPUTS, Limits

EPILOG = """examples:
  corrclip serve --backbone tiny --weights random                    # seconds to start; random weights
  corrclip serve --backbone vit_b --points-per-side 16 --max-batch 4  # official weights
  corrclip serve --engine bundles/vit_b --backend onnxruntime         # an exported engine
  corrclip serve --backbone vit_b --sam none                          # clients send region maps ('masks')

The text-embedding disk cache is off unless --cache-dir is given (clients choose the vocabularies).

then:
  corrclip request photo.jpg --classes 'sky; cloud, road, car' --out out/
  curl -s 127.0.0.1:8000/v2/health/ready -o /dev/null -w '%{http_code}\\n'    # 200 when ready
  curl -s 127.0.0.1:8002/metrics | grep nv_inference_request_success"""


DESCRIPTION = """Serve the engine as model 'corrclip' on Triton Inference Server (through PyTriton).

One request = one encoded image + classes (CLI syntax) or a preset, optionally a region label map
(PNG) and flags (prob_thd, return_probs, overlay). The reply holds the label map (16-bit PNG), the
class names, per-stage seconds and the settings used, or an `error` saying what to fix. Concurrent
requests are batched (--max-batch, --max-queue-delay-us); vocabularies are embedded once and cached.
Triton provides /v2/health/ready, /v2/health/live and Prometheus metrics at :METRICS_PORT/metrics."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..cli_args import add_model_args

    p = sub.add_parser("serve", help="serve the engine on Triton Inference Server (HTTP/gRPC, dynamic batching)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION, epilog=EPILOG)
    add_model_args(p)
    net = p.add_argument_group("network (loopback by default: the server has no authentication)")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    net.add_argument("--http-port", type=int, default=8000)
    net.add_argument("--grpc-port", type=int, default=8001)
    net.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics at :PORT/metrics")
    bat = p.add_argument_group("batching")
    bat.add_argument("--max-batch", type=int, default=8, help="most requests (images) in one model call (default 8)")
    bat.add_argument("--max-queue-delay-us", type=int, default=2000,
                     help="how long the batcher waits for more requests to fill a batch (default 2000 us)")
    lim = p.add_argument_group("limits (a request over one gets an error; the server carries on)")
    d = Limits()
    lim.add_argument("--max-request-mb", type=float, default=d.max_request_bytes / 2**20,
                     help=f"inputs of one request together (default {d.max_request_bytes / 2**20:g})")
    lim.add_argument("--max-pixels", type=int, default=d.max_pixels,
                     help=f"image width x height, read before decoding (default {d.max_pixels:,})")
    lim.add_argument("--max-classes", type=int, default=d.max_classes,
                     help=f"class names per request, synonyms included (default {d.max_classes})")
    lim.add_argument("--max-class-pixels", type=float, default=d.max_class_pixels,
                     help=f"class names x image pixels, the full-resolution scoring's memory (~12 bytes each on the "
                          f"CPU; default {d.max_class_pixels:.0e})")
    lim.add_argument("--max-queue", type=int, default=d.max_queue,
                     help=f"requests waiting for the model; more are turned away at once (default {d.max_queue})")
    p.add_argument("--verbose", action="store_true", help="print Triton's own log")
    p.set_defaults(run=run)


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_pixels=args.max_pixels,
                  max_classes=args.max_classes, max_class_pixels=int(args.max_class_pixels), max_queue=args.max_queue)


def model_info(seg, args: argparse.Namespace) -> dict:
    return {"method": seg.method, "backbone": seg.backbone.name, "weights": seg.identity,
            "engine": str(args.engine) if args.engine else None, "backend": seg.backend,
            "random_weights": seg.random_weights, "corrclip": __version__}


def run(args: argparse.Namespace) -> int:
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        print("error: serving needs PyTriton: pip install 'corrclip[serve]' (scripts/setup.sh installs it)",
              file=sys.stderr)
        return 2
    from ..cli_args import UsageError, build_segmenter, warn_if_random
    from ..engine.bundle import BundleError
    from ..models.checkpoints import WeightsError
    from .service import SegmentService

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: listening on {args.host}: anyone who can reach it can use the server (no authentication)",
              file=sys.stderr)
    if args.cache_dir is None:
        # Clients choose the vocabularies: a disk cache of every one would grow without bound.
        args.no_cache = True
    try:
        seg = build_segmenter(args)
    except (UsageError, WeightsError, BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warn_if_random(seg)
    limits = limits_from(args)
    service = SegmentService(seg, limits, model_info(seg, args))
    use_this_libpython()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    # Triton prints pages of start-up tables; without --verbose they go to a file, named on failure.
    log_file = None if args.verbose else Path(tempfile.mkdtemp(prefix="corrclip-serve-")) / "triton.log"
    config = TritonConfig(http_address=args.host, http_port=args.http_port, grpc_address=args.host,
                          grpc_port=args.grpc_port, metrics_address=args.host, metrics_port=args.metrics_port,
                          exit_timeout_secs=5, log_verbose=1 if args.verbose else 0, log_file=log_file)
    batcher = DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us,
                             default_queue_policy=QueuePolicy(max_queue_size=limits.max_queue))
    # SIGTERM (docker stop, systemd, kill) stops Triton cleanly like Ctrl-C instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        with Triton(config=config) as triton:
            triton.bind(MODEL_NAME, service, inputs=[_tensor(Tensor, p) for p in INPUTS],
                        outputs=[_tensor(Tensor, p) for p in OUTPUTS],
                        config=ModelConfig(max_batch_size=args.max_batch, batcher=batcher), strict=False)
            triton.run()
            _print_endpoints(args, service.model_info)
            triton.serve()
    except KeyboardInterrupt:
        pass
    except Exception as e:  # PyTriton's start-up errors (a port in use, a missing library) come as several types
        print(f"error: Triton Inference Server did not start ({type(e).__name__}: {e}); is port {args.http_port}, "
              f"{args.grpc_port} or {args.metrics_port} in use? (--http-port/--grpc-port/--metrics-port); Triton's "
              f"log: {log_file or 'above'}", file=sys.stderr)
        return 1
    if log_file is not None:
        shutil.rmtree(log_file.parent, ignore_errors=True)  # kept only when the server failed to start
    print("server stopped", file=sys.stderr)
    return 0


def _tensor(tensor_cls, port):
    return tensor_cls(name=port.name, dtype=port.dtype, shape=(1,), optional=port.optional)


def use_this_libpython() -> None:
    """Put this interpreter's libpython first on the library path of Triton's Python backend.

    The backend's stub process links libpython3.X.so and takes the first one the loader finds. With
    an interpreter that is not the system's (pyenv, conda) that is the system's library, which does
    not match this interpreter's standard library, and the stub fails at start
    ("'_thread.RLock' object has no attribute '_recursion_count'").
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).is_file():
        print("WARNING: this Python has no shared libpython; Triton's Python backend will load the system's. If "
              "the server fails to start ('_recursion_count' in its log), run it from a venv made with the "
              "system Python (/usr/bin/python3 -m venv) or one built with --enable-shared.", file=sys.stderr)
        return
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


def _print_endpoints(args: argparse.Namespace, info: dict) -> None:
    base = f"http://{args.host}:{args.http_port}"
    what = f"{info['method']}, {info['backbone']}" + (", RANDOM weights" if info["random_weights"] else "")
    print(f"corrclip serve: model '{MODEL_NAME}' ({what}) is ready\n"
          f"  HTTP     {base}/v2/models/{MODEL_NAME}/infer\n"
          f"  gRPC     {args.host}:{args.grpc_port}\n"
          f"  health   {base}/v2/health/ready   {base}/v2/health/live\n"
          f"  metrics  http://{args.host}:{args.metrics_port}/metrics\n"
          "Ctrl-C stops it.", file=sys.stderr, flush=True)
