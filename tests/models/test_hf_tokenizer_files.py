"""`python -m clipprune.models.hf_tokenizer_files <dir>`: OpenAI's CLIP vocabulary next to a saved CLIPModel.

The reference is open_clip itself: its SimpleTokenizer's vocabulary and its tokenizer's ids.
"""
import html
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from clipprune.models import load_model
from clipprune.models.hf_tokenizer_files import TOKENIZER_FILES, main, openai_bpe_vocabulary

EOT = 49407
CAPTIONS = [
    "A photo of a cat.",
    "Hello, world!! (it's 3:45pm) -- ok? #tag @user 100% [x] {y} a/b; c:d",
    "two  spaces,\ttab and\nnewline",
    "café naïve Ünïcödé façade — Zürich, 東京, Москва, 🐱🚀",
    "UPPER lower MiXeD 12345 3.14 don't we'll they're I'm you've he'd",
    " ".join(f"word{i} and more, words!" for i in range(40)),  # far past 77 tokens: truncated, ends with <eot>
    "",
]


def _small_clip_config(**vision):
    from transformers import CLIPConfig

    # OpenAI's vocabulary size (the default) and tiny widths: a CLIPModel(CLIPConfig())-style model that saves fast
    return CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2},
                      vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "patch_size": 32, **vision},
                      projection_dim=16)


def _saved_clip(directory: Path, config=None) -> Path:
    from transformers import CLIPModel

    torch.manual_seed(0)
    CLIPModel(config if config is not None else _small_clip_config()).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = _saved_clip(tmp_path_factory.mktemp("hf") / "clip")
    assert main([str(directory)]) == 0
    return directory


def _open_clip_ids(texts) -> torch.Tensor:
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")(texts)


def _assert_same_ids_as_open_clip(ids: torch.Tensor, reference: torch.Tensor):
    assert ids.shape == reference.shape == (reference.shape[0], 77)
    for row, ref in zip(ids, reference):
        end = int((ref == EOT).nonzero()[0]) + 1
        assert row[:end].tolist() == ref[:end].tolist()
        # after <eot>: open_clip pads with 0, transformers with <eot> (OpenAI's hub files do the same)
        assert bool((ref[end:] == 0).all()) and bool((row[end:] == EOT).all())


def test_vocabulary_is_open_clips():
    from open_clip.tokenizer import SimpleTokenizer

    vocab, merges = openai_bpe_vocabulary()
    reference = SimpleTokenizer()
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {specials.get(token, token): index for token, index in reference.encoder.items()}
    assert merges == sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)


def test_hf_tokenizer_gives_open_clips_ids(clip_dir):
    import ftfy
    from transformers import CLIPTokenizer

    # open_clip also runs ftfy + HTML unescaping, which transformers' CLIP tokenizer does not: these captions
    # are ones both clean-ups leave alone, so that the comparison is about the vocabulary and the BPE
    for caption in CAPTIONS:
        assert html.unescape(ftfy.fix_text(caption)) == caption
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    ids = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    reference = _open_clip_ids(CAPTIONS)
    assert int((reference[5] != 0).sum()) == 77 and reference[5, -1] == EOT  # the long caption was truncated
    _assert_same_ids_as_open_clip(ids, reference)


def test_clipprune_loads_the_folder_and_padding_changes_no_text_feature(clip_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every file is there: no assumed default is logged
        model = load_model(f"hf:{clip_dir}")
    ids = model.tokenizer(CAPTIONS)
    reference = _open_clip_ids(CAPTIONS)
    _assert_same_ids_as_open_clip(ids, reference)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), model.encode_text(reference), rtol=0, atol=1e-6)
    assert model.image_size == 224


