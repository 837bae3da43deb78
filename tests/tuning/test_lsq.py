"""Least-squares mask tuning on tiny random models of both families."""
import copy
import types
import warnings

import pytest
import torch

from clipprune.errors import DataError, MaskError, ModelLoadError, ParamError
from clipprune.models import full_masks, prune_model
from clipprune.tuning import LeastSquaresStats, TuningWarning, solve_scales, tune_masks
from models import OPEN_CLIP_CFG, random_masks, sample_inputs, single_thread_fixture, tiny_model, tiny_open_clip

from . import block_streams, masks_at_stage, mean_sq

FAMILIES = ["open_clip", "hf"]

single_thread = single_thread_fixture()


def _inputs(model, batch=12, seed=0):
    return sample_inputs(model, batch=batch, seed=seed)


@pytest.fixture(scope="module", params=FAMILIES)
def tuned_case(request):
    model = tiny_model(request.param)
    images, tokens = _inputs(model)
    masks = random_masks(model, seed=3, real_valued=False, keep=0.5)
    for mask in masks.values():
        mask[:, -1] = 0  # every sub-block loses a unit, so every one has something to repair
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningWarning)  # a healthy problem must not be rejected
        tuned, report = tune_masks(model, masks, (images, tokens), batch_size=5, damp=1e-3)
    return model, images, tokens, masks, tuned, report


def _entry(report, tower, layer, kind):
    (entry,) = [e for e in report["layers"] if (e["tower"], e["layer"], e["kind"]) == (tower, layer, kind)]
    return entry


def test_reported_errors_match_direct_measurement_and_never_increase(tuned_case):
    model, images, tokens, masks, tuned, report = tuned_case
    assert report["rejected"] == 0 and report["accepted"] == 8  # 2 towers × 2 layers × (heads, neurons)
    for tower in ("vision", "text"):
        for layer in range(2):
            teacher = block_streams(model, tower, layer, images, tokens)
            for kind, stream in (("head", "h"), ("neuron", "y")):
                entry = _entry(report, tower, layer, kind)
                errors = []
                for tuned_now in (False, True):
                    student_masks = masks_at_stage(masks, tuned, tower, layer, kind, tuned_now)
                    student = block_streams(model, tower, layer, images, tokens, student_masks)
                    errors.append(mean_sq(student[stream], teacher[stream]))
                before, after = errors
                assert entry["error_before"] == pytest.approx(before, rel=1e-3)
                assert entry["error_after"] == pytest.approx(after, rel=1e-3)
                assert after <= before * (1 + 1e-6), (tower, layer, kind)
                assert after < before * 0.9999  # 50% pruned, random weights: scales must actually help
                assert entry["tokens"] == teacher["h"].shape[0]


def test_pruned_entries_stay_zero_kept_entries_get_scales(tuned_case):
    model, images, tokens, masks, tuned, report = tuned_case
    assert sorted(tuned) == sorted(masks)
    for key, mask in masks.items():
        assert tuned[key].shape == mask.shape and tuned[key].dtype == mask.dtype
        assert bool((tuned[key][mask == 0] == 0).all())
        kept = tuned[key][mask != 0]
        assert bool((kept != 0).all()) and bool(torch.isfinite(kept).all())
        assert not torch.equal(kept, torch.ones_like(kept))
        assert bool(((mask == 0) | (mask == 1)).all())  # the input masks were not modified


def test_all_ones_masks_give_unit_scales_and_zero_error():
    model = tiny_model("open_clip")
    images, tokens = _inputs(model)
    tuned, report = tune_masks(model, full_masks(model), (images, tokens), batch_size=6, damp=1e-3)
    for key, mask in tuned.items():
        assert torch.allclose(mask, torch.ones_like(mask), atol=1e-3), key
    for entry in report["layers"]:
        assert entry["target_energy"] > 0.1
        assert entry["error_before"] < 1e-6 * entry["target_energy"], entry
        assert entry["error_after"] < 1e-6 * entry["target_energy"], entry


