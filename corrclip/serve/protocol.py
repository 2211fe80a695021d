"""The `corrclip` model's wire protocol: its tensors, the limits a server enforces, and how one
request row becomes a job (or a one-line error) and one result becomes response tensors.

Every tensor is one element per request row (Triton shape [batch, 1]). Encoded files travel as
BYTES, either raw (the binary tensor extension, what the Python client sends) or base64 text (what
a hand-written JSON request can carry). A bad row never raises out of here: it becomes an `error`
output, so a bad request that shares a dynamic batch with good ones fails alone.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..presets import Settings
from ..runtime.image_io import ImageError, decode_image, decode_label_map, header_size
from ..vocab import BENCHMARKS, Vocabulary, VocabularyError, benchmark_vocabulary, parse_classes

MODEL_NAME = "corrclip"


@dataclass(frozen=True)
class Port:
    name: str
    dtype: type  # bytes, np.bool_ or np.float32 (Triton BYTES, BOOL, FP32)
    optional: bool
    doc: str


INPUTS = (
    Port("image", bytes, False, "the encoded image file (JPEG, PNG, WebP, BMP, TIFF, GIF), raw or base64"),
    Port("classes", bytes, True, "class names in the CLI syntax, e.g. 'sky; cloud, road, car' (or give preset)"),
    Port("preset", bytes, True, "a benchmark's classes and settings: " + ", ".join(BENCHMARKS)),
    Port("masks", bytes, True, "region label map: a single-channel PNG at the image's size, raw or base64"),
    Port("prob_thd", np.float32, True, "pixels whose best probability is below this get class 0"),
    Port("return_probs", np.bool_, True, "also return the class probabilities (probs_npy)"),
    Port("overlay", np.bool_, True, "also return the image with class colours and a legend (overlay_png)"),
)
OUTPUTS = (
    Port("labels_png", bytes, False, "the label map, a 16-bit greyscale PNG: pixel value = class index"),
    Port("names", bytes, False, "JSON list of the class names, index = label"),
    Port("info", bytes, False, "JSON: per-stage seconds, the settings used, model, batch size"),
    Port("probs_npy", bytes, False, ".npy float16 [classes, H, W] when return_probs, else empty"),
    Port("overlay_png", bytes, False, "RGB PNG when overlay was asked for, else empty"),
    Port("error", bytes, False, "empty on success, else one line saying what was wrong and what to do"),
)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; each has a flag on `corrclip serve`."""

    max_request_bytes: int = 16 * 2**20  # all inputs of one row together
    max_pixels: int = 16_000_000  # image width x height, read from the header before decoding
    max_classes: int = 256  # class names, synonyms included (ADE20K has 150, COCO-Stuff 171)
    # Class names x image pixels: the pipeline scores every name at full resolution, about 12 bytes per
    # class-pixel at its peak on the CPU path (measured), so 2e8 is about 2.3 GB for one image.
    max_class_pixels: int = 200_000_000
    max_probs_values: int = 64_000_000  # classes x H x W for return_probs (float16: 128 MB)
    max_queue: int = 32  # requests waiting for the model; Triton turns more away at once


class RequestError(ValueError):
    """A request the server refuses; the message goes back to the client as the `error` output."""


@dataclass
class Job:
    image: np.ndarray
    vocab: Vocabulary
    settings: Settings
    label_map: np.ndarray | None
    return_probs: bool
    overlay: bool

    def group_key(self) -> tuple:
        """Rows with the same key run as one pipeline call: same text embedding, shared encoder batches.
        return_probs is part of it because it selects the unfused stitch path."""
        return self.vocab.key(), self.settings, self.return_probs


def _element(row: Mapping[str, np.ndarray], name: str):
    value = row.get(name)
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"input {name!r} has {flat.size} elements per row; send exactly one (shape [batch, 1])")
    return flat[0]


def _text(row: Mapping[str, np.ndarray], name: str) -> str | None:
    raw = _element(row, name)
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"input {name!r} is not UTF-8 text; send the class names as UTF-8") from None


def _file_bytes(row: Mapping[str, np.ndarray], name: str) -> bytes | None:
    """Raw file bytes, or base64 text of them (told apart by whether PIL recognises the raw header)."""
    raw = _element(row, name)
    if raw is None:
        return None
    data = raw.encode("ascii", "replace") if isinstance(raw, str) else bytes(raw)
    if not data:
        raise RequestError(f"input {name!r} is empty; send the encoded file's bytes")
    if header_size(name, data) is not None:
        return data
    try:
        decoded = base64.b64decode(re.sub(rb"\s+", b"", data), validate=True)
    except (binascii.Error, ValueError):
        return data  # not base64 either: the decoder below says what is wrong with it
    return decoded if header_size(name, decoded) is not None else data


def _flag(row: Mapping[str, np.ndarray], name: str) -> bool:
    value = _element(row, name)
    return bool(value) if value is not None else False


