"""The embedded default dataset: scikit-learn's handwritten digits as a COCO-captions dataset.

Not library code: used by ``build_digits_dataset.py`` and ``train_fixture_model.py`` next to it and by the
tests that build small archives (``tests/fixture_scripts.py``).

``build_digits_archive`` turns the 1,797 8x8 UCI digits that ship with scikit-learn into

* 32x32 RGB PNGs (bilinear upscale) in ``digits/images/{train,val}/<image id>.png``,
* ``digits/annotations/captions_{train,val}.json`` in COCO captions format (5 captions per image),
* ``digits/classification/val/<classname>/<image id>.png`` plus ``classnames.json`` and
  ``templates.json`` (LAION CLIP_benchmark formats) for zero-shot classification of the held-out split,

packed in one zip whose bytes depend only on the seed (fixed PNG encoder, sorted JSON keys, sorted
zip entries with a fixed timestamp), so its sha256 can be pinned in params.yaml.

Captions name the digit and attributes measured on the stored pixels, so that image<->text
retrieval has a ground truth finer than the class. Attribute words are relative to the digit's
own class (a "thick" one is thicker than most images of that digit):

* thickness: ink amount (sum of intensities), class-wise tertiles -> thin / regular / thick;
* slant: -mu11 / mu02 of the intensity second moments (horizontal shift per row upwards),
  class-wise tertiles -> leaning left / upright / leaning right;
* horizontal position: intensity centroid x, class-wise tertiles -> left / centred / right;
* vertical position: intensity centroid y, class-wise median -> high / low;
* size: diagonal of the moment-equivalent bounding box (4 sigma_x by 4 sigma_y), class-wise median
  -> small / large.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipprune.errors import ParamError
from clipprune.io import atomic_path

IMAGE_SIZE = 32
SOURCE_SIZE = 8
SOURCE_MAX = 16.0  # load_digits intensities are integers 0..16
GRAY_STEP = 5  # upscaled intensities are multiples of 5 (52 levels, 0..255); keeps the archive < 2 MB
CAPTIONS_PER_IMAGE = 5
VAL_FRACTION = 0.2
TOP_DIR = "digits"
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # earliest date a zip entry can hold: bytes do not depend on "now"

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

TEMPLATES = [
    "a photo of the handwritten digit {c}.",
    "a handwritten {c}.",
    "the number {c}, written by hand.",
    "a low resolution photo of the digit {c}.",
    "a blurry scan of a handwritten {c}.",
    "a black and white image of the number {c}.",
    "a drawing of the digit {c}.",
    "a close-up of the handwritten number {c}.",
]

ATTRIBUTES = ("thickness", "slant", "hpos", "vpos", "size")
ATTRIBUTE_VALUES = {
    "thickness": ("thin", "regular", "thick"),
    "slant": ("left", "upright", "right"),
    "hpos": ("left", "centre", "right"),
    "vpos": ("high", "low"),
    "size": ("small", "large"),
}

# Word choices per attribute value. Adjectives go before the noun, phrases after it.
_ADJECTIVES = {
    ("thickness", "thin"): ["thin", "thin-stroked", "lightly drawn", "fine-lined"],
    ("thickness", "regular"): ["medium-weight", "regular-weight", "medium-stroked"],
    ("thickness", "thick"): ["thick", "bold", "heavy", "thick-stroked"],
    ("slant", "left"): ["left-leaning", "left-slanted", "backward-slanted"],
    ("slant", "upright"): ["upright", "straight", "unslanted"],
    ("slant", "right"): ["right-leaning", "right-slanted", "forward-slanted"],
    ("size", "small"): ["small", "compact", "tiny"],
    ("size", "large"): ["large", "big", "wide"],
}
_PHRASES = {
    ("thickness", "thin"): ["written with thin strokes", "drawn with a fine pen", "with light, thin lines"],
    ("thickness", "regular"): ["written with medium strokes", "drawn with strokes of ordinary width",
                               "with medium-weight lines"],
    ("thickness", "thick"): ["written with thick strokes", "drawn with a heavy pen", "with bold, thick lines"],
    ("slant", "left"): ["leaning to the left", "slanted to the left", "tilted left"],
    ("slant", "upright"): ["standing upright", "with no slant", "standing straight"],
    ("slant", "right"): ["leaning to the right", "slanted to the right", "tilted right"],
    ("hpos", "left"): ["on the left side", "shifted to the left", "off to the left"],
    ("hpos", "centre"): ["centred horizontally", "in the middle", "horizontally centred"],
    ("hpos", "right"): ["on the right side", "shifted to the right", "off to the right"],
    ("vpos", "high"): ["placed high", "near the top", "sitting high in the frame"],
    ("vpos", "low"): ["placed low", "near the bottom", "sitting low in the frame"],
    ("size", "small"): ["taking up little of the frame", "drawn small"],
    ("size", "large"): ["filling most of the frame", "drawn large"],
}
_CORNER_WORDS = {"high": "upper", "low": "lower", "left": "left", "centre": "middle", "right": "right"}
_NOUNS = ["handwritten {n}", "handwritten {w}", "digit {n}", "{w}", "number {w}", "handwritten digit {w}", "{n}"]
_PREFIXES = ["", "", "a photo of ", "an image of ", "a scan of ", "a picture of ", "a low-resolution photo of "]
_ADJECTIVE_ORDER = ("size", "thickness", "slant")  # English puts size before other qualities


@dataclass(frozen=True)
class DigitRecord:
    """One digit as it goes into the archive."""

    image_id: int
    label: int
    split: str
    png: bytes
    attributes: dict
    captions: tuple[str, ...]


# ----------------------------------------------------------------------------- images

def _upscale_bilinear(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize with pixel-centre alignment, in numpy so the result does not depend on PIL."""
    n = image.shape[0]
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(coords).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = coords - lo
    rows = image[lo] * (1 - w)[:, None] + image[hi] * w[:, None]
    return rows[:, lo] * (1 - w)[None, :] + rows[:, hi] * w[None, :]


