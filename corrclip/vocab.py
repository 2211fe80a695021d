"""Class vocabularies: which names the text tower encodes and which class each name votes for.

A class has one or more query names. Its first name is the display name; the others are synonyms
whose probabilities are max-pooled into the class (corrclip.md §1 step 17: the benchmark files use
this for background, e.g. VOC21's 26 stuff words all mean "background").

Two text syntaxes:
  * `parse_classes`, for people typing on a command line: classes separated by commas or
    newlines, synonyms by ";"  ("sky; cloud, road, car" is 3 classes);
  * `load_classes_file`, the research code's class files: one class per line, synonyms separated
    by "; ". Commas are part of a name there, exactly as the research code reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources

# The text classifier holds one embedding per query; past this it is almost surely a mistake
# (a pasted file in the wrong syntax) and the text pass would take minutes.
MAX_QUERIES = 4096

BENCHMARKS: dict[str, str] = {
    "voc21": "cls_voc21.txt",
    "voc20": "cls_voc20.txt",
    "context60": "cls_context60.txt",
    "context59": "cls_context59.txt",
    "coco_object": "cls_coco_object.txt",
    "coco_stuff": "cls_coco_stuff.txt",
    "city_scapes": "cls_city_scapes.txt",
    "ade20k": "cls_ade20k.txt",
}


class VocabularyError(ValueError):
    """A class list that cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of classes, each a tuple of its query names (display name first)."""

    classes: tuple[tuple[str, ...], ...]
    # Optional display names (one per class) that differ from the first query name, e.g.
    # "background" for VOC21's line of 26 stuff words. They are never encoded.
    display: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Validate here so every Vocabulary is usable, however it was built.
        _validate(self.classes)
        if self.display is not None and len(self.display) != len(self.classes):
            raise VocabularyError(f"{len(self.display)} display names for {len(self.classes)} classes")

    @property
    def names(self) -> tuple[str, ...]:
        return self.display or tuple(names[0] for names in self.classes)

    @property
    def queries(self) -> tuple[str, ...]:
        return tuple(name for names in self.classes for name in names)

    @property
    def query_class(self) -> tuple[int, ...]:
        return tuple(i for i, names in enumerate(self.classes) for _ in names)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_queries(self) -> int:
        return sum(len(names) for names in self.classes)

    def key(self) -> str:
        """A stable hex digest of the classes and their grouping, for caching text embeddings."""
        return _digest(self.classes)


def _digest(classes: tuple[tuple[str, ...], ...]) -> str:
    # JSON keeps the grouping unambiguous ("a;b" as one name vs two names hash differently).
    blob = json.dumps([list(names) for names in classes], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _validate(classes: tuple[tuple[str, ...], ...]) -> None:
    if not classes:
        raise VocabularyError("the class list is empty; give at least one class name")
    seen: dict[str, int] = {}
    total = 0
    for i, names in enumerate(classes):
        if not names:
            raise VocabularyError(f"class {i} has no names; give each class at least one name")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                shown = "; ".join(map(str, names))
                raise VocabularyError(f"class {i} ({shown!r}) has an empty name; remove the stray separator")
            if name != name.strip():
                raise VocabularyError(f"class {i} name {name!r} has surrounding whitespace; strip it")
            folded = name.casefold()
            if folded in seen:
                raise VocabularyError(
                    f"duplicate name {name!r} (class {seen[folded]} and class {i}); "
                    "each name may appear once, in one class"
                )
            seen[folded] = i
        total += len(names)
    if total > MAX_QUERIES:
        raise VocabularyError(
            f"{total} query names is more than the limit of {MAX_QUERIES}; use fewer classes or synonyms"
        )


def _split_synonyms(entry: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in entry.split(";"))


def parse_classes(text: str) -> Vocabulary:
    """Parse "sky; cloud, road, car" style text: commas/newlines between classes, ";" between synonyms.

    Blank lines and one trailing comma per line are tolerated; an empty entry in between
    ("road,,car") is an error because it is almost always a typo.
    """
    lines = [line.strip().removesuffix(",") for line in text.splitlines()]
    entries = [e for line in lines if line.strip() for e in line.split(",")]
    if not entries:
        raise VocabularyError("the class list is empty; give class names separated by commas")
    return Vocabulary(tuple(_split_synonyms(e) for e in entries))


def load_classes_file(path: str | os.PathLike) -> Vocabulary:
    """Read a class file: one class per line, synonyms separated by "; ", blank lines ignored."""
    try:
        # utf-8-sig drops a byte-order mark some editors write; it would otherwise end up in a name.
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise VocabularyError(f"{os.fspath(path)}: class file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VocabularyError(f"{os.fspath(path)}: cannot read class file ({e}); save it as UTF-8 text") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise VocabularyError(f"{os.fspath(path)}: class file has no class names; write one class per line")
    try:
        return Vocabulary(tuple(_split_synonyms(line) for line in lines))
    except VocabularyError as e:
        raise VocabularyError(f"{os.fspath(path)}: {e}") from None


def benchmark_vocabulary(name: str) -> Vocabulary:
    """The class list the research code evaluates a benchmark with (package data `data/cls_*.txt`)."""
    if name not in BENCHMARKS:
        known = ", ".join(BENCHMARKS)
        raise VocabularyError(f"unknown benchmark {name!r}; known benchmarks: {known}")
    resource = resources.files("corrclip").joinpath("data").joinpath(BENCHMARKS[name])
    with resources.as_file(resource) as path:
        vocab = load_classes_file(path)
    if len(vocab.classes[0]) > 1:
        # A first line of synonyms is the research code's background class (VOC21, COCO-Object).
        return Vocabulary(vocab.classes, ("background",) + vocab.names[1:])
    return vocab
