"""Helpers for the scoring tests: calibration batches for the tiny models, a tiny captions dataset on disk."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from models import OPEN_CLIP_CFG, sample_inputs  # tests/ is on sys.path (rootdir-relative test packages)

# The tiny open_clip config with open_clip's real vocabulary, so its bundled tokenizer can be used on text.
TOKENIZER_CFG = copy.deepcopy(OPEN_CLIP_CFG)
TOKENIZER_CFG["text_cfg"]["vocab_size"] = 49408


def batches(model, sizes=(3, 3, 2), seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, token ids) batches of the given sizes (random inputs; tokens end with the EOT id)."""
    images, tokens = sample_inputs(model, batch=sum(sizes), seed=seed)
    out, start = [], 0
    for size in sizes:
        out.append((images[start:start + size], tokens[start:start + size]))
        start += size
    return out


def write_captions_dataset(root: Path, num_images: int = 6, captions_per_image: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """A COCO-captions split of random-colour PNGs under ``root``; returns (images dir, captions JSON)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    words = ["red", "green", "blue", "small", "large", "thin", "bold", "digit"]
    for image_id in range(1, num_images + 1):
        pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        name = f"{image_id:04d}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": 12, "height": 12})
        for k in range(captions_per_image):
            caption = " ".join(rng.choice(words, size=3).tolist())
            annotations.append({"id": 100 * image_id + k, "image_id": image_id, "caption": f"a {caption}"})
    captions = root / "captions_train.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    return images_dir, captions


def write_fixture_model(directory: Path, seed: int = 0) -> None:
    """A random tiny open_clip model saved in the fixture layout (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    from models import IMAGE_MEAN, IMAGE_STD, random_open_clip_module

    module = random_open_clip_module(seed, TOKENIZER_CFG)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"family": "open_clip", "model_cfg": TOKENIZER_CFG, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(directory / "model.safetensors"))
