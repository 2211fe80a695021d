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


def save_image(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def save_regions(path, h, w):
    lm = np.zeros((h, w), np.uint8)
    lm[: h // 2, : w // 2] = 1
    lm[h // 3:, w // 3:] = 2
    Image.fromarray(lm).save(path)
    return path


def test_any_failure_is_reported_and_same_stems_stay_apart(tmp_path, capsys, monkeypatch):
    """An unexpected exception in one image (not a decode error) is reported with the file and the batch goes
    on; two images named x.png in different folders get two sets of outputs, not one overwritten."""
    from corrclip.api import Segmenter

    images = [save_image(tmp_path / "a" / "x.png", 60, 80, 1), save_image(tmp_path / "b" / "x.png", 60, 80, 2),
              save_image(tmp_path / "c" / "z.png", 50, 70, 3)]
    regions = [save_regions(tmp_path / f"r{i}.png", *((50, 70) if i == 2 else (60, 80))) for i in range(3)]
    run = Segmenter.run

    def failing_run(self, images, *args, **kw):
        if images[0].shape[:2] == (50, 70):
            raise RuntimeError("simulated failure inside the pipeline")
        return run(self, images, *args, **kw)

    monkeypatch.setattr(Segmenter, "run", failing_run)
    out = tmp_path / "out"
    rc = main(["segment", *map(str, images), "--classes", "a, b, c", "--masks", *map(str, regions),
               "--backbone", "tiny", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{images[2]}: RuntimeError: simulated failure inside the pipeline" in err
    assert "1 of 3 image(s) failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_x.json", "a_x_labels.png", "a_x_overlay.png",
                                                      "b_x.json", "b_x_labels.png", "b_x_overlay.png"]
    for folder in ("a", "b"):
        assert json.loads((out / f"{folder}_x.json").read_text())["file"] == str(tmp_path / folder / "x.png")


def test_output_stems():
    from pathlib import Path

    from corrclip.cli import output_stems

    assert output_stems([Path("a/x.png"), Path("b/x.jpg"), Path("c/y.png")]) == ["a_x", "b_x", "y"]
    # the same file twice, and a name the running number must step over
    assert output_stems([Path("a/x.png"), Path("a/x.png"), Path("a_x_1.png")]) == ["a_x_2", "a_x_3", "a_x_1"]


def test_image_without_region_masks_is_reported(files, capsys):
    tmp, good, masks, _ = files
    other = save_image(tmp / "other.png", 40, 50, 4)
    folder = tmp / "maskdir"
    folder.mkdir()
    (folder / "good.png").write_bytes(masks.read_bytes())  # none for other.png
    rc = main(["segment", str(good), str(other), "--classes", "a, b", "--masks", str(folder), "--backbone", "tiny",
               "--sam", "none", "--out", str(tmp / "out")])
    assert rc == 1 and (tmp / "out" / "good_labels.png").is_file() and not (tmp / "out" / "other.json").exists()
    assert f"{other}: no region masks; pass --masks or drop --sam none" in capsys.readouterr().err


def test_wrong_number_of_masks(files, capsys):
    tmp, good, masks, _ = files
    rc = main(["segment", str(good), "--classes", "a, b", "--masks", str(masks), str(masks), "--backbone", "tiny",
               "--out", str(tmp / "out")])
    assert rc == 2 and "got 2 --masks for 1 images: give one per image, or a folder" in capsys.readouterr().err
    assert not (tmp / "out").exists()


def test_class_file(files, capsys, monkeypatch):
    """--classes @FILE reads the research code's file syntax: one class per line, '; ' between synonyms,
    commas part of a name."""
    from corrclip.api import Segmenter

    tmp, good, masks, _ = files
    (tmp / "classes.txt").write_text("sky; cloud\npeople, person\nroad\n")
    seen = []
    run = Segmenter.run

    def spy(self, images, vocab, *args, **kw):
        seen.append(vocab.classes)
        return run(self, images, vocab, *args, **kw)

    monkeypatch.setattr(Segmenter, "run", spy)
    rc = main(["segment", str(good), "--classes", f"@{tmp / 'classes.txt'}", "--masks", str(masks), "--backbone",
               "tiny", "--out", str(tmp / "out")])
    assert rc == 0 and seen == [(("sky", "cloud"), ("people, person",), ("road",))]
    assert {c["name"] for c in json.loads((tmp / "out" / "good.json").read_text())["classes"]} <= {
        "sky", "people, person", "road"}
    rc = main(["segment", str(good), "--classes", f"@{tmp / 'nope.txt'}", "--backbone", "tiny",
               "--out", str(tmp / "out")])
    assert rc == 2 and "nope.txt: class file not found" in capsys.readouterr().err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["segment", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--classes", "--preset", "--masks", "--out", "--prob-thd", "--method", "--backbone", "--weights",
                 "--sam", "--points-per-side", "--engine", "--backend", "--device"):
        assert flag in text, flag
    assert "examples:" in text and "corrclip segment photo.jpg --classes" in text
    assert "NAME_labels.png" in text  # what it writes