def test_teacher_is_unchanged_and_no_hooks_remain():
    model = tiny_model("hf")
    images, tokens = _inputs(model)
    state = copy.deepcopy(model.module.state_dict())
    with torch.no_grad():
        dense = (model.encode_image(images), model.encode_text(tokens))
    tune_masks(model, random_masks(model, seed=1, real_valued=False), (images, tokens), batch_size=4)
    assert all(torch.equal(state[k], v) for k, v in model.module.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.module.modules())
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), dense[0])
        assert torch.equal(model.encode_text(tokens), dense[1])


def test_already_pruned_teacher_with_uneven_widths():
    model = tiny_model("open_clip")
    images, tokens = _inputs(model)
    first = random_masks(model, seed=7, real_valued=False, keep=0.7)
    first["vision.neuron"][1] = 0  # layer 1 loses its MLP entirely
    teacher = prune_model(model, first)
    masks = random_masks(teacher, seed=8, real_valued=False, keep=0.6)
    tuned, report = tune_masks(teacher, masks, (images, tokens), towers="vision", batch_size=6)
    dropped = _entry(report, "vision", 1, "neuron")
    assert dropped["status"] == "skipped" and dropped["reason"] == "sub-block dropped"
    for key in ("vision.head", "vision.neuron"):
        assert bool((tuned[key][masks[key] == 0] == 0).all())  # includes the padding of narrower layers
    for entry in report["layers"]:
        if entry["status"] != "skipped":
            assert entry["error_after"] <= entry["error_before"]
            teacher_h = block_streams(teacher, "vision", entry["layer"], images, tokens)
            stage = masks_at_stage(masks, tuned, "vision", entry["layer"], entry["kind"], True)
            student = block_streams(teacher, "vision", entry["layer"], images, tokens, stage)
            stream = "h" if entry["kind"] == "head" else "y"
            assert entry["error_after"] == pytest.approx(mean_sq(student[stream], teacher_h[stream]), rel=1e-3)


def test_deterministic_and_independent_of_batching():
    model = tiny_model("open_clip")
    images, tokens = _inputs(model)
    masks = random_masks(model, seed=5, real_valued=False)
    first, report = tune_masks(model, masks, (images, tokens), batch_size=4)
    second, _ = tune_masks(model, masks, (images, tokens), batch_size=4)
    assert all(torch.equal(first[k], second[k]) for k in first)
    loader = [(images[i:i + 7], tokens[i:i + 7]) for i in range(0, len(images), 7)]  # a list of batches
    regrouped, regrouped_report = tune_masks(model, masks, loader)
    assert all(torch.allclose(first[k], regrouped[k], atol=1e-4) for k in first)
    assert regrouped_report["samples"] == report["samples"] == len(images)


def test_text_padding_after_pooled_token_is_ignored():
    model = tiny_model("open_clip")
    images, tokens = _inputs(model)
    masks = random_masks(model, seed=2, real_valued=False)
    noisy = tokens.clone()
    gen = torch.Generator().manual_seed(9)
    eot = tokens.argmax(dim=1)
    for row in range(len(tokens)):
        tail = noisy[row, eot[row] + 1:]
        tail.copy_(torch.randint(1, 900, tail.shape, generator=gen))  # below the EOT id: pooling unchanged
    base, _ = tune_masks(model, masks, (None, tokens), towers="text", batch_size=6)
    changed, _ = tune_masks(model, masks, (None, noisy), towers="text", batch_size=6)
    for key in ("text.head", "text.neuron"):
        assert torch.allclose(base[key], changed[key], atol=1e-5)
    assert torch.equal(base["vision.head"], masks["vision.head"])  # untuned tower left as is


def _zero_head(model, layer: int, head: int):
    out_proj = model.towers["vision"].context_module(layer)
    dh = model.towers["vision"].head_dim
    with torch.no_grad():
        out_proj.weight[:, head * dh:(head + 1) * dh] = 0


