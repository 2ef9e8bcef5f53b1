"""Tests for the FLOP + count budgeted selection ILP (prunekit.solvers.ilp).

The fast Lagrangian solver is checked against HiGHS (``solve_flops_ilp_exact``), and
HiGHS against brute force on tiny instances. Costs are integers (MAC counts), so cost
sums are exact in float64 and HiGHS's feasibility tolerance cannot matter.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.errors import PrunekitError
from prunekit.solvers.ilp import ILPResult, solve_flops_ilp
from prunekit.solvers.ilp_exact import solve_flops_ilp_exact

ILP_SOURCE = Path(__file__).resolve().parents[1] / "src" / "prunekit" / "solvers" / "ilp.py"


@dataclass
class Instance:
    """scores (p,) float64, layers as slices with one cost each, budgets k and F."""

    scores: torch.Tensor
    slices: list[slice]
    layer_costs: list[float]
    k: int
    F: float

    @property
    def costs(self) -> torch.Tensor:
        sizes = [sl.stop - sl.start for sl in self.slices]
        return torch.repeat_interleave(torch.tensor(self.layer_costs, dtype=torch.float64), torch.tensor(sizes))

    def solve(self, solver=solve_flops_ilp, **kwargs) -> ILPResult:
        return solver(self.scores, layer_slices=self.slices, layer_costs=self.layer_costs,
                      max_count=self.k, max_cost=self.F, **kwargs)


def make_instance(sizes, layer_costs, scores: np.ndarray, k_frac: float, f_frac: float) -> Instance:
    bounds = np.cumsum([0, *sizes])
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    total = float(np.dot(sizes, layer_costs))
    return Instance(torch.tensor(scores, dtype=torch.float64), slices, [float(c) for c in layer_costs],
                    int(round(k_frac * len(scores))), float(round(f_frac * total)))


def convnet_instance(p: int, n_layers: int, k_frac: float, f_frac: float, seed: int = 0) -> Instance:
    """A conv-net-like instance: four stages at spatial sizes 1024, 256, 64, 16 (the MACs
    per weight), widths doubling per stage (weights per layer x4), a final FC layer (cost 1),
    scores = squared He-initialised weights."""
    rng = np.random.default_rng(seed)
    stage = np.minimum(np.arange(n_layers - 1) * 4 // (n_layers - 1), 3)
    layer_costs = np.r_[1024 / 4.0**stage, 1.0]
    share = np.r_[4.0 ** stage, 4.0]
    sizes = np.maximum(1, np.floor(share / share.sum() * p)).astype(int)
    sizes[-2] += p - sizes.sum()
    std = np.repeat(np.sqrt(2.0 / sizes), sizes)
    scores = (rng.standard_normal(p) * std) ** 2
    return make_instance(sizes, layer_costs, scores, k_frac, f_frac)


def brute_force(inst: Instance) -> float:
    """The optimum over all 2^p selections (p <= 16)."""
    p = inst.scores.numel()
    z = np.array(list(itertools.product([0, 1], repeat=p)), dtype=np.float64)
    ok = (z.sum(1) <= inst.k) & (z @ inst.costs.numpy() <= inst.F)
    return float((z[ok] @ inst.scores.numpy()).max())


def assert_consistent(res: ILPResult, inst: Instance) -> None:
    """keep is feasible and every reported figure matches it."""
    p = inst.scores.numel()
    assert res.keep.dtype == torch.bool and res.keep.shape == (p,)
    assert res.count == int(res.keep.sum()) <= inst.k
    assert res.cost == float(inst.costs[res.keep].sum()) <= inst.F
    assert res.primal == pytest.approx(float(inst.scores[res.keep].sum()), rel=1e-12, abs=1e-12)
    assert res.dual_bound >= res.primal
    assert res.gap == pytest.approx((res.dual_bound - res.primal) / max(res.dual_bound, 1e-300), abs=1e-15)
    assert res.seconds >= 0


def bound_tol(value: float) -> float:
    """Float64 slack for comparing sums of a few thousand positive terms."""
    return 1e-9 * (1.0 + abs(value))


# --------------------------------------------------------------------------- random instances


@st.composite
def layered_instances(draw, min_layers=2, max_layers=8, min_size=5, max_size=200) -> Instance:
    n_layers = draw(st.integers(min_layers, max_layers))
    sizes = draw(st.lists(st.integers(min_size, max_size), min_size=n_layers, max_size=n_layers))
    cost = st.one_of(st.sampled_from([0, 1, 16, 64, 256, 1024]), st.integers(0, 2000))
    layer_costs = draw(st.lists(cost, min_size=n_layers, max_size=n_layers))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scores = rng.standard_normal(sum(sizes)) ** 2 * rng.uniform(0.1, 10.0, n_layers).repeat(sizes)
    if draw(st.booleans()):  # coarse scores: many ties, some zeros
        scores = np.round(scores, 0)
    k_frac = draw(st.floats(0.0, 1.2))
    f_frac = draw(st.floats(0.0, 1.2))
    return make_instance(sizes, layer_costs, scores, k_frac, f_frac)


SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(layered_instances())
def test_fast_solution_is_feasible_and_highs_optimum_lies_within_its_gap(inst):
    fast = inst.solve()
    exact = inst.solve(solve_flops_ilp_exact, reduce=False)  # HiGHS on every weight
    assert_consistent(fast, inst)
    assert_consistent(exact, inst)
    assert exact.info["status"] == 0
    assert fast.primal <= exact.primal + bound_tol(exact.primal)
    assert exact.primal <= fast.dual_bound + bound_tol(fast.dual_bound)


@SLOW
@given(layered_instances())
def test_reduced_cost_fixing_keeps_highs_exact(inst):
    full = inst.solve(solve_flops_ilp_exact, reduce=False)
    reduced = inst.solve(solve_flops_ilp_exact)
    assert_consistent(reduced, inst)
    assert reduced.primal == pytest.approx(full.primal, rel=1e-9, abs=1e-9)
    assert reduced.info["free_weights"] <= inst.scores.numel()


@settings(max_examples=60, deadline=None)
@given(layered_instances(min_layers=1, max_layers=4, min_size=1, max_size=4))
def test_brute_force_agrees_with_highs_and_lies_within_the_fast_gap(inst):
    optimum = brute_force(inst)
    fast = inst.solve()
    assert_consistent(fast, inst)
    assert inst.solve(solve_flops_ilp_exact, reduce=False).primal == pytest.approx(optimum, rel=1e-9, abs=1e-9)
    assert inst.solve(solve_flops_ilp_exact).primal == pytest.approx(optimum, rel=1e-9, abs=1e-9)
    assert fast.primal <= optimum + bound_tol(optimum)
    assert optimum <= fast.dual_bound + bound_tol(optimum)


@settings(max_examples=30, deadline=None)
@given(layered_instances(max_layers=6))
def test_per_weight_costs_give_the_same_problem(inst):
    """A per-weight cost vector, shuffled, is grouped by equal cost and solved alike."""
    perm = torch.randperm(inst.scores.numel(), generator=torch.Generator().manual_seed(0))
    by_layer = inst.solve()
    by_weight = solve_flops_ilp(inst.scores[perm], inst.costs[perm], max_count=inst.k, max_cost=inst.F)
    assert by_weight.count <= inst.k and by_weight.cost <= inst.F
    assert by_weight.cost == float(inst.costs[perm][by_weight.keep].sum())
    # Both bounds must certify the same optimum; they need not be equal: merging equal-cost layers
    # into one group changes which prefix of scores the budget lets the solver see, hence its
    # Lagrangian (two layers of cost 16 under F = 10: bounds 2.68 and 2.10 of an optimum of 0).
    optimum = inst.solve(solve_flops_ilp_exact).primal
    assert by_weight.primal <= optimum + bound_tol(optimum) <= by_weight.dual_bound + 2 * bound_tol(optimum)
    assert optimum <= by_layer.dual_bound + bound_tol(optimum)


# --------------------------------------------------------------------------- typical instances


@pytest.mark.parametrize(
    "p, n_layers, k_frac, f_frac",
    [(10_000, 10, 0.3, 0.2), (10_000, 20, 0.1, 0.05), (30_000, 30, 0.3, 0.2), (30_000, 50, 0.5, 0.3)],
)
def test_typical_instances_match_highs(p, n_layers, k_frac, f_frac):
    inst = convnet_instance(p, n_layers, k_frac, f_frac)
    fast = inst.solve()
    exact = inst.solve(solve_flops_ilp_exact, time_limit=60)
    assert_consistent(fast, inst)
    assert fast.cost > 0.99 * inst.F or fast.count > 0.99 * inst.k  # a budget binds
    assert fast.gap < 1e-3
    assert exact.primal <= fast.dual_bound + bound_tol(fast.dual_bound)
    assert fast.primal >= (1 - 1e-3) * exact.primal


@pytest.mark.parametrize("p, n_layers", [(100_000, 50)])
def test_typical_large_instance_gap(p, n_layers):
    inst = convnet_instance(p, n_layers, 0.2, 0.15, seed=1)
    fast = inst.solve()
    assert_consistent(fast, inst)
    assert fast.gap < 1e-4
    assert fast.seconds < 5.0


def test_only_the_prefixes_a_budget_allows_are_sorted_and_the_answer_is_unchanged():
    """A transformer's weights share one MAC cost: at 30% of the MACs no selection keeps more than
    about 30% of that group, so only its best 30% are sorted; the solution equals the one found
    with every score sorted, and HiGHS's optimum lies within its gap."""
    from prunekit.solvers.ilp import round_lagrangian
    from prunekit.solvers.ilp_groups import SortedGroups, parse_problem, prefix_limits

    rng = np.random.default_rng(3)
    sizes, costs = [20_000, 300, 50], [197.0, 196.0, 1.0]
    inst = replace(make_instance(sizes, costs, rng.standard_normal(sum(sizes)) ** 2, 0, 0),
                   k=15_000, F=0.3 * float(np.dot(sizes, costs)))
    prob = parse_problem(inst.scores, None, inst.slices, inst.layer_costs, inst.k, inst.F)
    full = np.bincount(prob.group, minlength=prob.group_costs.size)
    limits = prefix_limits(full, prob.group_costs, prob.max_count, prob.max_cost)
    assert limits[0] < 0.31 * full[0] and limits[2] == full[2]
    cut = SortedGroups(prob.scores, prob.group, prob.group_costs, limits)
    whole = SortedGroups(prob.scores, prob.group, prob.group_costs)
    m_cut, dual_cut, _ = round_lagrangian(cut, prob.max_count, prob.max_cost, 1e-9)
    m_whole, dual_whole, _ = round_lagrangian(whole, prob.max_count, prob.max_cost, 1e-9)
    assert np.array_equal(cut.keep_mask(m_cut), whole.keep_mask(m_whole))
    assert dual_cut == pytest.approx(dual_whole, rel=1e-12)
    fast, exact = inst.solve(), inst.solve(solve_flops_ilp_exact, time_limit=60)
    assert_consistent(fast, inst)
    assert fast.primal <= exact.primal + bound_tol(exact.primal) <= fast.dual_bound + 2 * bound_tol(exact.primal)


