"""CHITA: k-sparse minimisers of the quadratic model by IHT and backsolve.

Benbaki, Chen, Meng, Hazimeh, Ponomareva, Zhao, Mazumder, "Fast as CHITA: Neural Network Pruning
with Combinatorial Optimization", ICML 2023 (arXiv 2302.14623). With Q the quadratic model of
:class:`~prunekit.solvers.quadratic.QuadraticModel` the problem is

    minimise Q(w)   subject to   ‖w‖₀ ≤ k.

* :func:`backsolve` minimises Q exactly on a fixed support (an n×n system, by Woodbury);
* :func:`iht` is iterative hard thresholding with CHITA's step sizes and active set;
* :func:`chita` chooses a support ("backsolve": magnitude; "iht": IHT) and backsolves on it.

Vectors are (p,) tensors in X's dtype; nothing of size p×p is ever formed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import PrunekitError
from .quadratic import QuadraticModel, check_k, dot64
from .result import Solution

METHODS = ("iht", "backsolve")


# --- backsolve: exact minimisation on a fixed support ------------------------------------------

def backsolve(q: QuadraticModel, support: torch.Tensor) -> torch.Tensor:
    """argmin Q(w) over w with w = 0 outside ``support`` (p,) bool. Returns w (p,).

    With S the support, the weights outside it fixed at 0 leave the output z = X_{S^c} w̄_{S^c}
    unexplained; setting the gradient on S to zero, δ = w_S − w̄_S solves (see _support_step)

        (X_SᵀX_S/n + λI) δ = X_Sᵀz/n − g_S.
    """
    w = torch.zeros_like(q.w_bar)
    index = support.nonzero().squeeze(1)
    if index.numel() == 0:
        return w
    z = q.matvec(torch.where(support, 0, q.w_bar))             # X_{S^c} w̄_{S^c}, (n,)
    g = None if q.linear is None else q.linear[index]
    w[index] = q.w_bar[index] + _support_step(q.X.index_select(1, index), z, g, q.ridge)
    return w


def backsolve_blockwise(q: QuadraticModel, support: torch.Tensor, block_size: int) -> torch.Tensor:
    """:func:`backsolve` with the model's Hessian XᵀX/n + λI cut to its diagonal blocks.

    Blocks are ``block_size`` consecutive weights; block B is solved on its own, exactly, as if
    only its weights existed: (X_{S_B}ᵀX_{S_B}/n + λI) δ_B = X_{S_B}ᵀz_B/n − g_{S_B} with
    z_B = X_{B∖S} w̄_{B∖S}. Each system has size at most min(n, block_size), so this scales to
    any p; it is the exact backsolve when block_size ≥ p. Returns w (p,).
    """
    if block_size < 1:
        raise PrunekitError(f"block_size must be a positive integer (got {block_size})")
    w = torch.zeros_like(q.w_bar)
    for start in range(0, q.p, block_size):
        block = slice(start, start + block_size)
        keep = support[block]
        index = keep.nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        X_B = q.X[:, block]
        z = X_B @ torch.where(keep, 0, q.w_bar[block])          # X_{B∖S} w̄_{B∖S}
        g = None if q.linear is None else q.linear[block][index]
        w[start + index] = q.w_bar[block][index] + _support_step(X_B.index_select(1, index), z, g, q.ridge)
    return w


def _support_step(A: torch.Tensor, z: torch.Tensor, g: torch.Tensor | None, ridge: float) -> torch.Tensor:
    """δ (s,) solving (AᵀA/n + λI) δ = Aᵀz/n − g, for A (n, s), z (n,), g (s,) or None.

    s ≤ n: factor the s×s matrix. s > n: Woodbury in its push-through form,
        (AᵀA/n + λI)⁻¹ = (1/λ)[I − Aᵀ M⁻¹ A],   (AᵀA/n + λI)⁻¹ Aᵀ = n Aᵀ M⁻¹,   M = AAᵀ + nλI,
    gives δ = Aᵀ M⁻¹ (z + A g/λ) − g/λ: one n×n factorisation, and no 1/λ amplification of the
    data term. The Gram matrix is formed in A's dtype, the small system is solved in float64.
    """
    n, s = A.shape
    if s <= n:
        rhs = A.t() @ z / n if g is None else A.t() @ z / n - g
        return _spd_solve(A.t() @ A / n, ridge, rhs)
    v = z if g is None else z + A @ g / ridge
    delta = A.t() @ _spd_solve(A @ A.t(), n * ridge, v)
    return delta if g is None else delta - g / ridge


def _spd_solve(gram: torch.Tensor, shift: float, rhs: torch.Tensor) -> torch.Tensor:
    """(gram + shift·I)⁻¹ rhs by Cholesky in float64; returned in rhs's dtype."""
    M = gram.double()
    M.diagonal().add_(shift)
    L = torch.linalg.cholesky(M)
    return torch.cholesky_solve(rhs.double().unsqueeze(1), L).squeeze(1).to(rhs.dtype)


