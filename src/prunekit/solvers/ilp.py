"""The FLOP- and sparsity-constrained selection ILP at the heart of FALCON.

Given scores ``s`` (p,) with ``s_i >= 0`` and per-weight MAC costs ``c`` (p,) with
``c_i >= 0``, choose which weights to keep::

    maximise   Σ_i s_i z_i
    subject to Σ_i z_i     <= k        (count budget)
               Σ_i c_i z_i <= F        (FLOP budget)
               z ∈ {0, 1}^p

Costs are constant within a layer, so the weights fall into a few *cost groups*; within
a group every weight has the same price, and any optimal solution keeps a prefix of that
group's scores sorted in descending order. That is what makes the fast solver fast.

Fast solver (:func:`solve_flops_ilp`): Lagrangian relaxation of both budgets with
multipliers μ (FLOPs) and ν (count)::

    L(μ, ν) = Σ_i max(0, s_i - μ c_i - ν) + μ F + ν k        (μ, ν >= 0)

is an upper bound on the ILP optimum (and on its LP relaxation, whose optimum equals
min L) for every μ, ν >= 0. For fixed μ the best ν is the k-th largest reduced score
``s_i - μ c_i`` clipped at 0, and the maximiser T(μ) is the top-k of the positive reduced
scores; g(μ) = min_ν L(μ, ν) is convex with subgradient F - cost(T(μ)), so cost(T(μ)) is
non-increasing in μ and bisection on "T(μ) is within the FLOP budget" brackets the
minimiser μ*. Rounding starts from both sides of the kink at μ*: T(μ_hi), which fits, and
T(μ_lo) with its least score-per-MAC weights dropped until it fits; each is completed by a
greedy fill and improving exchanges, and the better is kept. The LP optimum has at most
two fractional weights, so rounding loses about two weights' score at most; the report
carries the certified gap.

Exact reference: ``solvers.ilp_exact.solve_flops_ilp_exact`` (HiGHS), for tests and benchmarks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from prunekit.errors import PrunekitError

__all__ = ["ILPResult", "solve_flops_ilp"]

_TINY = 1e-300


@dataclass(frozen=True)
class ILPResult:
    """A feasible selection with a certified bound on how far it is from optimal.

    Attributes:
        keep: (p,) bool tensor, on the device of ``scores``; ``count <= max_count`` and
            ``cost <= max_cost`` always hold.
        primal: Σ s_i over kept weights.
        dual_bound: an upper bound on the ILP optimum (up to float64 rounding).
        gap: (dual_bound - primal) / max(dual_bound, tiny); 0 means provably optimal.
        count: number of kept weights.
        cost: Σ c_i over kept weights.
        seconds: wall-clock time of the solve, input checks included.
        info: solver details (multipliers, iteration counts, HiGHS status, ...).
    """

    keep: torch.Tensor
    primal: float
    dual_bound: float
    gap: float
    count: int
    cost: float
    seconds: float
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class _Problem:
    """The ILP in cost-group form.

    scores: (p,) float64, >= 0.  group: (p,) int64 in [0, G).  group_costs: (G,) float64.
    max_count / max_cost are clipped to p / total cost (equivalent constraints).
    """

    scores: np.ndarray
    group: np.ndarray
    group_costs: np.ndarray
    max_count: int
    max_cost: float

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


def _finite_vector(x, name: str) -> np.ndarray:
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


def _groups_from_costs(costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group weights by equal cost: returns (group (p,) int64, group_costs (G,))."""
    group_costs, group = np.unique(costs, return_inverse=True)
    return group.astype(np.int64), group_costs


def _groups_from_layers(layer_slices: Sequence[slice], layer_costs, p: int) -> tuple[np.ndarray, np.ndarray]:
    """One group per layer: returns (group (p,) int64, group_costs (L,)).

    The slices must partition range(p) (any order, step 1).
    """
    costs = _finite_vector(layer_costs, "layer_costs")
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


