"""Mask rearrangement: greedy swaps on the block-diagonal Fisher objective."""
import itertools

import pytest
import torch

from clipprune.errors import MaskError, ParamError
from clipprune.tuning import (greedy_assignment, rearrange_layer, rearrange_layer_from_both, rearrange_masks,
                              rearrangement_objective)


def _objective(grads: torch.Tensor, kept: torch.Tensor) -> float:
    pruned_sum = grads.double()[:, ~kept].sum(dim=1)
    return float(pruned_sum @ pruned_sum)


def _brute_force(grads: torch.Tensor, n_kept: int) -> float:
    units = grads.shape[1]
    best = float("inf")
    for subset in itertools.combinations(range(units), n_kept):
        kept = torch.zeros(units, dtype=torch.bool)
        kept[list(subset)] = True
        best = min(best, _objective(grads, kept))
    return best


def _random_kept(units: int, n_kept: int, gen) -> torch.Tensor:
    kept = torch.zeros(units, dtype=torch.bool)
    kept[torch.randperm(units, generator=gen)[:n_kept]] = True
    return kept


def _correlated_grads(rows: int, units: int, gen) -> torch.Tensor:
    # shared row factors make units' gradients correlate and cancel: the interesting case
    return torch.randn(rows, 3, generator=gen) @ torch.randn(3, units, generator=gen) \
        + 0.3 * torch.randn(rows, units, generator=gen)


def test_layer_search_reaches_a_local_optimum_bounded_by_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        units, n_kept = 8, 1 + trial % 6
        grads = _correlated_grads(5, units, gen)
        kept = _random_kept(units, n_kept, gen)
        result = rearrange_layer(grads, kept)
        assert int(result.kept.sum()) == n_kept
        assert result.objective_before == pytest.approx(_objective(grads, kept))
        assert result.objective_after == pytest.approx(_objective(grads, result.kept))
        assert result.objective_after <= result.objective_before
        assert result.objective_after >= _brute_force(grads, n_kept) - 1e-9
        # no single swap improves any more
        for i in torch.nonzero(result.kept).flatten():
            for j in torch.nonzero(~result.kept).flatten():
                swapped = result.kept.clone()
                swapped[i], swapped[j] = False, True
                assert _objective(grads, swapped) >= result.objective_after - 1e-9


def test_layer_search_is_exact_when_units_do_not_interact():
    # orthogonal gradients: the objective is Σ_pruned ‖g_u‖², minimised by pruning the smallest norms
    gen = torch.Generator().manual_seed(1)
    units, n_kept = 9, 4
    norms = torch.rand(units, generator=gen) + 0.1
    grads = torch.diag(norms)  # row u only touches unit u
    kept = _random_kept(units, n_kept, gen)
    result = rearrange_layer(grads, kept)
    assert result.objective_after == pytest.approx(_brute_force(grads, n_kept), rel=1e-12)
    assert set(torch.nonzero(result.kept).flatten().tolist()) == set(norms.argsort()[-n_kept:].tolist())


def test_greedy_finds_cancelling_pair_that_fisher_ranking_misses():
    # units 0 and 1 have large but opposite gradients: pruning both costs nothing, although the
    # Fisher diagonal (Σ g²) ranks them far above units 2 and 3
    grads = torch.tensor([[5.0, -5.0, 1.0, 0.1], [4.0, -4.0, -1.0, 0.1]])
    kept = torch.tensor([True, False, True, False])
    result = rearrange_layer(grads, kept)
    assert result.kept.tolist() == [False, False, True, True]
    assert result.objective_after == pytest.approx(0.0)


def test_rearrange_masks_keeps_counts_never_increases_and_is_deterministic():
    gen = torch.Generator().manual_seed(2)
    layers, heads, ffn, rows = 3, 6, 40, 16
    masks = {"vision.head": (torch.rand(layers, heads, generator=gen) < 0.5).float(),
             "vision.neuron": (torch.rand(layers, ffn, generator=gen) < 0.5).float()}
    grads = {"vision.head.grads": torch.stack([_correlated_grads(rows, heads, gen) for _ in range(layers)], 1),
             "vision.neuron.grads": torch.stack([_correlated_grads(rows, ffn, gen) for _ in range(layers)], 1)}
    report = []
    out = rearrange_masks(masks, grads, report=report)
    again = rearrange_masks(masks, grads)
    before, after = rearrangement_objective(masks, grads), rearrangement_objective(out, grads)
    for key in masks:
        assert torch.equal(out[key], again[key])
        assert out[key].dtype == masks[key].dtype
        assert torch.equal(out[key].sum(dim=1), masks[key].sum(dim=1))
        assert bool(((out[key] == 0) | (out[key] == 1)).all())
        assert bool((after[key] <= before[key] + 1e-9).all())
    assert bool((after["vision.neuron"] < before["vision.neuron"]).all())  # 40 random units: swaps help
    assert len(report) == 2 * layers
    for entry in report:
        assert entry["objective_after"] == pytest.approx(float(after[entry["key"]][entry["layer"]]))
    assert sum(e["swaps"] for e in report) > 0


def test_max_iters_limits_swaps():
    gen = torch.Generator().manual_seed(3)
    grads = _correlated_grads(10, 30, gen)
    kept = _random_kept(30, 15, gen)
    assert torch.equal(rearrange_layer(grads, kept, max_iters=0).kept, kept)
    one = rearrange_layer(grads, kept, max_iters=1)
    assert one.swaps == 1 and int((one.kept != kept).sum()) == 2
    assert rearrange_layer(grads, kept).swaps > 1