def test_sorted_groups_break_ties_by_weight_index():
    from prunekit.solvers.ilp_groups import SortedGroups

    scores = np.array([1.0, 3.0, 1.0, 3.0, 2.0, 1.0])
    groups = SortedGroups(scores, np.zeros(6, dtype=np.int64), np.array([1.0]), np.array([4]))
    assert groups.perm.tolist() == [1, 3, 4, 0]


# --------------------------------------------------------------------------- edge cases


def small_instance(k: int, F: float, seed: int = 0) -> Instance:
    """100 weights in three layers costing 256, 64 and 16 MACs per weight."""
    rng = np.random.default_rng(seed)
    return replace(make_instance([30, 50, 20], [256, 64, 16], rng.standard_normal(100) ** 2, 0, 0), k=k, F=F)


@pytest.mark.parametrize("F", [float("inf"), 30 * 256 + 50 * 64 + 20 * 16, 1e12])
def test_inactive_flop_budget_gives_top_k(F):
    inst = small_instance(k=40, F=F)
    res = inst.solve()
    top = torch.zeros(100, dtype=torch.bool)
    top[torch.topk(inst.scores, 40).indices] = True
    assert torch.equal(res.keep, top)
    assert res.gap == 0.0 and res.info["mu"] == 0.0


def test_count_budget_above_p_leaves_only_the_flop_budget():
    inst = small_instance(k=500, F=3000.0)
    res = inst.solve()
    exact = inst.solve(solve_flops_ilp_exact, reduce=False)
    assert_consistent(res, inst)
    assert res.primal <= exact.primal <= res.dual_bound + bound_tol(res.dual_bound)
    assert res.info["nu"] == 0.0


