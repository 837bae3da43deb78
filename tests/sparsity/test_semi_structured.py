"""2:4 on sparse tensor cores: without CUDA nothing is converted and the decision is logged (no GPU needed);
with CUDA (>= 8.0) the converted model matches the masked dense one."""
import logging

import pytest
import torch

from clipprune.sparsity import apply_weights, available_methods, parse_config, sparsify
from clipprune.sparsity.semi_structured import (CPU_DECISION, check_semi_structured, semi_structured_support,
                                                to_semi_structured)

from models import tiny_open_clip


def _two_four(model):
    config = parse_config({"method": "magnitude", "mask_type": "2:4", "targets": [0.5]}, available_methods())
    apply_weights(model, sparsify(model, config, None, progress=False).weights[0.5], ["vision"])
    return model


def test_without_cuda_nothing_changes_and_the_decision_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _two_four(tiny_open_clip(seed=0))
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="clipprune.sparsity.semi_structured"):
        summary = to_semi_structured(model, ["vision"])
        report = check_semi_structured(model, ["vision"], torch.zeros(1, 3, 32, 32))
    assert summary == {"converted": [], "dense": {}, "reason": "no CUDA device"}
    assert report == {"used": False, "reason": "no CUDA device", "statement": CPU_DECISION}
    assert "file size, not speed" in CPU_DECISION
    assert sum(CPU_DECISION in r.getMessage() for r in caplog.records) == 2
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)


@pytest.mark.skipif(not semi_structured_support()[0], reason="needs CUDA with compute capability >= 8.0")
def test_converted_model_matches_the_masked_dense_model_on_cuda():
    torch.manual_seed(0)
    from models import OPEN_CLIP_CFG  # widths the sparse kernels take (multiples of 64 / 128)
    cfg = {**OPEN_CLIP_CFG, "vision_cfg": {**OPEN_CLIP_CFG["vision_cfg"], "width": 256, "head_width": 64}}
    model = _two_four(tiny_open_clip(seed=0, model_cfg=cfg))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = check_semi_structured(model, ["vision"], images)
    assert report["used"] and report["converted"]
    assert report["max_abs_diff"] <= 1e-2 * max(1.0, report["max_abs"])