def test_degenerate_layer_keeps_binary_mask_with_warning_and_later_layers_are_tuned():
    model = tiny_model("open_clip")
    images, tokens = _inputs(model)
    _zero_head(model, layer=0, head=0)  # a kept head contributing nothing: singular normal equations
    masks = random_masks(model, seed=4, real_valued=False)
    masks["vision.head"][0] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the dead head 0 is kept, head 3 pruned
    with pytest.warns(TuningWarning, match="vision layer 0 heads"):
        tuned, report = tune_masks(model, masks, (images, tokens), towers="vision", damp=0.0, batch_size=6)
    rejected = _entry(report, "vision", 0, "head")
    assert rejected["status"] == "rejected" and "non-finite" in rejected["reason"]
    assert torch.equal(tuned["vision.head"][0], masks["vision.head"][0])
    assert rejected["error_after"] == rejected["error_before"]
    for layer, kind in ((0, "neuron"), (1, "head"), (1, "neuron")):
        assert _entry(report, "vision", layer, kind)["status"] == "accepted"
    assert not torch.equal(tuned["vision.head"][1], masks["vision.head"][1])
    # damping around 1 makes the same problem well posed: the dead head keeps scale 1
    tuned, report = tune_masks(model, masks, (images, tokens), towers="vision", damp=1e-2, batch_size=6)
    assert _entry(report, "vision", 0, "head")["status"] == "accepted"
    assert tuned["vision.head"][0, 0] == pytest.approx(1.0, abs=1e-6)


def test_scales_beyond_max_scale_are_rejected_per_layer():
    model = tiny_model("hf")
    images, tokens = _inputs(model)
    masks = random_masks(model, seed=3, real_valued=False, keep=0.5)
    _, free = tune_masks(model, masks, (images, tokens), towers="vision", batch_size=6)
    largest = {(e["layer"], e["kind"]): e["max_abs_scale"] for e in free["layers"]}
    bound = sorted(largest.values())[1] * 1.0001  # between the 2nd and 3rd largest: some pass, some fail
    with pytest.warns(TuningWarning, match="outside"):
        tuned, report = tune_masks(model, masks, (images, tokens), towers="vision", batch_size=6, max_scale=bound)
    for entry in report["layers"]:
        key = f"vision.{entry['kind']}"
        row = tuned[key][entry["layer"]]
        if largest[(entry["layer"], entry["kind"])] > bound:
            assert entry["status"] == "rejected"
            assert torch.equal(row, masks[key][entry["layer"]])
        elif entry["status"] == "accepted":
            assert float(row.abs().max()) <= bound
    assert report["rejected"] >= 1 and report["accepted"] >= 1


def test_layer_scale_blocks_are_tuned_correctly():
    cfg = copy.deepcopy(OPEN_CLIP_CFG)
    cfg["vision_cfg"]["ls_init_value"] = 0.5
    model = tiny_open_clip(model_cfg=cfg)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for block in model.towers["vision"].blocks():
            for ls in (block.ls_1, block.ls_2):
                ls.gamma.copy_(0.5 + torch.rand(ls.gamma.shape, generator=gen))
    images, tokens = _inputs(model)
    masks = random_masks(model, seed=3, real_valued=False)
    tuned, report = tune_masks(model, masks, (images, tokens), towers="vision", batch_size=6)
    for layer in range(2):
        teacher = block_streams(model, "vision", layer, images, tokens)
        for kind, stream in (("head", "h"), ("neuron", "y")):
            after = masks_at_stage(masks, tuned, "vision", layer, kind, True)
            measured = mean_sq(block_streams(model, "vision", layer, images, tokens, after)[stream], teacher[stream])
            assert _entry(report, "vision", layer, kind)["error_after"] == pytest.approx(measured, rel=1e-3)


def test_unsupported_block_structure_fails_loudly():
    model = tiny_model("open_clip")
    images, tokens = _inputs(model)
    block = model.towers["vision"].blocks()[1]

    def post_norm_forward(self, q_x, k_x=None, v_x=None, attn_mask=None):  # not the pre-norm residual
        x = self.ln_1(q_x + self.attention(q_x=q_x, attn_mask=attn_mask))
        return self.ln_2(x + self.mlp(x))

    block.forward = types.MethodType(post_norm_forward, block)
    with pytest.raises(ModelLoadError, match="vision layer 1"):
        tune_masks(model, random_masks(model, seed=0, real_valued=False), (images, tokens), towers="vision")