def test_zero_count_budget_keeps_nothing():
    res = small_instance(k=0, F=1e9).solve()
    assert not res.keep.any()
    assert (res.primal, res.dual_bound, res.gap, res.count, res.cost) == (0.0, 0.0, 0.0, 0, 0.0)


def test_all_zero_scores_keep_nothing():
    inst = replace(small_instance(k=10, F=1e9), scores=torch.zeros(100, dtype=torch.float64))
    res = inst.solve()
    assert not res.keep.any() and res.primal == 0.0 and res.gap == 0.0


def test_zero_cost_weights_are_free_under_a_zero_flop_budget():
    rng = np.random.default_rng(3)
    inst = replace(make_instance([40, 30, 30], [0, 64, 16], rng.standard_normal(100) ** 2, 0, 0), k=25)
    res = inst.solve()
    free = inst.scores[:40]
    expected = torch.zeros(100, dtype=torch.bool)
    expected[torch.topk(free, 25).indices] = True
    assert torch.equal(res.keep, expected)
    assert res.cost == 0.0 and res.gap == pytest.approx(0.0, abs=1e-12)


def test_zero_cost_weights_still_count():
    inst = make_instance([40, 30], [0, 8], np.r_[np.full(40, 1.0), np.full(30, 5.0)], 0, 0)
    inst = replace(inst, k=10, F=40.0)  # five of the 5.0s fit the FLOPs, the 1.0s fill the count
    res = inst.solve()
    assert res.primal == 5 * 5.0 + 5 * 1.0
    assert res.gap == pytest.approx(0.0, abs=1e-12)


