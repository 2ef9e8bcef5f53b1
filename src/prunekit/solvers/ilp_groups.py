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
class CostGroups:
    """The costs in cost-group form, independent of the scores: built once and reused by every
    solve on the same costs (FALCON projects onto the same budgets at every first-order step).

    group_costs: (G,) float64.  sizes: (G,) int64, weights per group.  p: number of weights.
    total_cost: Σ of every weight's cost.  bounds: (G + 1,) when group g is the contiguous
    weights ``bounds[g]:bounds[g+1]`` (a network's layers in order): no per-weight array is then
    held or sorted.  ids: (p,) the group of each weight otherwise, in the smallest unsigned dtype
    that holds G (uint16 for up to 65,536 groups).
    """

    group_costs: np.ndarray
    sizes: np.ndarray
    p: int
    total_cost: float
    bounds: np.ndarray | None = None
    ids: np.ndarray | None = None

    @staticmethod
    def from_ids(group: np.ndarray, group_costs: np.ndarray) -> "CostGroups":
        sizes = np.bincount(group, minlength=group_costs.size)
        return CostGroups(group_costs, sizes, int(group.size), float(sizes @ group_costs),
                          ids=group.astype(_id_dtype(group_costs.size), copy=False))

    @staticmethod
    def from_costs(costs) -> "CostGroups":
        """Weights grouped by equal cost (``costs`` (p,) non-negative and finite)."""
        return CostGroups.from_ids(*groups_from_costs(finite_vector(costs, "costs_per_weight")))

    @staticmethod
    def from_layers(layer_slices: Sequence[slice], layer_costs, p: int) -> "CostGroups":
        """One group per layer (the slices must partition range(p), see ``groups_from_layers``)."""
        costs = finite_vector(layer_costs, "layer_costs")
        bounds = _contiguous_bounds(layer_slices, p)
        if bounds is None or len(layer_slices) != costs.size or costs.size > _LOOP_SORT_MAX_GROUPS:
            return CostGroups.from_ids(*groups_from_layers(layer_slices, costs, p))
        sizes = np.diff(bounds)
        return CostGroups(costs, sizes, p, float(sizes @ costs), bounds=bounds)

    def group(self) -> np.ndarray:
        """(p,) the group of each weight (materialised for the layer form)."""
        if self.ids is not None:
            return self.ids
        return np.repeat(np.arange(self.group_costs.size, dtype=_id_dtype(self.group_costs.size)), self.sizes)

    def counts(self, keep: np.ndarray) -> np.ndarray:
        """(G,) kept weights per group for ``keep`` (p,) bool."""
        if self.ids is not None:
            return np.bincount(self.ids[keep], minlength=self.group_costs.size)
        return np.array([np.count_nonzero(keep[a:b]) for a, b in zip(self.bounds[:-1], self.bounds[1:])],
                        dtype=np.int64)


def _id_dtype(n_groups: int):
    return np.uint16 if n_groups <= 1 << 16 else np.uint32 if n_groups <= 1 << 32 else np.int64


def _contiguous_bounds(layer_slices: Sequence[slice], p: int) -> np.ndarray | None:
    """(L + 1,) bounds when the slices are consecutive ranges covering range(p) in order, else None."""
    bounds = [0]
    for sl in layer_slices:
        if (not isinstance(sl, slice) or sl.step not in (None, 1) or not isinstance(sl.start, int)
                or not isinstance(sl.stop, int) or sl.start != bounds[-1] or sl.stop < sl.start):
            return None
        bounds.append(sl.stop)
    return np.array(bounds, dtype=np.int64) if bounds[-1] == p and len(bounds) > 1 else None


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


def _top_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """(q,) bool: the ``keep`` (< q) largest of ``values``, ties at the k-th value by position."""
    kth = torch.kthvalue(values, values.numel() - keep + 1).values      # the keep-th largest
    chosen = values > kth
    tied = torch.nonzero(values == kth).flatten()
    chosen[tied[: keep - int(chosen.sum())]] = True
    return chosen


