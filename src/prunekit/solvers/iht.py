"""Iterative hard thresholding (IHT) for min Q(w) s.t. ‖w‖₀ ≤ k, with CHITA's step sizes.

Part of CHITA (:mod:`prunekit.solvers.chita`): :func:`iht` proposes a support, which CHITA then
backsolves on and improves by swap search. Steps are exact on an unchanged support, searched when
the support moves, run on an active set of candidate weights grown on demand.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import PrunekitError
from .backsolve import backsolve
from .quadratic import QuadraticModel, check_k, dot64
from .result import Solution


@dataclass
class _Iterate:
    """A k-sparse point with its residual X(w − w̄) and objective."""
    w: torch.Tensor
    r: torch.Tensor
    f: float


@dataclass
class _Counters:
    iterations: int = 0          # IHT steps taken, over all active-set rounds
    exact_steps: int = 0         # steps with the exact step size on an unchanged support
    line_searches: int = 0       # steps (and active-set checks) that searched a step size
    objective_evals: int = 0     # trial points evaluated by those searches
    active_set_rounds: int = 0
    active_set_size: int = 0
    stalled: bool = False        # stopped because no step decreased Q


def iht(q: QuadraticModel, k: int, w0: torch.Tensor | None = None, *, max_iter: int = 200,
        tol: float = 1e-4, active_set: bool = True, active_factor: float = 1.5, max_rounds: int = 10,
        max_search: int = 8, polish: int = 0) -> Solution:
    """Iterative hard thresholding for min Q(w) s.t. ‖w‖₀ ≤ k, with CHITA's step sizes.

    q:             the quadratic model.
    k:             the most nonzeros allowed.
    w0:            (p,) start (default w̄); it is first hard-thresholded to k entries.
    max_iter, tol: per active-set round, at most ``max_iter`` steps; stop once a step lowers Q by
                   less than ``tol``·|Q|, or when no step lowers it at all.
    active_set:    run IHT on ⌈active_factor·k⌉ candidate weights, grown while the full gradient
                   asks for newcomers (at most ``max_rounds`` rounds); see :func:`_active_set_iht`.
    max_search:    trial points per step-size search.
    polish:        sweeps of coordinate descent on the final support (0: none).

    Every accepted step lowers Q, so the result is never worse than the thresholded start.
    """
    start = time.perf_counter()
    k = check_k(k)
    s = q.sliced()           # the steps run on this process's slice of every (p,) vector
    w = s.w_bar if w0 is None else s.local_part(_check_start(w0, q))
    if active_factor < 1:
        raise PrunekitError(f"active_factor must be at least 1 (got {active_factor}); the default is 1.5")
    counters = _Counters()
    if k == 0:
        w = torch.zeros_like(s.w_bar)
    elif k >= q.p:                                                # no constraint left
        w = backsolve(s, torch.ones(s.width, dtype=torch.bool, device=w.device))
    elif active_set and math.ceil(active_factor * k) < q.p:
        w = _active_set_iht(s, k, w, math.ceil(active_factor * k), max_rounds,
                            dict(max_iter=max_iter, tol=tol, max_search=max_search), counters)
    else:
        w = _iht_loop(s, k, w, max_iter, tol, max_search, counters).w
    w = s.to_global(w)                                            # once, at the end
    if polish:
        w = _coordinate_descent(q, w, polish)
    return Solution(w=w, objective=q.objective(w), support_size=int((w != 0).sum()),
                    iterations=counters.iterations, seconds=time.perf_counter() - start,
                    info=asdict(counters))


def _iht_loop(q: QuadraticModel, k: int, w: torch.Tensor, max_iter: int, tol: float,
              max_search: int, counters: _Counters) -> _Iterate:
    """IHT on q from H_k(w): w ← H_k(w − τ∇Q(w)), with τ chosen as in CHITA.

    Let S be the current support and d the gradient on S. If hard thresholding would keep S for
    every step up to the exact minimiser along −d, τ* = ‖d‖²/(‖Xd‖²/n + λ‖d‖²), take that step
    (Q is quadratic, so τ* is exact). Otherwise the support changes: search τ from
    max(τ_keep, 1/L) (see _line_search). Only steps that lower Q are accepted.
    """
    inv_L = 1.0 / q.lipschitz()
    cur = _evaluate(q, _hard_threshold(q, w, k))
    for _ in range(max_iter):
        grad = q.gradient(cur.w, cur.r)
        support = q.top_k_mask(cur.w.abs(), k)
        d = torch.where(support, grad, 0)                          # ∇Q on S
        Xd = q.matvec(d)
        dd = q.dot(d, d)
        curvature = dot64(Xd, Xd) / q.n + q.ridge * dd              # dᵀ∇²Q d
        tau_exact = dd / curvature if dd > 0 else 0.0
        tau_keep = _support_keeping_step(q, cur.w, grad, support)
        new = None
        if 0 < tau_exact <= tau_keep:
            new = _step_on_support(q, cur, d, Xd, tau_exact)
            if small_decrease(cur.f, new.f, tol):             # S is (nearly) solved: try
                new = None                                     # steps that change it
            else:
                counters.exact_steps += 1
        if new is None and math.isfinite(tau_keep):              # some step changes S
            new = _line_search(q, k, cur, grad, max(tau_keep, inv_L), max_search, counters)
        if new is None and tau_keep > 0 and dd > 0:              # still a descent step on S
            new = _step_on_support(q, cur, d, Xd, min(tau_keep, tau_exact))
        if new is None or not new.f < cur.f:                     # (a NaN objective lowers nothing)
            counters.stalled = True
            break
        counters.iterations += 1
        converged = small_decrease(cur.f, new.f, tol)
        cur = new
        if converged:
            break
    return cur


def small_decrease(f_old: float, f_new: float, tol: float) -> bool:
    return f_old - f_new <= tol * abs(f_old)


def _support_keeping_step(q: QuadraticModel, w: torch.Tensor, grad: torch.Tensor, support: torch.Tensor) -> float:
    """The largest τ for which H_k(w − τ∇) still has support S (0 if none).

    Outside S the entries are τ|∇_j| ≤ τm, m = max_{j∉S} |∇_j|. Inside, with a_i = |w_i| and
    b_i = sign(w_i)∇_i (b_i > 0: the step shrinks w_i), |w_i − τ∇_i| = |a_i − τb_i| stays ≥ τm
    while τ ≤ a_i/(m + b_i) when m + b_i > 0, and for every τ otherwise.
    """
    m = grad.new_tensor(q.largest(grad[~support].abs(), empty=0.0))     # over every slice
    a = w[support].abs()
    b = torch.sign(w[support]) * grad[support]
    limits = torch.where(m + b > 0, a / (m + b), math.inf)
    return -q.largest(-limits)


def _step_on_support(q: QuadraticModel, cur: _Iterate, d: torch.Tensor, Xd: torch.Tensor,
                     tau: float) -> _Iterate:
    """w − τd for d supported on S; the residual is updated, not recomputed.

    Only the entries where d ≠ 0 move: a τ beyond the weights' float range (a curvature dᵀ∇²Q d
    that underflowed: a Fisher of 2^-140 in float32) made τ·0 = inf·0 = NaN off S, a nonzero in
    every pruned weight (more than k). Such a step's objective is NaN and it is refused."""
    w = torch.where(d != 0, cur.w - tau * d, cur.w)
    r = cur.r - tau * Xd
    return _Iterate(w, r, q.objective(w, r))


