"""The solvers with every (p,) vector cut into one contiguous slice per rank: counts-only top-k,
the FLOP + count ILP over slices, and FALCON's communication per DFO trial independent of p.
Ranks are threads here (tests/threaded_ranks.py, fast); tests/test_distributed_solvers.py runs
the same solvers over 2 gloo processes."""

import pytest
import torch

from threaded_ranks import run_threads
from prunekit.solvers.collective import shard_bounds
from prunekit.solvers.falcon import _cost_runs, falcon
from prunekit.solvers.ilp import solve_flops_ilp
from prunekit.solvers.cost_groups import groups_from_costs, groups_from_layers
from prunekit.solvers.magnitude import top_k_mask
from prunekit.solvers.selection import sliced_top_k_mask
from prunekit.solvers.sharded_quadratic import ShardedQuadraticModel
from prunekit.solvers.sliced_ilp import slice_cost_groups, sliced_cost_groups, solve_sliced_flops_ilp


def _slices(p, size):
    return [slice(a, b) for a, b in shard_bounds(p, size)]


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("k", [0, 1, 37, 77, 150, 299, 300])
def test_sliced_top_k_equals_one_process_with_ties(ranks, k):
    g = torch.Generator().manual_seed(5)
    values = torch.round(torch.randn(300, generator=g).abs() * 4) / 4      # many exact ties
    values[10:20] = float("inf")
    values[40] = -0.0
    cut = _slices(300, ranks)
    got = run_threads(lambda c: sliced_top_k_mask(values[cut[c.rank]], k, c), ranks)
    assert torch.equal(torch.cat(got), top_k_mask(values, k))


@pytest.mark.parametrize("seed", range(6))
def test_sliced_top_k_equals_one_process_on_wide_ranges(seed):
    """Signs, magnitudes from 1e-30 to 1e30, infinities and repeated values: the byte-wise select
    must order the keys exactly as a sort does."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(997, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-30, 30, (997,), generator=g)
    values[::97] = values[3]
    values[5], values[6] = float("inf"), -float("inf")
    ranks = 2 + seed % 3
    cut = _slices(997, ranks)
    for k in (1, 2, 100, 498, 996):
        got = run_threads(lambda c: sliced_top_k_mask(values[cut[c.rank]].float() if seed % 2 else values[cut[c.rank]], k, c), ranks)
        expected = top_k_mask(values.float() if seed % 2 else values, k)
        assert torch.equal(torch.cat(got), expected), k


def _costs(p):
    # layers of equal cost that straddle slice boundaries, two layers of the same cost
    sizes = [p // 3, p // 4, p // 6]
    values = [9.0, 4.0, 9.0]
    parts = [torch.full((s,), v) for s, v in zip(sizes, values)]
    parts.append(torch.full((p - sum(sizes),), 1.0))
    return torch.cat(parts).double()


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("max_runs", [1024, 2])
def test_sliced_cost_groups_number_as_one_process(ranks, max_runs):
    costs = _costs(300)
    runs = _cost_runs(costs, max_runs)
    if runs is None:
        group, group_costs = groups_from_costs(costs.numpy())
    else:
        group, group_costs = groups_from_layers(runs[0], runs[1], 300)
    cut = _slices(300, ranks)
    got = run_threads(lambda c: sliced_cost_groups(costs[cut[c.rank]], c, max_runs), ranks)
    for r, (g, gc) in enumerate(got):
        assert (g == group[cut[r]]).all() and (gc == group_costs).all()


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_sliced_ilp_same_objective_as_one_process(ranks, seed):
    g = torch.Generator().manual_seed(seed)
    p = 300
    scores = torch.randn(p, generator=g, dtype=torch.float64) ** 2
    if seed % 2:
        scores = torch.round(scores * 8) / 8                                # ties
    costs = _costs(p)
    k, budget = [40, 90, 150, 250][seed], float(costs.sum()) * [0.1, 0.3, 0.5, 0.2][seed]
    runs = _cost_runs(costs)
    one = solve_flops_ilp(scores, layer_slices=runs[0], layer_costs=runs[1], max_count=k, max_cost=budget)
    cut = _slices(p, ranks)

    def solve(c):
        group, group_costs = sliced_cost_groups(costs[cut[c.rank]], c)
        return solve_sliced_flops_ilp(scores[cut[c.rank]], group, group_costs, max_count=k, max_cost=budget,
                                      collective=c)

    got = run_threads(solve, ranks)
    keep = torch.cat([r.keep for r in got])
    assert abs(got[0].primal - one.primal) <= 1e-12 * one.primal
    assert abs(float(scores[keep].sum()) - one.primal) <= 1e-12 * one.primal
    assert int(keep.sum()) <= k and float(costs[keep].sum()) <= budget
    assert all(r.primal == got[0].primal and r.count == got[0].count for r in got)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("max_runs", [1024, 2])
def test_sliced_ilp_on_cost_groups_built_once_equals_regrouping(ranks, max_runs):
    """FALCON builds a slice's cost groups once for all its projections: the layer form (a range
    per group, no per-weight ids) for runs of equal cost, ids for groups by distinct cost unless
    the slice's ids never decrease; the solves are the same as on the group ids."""
    g = torch.Generator().manual_seed(3)
    p = 300
    costs = _costs(p)
    cut = _slices(p, ranks)
    trials = [torch.round(torch.randn(p, generator=g, dtype=torch.float64) ** 2 * 8) / 8 for _ in range(3)]

    def solve(c):
        group, group_costs = sliced_cost_groups(costs[cut[c.rank]], c, max_runs)
        groups = slice_cost_groups(group, group_costs)
        assert groups.p == group.size and (groups.bounds is not None or max_runs == 2)     # runs: ranges
        out = []
        for scores in trials:
            for grouped in (group, groups):
                out.append(solve_sliced_flops_ilp(scores[cut[c.rank]], grouped, group_costs, max_count=90,
                                                  max_cost=float(costs.sum()) * 0.3, collective=c))
        return out

    got = run_threads(solve, ranks)
    for r in got:
        for regrouped, once in zip(r[::2], r[1::2]):
            assert torch.equal(regrouped.keep, once.keep) and regrouped.primal == once.primal


