"""The one file that compares runs: a flat ``summary`` block read from the stages' result files.

``build_summary`` fills each column of ``COLUMNS`` from one source file (a JSON path in it) and says where
each value came from. A column whose source file is absent, or lacks the key, is null with the reason:
it was not computed by this run (no pruned model, distillation off, no sparsity targets), never a value
left over from an earlier run. Adding a column is one line of ``COLUMNS``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from ..errors import DataError

MAX_COLUMNS = 25  # what `dvc exp show` can show on a screen next to the params


def _pct(value):
    return 100.0 * value


def _millions(value):
    return value / 1e6


def _joined(value):
    return "+".join(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Column:
    """``name`` in summary.json: the value at ``path`` (dot-separated keys) of source ``source``, through
    ``convert``; null when ``unless`` (a path in the same source) holds False (the step was switched off)."""

    name: str
    source: str
    path: str
    convert: Callable | None = None
    unless: str | None = None
    what: str = ""


# (column, source, JSON path, conversion): the sources are named in SOURCES; percentages 0-100
COLUMNS: tuple[Column, ...] = (
    Column("method", "metrics", "summary.method", what="score criterion + search method"),
    Column("constraint", "metrics", "summary.constraint", what="search.constraint as the masks record it"),
    Column("pruned_towers", "metrics", "summary.towers", _joined, what="towers the search pruned"),
    Column("mac_pct", "metrics", "pruned.kept_mac_fraction", _pct, what="kept prunable MACs of the pruned towers (%)"),
    Column("params_m", "metrics", "pruned.complexity.params", _millions, what="final model's parameters (M)"),
    Column("params_pct", "metrics", "pruned.params_ratio", _pct, what="kept share of all parameters (%)"),
    Column("top1", "metrics", "pruned.zeroshot.acc1", _pct, what="final model's zero-shot top-1 (%)"),
    Column("top5", "metrics", "pruned.zeroshot.acc5", _pct, what="final model's zero-shot top-5 (%)"),
    Column("top1_before_distill", "metrics", "pruned.before_distill.zeroshot.acc1", _pct,
           what="exported model's zero-shot top-1 (%)"),
    Column("dense_top1", "metrics", "dense.zeroshot.acc1", _pct, what="dense model's zero-shot top-1 (%)"),
    Column("r1_t2i", "metrics", "pruned.retrieval.image_retrieval_recall@1", _pct, what="text→image R@1 (%)"),
    Column("r5_t2i", "metrics", "pruned.retrieval.image_retrieval_recall@5", _pct, what="text→image R@5 (%)"),
    Column("r1_i2t", "metrics", "pruned.retrieval.text_retrieval_recall@1", _pct, what="image→text R@1 (%)"),
    Column("r5_i2t", "metrics", "pruned.retrieval.text_retrieval_recall@5", _pct, what="image→text R@5 (%)"),
    Column("latency_ratio_image", "metrics", "pruned.latency_ratio.image",
           what="image encoder latency, final / dense, interleaved (median over rounds)"),
    Column("latency_ratio_text", "metrics", "pruned.latency_ratio.text",
           what="text encoder latency, final / dense, interleaved (median over rounds)"),
    Column("file_mb", "metrics", "pruned.file_mb", what="final model's safetensors size (MB)"),
    Column("onnx_latency_ratio_image", "metrics", "onnx.image.latency_ratio",
           what="image encoder latency in ONNX Runtime, final / dense, interleaved"),
    Column("pruning_time_s", "metrics", "pruning_time_s.total", what="wall time of score + search + tune (s)"),
    Column("distill_time_s", "distill_timing", "wall_time_s", unless="enabled",
           what="wall time of distillation (s)"),
    Column("distill_towers", "distill_log", "plan.towers", _joined, unless="enabled",
           what="towers that distillation trained"),
    Column("sparse_method", "sparsity", "method", what="weight sparsity method (largest target)"),
    Column("sparse_target", "sparsity", "target", what="largest sparsity target"),
    Column("sparse_top1", "sparsity", "sparse.zeroshot.acc1", _pct,
           what="zero-shot top-1 of the sparse model at the largest target (%)"),
    Column("sparse_file_ratio", "sparsity", "file_bytes.ratio",
           what="compact sparse file / dense file at the largest target"),
)

# source name -> the stage that writes it (what summary_sources.json names)
SOURCES = {"metrics": "evaluate", "distill_timing": "distill", "distill_log": "distill",
           "sparsity": "sparsify"}

_MISSING = object()


def _lookup(document, path: str):
    for key in path.split("."):
        if not isinstance(document, Mapping) or key not in document:
            return _MISSING
        document = document[key]
    return document


def read_source(path: Path | None) -> dict | None:
    """A source's JSON object; None if there is no such file (the step did not run); DataError if damaged."""
    if path is None or not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({type(err).__name__})") from None
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected a JSON object")
    return document


def largest_target_report(folder: Path) -> Path | None:
    """The sparsify report of the largest target in ``folder`` (``<target>.json``); None if there is none."""
    if not folder.is_dir():
        return None
    reports = []
    for path in folder.glob("*.json"):
        try:
            reports.append((float(path.stem), path))
        except ValueError:  # not a target's report (an N:M pattern's name sorts by its file name below)
            reports.append((float("inf"), path))
    return max(reports, key=lambda item: (item[0], item[1].name))[1] if reports else None


def build_summary(paths: Mapping[str, Path | None], columns: tuple[Column, ...] = COLUMNS) -> tuple[dict, dict]:
    """``(summary, sources)`` for the given source files (``{source name: path or None}``).

    ``summary`` maps every column to its value or None; ``sources`` maps every column to where the value
    came from (``{"stage", "file", "key", "what"}``) or why it is null (``{"null": reason, ...}``).
    """
    if len(columns) > MAX_COLUMNS:
        raise ValueError(f"{len(columns)} summary columns: at most {MAX_COLUMNS} fit `dvc exp show`")
    documents = {name: read_source(path) for name, path in paths.items()}
    summary, sources = {}, {}
    for column in columns:
        path = paths.get(column.source)
        where = {"stage": SOURCES.get(column.source, column.source), "file": None if path is None else str(path),
                 "key": column.path, "what": column.what}
        document = documents.get(column.source)
        value, reason = None, None
        if document is None:
            reason = "not computed: no such file" if path is not None else "not computed: no source given"
        elif column.unless is not None and _lookup(document, column.unless) is False:
            reason = f"not computed: {column.unless} is false"
        else:
            found = _lookup(document, column.path)
            if found is _MISSING:
                reason = f"not computed: no {column.path} in the file"
            elif found is None:
                reason = "null in the file"
            else:
                value = column.convert(found) if column.convert is not None else found
        summary[column.name] = value
        sources[column.name] = where if reason is None else {**where, "null": reason}
    return summary, sources
