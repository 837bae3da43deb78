"""Wall-clock latency of a callable, and the latency ratio of two callables measured interleaved."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch



def _synchronize() -> None:
    """Wait for queued GPU work so that a timer measures it (no-op on CPU-only runs)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object]) -> float:
    _synchronize()
    start = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - start


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls.

    Runs under ``torch.inference_mode`` and synchronises CUDA around each call when CUDA is in use.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = [_time_once(fn) for _ in range(repeats)]
    return statistics.median(times)


def latency_ratio(fn_a: Callable[[], object], fn_b: Callable[[], object], warmup: int = 3,
                  repeats: int = 10) -> dict[str, float]:
    """Latency of ``fn_a`` relative to ``fn_b`` (e.g. pruned vs dense), measured interleaved in one run.

    Each round times both, alternating which goes first (a, b then b, a, ...), so drift in clock speed or
    load affects both alike. Returns ``{"a_seconds", "b_seconds"}`` (medians), ``"ratio"``, the median
    of the per-round ratios a / b (below 1 means ``fn_a`` is faster), and ``"ratio_min"`` / ``"ratio_max"``,
    their spread over the rounds.
    """
    times_a, times_b, ratios = [], [], []
    with torch.inference_mode():
        for _ in range(warmup):
            fn_a()
            fn_b()
        for round_index in range(repeats):
            if round_index % 2 == 0:
                t_a = _time_once(fn_a)
                t_b = _time_once(fn_b)
            else:
                t_b = _time_once(fn_b)
                t_a = _time_once(fn_a)
            times_a.append(t_a)
            times_b.append(t_b)
            ratios.append(t_a / max(t_b, 1e-12))
    return {"a_seconds": statistics.median(times_a), "b_seconds": statistics.median(times_b),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
