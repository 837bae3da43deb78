"""Block-by-block propagation from captured block inputs reproduces the towers exactly."""
import contextlib
import copy

import pytest
import torch

from clipprune.errors import DataError, ModelLoadError
from clipprune.models import apply_masks
from clipprune.models.blocks import capture_block_input
from clipprune.tuning.capture import block_parts, iter_tower_batches, record_output, text_valid_positions
from models import (EOT_ID, OPEN_CLIP_CFG, hf_clip_config, random_masks, sample_inputs, single_thread_fixture,
                    tiny_model, tiny_open_clip)

single_thread = single_thread_fixture()


@pytest.mark.parametrize("family", ["open_clip", "hf"])
@pytest.mark.parametrize("masked", [False, True])
def test_propagating_captured_inputs_matches_the_tower(family, masked):
    model = tiny_model(family)
    images, tokens = sample_inputs(model, batch=4)
    masks = random_masks(model, seed=0, real_valued=True) if masked else {}
    (batch,) = list(iter_tower_batches(model, (images, tokens), ("vision", "text"), batch_size=8))
    for tower in ("vision", "text"):
        hidden, call = capture_block_input(model, tower, batch[tower].inputs)
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


# ---------------------------------------------------------------------------------------------
# text pooling rules: valid positions == the positions that really influence the embedding
# ---------------------------------------------------------------------------------------------
EOS = 500  # an eos id below most token ids, so that the eos and argmax rules point at different positions


def token_embedding(model):
    if model.family == "hf":
        return model.module.text_model.embeddings.token_embedding
    return getattr(model.module, "text", model.module).token_embedding


def crafted_tokens(model, eos: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Ids in [600, 990), ``eos`` twice at a row-dependent position, then padding 0."""
    gen = torch.Generator().manual_seed(seed)
    context = model.context_length
    tokens = torch.randint(600, 990, (batch, context), generator=gen)
    for row in range(batch):
        end = 2 + 4 * row
        tokens[row, end:end + 2] = eos
        tokens[row, end + 2:] = 0
    return tokens


@torch.no_grad()
def influence(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool by brute force: does perturbing position p's input change row b's text embedding?"""
    base = model.encode_text(tokens)
    rows = tokens.shape[0]
    scale = float(base.abs().max())
    gen = torch.Generator().manual_seed(1)
    out = torch.zeros(tokens.shape, dtype=torch.bool)
    for position in range(tokens.shape[1]):
        def perturb(module, args, output, position=position):
            delta = torch.zeros_like(output)
            delta[:, position] = torch.randn(output.shape[-1], generator=gen)
            return output + delta

        handle = token_embedding(model).register_forward_hook(perturb)
        try:
            moved = model.encode_text(tokens)
        finally:
            handle.remove()
        out[:, position] = (moved - base).reshape(rows, -1).abs().amax(1) > 1e-5 * scale
    return out


def open_clip_with_text(custom_text: bool = False, **text_cfg):
    cfg = copy.deepcopy(OPEN_CLIP_CFG)
    cfg["text_cfg"].update(text_cfg)
    if custom_text:
        cfg["custom_text"] = True
    return tiny_open_clip(seed=0, model_cfg=cfg)


def hf_with_eos(eos: int):
    from transformers import CLIPModel

    from clipprune.models.hf_adapter import HFClipModel

    config = hf_clip_config()
    config.text_config.eos_token_id = eos
    torch.manual_seed(0)
    return HFClipModel(CLIPModel(config).eval(), "test:hf")


POOLING_CASES = {
    # name: (model builder, eos id in the tokens, expected rule, causal)
    "open_clip argmax": (lambda: open_clip_with_text(), EOT_ID, "argmax", True),
    "open_clip eos": (lambda: open_clip_with_text(pool_type="eos", eos_id=EOS), EOS, "eos", True),
    "open_clip first": (lambda: open_clip_with_text(pool_type="first"), EOT_ID, "first", True),
    "open_clip last": (lambda: open_clip_with_text(pool_type="last"), EOT_ID, "last", True),
    "open_clip none": (lambda: open_clip_with_text(pool_type="none"), EOT_ID, "none", True),
    "open_clip custom-text eos": (lambda: open_clip_with_text(True, pool_type="eos", eos_id=EOS), EOS, "eos", True),
    "open_clip bidirectional argmax": (lambda: open_clip_with_text(True, no_causal_mask=True), EOT_ID, "argmax",
                                       False),
    "open_clip bidirectional last": (lambda: open_clip_with_text(True, no_causal_mask=True, pool_type="last"),
                                     EOT_ID, "last", False),
    "hf eos": (lambda: hf_with_eos(EOS), EOS, "eos", True),
    "hf legacy eos id 2 (argmax)": (lambda: hf_with_eos(2), EOT_ID, "argmax", True),
}


@pytest.mark.parametrize("case", list(POOLING_CASES))
def test_valid_positions_are_the_positions_that_reach_the_embedding(case):
    build, eos, rule, causal = POOLING_CASES[case]
    model = build()
    assert (model.text_pooling().rule, model.text_pooling().causal) == (rule, causal)
    tokens = crafted_tokens(model, eos)
    valid = text_valid_positions(model, tokens)
    truth = influence(model, tokens)
    assert torch.equal(valid, truth), (valid.int(), truth.int())
    if rule in ("argmax", "eos", "first") and causal:
        assert not bool(truth.all())  # the case really tells the rules apart: padding is excluded


def test_bidirectional_tower_with_padding_mask():
    """A bidirectional open_clip text tower that masks padding keys: padding reaches nothing."""
    model = open_clip_with_text(True, no_causal_mask=True, pool_type="last")
    model.module.text.use_pad_mask = True  # TextTransformer's pad-key mask (not reachable from a model config)
    tokens = crafted_tokens(model, EOT_ID)
    assert model.text_pooling().pad_id == 0
    valid = text_valid_positions(model, tokens)
    assert torch.equal(valid, influence(model, tokens))
    assert not bool(valid.all())


def test_unknown_or_unsupported_pooling_is_a_one_line_error():
    model = tiny_model("open_clip")
    model.module.text_pool_type = "mean"  # open_clip validates the rule at construction; a newer rule
    _, tokens = sample_inputs(model, batch=2)
    with pytest.raises(ModelLoadError, match=r"^test:open_clip: unknown text pooling rule 'mean' \(mask tuning "
                                             r"knows argmax, eos, first, last, none\)$"):
        text_valid_positions(model, tokens)
    with pytest.raises(ModelLoadError, match="unknown text pooling rule 'mean'"):
        list(iter_tower_batches(model, (None, tokens), ("text",)))
    hf = tiny_model("hf")
    hf.module.text_model.eos_token_id = [EOT_ID, 2]
    with pytest.raises(ModelLoadError, match=r"^test:hf: text_config.eos_token_id must be one integer"):
        text_valid_positions(hf, tokens)
    with_cls = open_clip_with_text(True, embed_cls=True)
    with pytest.raises(ModelLoadError, match="appends a class token"):
        text_valid_positions(with_cls, tokens)
