"""The selection ILP's input in cost-group form, and its sorted prefix view.

Costs are constant within a layer, so the p weights fall into G cost groups; any optimal
selection keeps a prefix of each group's scores in descending order, so a selection is
``m`` (G,), the number kept per group. :class:`SortedGroups` counts, sums and completes such
selections in vectorised O(G log p) steps. Used by the fast solver (``solvers.ilp``), its
sliced form (``solvers.sliced_ilp``) and the HiGHS reference (``solvers.ilp_exact``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from prunekit.errors import PrunekitError

from .cost_groups import LOOP_SORT_MAX_GROUPS, CostGroups, accelerator_copy, finite_vector, groups_from_costs
from .grouped_order import PreviousOrder, grouped_order, grouped_order_on_device

TINY = 1e-300
CHECKPOINT_EVERY = 32   # positions between the held running sums (SortedGroups.prefix_at)


@dataclass(frozen=True)
class Problem:
    """The ILP in cost-group form.

    scores: (p,) float64, >= 0.  cost_groups: :class:`CostGroups` of the weights.
    max_count / max_cost are clipped to p / total cost (equivalent constraints).
    device_scores: the same scores (float64) on the accelerator they came from, or None on
    the CPU: the sort, the solve's one O(p log p) step, then runs there.
    """

    scores: np.ndarray
    cost_groups: CostGroups
    max_count: int
    max_cost: float
    device_scores: torch.Tensor | None = None

    @property
    def group(self) -> np.ndarray:
        """(p,) the group of each weight."""
        return self.cost_groups.group()

    @property
    def group_costs(self) -> np.ndarray:
        """(G,) float64."""
        return self.cost_groups.group_costs

    def costs(self) -> np.ndarray:
        """Per-weight costs (p,) float64."""
        return self.group_costs[self.group]

    def count_and_cost(self, keep: np.ndarray) -> tuple[int, float]:
        """Count and total cost of the selection ``keep`` (p,) bool."""
        per_group = self.cost_groups.counts(keep)
        return int(per_group.sum()), float(per_group @ self.group_costs)

    def is_feasible(self, keep: np.ndarray) -> bool:
        count, cost = self.count_and_cost(keep)
        return count <= self.max_count and cost <= self.max_cost

def parse_problem(scores, costs_per_weight, layer_slices, layer_costs, max_count, max_cost,
                  cost_groups: CostGroups | None = None) -> Problem:
    """Validate the user's input and put it in cost-group form (``cost_groups``: the costs'
    groups built already, e.g. by an earlier solve on the same costs)."""
    s = finite_vector(scores, "scores")
    p = s.size
    given = sum(x is not None for x in (costs_per_weight, cost_groups)) + (layer_slices is not None
                                                                           or layer_costs is not None)
    if given > 1:
        raise PrunekitError("pass either costs_per_weight or layer_slices + layer_costs, not both."
                            if cost_groups is None else "pass cost_groups alone, without other costs.")
    if cost_groups is not None:
        if cost_groups.p != p:
            raise PrunekitError(f"cost_groups has {cost_groups.p} weights but scores has {p}; they must match.")
        groups = cost_groups
    elif costs_per_weight is not None:
        c = finite_vector(costs_per_weight, "costs_per_weight")
        if c.size != p:
            raise PrunekitError(f"costs_per_weight has {c.size} entries but scores has {p}; they must match.")
        groups = CostGroups.from_ids(*groups_from_costs(c))
    elif layer_slices is not None and layer_costs is not None:
        groups = CostGroups.from_layers(layer_slices, layer_costs, p)
    else:
        raise PrunekitError("give the costs: costs_per_weight (p,), or both layer_slices and layer_costs.")
    if isinstance(max_count, bool) or not float(max_count).is_integer() or max_count < 0:
        raise PrunekitError(f"max_count must be a non-negative integer, got {max_count!r}.")
    if math.isnan(max_cost) or max_cost < 0:
        raise PrunekitError(f"max_cost must be a non-negative number of MACs, got {max_cost!r}.")
    return Problem(s, groups, min(int(max_count), p), min(float(max_cost), groups.total_cost),
                   accelerator_copy(scores))


def prefix_limits(group_sizes: np.ndarray, group_costs: np.ndarray, max_count: int, max_cost: float) -> np.ndarray:
    """(G,) the longest prefix of each group a feasible selection can keep: at most k weights, and
    at most F / c_g of group g alone (one more, against float rounding). Dropping a group's
    weights beyond it changes neither the optimum nor any feasible selection's prefix counts."""
    limits = np.minimum(group_sizes, max_count)
    priced = group_costs > 0
    with np.errstate(over="ignore"):
        by_cost = np.floor(max_cost / np.where(priced, group_costs, 1.0)) + 1
    return np.where(priced, np.minimum(limits, np.minimum(by_cost, group_sizes)), limits).astype(np.int64)