# --- IHT -----------------------------------------------------------------------------------------

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
    w = q.w_bar if w0 is None else _check_start(w0, q)
    if active_factor < 1:
        raise PrunekitError(f"active_factor must be at least 1 (got {active_factor}); the default is 1.5")
    counters = _Counters()
    if k == 0:
        w = torch.zeros_like(q.w_bar)
    elif k >= q.p:                                                # no constraint left
        w = backsolve(q, torch.ones(q.p, dtype=torch.bool, device=w.device))
    elif active_set and math.ceil(active_factor * k) < q.p:
        w = _active_set_iht(q, k, w, math.ceil(active_factor * k), max_rounds,
                            dict(max_iter=max_iter, tol=tol, max_search=max_search), counters)
    else:
        w = _iht_loop(q, k, w, max_iter, tol, max_search, counters).w
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
    cur = _evaluate(q, _hard_threshold(w, k))
    for _ in range(max_iter):
        grad = q.gradient(cur.w, cur.r)
        support = _top_k_mask(cur.w.abs(), k)
        d = torch.where(support, grad, 0)                          # ∇Q on S
        Xd = q.matvec(d)
        dd = dot64(d, d)
        curvature = dot64(Xd, Xd) / q.n + q.ridge * dd              # dᵀ∇²Q d
        tau_exact = dd / curvature if dd > 0 else 0.0
        tau_keep = _support_keeping_step(cur.w, grad, support)
        new = None
        if 0 < tau_exact <= tau_keep:
            new = _step_on_support(q, cur, d, Xd, tau_exact)
            if _small_decrease(cur.f, new.f, tol):             # S is (nearly) solved: try
                new = None                                     # steps that change it
            else:
                counters.exact_steps += 1
        if new is None and math.isfinite(tau_keep):              # some step changes S
            new = _line_search(q, k, cur, grad, max(tau_keep, inv_L), max_search, counters)
        if new is None and tau_keep > 0 and dd > 0:              # still a descent step on S
            new = _step_on_support(q, cur, d, Xd, min(tau_keep, tau_exact))
        if new is None or new.f >= cur.f:
            counters.stalled = True
            break
        counters.iterations += 1
        converged = _small_decrease(cur.f, new.f, tol)
        cur = new
        if converged:
            break
    return cur


def _small_decrease(f_old: float, f_new: float, tol: float) -> bool:
    return f_old - f_new <= tol * abs(f_old)


def _support_keeping_step(w: torch.Tensor, grad: torch.Tensor, support: torch.Tensor) -> float:
    """The largest τ for which H_k(w − τ∇) still has support S (0 if none).

    Outside S the entries are τ|∇_j| ≤ τm, m = max_{j∉S} |∇_j|. Inside, with a_i = |w_i| and
    b_i = sign(w_i)∇_i (b_i > 0: the step shrinks w_i), |w_i − τ∇_i| = |a_i − τb_i| stays ≥ τm
    while τ ≤ a_i/(m + b_i) when m + b_i > 0, and for every τ otherwise.
    """
    outside = grad[~support]
    m = outside.abs().max() if outside.numel() else grad.new_zeros(())
    a = w[support].abs()
    b = torch.sign(w[support]) * grad[support]
    limits = torch.where(m + b > 0, a / (m + b), math.inf)
    return float(limits.min())


