"""Latency helpers return sane numbers (no assertions on actual speed)."""
import math

import torch

from clipprune.evaluate.latency import latency_ratio, measure_latency


def matmul(n):
    a = torch.randn(n, n)
    return lambda: a @ a


def test_measure_latency_positive_finite_under_inference_mode():
    seen = []
    seconds = measure_latency(lambda: seen.append(torch.is_inference_mode_enabled()) or matmul(32)(),
                              warmup=2, repeats=5)
    assert seconds > 0 and math.isfinite(seconds)
    assert len(seen) == 7 and all(seen)


def test_latency_ratio_interleaves_and_is_finite():
    order = []
    a, b = matmul(16), matmul(48)
    result = latency_ratio(lambda: order.append("a") or a(), lambda: order.append("b") or b(),
                           warmup=1, repeats=4)
    assert set(result) == {"a_seconds", "b_seconds", "ratio", "ratio_min", "ratio_max"}
    assert all(v > 0 and math.isfinite(v) for v in result.values())
    assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]  # the spread over the rounds
    # warm-up a b, then rounds alternate which runs first
    assert "".join(order) == "ab" + "ab" + "ba" + "ab" + "ba"
