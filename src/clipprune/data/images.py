"""Reading one image file for a dataset: PIL RGB, or a one-line DataError naming the file."""
from __future__ import annotations

import os
from pathlib import Path


def open_rgb(path: str | os.PathLike, named_in: str | None = None):
    """The image at ``path`` as a PIL RGB image.

    DataError names the file when it is missing (and, with ``named_in``, which annotation named it) or when
    it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    from ..errors import DataError

    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        where = f" (named in {named_in})" if named_in else ""
        raise DataError(f"{path}: image file not found{where}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
