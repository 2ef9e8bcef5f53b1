"""The exact reference for the FLOP- and sparsity-constrained selection ILP of ``solvers.ilp``:
the same problem handed to HiGHS through :func:`scipy.optimize.milp`, after exact reduced-cost
fixing against the fast solver's solution; practical up to ~1e5 weights. Tests and
``benchmarks/bench_ilp.py`` hold the fast solver against it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array, csr_array

from .ilp import ILPResult, Solution, device_of, package, solve_lagrangian
from .ilp_groups import Problem, parse_problem


def _reduced_cost_fixing(prob: Problem, incumbent: Solution) -> tuple[np.ndarray, np.ndarray, float]:
    """(ones, free, upper): weights every optimal solution keeps, weights left to decide,
    and the Lagrangian upper bound used.

    For any μ, ν >= 0 and feasible z, with reduced scores r_i = s_i - μ c_i - ν,
    Σ s_i z_i <= L(μ, ν) - Σ_{r_i > 0, z_i = 0} r_i - Σ_{r_i < 0, z_i = 1} |r_i|.
    So a solution at least as good as the incumbent keeps every i with r_i > L - incumbent
    and drops every i with r_i < -(L - incumbent). Valid whatever (μ, ν) are; good
    multipliers and a good incumbent just leave fewer weights free.
    """
    mu, nu = incumbent.info.get("mu", 0.0), incumbent.info.get("nu", 0.0)
    reduced = prob.scores - mu * prob.costs() - nu
    upper = mu * prob.max_cost + nu * prob.max_count + float(np.maximum(reduced, 0.0).sum())
    slack = upper - incumbent.primal + 1e-9 * max(1.0, abs(upper))  # margin for rounding
    return reduced > slack, np.abs(reduced) <= slack, upper


def _highs(
    prob: Problem, free: np.ndarray, ones: np.ndarray, tol: float, time_limit: float
) -> tuple[np.ndarray, float, dict]:
    """Keep ``ones`` and decide the ``free`` weights by a binary MIP in HiGHS.

    Returns (keep (p,) bool, upper bound on the best objective with these fixings, info).
    Within a cost group some optimal solution keeps a prefix of the scores in descending
    order, so z_j >= z_{j+1} along each group's sorted free weights is added: it removes
    the symmetric solutions that make plain branch-and-bound slow. Presolve is off; it is
    slow on these wide two-row problems and gains nothing.
    """
    kept_score = float(prob.scores[ones].sum())
    idx = np.flatnonzero(free)
    if idx.size == 0:
        return ones.copy(), kept_score, {"status": 0, "message": "every weight fixed by reduced costs"}
    idx = idx[np.lexsort((-prob.scores[idx], prob.group[idx]))]
    n, costs = idx.size, prob.costs()
    pairs = np.flatnonzero(prob.group[idx][1:] == prob.group[idx][:-1])
    rows = np.arange(pairs.size)
    order = coo_array(
        (np.r_[np.ones(pairs.size), -np.ones(pairs.size)], (np.r_[rows, rows], np.r_[pairs, pairs + 1])),
        shape=(pairs.size, n),
    )
    budgets = csr_array(np.vstack([np.ones(n), costs[idx]]))
    count_left, cost_left = prob.max_count - int(ones.sum()), prob.max_cost - float(costs[ones].sum())
    res = milp(
        -prob.scores[idx],
        integrality=np.ones(n),
        bounds=Bounds(0.0, 1.0),
        constraints=[
            LinearConstraint(budgets, -np.inf, [count_left, max(cost_left, 0.0)]),
            LinearConstraint(order, 0.0, np.inf),
        ],
        options={"mip_rel_gap": tol, "time_limit": time_limit, "presolve": False},
    )
    keep = ones.copy()
    if res.x is not None:
        keep[idx[res.x > 0.5]] = True
    bound = res.get("mip_dual_bound")
    upper = -bound if bound is not None and np.isfinite(bound) else math.inf
    return keep, upper + kept_score, {"status": int(res.status), "message": res.message}


def solve_flops_ilp_exact(
    scores: torch.Tensor,
    costs_per_weight: torch.Tensor | None = None,
    *,
    layer_slices: Sequence[slice] | None = None,
    layer_costs: Sequence[float] | torch.Tensor | None = None,
    max_count: int,
    max_cost: float,
    tol: float = 1e-9,
    time_limit: float = 600.0,
    reduce: bool = True,
) -> ILPResult:
    """Solve the same ILP exactly with HiGHS (:func:`scipy.optimize.milp`): the reference.

    Arguments as :func:`solve_flops_ilp`, except: ``tol`` is HiGHS's relative MIP gap;
    ``time_limit`` caps the HiGHS solve (seconds; ``info["status"]`` is 0 when it proved
    optimality); ``reduce`` first fixes, by reduced costs against the fast solver's
    solution, the weights whose value no near-optimal solution can change (exact; see
    :func:`_reduced_cost_fixing`), so HiGHS sees only the few hundred undecided weights.
    With ``reduce=False`` HiGHS gets every weight, so its answer does not depend on the
    fast solver (used then only as the fallback should HiGHS stop early); practical up to
    ~1e4 weights.
    """
    start = time.perf_counter()
    prob = parse_problem(scores, costs_per_weight, layer_slices, layer_costs, max_count, max_cost)
    incumbent = solve_lagrangian(prob, 1e-12)  # the fallback, and the fixing's reference value
    if reduce:
        ones, free, upper = _reduced_cost_fixing(prob, incumbent)
    else:
        ones, free, upper = np.zeros_like(incumbent.keep), np.ones_like(incumbent.keep), math.inf
    keep, dual, highs_info = _highs(prob, free, ones, tol, time_limit)
    primal = float(prob.scores[keep].sum())
    # Fall back on the incumbent if HiGHS stopped early or bent a budget within its 1e-7 tolerance.
    if not prob.is_feasible(keep) or primal < incumbent.primal:
        keep, primal = incumbent.keep, incumbent.primal
    info = {
        "method": "highs",
        **highs_info,
        "free_weights": int(free.sum()),
        "fixed_kept": int(ones.sum()),
    }
    # Solutions that break a fixing score below the incumbent, hence below primal.
    dual = max(min(dual, upper), primal)
    return package(prob, Solution(keep, primal, dual, info), device_of(scores), start)
