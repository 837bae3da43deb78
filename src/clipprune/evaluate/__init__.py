"""Evaluation: zero-shot classification and retrieval (CLIP_benchmark definitions), complexity, latency."""
from clipprune.evaluate.complexity import (file_size_bytes, file_size_mb, model_complexity,
                                           tower_complexity)
from clipprune.evaluate.latency import latency_ratio, measure_latency
from clipprune.evaluate.retrieval import evaluate_retrieval, retrieval_metrics
from clipprune.evaluate.zeroshot import build_classifier, classification_metrics, zero_shot_classification

__all__ = [
    "build_classifier", "classification_metrics", "zero_shot_classification",
    "retrieval_metrics", "evaluate_retrieval",
    "model_complexity", "tower_complexity", "file_size_bytes", "file_size_mb",
    "measure_latency", "latency_ratio",
]
