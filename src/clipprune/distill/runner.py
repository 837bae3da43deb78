"""The distill stage's work, DVC-free: pass through, or train and export the distilled model.

``run_distill`` is what each process runs (one, or each of torchrun's): load the student (the exported
pruned model) and the dense teacher, train, and on the main process write the model in the export format,
then delete the checkpoint (it only exists to resume a killed run).
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClipPruneError
from ..models.pruned import CONFIG_NAME, WEIGHTS_NAME, export_pruned, load_pruned
from ..io import atomic_dir, commit_together
from ..models import load_model
from .checkpoint import load_checkpoint
from .config import DistillConfig, fingerprint
from .data import TrainImages
from ..distributed import DistContext, init_distributed
from .features import prunable_param_count
from .train import TrainingLogger, check_schedule, plan_training, train


@dataclass(frozen=True)
class DistillPaths:
    pruned: Path  # input: directory written by export_pruned
    out: Path  # output model directory
    logs: Path  # dvclive directory
    checkpoint: Path  # checkpoint file (outside DVC outs)
    train_images: Path
    train_captions: Path

    @property
    def live(self) -> Path:
        """Where the logger writes during the run (next to the checkpoint, which it resumes with); the
        logs reach ``logs`` only with the finished model, so a failed run leaves the previous ones alone."""
        return self.checkpoint.parent / "live"


def passthrough(pruned: Path, out: Path) -> Path:
    """Copy the pruned model directory to ``out`` unchanged (byte for byte), atomically."""
    if not (pruned / CONFIG_NAME).is_file() or not (pruned / WEIGHTS_NAME).is_file():
        raise ClipPruneError(f"{pruned}: not a pruned model directory (expected {CONFIG_NAME} and "
                             f"{WEIGHTS_NAME}; run the export stage)")
    with atomic_dir(out) as tmp:
        shutil.copytree(pruned, tmp, dirs_exist_ok=True)
    return out


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def run_fingerprint(config: DistillConfig, teacher_name: str, paths: DistillPaths) -> str:
    """What a checkpoint must match to be resumed: training params, teacher, student files, training data."""
    return fingerprint(
        config,
        teacher=teacher_name,
        student={name: file_digest(paths.pruned / name) for name in (CONFIG_NAME, WEIGHTS_NAME)},
        data={"images": str(paths.train_images), "captions": file_digest(paths.train_captions)},
    )


def check_resumable(config: DistillConfig, teacher_name: str, paths: DistillPaths) -> None:
    """Fail early (one line naming the file) if an existing checkpoint is corrupt or from another run."""
    if paths.checkpoint.is_file():
        load_checkpoint(paths.checkpoint, run_fingerprint(config, teacher_name, paths))


def log_trained_towers(trained, pruned) -> list[str]:
    """One line on the ``clipprune`` logger: which towers train (``distill.towers``), and, as a warning,
    the pruned towers that do not (they stay as exported). Returns the pruned towers left untrained."""
    log = logging.getLogger("clipprune")
    untrained = [tower for tower in pruned if tower not in trained]
    log.info("training the %s tower%s (distill.towers); pruned: %s", " and ".join(trained),
             "s" if len(trained) > 1 else "", " and ".join(pruned) or "none")
    if untrained:
        log.warning("the pruned %s tower%s not trained: it stays as exported (add it to distill.towers to "
                    "train it)", " and ".join(untrained), "s are" if len(untrained) > 1 else " is")
    return untrained


def run_distill(config: DistillConfig, teacher_name: str, paths: DistillPaths, *, progress: bool = True,
                logger_factory=None, ctx: DistContext | None = None) -> dict:
    """Train (this process's part of) the run; the main process writes ``paths.out``. Returns a summary."""
    own_ctx = ctx is None
    ctx = ctx or init_distributed(config.device)
    try:
        if not (paths.pruned / WEIGHTS_NAME).is_file():
            raise ClipPruneError(f"{paths.pruned / WEIGHTS_NAME} not found (run the export stage)")
        student = load_pruned(paths.pruned, device=ctx.device)
        teacher = load_model(teacher_name, device=str(ctx.device))
        plan = plan_training(student, teacher, config)
        pruned_towers = [tower for tower in sorted(student.towers)
                         if prunable_param_count(student, tower) < prunable_param_count(teacher, tower)]
        if ctx.is_main:
            log_trained_towers(plan.towers, pruned_towers)
        data = TrainImages(paths.train_images, paths.train_captions, student.preprocess, config.num_samples,
                           config.seed, plan.data_share)
        check_schedule(config, len(data))  # a bad batch size fails before any log is touched
        key = run_fingerprint(config, teacher_name, paths)
        resume_step = None
        if paths.checkpoint.is_file():
            resume_step = load_checkpoint(paths.checkpoint, key).step
        logger = TrainingLogger()
        if ctx.is_main and logger_factory is not None:
            logger = logger_factory(paths.live, resume_step, plan.as_dict())
        result = train(student, teacher, data, config, plan, checkpoint_path=paths.checkpoint, fingerprint=key,
                       ctx=ctx, logger=logger, progress=progress)
        summary = {"plan": plan.as_dict(), "pruned_towers": pruned_towers, "images": len(data), "steps": result.steps, "history": result.history,
                   "resumed_from_epoch": result.resumed_from_epoch}
        if ctx.is_main:
            logger.close()
            with commit_together():  # the model and its logs: both or neither
                export_pruned(result.model.to("cpu"), None, paths.out)
                if logger_factory is not None:
                    with atomic_dir(paths.logs) as tmp:
                        shutil.copytree(paths.live, tmp, dirs_exist_ok=True)
            shutil.rmtree(paths.live, ignore_errors=True)
            paths.checkpoint.unlink(missing_ok=True)
        ctx.barrier()
        return summary
    finally:
        if own_ctx:
            ctx.close()


def write_disabled_logs(logs: Path) -> None:
    """A disabled run leaves a one-key summary, so the declared dvclive directory exists and says why."""
    with atomic_dir(logs) as tmp:
        (tmp / "metrics.json").write_text('{\n  "enabled": false\n}\n')
