"""models.blocks: a tower rerun block by block from its captured first-block input, then the adapter's tail
(``tower_output``), reproduces ``encode_*`` exactly, for both families and open_clip's pooling variants."""
import contextlib
import copy

import pytest
import torch

from clipprune.errors import ModelLoadError
from clipprune.models import apply_masks
from clipprune.models.blocks import batch_first, capture_block_input, run_blocks
from models import EOT_ID, OPEN_CLIP_CFG, random_masks, sample_inputs, single_thread_fixture, tiny_model, tiny_open_clip

single_thread = single_thread_fixture()
EOS = 7


def open_clip_variant(custom_text=False, vision=None, **text_cfg):
    cfg = copy.deepcopy(OPEN_CLIP_CFG)
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text_cfg)
    if custom_text:
        cfg["custom_text"] = True
    return tiny_open_clip(seed=1, model_cfg=cfg)


VARIANTS = {
    "open_clip": lambda: tiny_model("open_clip"),
    "hf": lambda: tiny_model("hf"),
    "open_clip eos pooling": lambda: open_clip_variant(pool_type="eos", eos_id=EOS),
    "open_clip custom text, last": lambda: open_clip_variant(True, pool_type="last", no_causal_mask=True),
    "open_clip no text projection": lambda: open_clip_variant(True, proj_type="none", width=32, pool_type="first"),
    "open_clip avg pool, ln after pool": lambda: open_clip_variant(vision={"pool_type": "avg",
                                                                            "final_ln_after_pool": True}),
}


def through_blocks(model, tower, inputs):
    """Embedding from the captured first-block input, every block called directly, then the tail."""
    hidden, call = capture_block_input(model, tower, inputs)
    return model.tower_output(tower, batch_first(call, run_blocks(call, model.towers[tower].blocks(), hidden)), inputs)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("masked", [False, True])
def test_blocks_then_tail_equal_encode(variant, masked):
    model = VARIANTS[variant]()
    images, tokens = sample_inputs(model, batch=4)
    tokens[0, 3], tokens[1, 5] = EOS, EOS  # for the eos rule: the first eos, not the highest id
    masks = random_masks(model, seed=0, real_valued=True) if masked else {}
    with torch.no_grad(), (apply_masks(model, masks) if masks else contextlib.nullcontext()):
        for tower, inputs, encode in (("vision", images, model.encode_image), ("text", tokens, model.encode_text)):
            expected = encode(inputs)
            got = through_blocks(model, tower, inputs)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_class_token_text_tower_is_refused():
    model = open_clip_variant(True, embed_cls=True)
    hidden = torch.zeros(2, OPEN_CLIP_CFG["text_cfg"]["context_length"] + 1, 32)
    with pytest.raises(ModelLoadError, match="appends a class token"):
        model.tower_output("text", hidden, torch.full((2, 16), EOT_ID))
