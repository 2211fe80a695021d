"""`--ray`: a local 2-worker Ray Data run gives the single-process predictions; without Ray, one line."""

import builtins
import json

import pytest
import torch
from synthetic_datasets import make_dataset

from corrclip.cli import main


def _eval(tmp_path, out, *extra):
    return main(["eval", "--preset", "voc20", "--data-root", str(tmp_path / "data"), "--masks",
                 str(tmp_path / "data/region_masks/voc20"), "--backbone", "tiny", "--out", str(tmp_path / out),
                 *extra])


def test_ray_eval_matches_single_process(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    truths = make_dataset(tmp_path / "data", "voc20", n=2)[2]  # one image per worker
    # Ray gives each CPU actor one torch thread; use one here too, since fp32 sums taken in another order
    # can flip a pixel whose two best classes are (near) tied.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _eval(tmp_path, "single") == 0
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        assert _eval(tmp_path, "ray", "--ray", "--workers", "2") == 0
    finally:
        ray.shutdown()
    for i in truths:
        a, b = (tmp_path / d / "predictions" / f"{i}.png" for d in ("single", "ray"))
        assert a.read_bytes() == b.read_bytes(), i
    single, dist = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "ray"))
    assert single["per_class"] == dist["per_class"] and single["mIoU"] == dist["mIoU"]
    assert dist["ray"]["cpus"] == 2


def test_without_ray_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    make_dataset(tmp_path / "data", "voc20", n=1)
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert _eval(tmp_path, "out", "--ray") == 2
    err = capsys.readouterr().err.strip()
    assert "corrclip[ray]" in err and len(err.splitlines()) == 1
    assert main(["label", str(tmp_path / "data"), "--classes", "a, b", "--backbone", "tiny",
                 "--out", str(tmp_path / "lab"), "--ray"]) == 2
    assert "corrclip[ray]" in capsys.readouterr().err