def _line_search(q: QuadraticModel, k: int, cur: _Iterate, grad: torch.Tensor, tau: float,
                 max_search: int, counters: _Counters) -> _Iterate | None:
    """The best of the trial points H_k(w − τ∇Q) on a doubling or halving grid of τ.

    If the first step lowers Q, keep doubling τ while Q keeps dropping (longer steps let more
    weights swap into the support); otherwise halve τ until a step lowers Q. At most
    ``max_search`` trials; None when none of them lowers Q.
    """
    counters.line_searches += 1

    def trial(t: float) -> _Iterate:
        counters.objective_evals += 1
        return _evaluate(q, _hard_threshold(q, cur.w - t * grad, k))

    best = trial(tau)
    if best.f < cur.f:
        for _ in range(max_search - 1):
            tau *= 2
            new = trial(tau)
            if not new.f < best.f:               # (NaN: a step beyond float range)
                break
            best = new
        return best
    for _ in range(max_search - 1):
        tau /= 2
        new = trial(tau)
        if new.f < cur.f:
            return new
    return None


def _active_set_iht(q: QuadraticModel, k: int, w: torch.Tensor, size: int, max_rounds: int,
                    loop_options: dict, counters: _Counters) -> torch.Tensor:
    """CHITA's active-set strategy: IHT on a few candidate weights, grown on demand.

    The set starts as the support of H_k(w) topped up with the largest |w̄| to ``size``
    weights. IHT runs on the restricted model (the other weights held at 0; its X is only
    n×size). Then one IHT step on the full problem, its step size searched from the restricted
    problem's 1/L, says whether outside weights want in: if that step lowers Q and brings some,
    they join the set and IHT resumes from that point; otherwise we are done.
    """
    w = _hard_threshold(q, w, k)
    active = q.top_k_mask(torch.where(w != 0, math.inf, q.w_bar.abs()), size)
    for _ in range(max_rounds):
        counters.active_set_rounds += 1
        index = active.nonzero().squeeze(1)
        sub, _ = q.restrict(index)
        inner = _iht_loop(sub, k, w[index], counters=counters, **loop_options)
        w = torch.zeros_like(w)
        w[index] = inner.w
        cur = _evaluate(q, w)
        grown = _line_search(q, k, cur, q.gradient(w, cur.r), 1.0 / sub.lipschitz(),
                             loop_options["max_search"], counters)
        if grown is None:
            break
        newcomers = (grown.w != 0) & ~active
        if q.count(newcomers) == 0:
            break
        w = grown.w
        active |= newcomers
    counters.active_set_size = q.count(active)
    return w


