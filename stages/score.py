"""Stage score: importance of every head and neuron (`score.criterion`) on the calibration pairs."""
from pathlib import Path

from _common import run_stage
from clipprune.data.sources import check_dataset_name
from clipprune.io import write_json
from clipprune.models import load_model
from clipprune.params import get, get_int, get_str
from clipprune.scoring import (GRANULARITIES, available_criteria, available_losses, calibration_loader,
                               get_criterion, save_scores, score_model)
from clipprune.scoring.taylor_entropy import scored_only

CALIBRATION = Path("data/prepared/calibration.json")
OUT = Path("artifacts/scores/scores.safetensors")
TIMING = Path("reports/timing/score.json")


def main(params: dict) -> None:
    model_name = get_str(params, "model")
    seed = get_int(params, "seed", min_value=0)
    criterion = get_str(params, "score.criterion", choices=available_criteria())
    loss = get_str(params, "score.loss", choices=available_losses())
    granularity = get_str(params, "score.granularity", choices=GRANULARITIES)
    towers = get_str(params, "score.towers", choices=["vision", "text", "both"])
    batch_size = get_int(params, "score.batch_size", min_value=1)
    options = get(params, "score.options", default=None) or {}
    root = Path("data/raw") / check_dataset_name(get_str(params, "data.name"))
    images = root / get_str(params, "data.layout.train_images")
    captions = root / get_str(params, "data.layout.train_captions")

    model = load_model(model_name)
    loader = None
    if get_criterion(criterion).needs_data:
        loader = calibration_loader(images, captions, CALIBRATION, model.preprocess, batch_size)
    result = score_model(model, loader, criterion=criterion, loss=loss, granularity=granularity, towers=towers,
                         seed=seed, options=options)
    meta = dict(result.meta)
    result.meta.pop("wall_time_s", None)  # timings go to reports/timing/: the artifact stays byte-identical
    # keys a criterion did not score (taylor_entropy: heads) are left out: searches keep those units whole
    result.scores = scored_only(result.scores, result.meta)
    save_scores(OUT, result, {"model": model_name, "calibration": str(CALIBRATION), "batch_size": batch_size})
    write_json(TIMING, {"wall_time_s": meta["wall_time_s"], "samples": meta["num_samples"]})
    print(f"score: {criterion} on {meta['num_samples']} samples in {meta['wall_time_s']:.1f} s; wrote {OUT}")


if __name__ == "__main__":
    run_stage("score", main)
