"""dvclive logs of a distillation run: per step ``train/loss`` and ``train/lr``, per epoch ``train/epoch_loss``.

Files (dvclive's layout): ``<dir>/metrics.json`` (latest values, the training plan) and
``<dir>/plots/metrics/train/*.tsv`` (history, x = optimizer step), which ``dvc plots show`` draws.
A resumed run first cuts the history back to the resumed step, so steps that a killed run logged after its
last checkpoint are not doubled. No wall times are logged (dvclive's timestamps stay off).
"""
from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

from .train import TrainingLogger


def truncate_history(directory: str | os.PathLike, from_step: int) -> None:
    """Drop rows with ``step >= from_step`` from every dvclive history file under ``directory``."""
    for path in Path(directory, "plots", "metrics").rglob("*.tsv"):
        rows = list(csv.reader(io.StringIO(path.read_text()), delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        column = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if len(r) > column and int(r[column]) < from_step]
        out = io.StringIO()
        csv.writer(out, delimiter="\t", lineterminator="\n").writerows(kept)
        path.write_text(out.getvalue())


class LiveLogger(TrainingLogger):
    """Logs through dvclive into ``directory`` (no dvc.yaml edits, no experiment commits, no report)."""

    def __init__(self, directory: str | os.PathLike, resume_step: int | None = None, plan: dict | None = None):
        from dvclive import Live

        directory = Path(directory)
        if resume_step is None:
            shutil.rmtree(directory, ignore_errors=True)  # a fresh run: nothing from older runs stays
        else:
            truncate_history(directory, resume_step)
        self.live = Live(str(directory), resume=resume_step is not None, report=None, save_dvc_exp=False,
                         dvcyaml=False)
        if plan is not None:
            self.live.summary["plan"] = plan

    def step(self, step: int, loss: float, lr: float) -> None:
        self.live.step = step
        self.live.log_metric("train/loss", loss)
        self.live.log_metric("train/lr", lr)

    def epoch(self, epoch: int, step: int, loss: float) -> None:
        self.live.step = step
        self.live.log_metric("train/epoch_loss", loss)
        self.live.log_metric("epoch", epoch, plot=False)
        self.live.make_summary()

    def close(self) -> None:
        self.live.make_summary()
        self.live.end()
