"""load_model: name resolution, fixtures, local transformers directories, offline failures."""
import json
import time
import warnings

import pytest
import torch
from safetensors.torch import save_file

from clipprune.errors import ModelLoadError
from clipprune.models import load_model
from clipprune.models.loading import AssumedDefaultsWarning
from clipprune.models.hf_adapter import HFClipModel
from clipprune.models.open_clip_adapter import OpenClipModel, build_open_clip_module, check_supported

from . import (EOT_ID, IMAGE_MEAN, IMAGE_STD, OPEN_CLIP_CFG, encode, offline_fixture, random_hf_module,
               random_open_clip_module, sample_inputs, single_thread_fixture, write_tiny_tokenizer)

single_thread = single_thread_fixture()
offline = offline_fixture()


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _write_fixture(root, name="tiny_test", seed=0):
    module = random_open_clip_module(seed)
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(
        {"family": "open_clip", "model_cfg": OPEN_CLIP_CFG, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}))
    state = {k: v.detach().half().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    return module


def test_unknown_prefix_lists_valid_prefixes():
    for name in ("timm:vit_base", "tiny_clip", ""):
        with pytest.raises(ModelLoadError) as info:
            load_model(name)
        message = str(info.value)
        assert all(p in message for p in ("fixture:", "open_clip:", "hf:", "pruned:")) and "\n" not in message


def test_fixture_loads_float16_weights_as_float32(tmp_path, monkeypatch):
    module = _write_fixture(tmp_path)
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path))
    model = load_model("fixture:tiny_test")
    assert isinstance(model, OpenClipModel) and model.name == "fixture:tiny_test"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.module.training
    # reference: the same float16-rounded weights in the original open_clip module
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    images, tokens = sample_inputs(model)
    with torch.no_grad():
        expected = module.encode_image(images), module.encode_text(tokens)
    for got, ref in zip(encode(model, images, tokens), expected):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert model.towers["vision"].tokens == (32 // 8) ** 2 + 1 and model.towers["text"].tokens == 16
    ids = model.tokenizer(["a photo of the digit 3", "zero"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert model.preprocess.transforms[-1].mean == tuple(IMAGE_MEAN)
    assert model.export_config()["model_cfg"] == OPEN_CLIP_CFG
    assert model.tower_param_count("vision") == sum(p.numel() for p in model.module.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert model.tower_param_count("vision") + model.tower_param_count("text") == total - 1  # logit_scale
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-3)


def test_fixture_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path))
    with pytest.raises(ModelLoadError, match="tiny_missing/config.json not found"):
        load_model("fixture:tiny_missing")
    _write_fixture(tmp_path, "broken")
    config = json.loads((tmp_path / "broken" / "config.json").read_text())
    config["model_cfg"]["vision_cfg"]["width"] = 32
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="model.safetensors: weights do not match config.json"):
        load_model("fixture:broken")


def test_fixture_names_need_the_fixtures_folder(monkeypatch):
    monkeypatch.delenv("CLIPPRUNE_FIXTURES", raising=False)
    with pytest.raises(ModelLoadError, match="CLIPPRUNE_FIXTURES, which is not set"):
        load_model("fixture:tiny_clip")


def test_hf_local_directory_with_tokenizer(tmp_path):
    module = random_hf_module(seed=1)
    module.save_pretrained(str(tmp_path / "clip"))
    write_tiny_tokenizer(tmp_path / "clip", context_length=16)
    model = load_model(f"hf:{tmp_path / 'clip'}")
    assert isinstance(model, HFClipModel)
    images, tokens = sample_inputs(model)
    with torch.no_grad():
        expected = module.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(model.encode_image(images).detach(), expected, atol=1e-6, rtol=0)
    ids = model.tokenizer(["abc", "hello world"])
    assert ids.shape == (2, 16) and ids[0, 0] == 52 and ids[0, 4] == EOT_ID  # <sot> a b c <eot>
    assert model.towers["text"].tokens == 16 and model.towers["vision"].tokens == 17
    views = model.towers["vision"].block_views()
    assert [(v.num_heads, v.head_dim, v.hidden, v.ffn_dim) for v in views] == [(4, 16, 64, 128)] * 2


