"""open_rgb: the one place dataset images are decoded; every bad file is one DataError line naming it."""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from clipprune.data.images import MAX_IMAGE_PIXELS, open_rgb
from clipprune.errors import DataError

RNG = np.random.default_rng(0)
PIXELS = (RNG.random((40, 30, 3)) * 255).astype(np.uint8)
# a smooth image for lossy JPEG (noise does not survive it)
SMOOTH = np.stack([*np.meshgrid(np.arange(30) * 8, np.arange(40) * 6), np.full((40, 30), 128)], -1).astype(np.uint8)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand (RGB, 8 bit): its header may claim any size, whatever the pixel data holds."""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def reference_png() -> bytes:
    rows = b"".join(b"\x00" + PIXELS[y].tobytes() for y in range(PIXELS.shape[0]))  # filter 0 per row
    return png(PIXELS.shape[1], PIXELS.shape[0], rows)


def encoded(fmt: str, pixels: np.ndarray = PIXELS, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path, *parts: str) -> str:
    """open_rgb(path) raises one DataError line starting with the path; no warning escapes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as err:
            open_rgb(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert [str(w.message) for w in caught] == []
    return message


# ---------------------------------------------------------------- good files

def test_hand_written_png_decodes_to_its_pixels(tmp_path):
    image = open_rgb(write(tmp_path, "ref.png", reference_png()))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), PIXELS)


@pytest.mark.parametrize("fmt, exact", [("PNG", True), ("BMP", True), ("TIFF", True), ("JPEG", False)])
def test_common_formats(tmp_path, fmt, exact):
    pixels = PIXELS if exact else SMOOTH
    decoded = np.asarray(open_rgb(write(tmp_path, f"x.{fmt.lower()}", encoded(fmt, pixels, quality=95)
                                        if fmt == "JPEG" else encoded(fmt, pixels))))
    assert decoded.shape == pixels.shape
    error = np.abs(decoded.astype(int) - pixels).mean()
    assert error == 0 if exact else error < 2


def test_png_with_data_after_iend_is_accepted(tmp_path):
    image = open_rgb(write(tmp_path, "tail.png", reference_png() + b"appended by some tool"))
    assert np.array_equal(np.asarray(image), PIXELS)


def test_palette_png_with_alpha_converts_without_a_warning(tmp_path):
    palette = Image.fromarray(PIXELS).quantize(16)
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=bytes(range(0, 256, 16)))
    path = write(tmp_path, "palette.png", buf.getvalue())
    with Image.open(path) as im:
        assert im.mode == "P" and isinstance(im.info["transparency"], bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = np.asarray(im.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(np.asarray(open_rgb(path)), expected)


def test_pillow_limit_is_set_explicitly(tmp_path):
    open_rgb(write(tmp_path, "ref.png", reference_png()))
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS == 8192 * 8192


# ---------------------------------------------------------------- bad files

@pytest.mark.parametrize("cut", ["half", "last_byte", "iend", "ten_bytes"])
def test_truncated_png(tmp_path, cut):
    data = reference_png()
    keep = {"half": len(data) // 2, "last_byte": len(data) - 1, "iend": len(data) - 12, "ten_bytes": 10}[cut]
    refused(write(tmp_path, "cut.png", data[:keep]), "cannot read image")


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF", "GIF", "WEBP"])
def test_truncated_other_formats(tmp_path, fmt):
    data = encoded(fmt)
    refused(write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) * 2 // 3]), "cannot read image")


def test_corrupt_png_pixel_data(tmp_path):
    data = bytearray(reference_png())
    data[60] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    refused(write(tmp_path, "flip.png", bytes(data)), "cannot read image")


@pytest.mark.parametrize("content", [b"", b"garbage " * 100, b"\x89PNG\r\n\x1a\n this is not an image",
                                     b"GIF89a\x00\x00"])
def test_not_an_image_under_an_image_name(tmp_path, content):
    refused(write(tmp_path, "fake.png", content), "cannot read image")


def test_huge_declared_dimensions(tmp_path):
    # 100000 x 100000 = 1e10 pixels: refused from the header, nothing is decoded
    refused(write(tmp_path, "bomb.png", png(100_000, 100_000)), "image too large", "10000000000 pixels",
            f"at most {MAX_IMAGE_PIXELS}", "MAX_IMAGE_PIXELS")


def test_dimensions_in_pillows_warning_band(tmp_path):
    # over the limit but under twice it: Pillow only warns; that warning is the error, not a stderr line
    refused(write(tmp_path, "big.png", png(9000, 9000)), "image too large", "81000000 pixels")


def test_just_over_the_limit_in_another_format(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    header = struct.pack("<2sIHHIIiiHHIIiiII", b"BM", 54, 0, 0, 54, 40, side, side, 1, 24, 0, 0, 0, 0, 0, 0)
    refused(write(tmp_path, "big.bmp", header), "image too large")


def test_pillow_warnings_about_the_file_are_errors(tmp_path):
    # a TIFF tag whose data lies beyond the end of the file: Pillow warns and goes on
    data = bytearray(encoded("TIFF", tiffinfo={305: "written by a test"}))
    ifd = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, ifd)[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 305:  # Software: ASCII, stored at an offset
            struct.pack_into("<II", data, entry + 4, 1000, 10_000_000)
    path = write(tmp_path, "tags.tiff", bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(path) as im:
            im.load()
    assert caught  # Pillow alone decodes it with a warning ("Truncated File Read" for the tag)
    refused(path, "cannot read image", "Pillow warns")


def test_truncated_images_stay_refused_when_a_library_allows_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encoded("JPEG")
    refused(write(tmp_path, "cut.jpg", data[: len(data) // 2]), "cannot read image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back as it was


def test_missing_file_names_the_annotation(tmp_path):
    message = refused(tmp_path / "gone.png", "image file not found")
    with pytest.raises(DataError, match=r"gone\.png: image file not found \(named in captions\.json\)"):
        open_rgb(tmp_path / "gone.png", named_in="captions.json")
    assert message


def test_a_directory_under_an_image_name(tmp_path):
    (tmp_path / "dir.png").mkdir()
    refused(tmp_path / "dir.png", "cannot read image")
