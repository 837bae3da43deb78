"""The embedded digits dataset: reproducible bytes, layout, formats, truthful and distinctive captions."""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixture_scripts import digits_dataset as D
from clipprune.errors import ParamError

from .conftest import SMALL_PER_CLASS

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "data" / "fixtures" / "digits.zip"


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def test_build_is_byte_reproducible_and_seeded(tmp_path, digits_small_zip):
    again = D.build_digits_archive(tmp_path / "again.zip", seed=0, limit_per_class=SMALL_PER_CLASS)
    assert again.read_bytes() == digits_small_zip.read_bytes()
    other = D.build_digits_archive(tmp_path / "other.zip", seed=1, limit_per_class=SMALL_PER_CLASS)
    assert other.read_bytes() != digits_small_zip.read_bytes()


def test_zip_entries_are_sorted_with_fixed_metadata(digits_small_zip):
    with zipfile.ZipFile(digits_small_zip) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert all(i.date_time == D.ZIP_TIMESTAMP for i in infos)
    assert all(n.startswith("digits/") and ".." not in n for n in names)


def test_layout_and_formats(digits_small_zip):
    entries = zip_entries(digits_small_zip)
    classnames = json.loads(entries["digits/classification/classnames.json"])
    templates = json.loads(entries["digits/classification/templates.json"])
    assert classnames == D.CLASSNAMES and len(classnames) == 10
    assert 6 <= len(templates) <= 10 and all("{c}" in t for t in templates)

    for split in ("train", "val"):
        coco = json.loads(entries[f"digits/annotations/captions_{split}.json"])
        assert {"info", "licenses", "images", "annotations"} <= set(coco)
        assert len(coco["images"]) == 10 * SMALL_PER_CLASS
        ids = [im["id"] for im in coco["images"]]
        assert ids == sorted(set(ids))
        for im in coco["images"]:
            assert im["file_name"] == f"{im['id']:06d}.png" and (im["width"], im["height"]) == (32, 32)
            png = entries[f"digits/images/{split}/{im['file_name']}"]
            with Image.open(io.BytesIO(png)) as decoded:
                assert decoded.mode == "RGB" and decoded.size == (32, 32)
            if split == "val":  # the classification folder holds the same held-out images
                assert entries[f"digits/classification/val/{classnames[im['digit']]}/{im['file_name']}"] == png
        per_image: dict[int, int] = {}
        for ann in coco["annotations"]:
            per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        assert set(per_image) == set(ids) and set(per_image.values()) == {D.CAPTIONS_PER_IMAGE}
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    train_ids = {im["id"] for im in json.loads(entries["digits/annotations/captions_train.json"])["images"]}
    val_ids = {im["id"] for im in json.loads(entries["digits/annotations/captions_val.json"])["images"]}
    assert not train_ids & val_ids