def test_ties_everywhere():
    """All scores equal: the optimum keeps as many weights as the budgets allow, cheapest first."""
    inst = replace(make_instance([1000, 1000], [1, 2], np.ones(2000), 0, 0), k=1500, F=1200.0)
    res = inst.solve()
    assert_consistent(res, inst)
    assert res.primal == 1100.0  # 1000 at cost 1, then 100 at cost 2
    assert res.dual_bound == pytest.approx(1100.0)


def test_float32_scores_and_a_cost_per_weight():
    rng = np.random.default_rng(4)
    scores = torch.tensor(rng.standard_normal(2000) ** 2, dtype=torch.float32)
    costs = torch.tensor(rng.uniform(0.5, 100.0, 2000))  # every cost distinct: 2000 groups
    res = solve_flops_ilp(scores, costs, max_count=800, max_cost=16000.0)
    exact = solve_flops_ilp_exact(scores, costs, max_count=800, max_cost=16000.0, reduce=False)
    assert res.info["groups"] == 2000
    assert res.count <= 800 and float(costs[res.keep].sum()) <= 16000.0 * (1 + 1e-12)
    assert res.primal <= exact.primal + 1e-9 and exact.primal <= res.dual_bound + 1e-9
    assert res.gap < 1e-3


def test_empty_problem():
    res = solve_flops_ilp(torch.zeros(0), torch.zeros(0), max_count=3, max_cost=1.0)
    assert res.keep.shape == (0,) and res.primal == 0.0 and res.count == 0


