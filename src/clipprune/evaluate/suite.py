"""The evaluate stage's measurements for one model: zero-shot, retrieval, complexity, latency."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset

from ..data.coco import CocoCaptions, collate_image_captions
from ..data.evalsets import EvalDataset
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


def eval_data_from_params(params: dict) -> EvalData:
    """The evaluation splits that params.yaml names (``data.*`` and ``evaluate.*``), paths under data/raw/."""
    from ..data.sources import check_dataset_name
    from ..params import get, get_int, get_str

    root = Path("data/raw") / check_dataset_name(get_str(params, "data.name"))
    split = get_str(params, "evaluate.retrieval_split", choices=["train", "val"])
    classification = get(params, "data.layout.classification", default=None)
    max_images = get(params, "evaluate.max_retrieval_images", default=None)
    if max_images is not None:
        max_images = get_int(params, "evaluate.max_retrieval_images", min_value=1)
    return EvalData(
        retrieval_images=root / get_str(params, f"data.layout.{split}_images"),
        retrieval_captions=root / get_str(params, f"data.layout.{split}_captions"),
        classification=None if classification is None else root / get_str(params, "data.layout.classification"),
        classnames=None if classification is None else root / get_str(params, "data.layout.classnames"),
        templates=None if classification is None else root / get_str(params, "data.layout.templates"),
        max_retrieval_images=max_images,
    )


def _loader(dataset, batch_size: int, collate=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)


def accuracy_metrics(model: ClipModel, data: EvalData, *, batch_size: int = 128, progress: bool = True) -> dict:
    """Zero-shot classification (when the data has a classification split) and image<->text retrieval."""
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
    return metrics


def dataset_metrics(model: ClipModel, datasets: Sequence[EvalDataset], *, batch_size: int = 128,
                    progress: bool = True) -> dict:
    """Metrics on each extra evaluation dataset, keyed by its name.

    Classification sets give ``{"zeroshot": {...}, "num_images"}``, retrieval sets ``{"retrieval": {...},
    "num_images", "num_captions"}``; the datasets yield PIL images and ``model.preprocess`` is applied here.
    """
    def preprocess_images(batch):
        images, targets = zip(*batch)
        return torch.stack([model.preprocess(image) for image in images]), list(targets)

    metrics: dict = {}
    for evalset in datasets:
        loader = DataLoader(evalset.dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                            collate_fn=preprocess_images)
        if evalset.spec.task == "zeroshot":
            result = zero_shot_classification(model, loader, evalset.classnames, evalset.templates,
                                              batch_size=batch_size, progress=progress)
            metrics[evalset.name] = {"zeroshot": result, "num_images": len(evalset.dataset)}
        else:
            result = evaluate_retrieval(model, loader, batch_size=batch_size, progress=progress)
            metrics[evalset.name] = {"retrieval": result, "num_images": len(evalset.dataset),
                                     "num_captions": evalset.num_captions}
    return metrics


def evaluate_model(model: ClipModel, data: EvalData, *, batch_size: int = 128, latency_batch: int = 32,
                   latency_warmup: int = 3, latency_repeats: int = 10, seed: int = 0,
                   progress: bool = True, datasets: Sequence[EvalDataset] = ()) -> dict:
    """All metrics of one model as a nested dict (fractions in [0, 1], GMACs, parameter counts, ms).

    ``datasets`` (extra evaluation sets, ``evaluate.datasets``) add ``metrics["datasets"][name]``.
    """
    model.eval()
    metrics = accuracy_metrics(model, data, batch_size=batch_size, progress=progress)
    if datasets:
        metrics["datasets"] = dataset_metrics(model, datasets, batch_size=batch_size, progress=progress)
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


def evaluate_masked(model: ClipModel, masks: dict, data: EvalData, *, batch_size: int = 128,
                    progress: bool = True) -> dict:
    """:func:`accuracy_metrics` of ``model`` with ``masks`` applied by hooks (no physical pruning)."""
    from ..models.masks import apply_masks

    model.eval()
    with apply_masks(model, masks):
        return accuracy_metrics(model, data, batch_size=batch_size, progress=progress)


def compare_latency(pruned: ClipModel, dense: ClipModel, batch_size: int, warmup: int, repeats: int,
                    seed: int) -> dict:
    """Pruned / dense latency ratios of image and text encoding, measured interleaved in one run."""
    from .latency import latency_ratio

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, dense.image_size, dense.image_size, generator=gen)
    tokens = dense.tokenizer(["a photo of a thing"] * batch_size)
    image = latency_ratio(lambda: pruned.encode_image(images), lambda: dense.encode_image(images), warmup, repeats)
    text = latency_ratio(lambda: pruned.encode_text(tokens), lambda: dense.encode_text(tokens), warmup, repeats)
    return {"image": image["ratio"], "text": text["ratio"]}


def pruning_report(dense: ClipModel, dense_metrics: dict, pruned_dir: Path, mask_files: dict[str, Path],
                   timing_files: dict[str, Path], data: EvalData, *, batch_size: int = 128, latency_batch: int = 32,
                   latency_warmup: int = 3, latency_repeats: int = 10, seed: int = 0,
                   progress: bool = True, datasets: Sequence[EvalDataset] = ()) -> dict:
    """The pruned model next to the dense one.

    Returns ``pruned`` (all of :func:`evaluate_model` plus kept MAC fraction of the searched towers,
    params ratio, latency ratios pruned/dense measured interleaved, file size), ``dense_file_mb`` (the
    dense model exported in the same format), ``steps`` (accuracy of the dense model masked by each
    step's masks: search, rearranged, tuned) and ``pruning_time_s`` (wall time of each pruning stage, read
    from ``timing_files``: JSON files with a ``wall_time_s`` key). ``datasets`` (extra evaluation sets) are
    evaluated on the pruned model only, not on the masked steps.
    """
    import tempfile

    from ..export import export_pruned, load_pruned
    from ..models.masks import load_masks
    import json
    from .complexity import file_size_mb, tower_complexity

    pruned = load_pruned(pruned_dir)
    report = {"pruned": evaluate_model(pruned, data, batch_size=batch_size, latency_batch=latency_batch,
                                       latency_warmup=latency_warmup, latency_repeats=latency_repeats, seed=seed,
                                       progress=progress, datasets=datasets)}
    metas = {step: load_masks(path, with_metadata=True)[1] for step, path in mask_files.items()}
    searched = sorted(metas["search"]["summary"]["towers"])
    dense_gmacs = sum(tower_complexity(dense, t)["prunable_gmacs"] for t in searched)
    pruned_gmacs = sum(tower_complexity(pruned, t)["prunable_gmacs"] for t in searched)
    report["pruned"]["kept_mac_fraction"] = pruned_gmacs / dense_gmacs
    report["pruned"]["params_ratio"] = report["pruned"]["complexity"]["params"] / dense_metrics["complexity"]["params"]
    report["pruned"]["latency_ratio"] = compare_latency(pruned, dense, latency_batch, latency_warmup,
                                                        latency_repeats, seed)
    report["pruned"]["file_mb"] = file_size_mb(pruned_dir)
    with tempfile.TemporaryDirectory() as tmp:
        report["dense_file_mb"] = file_size_mb(export_pruned(dense, None, Path(tmp) / "dense"))
    report["steps"] = {step: evaluate_masked(dense, load_masks(path), data, batch_size=batch_size,
                                             progress=progress)
                       for step, path in mask_files.items()}
    times = {step: json.loads(Path(path).read_text())["wall_time_s"]
             for step, path in timing_files.items() if Path(path).is_file()}
    # total: the pruning itself (score, search, tune); distillation is training and is listed on its own
    report["pruning_time_s"] = {**times, "total": sum(t for step, t in times.items() if step != "distill")}
    return report


def summary_metrics(metrics: dict, method: str, constraint: float | None) -> dict:
    """One flat block of the figures that compare runs (``dvc exp show`` columns ``summary.*``).

    ``metrics`` is the evaluate stage's nested dict (``dense`` and, after pruning, ``pruned``: the final
    model, after distillation when that ran, with ``before_distill`` accuracy). Percentages
    are 0-100; ``params_m`` in millions; ratios pruned / dense. Keys whose source is missing (no zero-shot
    split, no pruned model) are left out rather than guessed.
    """
    def pct(value):
        return None if value is None else 100.0 * value

    dense, pruned = metrics.get("dense", {}), metrics.get("pruned")
    final = pruned if pruned is not None else dense
    summary = {
        "method": method,
        "constraint": constraint,
        "mac_pct": pct(pruned.get("kept_mac_fraction")) if pruned is not None else 100.0,
        "params_m": final.get("complexity", {}).get("params", 0) / 1e6,
        "params_pct": pct(pruned.get("params_ratio")) if pruned is not None else 100.0,
        "top1": pct(final.get("zeroshot", {}).get("acc1")),
        "top1_before_distill": pct(final.get("before_distill", {}).get("zeroshot", {}).get("acc1")),
        "dense_top1": pct(dense.get("zeroshot", {}).get("acc1")),
        "r1_t2i": pct(final.get("retrieval", {}).get("image_retrieval_recall@1")),
        "r1_i2t": pct(final.get("retrieval", {}).get("text_retrieval_recall@1")),
        "latency_ratio": (pruned.get("latency_ratio", {}).get("image") if pruned is not None else 1.0),
        "pruning_time_s": metrics.get("pruning_time_s", {}).get("total"),
    }
    return {key: value for key, value in summary.items() if value is not None}
