"""Reuse of the dense model's text embeddings: only where the text tower is unchanged, and then bit for bit."""
from __future__ import annotations

import pytest
import torch

from clipprune.errors import DataError
from clipprune.evaluate.embeddings import (TextEncoder, load_text_embeddings, reallocate_tensors,
                                           save_text_embeddings, text_tower_fingerprint)
from clipprune.evaluate.zeroshot import build_classifier, encode_texts
from clipprune.models.pruned import export_pruned, load_pruned
from clipprune.models import apply_masks, full_masks, load_model
from models import random_hf_module, random_masks, single_thread_fixture, write_tiny_tokenizer

_single_thread = single_thread_fixture()

CLASSNAMES = ["zero", "one", "two"]
TEMPLATES = ["a photo of the digit {c}.", "a drawing of a {c}"]
CAPTIONS = [f"a thick slanted digit {name} in the corner" for name in ("zero", "one", "two", "three")] * 3
BATCH = 5  # does not divide the number of texts: the last batch is short


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def dense(request, tmp_path_factory):
    """The dense model of each family as the evaluate stages hold it (open_clip: the bundled fixture)."""
    if request.param == "open_clip":
        return reallocate_tensors(load_model("fixture:tiny_clip"))
    root = tmp_path_factory.mktemp("hf") / "clip"
    random_hf_module(seed=1).save_pretrained(str(root))
    write_tiny_tokenizer(root, context_length=16)
    return reallocate_tensors(load_model(f"hf:{root}"))


@pytest.fixture(scope="module")
def vision_pruned(dense, tmp_path_factory):
    """``dense`` with about 40 % of its vision heads and neurons removed (tuned scales folded), exported, reloaded."""
    masks = {key: mask for key, mask in random_masks(dense, seed=0, real_valued=True).items()
             if key.startswith("vision.")}
    return load_pruned(export_pruned(dense, masks, tmp_path_factory.mktemp("pruned") / "model"))


def record(model) -> TextEncoder:
    text = TextEncoder(model, BATCH)
    text.classifier("zeroshot", CLASSNAMES, TEMPLATES, progress=False)
    text.captions("retrieval", CAPTIONS, progress=False)
    return text


def forbid_text_encoding(model, monkeypatch):
    def fail(tokens):
        raise AssertionError("the text tower ran although its embeddings were reused")

    monkeypatch.setattr(model, "encode_text", fail)


def test_fingerprint_ignores_the_vision_tower_and_sees_the_text_tower(dense):
    fingerprint = text_tower_fingerprint(dense)
    assert fingerprint is not None and len(fingerprint) == 64
    vision = dense.towers["vision"].mlp_out_module(0).weight
    text = dense.towers["text"].mlp_out_module(0).weight
    with torch.no_grad():
        vision[0, 0] += 1.0
        assert text_tower_fingerprint(dense) == fingerprint
        vision[0, 0] -= 1.0
        saved = text[0, 0].item()
        text[0, 0] = torch.nextafter(text[0, 0], torch.tensor(float("inf")))  # one ulp
        assert text_tower_fingerprint(dense) != fingerprint
        text[0, 0] = saved
    assert text_tower_fingerprint(dense) == fingerprint
    dense.module.train()
    assert text_tower_fingerprint(dense) != fingerprint  # dropout settings are part of what it computes
    dense.module.eval()


def test_fingerprint_sees_memory_alignment_and_threads(dense):
    """CPU kernels round by alignment and thread count; reallocate_tensors restores fresh (aligned) storage."""
    fingerprint = text_tower_fingerprint(dense)
    weight = dense.towers["text"].mlp_out_module(0).weight
    values = weight.detach().clone()
    with torch.no_grad():
        offset = torch.empty(weight.numel() + 1, dtype=weight.dtype)[1:].view_as(weight)  # 4 bytes off
        weight.data = offset.copy_(values)
    assert weight.data_ptr() % 64 != 0 and torch.equal(weight, values)
    assert text_tower_fingerprint(dense) != fingerprint
    reallocate_tensors(dense)
    assert weight.data_ptr() % 64 == 0 and text_tower_fingerprint(dense) == fingerprint
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert text_tower_fingerprint(dense) != fingerprint
    finally:
        torch.set_num_threads(threads)