def test_units_past_a_layer_width_are_never_swapped_in():
    gen = torch.Generator().manual_seed(4)
    masks = {"text.head": torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])}
    grads = torch.randn(8, 2, 4, generator=gen)
    grads[:, 1, 2:] = 0  # layer 1 was pruned to 2 heads: its padding has no gradient
    out = rearrange_masks(masks, {"text.head": grads}, widths={"text.head": [4, 2]})
    assert out["text.head"][1, 2:].eq(0).all() and out["text.head"][1].sum() == 1


def test_masks_without_grads_are_unchanged_and_bad_inputs_raise():
    masks = {"vision.head": torch.tensor([[1.0, 0.0]]), "text.head": torch.tensor([[0.0, 1.0]])}
    grads = {"vision.head.grads": torch.tensor([[[1.0, 2.0]]])}
    out = rearrange_masks(masks, grads)
    assert torch.equal(out["text.head"], masks["text.head"])
    with pytest.raises(MaskError, match="binary"):
        rearrange_masks({"vision.head": torch.tensor([[0.5, 0.0]])}, grads)
    with pytest.raises(MaskError, match=r"vision.head.grads must have shape \[rows, 1, 2\]"):
        rearrange_masks(masks, {"vision.head.grads": torch.ones(3, 2)})
    with pytest.raises(MaskError, match="non-finite"):
        rearrange_masks(masks, {"vision.head.grads": torch.tensor([[[float("nan"), 1.0]]])})
    with pytest.raises(ParamError, match="max_iters"):
        rearrange_masks(masks, grads, max_iters=-1)


def _kwon_greedy_by_hand(grads: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Kwon's one-pass greedy written out with explicit sums (no Gram matrix): the independent reference."""
    g = grads.double()
    units = g.shape[1]
    order = sorted(range(units), key=lambda u: (float(g[:, u] @ g[:, u]), u))
    pruned = order[:units - n_kept]
    for unit in order[units - n_kept:]:
        pruned.append(unit)
        total = g[:, pruned].sum(dim=1)
        left = [float((total - g[:, w]) @ (total - g[:, w])) for w in pruned]
        best = min(left)
        pruned.remove(min(w for w, value in zip(pruned, left) if value == best))
    kept = torch.ones(units, dtype=torch.bool)
    kept[pruned] = False
    return kept


def test_greedy_assignment_matches_kwons_one_pass_greedy_written_out():
    gen = torch.Generator().manual_seed(5)
    for trial in range(40):
        units = 3 + trial % 10
        n_kept = trial % (units + 1)
        grads = _correlated_grads(4 + trial % 5, units, gen)
        greedy = greedy_assignment(grads, n_kept)
        assert int(greedy.sum()) == n_kept
        assert torch.equal(greedy, _kwon_greedy_by_hand(grads, n_kept)), trial


def test_both_starts_never_end_worse_than_the_greedy_or_the_searched_assignment():
    # many seeds of random Fisher inputs: the result is never worse than Kwon's greedy (nor the start)
    gen = torch.Generator().manual_seed(6)
    starts = set()
    for trial in range(300):
        units = 4 + trial % 29
        n_kept = 1 + trial % (units - 1)
        rows = 2 + trial % 11
        grads = _correlated_grads(rows, units, gen) if trial % 2 else torch.randn(rows, units, generator=gen)
        kept = _random_kept(units, n_kept, gen)
        result = rearrange_layer_from_both(grads, kept)
        greedy = _kwon_greedy_by_hand(grads, n_kept)
        assert int(result.kept.sum()) == n_kept
        assert result.objective_greedy == pytest.approx(_objective(grads, greedy), rel=1e-9, abs=1e-12)
        assert result.objective_searched == pytest.approx(_objective(grads, kept), rel=1e-9, abs=1e-12)
        assert result.objective_after == pytest.approx(_objective(grads, result.kept), rel=1e-9, abs=1e-12)
        assert result.objective_after <= result.objective_greedy * (1 + 1e-12) + 1e-12
        assert result.objective_after <= result.objective_searched * (1 + 1e-12) + 1e-12
        starts.add(result.start)
    assert starts == {"searched", "greedy"}  # each start wins somewhere: both are needed


def test_both_starts_against_brute_force_on_tiny_layers():
    gen = torch.Generator().manual_seed(7)
    optimal = 0
    for trial in range(60):
        units, n_kept = 7, 1 + trial % 5
        grads = _correlated_grads(4, units, gen)
        kept = _random_kept(units, n_kept, gen)
        result = rearrange_layer_from_both(grads, kept)
        best = _brute_force(grads, n_kept)
        assert best - 1e-9 <= result.objective_after <= result.objective_greedy + 1e-9
        optimal += result.objective_after <= best + 1e-9
    assert optimal >= 50  # 1-swap optima from two starts are nearly always the global optimum here


def test_rearrange_masks_reports_greedy_and_final_objectives():
    gen = torch.Generator().manual_seed(8)
    layers, units, rows = 4, 24, 8
    masks = {"text.neuron": (torch.rand(layers, units, generator=gen) < 0.4).float()}
    grads = {"text.neuron.grads": torch.stack([_correlated_grads(rows, units, gen) for _ in range(layers)], 1)}
    report = []
    out = rearrange_masks(masks, grads, report=report)
    after = rearrangement_objective(out, grads)["text.neuron"]
    for entry in report:
        layer = entry["layer"]
        n_kept = int(masks["text.neuron"][layer].sum())
        greedy = _kwon_greedy_by_hand(grads["text.neuron.grads"][:, layer], n_kept)
        assert entry["objective_greedy"] == pytest.approx(_objective(grads["text.neuron.grads"][:, layer], greedy))
        assert entry["objective_after"] == pytest.approx(float(after[layer]))
        assert entry["objective_after"] <= min(entry["objective_greedy"], entry["objective_before"]) + 1e-9
        assert entry["start"] in ("searched", "greedy") and entry["kept"] == n_kept
