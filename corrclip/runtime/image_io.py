"""Reading user images and user region maps, with errors a person can act on.

`decode_image` must hand the engine the same pixels the research pipeline saw: mmseg's
`LoadImageFromFile` is `cv2.imread(path, IMREAD_COLOR)` followed (in the data preprocessor) by
BGR->RGB (corrclip.md §1 step 1). So the primary decoder is OpenCV itself, which gives exactly its
rules: EXIF orientation applied, grey replicated, palettes expanded, alpha dropped (not
composited), 16-bit data shifted down to its high byte. PIL is only a fallback for files OpenCV
cannot read, and there it copies those rules.

`load_label_map` reads the user-supplied region masks of §1 step 2 (the research code's
pre-generated `.npz` files or a PNG/NPY equivalent) at the original image resolution.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Above this the engine's full-resolution logits (classes x H x W floats) no longer fit in memory
# and no benchmark image comes close (Cityscapes is 2 MP); such files are usually scans or panoramas.
MAX_PIXELS = 50_000_000
NPZ_KEY = "instance_mask"  # the research code's key in its pre-generated mask files

_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Leading bytes of the common formats, to tell "damaged image" from "not an image at all".
_MAGIC = (_JPEG_SOI, _PNG_SIGNATURE, b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


class ImageError(ValueError):
    """An image or label map that cannot be used; the message names the file, problem and fix."""


def _describe(src: str | os.PathLike | bytes) -> str:
    return "<image bytes>" if isinstance(src, bytes | bytearray | memoryview) else os.fspath(src)


def _read_bytes(path: str | os.PathLike, what: str) -> bytes:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ImageError(f"{name}: file not found; check the path (relative to {os.getcwd()})")
    if os.path.isdir(name):
        raise ImageError(f"{name}: is a directory; pass the path of {what}")
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"{name}: cannot read the file ({e.strerror or e}); check its permissions") from None
    if not data:
        raise ImageError(f"{name}: file is empty (0 bytes); re-export or re-download it")
    return data


def _check_size(name: str, width: int, height: int, max_pixels: int | None = None) -> None:
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has zero size ({width}x{height}); the file is damaged, re-export it")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} ({width * height / 1e6:.1f} megapixels), above the "
            f"{max_pixels / 1e6:g} megapixel limit; resize it (e.g. to 4096 px on the long side) first"
        )


def header_size(name: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header without decoding pixels, or None if PIL does not know the format."""
    try:
        with warnings.catch_warnings():
            # We apply our own, lower limit below; PIL's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name}: image is far above the {MAX_PIXELS / 1e6:.0f} megapixel limit; resize it "
            "(e.g. to 4096 px on the long side) first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _is_truncated(data: bytes) -> bool:
    """Cheap end-marker checks for the two formats users send most, before any decoding."""
    if data.startswith(_JPEG_SOI):
        # A complete JPEG ends its last scan with an EOI marker. Marker bytes cannot occur inside
        # entropy-coded data (0xFF is stuffed), so "no EOI after the last SOS" means the file was
        # cut. OpenCV 4 decodes such files silently, padding the missing rows with grey.
        return data.rfind(_JPEG_EOI) < data.rfind(_JPEG_SOS)
    if data.startswith(_PNG_SIGNATURE):
        # Every PNG ends with an IEND chunk; checking here also spares the user libpng's own
        # error line on stderr.
        return b"IEND" not in data
    return False


# OpenCV 5 moved the log level into cv2.utils.logging; 4.x (what the `serve` extra installs, for
# numpy 1.x) has it at the top level. 4.11 and 5.0 decoded and resized bit-identically (README: Serving).
_cv2_logging = getattr(cv2.utils, "logging", cv2)
_get_log_level, _set_log_level = _cv2_logging.getLogLevel, _cv2_logging.setLogLevel


