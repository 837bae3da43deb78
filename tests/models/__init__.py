"""Tiny random CLIP models of both families, built offline, shared by the model tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16, "mlp_ratio": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 4, "layers": 2},
}
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
EOT_ID = 999  # highest id: open_clip pools at argmax, the HF config below pools at eos_token_id


def open_clip_config(model_cfg: dict | None = None) -> dict:
    model_cfg = copy.deepcopy(model_cfg or OPEN_CLIP_CFG)
    return {
        "family": "open_clip", "model_cfg": model_cfg, "image_size": model_cfg["vision_cfg"]["image_size"],
        "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        "tokenizer": {"arch": None, "context_length": model_cfg["text_cfg"]["context_length"]},
    }


def random_open_clip_module(seed: int = 0, model_cfg: dict | None = None):
    """A plain open_clip CLIP / CustomTextCLIP with random weights (biases and LayerNorms randomised too)."""
    from clipprune.models.open_clip_adapter import build_open_clip_module

    torch.manual_seed(seed)
    module = build_open_clip_module(model_cfg or OPEN_CLIP_CFG)
    _randomise_zero_inits(module)
    return module.eval()


def tiny_open_clip(seed: int = 0, model_cfg: dict | None = None):
    from clipprune.models.open_clip_adapter import OpenClipModel

    return OpenClipModel(random_open_clip_module(seed, model_cfg), "test:open_clip", open_clip_config(model_cfg))


def hf_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "eos_token_id": EOT_ID,
                     "bos_token_id": 998, "pad_token_id": 0},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )


def random_hf_module(seed: int = 0):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    module = CLIPModel(hf_clip_config())
    _randomise_zero_inits(module)
    return module.eval()


def tiny_hf(seed: int = 0):
    from clipprune.models.hf_adapter import HFClipModel

    return HFClipModel(random_hf_module(seed), "test:hf")


def tiny_model(family: str, seed: int = 0):
    return tiny_open_clip(seed) if family == "open_clip" else tiny_hf(seed)


def _randomise_zero_inits(module: torch.nn.Module) -> None:
    """Zero-initialised biases would hide bias-handling bugs (e.g. of dropped sub-blocks)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or "ln" in name or "layer_norm" in name or "layernorm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def sample_inputs(model, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and token ids with an end-of-text token at varying positions."""
    gen = torch.Generator().manual_seed(seed)
    size = model.image_size
    images = torch.randn(batch, 3, size, size, generator=gen)
    context = model.context_length
    tokens = torch.randint(1, EOT_ID - 2, (batch, context), generator=gen)
    for row in range(batch):
        end = 3 + (row * 5) % (context - 3)
        tokens[row, end] = EOT_ID
        tokens[row, end + 1:] = 0
    return images, tokens


@torch.no_grad()
def encode(model, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(images), model.encode_text(tokens)


def random_masks(model, seed: int, real_valued: bool, keep: float = 0.6) -> dict[str, torch.Tensor]:
    """Random binary (or real-valued scale) masks of the model's shapes; at least one unit kept per block."""
    from clipprune.models import full_masks

    gen = torch.Generator().manual_seed(seed)
    masks = full_masks(model)
    for key, mask in masks.items():
        kept = (torch.rand(mask.shape, generator=gen) < keep).float()
        kept[:, 0] = 1.0
        if real_valued:
            kept = kept * (0.5 + torch.rand(mask.shape, generator=gen))
        masks[key] = kept.to(mask.device) * mask
    return masks


def write_tiny_tokenizer(directory: Path, context_length: int = 16) -> None:
    """A small CLIP BPE tokenizer (letters only, no merges) saved with save_pretrained, built offline."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {tok: i for i, tok in enumerate(letters + [f"{c}</w>" for c in letters])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = EOT_ID
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                        model_max_length=context_length, pad_token="<|endoftext|>")
    tok.save_pretrained(str(directory))


def _single_thread():
    """Tiny models only lose from intra-op threads (contention on a shared 2-core box): use one, restore after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _offline(monkeypatch):
    """No network: hub lookups fail fast from the (empty) cache instead of retrying for ~30 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def single_thread_fixture():
    import pytest

    return pytest.fixture(autouse=True, scope="module")(_single_thread)


def offline_fixture():
    import pytest

    return pytest.fixture(autouse=True)(_offline)


def fake_hub_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "a" * 40) -> Path:
    """Lay ``files`` out as huggingface_hub's cache does; returns ``models--org--name/snapshots/<revision>``.

    Each file is a blob named by its sha256 and a relative symlink in the snapshot folder; refs/main names
    ``revision`` (the latest call for a repo wins, as after a new download).
    """
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def saved_files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path (what save_pretrained wrote)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
