"""FALCON's solver: both budgets always met, never worse than its magnitude start."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from prunekit.errors import PrunekitError
from prunekit.solvers.falcon import falcon
from prunekit.solvers.quadratic import QuadraticModel


def problem(seed, n=6, p=30):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64) + torch.randn(n, 1, generator=g, dtype=torch.float64)
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    costs = torch.tensor([9.0] * 10 + [3.0] * 10 + [1.0] * 10, dtype=torch.float64)
    return QuadraticModel(X, w_bar, ridge=0.05), costs


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), k=st.integers(1, 20), share=st.floats(0.1, 1.0))
def test_both_budgets_are_met_and_dfo_never_loses_to_magnitude(seed, k, share):
    q, costs = problem(seed)
    max_macs = share * float(costs.sum())
    dfo = falcon(q, costs, k, max_macs, variant="dfo")
    magnitude = falcon(q, costs, k, max_macs, variant="magnitude")
    for solution in (dfo, magnitude):
        nonzero = solution.w != 0
        assert int(nonzero.sum()) <= k
        assert float(costs[nonzero].sum()) <= max_macs + 1e-9
    assert dfo.objective <= magnitude.objective + 1e-12
    assert dfo.objective == pytest.approx(q.objective(dfo.w))


def test_dfo_improves_on_most_problems():
    improved = 0
    for seed in range(20):
        q, costs = problem(seed, n=10, p=30)
        dfo = falcon(q, costs, 8, 0.3 * float(costs.sum()), variant="dfo")
        magnitude = falcon(q, costs, 8, 0.3 * float(costs.sum()), variant="magnitude")
        improved += dfo.objective < magnitude.objective - 1e-12
    assert improved >= 14          # measured: 17 of 20


def test_bad_arguments():
    q, costs = problem(0)
    with pytest.raises(PrunekitError, match="variant"):
        falcon(q, costs, 5, 10.0, variant="nope")
    with pytest.raises(PrunekitError, match="shape"):
        falcon(q, costs[:5], 5, 10.0)


@pytest.mark.parametrize("seed", range(4))
def test_dfo_point_is_the_exact_backsolve_on_its_support(seed):
    """DFO updates the Gram matrix of the support between steps instead of recomputing it: its
    final point must still be the exact backsolve on its support."""
    from prunekit.solvers.backsolve import backsolve
    g = torch.Generator().manual_seed(seed)
    n, p = 8, 600
    X = torch.randn(n, p, generator=g, dtype=torch.float64) + torch.randn(n, 1, generator=g, dtype=torch.float64)
    q = QuadraticModel(X, torch.randn(p, generator=g, dtype=torch.float64), ridge=0.05)
    costs = torch.repeat_interleave(torch.tensor([9.0, 3.0, 1.0, 3.0], dtype=torch.float64), p // 4)
    solution = falcon(q, costs, 300, 0.4 * float(costs.sum()), variant="dfo", max_change_share=0.05)
    assert solution.info["accepted"] > 0
    exact = backsolve(q, solution.w != 0)
    assert float((solution.w - exact).norm()) <= 1e-8 * float(exact.norm())
    assert solution.objective == pytest.approx(q.objective(exact), rel=1e-9)


def test_gram_cache_gives_the_fresh_solution_along_a_chain_of_nearby_supports():
    """The layer search's trials: many calls on supports a few weights apart. Updating the cached
    Gram matrix must give the fresh backsolve's weights; the chain restarts after MAX_CHAIN."""
    from prunekit.solvers.backsolve import GramCache

    q, _ = problem(3, n=6, p=60)
    costs = torch.ones(60, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    cache, chains = GramCache(), []
    scores = torch.ones(60, dtype=torch.float64)
    for _ in range(2 * GramCache.MAX_CHAIN + 5):
        moved = torch.randperm(60, generator=g)[:2]
        scores[moved] *= 2.0 ** torch.randn(2, generator=g, dtype=torch.float64)
        cached = falcon(q, costs, 40, 60.0, variant="magnitude", score_weights=scores, gram_cache=cache)
        fresh = falcon(q, costs, 40, 60.0, variant="magnitude", score_weights=scores)
        assert torch.equal(cached.w != 0, fresh.w != 0)
        assert float((cached.w - fresh.w).abs().max()) <= 1e-10 * float(fresh.w.abs().max())
        chains.append(cache.chain)
    assert max(chains) == GramCache.MAX_CHAIN          # updates happened, up to the bound
    assert chains.count(0) >= 2                        # ... and the chain restarted from a fresh Gram


def test_a_nearly_zero_quadratic_does_not_step_past_the_float_range():
    # Random data through a random MobileNet gave gradients of ~1e-42: the step size 1/L grew
    # 16-fold per trial until w - eta * grad overflowed and the ILP refused its inf scores.
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(6, 30, generator=g) * 1e-20).float()
    w_bar = torch.randn(30, generator=g).float()
    costs = torch.tensor([9.0] * 10 + [3.0] * 10 + [1.0] * 10, dtype=torch.float64)
    q = QuadraticModel(X, w_bar, ridge=1e-38)
    max_macs = 0.3 * float(costs.sum())
    solution = falcon(q, costs, 10, max_macs, variant="dfo")
    nonzero = solution.w != 0
    assert bool(torch.isfinite(solution.w).all()) and int(nonzero.sum()) <= 10
    assert float(costs[nonzero].sum()) <= max_macs