def _descending(scores: np.ndarray, keep: int, values_out: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``keep`` largest of ``scores`` (q,) float64 (>= 0), largest first, ties by
    position. ``values_out``: (keep,) float64 to receive those scores in that order.

    One sort of 64-bit keys, each a score's leading bits (inverted: largest first) above its
    position (:func:`_key_order`), with NumPy's vectorised sort: 2-3x faster than torch's
    stable sort of the float64 scores (and its selection when ``keep`` < q) on 2 cores; scores
    that share their leading bits but differ further down are then put in order by a stable sort
    of the laid-out scores (nearly sorted: near-linear). Same result as :func:`_descending_torch`."""
    keep = min(keep, scores.size)
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    if scores.size >= _KEY_SORT_MAX:
        return _descending_torch(scores, keep, values_out)
    return _key_order(scores, keep, values_out)


_KEY_SORT_MAX = 1 << 31                 # positions in 31 bits: 33 leading bits of each score in the key


def _key_order(scores: np.ndarray, keep: int, values_out: np.ndarray | None) -> np.ndarray:
    """:func:`_descending` by one sort of keys (0 < ``keep``, ``scores.size`` < 2^31)."""
    n = scores.size
    shift = np.uint64(max(1, (n - 1).bit_length()))            # the position's bits
    low = np.uint64((1 << int(shift)) - 1)
    key = np.left_shift(scores.view(np.uint64), np.uint64(1))   # the 63 value bits at the top (-0.0 as +0.0:
                                                                # scores >= 0 order as their bits)
    np.invert(key, out=key)                                     # ascending key = descending score
    np.bitwise_and(key, ~low, out=key)                          # the leading 64 - shift of them ...
    np.bitwise_or(key, np.arange(n, dtype=np.uint64), out=key)  # ... above the position
    key.sort()
    # The first ``keep`` keys are the ``keep`` largest scores unless a run of equal leading bits
    # (scores that may differ below them) crosses the cut: take that run whole, sort, then cut.
    end = keep if keep == n else int(np.searchsorted(key, key[keep - 1] | low, side="right"))
    order = np.bitwise_and(key[:end], low, out=key[:end]).view(np.int64)
    values = values_out if values_out is not None and end == keep else np.empty(end)
    np.take(scores, order, out=values)
    del key
    if end > 1 and (values[1:] > values[:-1]).any():            # equal leading bits, out of order below
        np.negative(values, out=values)
        by_value = np.argsort(values, kind="stable")            # equal scores stay in position order
        order = order[by_value]
        values[...] = values[by_value]
        np.negative(values, out=values)
        del by_value
    if end > keep:
        order = order[:keep].copy()
        if values_out is not None:
            values_out[...] = values[:keep]
    return order


def _descending_torch(scores: np.ndarray, keep: int, values_out: np.ndarray | None = None) -> np.ndarray:
    """:func:`_descending` by torch's selection and stable sort (the reference; used when the
    positions need more than 31 bits)."""
    values = torch.from_numpy(scores)
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates = None                   # every score (a whole group): sorted in place of a copy
    if keep < values.numel():
        candidates = torch.nonzero(_top_mask(values, keep)).flatten()
        values = values[candidates]
    out = None if values_out is None else (torch.from_numpy(values_out), torch.empty(keep, dtype=torch.int64))
    order = torch.sort(values, descending=True, stable=True, out=out).indices
    return (order if candidates is None else candidates[order]).numpy()


WARM_MAX_DISORDER = 0.15
_DISORDER_SAMPLE = 1 << 16


def _descending_from(scores: np.ndarray, keep: int, previous: np.ndarray,
                     values_out: np.ndarray | None = None) -> np.ndarray | None:
    """:func:`_descending` (the same positions in the same order) started from ``previous``:
    distinct positions that an earlier sort of nearby scores put in descending order (FALCON's
    successive projections). The kept positions are laid out in that order, those it lacks
    appended, and sorted by NumPy's stable sort, a timsort that takes nearly linear time on
    nearly sorted input; equal scores are then put back in position order. None (sort cold)
    when, on a sample, more than ``WARM_MAX_DISORDER`` of neighbours in ``previous`` are out of
    order for the new scores: the runs are then too short for the warm start to pay."""
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    if previous.size < 2:
        return None
    pairs = np.linspace(0, previous.size - 2, min(previous.size - 1, _DISORDER_SAMPLE)).astype(np.int64)
    if np.count_nonzero(scores[previous[pairs + 1]] > scores[previous[pairs]]) > WARM_MAX_DISORDER * pairs.size:
        return None
    laid_out = previous
    if keep < scores.size or previous.size < scores.size:   # lay out the kept positions only, all of them
        chosen = np.ones(scores.size, dtype=bool) if keep >= scores.size else _top_mask(torch.from_numpy(scores), keep).numpy()
        laid_out = previous[chosen[previous]]
        chosen[previous] = False
        if chosen.any():
            laid_out = np.concatenate([laid_out, np.flatnonzero(chosen).astype(laid_out.dtype, copy=False)])
        del chosen
    values = np.empty(keep) if values_out is None else values_out   # the scores laid out, then sorted
    np.take(scores, laid_out, out=values)
    np.negative(values, out=values)                         # ascending: largest score first
    by_value = np.argsort(values, kind="stable")
    order = laid_out[by_value]
    del laid_out
    values[...] = values[by_value]
    del by_value
    np.negative(values, out=values)
    _ties_by_position(order, values)
    return order


def _ties_by_position(order: np.ndarray, values: np.ndarray) -> None:
    """Sort ``order`` ascending (in place) within each run of equal ``values`` (sorted); only the
    runs found out of order are touched."""
    new_run = np.empty(values.size, dtype=bool)
    new_run[0] = True
    np.not_equal(values[1:], values[:-1], out=new_run[1:])
    wrong = ~new_run[1:] & (order[1:] < order[:-1])
    if not wrong.any():
        return
    small = order.size < 2**31
    run = torch.cumsum(torch.from_numpy(new_run), 0, dtype=torch.int32 if small else torch.int64).numpy()
    in_wrong_run = np.zeros(int(run[-1]) + 1, dtype=bool)
    in_wrong_run[run[1:][wrong]] = True
    at = np.flatnonzero(in_wrong_run[run])
    if small:                           # (run, position) in one int64 key: a plain sort
        key = (run[at].astype(np.int64) << 32) | order[at]
        key.sort()
        order[at] = key & 0xFFFFFFFF
    else:
        order[at] = order[at][np.lexsort((order[at], run[at]))]


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


def _grouped_order(scores: np.ndarray, group, limits: np.ndarray, values_out: np.ndarray | None = None,
                   previous: "PreviousOrder | None" = None) -> np.ndarray:
    """(Σ limits,) weight indices: group 0's ``limits[0]`` best by descending score (ties by
    index), then group 1's, ... ``group``: (p,) group ids, or :class:`CostGroups` (whose layer
    form needs no per-weight sort at all: each group is a range of the weights). ``values_out``:
    (Σ limits,) float64 to receive the scores in that order (``scores[order]``). ``previous``: an
    earlier call's order on the same groups, to start each group's sort from (the same result).

    Sorting each group on its own is several times faster than one global sort at
    p ~ 1e7 (the blocks fit in cache); with very many groups one global sort is used.
    Indices are int32 when p allows (half the memory of int64).
    """
    if isinstance(group, CostGroups):
        if group.bounds is not None:
            out = _order_array(limits, scores.size, previous)
            at = 0
            for g, (a, b, keep) in enumerate(zip(group.bounds[:-1], group.bounds[1:], limits)):
                part = out[at:at + keep]
                part[...] = _sort_group(scores[a:b], int(keep), None if values_out is None else values_out[at:at + keep],
                                        None if previous is None else previous.of_group(g) - int(a))
                part += int(a)
                at += keep
            return out
        group = group.ids
    n_groups = limits.size
    small = group.astype(np.uint16, copy=False) if n_groups <= 1 << 16 else group  # 16-bit: radix sort
    sizes = np.bincount(group, minlength=n_groups)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    if n_groups > _LOOP_SORT_MAX_GROUPS:
        desc = torch.sort(torch.from_numpy(scores), descending=True, stable=True).indices.numpy()
        order = desc[np.argsort(small[desc], kind="stable")]
        rank_in_group = np.arange(order.size) - np.repeat(starts, sizes)
        order = order[rank_in_group < np.repeat(limits, sizes)]
        if values_out is not None:
            values_out[...] = scores[order]
        return order
    by_group = np.argsort(small, kind="stable")             # each group's weights in index order
    if previous is not None:                                 # weight -> its position among its group's
        position = np.empty(scores.size, dtype=_index_dtype(scores.size))
        position[by_group] = np.arange(scores.size) - np.repeat(starts, sizes)
    out = _order_array(limits, scores.size, previous)
    at = 0
    for g, (a, n, keep) in enumerate(zip(starts, sizes, limits)):
        members = by_group[a:a + n]
        out[at:at + keep] = members[_sort_group(scores[members], int(keep),
                                                None if values_out is None else values_out[at:at + keep],
                                                None if previous is None else position[previous.of_group(g)])]
        at += keep
    return out


def _order_array(limits: np.ndarray, p: int, previous: "PreviousOrder | None") -> np.ndarray:
    """The array the order is written to: the previous order's own when the layout is the same
    (each group's old order is read before its new one overwrites it: no second p-long array)."""
    if previous is not None and np.array_equal(previous.size, limits) and previous.perm.dtype == _index_dtype(p):
        return previous.perm
    return np.empty(int(limits.sum()), dtype=_index_dtype(p))


def _sort_group(scores: np.ndarray, keep: int, values_out: np.ndarray | None, previous: np.ndarray | None) -> np.ndarray:
    """:func:`_descending`, from the ``previous`` order of the group's positions when given."""
    order = None if previous is None else _descending_from(scores, keep, previous, values_out)
    return _descending(scores, keep, values_out) if order is None else order


@dataclass
class PreviousOrder:
    """The per-group order of the last solve on the same :class:`CostGroups`, for the next
    solve's sort to start from (FALCON's successive iterates change little): ``perm`` and
    ``size`` as in :class:`SortedGroups`, ``groups`` the grouping they are of (used only by a
    solve on that same object). Starts empty; each CPU solve given it writes its order there,
    over the previous one's array when the layout is the same (the last solve's
    :class:`SortedGroups` must no longer be in use then)."""

    perm: np.ndarray | None = None
    size: np.ndarray | None = None
    groups: object = None

    def of_group(self, g: int) -> np.ndarray:
        start = int(self.size[:g].sum())
        return self.perm[start:start + int(self.size[g])]


def _index_dtype(p: int):
    return np.int32 if p < 2**31 else np.int64


class SortedGroups:
    """Scores sorted in descending order within each cost group, with vectorised counting.

    ``group``: (p,) group ids, or the :class:`CostGroups` of the weights.
    A selection that keeps a prefix of every group is described by ``m`` (G,) int64, the
    number kept per group. The layout is group-major: group g occupies positions
    ``start[g] : start[g] + size[g]`` of ``s_desc``, and ``prefix`` holds the running sums of
    ``s_desc``. ``limits`` (G,), optional (see ``prefix_limits``): only the best ``limits[g]`` of
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
        if device_scores is None:       # layout position -> weight index, and the scores in that order
            self.s_desc = np.empty(int(self.size.sum()))
            warm = previous is not None and previous.perm is not None and previous.groups is group
            self.perm = _grouped_order(scores, group, self.size, values_out=self.s_desc,
                                       previous=previous if warm else None)
            if previous is not None:
                previous.perm, previous.size, previous.groups = self.perm, self.size, group
        else:
            ids = group.group() if isinstance(group, CostGroups) else group
            self.perm = _grouped_order_on_device(device_scores, ids, self.size)
            self.s_desc = scores[self.perm]
        self.prefix = np.empty(self.s_desc.size + 1)                 # [0, running sums of s_desc]
        self.prefix[0] = 0.0
        np.cumsum(self.s_desc, out=self.prefix[1:])
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
        """(p,) bool in the original weight order for the prefix selection m (group by group
        when there are few: no index array of the kept weights' size)."""
        keep = np.zeros(self.p, dtype=bool)
        if m.size <= _LOOP_SORT_MAX_GROUPS:
            for a, n in zip(self.start, m):
                keep[self.perm[a:a + n]] = True
            return keep
        offsets = np.repeat(self.start, m)
        within = np.arange(offsets.size) - np.repeat(np.cumsum(m) - m, m)
        keep[self.perm[offsets + within]] = True
        return keep
