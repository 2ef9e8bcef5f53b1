"""The selection ILP's input in cost-group form, and its sorted prefix view.

Costs are constant within a layer, so the p weights fall into G cost groups; any optimal
selection keeps a prefix of each group's scores in descending order, so a selection is
``m`` (G,), the number kept per group. :class:`SortedGroups` counts, sums and completes such
selections in vectorised O(G log p) steps. Used by the fast solver (``solvers.ilp``), its
sliced form (``solvers.sliced_ilp``) and the HiGHS reference (``solvers.ilp_exact``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prunekit.errors import PrunekitError

TINY = 1e-300


@dataclass(frozen=True)
class Problem:
    """The ILP in cost-group form.

    scores: (p,) float64, >= 0.  group: (p,) int64 in [0, G).  group_costs: (G,) float64.
    max_count / max_cost are clipped to p / total cost (equivalent constraints).
    device_scores: the same scores (float64) on the accelerator they came from, or None on
    the CPU: the sort, the solve's one O(p log p) step, then runs there.
    """

    scores: np.ndarray
    group: np.ndarray
    group_costs: np.ndarray
    max_count: int
    max_cost: float
    device_scores: torch.Tensor | None = None

    def costs(self) -> np.ndarray:
        """Per-weight costs (p,) float64."""
        return self.group_costs[self.group]

    def count_and_cost(self, keep: np.ndarray) -> tuple[int, float]:
        """Count and total cost of the selection ``keep`` (p,) bool."""
        per_group = np.bincount(self.group[keep], minlength=self.group_costs.size)
        return int(per_group.sum()), float(per_group @ self.group_costs)

    def is_feasible(self, keep: np.ndarray) -> bool:
        count, cost = self.count_and_cost(keep)
        return count <= self.max_count and cost <= self.max_cost


def finite_vector(x, name: str) -> np.ndarray:
    """``x`` (tensor or array-like) as a 1-D float64 array of finite, non-negative values."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise PrunekitError(f"{name} must be a 1-D vector, got shape {arr.shape}; flatten it first.")
    if not np.isfinite(arr).all():
        raise PrunekitError(f"{name} contains NaN or infinite values; pass finite numbers.")
    if (arr < 0).any():
        raise PrunekitError(f"{name} must be non-negative; found {arr.min():g}.")
    return arr


def accelerator_copy(x) -> torch.Tensor | None:
    """``x`` as float64 on its accelerator if it is a tensor there (for the device sort), else None."""
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        return x.detach().to(torch.float64)
    return None


