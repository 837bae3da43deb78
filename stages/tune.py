"""Stage tune: Kwon's rearrangement, then least-squares mask tuning against the dense model.

`tune.nproc > 1` relaunches it under torchrun: each process captures every nproc-th calibration batch, the
least-squares statistics of each sub-block are all-reduced before its solve, and rank 0 writes the outputs.
"""
import os
import sys
import time

from _common import data_parallel_stage, relaunch, run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.errors import MaskError
from clipprune.io import commit_together, write_json
from clipprune.models import load_model
from clipprune.models.masks import load_masks, save_masks, validate_masks
from clipprune.scoring import calibration_loader, load_scores
from clipprune.tuning import rearrange_masks, tune_masks

# every path is named once, on the stage's cmd in dvc.yaml
CALIBRATION, SCORES, SEARCHED, REARRANGED, TUNED, REPORT, TIMING = stage_paths(
    "tune", "calibration", "scores", "searched", "rearranged", "tuned", "report", "timing", main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params, need=("model", "data", "tune"))
    rearrange, lsq, damp, max_scale = p.tune.rearrange, p.tune.lsq, p.tune.damp, p.tune.max_scale
    batch_size = p.tune.batch_size
    named = {"calibration": CALIBRATION, "scores": SCORES, "searched": SEARCHED, "rearranged": REARRANGED,
             "tuned": TUNED, "report": REPORT, "timing": TIMING}
    if relaunch("tune", p.tune.nproc, named):
        print(f"tune: {p.tune.nproc} processes finished; wrote {TUNED}")
        return
    masks, search_meta = load_masks(SEARCHED, with_metadata=True)
    model = load_model(p.model)  # on the CPU for the rearrangement; the tuning moves it to tune.device
    validate_masks(model, masks, str(SEARCHED))  # a mismatch names the file, not an internal variable
    report = {"rearrange": [], "lsq": {}}

    start = time.perf_counter()
    if rearrange:
        scores = load_scores(SCORES)
        grads = scores.grads
        without = sorted(k for k in masks if f"{k}.grads" not in grads and k not in grads)
        if without:  # e.g. magnitude scores: nothing to rearrange by, say so instead of silently skipping
            print(f"tune: warning: {SCORES} holds no mask gradients for {', '.join(without)} "
                  f"(criterion {scores.meta.get('criterion')!r}); those masks are not rearranged",
                  file=sys.stderr)
        try:
            masks = rearrange_masks(masks, grads, report=report["rearrange"], progress=True)
        except MaskError as err:  # gradients of another model, NaN/inf, non-binary masks: name the files
            raise MaskError(f"{SEARCHED} with the gradients of {SCORES}: {err}") from None
        layers = report["rearrange"]
        if layers:  # the block-Fisher loss summed over layers, per start, as a reader of the log compares them
            total = {name: sum(e[f"objective_{name}"] for e in layers) for name in ("before", "greedy", "after")}
            print(f"tune: rearranged {len(layers)} layers; block-Fisher loss summed over layers: searched "
                  f"{total['before']:.4g}, Kwon greedy {total['greedy']:.4g}, final {total['after']:.4g} "
                  f"(greedy start kept in {sum(e['start'] == 'greedy' for e in layers)})")
    rearrange_time = time.perf_counter() - start
    rearranged = masks
    if lsq:
        loader = calibration_loader(p.data.path("train_images"), p.data.path("train_captions"),
                                    CALIBRATION, model.preprocess, batch_size)
        with data_parallel_stage(p.tune.device, "tune.device") as ctx:
            masks, report["lsq"] = tune_masks(model.to(ctx.device), masks, loader, damp=damp, max_scale=max_scale,
                                              batch_size=batch_size, progress=True, precision=p.tune.precision)
    if os.environ.get("RANK", "0") != "0":  # a torchrun worker other than rank 0 writes nothing
        return
    wall = time.perf_counter() - start

    meta = {**search_meta, "rearrange": rearrange, "lsq": lsq, "damp": damp, "max_scale": max_scale}
    if isinstance(report["lsq"], dict):
        report["lsq"].pop("wall_time_s", None)
    with commit_together():  # all four outputs, or (full disk, read-only folder, interruption) none
        save_masks(REARRANGED, rearranged, meta)
        write_json(REPORT, report)
        save_masks(TUNED, masks, meta)
        write_json(TIMING, {"wall_time_s": wall, "rearrange_s": rearrange_time})
    print(f"tune: rearrange={rearrange} lsq={lsq} in {wall:.1f} s; wrote {TUNED}")


if __name__ == "__main__":
    run_stage("tune", main)
