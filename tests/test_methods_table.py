"""scripts/methods_table.py without DVC: the per-criterion overrides and the markdown table (fast)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
spec = importlib.util.spec_from_file_location("methods_table_script", SCRIPTS / "methods_table.py")
methods = importlib.util.module_from_spec(spec)
spec.loader.exec_module(methods)

from clipprune.scoring import available_criteria  # noqa: E402
from clipprune.search import available_searches  # noqa: E402


def as_dict(items):
    return {item.lstrip("+").split("=", 1)[0]: item.split("=", 1)[1] for item in items}


def test_every_run_shares_the_budget_and_search_and_only_the_criterion_differs():
    runs = {name: as_dict(methods.overrides(name, 0.4)) for name in methods.METHODS}
    for name, settings in runs.items():
        assert settings["score.criterion"] == name and name in available_criteria()
        assert settings["search.method"] == "param_sum" and settings["search.method"] in available_searches()
        assert settings["search.metric"] == "params" and settings["search.constraint"] == "0.4"
        assert settings["tune.lsq"] == settings["tune.rearrange"] == settings["distill.enabled"] == "false"
    # a criterion's own setting wins over the common one, and appears once
    taylor = methods.overrides("taylor_entropy", 0.5)
    assert [item for item in taylor if item.startswith("score.granularity")] == ["score.granularity=sample"]
    assert "+score.options.norm=l1" in methods.overrides("magnitude", 0.5)


def test_overridden_keys_exist_in_params_yaml_unless_added():
    params = yaml.safe_load((SCRIPTS.parent / "params.yaml").read_text())
    for name in methods.METHODS:
        for item in methods.overrides(name, 0.5):
            if item.startswith("+"):
                continue
            node = params
            for part in item.split("=", 1)[0].split("."):
                assert part in node, f"{item}: params.yaml has no {part!r}"
                node = node[part]


def test_markdown_lists_each_criterion_and_reports_missing_runs():
    rows = [{"Experiment": methods.experiment_name("fisher", 0.5), "summary.params_m": "4.6", "summary.top1": "86.4",
             "summary.dense_top1": "96.7", "summary.file_mb": "18.5"},
            {"Experiment": methods.experiment_name("label_free", 0.5), "summary.top1": "86.9"}]
    text, missing = methods.markdown(rows, ["fisher", "label_free", "magnitude"], 0.5)
    assert missing == ["magnitude"]
    assert "| Fisher, with captions (contrastive loss)" in text and "86.4" in text and "86.9" in text
    assert "Dense zero-shot top-1: 96.7 %" in text and "`search.constraint: 0.5`" in text
    assert methods.experiment_name("taylor_entropy", 0.5) == "methods-taylor-entropy-50"


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        methods.main(["--budget", "1.5", "--show"])
    assert "--budget must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        methods.main(["--criteria", "oracle", "--show"])
    assert "unknown oracle" in capsys.readouterr().err
