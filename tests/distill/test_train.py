"""The training loop on tiny models: losses fall, resuming is bit-exact, checkpoints are checked, LFPR plan."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from clipprune.distill import (Batch, CheckpointError, DistillConfig, RetrainRow, TrainImages, distill_loss,
                               keep_ratio, load_checkpoint, plan_training, train)
from clipprune.errors import ParamError
from clipprune.models.pruned import load_pruned
from clipprune.models import load_model
from models import tiny_hf

BASE = DistillConfig(epochs=3, batch_size=8, base_lr=0.05, warmup_steps=2, num_samples=32, seed=0)


class Interrupt(Exception):
    pass


def _data(digits_split, student, config=BASE, share=1.0):
    images, captions = digits_split
    return TrainImages(images, captions, student.preprocess, config.num_samples, config.seed, share)


def _fixed_batch(data):
    images, captions = data.batch(np.arange(16), np.zeros(16))
    return Batch(images, captions)


def _state_bytes(model) -> dict[str, bytes]:
    return {k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            for k, v in model.module.state_dict().items()}


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_token_features_start_with_the_image_embedding(family, teacher):
    model = teacher if family == "open_clip" else tiny_hf(seed=0)
    images = torch.randn(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.vision_tokens(images)
        embedding = model.encode_image(images)
    assert tokens.shape[:2] == (3, model.towers["vision"].tokens) and tokens.shape[2] == embedding.shape[1]
    torch.testing.assert_close(tokens[:, 0], embedding, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes", [
    {"loss": "mse"},
    {"loss": "kl", "kl_pairs": "image_text"},
    {"loss": "kl", "kl_pairs": "image_image", "logit_scale": 20.0},
    {"loss": "mse", "towers": ("vision", "text")},
], ids=["mse", "kl_image_text", "kl_image_image", "mse_both_towers"])
def test_a_short_run_lowers_the_distillation_loss(changes, digits_split, pruned_dir, teacher):
    config = dataclasses.replace(BASE, **changes)
    student = load_pruned(pruned_dir)
    data = _data(digits_split, student, config)
    batch = _fixed_batch(data)
    plan = plan_training(student, teacher, config)
    with torch.no_grad():
        before = float(distill_loss(student, teacher, batch, config))
    result = train(student, teacher, data, config, plan, progress=False)
    with torch.no_grad():
        after = float(distill_loss(result.model, teacher, batch, config))
    assert after < 0.8 * before, (before, after)
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.steps == 3 * (32 // 8)
    # frozen parts did not move: the text tower when only vision trains
    if config.towers == ("vision",):
        original = load_pruned(pruned_dir)
        for (name, new), (_, old) in zip(result.model.module.named_parameters(), original.module.named_parameters()):
            if not name.startswith("visual."):
                assert torch.equal(new, old), name


def test_interrupted_run_resumes_bit_identically(tmp_path, digits_split, pruned_dir, teacher):
    config = BASE
    reference = train(load_pruned(pruned_dir), teacher, _data(digits_split, load_pruned(pruned_dir)), config,
                      plan_training(load_pruned(pruned_dir), teacher, config), progress=False)
    checkpoint = tmp_path / "ckpt" / "last.safetensors"

    def stop_in_second_epoch(step):
        if step == 6:  # epoch 2 of 3 (4 steps each) is half done; the checkpoint holds epoch 1
            raise Interrupt

    student = load_pruned(pruned_dir)
    with pytest.raises(Interrupt):
        train(student, teacher, _data(digits_split, student), config, plan_training(student, teacher, config),
              checkpoint_path=checkpoint, fingerprint="run-a", progress=False, after_step=stop_in_second_epoch)
    assert load_checkpoint(checkpoint, "run-a").epoch == 1
    torch.manual_seed(1234)  # the resumed run must not depend on the global RNG it starts with
    student = load_pruned(pruned_dir)
    resumed = train(student, teacher, _data(digits_split, student), config, plan_training(student, teacher, config),
                    checkpoint_path=checkpoint, fingerprint="run-a", progress=False)
    assert resumed.resumed_from_epoch == 1
    assert resumed.history == reference.history
    assert _state_bytes(resumed.model) == _state_bytes(reference.model)
    assert load_checkpoint(checkpoint, "run-a").epoch == 3


def test_checkpoint_of_another_run_is_refused(tmp_path, digits_split, pruned_dir, teacher):
    checkpoint = tmp_path / "last.safetensors"
    config = dataclasses.replace(BASE, epochs=1)
    student = load_pruned(pruned_dir)
    train(student, teacher, _data(digits_split, student, config), config, plan_training(student, teacher, config),
          checkpoint_path=checkpoint, fingerprint="run-a", progress=False)
    student = load_pruned(pruned_dir)
    with pytest.raises(CheckpointError) as info:
        train(student, teacher, _data(digits_split, student, config), config, plan_training(student, teacher, config),
              checkpoint_path=checkpoint, fingerprint="run-b", progress=False)
    message = str(info.value)
    assert message.startswith(str(checkpoint)) and "other distill params" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_corrupt_checkpoint_gives_one_line_naming_the_file(tmp_path, damage, digits_split, pruned_dir, teacher):
    checkpoint = tmp_path / "last.safetensors"
    config = dataclasses.replace(BASE, epochs=1)
    student = load_pruned(pruned_dir)
    train(student, teacher, _data(digits_split, student, config), config, plan_training(student, teacher, config),
          checkpoint_path=checkpoint, fingerprint="run-a", progress=False)
    raw = checkpoint.read_bytes()
    if damage == "truncate":
        checkpoint.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        checkpoint.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        checkpoint.write_bytes(b"")
    else:  # a valid safetensors file that is no checkpoint (e.g. a model file copied there)
        from clipprune.io import save_safetensors
        save_safetensors(checkpoint, {"w": torch.zeros(2)}, {"format": "clipprune-pruned"})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(checkpoint, "run-a")
    message = str(info.value)
    assert message.startswith(f"{checkpoint}: ") and "\n" not in message and "checkpoint" in message, message


def test_retrain_plan_follows_the_keep_ratio(pruned_dir, teacher):
    student = load_pruned(pruned_dir)
    ratio = keep_ratio(student, teacher, ("vision",))
    assert 0.2 < ratio < 0.8  # random masks at keep 0.5 (first unit always kept)
    config = dataclasses.replace(BASE, mode="retrain", retrain_schedule=(
        RetrainRow(0.1, 1.0, 2), RetrainRow(ratio, 0.5, 1), RetrainRow(min(1.0, ratio + 0.05), 0.1, 0)))
    plan = plan_training(student, teacher, config)
    assert (plan.data_share, plan.top_blocks, plan.train_masks) == (0.5, 1, True)
    assert plan_training(student, teacher, dataclasses.replace(BASE)).top_blocks is None
    assert keep_ratio(teacher, teacher, ("vision",)) == 1.0


@pytest.mark.parametrize("blocks", [0, 1])
def test_retraining_trains_masks_and_top_blocks_then_folds_them(blocks, digits_split, trained_pruned_dir):
    teacher = load_model("fixture:tiny_clip")
    student = load_pruned(trained_pruned_dir)
    config = dataclasses.replace(BASE, mode="retrain", epochs=3, base_lr=0.1,
                                 retrain_schedule=(RetrainRow(0.01, 0.5, blocks),))
    plan = plan_training(student, teacher, config)
    assert (plan.data_share, plan.top_blocks, plan.train_masks) == (0.5, blocks, True)
    data = _data(digits_split, student, config, plan.data_share)
    assert len(data) == 16  # half of the 32 selected images
    batch = _fixed_batch(data)
    with torch.no_grad():
        before = float(distill_loss(student, teacher, batch, config))
    result = train(student, teacher, data, config, plan, progress=False)
    with torch.no_grad():
        after = float(distill_loss(result.model, teacher, batch, config))
    assert after < 0.95 * before, (before, after)
    original = load_pruned(trained_pruned_dir)
    new_state, old_state = result.model.module.state_dict(), original.module.state_dict()
    assert new_state.keys() == old_state.keys()  # same widths: scales folded, nothing removed
    layers = len(original.towers["vision"].blocks())
    changed = {k for k in old_state if not torch.equal(new_state[k], old_state[k])}
    top = tuple(f"visual.transformer.resblocks.{i}." for i in range(layers - blocks, layers))
    folded = [k for k in changed if not k.startswith(top)] if top else sorted(changed)
    # outside the trainable top blocks only the weights that absorb mask scales changed
    assert folded and all(k.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")) for k in folded), folded
    assert {k.split(".")[3] for k in folded} == {str(i) for i in range(layers - blocks)}  # every mask trained
    if blocks:
        assert any(k.startswith(top) and k.endswith("q_proj.weight") for k in changed)
    assert all(k.startswith("visual.") for k in changed)  # text tower frozen


@pytest.mark.parametrize("warmup_steps", [4, 10])  # 32 images / 8 per batch x 1 epoch = 4 steps
def test_warmup_as_long_as_the_run_is_refused_before_training(warmup_steps, digits_split, pruned_dir, teacher):
    config = dataclasses.replace(BASE, epochs=1, warmup_steps=warmup_steps)
    student = load_pruned(pruned_dir)
    before = _state_bytes(student)
    with pytest.raises(ParamError) as info:
        train(student, teacher, _data(digits_split, student, config), config, plan_training(student, teacher, config),
              progress=False)
    assert str(info.value) == (f"distill.warmup_steps must be < the 4 optimizer steps of this run (distill.epochs 1 x "
                               f"4 steps per epoch), got {warmup_steps}: the learning rate would never reach its "
                               f"peak and decay; lower warmup_steps or train longer")
    assert _state_bytes(student) == before  # refused before the first step


def test_log_trained_towers_warns_about_a_pruned_tower_left_untrained():
    import logging

    from clipprune.distill.runner import log_trained_towers

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("clipprune")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert log_trained_towers(("vision",), ["text", "vision"]) == ["text"]
        assert log_trained_towers(("text", "vision"), ["text", "vision"]) == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "training the vision tower (distill.towers); pruned: text and vision"),
        ("WARNING", "the pruned text tower is not trained: it stays as exported (add it to distill.towers to train it)"),
        ("INFO", "training the text and vision towers (distill.towers); pruned: text and vision"),
    ]
