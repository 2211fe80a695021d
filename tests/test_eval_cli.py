"""`corrclip eval` end to end on the tiny backbone: the eight layouts, resume, bad input, reported numbers."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from synthetic_datasets import make_dataset
from test_eval_metric import literal_metric

from corrclip import templates
from corrclip.cli import main
from corrclip.evaluation import reported
from corrclip.evaluation.datasets import LAYOUTS


@pytest.fixture
def few_templates(monkeypatch):
    # 80 prompt templates per class name make the text pass of ADE's or COCO-Stuff's vocabulary take
    # many seconds on the tiny tower; two keep it short. These tests are about data and metric plumbing.
    monkeypatch.setattr("corrclip.runtime.text.IMAGENET_TEMPLATES", templates.IMAGENET_TEMPLATES[:2])


def _eval(tmp_path, preset, out, *extra):
    return main(["eval", "--preset", preset, "--data-root", str(tmp_path / "data"), "--backbone", "tiny",
                 "--out", str(out), *extra])


def _predictions(out, ids):
    return [np.array(Image.open(out / "predictions" / f"{i}.png")) for i in ids]


@pytest.mark.parametrize("preset", list(LAYOUTS))
def test_eval_each_layout_matches_recomputation(tmp_path, preset, few_templates):
    _, masks, truths = make_dataset(tmp_path / "data", preset, n=1)  # several images: the resume test
    out = tmp_path / "out"
    assert _eval(tmp_path, preset, out, "--masks", str(masks)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ids = sorted(truths)
    preds = _predictions(out, ids)
    assert [p.shape for p in preds] == [truths[i].shape for i in ids]
    # Independent recomputation: saved predictions against the truth the generator drew (never read back
    # through our dataset reader), with the literal per-pixel metric.
    want = literal_metric(preds, [truths[i] for i in ids], LAYOUTS[preset].num_classes)
    assert (metrics["mIoU"], metrics["mAcc"], metrics["aAcc"]) == (want["mIoU"], want["mAcc"], want["aAcc"])
    assert metrics["images"] == 1 and metrics["random_weights"] is True
    assert len(metrics["per_class"]) == LAYOUTS[preset].num_classes
    assert "mIoU" in (out / "metrics.md").read_text()


def test_eval_with_tiny_sam_and_limit(tmp_path, few_templates, capsys):
    make_dataset(tmp_path / "data", "voc20", n=3)
    out = tmp_path / "out"
    assert _eval(tmp_path, "voc20", out, "--points-per-side", "2", "--limit", "1") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 1 and metrics["dataset_images"] == 3
    assert metrics["masks"].startswith("SAM tiny")
    assert len(list((out / "predictions").iterdir())) == 1
    assert "reported: none" in capsys.readouterr().out  # no published number for the tiny backbone


def test_interrupted_run_resumes_to_the_same_metric(tmp_path, few_templates, monkeypatch):
    _, masks, truths = make_dataset(tmp_path / "data", "voc20", n=2)
    full, part = tmp_path / "full", tmp_path / "part"
    assert _eval(tmp_path, "voc20", full, "--masks", str(masks)) == 0
    ids = sorted(truths)
    want = literal_metric(_predictions(full, ids), [truths[i] for i in ids], 20)
    assert json.loads((full / "metrics.json").read_text())["mIoU"] == want["mIoU"]

    import corrclip.outputs as outputs
    from corrclip.jobs import Worker

    save = outputs.save_labels
    saved = []

    def killed_at_second_save(path, labels, palette):
        if saved:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does between two images
        saved.append(path)
        save(path, labels, palette)

    monkeypatch.setattr(outputs, "save_labels", killed_at_second_save)
    assert _eval(tmp_path, "voc20", part, "--masks", str(masks)) == 130
    assert len(list((part / "predictions").glob("*.png"))) == 1
    monkeypatch.setattr(outputs, "save_labels", save)

    segmented = []
    call = Worker.__call__
    monkeypatch.setattr(Worker, "__call__", lambda self, *a: segmented.append(1) or call(self, *a))
    assert _eval(tmp_path, "voc20", part, "--masks", str(masks)) == 0
    assert len(segmented) == 1  # only the image without a saved prediction

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert b["resumed_images"] == 1
    assert (a["mIoU"], a["mAcc"], a["aAcc"], a["per_class"]) == (b["mIoU"], b["mAcc"], b["aAcc"], b["per_class"])
    for i in truths:
        assert (full / "predictions" / f"{i}.png").read_bytes() == (part / "predictions" / f"{i}.png").read_bytes()


def test_resume_with_other_settings_is_refused(tmp_path, few_templates, capsys):
    _, masks, _ = make_dataset(tmp_path / "data", "voc20", n=1)
    out = tmp_path / "out"
    # A run that failed before writing any prediction does not tie the folder to its settings.
    assert _eval(tmp_path, "voc20", out, "--masks", str(masks), "--clip-weights", str(tmp_path / "no.pt")) == 2
    assert "no.pt" in capsys.readouterr().err
    assert _eval(tmp_path, "voc20", out, "--masks", str(masks)) == 0
    assert _eval(tmp_path, "voc20", out, "--masks", str(masks), "--prob-thd", "0.5") == 2
    err = capsys.readouterr().err
    assert "prob_thd" in err and "another --out" in err


def test_missing_region_maps_and_layouts_fail_in_one_line(tmp_path, capsys):
    _, masks, _ = make_dataset(tmp_path / "data", "voc21", n=2)
    next(masks.iterdir()).unlink()
    assert _eval(tmp_path, "voc21", tmp_path / "out", "--masks", str(masks)) == 2
    err = capsys.readouterr().err.strip()
    assert "region map not found (1 of 2 images" in err and len(err.splitlines()) == 1
    assert _eval(tmp_path, "ade20k", tmp_path / "out2") == 2
    assert "images/validation" in capsys.readouterr().err
    assert _eval(tmp_path, "voc21", tmp_path / "out3", "--sam", "none") == 2
    assert "--masks DIR" in capsys.readouterr().err


def test_reported_numbers_and_differences():
    rep = reported.find("corrclip", "vit_b", "voc21", online_grid=32)
    assert rep.miou["voc21"] == 74.8 and rep.masks == "sam2_32"
    assert reported.find("corrclip", "vit_b", "voc21", online_grid=8).miou["voc21"] == 73.9
    assert reported.find("sc-clip", "vit_b", "ade20k", None).miou["ade20k"] == 20.1
    assert reported.find("cliptrase", "vit_b", "city_scapes", None) is None  # not published
    assert reported.find("corrclip", "tiny", "voc21", 32) is None
    diffs = reported.differences(rep, clip="ViT-B-16-quickgelu:metaclip_fullcc", random_weights=False, masks=None,
                                 online_grid=32, precision="fp32", changed_settings=[], subset=None)
    assert any("online SAM v1 masks, 32x32" in d for d in diffs)
    assert any("precision fp32 (reported: fp16)" in d for d in diffs)
    assert not any("CLIP weights" in d for d in diffs)
    diffs = reported.differences(rep, clip="ViT-B-16:openai", random_weights=False, masks="m/", online_grid=None,
                                 precision="fp16", changed_settings=["prob_thd 0.5 (preset 0.2)"], subset=None)
    assert "CLIP weights ViT-B-16:openai (reported: ViT-B-16-quickgelu:metaclip_fullcc)" in diffs
    assert "prob_thd 0.5 (preset 0.2)" in diffs and not any("precision" in d for d in diffs)


def test_eval_and_label_take_every_model_flag_of_segment(capsys):
    def flags(command):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))

    model = flags("segment") - {"--classes", "--preset", "--masks", "--help"}
    assert model and model <= flags("eval") and model <= flags("label")
    assert {"--ray", "--workers", "--limit", "--split", "--data-root"} <= flags("eval")
