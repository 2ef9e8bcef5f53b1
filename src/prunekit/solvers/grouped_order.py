"""The scores of every cost group in descending order, group after group: the layout of
:class:`~prunekit.solvers.ilp_groups.SortedGroups`, sorted per group (on the CPU, optionally from
the previous solve's order) or on the scores' accelerator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cost_groups import LOOP_SORT_MAX_GROUPS, CostGroups
from .descending import descending, descending_from


def grouped_order_on_device(scores: torch.Tensor, group: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """:func:`grouped_order` (the same order, ties by index) with the sorts on the device of
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


def grouped_order(scores: np.ndarray, group, limits: np.ndarray,
                  previous: "PreviousOrder | None" = None) -> np.ndarray:
    """(Σ limits,) weight indices: group 0's ``limits[0]`` best by descending score (ties by
    index), then group 1's, ... ``group``: (p,) group ids, or :class:`CostGroups` (whose layer
    form needs no per-weight sort at all: each group is a range of the weights). ``previous``: an
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
                part[...] = _sort_group(scores[a:b], int(keep),
                                        None if previous is None else previous.of_group(g) - int(a))
                part += int(a)
                at += keep
            return out
        group = group.ids
    n_groups = limits.size
    small = group.astype(np.uint16, copy=False) if n_groups <= 1 << 16 else group  # 16-bit: radix sort
    sizes = np.bincount(group, minlength=n_groups)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    if n_groups > LOOP_SORT_MAX_GROUPS:
        scores = np.asarray(scores)                          # a Squares materialised (float64)
        desc = torch.sort(torch.from_numpy(scores), descending=True, stable=True).indices.numpy()
        order = desc[np.argsort(small[desc], kind="stable")]
        rank_in_group = np.arange(order.size) - np.repeat(starts, sizes)
        return order[rank_in_group < np.repeat(limits, sizes)]
    by_group = np.argsort(small, kind="stable")             # each group's weights in index order
    if previous is not None:                                 # weight -> its position among its group's
        position = np.empty(scores.size, dtype=_index_dtype(scores.size))
        position[by_group] = np.arange(scores.size) - np.repeat(starts, sizes)
    out = _order_array(limits, scores.size, previous)
    at = 0
    for g, (a, n, keep) in enumerate(zip(starts, sizes, limits)):
        members = by_group[a:a + n]
        out[at:at + keep] = members[_sort_group(scores[members], int(keep),
                                                None if previous is None else position[previous.of_group(g)])]
        at += keep
    return out


def _order_array(limits: np.ndarray, p: int, previous: "PreviousOrder | None") -> np.ndarray:
    """The array the order is written to: the previous order's own when the layout is the same
    (each group's old order is read before its new one overwrites it: no second p-long array)."""
    if previous is not None and np.array_equal(previous.size, limits) and previous.perm.dtype == _index_dtype(p):
        return previous.perm
    return np.empty(int(limits.sum()), dtype=_index_dtype(p))


def _sort_group(scores: np.ndarray, keep: int, previous: np.ndarray | None) -> np.ndarray:
    """:func:`descending`, from the ``previous`` order of the group's positions when given."""
    order = None if previous is None else descending_from(scores, keep, previous)
    return descending(scores, keep) if order is None else order


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
