"""COCO / Flickr30k Karpathy retrieval sets in CLIP_benchmark's formats, on tiny fixtures written in tmp_path."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from clipprune.data.coco import collate_image_captions
from clipprune.data.karpathy import (CaptionedImages, coco_karpathy, flickr30k_karpathy,
                                     load_caption_annotations)
from clipprune.errors import DataError
from clipprune.evaluate.retrieval import evaluate_retrieval, retrieval_metrics

from .evalset_fixtures import (COCO_CAPTIONS, COCO_IMAGES, FLICKR_LINES, TEXT_EMBEDDINGS, ColorClip,
                               write_blip_coco_karpathy, write_coco_karpathy, write_flickr30k_karpathy,
                               write_image)


def expected_coco_entries():
    """Images by ascending id (torchvision CocoCaptions order), captions in file order."""
    return [(COCO_IMAGES[i][0], [c for _, owner, c in COCO_CAPTIONS if owner == i]) for i in sorted(COCO_IMAGES)]


def test_coco_karpathy_clip_benchmark_json(tmp_path):
    images_dir, annotation = write_coco_karpathy(tmp_path / "mscoco_captions")
    dataset = coco_karpathy(images_dir, annotation)
    assert dataset.entries == expected_coco_entries()
    assert len(dataset) == 3 and dataset.num_captions == len(COCO_CAPTIONS) == 16
    assert [len(c) for _, c in dataset.entries] == [6, 5, 5]  # id 42 has a sixth caption
    image, captions = dataset[0]
    assert image.mode == "RGB" and image.size == (8, 8)
    assert captions == ["A green field.", "Grass, grass and more grass.", "A lawn seen from above.", "Green.",
                        "Some green stuff.", "A sixth caption: some images of the split have more than five."]
    assert dataset.image_path(0) == images_dir / "COCO_val2014_000000000042.jpg"


def test_blip_list_json_gives_the_same_set(tmp_path):
    root, annotation = write_blip_coco_karpathy(tmp_path / "coco")
    dataset = coco_karpathy(root, annotation)
    # the list keeps the file's image order (391895 first); paths carry the val2014/ prefix
    by_name = {name.split("/")[-1]: captions for name, captions in dataset.entries}
    assert by_name == dict(expected_coco_entries())
    assert dataset.entries[0][0] == "val2014/COCO_val2014_000000391895.jpg"


def test_list_json_merges_one_caption_entries(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name, (1, 2, 3), "PNG")
    annotation = tmp_path / "train_style.json"
    annotation.write_text(json.dumps([{"image": "b.jpg", "caption": "b one", "image_id": "b"},
                                      {"image": "a.jpg", "caption": "a one", "image_id": "a"},
                                      {"image": "b.jpg", "caption": ["b two", "b three"], "image_id": "b"}]))
    assert load_caption_annotations(annotation) == [("b.jpg", ["b one", "b two", "b three"]), ("a.jpg", ["a one"])]


@pytest.mark.parametrize("header", [True, False])
def test_flickr30k_clip_benchmark_txt(tmp_path, header):
    images_dir, annotation = write_flickr30k_karpathy(tmp_path / "flickr30k", header=header)
    dataset = flickr30k_karpathy(images_dir, annotation)
    assert dataset.entries == [("1007129816.jpg", ["red", "reddish, almost blue"]),
                               ("1009434119.jpg", ["green"]), ("101362133.jpg", ["bluish"])]
    assert dataset.num_captions == len(FLICKR_LINES)


def test_text_caption_is_split_at_the_first_image_suffix(tmp_path):
    write_image(tmp_path / "x.jpg", (0, 0, 0), "PNG")
    annotation = tmp_path / "captions.txt"
    annotation.write_text("image,caption\nx.jpg,a photo named y.jpg, with commas, too \n\n")
    assert load_caption_annotations(annotation) == [("x.jpg", ["a photo named y.jpg, with commas, too"])]


def test_items_batch_like_coco_and_transform_applies(tmp_path):
    images_dir, annotation = write_flickr30k_karpathy(tmp_path)
    model = ColorClip()
    dataset = CaptionedImages.from_annotations(images_dir, annotation, transform=model.preprocess)
    images, captions = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_image_captions)))
    assert images.shape == (2, 3, 8, 8)
    assert captions == [["red", "reddish, almost blue"], ["green"]]
    assert torch.allclose(images[0].mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]))


def test_retrieval_recalls_on_a_hand_made_model(tmp_path):
    """Scores are known: red image <- "red" (1.0), "reddish, almost blue" (0.6, but blue scores 0.8); the blue
    image prefers "reddish, almost blue" (0.8) to its own "bluish" (0.714)."""
    images_dir, annotation = write_flickr30k_karpathy(tmp_path)
    dataset = flickr30k_karpathy(images_dir, annotation)
    metrics = evaluate_retrieval(ColorClip(), dataset, batch_size=2, progress=False)
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 4)   # text -> image
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)    # image -> text
    assert metrics["image_retrieval_recall@5"] == metrics["text_retrieval_recall@10"] == 1.0
    # the same numbers from the known embeddings directly
    texts = torch.tensor([TEXT_EMBEDDINGS[c] for _, cs in dataset.entries for c in cs])
    owner = [i for i, (_, cs) in enumerate(dataset.entries) for _ in cs]
    assert metrics == retrieval_metrics(torch.eye(3), texts, owner)


# ---------------------------------------------------------------- bad input: one line naming file and problem

def coco_json(tmp_path, data) -> tuple:
    images_dir, _ = write_coco_karpathy(tmp_path)
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return images_dir, path


@pytest.mark.parametrize("content, message", [
    ({"images": []}, "missing key 'annotations'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}, r"image id 1 \(a.jpg\) has no caption"),
    ({"images": [{"id": 1}], "annotations": []}, r"images\[0\] is missing key 'file_name'"),
    ([{"image": "a.jpg", "caption": ["x"]}, {"image": "b.jpg"}], r"\[1\] is missing key 'caption'"),
    ([{"caption": ["x"]}], r"\[0\] is missing key 'image'"),
    ([{"image": "a.jpg", "caption": []}], r"\[0\]\.caption must be a caption string or a non-empty list"),
    ([{"image": "a.jpg", "caption": ["ok", " "]}], r"\[0\]\.caption\[1\] must be a non-empty string"),
    ([{"image": 7, "caption": ["x"]}], r"\[0\]\.image must be a non-empty string"),
    ([], "no captioned images"),
    ("3", "expected a COCO captions object or a list"),
    ("{not json", "not valid JSON"),
])
def test_bad_json_annotations(tmp_path, content, message):
    images_dir, path = coco_json(tmp_path, content)
    with pytest.raises(DataError, match=rf"bad\.json: .*{message}") as info:
        coco_karpathy(images_dir, path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("image,caption\nx.jpg,fine\nno image suffix here\n", "line 3: expected '<image file>.jpg,<caption>'"),
    ("image,caption\nx.jpg,   \n", "line 2: empty caption for x.jpg"),
    ("image,caption\n", "no captioned images"),
    ("", "no captioned images"),
])
def test_bad_text_annotations(tmp_path, text, message):
    write_image(tmp_path / "x.jpg", (0, 0, 0), "PNG")
    path = tmp_path / "flickr30k_test_karpathy.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"flickr30k_test_karpathy\.txt: {message}") as info:
        flickr30k_karpathy(tmp_path, path)
    assert "\n" not in str(info.value)


def test_missing_images_are_found_before_any_encoding(tmp_path):
    images_dir, annotation = write_coco_karpathy(tmp_path)
    (images_dir / "COCO_val2014_000000060623.jpg").unlink()
    with pytest.raises(DataError, match=r"val2014/COCO_val2014_000000060623\.jpg: image file not found "
                                        r"\(1 of 3 images named in .*coco_test_karpathy\.json are missing"):
        coco_karpathy(images_dir, annotation)
    # BLIP paths are relative to the COCO root: pointing at val2014/ itself misses every image
    root, blip = write_blip_coco_karpathy(tmp_path / "blip")
    with pytest.raises(DataError, match=r"3 of 3 images"):
        coco_karpathy(root / "val2014", blip)


def test_other_file_errors(tmp_path):
    images_dir, annotation = write_coco_karpathy(tmp_path)
    with pytest.raises(DataError, match=r"nope\.json: annotation file not found"):
        coco_karpathy(images_dir, tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"nowhere: images directory not found"):
        coco_karpathy(tmp_path / "nowhere", annotation)
    xml = tmp_path / "captions.xml"
    xml.write_text("<x/>")
    with pytest.raises(DataError, match=r"captions\.xml: expected a \.json .* or \.txt"):
        coco_karpathy(images_dir, xml)
    escape = tmp_path / "escape.json"
    escape.write_text(json.dumps([{"image": "../secret.jpg", "caption": "x"}]))
    with pytest.raises(DataError, match=r"escape\.json: image path '\.\./secret\.jpg' must be relative"):
        coco_karpathy(images_dir, escape)


def test_unreadable_image_names_the_file(tmp_path):
    images_dir, annotation = write_flickr30k_karpathy(tmp_path)
    (images_dir / "1009434119.jpg").write_bytes(b"not an image")
    dataset = flickr30k_karpathy(images_dir, annotation)
    with pytest.raises(DataError, match=r"1009434119\.jpg: cannot read image"):
        dataset[1]
