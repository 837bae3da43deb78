"""The dense baseline's evaluation: computed once (stage evaluate_dense), read by each experiment's evaluate.

Directory layout (one DVC out, written atomically)::

    <dir>/metrics.json                  {"format_version", "inputs", "metrics", "file_mb"}
    <dir>/text_embeddings.safetensors   the dense model's class and caption embeddings (``embeddings.py``)

``inputs`` records what the evaluation was made from (model name, seed, batch size, evaluation data, extra
datasets); :func:`load_dense_evaluation` refuses a directory made from other inputs, so a stage run by hand
after a params edit cannot mix a stale dense baseline into new metrics. ``metrics`` holds what
``suite.model_metrics`` gives (accuracy, extra datasets, complexity; no latency, a wall-clock figure that
the evaluate stage measures next to the pruned model), ``file_mb`` the dense model's size in the export format.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import atomic_dir
from .embeddings import TextEmbeddings, load_text_embeddings, save_text_embeddings

FORMAT_VERSION = 1
METRICS_NAME = "metrics.json"
EMBEDDINGS_NAME = "text_embeddings.safetensors"
# which params feed each key of ``inputs`` (for the message when they differ)
INPUT_PARAMS = {"model": "model", "seed": "seed", "batch_size": "evaluate.batch_size",
                "data": "data.name, data.layout, evaluate.retrieval_split or evaluate.max_retrieval_images",
                "datasets": "evaluate.datasets"}


@dataclass
class DenseEvaluation:
    """What evaluate_dense computed for the dense model (see the module docstring)."""

    inputs: dict
    metrics: dict
    file_mb: float
    text: TextEmbeddings


def _plain(value):
    """JSON-able form of dataclasses, paths and tuples (for ``inputs``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def evaluation_inputs(model: str, seed: int, batch_size: int, data, datasets) -> dict:
    """The ``inputs`` record: model name, seed, batch size, evaluation data and extra dataset specs."""
    return _plain({"model": model, "seed": seed, "batch_size": batch_size, "data": data, "datasets": list(datasets)})


def save_dense_evaluation(out_dir: str | os.PathLike, evaluation: DenseEvaluation) -> Path:
    """Write ``evaluation`` to ``out_dir`` atomically (both files or neither)."""
    record = {"format_version": FORMAT_VERSION, "inputs": evaluation.inputs, "metrics": evaluation.metrics,
              "file_mb": evaluation.file_mb}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / METRICS_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        save_text_embeddings(tmp / EMBEDDINGS_NAME, evaluation.text)
    return out_dir


def load_dense_evaluation(out_dir: str | os.PathLike, inputs: dict) -> DenseEvaluation:
    """Read what :func:`save_dense_evaluation` wrote; DataError if it is missing, malformed or made from
    other ``inputs`` than the ones given (naming the params that differ)."""
    out_dir = Path(out_dir)
    path = out_dir / METRICS_NAME
    if not path.is_file():
        raise DataError(f"{path}: dense evaluation not found (run the evaluate_dense stage first: dvc repro)")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version must be {FORMAT_VERSION} (written by evaluate_dense)")
    if not all(isinstance(record.get(key), dict) for key in ("inputs", "metrics")):
        raise DataError(f"{path}: missing or malformed 'inputs' / 'metrics'")
    stored = record["inputs"]
    differ = [key for key in sorted(set(stored) | set(inputs)) if stored.get(key) != inputs.get(key)]
    if differ:
        params = "; ".join(INPUT_PARAMS.get(key, key) for key in differ)
        raise DataError(f"{path}: the dense evaluation was made for other params ({params}); rerun the "
                        f"evaluate_dense stage (dvc repro)")
    text = load_text_embeddings(out_dir / EMBEDDINGS_NAME)
    return DenseEvaluation(stored, record["metrics"], record.get("file_mb"), text)
