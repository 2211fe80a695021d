"""`corrclip segment` end to end on the tiny preset, including bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from corrclip.cli import main


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(good)
    good_masks = tmp_path / "good_masks.png"
    lm = np.zeros((90, 120), np.uint8)
    lm[10:50, 20:80] = 1
    lm[40:90, 60:120] = 2
    Image.fromarray(lm).save(good_masks)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return tmp_path, good, good_masks, corrupt


def test_segment_writes_outputs(files, capsys):
    tmp, good, masks, _ = files
    rc = main(["segment", str(good), "--classes", "sky; cloud, road, car", "--masks", str(masks),
               "--backbone", "tiny", "--out", str(tmp / "out")])
    assert rc == 0
    labels = np.array(Image.open(tmp / "out" / "good_labels.png"))
    assert labels.shape == (90, 120) and labels.max() < 3
    assert Image.open(tmp / "out" / "good_labels.png").mode == "P"
    ov = Image.open(tmp / "out" / "good_overlay.png")
    assert ov.height >= 90 and ov.width > 120  # image + legend
    info = json.loads((tmp / "out" / "good.json").read_text())
    assert info["random_weights"] is True
    assert "clip_trunk" in json.dumps(info)
    err = capsys.readouterr().err
    assert "RANDOM weights" in err


def test_bad_image_is_reported_and_batch_goes_on(files, capsys):
    tmp, good, masks, corrupt = files
    folder = tmp / "maskdir"
    folder.mkdir()
    (folder / "good.png").write_bytes(masks.read_bytes())
    rc = main(["segment", str(corrupt), str(good), "--classes", "a, b", "--masks", str(folder),
               "--backbone", "tiny", "--sam", "none", "--out", str(tmp / "out")])
    assert rc == 1
    assert (tmp / "out" / "good_labels.png").is_file()
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err and "1 of 2 image(s) failed" in err


def test_mask_size_mismatch_is_reported(files, capsys):
    tmp, good, _, _ = files
    wrong = tmp / "wrong.npz"
    np.savez(wrong, instance_mask=np.zeros((10, 10), np.int32))
    rc = main(["segment", str(good), "--classes", "a, b", "--masks", str(wrong), "--backbone", "tiny",
               "--out", str(tmp / "out")])
    assert rc == 1
    assert "90x120" in capsys.readouterr().err.replace(" ", "").replace("×", "x")


@pytest.mark.parametrize("classes,needle", [("", "empty"), ("cat, dog, Cat", "duplicate"), ("cat,,dog", "empty")])
def test_bad_class_lists(files, capsys, classes, needle):
    tmp, good, masks, _ = files
    rc = main(["segment", str(good), "--classes", classes, "--masks", str(masks), "--backbone", "tiny",
               "--out", str(tmp / "out")])
    assert rc == 2
    assert needle in capsys.readouterr().err.lower()


def test_checkpoint_of_another_architecture(files, capsys):
    tmp, good, masks, _ = files
    from corrclip.models.dino import build_dino

    wrong = tmp / "dino_vits8_like.pth"
    torch.save({k: v[..., :3] if v.ndim else v for k, v in build_dino("tiny", "random").state_dict().items()}, wrong)
    rc = main(["segment", str(good), "--classes", "a, b", "--masks", str(masks), "--backbone", "tiny",
               "--dino-weights", str(wrong), "--out", str(tmp / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "dino_vits8_like.pth" in err


def test_missing_weight_file_names_the_problem(files, capsys):
    tmp, good, masks, _ = files
    rc = main(["segment", str(good), "--classes", "a, b", "--masks", str(masks), "--backbone", "tiny",
               "--sam-weights", str(tmp / "nope.pth"), "--sam", "tiny", "--out", str(tmp / "out")])
    assert rc == 2
    assert "nope.pth" in capsys.readouterr().err


def test_sam_masks_end_to_end(files):
    """No --masks: the tiny SAM's automatic mask generation provides the regions."""
    tmp, good, _, _ = files
    rc = main(["segment", str(good), "--classes", "a, b, c", "--backbone", "tiny", "--points-per-side", "4",
               "--out", str(tmp / "out")])
    assert rc == 0
    info = json.loads((tmp / "out" / "good.json").read_text())
    assert "masks" in json.dumps(info)


def test_help_teaches():
    with pytest.raises(SystemExit) as e:
        main(["segment", "--help"])
    assert e.value.code == 0


def test_sam_flags_reach_the_mask_generator_settings():
    import argparse

    from corrclip.cli_args import add_model_args, amg_settings

    p = argparse.ArgumentParser()
    add_model_args(p)
    s = amg_settings(p.parse_args(["--sam-decoder", "reference", "--pred-iou-thresh", "0", "--stability-score-thresh",
                                   "0.5", "--box-nms-thresh", "-1", "--points-per-side", "8"]))
    assert (s.decoder, s.pred_iou_thresh, s.stability_score_thresh, s.box_nms_thresh, s.points_per_side) == (
        "reference", 0.0, 0.5, -1.0, 8)
    default = amg_settings(p.parse_args([]))
    assert (default.decoder, default.pred_iou_thresh, default.box_nms_thresh) == ("shared", 0.7, 0.7)
    with pytest.raises(SystemExit):
        p.parse_args(["--sam-decoder", "fast"])
