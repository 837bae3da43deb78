"""Knowledge distillation (AMP) and adaptive retraining (LFPR) of a pruned CLIP, torchrun-DDP capable."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import (DEFAULT_RETRAIN_SCHEDULE, DistillConfig, RetrainRow, distill_config, lr_at,
                     parse_distill_params, parse_schedule, retrain_row, scaled_lr)
from .data import TrainImages, epoch_plan, select_images, shard
from ..distributed import DistContext, init_distributed, under_torchrun
from .features import keep_ratio
from .losses import Batch, distill_loss
from .runner import DistillPaths, check_resumable, passthrough, run_distill, run_fingerprint, write_disabled_logs
from .train import TrainingPlan, TrainResult, plan_training, train

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint",
    "DEFAULT_RETRAIN_SCHEDULE", "DistillConfig", "RetrainRow", "distill_config", "lr_at", "parse_distill_params",
    "parse_schedule", "retrain_row", "scaled_lr",
    "TrainImages", "epoch_plan", "select_images", "shard",
    "DistContext", "init_distributed", "under_torchrun",
    "keep_ratio",
    "Batch", "distill_loss",
    "DistillPaths", "check_resumable", "passthrough", "run_distill", "run_fingerprint", "write_disabled_logs",
    "TrainingPlan", "TrainResult", "plan_training", "train",
]
