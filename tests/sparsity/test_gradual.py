"""Gradual pruning / one-shot + fine-tune: the schedule, fixed masks under optimiser steps, bad params, and a run
killed with SIGKILL that resumes from its last pruning-step checkpoint with the bits of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clipprune.config import parse_params
from clipprune.errors import ParamError
from clipprune.sparsity.gradual import FixedMasks, gradual_schedule

from distill.conftest import digits_split  # noqa: F401  (a session fixture: a small digits split)

TESTS = Path(__file__).resolve().parents[1]


def test_cubic_schedule_is_zhu_and_gupta_and_linear_is_even():
    initial, final, n = 0.5, 0.9, 4
    expected = [final + (initial - final) * (1 - t / (n - 1)) ** 3 for t in range(n)]
    assert gradual_schedule(initial, final, n, "cubic") == pytest.approx(expected, abs=0)
    assert gradual_schedule(initial, final, n, "cubic")[-1] == final
    assert gradual_schedule(initial, final, n, "linear") == pytest.approx([0.5, 0.5 + 0.4 / 3, 0.5 + 0.8 / 3, 0.9])
    assert gradual_schedule(initial, final, 1, "cubic") == [final]  # one-shot + fine-tune
    steps = gradual_schedule(0.0, 0.9, 6, "cubic")
    increments = [b - a for a, b in zip(steps, steps[1:])]
    assert increments == sorted(increments, reverse=True)  # prunes most early


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_pruned_weights_stay_exactly_zero_through_optimiser_steps_with_momentum(optimizer):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    make = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)}[optimizer]
    opt = make(layer.parameters())
    x = torch.randn(32, 16)
    for _ in range(3):  # momentum / moments built up for every weight before the mask exists
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    keep = torch.rand(8, 16, generator=torch.Generator().manual_seed(1)) > 0.5
    with FixedMasks({"l": layer}, {"l": keep}) as fixed:
        assert torch.equal(layer.weight[~keep], torch.zeros(int((~keep).sum())))
        for _ in range(5):
            opt.zero_grad()
            layer(x).pow(2).sum().backward()
            assert torch.equal(layer.weight.grad[~keep], torch.zeros(int((~keep).sum())))  # masked gradient
            opt.step()
            moved = int((layer.weight[~keep] != 0).sum())
            fixed.rezero()
            pruned = layer.weight.detach()[~keep]
            assert torch.equal(pruned.view(torch.int32), torch.zeros_like(pruned).view(torch.int32))  # +0.0 bits
        assert moved > 0  # without rezero the old momentum would have revived them: the check can fail
        assert (layer.weight[keep] != 0).all()
    assert not layer.weight._backward_hooks  # hooks removed on exit


SECTIONS = {"sparsity": {"method": "cap"}, "gradual": {}}


@pytest.mark.parametrize("changes, message", [
    ({"gradual": {"initial": 0.8, "final": 0.6}},
     r"^gradual.final must be >= gradual.initial \(0.8\): sparsity only grows, got 0.6$"),
    ({"gradual": {"steps": 0}}, r"^gradual.steps must be >= 1, got 0$"),
    ({"gradual": {"ramp": "exp"}}, r"^gradual.ramp must be one of"),
    ({"gradual": {"steps": 3, "mask_type": "2:4"}},
     r"^gradual.steps must be 1 \(one-shot \+ fine-tune\) with an N:M gradual.mask_type \(2:4 fixes"),
    ({"gradual": {"stepz": 3}}, r"^gradual.stepz: unknown key; did you mean `steps`\?$"),
])
def test_bad_gradual_params_give_one_line_naming_the_key(changes, message):
    raw = {**SECTIONS, **changes}
    with pytest.raises(ParamError, match=message) as err:
        parse_params(raw)
    assert "\n" not in str(err.value)


def test_default_gradual_params_and_one_shot_nm_are_accepted():
    assert parse_params(SECTIONS).gradual.steps == 2
    assert parse_params({"gradual": {"steps": 1, "mask_type": "2:4"}}).gradual.steps == 1
    assert parse_params({"sparsity": {"mask_type": "2:4"}, "gradual": {}}).gradual.steps == 2  # sparse_prune's own


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from safetensors.torch import save_file
    from clipprune.distill import DistillConfig, TrainImages
    from clipprune.sparsity import available_methods, parse_config
    from clipprune.sparsity.gradual import GradualConfig, run_gradual
    from distill.conftest import make_teacher
    from scoring import batches

    images, captions, checkpoint, out, kill_at = sys.argv[1:]
    model, teacher = make_teacher(), make_teacher()
    loader = batches(model, sizes=(4, 4), seed=1)
    data = TrainImages(images, captions, model.preprocess, 16, 0)
    sparsity = parse_config({{"method": "wanda", "targets": [0.5]}}, available_methods())
    gradual = GradualConfig(initial=0.3, final=0.7, steps=3, epochs=1, num_samples=16, num_grads=8)
    distill = DistillConfig(loss="kl", batch_size=8, base_lr=0.05, warmup_steps=0, weight_decay=0.01)

    def after(step):
        if step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    result = run_gradual(model, teacher, sparsity, gradual, distill, loader, data, checkpoint=Path(checkpoint),
                         fingerprint="test", progress=False, after_prune_step=after)
    print("resumed", result.resumed_after_step, "sparsity", result.history[-1]["sparsity"])
    save_file({{k: v.contiguous() for k, v in model.module.state_dict().items()}}, out)
""")


@pytest.mark.slow  # three short subprocesses (~10 s each on a loaded 2-core machine)
def test_killed_run_resumes_bit_identically_from_its_pruning_step_checkpoint(tmp_path, digits_split):  # noqa: F811
    images, captions = digits_split
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))

    def run(name, kill_at):
        return subprocess.run([sys.executable, str(script), str(images), str(captions), str(tmp_path / f"{name}.ckpt"),
                               str(tmp_path / f"{name}.safetensors"), str(kill_at)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)

    whole = run("whole", 0)
    assert whole.returncode == 0, whole.stderr
    assert "resumed None" in whole.stdout
    killed = run("killed", 2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "killed.ckpt").is_file() and not (tmp_path / "killed.safetensors").exists()
    resumed = run("killed", 0)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed 2 " in resumed.stdout
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "killed.safetensors").read_bytes()
    sparsity = float(whole.stdout.split()[-1])
    assert sparsity == pytest.approx(0.7, abs=0.01)
