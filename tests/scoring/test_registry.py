"""The criterion registry: lookup, parameter checks and result validation."""
import pytest
import torch

from clipprune.errors import ParamError
from clipprune.scoring import (ScoreResult, available_criteria, fisher_scores, get_criterion, magnitude_scores,
                               parse_towers, register_criterion)
from clipprune.scoring import registry

from models import single_thread_fixture, tiny_model

single_thread = single_thread_fixture()


def test_builtin_criteria_are_registered():
    assert available_criteria() == sorted(available_criteria())
    assert {"fisher", "magnitude"} <= set(available_criteria())
    assert get_criterion("fisher") is fisher_scores and get_criterion("magnitude") is magnitude_scores
    assert get_criterion("fisher").needs_data and not get_criterion("magnitude").needs_data


def test_unknown_criterion_names_the_parameter():
    with pytest.raises(ParamError, match=r"^score\.criterion must be one of .*fisher.*magnitude.*; got 'taylor'$"):
        get_criterion("taylor")
    with pytest.raises(ParamError, match="score.criterion"):
        get_criterion(None)


def test_parameter_checks():
    model = tiny_model("open_clip")
    magnitude = get_criterion("magnitude")
    assert parse_towers("both") == ("vision", "text") and parse_towers(["text", "vision"]) == ("vision", "text")
    with pytest.raises(ParamError, match=r"^score\.towers must be one of vision, text, both; got 'audio'$"):
        magnitude(model, None, towers="audio")
    with pytest.raises(ParamError, match=r"^score\.granularity must be one of batch, sample; got 'token'$"):
        magnitude(model, None, granularity="token")
    with pytest.raises(ParamError, match=r"^score\.loss must be one of"):
        magnitude(model, None, loss="mse")
    with pytest.raises(ParamError, match=r"^score\.options: unknown option\(s\) keep_grads for criterion 'magnitude'"):
        magnitude(model, None, keep_grads=True)


def test_registered_criteria_are_checked_and_timed(monkeypatch):
    monkeypatch.setattr(registry.CRITERIA, "_entries", dict(registry.CRITERIA._entries))  # test criteria vanish afterwards

    @register_criterion("test_constant")
    def constant(model, loader, *, towers, loss, granularity, progress, value: float = 1.0):
        scores = {}
        for tower in towers:
            scores[f"{tower}.head"] = torch.full((2, 4), value)
            scores[f"{tower}.neuron"] = torch.full((2, 8), value)
        return ScoreResult(scores=scores, meta={"num_samples": 0})

    model = tiny_model("open_clip")
    result = get_criterion("test_constant")(model, None, towers="text", value=2.0)
    assert sorted(result.scores) == ["text.head", "text.neuron"]
    assert result.meta["criterion"] == "test_constant" and result.meta["towers"] == ["text"]
    assert result.meta["wall_time_s"] >= 0
    with pytest.raises(RuntimeError, match="non-finite"):
        get_criterion("test_constant")(model, None, value=float("nan"))
    with pytest.raises(ValueError, match="already registered"):
        @register_criterion("fisher")
        def other(model, loader, *, towers, loss, granularity, progress):
            raise AssertionError

    @register_criterion("test_wrong_keys")
    def wrong(model, loader, *, towers, loss, granularity, progress):
        return ScoreResult(scores={"vision.head": torch.ones(2, 4)})

    with pytest.raises(RuntimeError, match="score keys"):
        get_criterion("test_wrong_keys")(model, None, towers="both")
    monkeypatch.undo()
    assert "test_constant" not in available_criteria()
