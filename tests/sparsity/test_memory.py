"""CAP's memory plan: the factors' size, the chunking auto chooses, and one-line errors before any work."""
import logging

import pytest
import torch

from clipprune.errors import ParamError
from clipprune.sparsity import BlockFisher, available_methods, parse_config, sparsify
from clipprune.sparsity import memory
from clipprune.sparsity.memory import GIB, HEADROOM, chunk_peak, plan_fisher_memory

from models import single_thread_fixture, tiny_open_clip
from scoring import batches

single_thread = single_thread_fixture()

# ViT-B/32's vision tower: q/k/v/out_proj (768x768) and fc1/fc2 (768x3072) in 12 blocks
VIT_B32 = [768 * 768] * 4 + [768 * 3072] * 2
VIT_NUMELS = VIT_B32 * 12
VIT_NAMES = [f"vision.{i}.{n}" for i in range(12) for n in ("q", "k", "v", "out", "fc1", "fc2")]


def plan(available, chunk_layers="auto", offload=False, disk=None, block=50, itemsize=4):
    return plan_fisher_memory(VIT_NAMES, VIT_NUMELS, block, itemsize, 32, chunk_layers, offload, available, disk)


def test_factor_bytes_are_what_the_factors_take():
    fisher = BlockFisher(1000, 48, 1e-7, 4, torch.float32)
    assert fisher.memory_bytes() == memory.fisher_memory_bytes(1000, 48, 4) == 21 * 48 * 48 * 4
    assert plan(10 ** 15).factor_bytes / GIB == pytest.approx(15.8, abs=0.05)  # the README's figure at B=50


def test_auto_keeps_everything_in_memory_when_it_fits():
    chosen = plan(64 * GIB)
    assert (chosen.chunk_layers, chosen.mode, chosen.chunks) == (72, "memory", 1)


@pytest.mark.parametrize("available_gib", [4, 8, 12, 20])
def test_auto_makes_the_fewest_calibration_passes_that_fit_with_even_chunks(available_gib):
    available = available_gib * GIB
    chosen = plan(available)
    budget = available * HEADROOM
    largest = max(k for k in range(1, 73) if chunk_peak(VIT_NUMELS, k, 50, 4, 32) <= budget)  # brute force
    passes = -(-72 // largest)
    assert chosen.chunks == passes and chosen.chunk_layers == -(-72 // passes)
    assert chosen.peak_bytes == chunk_peak(VIT_NUMELS, chosen.chunk_layers, 50, 4, 32) <= budget
    assert chosen.mode == ("memory" if passes == 1 else "rebuild")


def test_offload_needs_the_disk_space_and_says_so():
    assert plan(8 * GIB, offload=True, disk=100 * GIB).mode == "disk"
    with pytest.raises(ParamError, match=r"^sparsity.offload: .* 15\.\d+ GiB on disk .*offload: false"):
        plan(8 * GIB, offload=True, disk=10 * GIB)


@pytest.mark.parametrize("chunk_layers", [None, 72, 30])
def test_a_given_chunking_that_does_not_fit_is_refused(chunk_layers):
    with pytest.raises(ParamError) as err:
        plan(8 * GIB, chunk_layers=chunk_layers)
    message = str(err.value)
    assert message.startswith("sparsity.chunk_layers: ") and "auto" in message and "\n" not in message


def test_a_layer_too_large_on_its_own_names_the_block_size():
    with pytest.raises(ParamError, match=r"^sparsity.fisher_block_size: .*vision.0.fc1 alone .*B=192"):
        plan(2 * GIB, block=192)


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip(seed=0)


def test_cap_plans_with_the_memory_it_sees_and_logs_it(model, monkeypatch, caplog):
    loader = batches(model, sizes=(4, 4), seed=1)
    config = parse_config({"targets": [0.5], "fisher_block_size": 16, "fisher_dtype": "float64"},
                          available_methods())
    with caplog.at_level(logging.INFO, logger="clipprune"):
        roomy = sparsify(model, config, loader, progress=False)
    assert roomy.meta["inverse_store"] == "memory" and roomy.meta["calibration_passes"] == 1
    assert any("layer(s) per calibration pass" in r.getMessage() for r in caplog.records)
    layers = len(roomy.meta["layers"])
    # memory for a few layers' factors only: auto chunks and rebuilds, with the same result
    tight = chunk_peak([w.numel() for w in roomy.weights[0.5].values()], 2, 16, 8, config.batch_size) / HEADROOM + 1
    monkeypatch.setattr(memory, "available_memory", lambda: int(tight))
    monkeypatch.setattr("clipprune.sparsity.cap.available_memory", lambda: int(tight))
    chunked = sparsify(model, config, loader, progress=False)
    assert 1 <= chunked.meta["chunk_layers_used"] < layers
    assert chunked.meta["inverse_store"] == "rebuild" and chunked.meta["calibration_passes"] > 2
    for name, w in roomy.weights[0.5].items():
        assert torch.equal(w, chunked.weights[0.5][name]), name
