"""Stage evaluate: zero-shot classification, retrieval, GMACs/params and latency into reports/metrics.json."""
from pathlib import Path

import torch

from _common import run_stage
from clipprune.data.sources import check_dataset_name
from clipprune.evaluate.suite import EvalData, evaluate_model, pruning_report
from clipprune.io import write_json
from clipprune.models import load_model
from clipprune.params import get, get_int, get_str

OUT = Path("reports/metrics.json")
PRUNED = Path("artifacts/models/pruned")
TIMING = {stage: Path(f"reports/timing/{stage}.json") for stage in ("score", "search", "tune")}
MASKS = {"search": Path("artifacts/masks/search.safetensors"),
         "rearranged": Path("artifacts/masks/rearranged.safetensors"),
         "tuned": Path("artifacts/masks/tuned.safetensors")}


def eval_data(params: dict) -> EvalData:
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


def main(params: dict) -> None:
    seed = get_int(params, "seed", min_value=0)
    batch_size = get_int(params, "evaluate.batch_size", min_value=1)
    latency = {
        "latency_batch": get_int(params, "evaluate.latency.batch_size", min_value=1),
        "latency_warmup": get_int(params, "evaluate.latency.warmup", min_value=0),
        "latency_repeats": get_int(params, "evaluate.latency.repeats", min_value=1),
    }
    data = eval_data(params)
    torch.manual_seed(seed)
    dense = load_model(get_str(params, "model"))
    metrics = {"dense": evaluate_model(dense, data, batch_size=batch_size, seed=seed, **latency)}
    if PRUNED.exists():
        metrics.update(pruning_report(dense, metrics["dense"], PRUNED, MASKS, TIMING, data,
                                      batch_size=batch_size, seed=seed, **latency))
    write_json(OUT, metrics)
    line = f"evaluate: dense top-1 {_top1(metrics['dense'])}"
    if "pruned" in metrics:
        line += (f", pruned top-1 {_top1(metrics['pruned'])} at {metrics['pruned']['kept_mac_fraction']:.3f} "
                 f"of the MACs, latency ratio {metrics['pruned']['latency_ratio']['image']:.3f}")
    print(f"{line}; metrics in {OUT}")


def _top1(metrics: dict) -> str:
    acc = metrics.get("zeroshot", {}).get("acc1")
    return "n/a" if acc is None else f"{acc:.4f}"


if __name__ == "__main__":
    run_stage("evaluate", main)
