"""Stage evaluate: zero-shot classification, retrieval, GMACs/params and latency into reports/metrics.json."""
from pathlib import Path

import torch

from _common import run_stage
from clipprune.data.evalsets import open_eval_dataset, parse_eval_datasets
from clipprune.evaluate.suite import (accuracy_metrics, eval_data_from_params, evaluate_model, pruning_report,
                                     summary_metrics)
from clipprune.export import load_pruned
from clipprune.io import write_json
from clipprune.models import load_model
from clipprune.params import get, get_bool, get_int, get_str

OUT = Path("reports/metrics.json")
PRUNED = Path("artifacts/models/pruned")        # export: the pruned model before distillation
FINAL = Path("artifacts/models/distilled")      # distill: the final model (the pruned one when disabled)
SCORES = Path("artifacts/scores/scores.safetensors")
TIMING = {stage: Path(f"reports/timing/{stage}.json") for stage in ("score", "search", "tune", "distill")}
MASKS = {"search": Path("artifacts/masks/search.safetensors"),
         "rearranged": Path("artifacts/masks/rearranged.safetensors"),
         "tuned": Path("artifacts/masks/tuned.safetensors")}


def main(params: dict) -> None:
    seed = get_int(params, "seed", min_value=0)
    batch_size = get_int(params, "evaluate.batch_size", min_value=1)
    latency = {
        "latency_batch": get_int(params, "evaluate.latency.batch_size", min_value=1),
        "latency_warmup": get_int(params, "evaluate.latency.warmup", min_value=0),
        "latency_repeats": get_int(params, "evaluate.latency.repeats", min_value=1),
    }
    data = eval_data_from_params(params)
    # extra sets (evaluate.datasets) are read and checked before any model runs, so bad paths fail fast
    extra = [open_eval_dataset(spec) for spec in parse_eval_datasets(get(params, "evaluate.datasets", default=[]))]
    torch.manual_seed(seed)
    dense = load_model(get_str(params, "model"))
    metrics = {"dense": evaluate_model(dense, data, batch_size=batch_size, seed=seed, datasets=extra, **latency)}
    if FINAL.exists():
        metrics.update(pruning_report(dense, metrics["dense"], FINAL, MASKS, TIMING, data,
                                      batch_size=batch_size, seed=seed, datasets=extra, **latency))
        if get_bool(params, "distill.enabled", default=False):  # the gain of distillation, side by side
            metrics["pruned"]["before_distill"] = accuracy_metrics(load_pruned(PRUNED), data, batch_size=batch_size)
    metrics["summary"] = summary_metrics(metrics, *_method_and_constraint())
    write_json(OUT, metrics)
    line = f"evaluate: dense top-1 {_top1(metrics['dense'])}"
    if "before_distill" in metrics.get("pruned", {}):
        line += f", pruned top-1 {_top1(metrics['pruned']['before_distill'])} before distillation"
    if "pruned" in metrics:
        line += (f", final top-1 {_top1(metrics['pruned'])} at {metrics['pruned']['kept_mac_fraction']:.3f} "
                 f"of the MACs, latency ratio {metrics['pruned']['latency_ratio']['image']:.3f}")
    print(f"{line}; metrics in {OUT}")
    for name, result in metrics["dense"].get("datasets", {}).items():
        print(f"evaluate: {name}: {_headline(result)} dense"
              + (f", {_headline(metrics['pruned']['datasets'][name])} pruned" if "pruned" in metrics else ""))


def _method_and_constraint() -> tuple[str, float | None]:
    """``"<score criterion>+<search method>"`` and the constraint, as recorded in the artifacts' metadata."""
    from clipprune.models.masks import load_masks
    from clipprune.scoring import load_scores

    if not (FINAL.exists() and SCORES.is_file() and MASKS["search"].is_file()):
        return "dense", None
    search_meta = load_masks(MASKS["search"], with_metadata=True)[1]
    criterion = load_scores(SCORES).meta.get("criterion", "unknown")
    return f"{criterion}+{search_meta.get('method', 'unknown')}", search_meta.get("constraint")


def _headline(result: dict) -> str:
    """Top-1 accuracy of a classification set, or both recall@1 of a retrieval set."""
    if "zeroshot" in result:
        return f"top-1 {result['zeroshot']['acc1']:.4f}"
    r = result["retrieval"]
    return f"R@1 text->image {r['image_retrieval_recall@1']:.4f} image->text {r['text_retrieval_recall@1']:.4f}"


def _top1(metrics: dict) -> str:
    acc = metrics.get("zeroshot", {}).get("acc1")
    return "n/a" if acc is None else f"{acc:.4f}"


if __name__ == "__main__":
    run_stage("evaluate", main)