def test_hf_local_directory_without_tokenizer_fails_when_tokenizing(tmp_path):
    random_hf_module().save_pretrained(str(tmp_path / "clip"))
    with pytest.warns(AssumedDefaultsWarning, match=r"no tokenizer files \(tokenizer.json, or vocab.json"):
        model = load_model(f"hf:{tmp_path / 'clip'}")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        model.tokenizer(["a photo"])


def _hf_dir(tmp_path, tokenizer: bool = True):
    directory = tmp_path / "clip"
    random_hf_module(seed=1).save_pretrained(str(directory))
    if tokenizer:
        write_tiny_tokenizer(directory, context_length=16)
    return directory


def _one_line_error(directory) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(f"hf:{directory}")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": ', "{}", "\x00\xff garbage"],
                         ids=["truncated JSON", "not a tokenizer", "binary"])
def test_hf_unreadable_tokenizer_json_names_the_file(tmp_path, content):
    directory = _hf_dir(tmp_path)
    assert (directory / "tokenizer.json").is_file()  # what write_tiny_tokenizer saved
    (directory / "tokenizer.json").write_bytes(content.encode("latin-1"))
    message = _one_line_error(directory)
    assert message.startswith(f"{directory / 'tokenizer.json'}: unreadable tokenizer")


def test_hf_unreadable_tokenizer_config_names_the_file(tmp_path):
    directory = _hf_dir(tmp_path)
    (directory / "tokenizer_config.json").write_text("{oops")
    assert _one_line_error(directory).startswith(f"{directory / 'tokenizer_config.json'}: unreadable tokenizer")


def test_hf_bpe_vocab_without_merges_names_the_missing_file(tmp_path):
    directory = _hf_dir(tmp_path, tokenizer=False)
    (directory / "vocab.json").write_text(json.dumps({"a": 0}))
    assert _one_line_error(directory).startswith(f"{directory / 'merges.txt'} not found next to vocab.json")


def test_hf_tokenizer_from_vocab_and_merges_only(tmp_path):
    """vocab.json + merges.txt without tokenizer.json (an older save) still make the tokenizer."""
    directory = _hf_dir(tmp_path)
    reference = load_model(f"hf:{directory}").tokenizer(["abc", "hello world"])
    (directory / "tokenizer.json").unlink()
    assert torch.equal(load_model(f"hf:{directory}").tokenizer(["abc", "hello world"]), reference)


PREPROCESSOR = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "crop_size": {"height": 32, "width": 32}}


def test_hf_preprocessor_config_is_read(tmp_path):
    directory = _hf_dir(tmp_path)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is assumed
        config = load_model(f"hf:{directory}").export_config()
    assert (config["image_mean"], config["image_std"], config["image_size"]) == ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 32)


def test_hf_missing_preprocessor_config_uses_clip_defaults_and_says_so(tmp_path):
    directory = _hf_dir(tmp_path)
    with pytest.warns(AssumedDefaultsWarning) as record:
        config = load_model(f"hf:{directory}").export_config()
    message = str(record[0].message)
    assert f"no preprocessor_config.json in {directory}; assuming CLIP's image preprocessing" in message
    assert (config["image_mean"], config["image_std"], config["image_size"]) == (IMAGE_MEAN, IMAGE_STD, 32)


def test_hf_preprocessor_config_missing_a_key_says_which(tmp_path):
    directory = _hf_dir(tmp_path)
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3], "crop_size": 32}))
    with pytest.warns(AssumedDefaultsWarning, match=r"preprocessor_config.json has no image_std; assuming image_std"):
        config = load_model(f"hf:{directory}").export_config()
    assert (config["image_mean"], config["image_std"]) == ([0.5, 0.4, 0.3], IMAGE_STD)