def test_image_processor_config_follows_the_vision_image_size(tmp_path):
    from transformers import CLIPImageProcessor

    directory = _saved_clip(tmp_path / "clip", _small_clip_config(image_size=64))
    assert main([str(directory)]) == 0
    processor = CLIPImageProcessor.from_pretrained(str(directory), local_files_only=True)
    assert processor.size == {"shortest_edge": 64} and processor.crop_size == {"height": 64, "width": 64}
    assert processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert processor.image_std == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert load_model(f"hf:{directory}").image_size == 64


def test_refuses_to_overwrite_and_writes_nothing(clip_dir, capsys):
    before = {p.name: p.read_bytes() for p in clip_dir.iterdir()}
    assert main([str(clip_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "only right for models trained with OpenAI's CLIP vocabulary" in err[0]
    assert len(err) == 2 and err[1].startswith(f"hf_tokenizer_files: error: {clip_dir / 'vocab.json'} already exists")
    assert {p.name: p.read_bytes() for p in clip_dir.iterdir()} == before


def test_a_tokenizer_json_alone_is_an_existing_tokenizer(tmp_path, capsys):
    directory = _saved_clip(tmp_path / "clip")
    (directory / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    assert main([str(directory)]) == 1
    assert "tokenizer.json already exists" in capsys.readouterr().err
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_an_existing_image_processor_config_is_kept(tmp_path, capsys):
    directory = _saved_clip(tmp_path / "clip")
    mine = {"image_processor_type": "CLIPImageProcessor", "crop_size": 200, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]}
    (directory / "preprocessor_config.json").write_text(json.dumps(mine))
    assert main([str(directory)]) == 0
    assert "kept the existing preprocessor_config.json" in capsys.readouterr().out
    assert json.loads((directory / "preprocessor_config.json").read_text()) == mine
    assert all((directory / name).is_file() for name in TOKENIZER_FILES)


@pytest.mark.parametrize("case, message", [
    ("vocab", r"config.json: text_config.vocab_size is 1000, OpenAI's CLIP vocabulary has 49408 tokens"),
    ("no_config", r"config.json not found: expected a folder written by CLIPModel.save_pretrained"),
    ("not_clip", r"config.json: model_type must be 'clip'"),
    ("missing", r"not a directory"),
])
def test_bad_folders_are_one_line_errors_and_nothing_is_written(tmp_path, capsys, case, message):
    from transformers import CLIPConfig

    directory = tmp_path / "clip"
    if case == "vocab":
        config = _small_clip_config()
        config = CLIPConfig(text_config={**config.text_config.to_dict(), "vocab_size": 1000, "bos_token_id": 998,
                                         "eos_token_id": 999},
                            vision_config=config.vision_config.to_dict(), projection_dim=16)
        _saved_clip(directory, config)
    elif case in ("no_config", "not_clip"):
        directory.mkdir()
        if case == "not_clip":
            (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    before = sorted(p.name for p in directory.iterdir()) if directory.exists() else None
    capsys.readouterr()  # what saving the model printed
    assert main([str(directory)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("hf_tokenizer_files: error: ")
    assert re.search(message, err[1])
    assert (sorted(p.name for p in directory.iterdir()) if directory.exists() else None) == before


def test_the_documented_command_runs(tmp_path):
    directory = _saved_clip(tmp_path / "clip")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", "clipprune.models.hf_tokenizer_files", str(directory)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "only right for models trained with OpenAI's CLIP vocabulary" in done.stderr
    assert done.stdout.startswith("hf_tokenizer_files: wrote vocab.json, merges.txt")


def test_the_missing_tokenizer_error_names_the_command(tmp_path):
    from clipprune.errors import ModelLoadError
    from clipprune.models.loading import AssumedDefaultsWarning

    directory = _saved_clip(tmp_path / "clip")
    with pytest.warns(AssumedDefaultsWarning, match="python -m clipprune.models.hf_tokenizer_files"):
        model = load_model(f"hf:{directory}")
    with pytest.raises(ModelLoadError, match=r"python -m clipprune\.models\.hf_tokenizer_files <dir>"):
        model.tokenizer(["a photo"])
