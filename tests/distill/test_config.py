"""distill params: validation with one-line errors naming the key, lr rules, the LFPR schedule lookup."""
import copy
import math

import pytest
import yaml

from clipprune.distill import (DEFAULT_RETRAIN_SCHEDULE, lr_at, parse_distill_params, parse_schedule, retrain_row,
                               scaled_lr)
from clipprune.errors import ParamError
from pipeline_utils import REPO

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _with(**changes):
    params = copy.deepcopy(PARAMS)
    for key, value in changes.items():
        node = params["distill"]
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return params


def test_repo_params_parse_and_schedule_matches_lfpr():
    config = parse_distill_params(PARAMS)
    assert config.epochs >= 1 and config.towers == ("vision",)
    assert config.retrain_schedule == DEFAULT_RETRAIN_SCHEDULE
    assert [(r.keep, r.data, r.blocks) for r in config.retrain_schedule] == [
        (0.2, 1.0, 3), (0.3, 0.86, 2), (0.4, 0.73, 2), (0.5, 0.6, 1), (0.6, 0.1, 0)]


def test_lr_scales_with_the_global_batch():
    assert scaled_lr(1e-3, 256) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 64) == pytest.approx(2.5e-4)
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3)
    config = parse_distill_params(_with(base_lr=2e-3, batch_size=128))
    assert config.peak_lr == pytest.approx(1e-3)


def test_warmup_is_linear_and_cosine_ends_at_min_lr():
    peak, total, warm = 1.0, 110, 10
    assert [lr_at(s, total, peak, warm) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(warm - 1, total, peak, warm) == pytest.approx(peak)
    assert lr_at(warm, total, peak, warm) == pytest.approx(peak)
    assert lr_at(warm + 50, total, peak, warm) == pytest.approx(0.5)  # half way through the cosine
    assert lr_at(total, total, peak, warm, min_lr=0.1) == pytest.approx(0.1)
    lrs = [lr_at(s, total, peak, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, 5, 0.3, 0) == pytest.approx(0.3)  # no warm-up: starts at the peak


@pytest.mark.parametrize("keep, expected", [
    (0.05, (0.2, 1.0, 3)),  # below the table: the first row (most retraining)
    (0.2, (0.2, 1.0, 3)), (0.25, (0.2, 1.0, 3)), (0.3, (0.3, 0.86, 2)), (0.47, (0.4, 0.73, 2)),
    (0.5, (0.5, 0.6, 1)), (0.59, (0.5, 0.6, 1)), (0.6, (0.6, 0.1, 0)), (0.95, (0.6, 0.1, 0)),
])
def test_retrain_schedule_is_a_step_lookup(keep, expected):
    row = retrain_row(DEFAULT_RETRAIN_SCHEDULE, keep)
    assert (row.keep, row.data, row.blocks) == expected


@pytest.mark.parametrize("changes, key", [
    ({"epochs": 0}, "distill.epochs"),
    ({"epochs": -3}, "distill.epochs"),
    ({"epochs": 1.5}, "distill.epochs"),
    ({"loss": "cosine"}, "distill.loss"),
    ({"mode": "finetune"}, "distill.mode"),
    ({"nproc": 0}, "distill.nproc"),
    ({"nproc": 3}, "distill.batch_size"),  # 64 does not split over 3 processes
    ({"batch_size": 0}, "distill.batch_size"),
    ({"base_lr": 0}, "distill.base_lr"),
    ({"base_lr": "1e-3"}, "distill.base_lr"),  # YAML reads 1e-3 without a dot as a string
    ({"min_lr": 1.0}, "distill.min_lr"),
    ({"towers": "audio"}, "distill.towers"),
    ({"enabled": "yes"}, "distill.enabled"),
    ({"num_samples": 0}, "distill.num_samples"),
    ({"warmup_steps": -1}, "distill.warmup_steps"),
    ({"logit_scale": -1.0}, "distill.logit_scale"),
    ({"kl_pairs": "text_text"}, "distill.kl_pairs"),
    ({"device": "tpu"}, "distill.device"),
    ({"retrain__schedule": []}, "distill.retrain.schedule"),
    ({"retrain__schedule": [{"keep": 0.5, "data": 0.6}]}, "distill.retrain.schedule[0]"),
    ({"retrain__schedule": [{"keep": 0.5, "data": 1.5, "blocks": 1}]}, "distill.retrain.schedule[0].data"),
    ({"retrain__schedule": [{"keep": 0.5, "data": 0.5, "blocks": -1}]}, "distill.retrain.schedule[0].blocks"),
    ({"retrain__schedule": [{"keep": 0.5, "data": 0.5, "blocks": 1}, {"keep": 0.4, "data": 0.5, "blocks": 1}]},
     "distill.retrain.schedule[1].keep"),
])
def test_bad_params_give_one_line_naming_the_key(changes, key):
    with pytest.raises(ParamError) as info:
        parse_distill_params(_with(**changes))
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message, message


def test_missing_section_and_key_are_named():
    params = copy.deepcopy(PARAMS)
    del params["distill"]["epochs"]
    with pytest.raises(ParamError, match=r"^distill\.epochs is required"):
        parse_distill_params(params)
    del params["distill"]
    with pytest.raises(ParamError, match=r"^distill is required"):
        parse_distill_params(params)


def test_schedule_parse_accepts_custom_rows():
    rows = parse_schedule([{"keep": 0.1, "data": 1.0, "blocks": 4}, {"keep": 0.7, "data": 0.2, "blocks": 0}])
    assert retrain_row(rows, 0.69).blocks == 4 and math.isclose(retrain_row(rows, 0.7).data, 0.2)
