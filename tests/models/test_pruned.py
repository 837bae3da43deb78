"""export_pruned / load_pruned: the exported model reproduces the masked model, offline, on both families."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from clipprune.errors import ClipPruneError, ModelLoadError
from clipprune.models.pruned import export_pruned, load_pruned
from clipprune.models import apply_masks, full_masks, load_model

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16, "mlp_ratio": 2},
    "text_cfg": {"context_length": 12, "vocab_size": 500, "width": 32, "heads": 4, "layers": 2},
}
EOT = 499


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(threads)


def _perturb(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _open_clip_fixture(root, monkeypatch):
    """A tiny open_clip model written in the embedded-default fixture format, loaded through load_model."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    module = CLIP(**TINY_OPEN_CLIP)
    _perturb(module, 1)
    directory = root / "fixtures" / "tiny_export"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({
        "family": "open_clip", "model_cfg": TINY_OPEN_CLIP, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(directory / "model.safetensors"))
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(root / "fixtures"))
    return load_model("fixture:tiny_export")


def _hf_dir(root):
    """A tiny transformers CLIPModel with a small tokenizer, saved with save_pretrained, loaded by hf:<dir>."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    config = CLIPConfig(
        text_config={"vocab_size": 500, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 12, "eos_token_id": EOT,
                     "bos_token_id": 498, "pad_token_id": 0},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                       "num_attention_heads": 3, "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    torch.manual_seed(0)
    module = CLIPModel(config)
    _perturb(module, 2)
    directory = root / "hf_clip"
    module.save_pretrained(str(directory))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters])}
    vocab.update({"<|startoftext|>": 498, "<|endoftext|>": EOT})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), pad_token="<|endoftext|>").save_pretrained(
        str(directory))
    return load_model(f"hf:{directory}")


@pytest.fixture(params=["open_clip", "hf"])
def model(request, tmp_path, monkeypatch):
    if request.param == "open_clip":
        return _open_clip_fixture(tmp_path, monkeypatch)
    return _hf_dir(tmp_path)


def _inputs(model, batch=3):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, model.image_size, model.image_size, generator=gen)
    tokens = torch.randint(1, EOT - 3, (batch, model.context_length), generator=gen)
    for row in range(batch):
        tokens[row, 4 + row] = EOT
        tokens[row, 5 + row:] = 0
    return images, tokens


@torch.no_grad()
def _encode(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


def _tuned_masks(model):
    """Real-valued masks with pruned units, one dropped attention and one dropped MLP per tower."""
    gen = torch.Generator().manual_seed(3)
    masks = full_masks(model)
    for key, mask in masks.items():
        keep = (torch.rand(mask.shape, generator=gen) < 0.6).float()
        keep[:, -1] = 1.0
        masks[key] = keep * (0.5 + torch.rand(mask.shape, generator=gen))
    masks["vision.head"][1] = 0.0
    masks["vision.neuron"][2] = 0.0
    masks["text.neuron"][0] = 0.0
    masks["text.head"][1] = 0.0
    return masks


def test_export_and_load_reproduce_the_masked_model(model, tmp_path):
    images, tokens = _inputs(model)
    masks = _tuned_masks(model)
    with apply_masks(model, masks):
        expected = _encode(model, images, tokens)
    out = export_pruned(model, masks, tmp_path / "artifacts" / "pruned")
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["pruned"]  # no temp dirs left
    names = sorted(os.listdir(out))
    assert {"config.json", "model.safetensors"} <= set(names)
    assert ("tokenizer" in names) == (model.family == "hf")

    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == 1 and config["family"] == model.family and config["source"] == model.name
    assert config["base"] == model.export_config()
    for key, mask in masks.items():
        tower, kind = key.split(".")
        layers = config["towers"][tower]["layers"]
        for layer, row in zip(layers, mask):
            kept = [i for i, v in enumerate(row.tolist()) if v != 0]
            if kind == "head":
                assert layer["heads"] == len(kept) and layer["head_index"] == kept
            else:
                assert layer["ffn_dim"] == len(kept)

    loaded = load_pruned(out)
    assert loaded.family == model.family and not loaded.module.training
    for got, ref in zip(_encode(loaded, images, tokens), expected):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert loaded.towers["vision"].block_view(1).num_heads == 0
    assert loaded.towers["vision"].block_view(2).ffn_dim == 0
    assert loaded.tower_param_count("vision") < model.tower_param_count("vision")
    # the tokenizer comes back offline
    torch.testing.assert_close(loaded.tokenizer(["abc", "hello"]), model.tokenizer(["abc", "hello"]))
    # also reachable through load_model, and re-exportable as is
    again = load_model(f"pruned:{out}")
    export_pruned(again, None, tmp_path / "re-exported")
    reloaded = load_pruned(tmp_path / "re-exported")
    for got, ref in zip(_encode(reloaded, images, tokens), expected):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_second_pruning_of_a_loaded_model_keeps_original_head_ids(model, tmp_path):
    images, tokens = _inputs(model)
    first = full_masks(model)
    first["vision.head"][0, 0] = 0.0
    loaded = load_pruned(export_pruned(model, first, tmp_path / "first"))
    second = full_masks(loaded)
    second["vision.head"][0, 0] = 0.0  # position 0 of the pruned block is original head 1
    with apply_masks(loaded, second):
        expected = _encode(loaded, images, tokens)
    export_pruned(loaded, second, tmp_path / "second")
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    heads = model.towers["vision"].block_view(0).num_heads
    assert config["towers"]["vision"]["layers"][0]["head_index"] == list(range(2, heads))
    final = load_pruned(tmp_path / "second")
    for got, ref in zip(_encode(final, images, tokens), expected):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_inconsistent_export_is_rejected(tmp_path, monkeypatch):
    model = _open_clip_fixture(tmp_path, monkeypatch)
    masks = full_masks(model)
    masks["vision.neuron"][0, :10] = 0.0
    out = export_pruned(model, masks, tmp_path / "pruned")
    config_path = out / "config.json"
    good = config_path.read_text()

    config = json.loads(good)
    config["towers"]["vision"]["layers"][0]["ffn_dim"] += 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ClipPruneError, match="model.safetensors: weights do not match config.json"):
        load_pruned(out)

    config = json.loads(good)
    config["towers"]["vision"]["layers"][0]["head_index"] = [0, 9]
    config["towers"]["vision"]["layers"][0]["heads"] = 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(ClipPruneError, match="config.json: towers.vision.layers\\[0\\] does not fit"):
        load_pruned(out)

    config = json.loads(good)
    config["base"]["family"] = "timm"  # no adapter registered under that name
    config_path.write_text(json.dumps(config))
    with pytest.raises(ClipPruneError, match=r"config.json: base.family must be one of hf, open_clip; got 'timm'$"):
        load_pruned(out)

    config = json.loads(good)
    config["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(ClipPruneError, match="format_version"):
        load_pruned(out)

    config_path.write_text(good)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ClipPruneError, match="model.safetensors: not a readable"):
        load_pruned(out)
    with pytest.raises(ModelLoadError, match="not found"):
        load_pruned(tmp_path / "nowhere")


def test_export_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    model = _open_clip_fixture(tmp_path, monkeypatch)
    bad = full_masks(model)
    bad["vision.head"] = torch.ones(5, 5)
    from clipprune.errors import MaskError

    with pytest.raises(MaskError):
        export_pruned(model, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


HF_VISION = "base.clip_config.vision_config"


@pytest.mark.parametrize("path, value, expected", [
    (("vision_config", "num_attention_heads"), 0, f"{HF_VISION}.num_attention_heads must be an integer in [1, "),
    (("vision_config", "num_attention_heads"), 5, f"{HF_VISION}.num_attention_heads must divide the width"),
    (("vision_config", "patch_size"), 0, f"{HF_VISION}.patch_size must be an integer in [1, "),
    (("vision_config", "hidden_size"), -8, f"{HF_VISION}.hidden_size must be an integer in [1, 65536], got -8"),
    (("vision_config", "intermediate_size"), 0, f"{HF_VISION}.intermediate_size must be an integer in [1, "),
    (("vision_config", "num_channels"), 1, f"{HF_VISION}.num_channels must be an integer in [3, 3], got 1"),
    (("text_config", "num_hidden_layers"), 0, "base.clip_config.text_config.num_hidden_layers must be an integer"),
    (("text_config", "vocab_size"), -1, "base.clip_config.text_config.vocab_size must be an integer"),
    (("projection_dim",), 0, "base.clip_config.projection_dim must be an integer in [1, 65536], got 0"),
])
def test_hf_export_config_widths_are_checked(tmp_path, path, value, expected):
    """A transformers export's CLIPConfig read back: zero / negative / uneven widths are one line each."""
    model = _hf_dir(tmp_path)
    out = export_pruned(model, full_masks(model), tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    node = config["base"]["clip_config"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClipPruneError) as info:
        load_pruned(out)
    assert str(info.value).startswith(f"{out / 'config.json'}: {expected}"), str(info.value)


def test_a_family_registered_once_rebuilds_its_own_exports(tmp_path, monkeypatch):
    """The pruned format asks MODEL_FAMILIES for the adapter: a new family registered there is what load_pruned
    rebuilds, with no change to the format code."""
    from clipprune.models import MODEL_FAMILIES
    from clipprune.models.open_clip_adapter import OpenClipModel

    model = _open_clip_fixture(tmp_path, monkeypatch)
    calls = []

    class RecordingFamily(OpenClipModel):
        family = "recording"

        @classmethod
        def from_export(cls, config, name, directory, prefix=""):
            calls.append((config["family"], name, prefix))
            return super().from_export(config, name, directory, prefix)

    monkeypatch.setitem(MODEL_FAMILIES._entries, "recording", RecordingFamily)
    recording = RecordingFamily(model.module, model.name, model.export_config())
    out = export_pruned(recording, None, tmp_path / "recorded")
    reloaded = load_pruned(out)
    assert type(reloaded) is RecordingFamily and calls == [("recording", f"pruned:{out}", "base.")]
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(images), model.encode_image(images))