def test_bad_parameters_raise_one_line_errors():
    model = tiny_model("open_clip")
    images, tokens = _inputs(model, batch=2)
    masks = random_masks(model, seed=0, real_valued=False)
    data = (images, tokens)
    # tune.damp, tune.max_scale and tune.batch_size are checked with params.yaml (tests/test_config.py)
    with pytest.raises(ParamError, match="tune.towers"):
        tune_masks(model, masks, data, towers="audio")
    with pytest.raises(ParamError, match="tune.towers"):
        tune_masks(model, {"vision.head": masks["vision.head"]}, data, towers="text")
    with pytest.raises(MaskError, match="student_masks"):
        tune_masks(model, {"vision.head": torch.ones(3, 3)}, data)
    with pytest.raises(DataError, match="empty"):
        tune_masks(model, masks, [])


def test_normal_equations_match_explicit_least_squares():
    gen = torch.Generator().manual_seed(0)
    hidden, group, units, tokens = 6, 3, 4, 50
    columns = torch.randn(hidden, group * units, generator=gen)
    features = torch.randn(tokens, group * units, generator=gen)
    residual = torch.randn(tokens, hidden, generator=gen)
    stats = LeastSquaresStats(columns, group)
    stats.add(features[:20], residual[:20])
    stats.add(features[20:], residual[20:])
    # explicit design: column u of the design is vec(A_u) = vec(F_u W_uᵀ) over tokens
    design = torch.stack([(features[:, u * group:(u + 1) * group] @ columns[:, u * group:(u + 1) * group].t()).flatten()
                          for u in range(units)], dim=1).double()
    expected = torch.linalg.lstsq(design, residual.flatten().double().unsqueeze(1)).solution.squeeze(1)
    G, r = stats.system()
    solution = solve_scales(G, r, torch.ones(units), 0.0, lambda s: stats.error(G, r, s))
    assert torch.allclose(solution.scales, expected, atol=1e-5)
    direct = float((design @ expected - residual.flatten().double()).pow(2).sum())
    assert solution.error_after == pytest.approx(direct, rel=1e-5)
    damped = solve_scales(G, r, torch.ones(units), 10.0, lambda s: stats.error(G, r, s))
    assert damped.error_after <= damped.error_before  # damping around the start point never hurts
    assert float((damped.scales - 1).norm()) < float((solution.scales - 1).norm())


def test_statistics_stay_float32_under_autocast():
    """tune.precision's autocast rounds the forward passes, never the least-squares sums."""
    gen = torch.Generator().manual_seed(1)
    columns = torch.randn(8, 6, generator=gen)
    features, residual = torch.randn(40, 6, generator=gen), torch.randn(40, 8, generator=gen)
    plain, autocast = LeastSquaresStats(columns, 2), LeastSquaresStats(columns, 2)
    plain.add(features, residual)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (features @ columns.t()).dtype == torch.bfloat16  # the context is live
        autocast.add(features, residual)
    assert torch.equal(plain.gram, autocast.gram) and torch.equal(plain.cross, autocast.cross)
    assert plain.target_sq == autocast.target_sq


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_tunes_close_to_float32(tuned_case, precision):
    model, images, tokens, masks, tuned, report = tuned_case
    seen = []  # the dtype of the stream entering each block: kept in the low precision between blocks
    handles = [block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
               for tower in model.towers.values() for block in tower.blocks()[1:]]
    try:
        low, low_report = tune_masks(model, masks, (images, tokens), batch_size=5, damp=1e-3, precision=precision)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and set(seen) == {getattr(torch, precision)}
    assert low_report["precision"] == precision and "precision" not in report
    assert [e["status"] for e in low_report["layers"]] == [e["status"] for e in report["layers"]]
    for key, mask in tuned.items():
        assert torch.equal(low[key] == 0, mask == 0)  # the same units kept
        torch.testing.assert_close(low[key], mask, atol=0.05, rtol=0.05)  # scales within bf16's rounding
    with pytest.raises(ParamError, match="tune.precision must be one of float32, bfloat16, float16; got 'int8'"):
        tune_masks(model, masks, (images, tokens), precision="int8")
