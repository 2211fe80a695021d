"""`corrclip label`: folders, manifests and globs; segment's outputs in shards; resume; failures."""

import json

import numpy as np
from PIL import Image

from corrclip.cli import main
from corrclip.label import INDEX, output_name

CLASSES = "sky; cloud, road, car"


def _image(path, seed, size=(24, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _regions(folder, stem, size=(24, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    lm = np.zeros(size, np.uint8)
    lm[5:15, 5:25] = 1
    lm[12:, 20:] = 2
    Image.fromarray(lm).save(folder / f"{stem}.png")


def _label(tmp_path, *sources, out="out", extra=()):
    return main(["label", *map(str, sources), "--classes", CLASSES, "--masks", str(tmp_path / "regions"),
                 "--sam", "none", "--backbone", "tiny", "--out", str(tmp_path / out), *extra])


def _index(out):
    return [line.split("\t") for line in (out / INDEX).read_text().splitlines()]


def test_folders_manifests_and_globs_give_segments_outputs(tmp_path):
    a = _image(tmp_path / "src/a/x.png", 0)
    b = _image(tmp_path / "src/b/x.png", 1)  # same stem, other folder: must not collide
    c = _image(tmp_path / "src/c.jpg", 2)
    _regions(tmp_path / "regions", "x")
    _regions(tmp_path / "regions", "c")
    manifest = tmp_path / "list.txt"
    manifest.write_text("# one path per line, relative to this file\n\nsrc/b/x.png\n")
    assert _label(tmp_path, tmp_path / "src/a", manifest, tmp_path / "src/*.jpg",
                  extra=("--overlay", "--json")) == 0
    out = tmp_path / "out"
    rows = _index(out)
    assert sorted(r[0] for r in rows) == sorted(str(p) for p in (a, b, c))
    for source, output, h, w, counts in rows:
        _, shard, name = output_name(source)
        assert output == f"{shard}/{name}" and (h, w) == ("24", "32")
        labels = np.array(Image.open(out / shard / f"{name}_labels.png"))
        assert sum(int(kv.split(":")[1]) for kv in counts.split(",")) == labels.size
        assert (out / shard / f"{name}_overlay.png").is_file()
        assert json.loads((out / shard / f"{name}.json").read_text())["file"] == source
    assert len({r[1] for r in rows}) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_done"] == 3 and summary["new"] == 3 and summary["failed"] == 0
    assert abs(sum(c["percent"] for c in summary["classes"]) - 100) < 0.01

    # The same per-image files as `corrclip segment` writes for that image.
    assert main(["segment", str(a), "--classes", CLASSES, "--masks", str(tmp_path / "regions/x.png"),
                 "--backbone", "tiny", "--out", str(tmp_path / "seg")]) == 0
    _, shard, name = output_name(str(a))
    for suffix in ("_labels.png", "_overlay.png"):
        assert (out / shard / f"{name}{suffix}").read_bytes() == (tmp_path / "seg" / f"x{suffix}").read_bytes()


def test_interrupted_labelling_resumes_and_records_failures(tmp_path, monkeypatch, capsys):
    for i in range(3):
        _image(tmp_path / f"src/img{i}.png", i)
        _regions(tmp_path / "regions", f"img{i}")
    (tmp_path / "src/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")

    import corrclip.outputs as outputs
    from corrclip.jobs import Worker

    save = outputs.save_labels
    saved = []

    def killed_at_second_image(path, labels, palette):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        save(path, labels, palette)

    monkeypatch.setattr(outputs, "save_labels", killed_at_second_image)
    assert _label(tmp_path, tmp_path / "src") == 130
    assert len(_index(tmp_path / "out")) == 1
    monkeypatch.setattr(outputs, "save_labels", save)

    segmented = []
    call = Worker.__call__
    monkeypatch.setattr(Worker, "__call__", lambda self, *a: segmented.append(1) or call(self, *a))
    assert _label(tmp_path, tmp_path / "src") == 1  # the broken file fails; the rest is done
    assert len(segmented) == 2
    assert len(_index(tmp_path / "out")) == 3
    failures = (tmp_path / "out/failures.tsv").read_text()
    assert "broken.jpg" in failures and len(failures.splitlines()) == 1
    assert "1 image(s) failed" in capsys.readouterr().err

    # Killed after an image's files but before its index line: the next run recovers the line.
    index = tmp_path / "out" / INDEX
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-1]) + lines[-1][:10])  # and the last line cut mid-way
    segmented.clear()
    assert _label(tmp_path, tmp_path / "src") == 1
    assert segmented == []  # only the broken file was tried again, and it failed before the model
    rows = [r for r in _index(tmp_path / "out") if len(r) == 5]
    assert len(rows) == 3 and len({r[0] for r in rows}) == 3
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert (summary["images_done"], summary["new"], summary["already_done"]) == (3, 0, 3)


def test_bad_sources_fail_in_one_line(tmp_path, capsys):
    assert main(["label", str(tmp_path / "nope"), "--classes", "a, b", "--backbone", "tiny",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope: no such file, folder or glob match" in err and len(err.splitlines()) == 1