def _parse_problem(scores, costs_per_weight, layer_slices, layer_costs, max_count, max_cost) -> _Problem:
    """Validate the user's input and put it in cost-group form."""
    s = _finite_vector(scores, "scores")
    p = s.size
    if costs_per_weight is not None and (layer_slices is not None or layer_costs is not None):
        raise PrunekitError("pass either costs_per_weight or layer_slices + layer_costs, not both.")
    if costs_per_weight is not None:
        c = _finite_vector(costs_per_weight, "costs_per_weight")
        if c.size != p:
            raise PrunekitError(f"costs_per_weight has {c.size} entries but scores has {p}; they must match.")
        group, group_costs = _groups_from_costs(c)
    elif layer_slices is not None and layer_costs is not None:
        group, group_costs = _groups_from_layers(layer_slices, layer_costs, p)
    else:
        raise PrunekitError("give the costs: costs_per_weight (p,), or both layer_slices and layer_costs.")
    if isinstance(max_count, bool) or not float(max_count).is_integer() or max_count < 0:
        raise PrunekitError(f"max_count must be a non-negative integer, got {max_count!r}.")
    if math.isnan(max_cost) or max_cost < 0:
        raise PrunekitError(f"max_cost must be a non-negative number of MACs, got {max_cost!r}.")
    total_cost = float(np.bincount(group, minlength=group_costs.size) @ group_costs)
    return _Problem(s, group, group_costs, min(int(max_count), p), min(float(max_cost), total_cost))


# --------------------------------------------------------------------------- fast solver


_LOOP_SORT_MAX_GROUPS = 1024


