"""Class-list parsing, the benchmark vocabularies and the prompt templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from corrclip.templates import IMAGENET_TEMPLATES
from corrclip.vocab import (
    BENCHMARKS,
    MAX_QUERIES,
    Vocabulary,
    VocabularyError,
    benchmark_vocabulary,
    load_classes_file,
    parse_classes,
)

# corrclip.md §3: VOC21's background line, which the research code max-pools into class 0.
VOC_STUFF = (
    "sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; building; cloud; lamp; "
    "door; window; wardrobe; ceiling; shelf; curtain; stair; floor; hill; rail; fence"
).split("; ")


def test_parse_synonyms_and_derived_fields() -> None:
    vocab = parse_classes("sky; cloud, road, car")
    assert vocab.classes == (("sky", "cloud"), ("road",), ("car",))
    assert vocab.names == ("sky", "road", "car")
    assert vocab.queries == ("sky", "cloud", "road", "car")
    assert vocab.query_class == (0, 0, 1, 2)
    assert (vocab.num_classes, vocab.num_queries) == (3, 4)


def test_parse_separators_and_whitespace() -> None:
    expected = (("sky", "cloud"), ("road",), ("red car",))
    assert parse_classes("sky;cloud,road,red car").classes == expected
    assert parse_classes("  sky ;  cloud\n\nroad\r\n red car \n").classes == expected
    assert parse_classes("sky; cloud,\nroad,\nred car,").classes == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ["empty"]),
        (" \n , \n", ["empty"]),
        ("road,,car", ["empty name"]),
        ("sky;, road", ["empty name"]),
        ("car, road, Car", ["duplicate", "'Car'"]),
        ("sky; road, road", ["duplicate", "'road'"]),
    ],
)
def test_parse_errors(text: str, words: list[str]) -> None:
    with pytest.raises(VocabularyError) as info:
        parse_classes(text)
    for word in words:
        assert word in str(info.value)


def test_too_many_queries() -> None:
    names = [f"thing {i}" for i in range(MAX_QUERIES)]
    assert parse_classes(", ".join(names)).num_queries == MAX_QUERIES
    with pytest.raises(VocabularyError, match=str(MAX_QUERIES)):
        parse_classes(", ".join([*names, "one more"]))


def test_vocabulary_validates_direct_construction() -> None:
    with pytest.raises(VocabularyError):
        Vocabulary(())
    with pytest.raises(VocabularyError):
        Vocabulary((("a",), ("A",)))


def test_key_is_stable_and_sees_grouping_and_order() -> None:
    a = parse_classes("sky; cloud, road")
    assert a.key() == parse_classes("sky;cloud\nroad").key()
    assert a.key() != parse_classes("sky, cloud, road").key()
    assert a.key() != parse_classes("road, sky; cloud").key()
    assert a.key() != parse_classes("sky; cloud, roads").key()


def test_load_classes_file(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    # A BOM, a blank line, and a comma that is part of a name (the research code does not split on it).
    path.write_text("\ufeffsky; cloud\n\nroad\npeople, person\n", encoding="utf-8")
    vocab = load_classes_file(path)
    assert vocab.classes == (("sky", "cloud"), ("road",), ("people, person",))


def test_load_classes_file_errors(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="not found"):
        load_classes_file(tmp_path / "missing.txt")
    path = tmp_path / "names.txt"
    path.write_text("\n\n")
    with pytest.raises(VocabularyError, match="no class names"):
        load_classes_file(path)
    path.write_text("car\nbus\ncar\n")
    with pytest.raises(VocabularyError, match=f"{path}.*duplicate"):
        load_classes_file(path)


@pytest.mark.parametrize(
    ("name", "classes", "queries"),
    [
        ("voc21", 21, 46),
        ("voc20", 20, 20),
        ("context60", 60, 60),
        ("context59", 59, 59),
        ("coco_object", 81, 96),
        ("coco_stuff", 171, 171),
        ("city_scapes", 19, 19),
        ("ade20k", 150, 150),
    ],
)
def test_benchmark_sizes(name: str, classes: int, queries: int) -> None:
    vocab = benchmark_vocabulary(name)
    assert (vocab.num_classes, vocab.num_queries) == (classes, queries)
    # Only line 0 may hold synonyms: the research code max-pools the first Q - C + 1 queries.
    assert all(len(names) == 1 for names in vocab.classes[1:])


def test_every_benchmark_is_tested() -> None:
    sizes = next(m for m in test_benchmark_sizes.pytestmark if m.name == "parametrize")
    assert set(BENCHMARKS) == {case[0] for case in sizes.args[1]}  # every benchmark has its sizes checked above


def test_benchmark_contents_spot_checks() -> None:
    voc21 = benchmark_vocabulary("voc21")
    assert list(voc21.classes[0]) == VOC_STUFF
    assert voc21.names[1:] == benchmark_vocabulary("voc20").names
    assert voc21.names[-1] == "tvmonitor" and "people" in voc21.names
    coco = benchmark_vocabulary("coco_object")
    assert len(coco.classes[0]) == 16 and "bed" not in coco.classes[0] and "bed" in coco.names
    assert coco.names[1] == "people" and coco.names[-1] == "toothbrush" and "traffic light" in coco.names
    context60 = benchmark_vocabulary("context60")
    assert context60.names[0] == "background"
    assert context60.names[1:] == benchmark_vocabulary("context59").names
    assert context60.names[-1] == "wood"  # the research file has "wood " with a trailing space
    ade = benchmark_vocabulary("ade20k")
    assert ade.names[:3] == ("wall", "building", "sky") and ade.names[-1] == "flag"
    assert "chestofdrawers" in ade.names
    stuff = benchmark_vocabulary("coco_stuff")
    assert stuff.names[80] == "banner" and stuff.names[-1] == "wood"
    assert benchmark_vocabulary("city_scapes").names[11] == "people"


def test_unknown_benchmark_lists_the_known_ones() -> None:
    with pytest.raises(VocabularyError) as info:
        benchmark_vocabulary("voc2012")
    assert "voc2012" in str(info.value)
    for name in BENCHMARKS:
        assert name in str(info.value)


def test_templates() -> None:
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 and t.endswith(".") for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert IMAGENET_TEMPLATES[35] == "a {} in a video game."
    assert IMAGENET_TEMPLATES[39].format("cat") == "a photo of a cat."


def test_templates_match_open_clip() -> None:
    # open_clip ships the same OpenAI list as callables; an independent copy to compare against.
    meta = pytest.importorskip("open_clip.zero_shot_metadata")
    assert tuple(t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES) == IMAGENET_TEMPLATES


def test_background_synonym_line_displays_as_background():
    from corrclip.vocab import benchmark_vocabulary

    voc = benchmark_vocabulary("voc21")
    assert voc.names[0] == "background" and voc.queries[0] == "sky" and len(voc.classes[0]) == 26
    # Without a synonym line the file's names are shown as they are: no "background" is invented.
    voc20 = benchmark_vocabulary("voc20")
    assert voc20.display is None and voc20.names == (
        "aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
        "horse", "motorbike", "people", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
