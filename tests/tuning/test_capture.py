"""Block-by-block propagation from captured block inputs reproduces the towers exactly."""
import contextlib

import pytest
import torch

from clipprune.errors import DataError
from clipprune.models import apply_masks
from clipprune.tuning.capture import (block_parts, capture_block_input, iter_tower_batches, record_output,
                                      text_valid_positions)
from models import random_masks, sample_inputs, single_thread_fixture, tiny_model

single_thread = single_thread_fixture()


@pytest.mark.parametrize("family", ["open_clip", "hf"])
@pytest.mark.parametrize("masked", [False, True])
def test_propagating_captured_inputs_matches_the_tower(family, masked):
    model = tiny_model(family)
    images, tokens = sample_inputs(model, batch=4)
    masks = random_masks(model, seed=0, real_valued=True) if masked else {}
    (batch,) = list(iter_tower_batches(model, (images, tokens), ("vision", "text"), batch_size=8))
    for tower in ("vision", "text"):
        hidden, call = capture_block_input(model, tower, batch[tower])
        blocks = model.towers[tower].blocks()
        seen = {}
        with torch.no_grad(), (apply_masks(model, masks) if masks else contextlib.nullcontext()):
            with record_output(blocks[-1], seen, "last"):
                model.encode_image(images) if tower == "vision" else model.encode_text(tokens)
            for block in blocks:
                hidden = call.run(block, hidden)
        assert torch.allclose(hidden, seen["last"], atol=1e-5)
        parts = block_parts(model.towers[tower], 0)
        assert parts.gamma1 is None and parts.fc2 is model.towers[tower].mlp_out_module(0)


def test_text_valid_positions_follow_the_pooled_token():
    for family in ("open_clip", "hf"):
        model = tiny_model(family)
        _, tokens = sample_inputs(model, batch=3)
        valid = text_valid_positions(model, tokens)
        eot = tokens.argmax(dim=1)  # the fixtures' EOT id is the largest id and the HF eos id
        for row in range(3):
            assert valid[row].tolist() == [p <= int(eot[row]) for p in range(tokens.shape[1])]


def test_batches_are_checked():
    model = tiny_model("open_clip")
    images, tokens = sample_inputs(model, batch=2)
    with pytest.raises(DataError, match="images"):
        list(iter_tower_batches(model, [(None, tokens)], ("vision",)))
    with pytest.raises(DataError, match="captions"):
        list(iter_tower_batches(model, [(images, None)], ("text",)))
    with pytest.raises(DataError, match="pair"):
        list(iter_tower_batches(model, [images], ("vision",)))
