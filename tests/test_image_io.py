"""decode_image must match the research pipeline's cv2.imread(IMREAD_COLOR) + BGR->RGB; bad input must
raise ImageError with a one-line message naming the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from corrclip.runtime import image_io
from corrclip.runtime.image_io import ImageError, decode_image, load_label_map

RNG = np.random.default_rng(0)
H, W = 24, 40


def _cv2_rgb(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    bgr = cv2.imread(str(path), flags)
    assert bgr is not None
    return bgr[:, :, ::-1]


def _rgb() -> np.ndarray:
    return RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _grey() -> np.ndarray:
    return RNG.integers(0, 256, (H, W), dtype=np.uint8)


def _write_rgb(path: Path) -> np.ndarray:
    src = _rgb()
    Image.fromarray(src).save(path)
    return src


def _write_grey(path: Path) -> np.ndarray:
    src = _grey()
    Image.fromarray(src).save(path)
    return np.repeat(src[:, :, None], 3, axis=2)


def _write_palette(path: Path) -> np.ndarray:
    idx = RNG.integers(0, 16, (H, W), dtype=np.uint8)
    pal = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(pal.tobytes())
    im.info["transparency"] = 3  # a tRNS entry: IMREAD_COLOR still shows the palette colour
    im.save(path, transparency=3)
    return pal[idx]


def _write_rgba(path: Path) -> np.ndarray:
    src = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    src[:, : W // 2, 3] = 0  # fully transparent but coloured: dropping alpha keeps the colour
    Image.fromarray(src, mode="RGBA").save(path)
    return src[:, :, :3]


def _write_la(path: Path) -> np.ndarray:
    grey, alpha = _grey(), _grey()
    Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]).save(path)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _write_grey16(path: Path) -> np.ndarray:
    src = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
    im = Image.fromarray(src)
    assert im.mode == "I;16"
    im.save(path)
    # OpenCV keeps the high byte; a rounded rescale (x / 257) would differ for many pixels.
    return np.repeat((src >> 8).astype(np.uint8)[:, :, None], 3, axis=2)


WRITERS = {
    "rgb.png": _write_rgb,
    "grey.png": _write_grey,
    "palette.png": _write_palette,
    "rgba.png": _write_rgba,
    "la.png": _write_la,
    "grey16.png": _write_grey16,
    "rgb.bmp": _write_rgb,
    "rgb.tif": _write_rgb,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_decode_matches_cv2_and_the_expected_pixels(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    expected = WRITERS[name](path)
    got = decode_image(path)
    assert got.dtype == np.uint8 and got.shape == (H, W, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _cv2_rgb(path))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["rgb.png", "grey.png", "palette.png", "rgba.png", "la.png", "grey16.png"])
def test_pil_fallback_follows_the_same_rules(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    WRITERS[name](path)
    got = image_io._decode_with_pil(name, path.read_bytes(), known_format=True)
    np.testing.assert_array_equal(got, _cv2_rgb(path))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_matches_cv2(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_rgb()).convert(mode).save(path, quality=90)
    np.testing.assert_array_equal(decode_image(path), _cv2_rgb(path))


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display after rotating 90 degrees clockwise
    Image.fromarray(_rgb()).save(path, quality=95, exif=exif.tobytes())
    got = decode_image(path)
    assert got.shape == (W, H, 3)
    np.testing.assert_array_equal(got, _cv2_rgb(path))
    stored = _cv2_rgb(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    np.testing.assert_array_equal(got, np.rot90(stored, k=-1))


def test_bytes_and_path_give_the_same_pixels(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _write_rgba(path)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), decode_image(str(path)))


def _assert_image_error(src: object, *words: str) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(src)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    _assert_image_error(path, str(path), "not found")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_image_error(path, str(path), "empty")


def test_directory(tmp_path: Path) -> None:
    _assert_image_error(tmp_path, str(tmp_path), "directory")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n" * 20)
    _assert_image_error(path, str(path), "not a readable image")


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".bmp", ".gif"])
def test_truncated_file_raises(tmp_path: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    decode_image(whole)  # the intact file is fine
    _assert_image_error(cut, str(cut), "truncated")


def test_corrupt_png_raises(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.png"
    Image.fromarray(RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    _assert_image_error(path, str(path), "corrupt")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size but that holds no pixels: enough for size checks."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_absurd_size_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(10_000, 8_000))  # 80 MP, and no pixel data at all
    message = _assert_image_error(path, str(path), "megapixel", "resize")
    assert "10000x8000" in message


def test_far_too_large_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))  # past PIL's own decompression-bomb limit
    _assert_image_error(path, str(path), "megapixel")


def test_size_limit_applies_to_real_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.jpg"
    Image.fromarray(_rgb()).save(path)
    monkeypatch.setattr(image_io, "MAX_PIXELS", H * W - 1)
    _assert_image_error(path, f"{W}x{H}", "megapixel")


def test_zero_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "zero.png"
    path.write_bytes(_png_header_only(0, 10))
    _assert_image_error(path, str(path))


# ---- label maps ----------------------------------------------------------------------------------


def _label_error(path: Path, hw: tuple[int, int], *words: str) -> str:
    with pytest.raises(ImageError) as info:
        load_label_map(path, hw)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message, message
    return message


def test_palette_png_gives_index_values_not_colours(tmp_path: Path) -> None:
    ids = RNG.integers(0, 40, (H, W), dtype=np.uint8)
    im = Image.fromarray(ids, mode="P")
    im.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tobytes())
    path = tmp_path / "regions.png"
    im.save(path)
    got = load_label_map(path, (H, W))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ids)


@pytest.mark.parametrize(
    ("name", "dtype", "high"),
    [("regions.png", np.uint8, 256), ("regions.png", np.uint16, 65536), ("regions.tif", np.int32, 2**20)],
    ids=["L png", "I;16 png", "I tif"],  # Pillow cannot write 32-bit PNGs, so mode I goes via TIFF
)
def test_single_channel_images(tmp_path: Path, name: str, dtype: type, high: int) -> None:
    ids = RNG.integers(0, high, (H, W)).astype(dtype)
    path = tmp_path / name
    Image.fromarray(ids).save(path)
    np.testing.assert_array_equal(load_label_map(path, (H, W)), ids.astype(np.int64))


def test_rgb_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "colour.png"
    Image.fromarray(_rgb()).save(path)
    _label_error(path, (H, W), "single-channel")


def test_npz_with_the_research_key(tmp_path: Path) -> None:
    ids = RNG.integers(0, 300, (H, W), dtype=np.int32)
    path = tmp_path / "regions.npz"
    np.savez_compressed(path, instance_mask=ids)
    got = load_label_map(path, (H, W))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ids)


def test_npz_without_the_key_lists_what_it_has(tmp_path: Path) -> None:
    path = tmp_path / "regions.npz"
    np.savez(path, masks=np.zeros((H, W)), extra=np.ones(3))
    _label_error(path, (H, W), "'instance_mask'", "'masks'", "'extra'")


def test_npy(tmp_path: Path) -> None:
    ids = RNG.integers(-1, 50, (H, W), dtype=np.int64)
    path = tmp_path / "regions.npy"
    np.save(path, ids)
    np.testing.assert_array_equal(load_label_map(path, (H, W)), ids)


def test_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    path = tmp_path / "regions.npy"
    np.save(path, np.zeros((H, W), dtype=np.int32))
    message = _label_error(path, (H + 1, W), "original image resolution")
    assert f"{H}x{W}" in message and f"{H + 1}x{W}" in message


def test_bad_label_arrays(tmp_path: Path) -> None:
    path = tmp_path / "regions.npy"
    np.save(path, np.zeros((H, W, 3), dtype=np.int32))
    _label_error(path, (H, W), "2-D")
    np.save(path, np.full((H, W), 0.5))
    _label_error(path, (H, W), "non-integer")
    np.save(path, np.full((H, W), 2.0))  # integral floats are accepted
    assert load_label_map(path, (H, W)).max() == 2


def test_missing_and_corrupt_label_files(tmp_path: Path) -> None:
    _label_error(tmp_path / "nope.npz", (H, W), "not found")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    _label_error(broken, (H, W))
    text = tmp_path / "regions.png"
    text.write_text("hello")
    _label_error(text, (H, W), "not a readable label map")
