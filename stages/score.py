"""Stage score: importance of every head and neuron (`score.criterion`) on the calibration pairs.

`score.nproc > 1` relaunches this script under torchrun: each process computes the gradients of every
nproc-th calibration batch, all of them receive every batch's, and rank 0 alone writes the outputs.
"""

from _common import data_parallel_stage, relaunch, run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.io import commit_together, write_json
from clipprune.models import load_model
from clipprune.scoring import available_criteria, available_losses, calibration_loader, get_criterion, save_scores, \
    score_model
from clipprune.scoring.taylor_entropy import scored_only

# every path is named once, on the stage's cmd in dvc.yaml
CALIBRATION, OUT, TIMING = stage_paths("score", "calibration", "out", "timing", main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "model", "data", "score"),
                     choices={"score.criterion": available_criteria(), "score.loss": available_losses()})
    score, model_name, batch_size = p.score, p.model, p.score.batch_size
    if relaunch("score", score.nproc, {"calibration": CALIBRATION, "out": OUT, "timing": TIMING}):
        print(f"score: {score.nproc} processes finished; wrote {OUT}")
        return
    with data_parallel_stage(score.device, "score.device") as ctx:
        result = _score(p, ctx.device)
    if ctx.is_main:
        _write(result, model_name, batch_size)


def _score(p, device):
    score = p.score
    model = load_model(p.model, device)
    loader = None
    if get_criterion(score.criterion).needs_data:
        loader = calibration_loader(p.data.path("train_images"), p.data.path("train_captions"), CALIBRATION,
                                    model.preprocess, score.batch_size)
    return score_model(model, loader, criterion=score.criterion, loss=score.loss, granularity=score.granularity,
                       towers=score.towers, seed=p.seed, options=score.options, precision=score.precision,
                       checkpointing=score.checkpointing)


def _write(result, model_name: str, batch_size: int) -> None:
    meta = dict(result.meta)
    result.meta.pop("wall_time_s", None)  # timings go to reports/timing/: the artifact stays byte-identical
    # keys a criterion did not score (taylor_entropy: heads) are left out: searches keep those units whole
    result.scores = scored_only(result.scores, result.meta)
    with commit_together():
        save_scores(OUT, result, {"model": model_name, "calibration": str(CALIBRATION), "batch_size": batch_size})
        write_json(TIMING, {"wall_time_s": meta["wall_time_s"], "samples": meta["num_samples"]})
    print(f"score: {meta['criterion']} on {meta['num_samples']} samples in {meta['wall_time_s']:.1f} s; wrote {OUT}")


if __name__ == "__main__":
    run_stage("score", main)
