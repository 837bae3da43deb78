"""Bad onnx / search.metric latency / search.align params: one line naming the key."""
import copy

import pytest

from clipprune.config import parse_params
from clipprune.errors import ParamError
from clipprune.params import load_params
from pipeline_utils import REPO, set_key

DEFAULT = load_params(REPO / "params.yaml")


def _error(*edits) -> str:
    params = copy.deepcopy(DEFAULT)
    for key, value in edits:
        set_key(params, key, value)
    with pytest.raises(ParamError) as info:
        parse_params(params)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("edits, expected", [
    ([("onnx.opset", 9)], "onnx.opset must be >= 14, got 9"),
    ([("onnx.opset", 17.0)], "onnx.opset must be an integer, got 17.0 (float)"),
    ([("onnx.atol", -1e-4)], "onnx.atol must be >= 0, got -0.0001"),
    ([("onnx.rtol", "tight")], "onnx.rtol must be a finite number, got 'tight' (str)"),
    ([("onnx.atoll", 1)], "onnx.atoll: unknown key; did you mean `atol`?"),
    ([("search.metric", "speed")], "search.metric must be one of mac, params, latency; got 'speed'"),
    ([("search.metric", "latency"), ("search.method", "uniform")],
     "search.method must be one of mac with search.metric latency, got 'uniform'"),
    ([("search.align", 0)], "search.align must be >= 1, got 0"),
    ([("search.align", 10**6)], "search.align must be <= 4096, got 1000000"),
    ([("search.align", 8), ("search.method", "adaptive")],
     "search.align must be 1 with search.method adaptive (its widths follow search.loss_inc_thresh, there is no "
     "budget to round within), got 8"),
    ([("search.latency_points", 1)], "search.latency_points must be >= 2, got 1"),
])
def test_bad_deploy_params_are_one_line(edits, expected):
    assert _error(*edits) == expected


def test_the_defaults_leave_existing_outputs_alone():
    p = parse_params(DEFAULT)
    assert (p.search.metric, p.search.align) == ("mac", 1)  # no latency table measured, widths not rounded
    assert (p.onnx.opset, p.onnx.atol, p.onnx.rtol) == (17, 1e-4, 1e-3)