def _decode_with_cv2(data: bytes) -> np.ndarray | None:
    # OpenCV logs its own failure to stderr; our ImageError says it better, so silence it meanwhile.
    level = _get_log_level()
    _set_log_level(0)  # LOG_LEVEL_SILENT
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    finally:
        _set_log_level(level)
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_with_pil(name: str, data: bytes, known_format: bool) -> np.ndarray:
    """IMREAD_COLOR's rules, done with PIL, for formats OpenCV cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # strict: PIL raises on truncated data unless LOAD_TRUNCATED_IMAGES is set
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16") or im.mode == "I":
                # 16-bit grey: OpenCV keeps the high byte (libpng strip_16), not a rounded rescale.
                grey = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
            # PIL's RGBA/LA/PA -> RGB drops alpha and P -> RGB expands the palette, as OpenCV does.
            return np.asarray(im.convert("RGB")).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError is an OSError: a damaged header looks like "not an image" to PIL.
        if known_format or data.startswith(_MAGIC):
            # PIL's "cannot identify image file <BytesIO ...>" would only confuse; say what it means.
            detail = "damaged header" if isinstance(e, UnidentifiedImageError) else str(e)
            raise ImageError(
                f"{name}: image data is truncated or corrupt ({detail}); re-download or re-export the file"
            ) from None
    raise ImageError(f"{name}: not a readable image (unknown or unsupported format); convert it to JPEG or PNG")


def decode_image(src: str | os.PathLike | bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes to uint8 HxWx3 RGB, like cv2.imread(IMREAD_COLOR) + BGR->RGB.

    max_pixels: a lower limit than MAX_PIXELS (a server's), checked from the header before decoding.
    """
    name = _describe(src)
    if isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
    else:
        data = _read_bytes(src, "an image file")
    if not data:
        raise ImageError(f"{name}: no data (0 bytes); pass the encoded image file contents")
    size = header_size(name, data)
    if size is not None:
        _check_size(name, *size, max_pixels)  # before decoding, so a huge file fails fast and without the memory
    if _is_truncated(data):
        raise ImageError(
            f"{name}: image data is truncated (the end-of-image marker is missing); re-download or re-export the file"
        )
    rgb = _decode_with_cv2(data)
    if rgb is None:
        rgb = _decode_with_pil(name, data, known_format=size is not None)
    _check_size(name, rgb.shape[1], rgb.shape[0], max_pixels)
    return rgb


def _as_label_array(name: str, arr: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    if arr.ndim != 2:
        raise ImageError(
            f"{name}: label map has shape {tuple(arr.shape)}; it must be a single 2-D HxW array of region ids"
        )
    if arr.dtype.kind == "f":
        # The research code truncates with .int(); refuse instead of guessing at fractional ids.
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ImageError(f"{name}: label map holds non-integer values; save integer region ids")
    elif arr.dtype.kind not in "biu":
        raise ImageError(f"{name}: label map has dtype {arr.dtype}; save integer region ids")
    h, w = arr.shape
    if (h, w) != tuple(image_hw):
        raise ImageError(
            f"{name}: label map is {h}x{w} (HxW) but the image is {image_hw[0]}x{image_hw[1]}; the map "
            "must be at the original image resolution"
        )
    return arr.astype(np.int64)


def _load_png_labels(name: str, data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            # For 'P' images np.asarray gives the palette INDICES, which are the region ids;
            # converting to RGB would give colours instead.
            if mode in ("P", "L", "1", "I", "F") or mode.startswith("I;16"):
                return np.asarray(im)
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not a readable label map; save it as a single-channel PNG, .npy or .npz (key {NPZ_KEY!r})"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: label map data is truncated or corrupt ({e}); re-export it") from None
    raise ImageError(
        f"{name}: label map is a {mode} image; a single-channel label map is needed (mode L, I;16, I or P "
        "holding region ids), not colours"
    )


def decode_label_map(data: bytes, image_hw: tuple[int, int], name: str = "<label map bytes>") -> np.ndarray:
    """Region ids as int64 HxW from encoded single-channel PNG bytes (what a server receives).

    The size is read from the header and compared with the image before any pixel is decoded, so a
    wrong-size map or a decompression bomb is refused without the memory.
    """
    size = header_size(name, data)
    if size is not None and (size[1], size[0]) != tuple(image_hw):
        raise ImageError(
            f"{name}: label map is {size[1]}x{size[0]} (HxW) but the image is {image_hw[0]}x{image_hw[1]}; the "
            "map must be at the original image resolution"
        )
    return _as_label_array(name, np.asarray(_load_png_labels(name, data)), image_hw)


def load_label_map(path: str | os.PathLike, image_hw: tuple[int, int]) -> np.ndarray:
    """Region ids as int64 HxW, from a PNG (index values), `.npy`, or `.npz` (key "instance_mask").

    The minimum id marks unsegmented pixels (corrclip.md §1 step 2); `image_hw` is the decoded
    image's (height, width), which the map must match exactly.
    """
    name = os.fspath(path)
    data = _read_bytes(path, "a label map file")
    suffix = os.path.splitext(name)[1].lower()
    if suffix in (".npz", ".npy"):
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ImageError(f"{name}: cannot read the {suffix} file ({e}); re-save it with numpy") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if NPZ_KEY not in loaded.files:
                    found = ", ".join(repr(k) for k in loaded.files) or "none"
                    raise ImageError(
                        f"{name}: .npz has no {NPZ_KEY!r} array (keys found: {found}); save the region ids "
                        f"under {NPZ_KEY!r}"
                    )
                try:
                    arr = loaded[NPZ_KEY]
                except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                    raise ImageError(f"{name}: cannot read {NPZ_KEY!r} ({e}); re-save the file") from None
        else:
            arr = loaded
    else:
        arr = _load_png_labels(name, data)
    return _as_label_array(name, np.asarray(arr), image_hw)
