"""model_files: which local files a model name reads, and the stages' check that the `model_files` param covers them.

The HF cache is a fake one under tmp_path in huggingface_hub's own layout (blobs + snapshot symlinks +
refs/main); nothing touches the network. Where a library resolves the same name itself (open_clip's
``download_pretrained``, transformers' ``from_pretrained``), the test checks that it reads from the folder
``resolve_model_files`` returned.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipprune.errors import ModelLoadError, ParamError
from clipprune.model_files import check_model_files, covers, resolve_model_files
from models import (IMAGE_MEAN, IMAGE_STD, OPEN_CLIP_CFG, fake_hub_snapshot, random_hf_module,
                    random_open_clip_module, saved_files, write_tiny_tokenizer)

REPO = Path(__file__).resolve().parents[1]
OPENAI_HUB = "timm/vit_base_patch32_clip_224.openai"  # open_clip's hf_hub for ViT-B-32/openai


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache under tmp_path, offline (huggingface_hub reads these constants at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def write_fixture(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(
        {"family": "open_clip", "model_cfg": OPEN_CLIP_CFG, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}))
    save_file({k: v.contiguous() for k, v in random_open_clip_module().state_dict().items()},
              str(directory / "model.safetensors"))
    return directory


# ---------------------------------------------------------------- resolution, one name kind at a time

def test_fixture_resolves_to_its_folder(tmp_path, monkeypatch):
    directory = write_fixture(tmp_path, "tiny_x")
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path))
    assert resolve_model_files("fixture:tiny_x") == (directory,)
    with pytest.raises(ModelLoadError, match=r"fixture:nope: .*nope/config.json not found.*CLIPPRUNE_FIXTURES"):
        resolve_model_files("fixture:nope")


def test_fixture_root_is_never_guessed_from_a_checkout(monkeypatch):
    monkeypatch.delenv("CLIPPRUNE_FIXTURES", raising=False)
    with pytest.raises(ModelLoadError, match=r"^fixture:<name> models .* CLIPPRUNE_FIXTURES, which is not set; "
                                             r".*stages set it to data/fixtures\)$"):
        resolve_model_files("fixture:tiny_clip")
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(REPO / "data/fixtures"))
    assert resolve_model_files("fixture:tiny_clip") == (REPO / "data/fixtures/tiny_clip",)


def test_open_clip_local_file_resolves_to_the_file(tmp_path):
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"not read by the resolver")
    assert resolve_model_files(f"open_clip:ViT-B-32/{checkpoint}") == (checkpoint,)


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_open_clip_tag_resolves_to_the_snapshot_open_clip_reads(hub_cache, filename):
    import open_clip
    from open_clip.pretrained import download_pretrained

    old = fake_hub_snapshot(hub_cache, OPENAI_HUB, {filename: b"old weights"}, revision="1" * 40)
    new = fake_hub_snapshot(hub_cache, OPENAI_HUB, {filename: b"new weights"}, revision="2" * 40)
    assert old.is_dir() and new != old
    resolved = resolve_model_files("open_clip:ViT-B-32/openai")
    assert resolved == (new,)  # refs/main's revision: the path itself names what is cached
    assert resolved[0].name == "2" * 40 and resolved[0].parent.name == "snapshots"
    # reference: the file open_clip itself would load, offline, from this cache
    target = Path(download_pretrained(open_clip.get_pretrained_cfg("ViT-B-32", "openai")))
    assert target == new / filename and covers(resolved[0], target)


def test_open_clip_tag_not_cached(hub_cache):
    with pytest.raises(ModelLoadError) as info:
        resolve_model_files("open_clip:ViT-B-32/laion2b_s34b_b79k")
    message = str(info.value)
    assert message.startswith("open_clip:ViT-B-32/laion2b_s34b_b79k: the weights (laion/CLIP-ViT-B-32-laion2B")
    assert "pre-download them into the HF/open_clip cache" in message and "\n" not in message


def test_open_clip_tag_with_an_hf_tokenizer_reads_two_snapshots(hub_cache):
    weights = fake_hub_snapshot(hub_cache, "timm/ViT-B-16-SigLIP", {"open_clip_model.safetensors": b"w",
                                                                     "tokenizer.json": b"{}"})
    assert resolve_model_files("open_clip:ViT-B-16-SigLIP/webli") == (weights, weights)  # same repo
    with pytest.raises(ParamError, match=r"model_files must be a folder holding .* and .*, got elsewhere"):
        check_model_files("open_clip:ViT-B-16-SigLIP/webli", "elsewhere")


@pytest.mark.parametrize("name, match", [
    ("open_clip:NoSuchArch/openai", "unknown architecture"),
    ("open_clip:ViT-B-32/no_such_tag", "neither a pretrained tag"),
    ("open_clip:ViT-B-32", "expected open_clip:<arch>/"),
    ("hf:", "expected hf:<repo id or local dir>"),
    ("hf:/no/such/dir", "is neither a local directory nor a valid hub repo id"),
    ("pruned:/no/such/export", "config.json not found"),
    ("torchhub:clip", "must start with one of fixture:, open_clip:, hf:, pruned:"),
])
def test_bad_names_fail_in_one_line(name, match):
    with pytest.raises(ModelLoadError, match=match) as info:
        resolve_model_files(name)
    assert "\n" not in str(info.value)


def test_hf_local_dir_resolves_to_it(tmp_path):
    (tmp_path / "clip").mkdir()
    assert resolve_model_files(f"hf:{tmp_path / 'clip'}") == (tmp_path / "clip",)


def test_hf_repo_id_resolves_to_the_snapshot_transformers_loads(hub_cache, tmp_path):
    from clipprune.models import load_model

    module = random_hf_module(seed=3)
    source = tmp_path / "saved"
    module.save_pretrained(str(source))
    write_tiny_tokenizer(source, context_length=16)
    snapshot = fake_hub_snapshot(hub_cache, "org/tiny-clip", saved_files(source))
    assert resolve_model_files("hf:org/tiny-clip") == (snapshot,)
    with pytest.warns(UserWarning, match="preprocessor_config.json"):
        model = load_model("hf:org/tiny-clip")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = module.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(model.encode_image(images).detach(), expected, atol=1e-6, rtol=0)
    assert model.tokenizer(["abc"]).shape == (1, 16)
    # the snapshot is what transformers reads: a new revision of the weights is what it loads then
    other = random_hf_module(seed=4)
    other.save_pretrained(str(tmp_path / "saved2"))
    write_tiny_tokenizer(tmp_path / "saved2", context_length=16)
    newer = fake_hub_snapshot(hub_cache, "org/tiny-clip", saved_files(tmp_path / "saved2"), revision="b" * 40)
    assert resolve_model_files("hf:org/tiny-clip") == (newer,)
    with pytest.warns(UserWarning):
        reloaded = load_model("hf:org/tiny-clip")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), other.get_image_features(pixel_values=images)
                                   .pooler_output, atol=1e-6, rtol=0)


def test_hf_repo_id_not_cached(hub_cache):
    with pytest.raises(ModelLoadError, match=r"hf:openai/clip-vit-base-patch32: .*pre-download them with "
                                             r"`huggingface-cli download openai/clip-vit-base-patch32`"):
        resolve_model_files("hf:openai/clip-vit-base-patch32")


def test_pruned_dir_resolves_to_it(tmp_path):
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "config.json").write_text("{}")
    assert resolve_model_files(f"pruned:{tmp_path / 'pruned'}") == (tmp_path / "pruned",)


# ---------------------------------------------------------------- the check

def test_check_accepts_the_path_or_a_folder_above_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_fixture(tmp_path / "data/fixtures", "x")
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", "data/fixtures")
    for declared in ("data/fixtures/x", "data/fixtures/x/", "data/fixtures", "data", str(tmp_path / "data/fixtures/x"),
                     "data/fixtures/../fixtures/x"):
        check_model_files("fixture:x", declared)
    (tmp_path / "link").symlink_to(tmp_path / "data/fixtures")
    check_model_files("fixture:x", "link/x")  # the same folder through a link


@pytest.mark.parametrize("declared", ["data/fixtures/tiny_clip", "data/fixtures/x/model.safetensors",
                                      "data/fixtures/xy"])
def test_check_names_the_expected_path(tmp_path, monkeypatch, declared):
    monkeypatch.chdir(tmp_path)
    write_fixture(tmp_path / "data/fixtures", "x")
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", "data/fixtures")
    with pytest.raises(ParamError) as info:
        check_model_files("fixture:x", declared)
    assert str(info.value) == f"model_files must be data/fixtures/x (the files model fixture:x reads), got {declared}"


def test_check_shows_an_hf_snapshot_as_an_absolute_path(hub_cache):
    snapshot = fake_hub_snapshot(hub_cache, OPENAI_HUB, {"open_clip_model.safetensors": b"w"})
    check_model_files("open_clip:ViT-B-32/openai", str(snapshot))
    check_model_files("open_clip:ViT-B-32/openai", str(hub_cache))  # the whole cache covers it too
    with pytest.raises(ParamError, match=f"model_files must be {snapshot} \\(the files model "
                                         f"open_clip:ViT-B-32/openai reads\\), got data/fixtures/tiny_clip"):
        check_model_files("open_clip:ViT-B-32/openai", "data/fixtures/tiny_clip")


# ---------------------------------------------------------------- the stage guard (stages/_common.py)

@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "stages"))
    monkeypatch.chdir(REPO)
    import _common

    return _common


def write_params(path: Path, **top) -> Path:
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(top)
    path.write_text(yaml.safe_dump(params))
    return path


def test_stages_that_load_the_model_declare_model_files(common):
    """The guard runs where dvc.yaml declares ${model_files}: exactly the stages that read `model`."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    reads_model = {name for name, spec in stages.items() if "model" in spec.get("do", spec).get("params", [])}
    assert reads_model >= {"score", "search", "tune", "export", "distill", "evaluate", "sparse_prune", "sparsify"}
    assert {name for name in stages if common.declares_model_files(name)} == reads_model
    assert not common.declares_model_files("writer")  # not a pipeline stage