def _grouped_order(scores: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """(p,) permutation listing group 0's weights by descending score, then group 1's, ...

    Sorting each group on its own is several times faster than one global sort at
    p ~ 1e7 (the blocks fit in cache); with very many groups one global sort is used.
    """
    small = group.astype(np.uint16) if n_groups <= 1 << 16 else group  # 16-bit: radix sort
    if n_groups > _LOOP_SORT_MAX_GROUPS:
        desc = np.argsort(-scores)
        return desc[np.argsort(small[desc], kind="stable")]
    order = np.argsort(small, kind="stable")
    bounds = np.cumsum(np.bincount(group, minlength=n_groups))
    for a, b in zip(np.r_[0, bounds[:-1]], bounds):
        block = order[a:b]
        order[a:b] = block[np.argsort(-scores[block])]
    return order


class _SortedGroups:
    """Scores sorted in descending order within each cost group, with vectorised counting.

    A selection that keeps a prefix of every group is described by ``m`` (G,) int64, the
    number kept per group. The layout is group-major: group g occupies positions
    ``start[g] : start[g] + size[g]`` of ``s_desc`` (p,), and ``prefix`` (p + 1,) holds
    the running sums of ``s_desc``.
    """

    def __init__(self, scores: np.ndarray, group: np.ndarray, group_costs: np.ndarray):
        n_groups = group_costs.size
        self.perm = _grouped_order(scores, group, n_groups)  # layout position -> weight index
        self.s_desc = scores[self.perm]
        self.prefix = np.concatenate([[0.0], np.cumsum(self.s_desc)])
        self.size = np.bincount(group, minlength=n_groups)
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
        keep = np.zeros(self.perm.size, dtype=bool)
        keep[self.perm[offsets + within]] = True
        return keep


@dataclass(frozen=True)
class _Point:
    """The Lagrangian at one μ: multipliers, the maximiser T(μ) as prefix counts m (G,),
    its cost, and g(μ) = L(μ, ν(μ))."""

    mu: float
    nu: float
    m: np.ndarray
    cost: float
    dual: float


class _Lagrangian:
    """g(μ) = min_ν L(μ, ν) and its maximiser T(μ) for one problem."""

    def __init__(self, groups: _SortedGroups, max_count: int, max_cost: float):
        self.groups, self.k, self.F = groups, max_count, max_cost
        self.evaluations = 0

    def top_k(self, mu: float) -> tuple[float, np.ndarray]:
        """(ν, m): ν = the k-th largest reduced score s_i - μ c_i clipped at 0, and m (G,)
        the top-k positive reduced scores (ties go to the cheapest groups).

        Bisection on the threshold t until exactly k reduced scores exceed it, or until t
        cannot be split further in float64 (then the remaining candidates tie).
        """
        shift = mu * self.groups.costs
        m_lo = self.groups.count_above(shift)
        if m_lo.sum() <= self.k:
            return 0.0, m_lo
        lo, hi = 0.0, self.groups.max_score
        m_hi = np.zeros_like(m_lo)
        while m_lo.sum() > self.k:  # invariant: count(> lo) >= k > count(> hi)
            mid = lo + 0.5 * (hi - lo)
            if not lo < mid < hi:
                extra = self.groups.take_cheapest_first(m_lo - m_hi, self.k - int(m_hi.sum()))
                return lo, m_hi + extra
            m_mid = self.groups.count_above(mid + shift)
            if m_mid.sum() >= self.k:
                lo, m_lo = mid, m_mid
            else:
                hi, m_hi = mid, m_mid
        return lo, m_lo

    def value(self, mu: float, nu: float) -> float:
        """L(μ, ν) = μF + νk + Σ_i max(0, s_i - μ c_i - ν): an upper bound for any μ, ν >= 0."""
        theta = nu + mu * self.groups.costs
        m, score = self.groups.score_above(theta)
        positive_part = score - float(theta @ m)
        return mu * self.F + nu * self.k + positive_part

    def at(self, mu: float) -> _Point:
        """Evaluate the dual function and its maximiser at μ."""
        self.evaluations += 1
        nu, m = self.top_k(mu)
        return _Point(mu, nu, m, self.groups.cost_of(m), self.value(mu, nu))


def _bracket_mu(lagr: _Lagrangian, tol: float) -> tuple[_Point, _Point]:
    """(lo, hi) with μ_lo <= μ* <= μ_hi, T(μ_hi) within the FLOP budget and T(μ_lo) over it
    (lo is hi when μ* = 0). Stops when the two selections differ by at most two weights
    (one swap across a single kink of g), or when the bracket is narrower than tol·μ_hi."""
    lo = lagr.at(0.0)
    if lo.cost <= lagr.F:
        return lo, lo
    positive_costs = lagr.groups.costs[lagr.groups.costs > 0]
    # Beyond this μ no weight with a positive cost has a positive reduced score.
    hi = lagr.at(2.0 * lagr.groups.max_score / positive_costs.min())
    while np.abs(lo.m - hi.m).sum() > 2 and hi.mu - lo.mu > tol * hi.mu:
        mid = 0.5 * (lo.mu + hi.mu)
        if not lo.mu < mid < hi.mu:
            break
        point = lagr.at(mid)
        if point.cost <= lagr.F:
            hi = point
        else:
            lo = point
    return lo, hi


def _kink(lo: _Point, hi: _Point, F: float) -> float:
    """μ where the supporting lines of g at lo and hi meet (the minimiser if one kink lies between)."""
    slope_lo, slope_hi = F - lo.cost, F - hi.cost  # < 0 and >= 0
    mu = (hi.dual - lo.dual + slope_lo * lo.mu - slope_hi * hi.mu) / (slope_lo - slope_hi)
    return float(np.clip(mu, lo.mu, hi.mu))


def _greedy_fill(groups: _SortedGroups, m: np.ndarray, k: int, F: float) -> np.ndarray:
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


def _drop_to_budget(groups: _SortedGroups, m: np.ndarray, F: float) -> np.ndarray:
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
    groups: _SortedGroups, m: np.ndarray, k: int, F: float, width: int = 256
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


def _local_search(groups: _SortedGroups, m: np.ndarray, k: int, F: float, max_rounds: int = 1000) -> np.ndarray:
    """Greedy fill, then improving exchanges (each followed by a fill) until none is left
    or ``max_rounds`` is reached (each round strictly raises the score)."""
    m = _greedy_fill(groups, m, k, F)
    for _ in range(max_rounds):
        gain, g, h, n = _best_exchange(groups, m, k, F)
        if not gain > 0:
            break
        trial = m.copy()
        trial[g] += 1
        trial[h] -= n
        if groups.cost_of(trial) > F or trial.sum() > k:  # float rounding at the budget's edge
            break
        m = _greedy_fill(groups, trial, k, F)
    return m


@dataclass(frozen=True)
class _Solution:
    """A solver's answer before packaging: keep (p,) bool, its score, an upper bound."""

    keep: np.ndarray
    primal: float
    dual: float
    info: dict


def _solve_lagrangian(prob: _Problem, tol: float) -> _Solution:
    """The fast solver on a validated problem (see :func:`solve_flops_ilp`)."""
    if prob.max_count == 0 or not (prob.scores > 0).any():
        return _Solution(np.zeros(prob.scores.size, dtype=bool), 0.0, 0.0, {"method": "trivial"})
    start = time.perf_counter()
    groups = _SortedGroups(prob.scores, prob.group, prob.group_costs)
    setup_seconds = time.perf_counter() - start
    m, dual, info = _round_lagrangian(groups, prob.max_count, prob.max_cost, tol)
    info["setup_seconds"] = setup_seconds
    keep = groups.keep_mask(m)
    primal = float(prob.scores[keep].sum())
    # The bound is exact up to float64 rounding; never report it below a feasible value.
    return _Solution(keep, primal, max(dual, primal), info)


def _round_lagrangian(groups: _SortedGroups, max_count: int, max_cost: float, tol: float) -> tuple[np.ndarray, float, dict]:
    """(m, dual bound, info): the multiplier search and the rounding, on prefix counts m (G,)."""
    lagr = _Lagrangian(groups, max_count, max_cost)
    lo, hi = _bracket_mu(lagr, tol)
    dual = min(lo.dual, hi.dual)
    if lo is not hi:
        dual = min(dual, lagr.at(_kink(lo, hi, max_cost)).dual)

    # Round from both sides of the kink: T(μ_hi), and T(μ_lo) cut down to the FLOP budget.
    starts = [hi.m] if lo is hi else [hi.m, _drop_to_budget(groups, lo.m, max_cost)]
    m = max((_local_search(groups, m0, max_count, max_cost) for m0 in starts), key=groups.score_of)
    info = {
        "method": "lagrangian",
        "mu": float(hi.mu),
        "nu": float(hi.nu),
        "mu_bracket": (float(lo.mu), float(hi.mu)),
        "dual_evaluations": lagr.evaluations,
        "groups": int(groups.costs.size),
    }
    return m, dual, info


def _package(prob: _Problem, sol: _Solution, device: torch.device, start: float) -> ILPResult:
    count, cost = prob.count_and_cost(sol.keep)
    return ILPResult(
        keep=torch.from_numpy(sol.keep).to(device),
        primal=sol.primal,
        dual_bound=sol.dual,
        gap=max(sol.dual - sol.primal, 0.0) / max(abs(sol.dual), _TINY),
        count=count,
        cost=cost,
        seconds=time.perf_counter() - start,
        info=sol.info,
    )


def _device_of(scores) -> torch.device:
    return scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu")


def solve_flops_ilp(
    scores: torch.Tensor,
    costs_per_weight: torch.Tensor | None = None,
    *,
    layer_slices: Sequence[slice] | None = None,
    layer_costs: Sequence[float] | torch.Tensor | None = None,
    max_count: int,
    max_cost: float,
    tol: float = 1e-12,
) -> ILPResult:
    """Solve the FLOP + count budgeted selection ILP by Lagrangian duality (fast, certified).

    Args:
        scores: (p,) non-negative importance of each weight (e.g. squared magnitudes).
        costs_per_weight: (p,) non-negative MACs of each weight; or instead
        layer_slices: L slices partitioning range(p), with
        layer_costs: (L,) the MACs of every weight in each layer.
        max_count: k, the most weights to keep.
        max_cost: F, the most MACs the kept weights may cost (``inf`` for no FLOP budget).
        tol: the μ-bisection stops once its bracket is narrower than ``tol * μ``.

    Returns:
        :class:`ILPResult`; ``dual_bound`` is the least g(μ) evaluated, so the ILP (and LP)
        optimum lies in ``[primal, dual_bound]``.

    Cost: one O(p log p) sort, then O(G log p) per dual evaluation (G = cost groups),
    about 30-60 evaluations of ~30-60 threshold counts each.

    Raises:
        PrunekitError: on negative or non-finite scores or costs, mismatched sizes,
            slices that do not partition the scores, or negative budgets.
    """
    start = time.perf_counter()
    prob = _parse_problem(scores, costs_per_weight, layer_slices, layer_costs, max_count, max_cost)
    return _package(prob, _solve_lagrangian(prob, tol), _device_of(scores), start)
