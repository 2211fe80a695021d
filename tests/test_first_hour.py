"""What a newcomer meets first: a plain install that runs every command, offline failures in one line,
text embeddings cached on disk, one file name per error line, the same flags in every command."""

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from corrclip.cli import main
from corrclip.models import checkpoints
from corrclip.models.checkpoints import WeightsError
from corrclip.runtime.text import TextCache, TextEmbedder
from corrclip.vocab import parse_classes


def test_plain_install_runs_export():
    """corrclip-export (torch.onnx dynamo exporter: onnx + onnxscript) and the default backend need no extra."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    assert {"onnx", "onnxruntime", "onnxscript"} <= names


@pytest.fixture
def no_network(monkeypatch):
    """Every connection fails at once, as on our machines; open_clip must not even start its retry loop."""
    import open_clip

    attempts = []

    def refuse(address, *a, **k):
        attempts.append(address)
        raise OSError("no route to host (test)")

    def no_download(*a, **k):
        raise AssertionError("open_clip was asked to download: it would retry for ~46 s")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(open_clip, "create_model", no_download)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.delenv("CORRCLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    checkpoints.reachable.cache_clear()
    yield attempts
    checkpoints.reachable.cache_clear()


def test_offline_official_weights_fail_at_once_in_one_line(no_network, tmp_path, monkeypatch):
    from corrclip.models.clip import build_clip

    with pytest.raises(WeightsError) as e:
        build_clip("ViT-B-16-quickgelu", "metaclip_fullcc")
    msg = str(e.value)
    assert "\n" not in msg and "--clip-weights FILE" in msg and "huggingface.co" in msg
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsError, match="sam_vit_b_01ec64.pth .* --sam-weights FILE"):
        checkpoints.fetch("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "--sam-weights")
    assert [a[0] for a in no_network] == ["huggingface.co", "dl.fbaipublicfiles.com"]  # one short try per host


def test_explicit_offline_setting_tries_no_connection(no_network, monkeypatch):
    from corrclip.models.clip import build_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="downloads are off"):
        build_clip("ViT-B-16", "openai")
    assert no_network == []


def test_cached_clip_weights_load_without_network(monkeypatch):
    """A cached file loads with the hub in offline mode: no network round trip, no retries."""
    import huggingface_hub.constants as hub
    import open_clip

    seen, before = [], hub.HF_HUB_OFFLINE
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name, **k: f"/cache/{repo}/{name}")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network touched"))
    monkeypatch.setattr(open_clip, "create_model", lambda arch, pretrained=None: seen.append(hub.HF_HUB_OFFLINE)
                        or torch.nn.Linear(1, 1))
    from corrclip.models.clip import _official_clip

    _official_clip("ViT-B-16-quickgelu", "metaclip_fullcc")
    assert seen == [True] and hub.HF_HUB_OFFLINE == before


def test_segment_without_network_says_one_line(no_network, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img)
    rc = main(["segment", str(img), "--classes", "a, b", "--backbone", "vit_b", "--weights", "official",
               "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "--clip-weights FILE" in err[0]


# ---- text embeddings on disk -------------------------------------------------------------------------------------


def _embedder(folder, encode, identity="clip-A", variant="fp32"):
    def tokenizer(prompts):
        return torch.tensor([[hash(p) % 1000 + 1, 49407] for p in prompts])

    return TextEmbedder(encode, tokenizer, torch.device("cpu"), identity=identity, cache=TextCache(folder),
                        variant=variant)


def _encode(tokens):
    g = torch.Generator().manual_seed(int(tokens[:, 0].sum()))
    return torch.randn(len(tokens), 8, generator=g) + tokens[:, :1].float()


def _refuse(tokens):
    raise AssertionError("recomputed although cached")


def test_text_embeddings_come_back_from_disk(tmp_path):
    vocab = parse_classes("cat, dog; puppy")
    first = _embedder(tmp_path, _encode)(vocab)
    again = _embedder(tmp_path, _refuse)(vocab)  # a new process would start like this
    assert torch.equal(first, again) and len(list(tmp_path.glob("*.safetensors"))) == 1
    # Another text tower, another precision, or other queries are other entries.
    calls = []
    for kw in ({"identity": "clip-B"}, {"variant": "bf16"}):
        _embedder(tmp_path, lambda t: calls.append(1) or _encode(t), **kw)(vocab)
    _embedder(tmp_path, lambda t: calls.append(1) or _encode(t))(parse_classes("cat, bird"))
    assert len(calls) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 4


def test_torn_cache_file_is_recomputed_and_no_pickle(tmp_path):
    vocab = parse_classes("cat, dog")
    emb = _embedder(tmp_path, _encode)
    ref = emb(vocab)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    assert torch.equal(_embedder(tmp_path, _encode)(vocab), ref)
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["embeddings"], ref)  # rewritten whole, as safetensors (never a pickle)


def test_concurrent_writers_leave_a_whole_file(tmp_path):
    vocab = parse_classes("a, b, c")
    errors = []

    def write():
        try:
            _embedder(tmp_path, _encode)(vocab)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob(".*.tmp"))
    assert torch.equal(_embedder(tmp_path, _refuse)(vocab), _embedder(tmp_path / "fresh", _encode)(vocab))


def test_segmenter_uses_the_cache_and_no_cache_turns_it_off(tmp_path):
    from corrclip.api import Segmenter

    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    lm = np.zeros((60, 80), np.int64)
    lm[:, 40:] = 1
    seg = Segmenter("tiny", device="cpu", sam="none", text_cache=tmp_path / "c")
    ref = seg.segment(img, "cup, table", masks=lm, return_probs=True)[0]
    again = Segmenter("tiny", device="cpu", sam="none", text_cache=tmp_path / "c")
    again.pipeline.text.encode = _refuse
    out = again.segment(img, "cup, table", masks=lm, return_probs=True)[0]
    assert np.array_equal(out.probs, ref.probs)
    off = Segmenter("tiny", device="cpu", sam="none", text_cache=False)
    off.segment(img, "cup, table", masks=lm)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1


def test_cli_cache_flags(tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img)
    lm = tmp_path / "a_regions.png"
    Image.fromarray(np.eye(40, 50, dtype=np.uint8)).save(lm)
    base = ["segment", str(img), "--classes", "a, b", "--masks", str(lm), "--backbone", "tiny", "--out",
            str(tmp_path / "out")]
    assert main([*base, "--cache-dir", str(tmp_path / "tc")]) == 0
    assert len(list((tmp_path / "tc").glob("*.safetensors"))) == 1
    assert main([*base, "--cache-dir", str(tmp_path / "none"), "--no-cache"]) == 0
    assert not (tmp_path / "none").exists()


# ---- error lines and flags ---------------------------------------------------------------------------------------


def test_error_lines_name_the_file_once(tmp_path, capsys):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    lm = tmp_path / "m.png"
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(lm)
    rc = main(["segment", str(empty), "--classes", "a", "--masks", str(lm), "--backbone", "tiny", "--sam", "none",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "empty.jpg" in line]
    assert rc == 1 and lines and all(line.count("empty.jpg") == 1 for line in lines)


def _flags(help_text: str) -> set[str]:
    return {w.strip(",[]") for w in help_text.split() if w.startswith("--")}


def test_same_flag_names_in_every_command(capsys):
    from corrclip.export.cli import parser as export_parser

    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    segment = _flags(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    bench = _flags(capsys.readouterr().out)
    export = _flags(export_parser().format_help())
    weights = {"--method", "--backbone", "--weights", "--clip-weights", "--dino-weights", "--sam-weights", "--sam",
               "--device"}
    assert weights <= segment and weights <= bench and weights <= export
    assert {"--engine", "--backend", "--points-per-side", "--cache-dir", "--no-cache"} <= segment & bench
    # The old spelling still works, hidden.
    args = export_parser().parse_args(["--clip", "ViT-B-16:openai", "--out", "x"])
    assert args.clip_weights == "ViT-B-16:openai" and "--clip " not in export_parser().format_help()


def test_json_summary_names_backend(tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img)
    lm = tmp_path / "a_regions.png"
    Image.fromarray(np.eye(40, 50, dtype=np.uint8)).save(lm)
    assert main(["segment", str(img), "--classes", "a, b", "--masks", str(lm), "--backbone", "tiny",
                 "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "a.json").read_text())["backend"] == "torch"
