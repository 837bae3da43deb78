"""The search registry and the shared parameter checks."""
import pytest
import torch

from clipprune.errors import MaskError, ParamError
from clipprune.search import available_searches, get_search, mac_search, register_search, uniform_search
from clipprune.search import registry

from . import ONE_TOWER, random_scores


def scores():
    return random_scores(ONE_TOWER, torch.Generator().manual_seed(0))


def test_builtin_searches_are_registered():
    assert {"mac", "uniform"} <= set(available_searches())
    assert available_searches() == sorted(available_searches())
    assert get_search("mac") is mac_search
    assert get_search("uniform") is uniform_search


def test_unknown_method_names_the_parameter():
    with pytest.raises(ParamError, match=r"^search\.method must be one of .*mac.*uniform.*; got 'kwon'$"):
        get_search("kwon")
    with pytest.raises(ParamError, match="search.method"):
        get_search(None)


# search.constraint, search.metric and the option values are checked with params.yaml: tests/test_config.py


def test_integer_one_is_a_valid_constraint():
    masks = uniform_search(scores(), ONE_TOWER, 1)
    assert all(bool((m == 1).all()) for m in masks.values())


def test_unknown_option():
    with pytest.raises(ParamError, match=r"unknown option\(s\) beta for method 'mac'; known: normalize"):
        get_search("mac")(scores(), ONE_TOWER, 0.5, beta=1)


def test_register_custom_search(monkeypatch):
    monkeypatch.setattr(registry.SEARCHES, "_entries", dict(registry.SEARCHES._entries))

    @register_search("keep_all")
    def keep_all(scores, views, constraint, metric="mac", *, value=1.0):
        return {key: torch.full_like(s, value, dtype=torch.float32) for key, s in scores.items()}

    assert "keep_all" in available_searches()
    masks = get_search("keep_all")(scores(), ONE_TOWER, 1.0, value=1.0)
    assert set(masks) == set(scores())
    with pytest.raises(ParamError, match="unknown option"):
        get_search("keep_all")(scores(), ONE_TOWER, 1.0, normalize="none")

    with pytest.raises(ValueError, match="already registered"):
        @register_search("mac")
        def another_mac(scores, views, constraint, metric="mac"):
            return {}


def test_bad_scores_are_mask_errors():
    with pytest.raises(MaskError, match="non-empty dict"):
        mac_search({}, ONE_TOWER, 0.5)
    with pytest.raises(MaskError, match="'audio.head' names tower 'audio'"):
        mac_search({"audio.head": torch.ones(3, 4)}, ONE_TOWER, 0.5)
