"""The evaluate stages' measurements: zero-shot, retrieval, complexity, latency.

``evaluate_dense`` evaluates the dense model once (cached by the evaluate_dense stage, ``dense.py``);
``evaluation_report`` puts the final model, the exported model, the per-step masks and the latency ratio
next to it, reusing the dense text embeddings wherever the text tower is unchanged (``embeddings.py``).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset

from ..distributed import current
from ..data.coco import CocoCaptions, collate_image_captions
from ..data.evalsets import EvalDataset
from ..data.imagefolder import ImageFolderClassification, load_classnames, load_templates
from ..models.base import ClipModel
from .complexity import model_complexity
from .dense import DenseEvaluation
from .embeddings import TextEmbeddings, TextEncoder, reallocate_tensors, text_tower_fingerprint
from .latency import measure_latency
from .retrieval import evaluate_retrieval
from .zeroshot import model_device, zero_shot_classification


@dataclass(frozen=True)
class EvalData:
    """Where the evaluation data lives (paths as the caller resolved them)."""

    retrieval_images: Path
    retrieval_captions: Path
    classification: Path | None = None
    classnames: Path | None = None
    templates: Path | None = None
    max_retrieval_images: int | None = None


def evaluate_dense(model: ClipModel, data: EvalData, *, inputs: dict, batch_size: int = 128,
                   datasets: Sequence[EvalDataset] = (), progress: bool = True) -> DenseEvaluation:
    """The dense model's cached evaluation: :func:`model_metrics`, its file size in the export format and
    its class and caption embeddings (for the models evaluated next to it); ``inputs`` is recorded with it."""
    import tempfile

    from ..models.pruned import export_pruned
    from .complexity import file_size_mb

    reallocate_tensors(model.eval())  # as evaluation_report does: the fingerprint sees flags and alignment
    text = TextEncoder(model, batch_size)
    metrics = model_metrics(model, data, batch_size=batch_size, progress=progress, datasets=datasets,
                            label="dense", text=text)
    with tempfile.TemporaryDirectory() as tmp:
        file_mb = file_size_mb(export_pruned(model, None, Path(tmp) / "dense"))
    return DenseEvaluation(inputs, metrics, file_mb, text.embeddings())


def _loader(dataset, batch_size: int, collate=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)


def accuracy_metrics(model: ClipModel, data: EvalData, *, batch_size: int = 128, progress: bool = True,
                     label: str = "model", text: TextEncoder | None = None) -> dict:
    """Zero-shot classification (when the data has a classification split) and image<->text retrieval.

    ``label`` names the model on the progress bars ("dense zero-shot", "tuned masks retrieval images").
    ``text`` supplies the class and caption embeddings (keys ``zeroshot`` and ``retrieval``); by default a
    fresh :class:`TextEncoder` encodes them.
    """
    text = text if text is not None else TextEncoder(model, batch_size)
    metrics: dict = {}
    if data.classification is not None:
        classnames = load_classnames(data.classnames)
        templates = load_templates(data.templates)
        folder = ImageFolderClassification(data.classification, classnames, transform=model.preprocess)
        classifier = text.classifier("zeroshot", classnames, templates, progress, f"{label} zero-shot classifier")
        metrics["zeroshot"] = zero_shot_classification(model, _loader(folder, batch_size), classnames, templates,
                                                       batch_size=batch_size, classifier=classifier,
                                                       progress=progress, desc=f"{label} zero-shot")
    captions = CocoCaptions(data.retrieval_images, data.retrieval_captions, transform=model.preprocess)
    subset = captions if data.max_retrieval_images is None else Subset(
        captions, range(min(data.max_retrieval_images, len(captions))))
    metrics["retrieval"] = evaluate_retrieval(
        model, _loader(subset, batch_size, collate_image_captions), batch_size=batch_size, progress=progress,
        desc=f"{label} retrieval",
        encode_captions=lambda texts: text.captions("retrieval", texts, progress, f"{label} retrieval captions"))
    return metrics


def dataset_metrics(model: ClipModel, datasets: Sequence[EvalDataset], *, batch_size: int = 128,
                    progress: bool = True, label: str = "model", text: TextEncoder | None = None) -> dict:
    """Metrics on each extra evaluation dataset, keyed by its name.

    Classification sets give ``{"zeroshot": {...}, "num_images"}``, retrieval sets ``{"retrieval": {...},
    "num_images", "num_captions"}``; the datasets yield PIL images and ``model.preprocess`` is applied here.
    Text embeddings come from ``text`` under the keys ``datasets.<name>``.
    """
    text = text if text is not None else TextEncoder(model, batch_size)

    def preprocess_images(batch):
        images, targets = zip(*batch)
        return torch.stack([model.preprocess(image) for image in images]), list(targets)

    metrics: dict = {}
    for evalset in datasets:
        loader = DataLoader(evalset.dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                            collate_fn=preprocess_images)
        key, desc = f"datasets.{evalset.name}", f"{label} {evalset.name}"
        if evalset.spec.task == "zeroshot":
            classifier = text.classifier(key, evalset.classnames, evalset.templates, progress,
                                         f"{desc} zero-shot classifier")
            result = zero_shot_classification(model, loader, evalset.classnames, evalset.templates,
                                              batch_size=batch_size, classifier=classifier, progress=progress,
                                              desc=f"{desc} zero-shot")
            metrics[evalset.name] = {"zeroshot": result, "num_images": len(evalset.dataset)}
        else:
            result = evaluate_retrieval(
                model, loader, batch_size=batch_size, progress=progress, desc=f"{desc} retrieval",
                encode_captions=lambda texts: text.captions(key, texts, progress, f"{desc} retrieval captions"))
            metrics[evalset.name] = {"retrieval": result, "num_images": len(evalset.dataset),
                                     "num_captions": evalset.num_captions}
    return metrics


def complexity_metrics(model: ClipModel) -> dict:
    """GMACs (whole model, prunable) and parameters, in total and per tower (``<tower>_<key>``)."""
    complexity = model_complexity(model)
    return {
        "gmacs": complexity["total_gmacs"],
        "prunable_gmacs": complexity["prunable_gmacs"],
        "params": complexity["params"],
        **{f"{name}_{key}": value for name, tower in complexity["towers"].items()
           for key, value in tower.items() if key in ("prunable_gmacs", "total_gmacs", "params")},
    }


def model_metrics(model: ClipModel, data: EvalData, *, batch_size: int = 128, progress: bool = True,
                  datasets: Sequence[EvalDataset] = (), label: str = "model",
                  text: TextEncoder | None = None) -> dict:
    """Accuracy (:func:`accuracy_metrics`, plus ``datasets`` when extra sets are given) and complexity.

    Everything but latency: these figures are deterministic, so the dense model's can be cached.
    """
    model.eval()
    text = text if text is not None else TextEncoder(model, batch_size)
    metrics = accuracy_metrics(model, data, batch_size=batch_size, progress=progress, label=label, text=text)
    if datasets:
        metrics["datasets"] = dataset_metrics(model, datasets, batch_size=batch_size, progress=progress,
                                              label=label, text=text)
    metrics["complexity"] = complexity_metrics(model)
    return metrics


def evaluate_model(model: ClipModel, data: EvalData, *, batch_size: int = 128, latency_batch: int = 32,
                   latency_warmup: int = 3, latency_repeats: int = 10, seed: int = 0,
                   progress: bool = True, datasets: Sequence[EvalDataset] = (), label: str = "model") -> dict:
    """All metrics of one model on its own: :func:`model_metrics` plus ``latency_ms``."""
    metrics = model_metrics(model, data, batch_size=batch_size, progress=progress, datasets=datasets, label=label)
    metrics["latency_ms"] = measure_model_latency(model, latency_batch, latency_warmup, latency_repeats, seed)
    return metrics


def _latency_inputs(model: ClipModel, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random images and of one tokenized prompt, on the model's device (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    images = torch.randn(batch_size, 3, model.image_size, model.image_size, generator=gen).to(device)
    tokens = model.tokenizer(["a photo of a thing"] * batch_size).to(device)
    return images, tokens


def measure_model_latency(model: ClipModel, batch_size: int, warmup: int, repeats: int, seed: int) -> dict:
    """Median wall time of encoding a batch of random images and of random-token texts (ms)."""
    images, tokens = _latency_inputs(model, batch_size, seed)
    return {
        "image_batch": 1000 * measure_latency(lambda: model.encode_image(images), warmup, repeats),
        "text_batch": 1000 * measure_latency(lambda: model.encode_text(tokens), warmup, repeats),
    }


def evaluate_masked(model: ClipModel, masks: dict, data: EvalData, *, batch_size: int = 128,
                    progress: bool = True, label: str = "masked model", reuse: TextEmbeddings | None = None,
                    log=None) -> dict:
    """:func:`accuracy_metrics` of ``model`` with ``masks`` applied by hooks (no physical pruning).

    ``reuse``: text embeddings to take where the masked text tower is unchanged (masks on the vision tower
    only); the fingerprint is taken with the hooks on, so text masks mean the texts are encoded again.
    ``log`` (optional) gets the line of :func:`describe_text_reuse`.
    """
    from ..models.masks import apply_masks

    model.eval()
    with apply_masks(model, masks):
        text = TextEncoder(model, batch_size, reuse)
        if log is not None:
            log(describe_text_reuse(label, text))
        return accuracy_metrics(model, data, batch_size=batch_size, progress=progress, label=label, text=text)


def compare_latency(pruned: ClipModel, dense: ClipModel, batch_size: int, warmup: int, repeats: int,
                    seed: int, same_text_tower: bool = False) -> dict:
    """Pruned vs dense latency of image and text encoding, measured interleaved in one run.

    Returns ``ratio`` (pruned / dense, median of the per-round ratios), ``range`` (``[min, max]`` of the
    per-round ratios, per encoder) and ``pruned_ms`` / ``dense_ms`` (median wall time of a batch,
    ``image_batch`` and ``text_batch``) from the same rounds. With ``same_text_tower`` (equal text tower
    fingerprints: the same kernels on the same numbers) the text encoder is timed once, on the dense model,
    and the text ratio is 1 (range ``[1, 1]``).
    """
    from .latency import latency_ratio

    images, tokens = _latency_inputs(dense, batch_size, seed)
    image = latency_ratio(lambda: pruned.encode_image(images), lambda: dense.encode_image(images), warmup, repeats)
    if same_text_tower:
        seconds = measure_latency(lambda: dense.encode_text(tokens), warmup, repeats)
        text = {"ratio": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "a_seconds": seconds, "b_seconds": seconds}
    else:
        text = latency_ratio(lambda: pruned.encode_text(tokens), lambda: dense.encode_text(tokens), warmup, repeats)
    return {"ratio": {"image": image["ratio"], "text": text["ratio"]},
            "range": {"image": [image["ratio_min"], image["ratio_max"]], "text": [text["ratio_min"], text["ratio_max"]]},
            "pruned_ms": {"image_batch": 1000 * image["a_seconds"], "text_batch": 1000 * text["a_seconds"]},
            "dense_ms": {"image_batch": 1000 * image["b_seconds"], "text_batch": 1000 * text["b_seconds"]}}


@contextlib.contextmanager
def _whole_machine_threads(ctx):
    """Data parallel: rank 0 times latency while the others wait, with all the processes' CPU threads (each
    process has its share, ``OMP_NUM_THREADS`` = cores / N), as one process would. One process: as is."""
    threads = torch.get_num_threads()
    if ctx.world > 1:
        torch.set_num_threads(threads * ctx.world)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _on_main_rank(ctx, measure, default=None):
    """Data parallel: rank 0 alone runs ``measure`` (a latency timing) with every process's threads while the
    others wait at a barrier and get ``default``: rank 0 is the only one that writes the report."""
    result = default
    if ctx.is_main:
        with _whole_machine_threads(ctx):
            result = measure()
    ctx.barrier()
    return result


def evaluation_report(dense: ClipModel, baseline: DenseEvaluation, data: EvalData, *,
                      final_dir: Path | None = None, before_distill_dir: Path | None = None,
                      mask_files: dict[str, Path] | None = None, steps: bool = True,
                      pruning_times: dict[str, float] | None = None, batch_size: int = 128, latency_batch: int = 32,
                      latency_warmup: int = 3, latency_repeats: int = 10, seed: int = 0, progress: bool = True,
                      datasets: Sequence[EvalDataset] = (), log=print) -> dict:
    """The evaluate stage's metrics: the cached dense evaluation next to the final model's.

    ``dense`` is the dense model (for latency and the masked steps; its tensors are reallocated in place,
    see ``embeddings.reallocate_tensors``), ``baseline`` its cached evaluation (accuracy, complexity,
    file size, text embeddings: see ``dense.py``). Without ``final_dir`` the result is the dense block only,
    with ``latency_ms`` measured on its own. With it: ``dense`` and ``pruned`` (the final model: all of
    :func:`model_metrics`, plus kept MAC fraction of the searched towers, params ratio, ``latency_ratio``
    pruned/dense, file size), both ``latency_ms`` from the same interleaved rounds (text timed once when
    the final text tower is the dense one, see :func:`compare_latency`); ``latency_rounds`` (the min-max of
    the per-round ratios, the round count and the 1-minute load average when the timing began); ``dense_file_mb``;
    ``before_distill`` (accuracy of the model in ``before_distill_dir``, when given); ``steps`` (accuracy of
    the dense model under each step's masks, when ``steps``) and ``pruning_time_s`` (wall time of each
    pruning stage in seconds, as given in ``pruning_times``). ``datasets`` (extra
    evaluation sets) are evaluated on the final model only. Text embeddings are reused from ``baseline``
    for every model whose text tower is unchanged; ``log`` gets one line per model saying which.
    """
    from ..models.pruned import load_pruned
    from ..models.masks import load_masks
    from .complexity import file_size_mb

    latency = dict(batch_size=latency_batch, warmup=latency_warmup, repeats=latency_repeats, seed=seed)
    reallocate_tensors(dense.eval())  # as evaluate_dense did, so that its masked steps can reuse the texts
    report = {"dense": dict(baseline.metrics)}
    ctx = current()  # data parallel: latency is timed by rank 0 alone (_on_main_rank)
    if final_dir is None:
        report["dense"]["latency_ms"] = _on_main_rank(ctx, lambda: measure_model_latency(dense, **latency))
        return report

    def text_for(model: ClipModel, label: str) -> TextEncoder:
        text = TextEncoder(model, batch_size, baseline.text)
        log(describe_text_reuse(label, text))
        return text

    final = load_pruned(final_dir)
    final_text = text_for(final, "final model")
    pruned = model_metrics(final, data, batch_size=batch_size, progress=progress, datasets=datasets,
                           label="final model", text=final_text)
    mask_files = mask_files or {}
    metas = {step: load_masks(path, with_metadata=True)[1] for step, path in mask_files.items()}
    searched = sorted(metas["search"]["summary"]["towers"])
    dense_gmacs = sum(baseline.metrics["complexity"][f"{t}_prunable_gmacs"] for t in searched)
    pruned_gmacs = sum(pruned["complexity"][f"{t}_prunable_gmacs"] for t in searched)
    pruned["kept_mac_fraction"] = pruned_gmacs / dense_gmacs
    pruned["params_ratio"] = pruned["complexity"]["params"] / baseline.metrics["complexity"]["params"]
    same_text = final_text.fingerprint is not None and final_text.fingerprint == text_tower_fingerprint(dense)
    if same_text:
        log("final model: text tower unchanged: its text latency is the dense one's (ratio 1), timed once")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # how busy the machine was at the start
    timed = _on_main_rank(ctx, lambda: compare_latency(final, dense, latency_batch, latency_warmup, latency_repeats,
                                                       seed, same_text),
                          default=dict.fromkeys(("ratio", "pruned_ms", "dense_ms", "range")))
    pruned["latency_ratio"] = timed["ratio"]
    report["latency_rounds"] = {"ratio_range": timed["range"], "rounds": latency_repeats, "load_average_1m": load}
    pruned["latency_ms"] = timed["pruned_ms"]
    report["dense"]["latency_ms"] = timed["dense_ms"]
    pruned["file_mb"] = file_size_mb(final_dir)
    if before_distill_dir is not None:
        exported = load_pruned(before_distill_dir)
        pruned["before_distill"] = accuracy_metrics(exported, data, batch_size=batch_size, progress=progress,
                                                    label="exported model",
                                                    text=text_for(exported, "exported model"))
    report["pruned"] = pruned
    report["dense_file_mb"] = baseline.file_mb
    if steps:
        report["steps"] = {step: evaluate_masked(dense, load_masks(path), data, batch_size=batch_size,
                                                 progress=progress, label=f"{step} masks", reuse=baseline.text,
                                                 log=log)
                           for step, path in mask_files.items()}
    times = dict(pruning_times or {})
    # total: the pruning itself (score, search, tune); distillation is training and is listed on its own
    report["pruning_time_s"] = {**times, "total": sum(t for step, t in times.items() if step != "distill")}
    return report


def describe_text_reuse(label: str, text: TextEncoder) -> str:
    """One line: whether ``label``'s class and caption embeddings are the dense model's or encoded again."""
    if text.reusing:
        return (f"{label}: text tower unchanged (fingerprint {text.fingerprint[:12]}): reusing the dense "
                f"model's class and caption embeddings")
    why = "has hooks on it" if text.fingerprint is None else "differs from the dense one"
    return f"{label}: text tower {why}: encoding its class prompts and captions"


def null_metric_notes(metrics: dict, path: str = "") -> list[str]:
    """One line per zero-shot ``acc{k}`` that is null (k above the class count), naming where it is."""
    notes = []
    for key, value in metrics.items():
        where = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            notes += null_metric_notes(value, where)
        elif value is None and key.startswith("acc") and key[3:].isdigit() and path.endswith("zeroshot"):
            notes.append(f"{where} is null: top-{key[3:]} is undefined with fewer than {key[3:]} classes "
                         f"(CLIP_benchmark 1.6.2 reports NaN)")
    return notes


def summary_metrics(metrics: dict, method: str, constraint: float | None,
                    towers: Sequence[str] | None = None) -> dict:
    """One flat block of the run's headline figures (``summary`` in metrics.json; the report stage names the
    method from it, and the summary stage reads method, constraint and towers).

    ``metrics`` is the evaluate stage's nested dict (``dense`` and, after pruning, ``pruned``: the final
    model, after distillation when that ran, with ``before_distill`` accuracy). Percentages
    are 0-100; ``params_m`` in millions; ratios pruned / dense, per encoder; ``towers`` the towers the search
    pruned. Keys whose source is missing (no zero-shot split, no pruned model) are left out rather than guessed.
    """
    def pct(value):
        return None if value is None else 100.0 * value

    dense, pruned = metrics.get("dense", {}), metrics.get("pruned")
    final = pruned if pruned is not None else dense
    summary = {
        "method": method,
        "constraint": constraint,
        "towers": list(towers) if towers is not None else None,
        "mac_pct": pct(pruned.get("kept_mac_fraction")) if pruned is not None else 100.0,
        "params_m": final.get("complexity", {}).get("params", 0) / 1e6,
        "params_pct": pct(pruned.get("params_ratio")) if pruned is not None else 100.0,
        "top1": pct(final.get("zeroshot", {}).get("acc1")),
        "top1_before_distill": pct(final.get("before_distill", {}).get("zeroshot", {}).get("acc1")),
        "dense_top1": pct(dense.get("zeroshot", {}).get("acc1")),
        "r1_t2i": pct(final.get("retrieval", {}).get("image_retrieval_recall@1")),
        "r1_i2t": pct(final.get("retrieval", {}).get("text_retrieval_recall@1")),
        "latency_ratio_image": (pruned.get("latency_ratio", {}).get("image") if pruned is not None else 1.0),
        "latency_ratio_text": (pruned.get("latency_ratio", {}).get("text") if pruned is not None else 1.0),
        "pruning_time_s": metrics.get("pruning_time_s", {}).get("total"),
    }
    return {key: value for key, value in summary.items() if value is not None}
