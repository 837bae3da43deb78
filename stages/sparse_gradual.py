"""Stage sparse_gradual: gradual pruning (one-shot + fine-tune with `gradual.steps: 1`) on the sparsity branch.

Prunes `model` with `gradual.method` (null: `sparsity.method`) and `gradual.mask_type` (towers, loss, Fisher
keys from `sparsity:`) from `gradual.initial` to `gradual.final` in
`gradual.steps` steps, fine-tuning against the dense model (the `distill` loss and optimiser options) for
`gradual.epochs` after each (``clipprune.sparsity.gradual``), then writes the compact sparse model and its report
like sparsify@<target> does. A checkpoint after every pruning step (artifacts/checkpoints/sparse_gradual/, outside
DVC's outs; removed on success) lets a killed run resume with the same bits; dvclive logs the fine-tuning loss and
lr per optimiser step and the sparsity per pruning step. `distill.nproc > 1` relaunches it under torchrun.
"""
import shutil
import time

import torch

from _common import relaunch, run_stage, stage_paths
from _evaluation import dense_settings_from_params
from _sparse_report import top1_text, write_sparse_and_report
from clipprune.config import parse_params
from clipprune.distill import TrainImages, distill_config
from clipprune.distill.config import fingerprint
from clipprune.distill.live import LiveLogger
from clipprune.distill.runner import file_digest
from clipprune.distributed import init_distributed
from clipprune.evaluate.dense import load_dense_evaluation
from clipprune.io import atomic_dir, commit_together
from clipprune.models import load_model
from clipprune.scoring import available_losses, calibration_loader
from clipprune.sparsity import available_methods, get_method, parse_mask_type, sparsity_config
from clipprune.sparsity.export import dense_size_bytes
from clipprune.sparsity.gradual import GradualLogger, gradual_config, run_gradual
from clipprune.sparsity.layers import parameter_names, prunable_linears

# every path is named once, on the stage's cmd in dvc.yaml (passed on to torchrun workers: no torchrun option
# may start with any of these names)
OPTIONS = ("calibration", "dense", "out", "report", "dvclive", "checkpoint")
CALIBRATION, DENSE, OUT, REPORT, LOGS, CHECKPOINT = stage_paths("sparse_gradual", *OPTIONS,
                                                                main=__name__ == "__main__")


class Live(LiveLogger, GradualLogger):
    def prune_step(self, step, index, target, sparsity, loss):
        self.live.step = step
        self.live.log_metric("gradual/sparsity", sparsity)
        self.live.log_metric("gradual/target", target)
        self.live.log_metric("gradual/loss", loss)
        self.live.log_metric("gradual/pruning_step", index, plot=False)
        self.live.make_summary()


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "model", "data", "sparsity", "gradual", "distill", "evaluate"),
                     choices={"sparsity.method": available_methods(), "sparsity.loss": available_losses()})
    sparsity, gradual, distill = sparsity_config(p.sparsity), gradual_config(p.gradual), distill_config(p.distill, p.seed)
    method = gradual.method or sparsity.method
    mask = parse_mask_type(gradual.mask_type)
    start = time.perf_counter()
    named = dict(zip(OPTIONS, (CALIBRATION, DENSE, OUT, REPORT, LOGS, CHECKPOINT)))
    if relaunch("sparse_gradual", distill.nproc, named):
        print(f"sparse_gradual: {distill.nproc} processes finished in {time.perf_counter() - start:.1f} s; wrote {OUT}")
        return
    settings = dense_settings_from_params(p)
    baseline = load_dense_evaluation(DENSE, settings.inputs())
    ctx = init_distributed(distill.device)
    try:
        model, teacher = load_model(p.model, device=str(ctx.device)), load_model(p.model, device=str(ctx.device))
        dense_bytes = dense_size_bytes(model)
        loader = None
        if get_method(method).needs_data:
            loader = calibration_loader(p.data.path("train_images"), p.data.path("train_captions"), CALIBRATION,
                                        model.preprocess, sparsity.batch_size)
        data = TrainImages(p.data.path("train_images"), p.data.path("train_captions"), model.preprocess,
                           gradual.num_samples, p.seed)
        key = fingerprint(distill, sparsity=sparsity.as_dict(), gradual=gradual.as_dict(), model=p.model,
                          calibration=file_digest(CALIBRATION),
                          captions=file_digest(p.data.path("train_captions")))
        live_dir = CHECKPOINT.parent / "live"
        logger = None
        if ctx.is_main:
            resume = None
            if CHECKPOINT.is_file():
                from clipprune.distill.checkpoint import load_checkpoint

                resume = load_checkpoint(CHECKPOINT, key).step
            logger = Live(live_dir, resume, {"gradual": gradual.as_dict(), "method": method})
        torch.manual_seed(p.seed)
        result = run_gradual(model, teacher, sparsity, gradual, distill, loader, data, seed=p.seed,
                             checkpoint=CHECKPOINT, fingerprint=key, ctx=ctx, logger=logger)
        if not ctx.is_main:
            return
        logger.close()
        model = model.to("cpu")
        layers = prunable_linears(model, sparsity.towers)
        keys = list(parameter_names(model, layers).values())
        wall = time.perf_counter() - start
        fields = {"method": method, "mask_type": mask.name, "gradual": gradual.as_dict(),
                  "schedule": result.schedule, "history": result.history, "wall_time_s": wall,
                  "resumed_after_step": result.resumed_after_step}
        with commit_together():  # model, report and logs: all or none
            report = write_sparse_and_report(
                "sparse_gradual", model, keys, OUT, {"sparsity": {"gradual": gradual.as_dict(),
                                                                  "method": method,
                                                                  "mask_type": mask.name}},
                {n: layer.weight.detach() for n, layer in layers.items()}, mask, baseline, settings,
                dense_bytes, REPORT, fields, sparsity.towers)
            with atomic_dir(LOGS) as tmp:
                shutil.copytree(live_dir, tmp, dirs_exist_ok=True)
        shutil.rmtree(live_dir, ignore_errors=True)
        CHECKPOINT.unlink(missing_ok=True)
    finally:
        ctx.close()
    print(f"sparse_gradual: {method} {mask.name} in {gradual.steps} step(s) to "
          f"{report['sparsity']['overall']:.4f} sparsity: top-1 {top1_text(report)} in "
          f"{wall:.1f} s; wrote {OUT}")


if __name__ == "__main__":
    run_stage("sparse_gradual", main)