def test_falcon_sends_no_p_vector_per_dfo_trial():
    """Per DFO trial a rank sends O(n² + groups·rounds) bytes, not O(p): far below p bytes here
    (the replicated form all-gathered 4·p bytes per gradient)."""
    n, p = 8, 40_000
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, p, generator=g) * torch.linspace(0.2, 2.0, p)
    w_bar = torch.randn(p, generator=g)
    macs = _costs(p).float()
    cut = _slices(p, 2)

    def solve(c):
        q = ShardedQuadraticModel(X[:, cut[c.rank]].clone(), w_bar, 0.2, None, c, cut[c.rank].start)
        q.sliced().lipschitz()                       # set-up, outside the trials
        before = c.bytes_sent
        s = falcon(q, macs, p // 3, float(macs.sum()) * 0.3)
        return s, c.bytes_sent - before

    got = run_threads(solve, 2)
    solution, sent = got[0]
    trials = solution.info["trials"]
    assert trials >= 1
    final_gather = 4 * p                             # the solution, once, at the end
    assert (sent - final_gather) / (trials + 1) < p, (sent, trials)


def test_chita_sends_no_p_vector_per_swap_round():
    """CHITA with IHT and swap search on 2 ranks: per IHT step and per swap round a rank sends
    O(n·candidates) bytes, not O(p); only IHT's and the solution's final gathers are p-sized. The
    answer is the one both ranks hold, and it is a k-sparse solution no worse than magnitude's."""
    from prunekit.solvers.chita import chita
    n, p, k = 8, 40_000, 400
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, p, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, p, dtype=torch.float64)
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    cut = _slices(p, 2)

    def solve(c):
        q = ShardedQuadraticModel(X[:, cut[c.rank]].clone(), w_bar, 0.2, None, c, cut[c.rank].start)
        q.sliced().lipschitz()
        before = c.bytes_sent
        s = chita(q, k, "iht", swap_rounds=6, swap_candidates=32)
        return s, c.bytes_sent - before

    (one, sent), (other, _) = run_threads(solve, 2)
    assert torch.equal(one.w, other.w) and one.support_size <= k
    assert one.objective <= one.info["magnitude_objective"] * (1 + 1e-9)
    rounds = one.info["swap_rounds"] + one.iterations           # swap rounds + IHT steps
    assert one.info["swap_rounds"] >= 1
    p_sized = 3 * 8 * p                 # IHT's result, its mask and the solution, once each
    assert (sent - p_sized) / (rounds + 1) < p, (sent, rounds)


# every pair of the three settings' values once (4 cases, not all 8: each takes 8-20 s)
@pytest.mark.parametrize("max_disorder, max_runs, ranks", [(0.15, 1024, 2), (0.15, 2, 3), (1.0, 2, 2), (1.0, 1024, 3)])
def test_sliced_ilp_started_from_the_previous_order_equals_cold(ranks, max_runs, max_disorder, monkeypatch):
    """FALCON's sliced projections carry each slice's last order (PreviousOrder) like one
    process's: on successive nearby iterates with ties the keep masks, primal and bound equal the
    cold solves' (layer and id forms; max_disorder 1.0 forces the warm sort on every group)."""
    import prunekit.solvers.descending as descending_module
    from prunekit.solvers.grouped_order import PreviousOrder

    monkeypatch.setattr(descending_module, "WARM_MAX_DISORDER", max_disorder)
    g = torch.Generator().manual_seed(11)
    p = 3000
    costs = _costs(p)
    cut = _slices(p, ranks)
    w = torch.randn(p, generator=g, dtype=torch.float64)
    trials = []
    for _ in range(5):
        w = w + 0.05 * torch.randn(p, generator=g, dtype=torch.float64)
        trials.append(torch.round(w ** 2 * 64) / 64)                 # nearby iterates, many ties

    def solve(c):
        group, group_costs = sliced_cost_groups(costs[cut[c.rank]], c, max_runs)
        groups = slice_cost_groups(group, group_costs)
        previous, out = PreviousOrder(), []
        for scores in trials:
            for order in (None, previous):
                out.append(solve_sliced_flops_ilp(scores[cut[c.rank]], groups, group_costs, max_count=p // 3,
                                                  max_cost=float(costs.sum()) * 0.3, collective=c,
                                                  previous_order=order))
        return out, previous.perm is not None

    for r, warmed in run_threads(solve, ranks):
        assert warmed
        for cold, warm in zip(r[::2], r[1::2]):
            assert torch.equal(cold.keep, warm.keep) and cold.primal == warm.primal
            assert cold.dual_bound == warm.dual_bound
