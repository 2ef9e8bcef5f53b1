"""Rounding a Lagrangian selection of the FLOP + count ILP to a good feasible one.

Every function works on prefix selections ``m`` (G,) of :class:`~prunekit.solvers.ilp_groups.SortedGroups`:
cut a selection down to the FLOP budget, fill it greedily, and improve it by exchanges
("keep one more weight of group g, drop the n worst of group h") until none gains.
"""

from __future__ import annotations

import math

import numpy as np

from .ilp_groups import SortedGroups


def greedy_fill(groups: SortedGroups, m: np.ndarray, k: int, F: float) -> np.ndarray:
    """Add the best remaining weights that still fit both budgets to the feasible prefix
    selection m (G,). Takes whole runs of a group at once (those scoring at least the best
    alternative), so ties cost one step rather than one step per weight."""
    m = m.copy()
    while (room_count := k - int(m.sum())) > 0:
        room_cost = F - groups.cost_of(m)
        nxt = groups.next_scores(m)
        candidates = np.where((nxt > 0) & (groups.costs <= room_cost), nxt, -np.inf)
        g = int(np.argmax(candidates))
        if candidates[g] == -np.inf:
            break
        candidates[g] = -np.inf
        runner_up = candidates.max()
        floor = np.nextafter(runner_up, -np.inf) if runner_up > 0 else 0.0
        thresholds = np.full(groups.costs.size, np.inf)
        thresholds[g] = floor
        run = int(groups.count_above(thresholds)[g] - m[g])
        n = min(run, room_count)
        if groups.costs[g] > 0:
            n = min(n, int(room_cost // groups.costs[g]))
        step = np.zeros_like(m)
        step[g] = 1
        while n > 0 and groups.cost_of(m + n * step) > F:  # guard the float division
            n -= 1
        if n == 0:
            break
        m[g] += n
    return m


def drop_to_budget(groups: SortedGroups, m: np.ndarray, F: float) -> np.ndarray:
    """Make the prefix selection m (G,) fit the FLOP budget by dropping the kept weights
    with the least score per MAC. Drops whole runs of a group at once (those with a ratio
    at most the best alternative's), so ties cost one step rather than one step per weight."""
    m = m.copy()
    paid = groups.costs > 0
    while (excess := groups.cost_of(m) - F) > 0:
        ratio = np.where(paid & (m > 0), groups.last_scores(m) / np.where(paid, groups.costs, 1.0), np.inf)
        h = int(np.argmin(ratio))
        ratio[h] = np.inf
        runner_up = ratio.min()
        thresholds = np.full(groups.costs.size, np.inf)
        thresholds[h] = runner_up * groups.costs[h]
        run = int(m[h] - groups.count_above(thresholds)[h]) if np.isfinite(runner_up) else int(m[h])
        m[h] -= max(1, min(run, math.ceil(excess / groups.costs[h])))
    return m


def _shortlist(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the (at most) n largest finite entries of ``values``."""
    idx = np.flatnonzero(np.isfinite(values))
    if idx.size > n:
        idx = idx[np.argpartition(-values[idx], n)[:n]]
    return idx


def _best_exchange(
    groups: SortedGroups, m: np.ndarray, k: int, F: float, width: int = 256
) -> tuple[float, int, int, int]:
    """(gain, g, h, n): the best move "keep group g's best unkept weight, drop the n worst
    kept weights of group h" that leaves the prefix selection m (G,) within both budgets.

    n is the least number of h-weights that frees the MACs (and, with the count budget
    full, the slot) that g's weight needs. A one-for-one swap is the case n = 1. Adds are
    shortlisted to the ``width`` best next scores, drops to the ``width`` groups whose
    worst kept weight has the least score per MAC, so a round costs O(width²).
    """
    nxt = groups.next_scores(m)
    adds = _shortlist(np.where(nxt > 0, nxt, -np.inf), width)
    paid = groups.costs > 0
    last_ratio = groups.last_scores(m) / np.where(paid, groups.costs, 1.0)
    drops = _shortlist(np.where(paid & (m > 0), -last_ratio, -np.inf), width)
    if adds.size == 0 or drops.size == 0:
        return 0.0, 0, 0, 0
    need = groups.costs[adds, None] - (F - groups.cost_of(m))  # (A, 1) MACs to free
    n = np.ceil(np.maximum(need, 0.0) / groups.costs[None, drops])  # (A, D)
    if m.sum() >= k:
        n = np.maximum(n, 1.0)
    ok = n <= m[None, drops]
    n = np.where(ok, n, 0).astype(np.int64)
    loss = groups.tail_sums(m, drops, n)
    gain = np.where(ok, nxt[adds, None] - loss, -np.inf)
    a, d = np.unravel_index(int(np.argmax(gain)), gain.shape)
    return float(gain[a, d]), int(adds[a]), int(drops[d]), int(n[a, d])


def local_search(groups: SortedGroups, m: np.ndarray, k: int, F: float, max_rounds: int = 1000) -> np.ndarray:
    """Greedy fill, then improving exchanges (each followed by a fill) until none is left
    or ``max_rounds`` is reached (each round strictly raises the score)."""
    m = greedy_fill(groups, m, k, F)
    for _ in range(max_rounds):
        gain, g, h, n = _best_exchange(groups, m, k, F)
        if not gain > 0:
            break
        trial = m.copy()
        trial[g] += 1
        trial[h] -= n
        if groups.cost_of(trial) > F or trial.sum() > k:  # float rounding at the budget's edge
            break
        m = greedy_fill(groups, trial, k, F)
    return m