def parse_row(row: Mapping[str, np.ndarray], limits: Limits,
              settings_for: Callable[..., Settings], needs_masks: bool) -> Job:
    """One request row -> a Job; raises RequestError with a message for the client."""
    unknown = sorted(set(row) - {p.name for p in INPUTS})
    if unknown:
        raise RequestError(f"unknown input(s) {', '.join(unknown)}; this model takes "
                           + ", ".join(p.name for p in INPUTS))
    size = sum(len(e) if isinstance(e, (bytes, str)) else np.asarray(e).nbytes
               for x in row.values() for e in np.asarray(x).reshape(-1))
    if size > limits.max_request_bytes:
        raise RequestError(f"request is {size / 2**20:.3g} MiB, above this server's limit of "
                           f"{limits.max_request_bytes / 2**20:.3g} MiB; send a smaller (e.g. JPEG) image")
    vocab, preset = _vocabulary(row, limits)
    prob_thd = _element(row, "prob_thd")
    if prob_thd is not None and not 0.0 <= float(prob_thd) <= 1.0:
        raise RequestError(f"prob_thd is {float(prob_thd)}; give a probability between 0 and 1")
    try:
        settings = settings_for(preset, prob_thd=None if prob_thd is None else float(prob_thd))
    except ValueError as e:  # a preset this method has no settings for
        raise RequestError(str(e)) from None
    try:  # header_size raises ImageError for a decompression bomb, before anything is decoded
        data = _file_bytes(row, "image")
        if data is None:
            raise RequestError("no 'image' input; send the encoded image file as BYTES")
        if header_size("image", data) is None:
            raise RequestError("image: not a JPEG, PNG, WebP, BMP, TIFF or GIF file (raw or base64); convert it")
        image = decode_image(data, max_pixels=limits.max_pixels)
        masks = _file_bytes(row, "masks")
        label_map = None if masks is None else decode_label_map(masks, image.shape[:2], "masks")
    except ImageError as e:
        raise RequestError(str(e).replace("<image bytes>", "image")) from None
    work = vocab.num_queries * image.shape[0] * image.shape[1]
    if work > limits.max_class_pixels:
        raise RequestError(
            f"{vocab.num_queries} class names x {image.shape[1]}x{image.shape[0]} pixels is above this server's limit "
            f"of {limits.max_class_pixels:,} class-pixels (scores are kept at full resolution); send a smaller image "
            "or fewer classes")
    if label_map is None and needs_masks:
        raise RequestError("this server has no mask generator (--sam none): send a region label map as 'masks'")
    return_probs = _flag(row, "return_probs")
    if return_probs and vocab.num_classes * image.shape[0] * image.shape[1] > limits.max_probs_values:
        raise RequestError(
            f"return_probs for {vocab.num_classes} classes at {image.shape[1]}x{image.shape[0]} is above this "
            f"server's limit of {limits.max_probs_values:,} values; ask without return_probs or send a smaller image")
    return Job(image, vocab, settings, label_map, return_probs, _flag(row, "overlay"))


def _vocabulary(row: Mapping[str, np.ndarray], limits: Limits) -> tuple[Vocabulary, str | None]:
    classes, preset = _text(row, "classes"), _text(row, "preset")
    if (classes is None) == (preset is None):
        raise RequestError("send exactly one of 'classes' (e.g. 'sky; cloud, road, car') and 'preset' (e.g. voc21)")
    if preset is not None:
        if preset not in BENCHMARKS:
            raise RequestError(f"unknown preset {preset!r}; choose one of {', '.join(BENCHMARKS)}")
        vocab = benchmark_vocabulary(preset)
    else:
        # Count before parsing, so a huge list is refused with this server's limit in the message.
        names = sum(1 for part in re.split(r"[,;\n]", classes) if part.strip())
        if names > limits.max_classes:
            raise RequestError(f"{names} class names (synonyms included) is above this server's limit of "
                               f"{limits.max_classes}; send fewer classes")
        try:
            vocab = parse_classes(classes)
        except VocabularyError as e:
            raise RequestError(f"classes: {e}") from None
    if vocab.num_queries > limits.max_classes:
        raise RequestError(f"{vocab.num_queries} class names (synonyms included) is above this server's limit of "
                           f"{limits.max_classes}; send fewer classes")
    return vocab, preset


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: these are per-request outputs
    return buf.getvalue()


def encode_labels(labels: np.ndarray) -> bytes:
    """Class indices as a 16-bit greyscale PNG (lossless for up to 65536 classes)."""
    return png_bytes(Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16)))


def decode_labels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).astype(np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def response(labels_png: bytes, names: list[str], info: dict, probs: np.ndarray | None = None,
             overlay: bytes = b"") -> dict[str, bytes]:
    return {"labels_png": labels_png, "names": json.dumps(names).encode(),
            "info": json.dumps(info).encode(), "probs_npy": b"" if probs is None else npy_bytes(
                probs.astype(np.float16)), "overlay_png": overlay, "error": b""}


def error_response(message: str) -> dict[str, bytes]:
    return {"labels_png": b"", "names": b"[]", "info": b"{}", "probs_npy": b"", "overlay_png": b"",
            "error": message.encode()}