@pytest.mark.parametrize("content, match", [
    ('{"image_mean": [0.5, 0.4', "unreadable image preprocessor config"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({**PREPROCESSOR, "image_mean": "imagenet"}), "image_mean must be a list of 3 numbers"),
    (json.dumps({**PREPROCESSOR, "image_std": [0.2, 0.0, 0.3]}), "image_std must be a list of 3 positive numbers"),
    (json.dumps({**PREPROCESSOR, "crop_size": {"height": 32, "width": 48}}), "crop_size must be a positive integer"),
    (json.dumps({**PREPROCESSOR, "crop_size": "224"}), "crop_size must be a positive integer"),
])
def test_hf_malformed_preprocessor_config_names_the_file(tmp_path, content, match):
    directory = _hf_dir(tmp_path)
    (directory / "preprocessor_config.json").write_text(content)
    message = _one_line_error(directory)
    assert message.startswith(f"{directory / 'preprocessor_config.json'}: ") and match in message


def test_hf_name_not_available_offline(empty_hub_cache):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("hf:openai/clip-vit-base-patch32")
    message = str(info.value)
    assert time.monotonic() - start < 20
    assert message.startswith("hf:openai/clip-vit-base-patch32:") and "pre-download" in message
    assert "local directory" in message and "\n" not in message


def test_open_clip_name_not_available_offline(empty_hub_cache):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("open_clip:ViT-B-32/laion2b_s34b_b79k")
    message = str(info.value)
    assert time.monotonic() - start < 20
    assert "pre-download" in message and "local checkpoint file" in message and "\n" not in message


@pytest.mark.parametrize("name, match", [
    ("open_clip:NoSuchArch/openai", "unknown architecture"),
    ("open_clip:ViT-B-32/no_such_tag", "neither a pretrained tag"),
    ("open_clip:ViT-B-32", "expected open_clip:<arch>/"),
])
def test_open_clip_bad_names(name, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(name)


def test_resnet_vision_tower_is_rejected():
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": OPEN_CLIP_CFG["text_cfg"]}
    with pytest.raises(ModelLoadError, match="only ViT vision towers"):
        check_supported(build_open_clip_module(cfg))


@pytest.mark.slow
def test_open_clip_architecture_with_local_checkpoint(tmp_path):
    """open_clip:<arch>/<file> with a built-in architecture (random weights saved locally; ~10 s)."""
    import open_clip

    reference = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    checkpoint = tmp_path / "vit_s_32.pt"
    torch.save(reference.state_dict(), checkpoint)
    model = load_model(f"open_clip:ViT-S-32/{checkpoint}")
    assert model.towers["vision"].block_view(0).tokens == 50 and model.towers["text"].tokens == 77
    assert model.export_config()["tokenizer"] == {"arch": "ViT-S-32", "context_length": 77}
    images = torch.randn(2, 3, model.image_size, model.image_size)
    tokens = model.tokenizer(["a photo of a cat", "a dog"])
    with torch.no_grad():
        expected = reference.encode_image(images), reference.encode_text(tokens)
    for got, ref in zip(encode(model, images, tokens), expected):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_fixture_saved_from_an_adapted_model_loads(tmp_path, monkeypatch):
    """A checkpoint written from OpenClipModel.module (q/k/v projections) is accepted too."""
    from . import tiny_open_clip

    model = tiny_open_clip(seed=2)
    directory = tmp_path / "adapted"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(
        {"family": "open_clip", "model_cfg": OPEN_CLIP_CFG, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}))
    save_file({k: v.contiguous() for k, v in model.module.state_dict().items()}, str(directory / "model.safetensors"))
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path))
    loaded = load_model("fixture:adapted")
    images, tokens = sample_inputs(model)
    for got, ref in zip(encode(loaded, images, tokens), encode(model, images, tokens)):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
