"""CocoCaptions over the built digits data, and its validation errors."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from clipprune.data.coco import CocoCaptions, collate_image_caption_pairs, collate_image_captions
from clipprune.errors import DataError

from .conftest import SMALL_PER_CLASS


@pytest.fixture
def val(digits_small_root):
    return CocoCaptions(digits_small_root / "images" / "val",
                        digits_small_root / "annotations" / "captions_val.json", transform=ToTensor())


def test_loads_built_digits(val, capsys):
    n = 10 * SMALL_PER_CLASS
    assert len(val) == n
    assert val.image_ids == sorted(val.image_ids)
    assert val.num_pairs == 5 * n
    pairs = val.pairs()
    assert pairs == sorted(pairs) and len(pairs) == 5 * n
    first = val.image_ids[0]
    assert len(val.captions(first)) == 5
    assert val.captions(first) == [val.caption(a) for a in val.annotation_ids(first)]
    image = val.load_image(first)
    assert image.mode == "RGB" and image.size == (32, 32)
    tensor, captions = val[0]
    assert tensor.shape == (3, 32, 32) and captions == val.captions(first)
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are swallowed


def test_captions_differ_between_images(val):
    caption_sets = [tuple(val.captions(i)) for i in val.image_ids]
    assert len(set(caption_sets)) == len(caption_sets)


def test_retrieval_and_pair_batches(val):
    images, captions = next(iter(DataLoader(val, batch_size=4, collate_fn=collate_image_captions)))
    assert images.shape == (4, 3, 32, 32) and [len(c) for c in captions] == [5] * 4
    chosen = val.pairs()[::7][:5]
    pair_ds = val.pair_dataset([{"image_id": i, "annotation_id": a} for i, a in chosen])
    images, texts = next(iter(DataLoader(pair_ds, batch_size=5, collate_fn=collate_image_caption_pairs)))
    assert images.shape == (5, 3, 32, 32)
    assert texts == [val.caption(a) for _, a in chosen]
    assert torch.equal(images[0], val[val.image_ids.index(chosen[0][0])][0])


def test_without_transform_items_are_pil(digits_small_root):
    ds = CocoCaptions(digits_small_root / "images" / "train", digits_small_root / "annotations" / "captions_train.json")
    images, _ = collate_image_captions([ds[0], ds[1]])
    assert isinstance(images, list) and images[0].size == (32, 32)


def test_pair_not_in_dataset(val):
    image_id = val.image_ids[0]
    other_ann = val.annotation_ids(val.image_ids[1])[0]
    with pytest.raises(DataError, match=rf"captions_val\.json: no caption {other_ann} for image {image_id}"):
        val.pair_dataset([(image_id, other_ann)])


# ---------------------------------------------------------------- malformed annotation files

@pytest.fixture
def coco_json(digits_small_root):
    return json.loads((digits_small_root / "annotations" / "captions_val.json").read_text())


def write(tmp_path, obj, name="captions.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_malformed_json(tmp_path, digits_small_root):
    path = write(tmp_path, '{"images": [', "broken.json")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        CocoCaptions(digits_small_root / "images" / "val", path)


def test_missing_annotation_file(tmp_path, digits_small_root):
    with pytest.raises(DataError, match=r"absent\.json: annotation file not found"):
        CocoCaptions(digits_small_root / "images" / "val", tmp_path / "absent.json")


def test_missing_images_dir(tmp_path, digits_small_root):
    with pytest.raises(DataError, match=r"nodir: images directory not found"):
        CocoCaptions(tmp_path / "nodir", digits_small_root / "annotations" / "captions_val.json")


@pytest.mark.parametrize("where,key", [
    (None, "images"), (None, "annotations"),
    ("images", "id"), ("images", "file_name"),
    ("annotations", "id"), ("annotations", "image_id"), ("annotations", "caption"),
])
def test_missing_keys(tmp_path, digits_small_root, coco_json, where, key):
    broken = copy.deepcopy(coco_json)
    if where is None:
        del broken[key]
    else:
        del broken[where][0][key]
    path = write(tmp_path, broken, "missing.json")
    with pytest.raises(DataError) as err:
        CocoCaptions(digits_small_root / "images" / "val", path)
    assert "missing.json" in str(err.value) and f"'{key}'" in str(err.value)


def test_wrong_types_and_references(tmp_path, digits_small_root, coco_json):
    images_dir = digits_small_root / "images" / "val"
    cases = []
    bad = copy.deepcopy(coco_json)
    bad["annotations"][0]["image_id"] = 999_999
    cases.append((bad, "refers to unknown image_id 999999"))
    bad = copy.deepcopy(coco_json)
    bad["images"].append(dict(bad["images"][0]))
    cases.append((bad, "duplicate image id"))
    bad = copy.deepcopy(coco_json)
    bad["annotations"][1]["id"] = bad["annotations"][0]["id"]
    cases.append((bad, "duplicate annotation id"))
    bad = copy.deepcopy(coco_json)
    bad["annotations"][0]["caption"] = 5
    cases.append((bad, r"annotations\[0\]\.caption must be a string"))
    cases.append(([1, 2], "expected a JSON object"))
    for obj, message in cases:
        with pytest.raises(DataError, match=rf"bad\.json: .*{message}"):
            CocoCaptions(images_dir, write(tmp_path, obj, "bad.json"))


def test_missing_and_unreadable_image(tmp_path, digits_small_root):
    images_dir = tmp_path / "images"
    shutil.copytree(digits_small_root / "images" / "val", images_dir)
    ds = CocoCaptions(images_dir, digits_small_root / "annotations" / "captions_val.json")
    gone, corrupt = ds.image_ids[0], ds.image_ids[1]
    ds.image_path(gone).unlink()
    ds.image_path(corrupt).write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{ds.image_path(gone).name}: image file not found"):
        ds.load_image(gone)
    with pytest.raises(DataError, match=rf"{ds.image_path(corrupt).name}: cannot read image"):
        ds[1]
    with pytest.raises(DataError, match="no image with id 424242"):
        ds.load_image(424242)