def test_stage_stops_before_any_work_on_a_mismatch(common, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CLIPPRUNE_FIXTURES", raising=False)
    params = write_params(tmp_path / "params.yaml", model_files="data/fixtures/other")
    with pytest.raises(SystemExit) as info:
        common.run_stage("score", lambda p: pytest.fail("main must not run"), params_path=str(params))
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == ("score: error: model_files must be data/fixtures/tiny_clip (the files "
                                               "model fixture:tiny_clip reads), got data/fixtures/other")
    assert "CLIPPRUNE_FIXTURES" not in os.environ  # set for the stage only


def test_stage_runs_when_model_files_covers_the_model(common, tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPPRUNE_FIXTURES", raising=False)
    seen = {}

    def main(params):
        seen["fixtures"] = os.environ.get("CLIPPRUNE_FIXTURES")

    common.run_stage("export", main, params_path=str(write_params(tmp_path / "params.yaml")))
    assert seen == {"fixtures": "data/fixtures"}  # the repo the stage runs in, not the installed package's


def test_stage_without_the_model_ignores_model_files(common, tmp_path):
    ran = []
    params = write_params(tmp_path / "params.yaml", model_files="data/fixtures/other")
    common.run_stage("calibrate", ran.append, params_path=str(params))
    assert len(ran) == 1


def test_model_files_module_imports_no_torch():
    """_common imports it in every stage: it must not pull in the model code (or torch) for download."""
    import subprocess

    code = ("import sys, clipprune.model_files; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'clipprune.models', 'open_clip'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stage_uses_its_own_fixtures_whatever_the_environment_says(common, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path / "elsewhere"))  # e.g. the test process's own checkout
    seen = {}

    def main(params):
        seen["fixtures"] = os.environ.get("CLIPPRUNE_FIXTURES")

    common.run_stage("export", main, params_path=str(write_params(tmp_path / "params.yaml")))
    assert seen == {"fixtures": "data/fixtures"}
    assert os.environ["CLIPPRUNE_FIXTURES"] == str(tmp_path / "elsewhere")  # the caller's value is back
