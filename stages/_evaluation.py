"""What the evaluation stages (evaluate_dense, evaluate, sparsify@) read from params.yaml: where the
evaluation data lives and what the dense evaluation depends on."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clipprune.config import Params
from clipprune.data.evalsets import EvalDatasetSpec
from clipprune.errors import DataError
from clipprune.evaluate.dense import evaluation_inputs
from clipprune.evaluate.suite import EvalData


def eval_data_from_params(params: Params) -> EvalData:
    """The evaluation splits that params.yaml names (``data.*`` and ``evaluate.*``), paths under data/raw/."""
    data, split = params.data, params.evaluate.retrieval_split
    classification = data.layout.classification is not None
    return EvalData(
        retrieval_images=data.path(f"{split}_images"),
        retrieval_captions=data.path(f"{split}_captions"),
        classification=data.path("classification") if classification else None,
        classnames=data.path("classnames") if classification else None,
        templates=data.path("templates") if classification else None,
        max_retrieval_images=params.evaluate.max_retrieval_images,
    )


@dataclass(frozen=True)
class DenseSettings:
    """What the dense evaluation depends on, parsed from params (``model``, ``seed``, ``data.*``,
    ``evaluate.batch_size`` / ``retrieval_split`` / ``max_retrieval_images`` / ``datasets``)."""

    model: str
    seed: int
    batch_size: int
    data: EvalData
    datasets: tuple[EvalDatasetSpec, ...]

    def inputs(self) -> dict:
        return evaluation_inputs(self.model, self.seed, self.batch_size, self.data, self.datasets)


def dense_settings_from_params(params: Params) -> DenseSettings:
    """What the dense evaluation depends on, from params parsed with ``seed``, ``model``, ``data``, ``evaluate``."""
    return DenseSettings(model=params.model, seed=params.seed, batch_size=params.evaluate.batch_size,
                         data=eval_data_from_params(params), datasets=params.evaluate.datasets)


def read_wall_times(timing_dir: Path, steps: tuple[str, ...]) -> dict[str, float]:
    """``{step: wall_time_s}`` from the timing files ``<timing_dir>/<step>.json`` the stages wrote (a step
    that did not run has none); a file without a numeric ``wall_time_s`` is a DataError naming it."""
    times = {}
    for step in steps:
        path = timing_dir / f"{step}.json"
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text()).get("wall_time_s")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise DataError(f"{path}: not a timing file ({type(err).__name__})") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{path}: wall_time_s must be a number, got {value!r}")
        times[step] = float(value)
    return times
