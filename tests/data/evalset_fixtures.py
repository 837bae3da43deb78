"""Tiny evaluation sets written in exactly the on-disk formats of CLIP_benchmark (and BLIP's Karpathy JSON).

Images are solid colours, so a hand-made model can embed an image as its mean RGB and every score is known.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipprune.models.base import ClipModel

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def write_image(path: Path, color, fmt: str | None = None) -> Path:
    """An 8x8 solid-colour image (format from the suffix unless ``fmt``)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format=fmt)
    return path


# ---- COCO Karpathy test, CLIP_benchmark layout: mscoco_captions/{coco_test_karpathy.json, val2014/}
COCO_IMAGES = {  # id -> (file name, colour); ids deliberately not in file order
    391895: ("COCO_val2014_000000391895.jpg", RED),
    42: ("COCO_val2014_000000000042.jpg", GREEN),
    60623: ("COCO_val2014_000000060623.jpg", BLUE),
}
COCO_CAPTIONS = [  # (annotation id, image id, caption), in file order (interleaved, one image has 6)
    (770337, 391895, "A man with a red helmet on a small moped on a dirt road."),
    (1, 42, "A green field."),
    (771687, 391895, "Man riding a motor bike on a dirt road on the countryside."),
    (2, 42, "Grass, grass and more grass."),
    (772707, 391895, "A man riding on the back of a motorcycle."),
    (3, 42, "A lawn seen from above."),
    (776154, 391895, "A dirt path with a young person on a motor bike rests to the foreground."),
    (4, 42, "Green."),
    (781998, 391895, "A man in a red shirt and a red hat is on a motorcycle on a hill side."),
    (5, 42, "Some green stuff."),
    (6, 42, "A sixth caption: some images of the split have more than five."),
    (10, 60623, "A blue sky."),
    (11, 60623, "Blue."),
    (12, 60623, "The sea, from far away."),
    (13, 60623, "Deep blue water."),
    (14, 60623, "Something blue."),
]


def write_coco_karpathy(root: Path) -> tuple[Path, Path]:
    """CLIP_benchmark's ``coco_test_karpathy.json`` (COCO captions format) + ``val2014/``; returns (images, json)."""
    images_dir = root / "val2014"
    for file_name, color in COCO_IMAGES.values():
        write_image(images_dir / file_name, color, "JPEG")
    data = {
        "info": {"description": "tiny Karpathy test split"},
        "images": [{"id": i, "file_name": name, "height": 8, "width": 8} for i, (name, _) in COCO_IMAGES.items()],
        "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in COCO_CAPTIONS],
    }
    annotation = root / "coco_test_karpathy.json"
    annotation.write_text(json.dumps(data))
    return images_dir, annotation


def write_blip_coco_karpathy(root: Path) -> tuple[Path, Path]:
    """BLIP / LAVIS ``coco_karpathy_test.json``: a list of {image: "val2014/...", caption: [...]}; (root, json)."""
    for file_name, color in COCO_IMAGES.values():
        write_image(root / "val2014" / file_name, color, "JPEG")
    by_image: dict[int, list[str]] = {}
    for _, image_id, caption in COCO_CAPTIONS:
        by_image.setdefault(image_id, []).append(caption)
    data = [{"image": f"val2014/{COCO_IMAGES[i][0]}", "caption": captions} for i, captions in by_image.items()]
    annotation = root / "coco_karpathy_test.json"
    annotation.write_text(json.dumps(data))
    return root, annotation


# ---- Flickr30k Karpathy test, CLIP_benchmark layout: flickr30k/{flickr30k_test_karpathy.txt, <images>}
FLICKR_LINES = [  # (file, caption): captions may hold commas; images in first-appearance order
    ("1007129816.jpg", "red"),
    ("1007129816.jpg", "reddish, almost blue"),
    ("1009434119.jpg", "green"),
    ("101362133.jpg", "bluish"),
]
FLICKR_COLORS = {"1007129816.jpg": RED, "1009434119.jpg": GREEN, "101362133.jpg": BLUE}


def write_flickr30k_karpathy(root: Path, header: bool = True) -> tuple[Path, Path]:
    """CLIP_benchmark's ``flickr30k_test_karpathy.txt`` (header + ``<file>,<caption>`` lines) next to PNG-coded
    .jpg files (exact colours); returns (images folder, txt)."""
    for name, color in FLICKR_COLORS.items():
        write_image(root / name, color, "PNG")
    lines = (["image,caption"] if header else []) + [f"{name},{caption}" for name, caption in FLICKR_LINES]
    annotation = root / "flickr30k_test_karpathy.txt"
    annotation.write_text("\n".join(lines) + "\n")
    return root, annotation


# ---- ImageNet-style val folder: val/<wnid>/*.JPEG, CLIP_benchmark class names and templates JSON
WNIDS = {"n01484850": BLUE, "n01440764": RED, "n01443537": GREEN}  # sorted: tench, goldfish, great white shark
CLASSNAMES = ["tench", "goldfish", "great white shark"]
TEMPLATES = ["a photo of a {c}.", "a bad photo of the {c}."]


def write_imagenet_val(root: Path, per_class: int = 2) -> tuple[Path, Path, Path]:
    """``val/<wnid>/ILSVRC2012_val_*.JPEG`` plus CLIP_benchmark-keyed JSON files; returns (val, classnames,
    templates). The last image of the shark class is red (one deliberate zero-shot error)."""
    val = root / "val"
    counter = 0
    for wnid, color in WNIDS.items():
        for k in range(per_class):
            counter += 1
            shade = RED if (wnid == "n01484850" and k == per_class - 1) else color
            write_image(val / wnid / f"ILSVRC2012_val_{counter:08d}.JPEG", shade, "JPEG")
    classnames = root / "en_classnames.json"
    classnames.write_text(json.dumps({"cifar10": ["airplane", "automobile"], "imagenet1k": CLASSNAMES}))
    templates = root / "en_zeroshot_classification_templates.json"
    templates.write_text(json.dumps({"cifar10": ["a photo of a {c}."], "imagenet1k": TEMPLATES}))
    return val, classnames, templates


# ---- a CLIP whose scores are known in closed form
TEXT_EMBEDDINGS = {
    "red": [1.0, 0.0, 0.0],
    "reddish, almost blue": [0.6, 0.0, 0.8],   # its own (red) image ranks second
    "green": [0.0, 1.0, 0.0],
    "bluish": [0.7, 0.0, 0.714],               # blue image first, but the blue image prefers "reddish, ..."
}
for _template in TEMPLATES:
    for _name, _axis in zip(CLASSNAMES, ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0])):
        TEXT_EMBEDDINGS[_template.format(c=_name)] = _axis


class ColorClip(ClipModel):
    """encode_image: mean RGB of the image; encode_text: a lookup of known strings (others fail loudly)."""

    family = "fake"
    name = "color"

    def __init__(self, texts: dict[str, list[float]] | None = None):
        texts = TEXT_EMBEDDINGS if texts is None else texts
        self.module = nn.Linear(1, 1)
        self.towers = {}
        self.ids = {text: i for i, text in enumerate(texts)}
        self.table = torch.tensor(list(texts.values()), dtype=torch.float32)
        self.tokenizer = lambda batch: torch.tensor([[self.ids[t]] for t in batch])
        self.preprocess = lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def encode_image(self, images):
        return images.float().mean(dim=(2, 3))

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]
