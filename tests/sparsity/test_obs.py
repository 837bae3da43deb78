"""OBS in Fisher blocks: the factored block Fisher, exact brute-force OBS, and the value of the update."""
import pytest
import torch

from clipprune.sparsity import BlockFisher, damped_fisher, obs_sweep, parse_mask_type
from clipprune.sparsity.fisher import to_blocks, valid_positions


def _grads(m=12, numel=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, numel, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("batches", [(12,), (7, 5), (1,) * 12])
def test_factors_give_the_inverse_of_the_damped_fisher(batches):
    grads = _grads()  # 23 weights in blocks of 5: the last block is padded
    fisher = BlockFisher(23, 5, damp=1e-2, num_grads=12, dtype=torch.float64)
    start = 0
    for size in batches:
        fisher.update(grads[start:start + size])
        start += size
    expected = damped_fisher(grads, 5, 1e-2)
    assert fisher.seen == 12
    torch.testing.assert_close(fisher.factor @ fisher.factor.transpose(1, 2), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fisher.inverse(), torch.linalg.inv(expected), rtol=1e-9, atol=1e-9)
    # padding stays decoupled: its row of F⁻¹ is 1/damp on the diagonal and zero elsewhere
    last = fisher.inverse()[-1]
    torch.testing.assert_close(last[3:, 3:], torch.eye(2, dtype=torch.float64) / 1e-2)
    assert bool((last[:3, 3:] == 0).all())


def _low_rank_grads(scale, m=1024, numel=50 * 8, rank=8, noise=1e-3, seed=0):
    """Real gradients are strongly low-rank: a few directions plus a little noise, float32."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, numel, generator=gen)
    coef = torch.randn(m, rank, generator=gen)
    return ((coef @ basis + noise * torch.randn(m, numel, generator=gen)) * scale).float()


@pytest.mark.parametrize("scale", [1e-3, 1e-1, 1.0, 10.0])
def test_float32_factors_at_the_defaults_hold_on_low_rank_gradients(scale):
    """damp 1e-7, B = 50, m = 1024, float32 storage (the defaults): the Woodbury update of a float32 inverse
    raised a Cholesky error from scale 0.1 on. The factored Fisher stays positive definite, its OBS matches
    the float64 reference's, and the eliminated weights are the same."""
    grads = _low_rank_grads(scale)
    numel, block = grads.shape[1], 50
    fisher32 = BlockFisher(numel, block, 1e-7, grads.shape[0], torch.float32)
    fisher64 = BlockFisher(numel, block, 1e-7, grads.shape[0], torch.float64)
    for s in range(0, grads.shape[0], 32):
        fisher32.update(grads[s:s + 32])
        fisher64.update(grads[s:s + 32])
    reference = damped_fisher(grads.double(), block, 1e-7)
    rebuilt = fisher32.factor.double() @ fisher32.factor.double().transpose(1, 2)
    # the stored factor reproduces F to float32 accuracy relative to F's scale, and is exactly PD
    assert float((rebuilt - reference).abs().amax() / reference.abs().amax()) < 1e-5
    assert bool((torch.linalg.eigvalsh(rebuilt) > 0).all())
    w = torch.randn(numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.02
    counts = torch.full((1, numel // block), block // 2)
    mask = parse_mask_type("unstructured")
    traces = [obs_sweep(to_blocks(w, block), f.inverse(), valid_positions(numel, block), mask, snapshot_counts=counts)
              for f in (fisher32, fisher64)]
    assert bool(torch.isfinite(traces[0].cum_loss).all())
    assert bool(((traces[0].snapshots == 0) == (traces[1].snapshots == 0)).all())
    torch.testing.assert_close(traces[0].cum_loss, traces[1].cum_loss, rtol=1e-3, atol=0)


def test_a_damp_lost_in_round_off_is_a_one_line_error():
    from clipprune.errors import ParamError

    grads = _low_rank_grads(1e9, m=16, numel=100)
    fisher = BlockFisher(100, 50, 1e-30, 16, torch.float32)
    with pytest.raises(ParamError, match=r"^sparsity.damp is too small .* block \d+ .*raise sparsity.damp$"):
        fisher.update(grads)


def _brute_force_obs(w, fisher, group=1):
    """Eliminate one unit at a time; each step inverts the Fisher of the remaining weights explicitly."""
    w = w.clone()
    remaining = list(range(w.numel()))
    order, losses, total = [], [], 0.0
    while remaining:
        inv = torch.linalg.inv(fisher[remaining][:, remaining])
        best = None
        for unit in sorted({i // group for i in remaining}):
            pos = [remaining.index(unit * group + k) for k in range(group)]
            sub = inv[pos][:, pos]
            w_s = w[[unit * group + k for k in range(group)]]
            loss = 0.5 * float(w_s @ torch.linalg.solve(sub, w_s))
            if best is None or loss < best[0]:
                best = (loss, unit, pos)
        loss, unit, pos = best
        w_s = w[[unit * group + k for k in range(group)]]
        delta = -inv[:, pos] @ torch.linalg.solve(inv[pos][:, pos], w_s)
        w[remaining] += delta
        for k in range(group):
            remaining.remove(unit * group + k)
            w[unit * group + k] = 0.0
        total += loss
        order.append(unit)
        losses.append(total)
    return order, losses


@pytest.mark.parametrize("mask_type,group", [("unstructured", 1), ("block4", 4)])
def test_obs_sweep_matches_brute_force_obs(mask_type, group):
    size = 8
    grads = _grads(m=20, numel=size, seed=1)
    fisher = damped_fisher(grads, size, 1e-2)[0]
    w = torch.randn(size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    order, losses = _brute_force_obs(w, fisher, group)
    trace = obs_sweep(w.unsqueeze(0), torch.linalg.inv(fisher).unsqueeze(0),
                      torch.ones(1, size, dtype=torch.bool), parse_mask_type(mask_type))
    assert trace.order[0].tolist() == order
    torch.testing.assert_close(trace.cum_loss[0], torch.tensor(losses, dtype=torch.float64), rtol=1e-8, atol=1e-10)


def test_snapshots_equal_the_brute_force_weights_after_k_steps():
    size = 6
    grads = _grads(m=15, numel=size, seed=3)
    fisher = damped_fisher(grads, size, 1e-2)[0]
    w = torch.randn(size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    counts = torch.tensor([[0], [2], [5]])
    trace = obs_sweep(w.unsqueeze(0), torch.linalg.inv(fisher).unsqueeze(0), torch.ones(1, size, dtype=torch.bool),
                      parse_mask_type("unstructured"), snapshot_counts=counts)
    torch.testing.assert_close(trace.snapshots[0, 0], w)
    for row, k in ((1, 2), (2, 5)):
        pruned = trace.order[0, :k].tolist()
        keep = [i for i in range(size) if i not in pruned]
        # the OBS optimum for a fixed pruned set: δ_keep = F_keep,keep⁻¹ F_keep,pruned w_pruned
        expected = torch.zeros(size, dtype=torch.float64)
        expected[keep] = w[keep] + torch.linalg.solve(fisher[keep][:, keep], fisher[keep][:, pruned] @ w[pruned])
        torch.testing.assert_close(trace.snapshots[row, 0], expected, rtol=1e-8, atol=1e-10)
        assert bool((trace.snapshots[row, 0][pruned] == 0).all())


def test_the_weight_update_lowers_the_quadratic_error_versus_zeroing():
    numel, block = 400, 20
    grads = _grads(m=40, numel=numel, seed=5)
    w = torch.randn(numel, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    fisher = BlockFisher(numel, block, 1e-3, 40, torch.float64)
    fisher.update(grads)
    blocks = to_blocks(w, block)
    counts = torch.full((1, blocks.shape[0]), block // 2)
    trace = obs_sweep(blocks, fisher.inverse(), valid_positions(numel, block), parse_mask_type("unstructured"),
                      snapshot_counts=counts)
    updated = trace.snapshots[0]
    zeroed = torch.where(updated == 0, 0, blocks)  # same mask, no update of the kept weights
    f = damped_fisher(grads, block, 1e-3)

    def error(new):
        d = (new - blocks).unsqueeze(2)
        return float((d.transpose(1, 2) @ f @ d).sum())

    assert error(updated) < 0.8 * error(zeroed)


def test_nm_sweep_keeps_n_of_every_m_and_padding_stays_zero():
    grads = _grads(m=10, numel=24, seed=7)
    fisher = BlockFisher(24, 8, 1e-2, 10, torch.float64)
    fisher.update(grads)
    w = torch.randn(24, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    trace = obs_sweep(to_blocks(w, 8), fisher.inverse(), valid_positions(24, 8), parse_mask_type("2:4"))
    assert ((trace.weights.reshape(-1, 4) != 0).sum(1) == 2).all()