def _coordinate_descent(q: QuadraticModel, w: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Cyclic exact minimisation of Q over one weight of the support at a time.

    For weight i with column x_i of X: ∂Q/∂w_i = x_iᵀr/n + λ(w_i − w̄_i) + g_i and
    ∂²Q/∂w_i² = ‖x_i‖²/n + λ, so one Newton step is the exact minimiser; r = X(w − w̄) follows.
    """
    w = w.clone()
    index = w.nonzero().squeeze(1)
    A = q.columns(index)                                            # (n, s)
    curvature = (A * A).sum(0) / q.n + q.ridge
    g = torch.zeros_like(curvature) if q.linear is None else q.linear[index]
    r = q.residual(w)
    for _ in range(sweeps):
        for j, i in enumerate(index.tolist()):
            step = (A[:, j] @ r / q.n + q.ridge * (w[i] - q.w_bar[i]) + g[j]) / curvature[j]
            w[i] -= step
            r -= step * A[:, j]
    return w



def _evaluate(q: QuadraticModel, w: torch.Tensor) -> _Iterate:
    r = q.residual(w)
    return _Iterate(w, r, q.objective(w, r))


def _hard_threshold(q: QuadraticModel, v: torch.Tensor, k: int) -> torch.Tensor:
    """H_k(v): v (this slice) with all but the k largest-magnitude entries of every slice set to 0."""
    return torch.where(q.top_k_mask(v.abs(), k), v, 0)


def _check_start(w0: torch.Tensor, q: QuadraticModel) -> torch.Tensor:
    if not isinstance(w0, torch.Tensor) or w0.shape != (q.p,):
        raise PrunekitError(f"w0 must be a tensor of shape ({q.p},), like w_bar")
    return w0.to(q.dtype)