def _step_on_support(q: QuadraticModel, cur: _Iterate, d: torch.Tensor, Xd: torch.Tensor,
                     tau: float) -> _Iterate:
    """w − τd for d supported on S; the residual is updated, not recomputed."""
    w = cur.w - tau * d
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
        return _evaluate(q, _hard_threshold(cur.w - t * grad, k))

    best = trial(tau)
    if best.f < cur.f:
        for _ in range(max_search - 1):
            tau *= 2
            new = trial(tau)
            if new.f >= best.f:
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
    w = _hard_threshold(w, k)
    active = _top_k_mask(torch.where(w != 0, math.inf, q.w_bar.abs()), size)
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
        if not newcomers.any():
            break
        w = grown.w
        active |= newcomers
    counters.active_set_size = int(active.sum())
    return w


def _coordinate_descent(q: QuadraticModel, w: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Cyclic exact minimisation of Q over one weight of the support at a time.

    For weight i with column x_i of X: ∂Q/∂w_i = x_iᵀr/n + λ(w_i − w̄_i) + g_i and
    ∂²Q/∂w_i² = ‖x_i‖²/n + λ, so one Newton step is the exact minimiser; r = X(w − w̄) follows.
    """
    w = w.clone()
    index = w.nonzero().squeeze(1)
    A = q.X.index_select(1, index)                                  # (n, s)
    curvature = (A * A).sum(0) / q.n + q.ridge
    g = torch.zeros_like(curvature) if q.linear is None else q.linear[index]
    r = q.residual(w)
    for _ in range(sweeps):
        for j, i in enumerate(index.tolist()):
            step = (A[:, j] @ r / q.n + q.ridge * (w[i] - q.w_bar[i]) + g[j]) / curvature[j]
            w[i] -= step
            r -= step * A[:, j]
    return w


# --- CHITA ---------------------------------------------------------------------------------------

def chita(q: QuadraticModel, k: int, method: str = "iht", *, block_size: int | None = None,
          **iht_options) -> Solution:
    """A k-sparse w for the quadratic model, by CHITA.

    method="backsolve": keep the k largest |w̄| and backsolve on them.
    method="iht":       run :func:`iht` from w̄ (``iht_options`` go there), then backsolve on its
                        support ("IHT + backsolve" in the paper). The better of this and the
                        "backsolve" solution is returned, so it is never worse than "backsolve".
    block_size:         backsolve with :func:`backsolve_blockwise` (for very large p).
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise PrunekitError(f"unknown CHITA method {method!r}; choose one of {', '.join(METHODS)}")
    k = check_k(k)

    def solve_on(support: torch.Tensor) -> torch.Tensor:
        return backsolve(q, support) if block_size is None else backsolve_blockwise(q, support, block_size)

    w = solve_on(_top_k_mask(q.w_bar.abs(), min(k, q.p)))
    objective = q.objective(w)
    info: dict = {"method": method, "magnitude_objective": objective}
    iterations = 0
    if method == "iht":
        found = iht(q, k, **iht_options)
        w_iht = solve_on(found.mask)
        objective_iht = q.objective(w_iht)
        info.update(found.info, iht_objective=found.objective, improved=objective_iht < objective)
        iterations = found.iterations
        if objective_iht < objective:
            w, objective = w_iht, objective_iht
    return Solution(w=w, objective=objective, support_size=int((w != 0).sum()), iterations=iterations,
                    seconds=time.perf_counter() - start, info=info)


# --- small helpers -------------------------------------------------------------------------------

def _evaluate(q: QuadraticModel, w: torch.Tensor) -> _Iterate:
    r = q.residual(w)
    return _Iterate(w, r, q.objective(w, r))


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(p,) bool, True at the k largest ``scores``."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores, k, sorted=False).indices] = True
    return mask


def _hard_threshold(v: torch.Tensor, k: int) -> torch.Tensor:
    """H_k(v): v with all but its k largest-magnitude entries set to 0."""
    return torch.where(_top_k_mask(v.abs(), k), v, 0)


def _check_start(w0: torch.Tensor, q: QuadraticModel) -> torch.Tensor:
    if not isinstance(w0, torch.Tensor) or w0.shape != (q.p,):
        raise PrunekitError(f"w0 must be a tensor of shape ({q.p},), like w_bar")
    return w0.to(q.dtype)