class SortedGroups:
    """Scores sorted in descending order within each cost group, with vectorised counting.

    ``group``: (p,) group ids, or the :class:`CostGroups` of the weights.
    A selection that keeps a prefix of every group is described by ``m`` (G,) int64, the
    number kept per group. The layout is group-major: group g occupies positions
    ``start[g] : start[g] + size[g]`` of the layout (``perm``: position -> weight; the scores in
    that order are read through it, :meth:`values`, not held), and :meth:`prefix_at` gives its
    running sums from one held every ``CHECKPOINT_EVERY`` positions: about 4 bytes a weight in
    all (int32 ``perm``) where the laid-out scores and their running sums held 16 more. ``limits`` (G,), optional (see ``prefix_limits``): only the best ``limits[g]`` of
    group g are sorted and seen (``size[g]``), which spares sorting what no feasible selection keeps.
    ``device_scores``: the scores on an accelerator (see :class:`Problem`); the sort then runs there.
    ``previous``: a :class:`PreviousOrder` to start the (CPU) sort from (the same result), left
    holding this one's order; only the layer form and up to 1,024 groups use it.
    """

    def __init__(self, scores: np.ndarray, group: np.ndarray, group_costs: np.ndarray,
                 limits: np.ndarray | None = None, device_scores: torch.Tensor | None = None,
                 previous: PreviousOrder | None = None):
        n_groups = group_costs.size
        full_size = group.sizes if isinstance(group, CostGroups) else np.bincount(group, minlength=n_groups)
        self.size = full_size if limits is None else np.minimum(full_size, limits)
        self.p = scores.size
        self.scores = scores
        if device_scores is None:       # layout position -> weight index
            warm = previous is not None and previous.perm is not None and previous.groups is group
            self.perm = grouped_order(scores, group, self.size, previous=previous if warm else None)
            if previous is not None:
                previous.perm, previous.size, previous.groups = self.perm, self.size, group
        else:
            ids = group.group() if isinstance(group, CostGroups) else group
            self.perm = grouped_order_on_device(device_scores, ids, self.size)
        self.n = int(self.perm.size)
        self._checkpoints = self._running_sums()
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]])
        self.costs = group_costs
        self.by_cost = np.argsort(group_costs, kind="stable")
        self.max_score = float(scores.max())
        self._steps = [1 << j for j in reversed(range(int(self.size.max()).bit_length()))]

    def values(self, positions) -> np.ndarray:
        """The scores at layout ``positions`` (any shape, or a slice), float64: ``scores[perm[positions]]``.
        The layout's scores are not held (8 bytes a weight): they are read through ``perm``."""
        return self.scores[self.perm[positions]]

    def _running_sums(self) -> np.ndarray:
        """(n // CHECKPOINT_EVERY + 1,): the running sum of the laid-out scores at every
        ``CHECKPOINT_EVERY``-th position (``prefix[i * CHECKPOINT_EVERY]``), accumulated one score
        after the other in layout order (the same float64 additions as one cumsum of the whole),
        built a block at a time."""
        every = CHECKPOINT_EVERY
        out = np.empty(self.n // every + 1)
        out[0] = carry = 0.0
        block = every * 16384               # 4 MB of temporaries a block
        for a in range(0, self.n, block):
            b = min(a + block, self.n)
            sums = np.empty(b - a + 1)
            sums[0] = carry
            sums[1:] = self.values(slice(a, b))
            np.add.accumulate(sums, out=sums)
            held = sums[::every]            # positions a, a + every, ... (a is a multiple of every)
            out[a // every:a // every + held.size] = held
            carry = float(sums[-1])
        return out

    def prefix_at(self, ends) -> np.ndarray:
        """``prefix[ends]`` (any shape, int): the sum of the laid-out scores before each position,
        the same float64 value as the running sum of all of them (``np.cumsum``) gives there:
        from the checkpoint below, adding the scores after it one by one."""
        ends = np.asarray(ends, dtype=np.int64)
        flat = ends.reshape(-1)
        block, rest = np.divmod(flat, CHECKPOINT_EVERY)
        out = self._checkpoints[block]
        todo = np.flatnonzero(rest)
        if todo.size:
            width = int(rest[todo].max())
            base = flat[todo] - rest[todo]
            pos = np.minimum(base[:, None] + np.arange(width), max(self.n - 1, 0))
            terms = np.empty((todo.size, width + 1))
            terms[:, 0] = out[todo]
            terms[:, 1:] = self.values(pos)
            np.add.accumulate(terms, axis=1, out=terms)
            out[todo] = terms[np.arange(todo.size), rest[todo]]
        return out.reshape(ends.shape)

    def count_above(self, thresholds: np.ndarray) -> np.ndarray:
        """m (G,): number of scores of group g strictly above thresholds[g].

        A binary search in every group at once: O(log max_size) vectorised steps."""
        m = np.zeros_like(self.size)
        for step in self._steps:
            trial = np.minimum(m + step, self.size)
            above = (trial > m) & (self.values(np.maximum(self.start + trial - 1, 0)) > thresholds)
            m = np.where(above, trial, m)
        return m

    def score_of(self, m: np.ndarray) -> float:
        """Σ of the kept scores of the prefix selection m."""
        return float((self.prefix_at(self.start + m) - self.prefix_at(self.start)).sum())

    def score_above(self, thresholds: np.ndarray) -> tuple[np.ndarray, float]:
        """(m, Σ kept scores) of the selection of every score above its group's threshold."""
        m = self.count_above(thresholds)
        return m, self.score_of(m)

    def tail_sums(self, m: np.ndarray, drops: np.ndarray, n: np.ndarray) -> np.ndarray:
        """(A, D): Σ of the n[a, d] least kept scores of group drops[d] (n ≤ m[drops])."""
        end = self.start[drops] + m[drops]
        return self.prefix_at(end) - self.prefix_at(end - n)

    def cost_of(self, m: np.ndarray) -> float:
        """Σ of the kept costs of the prefix selection m."""
        return float(self.costs @ m)

    def next_scores(self, m: np.ndarray) -> np.ndarray:
        """(G,): the best score each group has not kept yet; 0 where the group is used up."""
        left = m < self.size
        idx = np.minimum(self.start + m, max(self.n - 1, 0))
        return np.where(left, self.values(idx), 0.0)

    def last_scores(self, m: np.ndarray) -> np.ndarray:
        """(G,): the worst score each group keeps; +inf where it keeps nothing."""
        idx = np.maximum(self.start + m - 1, 0)
        return np.where(m > 0, self.values(idx), np.inf)

    def take_cheapest_first(self, available: np.ndarray, n: int) -> np.ndarray:
        """(G,): n items spread over groups with ``available`` (G,), cheapest groups first."""
        avail = available[self.by_cost]
        before = np.cumsum(avail) - avail
        take = np.empty_like(available)
        take[self.by_cost] = np.clip(n - before, 0, avail)
        return take

    def keep_mask(self, m: np.ndarray) -> np.ndarray:
        """(p,) bool in the original weight order for the prefix selection m (group by group
        when there are few: no index array of the kept weights' size)."""
        keep = np.zeros(self.p, dtype=bool)
        if m.size <= LOOP_SORT_MAX_GROUPS:
            for a, n in zip(self.start, m):
                keep[self.perm[a:a + n]] = True
            return keep
        offsets = np.repeat(self.start, m)
        within = np.arange(offsets.size) - np.repeat(np.cumsum(m) - m, m)
        keep[self.perm[offsets + within]] = True
        return keep