def test_png_encoder_round_trips():
    gray = (np.arange(32 * 24).reshape(24, 32) % 256).astype(np.uint8)
    decoded = D.read_png_bytes(D.encode_png_rgb(gray))
    assert decoded.shape == (24, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_upscale_is_smooth_and_keeps_range():
    image8 = np.zeros((8, 8))
    image8[:, 3:5] = 16  # two columns: samples between their centres are full white
    pixels = D._to_pixels(image8)
    assert pixels.shape == (32, 32) and pixels.max() == 255 and pixels.min() == 0
    assert len(np.unique(pixels)) > 3  # intermediate greys: smooth, not nearest-neighbour
    assert np.all(pixels % D.GRAY_STEP == 0)


def test_stratified_split_fractions():
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    is_val = D.stratified_split(labels, seed=0)
    for cls in range(10):
        n = int((labels == cls).sum())
        assert int(is_val[labels == cls].sum()) == round(0.2 * n)
    assert not np.array_equal(is_val, D.stratified_split(labels, seed=1))


def test_pixel_features_measure_slant_position_ink_and_size():
    def line(top_x: int, bottom_x: int, width: int = 1, x_shift: int = 0, y_range=(4, 28)) -> np.ndarray:
        img = np.zeros((32, 32), np.uint8)
        for y in range(*y_range):
            x = round(top_x + (bottom_x - top_x) * (y - y_range[0]) / (y_range[1] - y_range[0])) + x_shift
            img[y, x:x + width] = 255
        return img

    right = D.pixel_features(line(20, 12))
    upright = D.pixel_features(line(16, 16))
    left = D.pixel_features(line(12, 20))
    assert right["slant"] > 0.2 and left["slant"] < -0.2 and abs(upright["slant"]) < 1e-9
    assert D.pixel_features(line(16, 16, width=3))["ink"] > 2.5 * upright["ink"]
    assert D.pixel_features(line(16, 16, x_shift=-8))["cx"] < upright["cx"] - 7
    assert D.pixel_features(line(16, 16, y_range=(2, 12)))["cy"] < upright["cy"]
    assert D.pixel_features(line(16, 16, y_range=(12, 20)))["extent"] < upright["extent"]


def test_attribute_labels_use_class_wise_quantiles():
    # Class 0 features 0..8, class 1 features 100..108: the same bins within each class.
    feats = [{"ink": float(v), "slant": float(v), "cx": float(v), "cy": float(v), "extent": float(v)}
             for v in list(range(9)) + list(range(100, 109))]
    labels = np.array([0] * 9 + [1] * 9)
    out = D.attribute_labels(feats, labels)
    thickness = [o["thickness"] for o in out]
    assert thickness[:9] == ["thin"] * 3 + ["regular"] * 3 + ["thick"] * 3
    assert thickness[9:] == thickness[:9]
    assert [o["vpos"] for o in out[:9]] == ["high"] * 5 + ["low"] * 4
    assert [o["slant"] for o in out[:9]] == ["left"] * 3 + ["upright"] * 3 + ["right"] * 3


def _vocabulary() -> list[tuple[str, str, str]]:
    """(attribute, value, phrase) for every word choice the captions can use."""
    vocab = [(a, v, p) for (a, v), ps in D._PHRASES.items() for p in ps]
    vocab += [(a, v, p) for (a, v), ps in D._ADJECTIVES.items() for p in ps]
    for vert in ("high", "low"):
        for horiz in ("left", "centre", "right"):
            v, h = D._CORNER_WORDS[vert], D._CORNER_WORDS[horiz]
            for phrase in (f"in the {v} {h} of the frame", f"toward the {v} {h}"):
                vocab += [("vpos", vert, phrase), ("hpos", horiz, phrase)]
    return vocab


def test_captions_are_truthful_and_cover_every_attribute(digits_small_zip):
    vocab = _vocabulary()
    entries = zip_entries(digits_small_zip)
    for split in ("train", "val"):
        coco = json.loads(entries[f"digits/annotations/captions_{split}.json"])
        captions: dict[int, list[str]] = {}
        for ann in coco["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
        for im in coco["images"]:
            digit, attrs = im["digit"], im["attributes"]
            mentioned: set[str] = set()
            for caption in captions[im["id"]]:
                assert re.search(rf"\b({digit}|{D.CLASSNAMES[digit]})\b", caption), caption
                others = [str(d) for d in range(10) if d != digit] + [w for w in D.CLASSNAMES if w != D.CLASSNAMES[digit]]
                assert not any(re.search(rf"\b{o}\b", caption) for o in others), caption
                for attribute, value, phrase in vocab:
                    if re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", caption):
                        assert attrs[attribute] == value, (caption, attribute, attrs)
                        mentioned.add(attribute)
            assert mentioned == set(D.ATTRIBUTES), (captions[im["id"]], mentioned)
            assert len(set(captions[im["id"]])) == D.CAPTIONS_PER_IMAGE


def test_captions_differ_between_images(digits_small_zip):
    coco = json.loads(zip_entries(digits_small_zip)["digits/annotations/captions_val.json"])
    by_image: dict[int, tuple[str, ...]] = {}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]] = by_image.get(ann["image_id"], ()) + (ann["caption"],)
    assert len(set(by_image.values())) == len(by_image)
    all_captions = [c for caps in by_image.values() for c in caps]
    assert len(set(all_captions)) > 0.9 * len(all_captions)


def test_captions_do_not_depend_on_subset():
    attrs = {"thickness": "thick", "slant": "left", "hpos": "centre", "vpos": "low", "size": "small"}
    assert D.make_captions(0, 42, 7, attrs) == D.make_captions(0, 42, 7, attrs)
    assert D.make_captions(0, 42, 7, attrs) != D.make_captions(0, 43, 7, attrs)


def test_bad_builder_arguments():
    with pytest.raises(ParamError, match="limit_per_class must be a positive integer"):
        D.digit_records(0, limit_per_class=0)
    with pytest.raises(ParamError, match="seed must be an integer"):
        D.digit_records("0")


@pytest.mark.skipif(not FIXTURE.is_file(), reason="data/fixtures/digits.zip not built")
def test_committed_fixture_matches_a_fresh_build(tmp_path):
    """The committed zip is what the builder produces (seed 0), and within the size budget."""
    assert FIXTURE.stat().st_size < 2_000_000
    rebuilt = D.build_digits_archive(tmp_path / "digits.zip", seed=0)
    assert hashlib.sha256(rebuilt.read_bytes()).hexdigest() == hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
    entries = zip_entries(FIXTURE)
    train = json.loads(entries["digits/annotations/captions_train.json"])
    val = json.loads(entries["digits/annotations/captions_val.json"])
    assert len(train["images"]) + len(val["images"]) == 1797
    assert len(val["images"]) == 359  # round(0.2 * n) of each class
    assert len(val["annotations"]) == 5 * 359
    classified = [n for n in entries if n.startswith("digits/classification/val/") and n.endswith(".png")]
    assert len(classified) == 359
