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

This module holds the entry point and the multiplier search; the input in cost-group form and
its sorted prefix view are in ``solvers.ilp_groups`` (the costs' groups in ``solvers.cost_groups``,
the per-group sorts in ``solvers.grouped_order`` and ``solvers.descending``), the rounding in
``solvers.ilp_rounding``.
Exact reference: ``solvers.ilp_exact.solve_flops_ilp_exact`` (HiGHS), for tests and benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .cost_groups import CostGroups, Squares, any_positive
from .grouped_order import PreviousOrder
from .ilp_groups import TINY, Problem, SortedGroups, parse_problem, prefix_limits
from .ilp_rounding import drop_to_budget, local_search

__all__ = ["ILPResult", "Squares", "solve_flops_ilp"]


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


def solve_flops_ilp(
    scores: torch.Tensor,
    costs_per_weight: torch.Tensor | None = None,
    *,
    layer_slices: Sequence[slice] | None = None,
    layer_costs: Sequence[float] | torch.Tensor | None = None,
    cost_groups: CostGroups | None = None,
    max_count: int,
    max_cost: float,
    tol: float = 1e-12,
    previous_order: PreviousOrder | None = None,
) -> ILPResult:
    """Solve the FLOP + count budgeted selection ILP by Lagrangian duality (fast, certified).

    Args:
        scores: (p,) non-negative importance of each weight (e.g. squared magnitudes); or a
            :class:`~prunekit.solvers.cost_groups.Squares` of a float32/float64 weight vector (on
            the CPU): the squares, computed where read, never held whole.
        costs_per_weight: (p,) non-negative MACs of each weight; or instead
        layer_slices: L slices partitioning range(p), with
        layer_costs: (L,) the MACs of every weight in each layer; or instead
        cost_groups: either of them already in cost-group form
            (:meth:`~prunekit.solvers.cost_groups.CostGroups.from_costs` / ``from_layers``): for
            many solves on the same costs (FALCON's projections), which then skip grouping them.
        max_count: k, the most weights to keep.
        max_cost: F, the most MACs the kept weights may cost (``inf`` for no FLOP budget).
        tol: the μ-bisection stops once its bracket is narrower than ``tol * μ``.
        previous_order: a :class:`~prunekit.solvers.grouped_order.PreviousOrder` shared by successive
            solves on the same costs: each sorts its scores starting from the last one's order
            (the same result; faster when the scores changed little) and leaves its own there.

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
    prob = parse_problem(scores, costs_per_weight, layer_slices, layer_costs, max_count, max_cost, cost_groups)
    return package(prob, solve_lagrangian(prob, tol, previous_order), device_of(scores), start)


@dataclass(frozen=True)
class Solution:
    """A solver's answer before packaging: keep (p,) bool, its score, an upper bound."""

    keep: np.ndarray
    primal: float
    dual: float
    info: dict


def solve_lagrangian(prob: Problem, tol: float, previous_order: PreviousOrder | None = None) -> Solution:
    """The fast solver on a validated problem (see :func:`solve_flops_ilp`)."""
    if prob.max_count == 0 or not any_positive(prob.scores):
        return Solution(np.zeros(prob.scores.size, dtype=bool), 0.0, 0.0, {"method": "trivial"})
    start = time.perf_counter()
    limits = prefix_limits(prob.cost_groups.sizes, prob.group_costs, prob.max_count, prob.max_cost)
    groups = SortedGroups(prob.scores, prob.cost_groups, prob.group_costs, limits, prob.device_scores,
                          previous_order)
    setup_seconds = time.perf_counter() - start
    m, dual, info = round_lagrangian(groups, prob.max_count, prob.max_cost, tol)
    info["setup_seconds"] = setup_seconds
    keep = groups.keep_mask(m)
    del groups                          # its order (4 bytes a weight) before the kept scores' copy
    primal = float(prob.scores[keep].sum())
    # The bound is exact up to float64 rounding; never report it below a feasible value.
    return Solution(keep, primal, max(dual, primal), info)


def round_lagrangian(groups: SortedGroups, max_count: int, max_cost: float, tol: float) -> tuple[np.ndarray, float, dict]:
    """(m, dual bound, info): the multiplier search and the rounding, on prefix counts m (G,)."""
    lagr = _Lagrangian(groups, max_count, max_cost)
    lo, hi = _bracket_mu(lagr, tol)
    dual = min(lo.dual, hi.dual)
    if lo is not hi:
        dual = min(dual, lagr.at(_kink(lo, hi, max_cost)).dual)

    # Round from both sides of the kink: T(μ_hi), and T(μ_lo) cut down to the FLOP budget.
    starts = [hi.m] if lo is hi else [hi.m, drop_to_budget(groups, lo.m, max_cost)]
    m = max((local_search(groups, m0, max_count, max_cost) for m0 in starts), key=groups.score_of)
    info = {
        "method": "lagrangian",
        "mu": float(hi.mu),
        "nu": float(hi.nu),
        "mu_bracket": (float(lo.mu), float(hi.mu)),
        "dual_evaluations": lagr.evaluations,
        "groups": int(groups.costs.size),
    }
    return m, dual, info


def package(prob: Problem, sol: Solution, device: torch.device, start: float) -> ILPResult:
    count, cost = prob.count_and_cost(sol.keep)
    return ILPResult(
        keep=torch.from_numpy(sol.keep).to(device),
        primal=sol.primal,
        dual_bound=sol.dual,
        gap=max(sol.dual - sol.primal, 0.0) / max(abs(sol.dual), TINY),
        count=count,
        cost=cost,
        seconds=time.perf_counter() - start,
        info=sol.info,
    )


def device_of(scores) -> torch.device:
    return scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu")


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

    def __init__(self, groups: SortedGroups, max_count: int, max_cost: float):
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