BAD_INPUTS = {
    "negative layer cost": dict(layer_costs=[1.0, -2.0]),
    "negative weight cost": dict(costs_per_weight=torch.tensor([1.0, 2.0, -1.0, 1.0]),
                                 layer_slices=None, layer_costs=None),
    "negative score": dict(scores=torch.tensor([1.0, -0.5, 1.0, 1.0])),
    "nan score": dict(scores=torch.tensor([1.0, float("nan"), 1.0, 1.0])),
    "2-d scores": dict(scores=torch.ones(2, 2)),
    "negative k": dict(max_count=-1),
    "fractional k": dict(max_count=1.5),
    "negative F": dict(max_cost=-1.0),
    "nan F": dict(max_cost=float("nan")),
    "cost vector size": dict(costs_per_weight=torch.ones(5), layer_slices=None, layer_costs=None),
    "one cost per layer": dict(layer_costs=[1.0, 2.0, 3.0]),
    "slices do not cover": dict(layer_slices=[slice(0, 2), slice(2, 3)]),
    "slices overlap": dict(layer_slices=[slice(0, 3), slice(2, 4)]),
    "slice past the end": dict(layer_slices=[slice(0, 2), slice(2, 6)]),
    "strided slice": dict(layer_slices=[slice(0, 4, 2), slice(1, 4, 2)]),
    "both cost forms": dict(costs_per_weight=torch.ones(4)),
    "no costs": dict(layer_slices=None, layer_costs=None),
}


@pytest.mark.parametrize("solver", [solve_flops_ilp, solve_flops_ilp_exact])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_invalid_input_raises_prunekit_error(solver, case):
    args = dict(scores=torch.ones(4), costs_per_weight=None, layer_slices=[slice(0, 2), slice(2, 4)],
                layer_costs=[1.0, 2.0], max_count=2, max_cost=3.0)
    args.update(BAD_INPUTS[case])
    scores = args.pop("scores")
    with pytest.raises(PrunekitError):
        solver(scores, **args)


