"""Reading one image file for a dataset: PIL RGB, or a one-line DataError naming the file.

Every dataset image is decoded here, fully (``load``), inside one guarded region: whatever Pillow raises
for the file (unidentified format, truncated or corrupt data, a decompression bomb) and any warning it
issues while decoding (e.g. a decompression-bomb warning, TIFF tags beyond the end of the file) is a
DataError naming the file, never a traceback, a grey-filled image or a warning line.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

# Largest image accepted, in pixels (width x height): 8192 x 8192, 192 MiB as RGB. COCO images are at most
# 640 x 640 and ImageNet's largest are ~ 5000 x 4000; beyond this a file is treated as a decompression bomb
# (Pillow's own default warns above 89 M pixels and refuses above twice that). Pillow's
# ``Image.MAX_IMAGE_PIXELS`` is set to this value too, for the checks it makes inside its plugins.
MAX_IMAGE_PIXELS = 8192 * 8192


def _pil():
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    return Image


def open_rgb(path: str | os.PathLike, named_in: str | None = None):
    """The image at ``path`` as a PIL RGB image, fully decoded.

    DataError names the file when it is missing (and, with ``named_in``, which annotation named it), when
    it is larger than ``MAX_IMAGE_PIXELS``, or when it cannot be decoded.
    """
    from PIL import ImageFile

    from ..errors import DataError

    Image = _pil()
    path = Path(path)
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        # A library that set this would turn truncated files into grey-filled images without a word.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # stop before decoding it
            with Image.open(path) as im:
                im.verify()  # PNG: every chunk's CRC up to IEND (decoding alone accepts a cut-off tail)
                if im.format == "PNG" and not _ends_with_iend(path):
                    raise DataError(f"{path}: cannot read image (truncated PNG file: no complete IEND chunk)")
            with Image.open(path) as im:
                _check_size(im.size, path, DataError)
                im.load()
                _check_size(im.size, path, DataError)  # some formats pick their size when loading
                if im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
                    # the same RGB values; converting directly warns that the alpha is dropped
                    rgb = im.convert("RGBA").convert("RGB")
                else:
                    rgb = im.convert("RGB")
    except FileNotFoundError:
        where = f" (named in {named_in})" if named_in else ""
        raise DataError(f"{path}: image file not found{where}") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow: "Image size (N pixels) exceeds ..."
        size = f"{found[1]} pixels" if found else "more pixels than allowed"
        raise DataError(f"{path}: image too large: {size}, at most {MAX_IMAGE_PIXELS} are read "
                        f"(MAX_IMAGE_PIXELS in clipprune/data/images.py)") from None
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - only Pillow decoding this one file runs in the block above
        # Pillow reports a bad file as OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error ...
        raise DataError(f"{path}: cannot read image ({_reason(err)})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    for warning in caught:
        if issubclass(warning.category, DeprecationWarning):  # about the calling code, not the file
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        raise DataError(f"{path}: cannot read image (Pillow warns: {warning.message})")
    return rgb


_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole 12-byte IEND chunk (length 0, type, CRC)
_IEND_TAIL = 1 << 16  # bytes searched at the end of a PNG (some writers append data after IEND)


def _ends_with_iend(path: Path) -> bool:
    """True if the last 64 KiB of the PNG hold its complete IEND chunk (``verify`` stops before its CRC)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - _IEND_TAIL))
        return _IEND in fh.read()


def _check_size(size: tuple[int, int], path: Path, error) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise error(f"{path}: cannot read image (it is {width} x {height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise error(f"{path}: image too large: {width} x {height} = {width * height} pixels, at most "
                    f"{MAX_IMAGE_PIXELS} are read (MAX_IMAGE_PIXELS in clipprune/data/images.py)")


def _reason(err: Exception) -> str:
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
    return f"{type(err).__name__}: {text}" if not isinstance(err, OSError) or not text else text
