"""Stage evaluate: zero-shot classification, retrieval, GMACs/params and latency into reports/metrics.json."""
from pathlib import Path

import torch

from _common import run_stage
from clipprune.evaluate.suite import EvalData, evaluate_model
from clipprune.io import write_json
from clipprune.models import load_model
from clipprune.params import get, get_int, get_str

OUT = Path("reports/metrics.json")


def eval_data(params: dict) -> EvalData:
    root = Path("data/raw") / get_str(params, "data.name")
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
    model = load_model(get_str(params, "model"))
    metrics = {"dense": evaluate_model(model, data, batch_size=batch_size, seed=seed, **latency)}
    write_json(OUT, metrics)
    zs = metrics["dense"].get("zeroshot", {})
    print(f"evaluate: dense top-1 {zs.get('acc1', float('nan')):.4f}; metrics in {OUT}")


if __name__ == "__main__":
    run_stage("evaluate", main)
