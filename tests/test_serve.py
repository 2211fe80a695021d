"""`corrclip serve` / `corrclip request`: the protocol's limits, the batched service, and a real server
(PyTriton's Triton on 127.0.0.1, tiny backbone, random weights) with bad requests and a short load test."""

import importlib
import io
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corrclip import methods
from corrclip.serve.protocol import Limits, RequestError, decode_labels, parse_row

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "example.jpg"
SETTINGS_FOR = methods.get("corrclip").settings
CLASSES = "table, cup, saucer, spoon, coffee"


def _load_module():
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("serve_load")


def _row(**values) -> dict:
    return {k: np.array([v], dtype=object if isinstance(v, (bytes, str)) else None) for k, v in values.items()}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _regions(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy * 3 // h) * 3 + xx * 3 // w).astype(np.uint8)


# ---- protocol: every limit and bad input gives a RequestError that says what to do ----------------


@pytest.mark.parametrize("case, words", [
    (dict(image=b"not an image", classes="a"), "not a JPEG, PNG"),
    (dict(image=EXAMPLE.read_bytes()[:5000], classes="a"), "truncated"),
    (dict(image=EXAMPLE.read_bytes(), classes=""), "empty"),
    (dict(image=EXAMPLE.read_bytes(), classes=",".join(f"c{i}" for i in range(100_000))), "100000 class names"),
    (dict(image=EXAMPLE.read_bytes(), classes="a; b, c", preset="voc21"), "exactly one of"),
    (dict(image=EXAMPLE.read_bytes(), preset="voc99"), "unknown preset"),
    (dict(image=EXAMPLE.read_bytes(), classes="a", masks=_png(np.zeros((5, 7), np.uint8))), "333x500"),
    (dict(image=EXAMPLE.read_bytes(), classes="a", prob_thd=np.float32(2.0)), "between 0 and 1"),
    (dict(image=EXAMPLE.read_bytes(), classes="a", colour=b"red"), "unknown input"),
    (dict(image=EXAMPLE.read_bytes(), classes="a"), "label map"),  # a server without SAM needs masks
])
def test_bad_rows_are_refused_with_a_message(case, words):
    with pytest.raises(RequestError, match=words):
        parse_row(_row(**case), Limits(), SETTINGS_FOR, needs_masks=words == "label map")


@pytest.mark.parametrize("limits, case, words", [
    (Limits(max_request_bytes=50_000), dict(classes="a", pad=50_000), "above this server's limit of 0.0477 MiB"),
    (Limits(max_classes=3), dict(classes="a, b; c, d"), "4 class names"),
    (Limits(max_pixels=100_000), dict(classes="a"), "500x333 .* above the 0.1 megapixel limit"),
    (Limits(max_probs_values=1000), dict(classes="a", return_probs=np.bool_(True)), "return_probs for 1 classes"),
    (Limits(max_class_pixels=300_000), dict(classes="a, b"), "2 class names x 500x333 pixels"),
])
def test_limits_are_the_servers(limits, case, words):
    image = EXAMPLE.read_bytes() + b"\0" * case.pop("pad", 0)  # 500x333 = 166,500 pixels, 44 kB
    with pytest.raises(RequestError, match=words):
        parse_row(_row(image=image, **case), limits, SETTINGS_FOR, needs_masks=False)


def test_base64_and_raw_bytes_are_the_same_request():
    import base64

    raw = parse_row(_row(image=EXAMPLE.read_bytes(), classes="a, b"), Limits(), SETTINGS_FOR, False)
    text = parse_row(_row(image=base64.b64encode(EXAMPLE.read_bytes()), classes="a, b"), Limits(),
                     SETTINGS_FOR, False)
    assert np.array_equal(raw.image, text.image) and raw.vocab == text.vocab


# ---- the batched service, without Triton --------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter():
    from corrclip.api import Segmenter

    return Segmenter("tiny", "random", sam="none", device="cpu", text_cache=False)


def test_service_groups_vocabularies_and_isolates_bad_rows(segmenter):
    from corrclip.serve.service import SegmentService
    from corrclip.vocab import parse_classes

    calls = []
    encode = segmenter.pipeline.text.encode
    segmenter.pipeline.text.encode = lambda tokens: calls.append(len(tokens)) or encode(tokens)
    try:
        # Square images: one window each.
        a, b = np.full((64, 64, 3), 60, np.uint8), np.full((80, 80, 3), 200, np.uint8)
        a[20:50, 10:40] = 250
        masks = [_regions(64, 64), _regions(80, 80)]
        rows = [_row(image=_png(a), classes="cat, dog", masks=_png(masks[0])),
                _row(image=b"junk", classes="cat, dog"),
                _row(image=_png(b), classes="sky; cloud, road", masks=_png(masks[1])),
                _row(image=_png(b), classes="cat, dog", masks=_png(masks[1])),
                _row(image=_png(a), classes="", masks=_png(masks[0]))]
        out = SegmentService(segmenter, Limits(), {"backbone": "tiny"}).rows(rows)
    finally:
        segmenter.pipeline.text.encode = encode
    assert [bool(o["error"]) for o in out] == [False, True, False, False, True]
    assert b"not a JPEG" in out[1]["error"] and b"empty" in out[4]["error"]
    infos = [json.loads(o["info"]) for o in out]
    assert [i["batch"]["images_in_call"] for i in (infos[0], infos[2], infos[3])] == [2, 1, 2]
    assert infos[0]["batch"] == {"rows": 5, "groups": 2, "images_in_call": 2}
    assert len(calls) == 2  # one text pass per vocabulary, shared by its rows
    # Each good row's answer is what the pipeline gives for the same call.
    cat_dog = segmenter.run([a, b], parse_classes("cat, dog"), methods.get("corrclip").settings(), masks)
    assert np.array_equal(decode_labels(out[0]["labels_png"]), cat_dog[0].labels)
    assert np.array_equal(decode_labels(out[3]["labels_png"]), cat_dog[1].labels)
    assert json.loads(out[2]["names"]) == ["sky", "road"]


def test_text_cache_is_bounded():
    import torch

    from corrclip.runtime.text import TextEmbedder
    from corrclip.vocab import parse_classes

    calls = []
    embedder = TextEmbedder(lambda t: calls.append(1) or torch.ones(len(t), 4), lambda p: torch.ones(len(p), 3,
                            dtype=torch.long), torch.device("cpu"), max_cached=2)
    for text in ("a", "b", "a", "c", "a", "b"):
        embedder(parse_classes(text))
    # a, b computed; a cached; c evicts b (least recently used); a cached; b computed again.
    assert len(calls) == 4 and len(embedder._cache) == 2


# ---- a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("pytriton")
    serve_load = _load_module()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # A long queue delay makes concurrent requests land in one batch, deterministically.
    args = ["--backbone", "tiny", "--weights", "random", "--points-per-side", "4", "--max-batch", "4",
            "--max-queue", "8", "--max-queue-delay-us", "300000"]
    server = serve_load.start_server(args, log=log)
    yield server
    assert serve_load.stop_server(server.proc) == 0, log.read_text()[-3000:]


def test_request_cli_writes_what_segment_writes(server, tmp_path):
    from corrclip.cli import main

    url = server.url
    assert main(["request", str(EXAMPLE), "--classes", CLASSES, "--url", url, "--out", str(tmp_path / "r")]) == 0
    assert main(["segment", str(EXAMPLE), "--classes", CLASSES, "--backbone", "tiny", "--points-per-side", "4",
                 "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    for name in ("example_labels.png", "example_overlay.png"):
        served, local = (np.asarray(Image.open(tmp_path / d / name)) for d in ("r", "s"))
        assert np.array_equal(served, local), name
    served, local = (json.loads((tmp_path / d / "example.json").read_text()) for d in ("r", "s"))
    assert served["classes"] == local["classes"] and served["settings"] == local["settings"]
    assert "masks.sam_encoder" in served["timings_ms"] and served["server"]["batch"]["rows"] == 1


def test_bad_requests_get_errors_and_the_server_stays_healthy(server):
    import urllib.request

    from corrclip.serve.client import Client, ServeError

    url = server.url
    _, bad = _load_module().workload()
    with Client(url) as client:
        messages = []
        for case in bad:
            with pytest.raises(ServeError) as e:
                client.segment(**case)
            messages.append(str(e.value))
        assert client.ready()
        result = client.segment(EXAMPLE, CLASSES, return_probs=True, overlay=True)
    for words in ("truncated", "not a JPEG", "empty", "100000 class names", "label map is 7x9", "megapixel",
                  "unknown preset"):
        assert sum(words in m for m in messages) == 1, (words, messages)
    assert result.probs.shape == (5, 333, 500) and result.overlay_png.startswith(b"\x89PNG")
    with urllib.request.urlopen(f"http://{url}/v2/health/live") as r:
        assert r.status == 200
    with urllib.request.urlopen(server.metrics) as r:
        metrics = r.read().decode()
    assert 'nv_inference_request_success{model="corrclip",version="1"}' in metrics


def test_concurrent_requests_share_a_batch_and_the_queue_limit_holds(server):
    from corrclip.serve.client import Client, ServeError

    url = server.url
    small = np.full((64, 64, 3), 90, np.uint8)
    small[10:40, 20:50] = 230
    image, masks = _png(small), _png(_regions(64, 64))
    vocabularies = ["table, cup", "sky; cloud, road", "table, cup", "sky; cloud, road"]
    results: dict[int, object] = {}

    def send(k: int, vocab: str) -> None:
        with Client(url) as c:
            try:
                results[k] = c.segment(image, vocab, masks=masks)
            except ServeError as e:
                results[k] = e

    threads = [threading.Thread(target=send, args=(k, v)) for k, v in enumerate(vocabularies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches = [r.info["batch"] for r in results.values()]
    assert all(b["rows"] == 4 and b["groups"] == 2 and b["images_in_call"] == 2 for b in batches), batches
    with Client(url) as c:
        alone = c.segment(image, "table, cup", masks=masks)
    assert (alone.labels == results[0].labels).mean() > 0.99  # batched with others or alone: the same answer

    # 4 running + 8 queued: of 24 requests sent at once, the rest are turned away, and answered.
    threads = [threading.Thread(target=send, args=(k, "table, cup")) for k in range(24)]
    results.clear()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results.values() if isinstance(r, ServeError)]
    assert len(results) == 24 and 0 < len(refused) <= 12, [str(r) for r in refused]
    assert all("queue" in str(r).lower() for r in refused), [str(r) for r in refused]
    with Client(url) as c:
        assert c.ready()


def test_short_load(server):
    # 96x96 images: one window each, so the few seconds hold many requests.
    report = _load_module().run_load(server.url, clients=4, seconds=10, bad_fraction=0.3, pid=server.proc.pid,
                                     size=(96, 96), metrics=server.metrics)
    assert report["good_errors"] == 0, report["good_error_examples"]
    assert report["bad_accepted"] == 0 and report["bad_refused"] > 0 and report["good_ok"] > 0
    assert report["rss_mb"]["growth_after_warmup"] < 300, report["rss_mb"]
    assert report["mean_batch"] >= 1