def _to_pixels(image8: np.ndarray) -> np.ndarray:
    """8x8 intensities 0..16 -> 32x32 uint8 in steps of GRAY_STEP (52 evenly spaced levels, 0 and 255 kept).

    The source has only 17 levels; quantising its smooth upscale to 52 is invisible at this size but
    makes the PNGs ~35% smaller, which keeps the whole archive under 2 MB.
    """
    smooth = _upscale_bilinear(image8.astype(np.float64)) / SOURCE_MAX
    top = 255 // GRAY_STEP
    return (np.rint(np.clip(smooth, 0.0, 1.0) * top) * GRAY_STEP).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png_rgb(gray: np.ndarray) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit RGB PNG (grey replicated to 3 channels).

    A fixed encoder (filter "Up" on every row, zlib level 9) instead of PIL's, whose bundled zlib
    and heuristics vary between releases, so the same pixels always give the same bytes.
    """
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError("encode_png_rgb expects a 2-D uint8 array")
    height, width = gray.shape
    rgb = np.repeat(gray[:, :, None], 3, axis=2).reshape(height, width * 3).astype(np.int16)
    previous = np.vstack([np.zeros((1, width * 3), np.int16), rgb[:-1]])
    filtered = ((rgb - previous) % 256).astype(np.uint8)
    raw = np.hstack([np.full((height, 1), 2, np.uint8), filtered]).tobytes()  # 2 = PNG "Up" filter
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 = RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- attributes

def pixel_features(pixels: np.ndarray) -> dict[str, float]:
    """Raw measurements of one stored image (uint8, H x W), the basis of its caption attributes."""
    img = pixels.astype(np.float64) / 255.0
    mass = img.sum()
    if mass <= 0:
        centre = (img.shape[1] - 1) / 2
        return {"ink": 0.0, "slant": 0.0, "cx": centre, "cy": centre, "extent": 0.0}
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float64)
    cx = float((xs * img).sum() / mass)
    cy = float((ys * img).sum() / mass)
    mu20 = float(((xs - cx) ** 2 * img).sum() / mass)
    mu02 = float(((ys - cy) ** 2 * img).sum() / mass)
    mu11 = float(((xs - cx) * (ys - cy) * img).sum() / mass)
    # Rows grow downwards, so a stroke whose top is to the right has negative x-y covariance.
    slant = -mu11 / mu02 if mu02 > 0 else 0.0
    # Diagonal of the moment-equivalent bounding box (4 sigma_x by 4 sigma_y); unlike its area it does
    # not collapse to 0 for a thin vertical stroke (a "1").
    extent = 4.0 * float(np.sqrt(mu20 + mu02))
    return {"ink": float(mass), "slant": slant, "cx": cx, "cy": cy, "extent": extent}


_FEATURE_OF = {"thickness": "ink", "slant": "slant", "hpos": "cx", "vpos": "cy", "size": "extent"}


def attribute_labels(features: Sequence[dict], labels: np.ndarray) -> list[dict[str, str]]:
    """Bin each image's features against its own class's distribution (tertiles or median)."""
    out: list[dict[str, str]] = [{} for _ in features]
    for attribute in ATTRIBUTES:
        names = ATTRIBUTE_VALUES[attribute]
        values = np.array([f[_FEATURE_OF[attribute]] for f in features])
        quantiles = np.linspace(0, 1, len(names) + 1)[1:-1]
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            cuts = np.quantile(values[members], quantiles)
            bins = np.searchsorted(cuts, values[members], side="left")  # value <= cut -> lower bin
            for idx, b in zip(members, bins):
                out[idx][attribute] = names[int(b)]
    return out


# ----------------------------------------------------------------------------- captions

def _article(text: str) -> str:
    return ("an " if text[:1].lower() in "aeiou8" else "a ") + text


def _join_phrases(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _one_caption(rng: np.random.Generator, label: int, attrs: dict, chosen: list[str]) -> str:
    """Describe the digit with the chosen attributes, picking words and sentence shape at random."""
    noun = _choice(rng, _NOUNS).format(n=label, w=CLASSNAMES[label])
    adjectives: dict[str, str] = {}
    phrases: list[str] = []
    if "hpos" in chosen and "vpos" in chosen and rng.random() < 0.5:
        v, h = _CORNER_WORDS[attrs["vpos"]], _CORNER_WORDS[attrs["hpos"]]
        phrases.append(_choice(rng, [f"in the {v} {h} of the frame", f"toward the {v} {h}"]))
        chosen = [a for a in chosen if a not in ("hpos", "vpos")]
    for attribute in chosen:
        key = (attribute, attrs[attribute])
        if key in _ADJECTIVES and rng.random() < 0.5:
            adjectives[attribute] = _choice(rng, _ADJECTIVES[key])
        else:
            phrases.append(_choice(rng, _PHRASES[key]))
    if rng.random() < 0.25:  # telegraphic style, like many human captions
        return f"the {noun}, " + ", ".join(
            [adjectives[a] for a in _ADJECTIVE_ORDER if a in adjectives] + phrases) + "."
    ordered = [adjectives[a] for a in _ADJECTIVE_ORDER if a in adjectives]
    head = _article(" ".join([", ".join(ordered), noun]) if ordered else noun)
    text = _choice(rng, _PREFIXES) + head
    if phrases:
        text += " " + _join_phrases(phrases)
    return text + "."


def make_captions(seed: int, image_id: int, label: int, attrs: dict,
                  count: int = CAPTIONS_PER_IMAGE) -> tuple[str, ...]:
    """``count`` distinct captions of one image; together they mention every attribute.

    Seeded by (seed, image_id) so an image's captions do not depend on which other images are built.
    """
    rng = np.random.default_rng([seed, 1, image_id])
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    captions: list[str] = []
    for k in range(count):
        for _attempt in range(20):
            anchor = order[k % len(order)]  # each attribute anchors one caption -> full coverage
            others = [a for a in ATTRIBUTES if a != anchor]
            extra = rng.choice(others, size=int(rng.integers(1, 4)), replace=False).tolist()
            chosen = [a for a in ATTRIBUTES if a == anchor or a in extra]
            rng.shuffle(chosen)
            caption = _one_caption(rng, label, attrs, chosen)
            if caption not in captions:
                break
        captions.append(caption)
    return tuple(captions)


# ----------------------------------------------------------------------------- split and build

def stratified_split(labels: np.ndarray, seed: int, val_fraction: float = VAL_FRACTION) -> np.ndarray:
    """Boolean mask of validation items: round(val_fraction * n_c) of each class, seeded."""
    rng = np.random.default_rng([seed, 0])
    is_val = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        chosen = rng.permutation(members)[: int(round(val_fraction * len(members)))]
        is_val[chosen] = True
    return is_val


def digit_records(seed: int = 0, limit_per_class: int | None = None) -> list[DigitRecord]:
    """All digits with their split, PNG bytes, attributes and captions (image id = sklearn index + 1).

    ``limit_per_class`` keeps only the first k images (by id) of each class in each split, for fast
    tests; attributes are still binned against the full dataset so a subset is a strict subset.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParamError(f"seed must be an integer, got {seed!r}")
    if limit_per_class is not None and (isinstance(limit_per_class, bool) or not isinstance(limit_per_class, int)
                                        or limit_per_class < 1):
        raise ParamError(f"limit_per_class must be a positive integer or None, got {limit_per_class!r}")
    from sklearn.datasets import load_digits  # ships its data inside the wheel: no download

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    pixels = [_to_pixels(img) for img in digits.images]
    attrs = attribute_labels([pixel_features(p) for p in pixels], labels)
    is_val = stratified_split(labels, seed)

    kept: list[int] = []
    for split_mask in (~is_val, is_val):
        for cls in range(len(CLASSNAMES)):
            members = np.flatnonzero(split_mask & (labels == cls))
            kept.extend(members[:limit_per_class].tolist() if limit_per_class else members.tolist())
    records = []
    for idx in sorted(kept):
        image_id = idx + 1
        label = int(labels[idx])
        records.append(DigitRecord(
            image_id=image_id, label=label, split="val" if is_val[idx] else "train",
            png=encode_png_rgb(pixels[idx]), attributes=attrs[idx],
            captions=make_captions(seed, image_id, label, attrs[idx])))
    return records


