"""The costs of a selection ILP in cost-group form: the p weights fall into G groups of equal
cost (a network's layers), built once and reused by every solve on the same costs; and the
checks of the vectors a solver is given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prunekit.errors import PrunekitError

LOOP_SORT_MAX_GROUPS = 1024             # up to this many groups each is handled on its own, in a loop


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
        if bounds is None or len(layer_slices) != costs.size or costs.size > LOOP_SORT_MAX_GROUPS:
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

def finite_vector(x, name: str) -> np.ndarray:
    """``x`` (tensor or array-like) as a 1-D float64 array of finite, non-negative values
    (a :class:`Squares`, checked when made, is returned as it is)."""
    if isinstance(x, Squares):
        return x
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


class Squares:
    """Scores given as the squares of ``roots`` (p,) float32 or float64 (a weight vector, held
    as it is: no p-long float64 copy), each square computed in float64 when it is read: exact
    for float32 roots, and bit for bit the square an eager ``roots.double() ** 2`` makes in
    either case. Reads like the scores array it stands for: ``size``, ``max()``, ``[index]``
    (a slice, index or bool array: float64 squares), ``np.asarray`` (the whole, materialised)."""

    def __init__(self, roots: np.ndarray):
        if roots.ndim != 1 or roots.dtype not in (np.float32, np.float64):
            raise PrunekitError("Squares takes a 1-D float32 or float64 vector; flatten or convert it first.")
        self.roots = roots
        self.size = int(roots.size)
        top = max(abs(float(roots.max())), abs(float(roots.min()))) if roots.size else 0.0
        if not np.isfinite(top) or not np.isfinite(top * top):
            raise PrunekitError("scores contains NaN or infinite values (or squares beyond float64); pass finite numbers.")
        self._max = top * top

    def __getitem__(self, index) -> np.ndarray:
        r = self.roots[index].astype(np.float64)
        return np.multiply(r, r, out=r)

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def max(self) -> float:
        return self._max

    def any_positive(self) -> bool:
        return self._max > 0


def any_positive(scores) -> bool:
    """Whether any score is > 0 (``scores`` non-negative: an array or :class:`Squares`)."""
    return scores.any_positive() if isinstance(scores, Squares) else bool((scores > 0).any())


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
