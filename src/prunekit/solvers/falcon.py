"""FALCON: the quadratic model under a count *and* a MAC budget.

Meng, Benbaki, Chen, Hazimeh, Ponomareva, Zhao, Mazumder, "FALCON: FLOP-Aware Combinatorial
Optimization for Neural Network Pruning", AISTATS 2024 (arXiv 2403.07094). With Q the quadratic
model and c_i the MACs weight i costs, the problem is

    minimise Q(w)   subject to   ‖w‖₀ ≤ k,   Σ_i c_i·1[w_i ≠ 0] ≤ F.

The projection onto that set, for a point v, keeps the support maximising Σ v_i² under both
budgets: the ILP of :mod:`prunekit.solvers.ilp`.

* variant "magnitude" (the published release): support = ILP on w̄², then backsolve on it.
* variant "dfo" (the paper's discrete first-order method): from that point, repeat
  w ← backsolve(ILP-support of (w − η∇Q(w))²), with a step-size search that accepts a new point
  only if Q decreases (searched on log η: a step too short to change the support is lengthened,
  one that brings in too many new weights or raises Q is shortened); stop when no step size
  decreases Q (a stall), when the decrease is negligible, or after ``max_iter``.

``score="saliency"`` ranks weights by the quadratic model's own cost of removing each one alone
(OBD-style: d_j·v_j² with d = diag(XᵀX/n) + λ) instead of v_j²: the projection is then taken in
the metric of the model's diagonal, and the first-order step is w − η·∇Q/d to match. With rows
taken with BatchNorm on batch statistics, d_j·w_j² does not change when a layer followed by
BatchNorm is rescaled (its gradients scale inversely), whereas |w_j| does.

Either way the support always meets both budgets (the ILP's primal is feasible) and the result
is never worse than the "magnitude" point.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import PrunekitError
from .backsolve import GramCache, backsolve_blockwise, backsolve_with_parts, updated_gram
from .ilp import solve_flops_ilp
from .cost_groups import CostGroups
from .grouped_order import PreviousOrder
from .quadratic import QuadraticModel, check_k
from .sliced_ilp import slice_cost_groups, sliced_cost_groups, solve_sliced_flops_ilp
from .result import Solution

VARIANTS = ("dfo", "magnitude")
SCORES = ("magnitude", "saliency")


def fisher_diagonal(q: QuadraticModel) -> torch.Tensor:
    """d = diag(XᵀX/n) + λ, (p,) float64 on X's device: Q's curvature along each weight
    (X read by column blocks, so a compact X is never converted whole)."""
    total = torch.empty(q.width, dtype=torch.float64, device=q.X.device)
    for block, columns in q.column_blocks():
        total[block] = columns.double().square().sum(0)
    return total / q.n + q.ridge


def falcon(q: QuadraticModel, macs_per_weight: torch.Tensor, k: int, max_macs: float, *,
           variant: str = "dfo", max_iter: int = 10, max_search: int = 20, tol: float = 1e-4,
           max_change_share: float = 0.01,
           block_size: int | None = None, score: str = "magnitude",
           score_weights: torch.Tensor | None = None, gram_cache: GramCache | None = None) -> Solution:
    """A w meeting both budgets with small Q.

    q:               the quadratic model (p weights).
    macs_per_weight: c, (p,) MACs each weight costs (≥ 0).
    k:               most nonzeros; max_macs: F, most Σ c_i over nonzeros.
    variant:         "dfo" or "magnitude" (see the module docstring).
    max_iter:        first-order iterations (each costs one or more backsolves);
    max_search:      step sizes tried per iteration (each costs one ILP solve).
    tol:             stop once an iteration lowers Q by less than tol·|Q|.
    max_change_share: a step may bring at most this share of k new entries into the support.
    block_size:      backsolve in independent blocks (large p).
    score:           "magnitude" (v²) or "saliency" (d·v², see the module docstring).
    score_weights:   (p,) > 0, multiplies every weight's score in the projection (a per-layer
                     exchange rate, see ``solvers.layer_search``); None: 1.
    gram_cache:      the Gram matrix of the support a previous call on the same ``q`` ended on;
                     the first backsolve updates it rather than computing a new one, and the
                     cache is left holding this call's final support (many calls on nearby
                     supports, e.g. the layer search's trials).
    """
    start = time.perf_counter()
    if variant not in VARIANTS:
        raise PrunekitError(f"unknown FALCON variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if score not in SCORES:
        raise PrunekitError(f"unknown FALCON support score {score!r}; choose one of {', '.join(SCORES)}")
    k = check_k(k)
    costs = macs_per_weight                 # in its own dtype: grouped once below, never copied whole
    if costs.shape != (q.p,):
        raise PrunekitError(f"macs_per_weight must have shape ({q.p},), got {tuple(costs.shape)}")
    if score_weights is not None:
        if score_weights.shape != (q.p,) or not bool((score_weights > 0).all()):
            raise PrunekitError(f"score_weights must be ({q.p},) and > 0")
        score_weights = score_weights.to(device=costs.device, dtype=torch.float64)
    q = q.sliced()            # every (p,) vector below is this process's slice (all of it for one)
    costs = q.local_part(costs)
    if score_weights is not None:
        score_weights = q.local_part(score_weights)

    gaps: list[float] = []
    solve_ilp = _projection_ilp(q, costs, k, float(max_macs))
    del costs
    metric = fisher_diagonal(q) if score == "saliency" else None

    def project(v: torch.Tensor) -> torch.Tensor:
        value = v.double()                  # a fresh float64 copy (v is float32 or float64: see below)
        if value.data_ptr() == v.data_ptr():
            value = value.clone()
        value.square_()                     # in place: the same values as v.double() ** 2
        if metric is not None:
            value.mul_(metric)
        if score_weights is not None:
            value.mul_(score_weights)
        result = solve_ilp(value)
        del value
        gaps.append(result.gap)
        return result.keep

    # (support, X_S X_Sᵀ, updates since a fresh Gram) of the current point, for cheap updates
    current: list = [None if gram_cache is None or block_size is not None else gram_cache.base(q.w_bar)]
    latest: list = [None]         # the same for the last support solved

    def solve_on(support: torch.Tensor) -> torch.Tensor:
        if block_size is not None:
            return backsolve_blockwise(q, support, block_size)
        gram, chain = None, 0
        if current[0] is not None and current[0][1] is not None and current[0][2] < GramCache.MAX_CHAIN:
            old_support, old_gram, old_chain = current[0]
            size, changed = q.count(support), q.count(support ^ old_support)
            if changed < size // 4 and size > q.n:
                added = (support & ~old_support).nonzero().squeeze(1)
                removed = (old_support & ~support).nonzero().squeeze(1)
                gram, chain = updated_gram(q, old_gram, added, removed), old_chain + 1
        w, parts = backsolve_with_parts(q, support, gram)
        latest[0] = (support, None if parts is None else parts[0], chain)
        return w

    support = project(q.w_bar)
    w = solve_on(support)
    current[0] = latest[0]
    f = q.objective(w)
    info = {"variant": variant, "score": score, "magnitude_objective": f, "accepted": 0, "trials": 0, "stalled": False}
    iterations = 0
    if variant == "dfo":
        max_changes = max(1, int(max_change_share * k))
        # log2 of a step known not to move the support (in the metric's units)
        log_eta = -math.log2(q.lipschitz() / (1.0 if metric is None else -q.largest(-metric)))
        for iterations in range(1, max_iter + 1):
            grad = q.gradient(w) if metric is None else q.gradient(w) / metric.to(w.dtype)
            accepted, log_eta = _support_changing_step(q, project, solve_on, w, f, support, grad,
                                                      log_eta, max_changes, max_search, info)
            if accepted is None:
                info["stalled"] = True
                break
            decrease = f - accepted[1]
            w, f, support = accepted
            current[0] = latest[0]                 # the accepted support was the last solved
            if decrease < tol * abs(f):
                break
    info["max_ilp_gap"] = max(gaps)
    if gram_cache is not None and current[0] is not None and current[0][1] is not None:
        gram_cache.support, gram_cache.gram, gram_cache.chain = current[0]
    # How much of Q is the ridge: with n ≪ p the data term ‖X(w−w̄)‖²/2n sees only n directions and
    # λ‖w−w̄‖²/2 (whose best support is the largest |w̄|) the rest, so a share near 1 means the
    # model cannot prefer any support much over magnitude's.
    delta = w - q.w_bar
    info["ridge_share"] = q.ridge / 2 * q.total(float(delta.double().square().sum())) / f if f > 0 else 0.0
    w = q.to_global(w)                         # the one exchange of p values, at the end
    return Solution(w=w, objective=f, support_size=int(torch.count_nonzero(w)), iterations=iterations,
                    seconds=time.perf_counter() - start, info=info)


def _projection_ilp(q: QuadraticModel, costs: torch.Tensor, k: int, max_macs: float):
    """scores (this slice's) -> ILPResult: the FLOP + count ILP over every slice's scores. The
    costs are put in cost-group form once here, not at every projection."""
    if q.sliced_vectors:
        group, group_costs = sliced_cost_groups(costs.to(torch.float64), q.collective)
        groups = slice_cost_groups(group, group_costs)
        del group
        order = PreviousOrder()             # as below: each slice's sort starts from its last order
        return lambda value: solve_sliced_flops_ilp(value, groups, group_costs, max_count=k, max_cost=max_macs,
                                                    collective=q.collective, previous_order=order)
    cost_layers = _cost_runs(costs)
    if cost_layers is None:
        groups = CostGroups.from_costs(costs.to(torch.float64))
    else:
        groups = CostGroups.from_layers(cost_layers[0], cost_layers[1], costs.numel())
    order = PreviousOrder()                 # each projection's sort starts from the last one's order
    return lambda value: solve_flops_ilp(value, cost_groups=groups, max_count=k, max_cost=max_macs,
                                         previous_order=order)


def _cost_runs(costs: torch.Tensor, max_runs: int = 1024):
    """The runs of consecutive weights of equal cost (a network's layers) as (slices, costs
    (float64)), or None if there are more than ``max_runs``. Given to the ILP, they spare it
    grouping p costs by sorting them."""
    change = ((costs[1:] != costs[:-1]).nonzero().squeeze(1) + 1).tolist()
    if len(change) >= max_runs:
        return None
    bounds = [0, *change, costs.numel()]
    return ([slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])],
            costs[torch.tensor(bounds[:-1], device=costs.device)].cpu().to(torch.float64))


def _support_changing_step(q, project, solve_on, w, f, support, grad, log_eta, max_changes,
                           max_search, info):
    """One step of the discrete first-order method: search the step size η for a support of
    w − η∇Q that brings in at most ``max_changes`` new entries and whose backsolve lowers Q.

    At a backsolved point ∇Q vanishes on the support, so a step moves the support only once η
    is long enough for some |η·g_j| off the support to beat a kept |w_i|; past that point the
    support changes fast with η (on ResNet-20-B from 0 to 17,000 entries when η doubles). The
    search therefore works on log η: grow it 16-fold while the support stays put, then bisect
    between "does not move" and "moves too much, or raises Q".

    Returns ((w, Q(w), support) or None when no step lowers Q, the log2 η to start from next).
    """
    lo, hi = log_eta, None
    for _ in range(max_search):
        trial = lo + 4 if hi is None else (lo + hi) / 2
        info["trials"] += 1
        point = w - 2.0 ** trial * grad
        if q.count(~torch.isfinite(point)):      # η past the float range (a quadratic of ~1e-35): too long
            hi = trial
            continue
        candidate_support = project(point)
        changes = q.count(candidate_support & ~support)          # entries coming in
        if changes == 0:
            lo = trial
            continue
        if changes <= max_changes:
            candidate = solve_on(candidate_support)
            f_candidate = q.objective(candidate)
            if f_candidate < f:
                info["accepted"] += 1
                info["support_changes"] = info.get("support_changes", 0) + changes
                return (candidate, f_candidate, candidate_support), lo
        hi = trial
    return None, lo
