"""score.checkpointing and score.precision: recomputed blocks give the same gradients; autocast keeps the
masks' gradients and the Fisher sums float32 and close to the float32 run."""
import pytest
import torch

from clipprune.errors import ParamError
from clipprune.scoring import score_model
from clipprune.scoring.run import checkpointed_blocks

from models import single_thread_fixture, tiny_model

from . import batches

single_thread = single_thread_fixture()


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_checkpointed_blocks_give_the_same_gradients(model, granularity):
    loader = batches(model, sizes=(3, 2))
    kwargs = dict(criterion="fisher", loss="contrastive", granularity=granularity, towers="both", progress=False)
    plain = score_model(model, loader, **kwargs)
    calls = []
    from torch.utils import checkpoint as torch_checkpoint

    original = torch_checkpoint.checkpoint

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    torch_checkpoint.checkpoint = counting
    try:
        checkpointed = score_model(model, loader, checkpointing=True, **kwargs)
    finally:
        torch_checkpoint.checkpoint = original
    blocks = sum(len(tower.blocks()) for tower in model.towers.values())
    assert len(calls) == 2 * blocks  # every block of both towers, in each of the 2 batches
    for key, value in plain.grads.items():
        torch.testing.assert_close(checkpointed.grads[key], value, rtol=1e-5, atol=1e-7)
    for key, value in plain.scores.items():
        torch.testing.assert_close(checkpointed.scores[key], value, rtol=1e-5, atol=1e-10)
    # the blocks' own forward is back
    assert all("forward" not in vars(block) for t in model.towers.values() for block in t.blocks())
    with checkpointed_blocks(model):
        assert all("forward" in vars(block) for t in model.towers.values() for block in t.blocks())


def test_bfloat16_autocast_keeps_float32_gradients_close_to_float32(model):
    loader = batches(model, sizes=(4, 4))
    kwargs = dict(criterion="fisher", loss="contrastive", granularity="batch", towers="both", progress=False)
    full = score_model(model, loader, **kwargs)
    half = score_model(model, loader, precision="bfloat16", **kwargs)
    assert half.meta["precision"] == "bfloat16" and "precision" not in full.meta
    for key, value in full.scores.items():
        assert half.scores[key].dtype == torch.float32 and half.grads[key + ".grads"].dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: the gradients agree to a few per cent, and so do the rankings
        corr = torch.corrcoef(torch.stack([value.flatten(), half.scores[key].flatten()]))[0, 1]
        assert corr > 0.95, (key, float(corr))
        assert not torch.equal(half.scores[key], value)  # autocast did act


def test_unknown_precision_is_a_one_line_param_error(model):
    with pytest.raises(ParamError, match="score.precision must be one of float32, bfloat16, float16; got 'int8'"):
        score_model(model, batches(model, sizes=(2,)), criterion="fisher", precision="int8")