def test_solver_imports_only_math_and_prunekit_errors():
    """The solver layer is pure math: no models, nothing from prunekit but errors and solvers."""
    modules = []
    for node in ast.walk(ast.parse(ILP_SOURCE.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules.append("." * node.level + (node.module or ""))
    for name in modules:
        assert not name.startswith("torch.nn"), name
        if name.startswith("prunekit") or name.startswith("."):
            assert name == "prunekit.errors" or name.startswith(("prunekit.solvers", ".")), name


@pytest.mark.parametrize("n_groups", [1, 5, 2000])        # 2000: past the per-group loop
def test_the_device_sort_orders_exactly_as_the_cpu_sort(n_groups):
    # ties (many equal scores) must go by index on both paths, and the limits cut each group
    from prunekit.solvers.grouped_order import grouped_order, grouped_order_on_device

    rng = np.random.default_rng(n_groups)
    p = 20_000
    scores = rng.integers(0, 50, p).astype(np.float64)
    group = rng.integers(0, n_groups, p)
    sizes = np.bincount(group, minlength=n_groups)
    limits = np.minimum(sizes, rng.integers(0, 40, n_groups))
    expected = grouped_order(scores, group, limits)
    got = grouped_order_on_device(torch.from_numpy(scores), group, limits)
    assert got.shape == (int(limits.sum()),)
    np.testing.assert_array_equal(got, expected)


def test_a_problem_with_device_scores_solves_as_on_the_cpu(monkeypatch):
    # the device path taken on the CPU (a CPU tensor posing as the accelerator's copy)
    import prunekit.solvers.ilp_groups as ilp_groups

    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.random(5000))
    costs = torch.from_numpy(rng.integers(1, 6, 5000).astype(np.float64))
    plain = solve_flops_ilp(scores, costs, max_count=1500, max_cost=3000.0)
    monkeypatch.setattr(ilp_groups, "accelerator_copy", lambda x: x.to(torch.float64))
    on_device = solve_flops_ilp(scores, costs, max_count=1500, max_cost=3000.0)
    assert torch.equal(plain.keep, on_device.keep)
    assert on_device.cost <= 3000.0 and on_device.count <= 1500


def test_cost_groups_built_once_select_as_a_fresh_grouping_at_every_call():
    """FALCON groups its costs once per solve and reuses them at every projection: for scores
    that change from call to call (ties included), the cached groups (layer form, per-weight
    form) select exactly what a fresh grouping of the same costs does, with the same figures;
    contiguous layers need no per-weight group array, and layers out of order keep one."""
    from prunekit.solvers.cost_groups import CostGroups, groups_from_layers
    from prunekit.solvers.ilp_groups import SortedGroups

    inst = convnet_instance(20_000, 12, 0.3, 0.2, seed=5)
    p = inst.scores.numel()
    layers = CostGroups.from_layers(inst.slices, inst.layer_costs, p)
    assert layers.bounds is not None and layers.ids is None
    per_weight_ids = CostGroups.from_ids(*groups_from_layers(inst.slices, np.array(inst.layer_costs), p))
    by_cost = CostGroups.from_costs(inst.costs)
    assert CostGroups.from_layers(inst.slices[::-1], inst.layer_costs[::-1], p).ids is not None
    rng = np.random.default_rng(0)
    budgets = {"max_count": inst.k, "max_cost": inst.F}
    for trial in range(4):
        scores = inst.scores.numpy() * rng.standard_normal(p) ** 2
        if trial % 2:
            scores = np.round(scores / scores.max(), 3)          # many ties
        scores = torch.from_numpy(scores)
        fresh = solve_flops_ilp(scores, layer_slices=inst.slices, layer_costs=inst.layer_costs, **budgets)
        for groups in (layers, per_weight_ids, layers):
            cached = solve_flops_ilp(scores, cost_groups=groups, **budgets)
            assert torch.equal(cached.keep, fresh.keep)
            assert (cached.primal, cached.dual_bound, cached.count, cached.cost) == \
                (fresh.primal, fresh.dual_bound, fresh.count, fresh.cost)
        fresh = solve_flops_ilp(scores, inst.costs, **budgets)
        cached = solve_flops_ilp(scores, cost_groups=by_cost, **budgets)
        assert torch.equal(cached.keep, fresh.keep) and cached.dual_bound == fresh.dual_bound
    for groups in (layers, per_weight_ids):                       # each group's scores in descending order
        sorted_groups = SortedGroups(scores.numpy(), groups, groups.group_costs)
        assert sorted_groups.perm.dtype == np.int32
        laid_out = _laid_out_scores(sorted_groups)
        assert np.array_equal(laid_out, scores.numpy()[sorted_groups.perm])
        for start, size in zip(sorted_groups.start, sorted_groups.size):
            assert np.all(np.diff(laid_out[start:start + size]) <= 0)
    with pytest.raises(PrunekitError, match="cost_groups"):
        solve_flops_ilp(inst.scores, inst.costs, cost_groups=by_cost, **budgets)
    with pytest.raises(PrunekitError, match="cost_groups"):
        solve_flops_ilp(inst.scores[:-1], cost_groups=by_cost, **budgets)


def _laid_out_scores(sorted_groups) -> np.ndarray:
    """(n,) float64: every score of ``sorted_groups`` in layout order, materialised (8 bytes a weight:
    tests only; the solver reads them through ``values`` a block at a time)."""
    return sorted_groups.values(slice(None))


def _iterates(rng, p, steps):
    """Scores like FALCON's successive projections: small moves, rescaled parts, new ties
    (rounding), an entry set to zero, and once a complete reshuffle."""
    s = rng.integers(0, 400, p).astype(np.float64)
    yield s
    for step in range(steps):
        if step == steps // 2:
            s = rng.permutation(s)
        else:
            s = s * np.where(rng.random(p) < 0.3, 1.7, 1.0) + rng.normal(0, 2.0, p) * (rng.random(p) < 0.05)
            s = np.round(np.abs(s), 0 if step % 2 else 1)          # coarse: many new ties
            s[rng.integers(0, p, 20)] = 0.0
        yield s


@pytest.mark.parametrize("form", ["bounds", "ids"])
@pytest.mark.parametrize("cut", [False, True])
def test_a_sort_started_from_the_previous_order_equals_a_cold_sort(form, cut, monkeypatch):
    # bit-identical order and sorted scores at every step, ties by index, the warm path forced
    # (no disorder fallback) and with the default threshold
    import prunekit.solvers.descending as descending_module
    from prunekit.solvers.cost_groups import CostGroups
    from prunekit.solvers.grouped_order import PreviousOrder
    from prunekit.solvers.ilp_groups import SortedGroups

    rng = np.random.default_rng(7 + cut)
    p, n_groups = 30_000, 37
    bounds = np.r_[0, np.sort(rng.choice(np.arange(1, p), n_groups - 1, replace=False)), p]
    costs = rng.uniform(1, 5, n_groups)
    if form == "bounds":
        groups = CostGroups.from_layers([slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])], costs, p)
        assert groups.bounds is not None
    else:
        groups = CostGroups.from_ids(rng.integers(0, n_groups, p), costs)
    for max_disorder in (1.0, descending_module.WARM_MAX_DISORDER):
        monkeypatch.setattr(descending_module, "WARM_MAX_DISORDER", max_disorder)
        previous = PreviousOrder()
        for s in _iterates(rng, p, 8):
            limits = np.minimum(groups.sizes, rng.integers(0, 2000, n_groups)) if cut else None
            cold = SortedGroups(s, groups, costs, limits)
            warm = SortedGroups(s, groups, costs, limits, previous=previous)
            np.testing.assert_array_equal(warm.perm, cold.perm)
            np.testing.assert_array_equal(_laid_out_scores(warm), _laid_out_scores(cold))
            assert previous.perm is warm.perm


