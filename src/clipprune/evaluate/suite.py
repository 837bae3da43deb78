"""The evaluate stage's measurements for one model: zero-shot, retrieval, complexity, latency."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ..data.coco import CocoCaptions, collate_image_captions
from ..data.imagefolder import ImageFolderClassification, load_classnames, load_templates
from ..models.base import ClipModel
from .complexity import model_complexity
from .latency import measure_latency
from .retrieval import evaluate_retrieval
from .zeroshot import zero_shot_classification


@dataclass(frozen=True)
class EvalData:
    """Where the evaluation data lives (paths already resolved against the raw-data folder)."""

    retrieval_images: Path
    retrieval_captions: Path
    classification: Path | None = None
    classnames: Path | None = None
    templates: Path | None = None
    max_retrieval_images: int | None = None


def _loader(dataset, batch_size: int, collate=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)


def evaluate_model(model: ClipModel, data: EvalData, *, batch_size: int = 128, latency_batch: int = 32,
                   latency_warmup: int = 3, latency_repeats: int = 10, seed: int = 0,
                   progress: bool = True) -> dict:
    """All metrics of one model as a nested dict (fractions in [0, 1], GMACs, parameter counts, ms)."""
    model.eval()
    metrics: dict = {}
    if data.classification is not None:
        classnames = load_classnames(data.classnames)
        templates = load_templates(data.templates)
        folder = ImageFolderClassification(data.classification, classnames, transform=model.preprocess)
        metrics["zeroshot"] = zero_shot_classification(model, _loader(folder, batch_size), classnames, templates,
                                                       batch_size=batch_size, progress=progress)
    captions = CocoCaptions(data.retrieval_images, data.retrieval_captions, transform=model.preprocess)
    subset = captions if data.max_retrieval_images is None else Subset(
        captions, range(min(data.max_retrieval_images, len(captions))))
    metrics["retrieval"] = evaluate_retrieval(model, _loader(subset, batch_size, collate_image_captions),
                                              batch_size=batch_size, progress=progress)

    complexity = model_complexity(model)
    metrics["complexity"] = {
        "gmacs": complexity["total_gmacs"],
        "prunable_gmacs": complexity["prunable_gmacs"],
        "params": complexity["params"],
        **{f"{name}_{key}": value for name, tower in complexity["towers"].items()
           for key, value in tower.items() if key in ("prunable_gmacs", "total_gmacs", "params")},
    }
    metrics["latency_ms"] = measure_model_latency(model, latency_batch, latency_warmup, latency_repeats, seed)
    return metrics


def measure_model_latency(model: ClipModel, batch_size: int, warmup: int, repeats: int, seed: int) -> dict:
    """Median wall time of encoding a batch of random images and of random-token texts (ms)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, model.image_size, model.image_size, generator=gen).to(device)
    tokens = model.tokenizer(["a photo of a thing"] * batch_size).to(device)
    return {
        "image_batch": 1000 * measure_latency(lambda: model.encode_image(images), warmup, repeats),
        "text_batch": 1000 * measure_latency(lambda: model.encode_text(tokens), warmup, repeats),
    }
