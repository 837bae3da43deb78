"""sparsify with num_recomputations: the cubic schedule, steps on the partly pruned model, masks only grow."""
import pytest
import torch

from clipprune.errors import ClipPruneError
from clipprune.sparsity import available_methods, parse_config, prunable_linears, recomputation_schedule, \
    sparsify, sparsity_stats
from clipprune.sparsity import run as run_module

from models import single_thread_fixture

single_thread = single_thread_fixture()


def config(**section):
    section.setdefault("fisher_block_size", 16)
    return parse_config(section, available_methods())


def test_the_schedule_is_the_cubic_ramp_from_zero_and_ends_on_the_target():
    assert recomputation_schedule(0.9, 1) == [0.9]
    for steps in (2, 3, 4, 7):
        schedule = recomputation_schedule(0.9, steps)
        assert schedule[-1] == 0.9 and len(schedule) == steps
        assert all(a < b for a, b in zip(schedule, schedule[1:]))
        for i, s in enumerate(schedule, 1):
            assert s == pytest.approx(0.9 - 0.9 * (1 - i / steps) ** 3, abs=1e-15)
    assert recomputation_schedule(0.8, 2) == pytest.approx([0.7, 0.8])  # 0.8 · (1 − 1/8)


@pytest.fixture
def recorded_steps(monkeypatch):
    """Each step's model weights when the method starts, and the weights the step returns."""
    steps = []
    real = run_module._run_method

    def spy(model, cfg, loader, seed, progress):
        layers = prunable_linears(model, cfg.towers)
        before = {n: l.weight.detach().clone() for n, l in layers.items()}
        result = real(model, cfg, loader, seed, progress)
        steps.append((cfg.targets, before, result.weights[cfg.targets[0]]))
        return result

    monkeypatch.setattr(run_module, "_run_method", spy)
    return steps


@pytest.mark.parametrize("method", ["cap", "fastcap", "sparsegpt", "wanda"])
def test_each_step_prunes_the_model_the_last_left_and_masks_only_grow(model, loader, recorded_steps, method):
    dense = {n: l.weight.detach().clone() for n, l in prunable_linears(model, ("vision",)).items()}
    result = sparsify(model, config(method=method, targets=[0.5, 0.75], num_recomputations=3), loader,
                      progress=False)
    assert [s[0] for s in recorded_steps] == [(s,) for t in (0.5, 0.75) for s in recomputation_schedule(t, 3)]
    for index, (_, before, after) in enumerate(recorded_steps):
        first = index % 3 == 0
        previous = dense if first else recorded_steps[index - 1][2]
        for name, weight in before.items():
            assert torch.equal(weight, previous[name].to(weight.dtype)), (index, name)  # runs on the pruned copy
            assert bool(((weight == 0) <= (after[name] == 0)).all()), (index, name)  # the mask only grows
    total = sum(w.numel() for w in dense.values())
    for target in (0.5, 0.75):
        assert abs(sparsity_stats(result.weights[target])["overall"] - target) <= 1.5 / total
    assert result.meta["num_recomputations"] == 3
    assert result.meta["recomputation_schedule"]["0.75"] == recomputation_schedule(0.75, 3)
    assert all(torch.equal(l.weight, dense[n]) for n, l in prunable_linears(model, ("vision",)).items())


def test_the_last_step_recomputes_the_gradients_on_the_pruned_model(model, loader):
    """Two steps differ from one: the Fisher of step 2 comes from the model step 1 pruned."""
    one = sparsify(model, config(method="cap", targets=[0.75], damp=1e-4), loader, progress=False)
    two = sparsify(model, config(method="cap", targets=[0.75], damp=1e-4, num_recomputations=2), loader,
                   progress=False)
    assert two.meta["calibration_passes"] == 2 * one.meta["calibration_passes"]
    assert any(not torch.equal(w, two.weights[0.75][n]) for n, w in one.weights[0.75].items())


def test_one_step_is_the_one_shot_run(model, loader):
    """num_recomputations: 1 calls the method once at all targets, with the same weights as before the key
    existed (the method on the model as given)."""
    from clipprune.sparsity import get_method
    from clipprune.sparsity.registry import GradientSource
    from clipprune.sparsity.grads import per_sample_gradients

    cfg = config(method="cap", targets=[0.5, 0.75])
    result = sparsify(model, cfg, loader, progress=False)
    layers = prunable_linears(model, cfg.towers)
    grads = GradientSource(lambda names: per_sample_gradients(model, loader, {n: layers[n] for n in names},
                                                              loss=cfg.loss, num_grads=12, progress=False), 12)
    direct = get_method("cap")(layers, cfg, grads, False)
    for target in (0.5, 0.75):
        for name, w in direct.weights[target].items():
            assert torch.equal(result.weights[target][name], w + 0.0), name  # +0.0: canonical zeros


def test_a_step_that_revives_a_pruned_weight_stops_the_run(model, loader, monkeypatch):
    real = run_module._run_method
    calls = []

    def reviving(model, cfg, loader, seed, progress):
        result = real(model, cfg, loader, seed, progress)
        calls.append(cfg.targets)
        if len(calls) == 2:  # give back one weight that step 1 pruned
            weights = result.weights[cfg.targets[0]]
            layer = prunable_linears(model, cfg.towers)["vision.0.fc1"].weight
            index = torch.nonzero(layer.reshape(-1) == 0)[0]
            weights["vision.0.fc1"].view(-1)[index] = 1.0
        return result

    monkeypatch.setattr(run_module, "_run_method", reviving)
    with pytest.raises(ClipPruneError, match=r"^sparsity: step 2 of 2 of sparsity.method=wanda gave 1 weights of "
                                             r"layer vision.0.fc1 pruned by step 1 a non-zero value"):
        sparsify(model, config(method="wanda", targets=[0.5], num_recomputations=2), loader, progress=False)


def test_every_step_keeps_the_fisher_memory_plan(model, loader, caplog):
    """Each step plans CAP's Fisher memory again (logged once per step) and chunked steps give the weights of
    single-pass steps bit for bit."""
    import logging

    single = sparsify(model, config(method="cap", targets=[0.75], fisher_dtype="float64", chunk_layers=None,
                                    num_recomputations=2), loader, progress=False)
    caplog.clear()  # the single-pass run logs its plans too when another test left the logger at INFO
    with caplog.at_level(logging.INFO, logger="clipprune.sparsity.cap"):
        chunked = sparsify(model, config(method="cap", targets=[0.75], fisher_dtype="float64", chunk_layers=5,
                                         num_recomputations=2), loader, progress=False)
    plans = [r.getMessage() for r in caplog.records if r.name == "clipprune.sparsity.cap"]
    assert len(plans) == 2 and all("5 layer(s) per calibration pass" in p for p in plans)
    assert chunked.meta["inverse_store"] == "rebuild"
    for name, w in single.weights[0.75].items():
        assert torch.equal(w, chunked.weights[0.75][name]), name
