"""What a stage process prints besides its own lines: warnings on one line, no transformers loading bars."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

# a stage as stages/<name>.py are written: run_stage(name, main)
STAGE = textwrap.dedent("""
    import sys, warnings
    sys.path.insert(0, {stages!r})
    from _common import run_stage
    from clipprune.tuning import TuningWarning

    def main(params):
        warnings.warn("tune: vision layer 3 heads: scales leave [-10, 10]; keeping the binary mask",
                      TuningWarning)
        warnings.warn("a library's message\\n  over two lines", UserWarning)
        if {model_dir!r}:
            from clipprune.models import load_model
            load_model("hf:" + {model_dir!r})
        print("tune: wrote nothing", file=sys.stderr)

    run_stage("tune", main, params_path={params!r})
""")


def _run_stage_script(tmp_path, model_dir: str = "") -> subprocess.CompletedProcess:
    script = tmp_path / "stage.py"
    script.write_text(STAGE.format(stages=str(REPO / "stages"), params=str(REPO / "params.yaml"),
                                   model_dir=model_dir))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PYTHONWARNINGS"] = "default"
    return subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


def test_warnings_print_one_clean_line(tmp_path):
    done = _run_stage_script(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "tune: TuningWarning: vision layer 3 heads: scales leave [-10, 10]; keeping the binary mask",
        "tune: UserWarning: a library's message over two lines",
        "tune: wrote nothing",
        done.stderr.splitlines()[-1],
    ]
    assert done.stderr.splitlines()[-1].startswith("tune: done in ")
    assert "warnings.warn(" not in done.stderr and "stage.py" not in done.stderr  # no source line, no location


def test_loading_a_transformers_model_prints_no_bars(tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPModel

    from clipprune.models.hf_tokenizer_files import write_hf_tokenizer_files

    torch.manual_seed(0)
    model_dir = tmp_path / "clip"
    CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 2},
                         vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "patch_size": 32},
                         projection_dim=16)).save_pretrained(str(model_dir))
    write_hf_tokenizer_files(model_dir)
    plain = subprocess.run([sys.executable, "-c", f"from clipprune.models import load_model; "
                                                  f"load_model('hf:{model_dir}')"],
                           capture_output=True, text=True, timeout=300,
                           env={**{k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"},
                                "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert "Loading weights" in plain.stderr  # outside a stage transformers draws its bar: the test can fail
    done = _run_stage_script(tmp_path, str(model_dir))
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "\r" not in done.stderr
    assert len(done.stderr.splitlines()) == 4


def test_run_stage_restores_what_it_changed(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "stages"))
    try:
        import _common
    finally:
        sys.path.remove(str(REPO / "stages"))
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    before = warnings.showwarning
    seen = {}

    def main(params):
        seen["showwarning"] = warnings.showwarning
        seen["bars"] = hf_logging.is_progress_bar_enabled()
        seen["env"] = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")

    _common.run_stage("tune", main, params_path=str(REPO / "params.yaml"))
    assert seen["showwarning"] is not before and seen["bars"] is False and seen["env"] == "1"
    assert warnings.showwarning is before and hf_logging.is_progress_bar_enabled()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
