"""Load test of `corrclip serve` on loopback: N concurrent clients for M minutes, good and bad requests mixed.

    python benchmarks/serve_load.py --clients 8 --minutes 2 -- --backbone tiny --weights random --sam none
    python benchmarks/serve_load.py --url 127.0.0.1:8000 --pid 1234 --clients 8 --minutes 2   # a running server

Without --url it starts `corrclip serve SERVER_ARGS` itself on free 127.0.0.1 ports and stops it at the
end. Only 127.0.0.1 is ever targeted. Reports good-request latency (p50/p99), throughput, errors on
good requests (must be 0), bad requests that were not refused (must be 0), the server's peak resident
memory (the serve process and its children: tritonserver and the Python backend stub) and its growth
from the end of the warm-up to the end of the run. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from corrclip.bench import synthetic_image
from corrclip.serve.client import Client, ServeError

VOCABULARIES = ("table, cup, saucer, spoon, coffee", "sky; cloud, road, car, tree, person", "cat, dog, sofa")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    """A valid PNG of w x h zeros that compresses to a few kB: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\0" * ((w + 1) * h), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def workload(seed: int = 0, size: tuple[int, int] = (320, 240)) -> tuple[list[dict], list[dict]]:
    """(good, bad) request keyword sets for Client.segment. Good ones bring region maps (a grid of
    16 regions) so that a server started with --sam none can answer them."""
    w, h = size
    images = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(synthetic_image(w, h, seed + i)).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    yy, xx = np.mgrid[0:h, 0:w]
    regions = _png(((yy * 4 // h) * 4 + xx * 4 // w).astype(np.uint8))
    good = [dict(image=img, classes=vocab, masks=regions) for img in images for vocab in VOCABULARIES]
    good += [dict(image=images[0], preset="voc21", masks=regions, overlay=True),
             dict(image=images[1], classes=VOCABULARIES[0], masks=regions, return_probs=True)]
    bad = [dict(image=images[0][: len(images[0]) // 2], classes="a, b", masks=regions),  # truncated JPEG
           dict(image=b"not an image", classes="a, b"),
           dict(image=images[0], classes="", masks=regions),  # no classes
           dict(image=images[0], classes=",".join(f"c{i}" for i in range(100_000)), masks=regions),
           dict(image=images[0], classes="a, b", masks=_png(np.zeros((7, 9), np.uint8))),  # wrong size
           dict(image=_bomb_png(6000, 4000), classes="a, b"),  # 24 megapixels in ~25 kB
           dict(image=images[0], preset="no_such_preset", masks=regions)]
    return good, bad


def process_tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
        except (OSError, StopIteration):
            pass
    return total


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # good requests that succeeded, seconds
    good_errors: list[str] = field(default_factory=list)
    bad_refused: int = 0
    bad_accepted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def triton_counts(metrics_url: str) -> dict[str, float]:
    """Triton's request and execution counters for model corrclip (their ratio is the mean batch size)."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(name + "{") and 'model="corrclip"' in line:
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def run_load(url: str, clients: int = 8, seconds: float = 120.0, bad_fraction: float = 0.25, seed: int = 0,
             pid: int | None = None, size: tuple[int, int] = (320, 240), metrics: str | None = None) -> dict:
    if not url.removeprefix("http://").startswith(("127.0.0.1:", "localhost:")):
        raise ValueError(f"load tests only target 127.0.0.1; got {url}")
    good, bad = workload(seed, size)
    tally = Tally()
    with Client(url) as probe:  # one warm-up request of each vocabulary: text embeddings, lazy init
        for kw in good[: len(VOCABULARIES)]:
            probe.segment(**kw)
    rss: list[tuple[float, int]] = []
    counts = triton_counts(metrics) if metrics else None
    start = time.perf_counter()
    deadline = start + seconds
    stop = threading.Event()

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with Client(url) as c:
            while time.perf_counter() < deadline and not stop.is_set():
                is_bad = rng.random() < bad_fraction
                kw = rng.choice(bad if is_bad else good)
                t0 = time.perf_counter()
                try:
                    c.segment(**kw)
                    error = None
                except ServeError as e:
                    error = str(e)
                with tally.lock:
                    if is_bad:
                        tally.bad_refused += error is not None
                        tally.bad_accepted += error is None
                    elif error is None:
                        tally.latencies.append(time.perf_counter() - t0)
                    else:
                        tally.good_errors.append(error)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if pid is not None:
            rss.append((time.perf_counter() - start, process_tree_rss(pid)))
        time.sleep(0.5)
    elapsed = time.perf_counter() - start
    lat = np.array(tally.latencies) * 1000
    report = {
        "clients": clients, "seconds": round(elapsed, 1), "bad_fraction": bad_fraction, "image_size": list(size),
        "good_ok": len(tally.latencies), "good_errors": len(tally.good_errors),
        "good_error_examples": sorted(set(tally.good_errors))[:5],
        "bad_refused": tally.bad_refused, "bad_accepted": tally.bad_accepted,
        "throughput_good_per_s": round(len(lat) / elapsed, 3),
        "latency_ms": {"p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99), "max": _pct(lat, 100)},
    }
    if counts:
        end = triton_counts(metrics)
        requests, runs = (end[k] - counts[k] for k in ("nv_inference_count", "nv_inference_exec_count"))
        report["mean_batch"] = round(requests / max(runs, 1), 2)  # requests per model execution (Triton's counters)
    if rss:
        warm = [r for t, r in rss if t >= 0.2 * elapsed] or [rss[-1][1]]
        report["rss_mb"] = {"start": round(rss[0][1] / 2**20, 1), "after_warmup": round(warm[0] / 2**20, 1),
                            "peak": round(max(r for _, r in rss) / 2**20, 1), "end": round(rss[-1][1] / 2**20, 1),
                            "growth_after_warmup": round((rss[-1][1] - warm[0]) / 2**20, 1)}
    return report


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # HTTP, host:port
    metrics: str  # Prometheus endpoint


def start_server(server_args: list[str], timeout: float = 300.0, log: Path | None = None) -> Server:
    """Starts `corrclip serve` on free loopback ports and returns once it is ready."""
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-c", "import sys; from corrclip.cli import main; sys.exit(main())", "serve",
           *server_args, "--host", "127.0.0.1", "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
           "--metrics-port", str(ports[2])]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{ports[0]}"
    deadline = time.time() + timeout
    with Client(url, timeout=5) as probe:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"corrclip serve exited with {proc.returncode}" + (f"; see {log}" if log else ""))
            if probe.ready():
                return Server(proc, url, f"http://127.0.0.1:{ports[2]}/metrics")
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"corrclip serve was not ready within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    proc.terminate()  # SIGTERM: the server stops Triton and its backend before exiting
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server on 127.0.0.1 (default: start one with the args after --)")
    p.add_argument("--pid", type=int, help="the running server's pid, for its memory")
    p.add_argument("--metrics", help="the running server's metrics URL, for the mean batch size")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--bad-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    proc = None
    if args.url is None:
        server = start_server(server_args or ["--backbone", "tiny", "--weights", "random", "--sam", "none"])
        proc, url, pid, metrics = server.proc, server.url, server.proc.pid, server.metrics
    else:
        url, pid, metrics = args.url, args.pid, args.metrics
    try:
        report = run_load(url, args.clients, 60 * args.minutes, args.bad_fraction, args.seed, pid, metrics=metrics)
        with Client(url) as c:
            report["healthy_after"] = c.ready()
    finally:
        if proc is not None:
            stop_server(proc)
    report["server_args"] = server_args
    report["cpu"] = _cpu_model()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = report["good_errors"] == 0 and report["bad_accepted"] == 0 and report["healthy_after"]
    return 0 if ok else 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
