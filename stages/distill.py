"""Stage distill: train the exported pruned model against the dense one into artifacts/models/distilled/.

`distill.enabled: false` copies the pruned model through unchanged. `distill.nproc > 1` relaunches this
script under torchrun (one process per share of the global batch). A run killed mid-way resumes from the
checkpoint of its last complete epoch (artifacts/checkpoints/distill/, outside DVC's outs; removed on success).
"""
import time

from _common import relaunch, run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.distill import (DistillPaths, check_resumable, distill_config, passthrough, run_distill,
                               write_disabled_logs)
from clipprune.distributed import under_torchrun
from clipprune.distill.live import LiveLogger
from clipprune.io import commit_together, write_json

# every path is named once, on the stage's cmd in dvc.yaml. The options are passed on to the torchrun workers
# after the script name, where torchrun's own parser still takes any prefix of its options (--logs would be
# read as its --logs-specs): none of these names may be one.
PRUNED, OUT, LOGS, CHECKPOINT, TIMING = stage_paths("distill", "pruned", "out", "dvclive", "checkpoint", "timing",
                                                    main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "model", "data", "distill"))
    config = distill_config(p.distill, p.seed)
    teacher = p.model
    paths = DistillPaths(pruned=PRUNED, out=OUT, logs=LOGS, checkpoint=CHECKPOINT,
                         train_images=p.data.path("train_images"), train_captions=p.data.path("train_captions"))
    start = time.perf_counter()
    if not config.enabled:
        with commit_together():  # model, logs and timing: all or none
            passthrough(PRUNED, OUT)
            write_disabled_logs(LOGS)
            write_json(TIMING, {"wall_time_s": time.perf_counter() - start, "enabled": False})
        print(f"distill: disabled; copied {PRUNED} to {OUT}")
        return
    if not under_torchrun():
        check_resumable(config, teacher, paths)  # a bad checkpoint fails here, in one line, before any model loads
    named = {"pruned": PRUNED, "out": OUT, "dvclive": LOGS, "checkpoint": CHECKPOINT, "timing": TIMING}
    if relaunch("distill", config.nproc, named):
        write_json(TIMING, {"wall_time_s": time.perf_counter() - start, "nproc": config.nproc})
        print(f"distill: {config.nproc} processes finished; wrote {OUT}")
        return
    summary = run_distill(config, teacher, paths, logger_factory=LiveLogger)
    if under_torchrun():
        return  # the launching process reports
    write_json(TIMING, {"wall_time_s": time.perf_counter() - start, "nproc": 1})
    history = summary["history"]
    resumed = summary["resumed_from_epoch"]
    print(f"distill: {summary['plan']['mode']} on {summary['images']} images, {summary['steps']} steps, epoch loss "
          f"{history[0]['loss']:.4g} -> {history[-1]['loss']:.4g}"
          f"{f' (resumed after epoch {resumed})' if resumed is not None else ''}; wrote {OUT}")


if __name__ == "__main__":
    run_stage("distill", main)
