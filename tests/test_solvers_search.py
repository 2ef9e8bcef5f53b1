import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prunekit.errors import PrunekitError
from prunekit.solvers.search import largest_fitting_k


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=200), st.integers(0, 3000), st.integers(1, 5))
def test_largest_fitting_k_matches_brute_force_on_growing_costs(steps, limit, tolerance):
    costs = np.concatenate([[0], np.cumsum(steps)])           # cost of k' = costs[k'], growing
    k = len(steps)
    found, solution, solves = largest_fitting_k(lambda kk: kk, lambda kk: costs[kk], k, limit, tolerance)
    exact = max(kk for kk in range(k + 1) if costs[kk] <= limit)
    assert solution == found and costs[found] <= limit
    assert exact - tolerance < found <= exact
    assert solves <= k + 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=2, max_size=100), st.integers(0, 200))
def test_largest_fitting_k_always_fits_even_when_costs_do_not_grow(raw, limit):
    costs = [0] + raw
    found, _, _ = largest_fitting_k(lambda kk: kk, lambda kk: costs[kk], len(raw), limit)
    assert costs[found] <= limit


def test_interpolation_needs_few_solves_on_linear_costs():
    _, _, solves = largest_fitting_k(lambda kk: kk, lambda kk: 3.0 * kk, 1_000_000, 1_234_567.0)
    assert solves <= 6


def test_tolerance_below_one_is_refused():
    with pytest.raises(PrunekitError, match="tolerance"):
        largest_fitting_k(lambda kk: kk, float, 10, 5, tolerance=0)