def image_file_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


def coco_captions_json(records: Sequence[DigitRecord], split: str, seed: int) -> dict:
    """COCO captions dict for one split (extra per-image fields: digit label and attributes)."""
    images, annotations = [], []
    for rec in records:
        if rec.split != split:
            continue
        images.append({"id": rec.image_id, "file_name": image_file_name(rec.image_id),
                       "width": IMAGE_SIZE, "height": IMAGE_SIZE, "license": 1,
                       "digit": rec.label, "attributes": rec.attributes})
        for k, caption in enumerate(rec.captions):
            # Annotation ids derive from the image id, so they are stable under subsetting.
            annotations.append({"id": rec.image_id * 10 + k, "image_id": rec.image_id, "caption": caption})
    return {
        "info": {"description": "UCI handwritten digits (scikit-learn load_digits) as COCO captions, "
                                "built by clipprune scripts/build_digits_dataset.py",
                 "url": "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
                 "version": "1.0", "year": 1998, "contributor": "E. Alpaydin, C. Kaynak (UCI); captions: clipprune",
                 "split": split, "seed": seed},
        "licenses": [{"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}],
        "images": images,
        "annotations": annotations,
    }


_README = """Handwritten digits as a COCO-captions dataset (clipprune embedded default).

Source: UCI "Optical Recognition of Handwritten Digits" (CC BY 4.0) as shipped by scikit-learn
(load_digits: 1,797 8x8 images, 10 classes). Images are bilinearly upscaled to 32x32, quantised to
52 grey levels (multiples of 5) and stored as RGB PNG. Split: stratified, {val_pct}% of each class held out as val (seed {seed}).

images/<split>/<id>.png            id = COCO image id = scikit-learn index + 1
annotations/captions_<split>.json  COCO captions format, 5 captions per image
classification/val/<class>/<id>.png, classnames.json, templates.json  zero-shot classification

Caption attributes are measured on the stored pixels and binned against the digit's own class:
thickness (ink amount, tertiles), slant (-mu11/mu02, tertiles), horizontal position (centroid x,
tertiles), vertical position (centroid y, median), size (diagonal of the 4 sigma_x by 4 sigma_y
box, median).
"""


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode("utf-8")


def archive_entries(records: Sequence[DigitRecord], seed: int) -> dict[str, bytes]:
    """Every file of the archive by its path inside the zip."""
    entries: dict[str, bytes] = {
        f"{TOP_DIR}/README.txt": _README.format(val_pct=int(VAL_FRACTION * 100), seed=seed).encode(),
        f"{TOP_DIR}/classification/classnames.json": _json_bytes(CLASSNAMES),
        f"{TOP_DIR}/classification/templates.json": _json_bytes(TEMPLATES),
    }
    for split in ("train", "val"):
        entries[f"{TOP_DIR}/annotations/captions_{split}.json"] = _json_bytes(coco_captions_json(records, split, seed))
    for rec in records:
        name = image_file_name(rec.image_id)
        entries[f"{TOP_DIR}/images/{rec.split}/{name}"] = rec.png
        if rec.split == "val":
            entries[f"{TOP_DIR}/classification/val/{CLASSNAMES[rec.label]}/{name}"] = rec.png
    return entries


def write_zip(path: str | os.PathLike, entries: dict[str, bytes]) -> None:
    """Write a zip whose bytes depend only on ``entries`` (sorted names, fixed times and attributes)."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for name in sorted(entries):
                info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
                info.create_system = 3  # unix, so external_attr below means rw-r--r-- regular file
                info.external_attr = (0o100644 & 0xFFFF) << 16
                # PNGs are already deflated; storing them skips work and costs ~nothing in size.
                info.compress_type = zipfile.ZIP_STORED if name.endswith(".png") else zipfile.ZIP_DEFLATED
                zf.writestr(info, entries[name], compresslevel=9)


def build_digits_archive(out_path: str | os.PathLike, seed: int = 0,
                         limit_per_class: int | None = None) -> Path:
    """Build the digits COCO-captions zip at ``out_path`` (atomically) and return the path."""
    records = digit_records(seed, limit_per_class)
    out_path = Path(out_path)
    write_zip(out_path, archive_entries(records, seed))
    return out_path


def summarize(records: Sequence[DigitRecord]) -> dict:
    """Counts and how well captions' attributes single out images (per split)."""
    summary = {}
    for split in ("train", "val"):
        recs = [r for r in records if r.split == split]
        keys = [(r.label, *(r.attributes[a] for a in ATTRIBUTES)) for r in recs]
        counts: dict = {}
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        summary[split] = {
            "images": len(recs),
            "captions": sum(len(r.captions) for r in recs),
            "unique_attribute_tuples": sum(1 for k in keys if counts[k] == 1),
            "mean_images_per_tuple": float(np.mean([counts[k] for k in keys])) if keys else 0.0,
        }
    return summary


def read_png_bytes(data: bytes) -> np.ndarray:
    """Decode PNG bytes to an H x W x 3 uint8 array (for checks; uses PIL)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