@pytest.mark.parametrize("keep", [0, 1, 500, 999, 1000])
def test_the_warm_descending_sort_is_exact_from_any_previous_order(keep, monkeypatch):
    import prunekit.solvers.descending as descending_module
    from prunekit.solvers.descending import descending, descending_from

    monkeypatch.setattr(descending_module, "WARM_MAX_DISORDER", 1.0)       # never fall back to the cold sort
    rng = np.random.default_rng(keep)
    scores = rng.integers(0, 30, 1000).astype(np.float64)            # about 33 equal values each
    for previous in (rng.permutation(1000), np.argsort(-scores, kind="stable"), rng.permutation(1000)[:300],
                     np.arange(1000)[::-1].copy()):
        got = descending_from(scores, keep, previous)
        values = np.empty(keep)
        descending_from(scores, keep, previous, values_out=values)
        np.testing.assert_array_equal(got, descending(scores, keep))
        np.testing.assert_array_equal(values, scores[got])


def _near_ties(rng, n):
    """Scores that share their leading bits in runs but differ in the last ones, exact ties,
    zeros and -0.0: the cases a key of leading bits must not get wrong."""
    base = rng.choice([0.0, 1.0, 0.3, 2.0**-1000, 1e300, 5e-324], n)
    scores = np.nextafter(base, np.inf) if rng.random() < 0.5 else base.copy()
    bump = rng.integers(0, 4, n)                                       # up to 3 ulps above
    for _ in range(3):
        scores = np.where(bump > 0, np.nextafter(scores, np.inf), scores)
        bump -= 1
    scores[rng.random(n) < 0.1] = -0.0
    return scores


