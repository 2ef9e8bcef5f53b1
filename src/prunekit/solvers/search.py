"""Search over the count budget k for the largest one whose solution fits a MAC budget.

Methods that only know a count budget (magnitude, CHITA, WoodFisher) meet a FLOP budget by
pruning further: to the largest k whose solution's MACs fit. Each trial is a full solve, so
the search interpolates (the MACs of a solution grow roughly linearly with k) and falls back
to halving whenever interpolation does not halve the bracket.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import PrunekitError

S = TypeVar("S")


def largest_fitting_k(solve: Callable[[int], S], cost: Callable[[S], float], k: int, limit: float,
                      tolerance: int = 1) -> tuple[int, S, int]:
    """The solution for the largest k' ≤ k whose cost fits ``limit``, to within ``tolerance``.

    solve:     k' -> solution; cost: solution -> its MACs (0 for k' = 0; assumed to grow with k').
    tolerance: stop once the bracket [fits, does not fit] is this narrow (1 = exact).
    Returns (k', solution, number of solves). The returned solution always fits.
    """
    if tolerance < 1:
        raise PrunekitError(f"tolerance must be at least 1, got {tolerance}")
    solves = 1
    solution = solve(k)
    cost_hi = cost(solution)
    if cost_hi <= limit:
        return k, solution, solves
    lo, hi, cost_lo, best = 0, k, 0.0, None       # invariant: lo fits (k' = 0 always does), hi does not
    halve = False
    while hi - lo > tolerance:
        if halve or cost_hi <= cost_lo:
            mid = (lo + hi) // 2
        else:
            mid = lo + round((hi - lo) * (limit - cost_lo) / (cost_hi - cost_lo))
            mid = min(max(mid, lo + 1), hi - 1)
        trial = solve(mid)
        solves += 1
        width = hi - lo
        if cost(trial) <= limit:
            lo, cost_lo, best = mid, cost(trial), trial
        else:
            hi, cost_hi = mid, cost(trial)
        halve = hi - lo > width / 2
    if best is None:
        best, solves = solve(lo), solves + 1
    return lo, best, solves
