"""The FLOP + count ILP of :mod:`prunekit.solvers.ilp` with the scores cut into contiguous slices,
one per process, solved by exchanging per-group counts and sums, never the scores.

The fast solver works on prefix selections: m (G,) weights kept per cost group, each group's
best first. Its multiplier search needs, for a threshold per group, how many scores lie above it
and their sum: each process counts its own slice and one all-reduce of G + 1 values adds them
up. :class:`_SlicedGroups` answers every question the solver asks of :class:`SortedGroups` this
way, so :func:`~prunekit.solvers.ilp.round_lagrangian` runs unchanged on top of it:

* ``count_above``, ``score_above``: local counts / sums, one all-reduce of G (+1) values;
* which of a group's top m[g] weights this slice holds (``split``): remembered from the threshold
  that produced m[g] when there was one; otherwise the m[g]-th largest score of the group is
  found by bisection on its bits (about 64 all-reduces of the groups asked for), ties to the
  lower rank (the lower global index);
* ``next_scores`` / ``last_scores``: a max all-reduce of G values; ``score_of``: one scalar;
* ``tail_sums`` (the exchange step's cost of dropping a group's n worst kept weights): each slice
  sends its n worst kept weights of the few groups asked for (n is at most the cost ratio of two
  groups), not the group.

A layer may straddle two slices: groups are global (the same numbering as one process, see
:func:`sliced_cost_groups`). Results equal one process's up to the order of float64 sums (the
objective to rounding; the kept set too except between exactly tied scores).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .collective import Collective
from .ilp import ILPResult, round_lagrangian
from .cost_groups import CostGroups, accelerator_copy, finite_vector
from .grouped_order import PreviousOrder
from .ilp_groups import TINY, SortedGroups, prefix_limits
from .selection import exclusive_prefix


class _SlicedGroups(SortedGroups):
    """The scores of every slice, sorted within each global cost group, seen through counts.

    scores: this slice's (p_r,) float64; groups: this slice's :class:`CostGroups` over the global
    groups (:func:`slice_cost_groups`); group_costs (G,) the same on every rank. Selections m (G,)
    are global counts (the same on every rank).
    """

    def __init__(self, scores: np.ndarray, groups: CostGroups, group_costs: np.ndarray,
                 collective: Collective, device: torch.device, max_count: int, max_cost: float,
                 device_scores: torch.Tensor | None = None, previous: PreviousOrder | None = None):
        self.collective, self.device = collective, device
        # a slice's share of a feasible selection's group prefix is at most that prefix: only the
        # slice's best prefix_limits(...) of each group are sorted and seen (as in one process)
        local_size = groups.sizes
        limits = prefix_limits(local_size, group_costs, max_count, max_cost)
        self.local = (SortedGroups(scores, groups, group_costs, limits, device_scores, previous)
                      if scores.size else None)
        self.costs = group_costs
        self.by_cost = np.argsort(group_costs, kind="stable")
        self.size = self._sum(np.minimum(local_size, limits))
        self.max_score = float(self._max(np.array([scores.max() if scores.size else 0.0]))[0])
        self._split: dict[tuple[int, int], int] = {}
        self.bisection_rounds = 0

    # --- communication ------------------------------------------------------------------

    def _sum(self, values: np.ndarray) -> np.ndarray:
        """Σ over the ranks (a copy: the collectives work in place)."""
        t = torch.tensor(values, device=self.device)
        return self.collective.all_reduce(t).cpu().numpy()

    def _max(self, values: np.ndarray) -> np.ndarray:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.collective.all_reduce_max(t).cpu().numpy()

    # --- this slice --------------------------------------------------------------------------

    def _local_count_above(self, thresholds: np.ndarray) -> np.ndarray:
        if self.local is None:
            return np.zeros(self.costs.size, dtype=np.int64)
        return self.local.count_above(thresholds)

    def _local_score(self, m_local: np.ndarray) -> float:
        return 0.0 if self.local is None else self.local.score_of(m_local)

    def _remember(self, m: np.ndarray, m_local: np.ndarray) -> None:
        self._split.update(zip(zip(range(m.size), m.tolist()), m_local.tolist()))

    def split(self, m: np.ndarray) -> np.ndarray:
        """m_local (G,): how many of group g's top m[g] (over every slice) this slice holds."""
        m_local = np.zeros_like(m)
        missing = []
        for g, count in enumerate(m.tolist()):
            known = self._split.get((g, count))
            if known is None:
                missing.append(g)
            else:
                m_local[g] = known
        if missing:          # the same on every rank: the keys are global counts
            groups = np.array(missing)
            m_local[groups] = self._select(groups, m[groups])
            self._split.update(zip(zip(missing, m[groups].tolist()), m_local[groups].tolist()))
        return m_local

    def _select(self, groups: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """This slice's share of the top ``targets`` of each of ``groups``: the target-th
        largest score by bisection on its float64 bits (scores ≥ 0, so the bits order as
        the values), ties given to the lower ranks first."""
        local_size = (np.zeros(self.costs.size, dtype=np.int64) if self.local is None else self.local.size)[groups]
        active = (targets > 0) & (targets < self.size[groups])
        lo = np.zeros(groups.size, dtype=np.int64)                # #{≥ lo} ≥ target
        hi = np.full(groups.size, np.float64(self.max_score).view(np.int64) + 1)   # #{≥ hi} < target
        thresholds = np.full(self.costs.size, np.inf)

        def at_least(keys: np.ndarray) -> np.ndarray:
            below = np.where(keys > 0, (keys - 1).view(np.float64), -1.0)   # the float before
            thresholds[groups] = below
            return self._local_count_above(thresholds)[groups]

        while (active & (hi - lo > 1)).any():
            self.bisection_rounds += 1
            mid = np.where(active, lo + (hi - lo) // 2, lo)
            enough = self._sum(at_least(mid)) >= targets
            lo = np.where(active & enough, mid, lo)
            hi = np.where(active & ~enough, mid, hi)
        thresholds[groups] = lo.view(np.float64)
        above = self._local_count_above(thresholds)[groups]
        ties = at_least(lo) - above
        need = targets - self._sum(above)
        before = exclusive_prefix(self.collective, torch.tensor(ties, device=self.device)).cpu().numpy()
        share = above + np.clip(need - before, 0, ties)
        return np.where(active, share, np.where(targets > 0, local_size, 0))

    # --- the questions the solver asks --------------------------------------------------------

    def count_above(self, thresholds: np.ndarray) -> np.ndarray:
        m_local = self._local_count_above(thresholds)
        m = self._sum(m_local)
        self._remember(m, m_local)
        return m

    def score_above(self, thresholds: np.ndarray) -> tuple[np.ndarray, float]:
        m_local = self._local_count_above(thresholds)
        both = self._sum(np.concatenate([m_local.astype(np.float64), [self._local_score(m_local)]]))
        m = both[:-1].astype(np.int64)
        self._remember(m, m_local)
        return m, float(both[-1])

    def score_of(self, m: np.ndarray) -> float:
        return float(self._sum(np.array([self._local_score(self.split(m))]))[0])

    def next_scores(self, m: np.ndarray) -> np.ndarray:
        m_local = self.split(m)
        if self.local is None:
            mine = np.full(m.size, -np.inf)
        else:
            idx = np.minimum(self.local.start + m_local, max(self.local.n - 1, 0))
            mine = np.where(m_local < self.local.size, self.local.values(idx), -np.inf)
        return np.where(m < self.size, self._max(mine), 0.0)

    def last_scores(self, m: np.ndarray) -> np.ndarray:
        m_local = self.split(m)
        if self.local is None:
            mine = np.full(m.size, np.inf)
        else:
            idx = np.maximum(self.local.start + m_local - 1, 0)
            mine = np.where(m_local > 0, self.local.values(idx), np.inf)
        return np.where(m > 0, -self._max(-mine), np.inf)

    def tail_sums(self, m: np.ndarray, drops: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Each slice sends its ``max n`` least kept scores of each group in ``drops``; the least
        of all slices' are summed (ties do not change a sum)."""
        depth = n.max(axis=0) if n.size else np.zeros(drops.size, dtype=np.int64)    # (D,)
        total = int(depth.sum())
        if total == 0:
            return np.zeros(n.shape)
        m_local = self.split(m)
        mine = np.full(total, np.inf)
        at = 0
        for d, g in enumerate(drops.tolist()):
            take = min(int(depth[d]), int(m_local[g]))
            if take:
                end = self.local.start[g] + m_local[g]
                mine[at:at + take] = self.local.values(slice(end - take, end))[::-1]
            at += int(depth[d])
        every = self.collective.all_gather(torch.tensor(mine, device=self.device)).cpu().numpy()
        every = every.reshape(self.collective.size, total)
        sums = np.zeros(n.shape)
        at = 0
        for d in range(drops.size):
            width = int(depth[d])
            if width:
                least = np.sort(every[:, at:at + width].ravel())[:width]
                running = np.concatenate([[0.0], np.cumsum(least)])
                sums[:, d] = running[n[:, d]]
            at += width
        return sums

    def keep_mask(self, m: np.ndarray) -> np.ndarray:
        if self.local is None:
            return np.zeros(0, dtype=bool)
        return self.local.keep_mask(self.split(m))


def sliced_cost_groups(costs: torch.Tensor, collective: Collective, max_runs: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(group (p_r,) int64, group_costs (G,) float64) for this slice of the per-weight costs,
    numbered as one process numbers them (FALCON's): one group per run of equal consecutive
    costs (a layer, possibly straddling two slices), or, with max_runs runs or more over all
    slices, one group per distinct cost. Exchanges O(R + G) values."""
    device = costs.device
    c = costs.detach().to("cpu", torch.float64).numpy()
    changes = np.flatnonzero(c[1:] != c[:-1]) + 1                     # run starts inside the slice
    ends = np.array([c[0] if c.size else np.nan, c[-1] if c.size else np.nan, changes.size, c.size], dtype=np.float64)
    every = collective.all_gather(torch.from_numpy(ends).to(device)).cpu().numpy().reshape(collective.size, 4)
    # a run starts at a slice's first weight when the previous non-empty slice ended on another cost
    starts_here = np.zeros(collective.size, dtype=np.int64)
    last = np.nan
    for r in range(collective.size):
        if every[r, 3] > 0:
            starts_here[r] = int(not np.isnan(last) and every[r, 0] != last)
            last = every[r, 1]
    runs_before = int((every[:collective.rank, 2].sum() + starts_here[:collective.rank + 1].sum()))
    total_runs = int(every[:, 2].sum() + starts_here.sum()) + 1
    if total_runs - 1 >= max_runs:                                     # group by distinct cost
        values = collective.all_gather(torch.from_numpy(np.unique(c)).to(device)).cpu().numpy()
        group_costs = np.unique(values)
        return np.searchsorted(group_costs, c).astype(np.int64), group_costs
    group = np.zeros(c.size, dtype=np.int64)
    group[changes] = 1
    group = runs_before + np.cumsum(group)
    group_costs = np.zeros(total_runs)
    group_costs[group] = c
    group_costs = collective.all_reduce_max(torch.from_numpy(group_costs).to(device)).cpu().numpy()
    return group, group_costs


def slice_cost_groups(group: np.ndarray, group_costs: np.ndarray) -> CostGroups:
    """This slice's weights in cost-group form over the global groups (G of them, those the slice
    lacks empty), for :func:`solve_sliced_flops_ilp`: built once, it spares every solve on the
    same costs grouping the slice again (FALCON projects at every first-order step). ``group``
    (p_r,), ``group_costs`` (G,): from :func:`sliced_cost_groups`. Groups that are runs of
    consecutive weights (a network's layers: ids that never decrease) take the layer form, a
    range per group, with no per-weight array held or sorted; others (one group per distinct
    cost) keep their ids."""
    group = np.asarray(group)
    if group.size == 0 or bool((group[1:] >= group[:-1]).all()):
        bounds = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=group_costs.size))]).tolist()
        return CostGroups.from_layers([slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])], group_costs,
                                      int(group.size))
    return CostGroups.from_ids(group, group_costs)


def solve_sliced_flops_ilp(scores: torch.Tensor, group: np.ndarray | CostGroups, group_costs: np.ndarray, *,
                           max_count: int, max_cost: float, collective: Collective,
                           tol: float = 1e-12, previous_order: PreviousOrder | None = None) -> ILPResult:
    """:func:`~prunekit.solvers.ilp.solve_flops_ilp` over the slices of every rank.

    scores: this rank's (p_r,) non-negative scores; group, group_costs: from
    :func:`sliced_cost_groups` (``group`` may be :func:`slice_cost_groups` of it, built once for
    many solves). Returns this rank's ``keep`` (p_r,) and global figures (primal, bound, count,
    cost: the same on every rank). ``previous_order``: as in ``solve_flops_ilp``, this slice's sort
    starts from the last solve's order on the same ``group`` (a :class:`CostGroups`; the same result).
    """
    start = time.perf_counter()
    device = scores.device
    s = finite_vector(scores, "scores") + 0.0            # -0.0 + 0.0 = 0.0: the bits order as the values
    if not isinstance(group, CostGroups):
        group = slice_cost_groups(group, group_costs)
    if group.p != s.size:
        raise ValueError(f"the cost groups cover {group.p} weights but this slice has {s.size} scores")
    groups = _SlicedGroups(s, group, group_costs, collective, device, int(max_count), float(max_cost),
                           accelerator_copy(scores), previous_order)
    p = int(groups.size.sum())
    max_count = min(int(max_count), p)
    max_cost = min(float(max_cost), float(groups.size @ group_costs))
    positive = int(groups._sum(np.array([int((s > 0).sum())]))[0])
    if max_count == 0 or positive == 0:
        keep, m, dual, info = np.zeros(s.size, dtype=bool), np.zeros_like(groups.size), 0.0, {"method": "trivial"}
    else:
        m, dual, info = round_lagrangian(groups, max_count, max_cost, tol)
        keep = groups.keep_mask(m)
        info["bisection_rounds"] = groups.bisection_rounds
    primal = float(groups._sum(np.array([float(s[keep].sum())]))[0])
    dual = max(dual, primal)
    return ILPResult(keep=torch.from_numpy(keep).to(device), primal=primal, dual_bound=dual,
                     gap=max(dual - primal, 0.0) / max(abs(dual), TINY), count=int(m.sum()),
                     cost=float(m @ group_costs), seconds=time.perf_counter() - start, info=info)