@pytest.mark.parametrize("seed", range(6))
def test_the_key_sort_gives_the_reference_sorts_order(seed):
    # descending (a sort of leading bits + position, then a repair) against torch's stable sort:
    # the same positions in the same order, also when the cut at `keep` falls inside a run of equal
    # leading bits; fails if the repair or the run extension at the cut is removed
    from prunekit.solvers.descending import descending, descending_torch

    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, 1000, 70_000):
        cases = [_near_ties(rng, n), rng.random(n) ** 3, rng.integers(0, 5, n).astype(np.float64),
                 np.float32(rng.standard_normal(n)).astype(np.float64) ** 2]
        for scores in cases:
            for keep in sorted({0, 1, n // 3, n // 2, n - 1, n}):
                want = descending_torch(scores, keep)
                values = np.empty(keep)
                got = descending(scores, keep, values_out=values)
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(values, scores[want])


def test_the_key_sort_repairs_runs_that_share_leading_bits():
    # 2^20 positions leave 44 value bits in the key: scores 1 ulp apart share them, so the key sort
    # alone puts them in position order; the result must still be by value
    from prunekit.solvers.descending import descending

    n = 1 << 20
    scores = np.full(n, 1.0)
    scores[::2] = np.nextafter(1.0, 2.0)                              # the larger ones at even positions
    scores[1] = 2.0
    got = descending(scores, n // 2)
    assert got[0] == 1 and np.all(got[1:] % 2 == 0) and np.all(np.diff(got[1:]) > 0)


def test_falcon_projections_select_as_without_the_previous_order(monkeypatch):
    # the ILP with and without the warm start gives the same keep mask on successive iterates
    from prunekit.solvers.cost_groups import CostGroups
    from prunekit.solvers.grouped_order import PreviousOrder

    rng = np.random.default_rng(3)
    p = 20_000
    slices = [slice(0, 5000), slice(5000, 12000), slice(12000, p)]
    groups = CostGroups.from_layers(slices, [4.0, 2.0, 1.0], p)
    previous = PreviousOrder()
    for s in _iterates(rng, p, 6):
        kwargs = dict(cost_groups=groups, max_count=6000, max_cost=15000.0)
        cold = solve_flops_ilp(torch.from_numpy(s), **kwargs)
        warm = solve_flops_ilp(torch.from_numpy(s), previous_order=previous, **kwargs)
        assert torch.equal(cold.keep, warm.keep) and cold.primal == warm.primal and cold.dual_bound == warm.dual_bound


def test_negative_scores_are_refused_not_sorted_by_magnitude():
    """The per-group sort orders scores by their bits, which holds for scores >= 0 only: a negative
    score (an importance the caller did not square) is refused in one line rather than kept as if
    it were large."""
    scores = np.array([3.0, -5.0, 1.0, 2.0])
    with pytest.raises(PrunekitError, match="non-negative"):
        solve_flops_ilp(scores, costs_per_weight=np.ones(4), max_count=2, max_cost=10.0)


@pytest.mark.parametrize("n_groups,per_group", [(3, 40_000), (50, 997), (1, 31), (2, 1)])
def test_sorted_groups_running_sums_are_the_cumsums_bit_for_bit(n_groups, per_group):
    """prefix_at (held every CHECKPOINT_EVERY positions, the rest added one by one) gives the very
    float64 the running sum of the whole layout gives, at every position, block edges included."""
    from prunekit.solvers.cost_groups import CostGroups, Squares
    from prunekit.solvers.ilp_groups import SortedGroups
    rng = np.random.default_rng(n_groups)
    roots = (rng.standard_normal(n_groups * per_group) * rng.uniform(1e-3, 1e3, n_groups * per_group)).astype(np.float32)
    groups = CostGroups.from_layers([slice(g * per_group, (g + 1) * per_group) for g in range(n_groups)],
                                    np.arange(1.0, n_groups + 1), roots.size)
    for scores in (roots.astype(np.float64) ** 2, Squares(roots)):
        sg = SortedGroups(scores, groups, groups.group_costs)
        laid_out = np.asarray(scores)[sg.perm]
        assert np.array_equal(_laid_out_scores(sg), laid_out)
        whole = np.concatenate([[0.0], np.cumsum(laid_out)])
        ends = np.arange(sg.n + 1)
        assert np.array_equal(sg.prefix_at(ends), whole)
        pick = rng.integers(0, sg.n + 1, size=(7, 5))
        assert np.array_equal(sg.prefix_at(pick), whole[pick])