def groups_from_costs(costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group weights by equal cost: returns (group (p,) int64, group_costs (G,))."""
    group_costs, group = np.unique(costs, return_inverse=True)
    return group.astype(np.int64), group_costs


def groups_from_layers(layer_slices: Sequence[slice], layer_costs, p: int) -> tuple[np.ndarray, np.ndarray]:
    """One group per layer: returns (group (p,) int64, group_costs (L,)).

    The slices must partition range(p) (any order, step 1).
    """
    costs = finite_vector(layer_costs, "layer_costs")
    if len(layer_slices) != costs.size:
        raise PrunekitError(
            f"layer_slices has {len(layer_slices)} entries but layer_costs has {costs.size}; "
            "give one cost per layer."
        )
    group = np.full(p, -1, dtype=np.int64)
    for j, sl in enumerate(layer_slices):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise PrunekitError(f"layer_slices[{j}] = {sl!r} must be a slice(start, stop) with step 1.")
        start, stop, _ = sl.indices(p)
        if sl.start is None or sl.stop is None or sl.stop > p or start > stop:
            raise PrunekitError(f"layer_slices[{j}] = {sl!r} is not a range inside [0, {p}) (p = len(scores)).")
        if (group[start:stop] != -1).any():
            raise PrunekitError(f"layer_slices[{j}] = {sl!r} overlaps an earlier layer; layers must not overlap.")
        group[start:stop] = j
    if (group == -1).any():
        first = int(np.argmax(group == -1))
        raise PrunekitError(f"weight {first} is in no layer slice; layer_slices must cover all {p} scores.")
    return group, costs


def parse_problem(scores, costs_per_weight, layer_slices, layer_costs, max_count, max_cost) -> Problem:
    """Validate the user's input and put it in cost-group form."""
    s = finite_vector(scores, "scores")
    p = s.size
    if costs_per_weight is not None and (layer_slices is not None or layer_costs is not None):
        raise PrunekitError("pass either costs_per_weight or layer_slices + layer_costs, not both.")
    if costs_per_weight is not None:
        c = finite_vector(costs_per_weight, "costs_per_weight")
        if c.size != p:
            raise PrunekitError(f"costs_per_weight has {c.size} entries but scores has {p}; they must match.")
        group, group_costs = groups_from_costs(c)
    elif layer_slices is not None and layer_costs is not None:
        group, group_costs = groups_from_layers(layer_slices, layer_costs, p)
    else:
        raise PrunekitError("give the costs: costs_per_weight (p,), or both layer_slices and layer_costs.")
    if isinstance(max_count, bool) or not float(max_count).is_integer() or max_count < 0:
        raise PrunekitError(f"max_count must be a non-negative integer, got {max_count!r}.")
    if math.isnan(max_cost) or max_cost < 0:
        raise PrunekitError(f"max_cost must be a non-negative number of MACs, got {max_cost!r}.")
    total_cost = float(np.bincount(group, minlength=group_costs.size) @ group_costs)
    return Problem(s, group, group_costs, min(int(max_count), p), min(float(max_cost), total_cost),
                   accelerator_copy(scores))


_LOOP_SORT_MAX_GROUPS = 1024


def prefix_limits(group_sizes: np.ndarray, group_costs: np.ndarray, max_count: int, max_cost: float) -> np.ndarray:
    """(G,) the longest prefix of each group a feasible selection can keep: at most k weights, and
    at most F / c_g of group g alone (one more, against float rounding). Dropping a group's
    weights beyond it changes neither the optimum nor any feasible selection's prefix counts."""
    limits = np.minimum(group_sizes, max_count)
    priced = group_costs > 0
    with np.errstate(over="ignore"):
        by_cost = np.floor(max_cost / np.where(priced, group_costs, 1.0)) + 1
    return np.where(priced, np.minimum(limits, np.minimum(by_cost, group_sizes)), limits).astype(np.int64)


def _descending(scores: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the ``keep`` largest of ``scores`` (q,) float64, largest first, ties by position.

    torch's selection and sort run several times faster than NumPy's argsort on 10^7 values."""
    values = torch.from_numpy(scores)
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    if keep < values.numel():
        kth = torch.kthvalue(values, values.numel() - keep + 1).values      # the keep-th largest
        chosen = values > kth
        tied = torch.nonzero(values == kth).flatten()
        chosen[tied[: keep - int(chosen.sum())]] = True
        candidates = torch.nonzero(chosen).flatten()
    else:
        candidates = torch.arange(values.numel())
    order = torch.sort(values[candidates], descending=True, stable=True).indices
    return candidates[order].numpy()


def _grouped_order_on_device(scores: torch.Tensor, group: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """:func:`_grouped_order` (the same order, ties by index) with the sorts on the device of
    ``scores`` (p,): on a GPU two stable sorts of p values take milliseconds where the CPU's
    take seconds (ViT-B/16, p = 86M: the sort was most of FALCON's time on an H200)."""
    device = scores.device
    order = torch.sort(scores, descending=True, stable=True).indices
    by_group = torch.from_numpy(group.astype(np.int32)).to(device)[order]
    order = order[torch.sort(by_group, stable=True).indices]  # group-major, descending within
    del by_group
    sizes = torch.from_numpy(np.bincount(group, minlength=limits.size)).to(device)
    starts = torch.cumsum(sizes, 0) - sizes
    rank_in_group = torch.arange(order.numel(), device=device) - torch.repeat_interleave(starts, sizes)
    return order[rank_in_group < torch.repeat_interleave(torch.from_numpy(limits).to(device), sizes)].cpu().numpy()


def _grouped_order(scores: np.ndarray, group: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """(Σ limits,) weight indices: group 0's ``limits[0]`` best by descending score (ties by
    index), then group 1's, ...

    Sorting each group on its own is several times faster than one global sort at
    p ~ 1e7 (the blocks fit in cache); with very many groups one global sort is used.
    """
    n_groups = limits.size
    small = group.astype(np.uint16) if n_groups <= 1 << 16 else group  # 16-bit: radix sort
    sizes = np.bincount(group, minlength=n_groups)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    if n_groups > _LOOP_SORT_MAX_GROUPS:
        desc = torch.sort(torch.from_numpy(scores), descending=True, stable=True).indices.numpy()
        order = desc[np.argsort(small[desc], kind="stable")]
        rank_in_group = np.arange(order.size) - np.repeat(starts, sizes)
        return order[rank_in_group < np.repeat(limits, sizes)]
    by_group = np.argsort(small, kind="stable")             # each group's weights in index order
    return np.concatenate([np.zeros(0, dtype=np.int64)] + [
        by_group[a:a + n][_descending(scores[by_group[a:a + n]], int(keep))]
        for a, n, keep in zip(starts, sizes, limits)])


class SortedGroups:
    """Scores sorted in descending order within each cost group, with vectorised counting.

    A selection that keeps a prefix of every group is described by ``m`` (G,) int64, the
    number kept per group. The layout is group-major: group g occupies positions
    ``start[g] : start[g] + size[g]`` of ``s_desc``, and ``prefix`` holds the running sums of
    ``s_desc``. ``limits`` (G,), optional (see ``prefix_limits``): only the best ``limits[g]`` of
    group g are sorted and seen (``size[g]``), which spares sorting what no feasible selection keeps.
    ``device_scores``: the scores on an accelerator (see :class:`Problem`); the sort then runs there.
    """

    def __init__(self, scores: np.ndarray, group: np.ndarray, group_costs: np.ndarray,
                 limits: np.ndarray | None = None, device_scores: torch.Tensor | None = None):
        n_groups = group_costs.size
        full_size = np.bincount(group, minlength=n_groups)
        self.size = full_size if limits is None else np.minimum(full_size, limits)
        self.p = scores.size
        if device_scores is None:
            self.perm = _grouped_order(scores, group, self.size)  # layout position -> weight index
        else:
            self.perm = _grouped_order_on_device(device_scores, group, self.size)
        self.s_desc = scores[self.perm]
        self.prefix = np.concatenate([[0.0], np.cumsum(self.s_desc)])
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]])
        self.costs = group_costs
        self.by_cost = np.argsort(group_costs, kind="stable")
        self.max_score = float(scores.max())
        self._steps = [1 << j for j in reversed(range(int(self.size.max()).bit_length()))]

    def count_above(self, thresholds: np.ndarray) -> np.ndarray:
        """m (G,): number of scores of group g strictly above thresholds[g].

        A binary search in every group at once: O(log max_size) vectorised steps."""
        m = np.zeros_like(self.size)
        for step in self._steps:
            trial = np.minimum(m + step, self.size)
            above = (trial > m) & (self.s_desc[np.maximum(self.start + trial - 1, 0)] > thresholds)
            m = np.where(above, trial, m)
        return m

    def score_of(self, m: np.ndarray) -> float:
        """Σ of the kept scores of the prefix selection m."""
        return float((self.prefix[self.start + m] - self.prefix[self.start]).sum())

    def score_above(self, thresholds: np.ndarray) -> tuple[np.ndarray, float]:
        """(m, Σ kept scores) of the selection of every score above its group's threshold."""
        m = self.count_above(thresholds)
        return m, self.score_of(m)

    def tail_sums(self, m: np.ndarray, drops: np.ndarray, n: np.ndarray) -> np.ndarray:
        """(A, D): Σ of the n[a, d] least kept scores of group drops[d] (n ≤ m[drops])."""
        end = self.start[drops] + m[drops]
        return self.prefix[end] - self.prefix[end - n]

    def cost_of(self, m: np.ndarray) -> float:
        """Σ of the kept costs of the prefix selection m."""
        return float(self.costs @ m)

    def next_scores(self, m: np.ndarray) -> np.ndarray:
        """(G,): the best score each group has not kept yet; 0 where the group is used up."""
        left = m < self.size
        idx = np.minimum(self.start + m, self.s_desc.size - 1)
        return np.where(left, self.s_desc[idx], 0.0)

    def last_scores(self, m: np.ndarray) -> np.ndarray:
        """(G,): the worst score each group keeps; +inf where it keeps nothing."""
        idx = np.maximum(self.start + m - 1, 0)
        return np.where(m > 0, self.s_desc[idx], np.inf)

    def take_cheapest_first(self, available: np.ndarray, n: int) -> np.ndarray:
        """(G,): n items spread over groups with ``available`` (G,), cheapest groups first."""
        avail = available[self.by_cost]
        before = np.cumsum(avail) - avail
        take = np.empty_like(available)
        take[self.by_cost] = np.clip(n - before, 0, avail)
        return take

    def keep_mask(self, m: np.ndarray) -> np.ndarray:
        """(p,) bool in the original weight order for the prefix selection m."""
        offsets = np.repeat(self.start, m)
        within = np.arange(offsets.size) - np.repeat(np.cumsum(m) - m, m)
        keep = np.zeros(self.p, dtype=bool)
        keep[self.perm[offsets + within]] = True
        return keep