def test_vision_only_pruned_model_reuses_embeddings_bit_for_bit(dense, vision_pruned, monkeypatch):
    stored = record(dense).embeddings()
    fresh = record(vision_pruned)  # encoded with the pruned model's own text tower
    assert not fresh.reusing
    # the fresh encoding is the plain one of zeroshot.py
    plain = {"zeroshot": build_classifier(vision_pruned, CLASSNAMES, TEMPLATES, BATCH, progress=False).cpu(),
             "retrieval": encode_texts(vision_pruned, CAPTIONS, BATCH)}
    forbid_text_encoding(vision_pruned, monkeypatch)
    reused = record_with(vision_pruned, stored)
    assert reused.reusing and reused.fingerprint == stored.fingerprint
    for key in ("zeroshot", "retrieval"):
        reused_tensor, fresh_tensor = reused.embeddings().entries[key][1], fresh.embeddings().entries[key][1]
        assert torch.equal(fresh_tensor, plain[key]), key
        assert reused_tensor.dtype == fresh_tensor.dtype and torch.equal(reused_tensor, fresh_tensor), key
    assert vision_pruned.towers["vision"].block_views() != dense.towers["vision"].block_views()  # really pruned


def record_with(model, stored) -> TextEncoder:
    text = TextEncoder(model, BATCH, stored)
    text.classifier("zeroshot", CLASSNAMES, TEMPLATES, progress=False)
    text.captions("retrieval", CAPTIONS, progress=False)
    return text


def test_pruned_text_tower_recomputes(dense, tmp_path):
    stored = record(dense).embeddings()
    masks = full_masks(dense, ["text"])
    masks["text.head"][0, 0] = 0.0
    text_pruned = load_pruned(export_pruned(dense, masks, tmp_path / "text_pruned"))
    text = record_with(text_pruned, stored)
    assert not text.reusing and text.fingerprint not in (None, stored.fingerprint)
    got = text.embeddings().entries["retrieval"][1]
    assert torch.equal(got, encode_texts(text_pruned, CAPTIONS, BATCH))
    assert not torch.equal(got, stored.entries["retrieval"][1])


def test_mask_hooks_on_the_text_tower_mean_no_fingerprint(dense):
    stored = record(dense).embeddings()
    text_masks = full_masks(dense, ["text"])
    text_masks["text.neuron"][:, ::2] = 0.0
    with apply_masks(dense, text_masks):
        assert text_tower_fingerprint(dense) is None
        text = record_with(dense, stored)
        assert not text.reusing
        masked = text.embeddings().entries["retrieval"][1]
        assert torch.equal(masked, encode_texts(dense, CAPTIONS, BATCH))
    assert not torch.equal(masked, stored.entries["retrieval"][1])
    vision_masks = full_masks(dense, ["vision"])
    vision_masks["vision.head"][:, 0] = 0.0
    with apply_masks(dense, vision_masks):
        assert text_tower_fingerprint(dense) == stored.fingerprint
        assert record_with(dense, stored).reusing


def test_other_batch_size_is_encoded_again(dense):
    stored = record(dense).embeddings()
    text = TextEncoder(dense, BATCH + 1, stored)
    assert not text.reusing


def test_other_texts_under_a_reused_key_are_a_stale_error(dense):
    stored = record(dense).embeddings()
    text = TextEncoder(dense, BATCH, stored)
    with pytest.raises(DataError, match="retrieval was made from other texts.*evaluate_dense"):
        text.captions("retrieval", CAPTIONS[:-1], progress=False)
    with pytest.raises(DataError, match="datasets.coco has no entry"):
        text.captions("datasets.coco", CAPTIONS, progress=False)


def test_save_and_load_round_trip_byte_stable(dense, tmp_path):
    stored = record(dense).embeddings()
    save_text_embeddings(tmp_path / "a.safetensors", stored)
    save_text_embeddings(tmp_path / "b.safetensors", record(dense).embeddings())
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = load_text_embeddings(tmp_path / "a.safetensors")
    assert (loaded.fingerprint, loaded.batch_size) == (stored.fingerprint, BATCH)
    assert loaded.entries.keys() == stored.entries.keys()
    for key, (meta, tensor) in stored.entries.items():
        assert loaded.entries[key][0] == meta and torch.equal(loaded.entries[key][1], tensor)
    assert record_with(dense, loaded).reusing


def test_unreadable_embeddings_file_names_it(tmp_path):
    with pytest.raises(DataError, match="text embeddings file not found"):
        load_text_embeddings(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="bad.safetensors: not a readable text embeddings file"):
        load_text_embeddings(tmp_path / "bad.safetensors")
