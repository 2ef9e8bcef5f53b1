"""CHITA: k-sparse minimisers of the quadratic model by IHT and backsolve.

Benbaki, Chen, Meng, Hazimeh, Ponomareva, Zhao, Mazumder, "Fast as CHITA: Neural Network Pruning
with Combinatorial Optimization", ICML 2023 (arXiv 2302.14623). With Q the quadratic model of
:class:`~prunekit.solvers.quadratic.QuadraticModel` the problem is

    minimise Q(w)   subject to   ‖w‖₀ ≤ k.

* :func:`backsolve` minimises Q exactly on a fixed support (an n×n system, by Woodbury);
* :func:`iht` is iterative hard thresholding with CHITA's step sizes and active set;
* :func:`swap_search` improves a support by swapping weights in and out while the backsolve
  objective drops, each swap scored exactly from a few columns of X;
* :func:`chita` chooses a support ("backsolve": magnitude; "iht": IHT, then the swap search)
  and backsolves on it.

Vectors are (p,) tensors in X's dtype; nothing of size p×p is ever formed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import PrunekitError
from .magnitude import top_k_mask
from .quadratic import QuadraticModel, check_k, dot64, spd_cholesky
from .result import Solution

METHODS = ("iht", "backsolve")


# --- backsolve: exact minimisation on a fixed support ------------------------------------------

def backsolve(q: QuadraticModel, support: torch.Tensor) -> torch.Tensor:
    """argmin Q(w) over w with w = 0 outside ``support`` (p,) bool. Returns w (p,).

    With S the support, the weights outside it fixed at 0 leave the output z = X_{S^c} w̄_{S^c}
    unexplained; setting the gradient on S to zero, δ = w_S − w̄_S solves (see _support_step)

        (X_SᵀX_S/n + λI) δ = X_Sᵀz/n − g_S.
    """
    return _backsolve(q, support)[0]


def _backsolve(q: QuadraticModel, support: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """:func:`backsolve`, and for |S| > n the parts (AAᵀ, z, A g_S) of its Woodbury form in
    float64 (else None), from which :class:`_DualSupport` starts without a new Gram matrix."""
    w = torch.zeros_like(q.w_bar)
    index = support.nonzero().squeeze(1)
    if index.numel() == 0:
        return w, None
    z = q.matvec(torch.where(support, 0, q.w_bar))             # X_{S^c} w̄_{S^c}, (n,)
    g = None if q.linear is None else q.linear[index]
    A = q.X.index_select(1, index)
    gram = A @ A.t() if index.numel() > q.n else None
    w[index] = q.w_bar[index] + _support_step(A, z, g, q.ridge, gram)
    if gram is None:
        return w, None
    return w, (gram.double(), z.double(), None if g is None else (A @ g).double())


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


def _support_step(A: torch.Tensor, z: torch.Tensor, g: torch.Tensor | None, ridge: float,
                  gram: torch.Tensor | None = None) -> torch.Tensor:
    """δ (s,) solving (AᵀA/n + λI) δ = Aᵀz/n − g, for A (n, s), z (n,), g (s,) or None
    (``gram``: AAᵀ if already formed, for s > n).

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
    delta = A.t() @ _spd_solve(A @ A.t() if gram is None else gram, n * ridge, v)
    return delta if g is None else delta - g / ridge


def _spd_solve(gram: torch.Tensor, shift: float, rhs: torch.Tensor) -> torch.Tensor:
    """(gram + shift·I)⁻¹ rhs by Cholesky in float64; returned in rhs's dtype."""
    M = gram.to(torch.float64, copy=True)                      # gram itself stays as it was
    M.diagonal().add_(shift)
    return _cholesky_solve(spd_cholesky(M), rhs.double()).to(rhs.dtype)


def _cholesky_solve(L: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(LLᵀ)⁻¹v for one vector v. The right-hand side goes in as two columns (v and 0): some
    CPU BLAS builds take a slow path for a single one (0.3 s instead of 1 ms at n = 1000)."""
    return torch.cholesky_solve(torch.stack([v, torch.zeros_like(v)], 1), L)[:, 0]


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
        support = top_k_mask(cur.w.abs(), k)
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
    active = top_k_mask(torch.where(w != 0, math.inf, q.w_bar.abs()), size)
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


# --- swap search: local search over supports -----------------------------------------------------

@dataclass
class _SupportPoint:
    """The backsolve on a support S: w, Q(w), and ∇Q(w) set to 0 on S (where it vanishes)."""
    support: torch.Tensor        # (p,) bool
    w: torch.Tensor              # (p,)
    f: float
    grad: torch.Tensor           # (p,)


class _PrimalSupport:
    """The backsolve on a support of size s ≤ n, by :func:`backsolve`, with the swap statistics
    of :func:`swap_search` from the s×s Hessian H_SS = X_SᵀX_S/n + λI (in float64)."""

    def __init__(self, q: QuadraticModel, support: torch.Tensor):
        self.q = q
        w = backsolve(q, support)
        r = q.residual(w)
        self.point = _SupportPoint(support, w, q.objective(w, r), torch.where(support, 0, q.gradient(w, r)))

    def swap_statistics(self, inside: torch.Tensor, outside: torch.Tensor):
        """For i ∈ ``inside`` ⊂ S and j ∈ ``outside`` (index tensors, j ∉ S): d_i = [H_SS⁻¹]_ii,
        u_ij = [H_SS⁻¹H_Sj]_i and c_j = H_jj − H_jSH_SS⁻¹H_Sj, in float64."""
        q = self.q
        index = self.point.support.nonzero().squeeze(1)
        A = q.X.index_select(1, index).double()                       # (n, s)
        H = A.t() @ A / q.n
        H.diagonal().add_(q.ridge)
        H_inv = torch.cholesky_inverse(spd_cholesky(H))
        X_J = q.X.index_select(1, outside).double()                   # (n, m)
        H_SJ = A.t() @ X_J / q.n
        V = H_inv @ H_SJ                                              # H_SS⁻¹H_SJ, (s, m)
        rows = torch.searchsorted(index, inside)                      # where ``inside`` sits in S
        c = (X_J * X_J).sum(0) / q.n + q.ridge - (H_SJ * V).sum(0)
        return H_inv.diagonal()[rows], V[rows], c

    def swapped(self, remove: torch.Tensor, add: torch.Tensor) -> _PrimalSupport:
        """The backsolve on S − ``remove`` + ``add``."""
        support = self.point.support.clone()
        support[remove] = False
        support[add] = True
        return _PrimalSupport(self.q, support)


class _DualSupport:
    """The backsolve on a support of size s > n in the Woodbury form of :func:`_support_step`,
    updated under swaps rather than solved afresh.

    With A = X_S, M = AAᵀ + nλI (n×n), z = X_{S^c}w̄_{S^c} and b = A g_S, the backsolve is
    δ_S = Aᵀy − g_S/λ with y = M⁻¹(z + b/λ); its residual is r = X(w − w̄) = −nλy, so off S
    ∇Q = −λ(Xᵀy + w̄) + g. Swapping m weights changes AAᵀ by 2m outer products and z, b by 2m
    columns: a new support costs an n×n Cholesky and one product Xᵀy, not a new Gram matrix.
    AAᵀ, z and b are kept in float64.
    """

    def __init__(self, q: QuadraticModel, support: torch.Tensor, parts: tuple | None = None):
        self.q = q
        self.gram, self.z, self.b = _backsolve(q, support)[1] if parts is None else parts
        M = self.gram.clone()
        M.diagonal().add_(q.n * q.ridge)
        self.L = spd_cholesky(M)
        y = _cholesky_solve(self.L, self.z if self.b is None else self.z + self.b / q.ridge)
        Xty = q.rmatvec(y.to(q.dtype))                                 # (p,)
        if q.linear is None:
            w = torch.where(support, q.w_bar + Xty, 0)
            grad = torch.where(support, 0, (Xty + q.w_bar).mul_(-q.ridge))
        else:
            w = torch.where(support, q.w_bar + Xty - q.linear / q.ridge, 0)
            grad = torch.where(support, 0, (Xty + q.w_bar).mul_(-q.ridge) + q.linear)
        r = (-q.n * q.ridge * y).to(q.dtype)
        self.point = _SupportPoint(support, w, q.objective(w, r), grad)

    def swap_statistics(self, inside: torch.Tensor, outside: torch.Tensor):
        """As :meth:`_PrimalSupport.swap_statistics`, from H_SS⁻¹ = (1/λ)[I − AᵀM⁻¹A]:
        d_i = (1 − a_iᵀM⁻¹a_i)/λ, u_ij = a_iᵀM⁻¹x_j, c_j = λ(1 + x_jᵀM⁻¹x_j)."""
        q = self.q
        columns = q.X.index_select(1, torch.cat([inside, outside])).double()
        Y = torch.linalg.solve_triangular(self.L, columns, upper=False)   # L⁻¹[X_I X_J]
        Y_I, Y_J = Y[:, :inside.numel()], Y[:, inside.numel():]
        d = (1 - (Y_I * Y_I).sum(0)) / self.q.ridge
        c = self.q.ridge * (1 + (Y_J * Y_J).sum(0))
        return d, Y_I.t() @ Y_J, c

    def swapped(self, remove: torch.Tensor, add: torch.Tensor) -> _DualSupport:
        q = self.q
        support = self.point.support.clone()
        support[remove] = False
        support[add] = True
        leaving = q.X.index_select(1, remove).double()
        joining = q.X.index_select(1, add).double()
        gram = self.gram + joining @ joining.t() - leaving @ leaving.t()
        z = self.z + leaving @ q.w_bar[remove].double() - joining @ q.w_bar[add].double()
        b = None
        if self.b is not None:
            b = self.b + joining @ q.linear[add].double() - leaving @ q.linear[remove].double()
        return _DualSupport(q, support, (gram, z, b))


def _support_state(q: QuadraticModel, support: torch.Tensor, parts: tuple | None = None):
    if int(support.sum()) <= q.n:
        return _PrimalSupport(q, support)
    return _DualSupport(q, support, parts)


def swap_search(q: QuadraticModel, starts: torch.Tensor | list[torch.Tensor], *, rounds: int = 10,
                candidates: int = 256, max_swaps: int | None = None, kicks: int = 3, tol: float = 1e-10,
                h_diag: torch.Tensor | None = None) -> Solution:
    """Local search over supports of a fixed size: swap weights of the support S for weights
    outside while the backsolve objective f(S) = min{Q(w) : w = 0 off S} decreases. Returns the
    backsolve on the best support seen; never worse than the backsolve on the first start.

    starts:     a support (p,) bool, or a list of them (all of one size), searched in turn.
    rounds:     the budget, over all starts and kicks: a round scores candidate swaps once and
                applies some (see below). Rounds a search does not need go to the next start,
                then to ``kicks``.
    candidates: the swaps scored per round are those between the ``candidates`` weights of S
                with the least removal cost w_i²H_ii and the ``candidates`` outside weights with
                the largest gain ∇_j²/H_jj (H_jj = ‖x_j‖²/n + λ; pass it as ``h_diag`` if known).
    max_swaps:  the most swaps applied at once (default: ``candidates``//4 at first, doubled
                after a round that kept them all, cut to what worked after one that did not).
    kicks:      once every start is searched, up to this many times in a row from the best
                support: make the least harmful swap (the next least harmful after a kick that
                found nothing better) and search again.
    tol:        a search stops when no swap is predicted to lower f by ``tol``·|f|, or a round
                lowers it by less.

    With w the backsolve on S and ∇ = ∇Q(w) (zero on S), swapping i ∈ S for j ∉ S changes f by
    exactly

        Δ_ij = −∇_j²/(2c_j) + (w_i + u_ij∇_j/c_j)² / (2(d_i + u_ij²/c_j))

    (adding j lowers f by ∇_j²/2c_j and moves w_i to w_i + u_ij∇_j/c_j; removing i then costs the
    second term), with d_i = [H_SS⁻¹]_ii, u_ij = [H_SS⁻¹H_Sj]_i and c_j = H_jj − H_jSH_SS⁻¹H_Sj;
    these take only the candidates' columns, against the n×n (or s×s) factor. Disjoint swaps
    with Δ < 0 are applied together, best first, and kept if f drops; if not, the better half is
    tried, down to the single best swap, whose Δ is exact.
    """
    starts = [starts] if isinstance(starts, torch.Tensor) else list(starts)
    starts = [(s.to(device=q.w_bar.device, dtype=torch.bool), None) for s in starts]
    return _swap_search(q, starts, rounds=rounds, candidates=candidates, max_swaps=max_swaps,
                        kicks=kicks, tol=tol, h_diag=h_diag)


def _swap_search(q: QuadraticModel, starts: list[tuple[torch.Tensor, tuple | None]], *, rounds: int,
                 candidates: int, max_swaps: int | None, kicks: int, tol: float,
                 h_diag: torch.Tensor | None) -> Solution:
    """:func:`swap_search` from (support, parts of its backsolve from :func:`_backsolve`) pairs."""
    begin = time.perf_counter()
    if rounds < 0 or candidates < 1 or kicks < 0 or not starts:
        raise PrunekitError(f"swap search needs a start, rounds >= 0, candidates >= 1 and kicks >= 0 "
                            f"(got {len(starts)} starts, {rounds}, {candidates}, {kicks})")
    info = {"swap_rounds": 0, "swaps": 0, "swap_trials": 0, "swap_starts": 0, "swap_kicks": 0}
    best = _support_state(q, *starts[0])
    info["swap_start_objective"] = best.point.f
    size = int(starts[0][0].sum())
    if 0 < size < q.p and rounds > 0:
        h_diag = _hessian_diagonal(q) if h_diag is None else h_diag
        search = _Descent(q, h_diag, candidates, max_swaps, tol, rounds, info)
        best_scores = None
        for number, (start, parts) in enumerate(starts):
            if search.budget == 0:
                break
            if any(torch.equal(start, other) for other, _ in starts[:number]):
                continue
            info["swap_starts"] += 1
            state, scores = search.run(best if number == 0 else _support_state(q, start, parts))
            if number == 0 or state.point.f < best.point.f:
                best, best_scores = state, scores
        misses = 0
        while misses < kicks and search.budget > 0 and best_scores is not None:
            I, J, delta = best_scores                   # the swaps from the best support, scored
            flat = delta.flatten()
            if misses >= flat.numel():
                break
            info["swap_kicks"] += 1
            position = int(torch.topk(flat, misses + 1, largest=False).indices[misses])
            i, j = divmod(position, J.numel())
            state, scores = search.run(best.swapped(I[i:i + 1], J[j:j + 1]))
            if state.point.f < best.point.f:
                best, best_scores, misses = state, scores, 0
            else:
                misses += 1
    point = best.point
    return Solution(w=point.w, objective=point.f, support_size=int((point.w != 0).sum()),
                    iterations=info["swap_rounds"], seconds=time.perf_counter() - begin, info=info)


class _Descent:
    """Swap descent (see :func:`swap_search`) under a shared budget of rounds."""

    def __init__(self, q: QuadraticModel, h_diag: torch.Tensor, candidates: int, max_swaps: int | None,
                 tol: float, rounds: int, info: dict):
        self.q, self.h_diag, self.candidates, self.tol, self.info = q, h_diag, candidates, tol, info
        self.fixed = max_swaps is not None
        self.limit = max(1, candidates // 4 if max_swaps is None else max_swaps)
        self.budget = rounds

    def run(self, state):
        """Descend from ``state`` until no swap helps or the budget is spent. Returns the final
        state and, if it is a local minimum, its scored swaps (I, J, Δ) (else None)."""
        while self.budget > 0:
            self.budget -= 1
            self.info["swap_rounds"] += 1
            point = state.point
            I, J, delta = _score_swaps(self.q, state, self.h_diag, self.candidates)
            remove, add = _disjoint_swaps(delta, self.limit, -self.tol * abs(point.f))
            if remove.numel() == 0:
                return state, (I, J, delta)
            count = tried = remove.numel()
            while count >= 1:
                self.info["swap_trials"] += 1
                new = state.swapped(I[remove[:count]], J[add[:count]])
                if new.point.f < point.f:
                    state = new
                    self.info["swaps"] += count
                    break
                count //= 2
            if count == 0:
                return state, (I, J, delta)
            if not self.fixed:                  # all kept: allow more next time; else what worked
                self.limit = min(2 * self.limit, self.candidates) if count == tried else count
            if _small_decrease(point.f, state.point.f, self.tol):
                break
        return state, None


def _hessian_diagonal(q: QuadraticModel) -> torch.Tensor:
    """H_jj = ‖x_j‖²/n + λ, (p,). Row by row: one pass over X, no temporary of X's size."""
    total = torch.zeros_like(q.w_bar)
    for row in q.X:
        total.addcmul_(row, row)
    return total / q.n + q.ridge


def _score_swaps(q: QuadraticModel, state, h_diag: torch.Tensor, candidates: int):
    """(I, J, Δ): the candidate weights to remove (in S) and to add (outside), and the exact
    change Δ (|I|, |J|) of the backsolve objective for each swap (see :func:`swap_search`)."""
    point = state.point
    size = int(point.support.sum())
    removal = torch.where(point.support, point.w.square() * h_diag, math.inf)
    I = torch.topk(removal, min(candidates, size), largest=False).indices.sort().values
    gain = torch.where(point.support, -1.0, point.grad.square() / h_diag)
    J = torch.topk(gain, min(candidates, q.p - size)).indices.sort().values
    d, U, c = state.swap_statistics(I, J)
    d = torch.maximum(d, 1 / h_diag[I].double())                     # [H_SS⁻¹]_ii ≥ 1/H_ii
    c = torch.clamp(c, min=q.ridge)                                  # the Schur complement is ≥ λ
    g = point.grad[J].double()
    moved = point.w[I].double().unsqueeze(1) + U * (g / c)
    return I, J, moved.square() / (2 * (d.unsqueeze(1) + U.square() / c)) - g.square() / (2 * c)


def _disjoint_swaps(delta: torch.Tensor, limit: int, below: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily, best first: at most ``limit`` swaps (rows, columns of ``delta``) with Δ < ``below``
    and no row or column twice. Returns (rows, columns), best first."""
    flat = delta.flatten()
    good = int((flat < below).sum())
    rows: list[int] = []
    columns: list[int] = []
    used_rows: set[int] = set()
    used_columns: set[int] = set()
    if good:
        order = torch.topk(flat, good, largest=False).indices
        width = delta.shape[1]
        for i, j in zip((order // width).tolist(), (order % width).tolist()):
            if i not in used_rows and j not in used_columns:
                used_rows.add(i)
                used_columns.add(j)
                rows.append(i)
                columns.append(j)
                if len(rows) == limit:
                    break
    return torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)


# --- CHITA ---------------------------------------------------------------------------------------

def chita(q: QuadraticModel, k: int, method: str = "iht", *, block_size: int | None = None,
          swap_rounds: int = 10, swap_candidates: int = 256, **iht_options) -> Solution:
    """A k-sparse w for the quadratic model, by CHITA.

    method="backsolve": keep the k largest |w̄| and backsolve on them.
    method="iht":       run :func:`iht` from w̄ (``iht_options`` go there), then backsolve on its
                        support ("IHT + backsolve" in the paper). Then :func:`swap_search`: from
                        the better of the magnitude and IHT supports, then from the other, then
                        kicks, in ``swap_rounds`` rounds in all (0: no search), each scoring
                        ``swap_candidates``² swaps. The best solution seen is returned, so it is
                        never worse than "backsolve" nor than IHT + backsolve. At n = 1000,
                        p ≈ 270,000 a round costs about two products with X.
    block_size:         backsolve with :func:`backsolve_blockwise` (for very large p); the swap
                        search still scores supports by the exact backsolve, and its support is
                        kept only if its blockwise backsolve is better.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise PrunekitError(f"unknown CHITA method {method!r}; choose one of {', '.join(METHODS)}")
    k = check_k(k)

    def solve_on(support: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        if block_size is None:
            return _backsolve(q, support)
        return backsolve_blockwise(q, support, block_size), None

    magnitude = top_k_mask(q.w_bar.abs(), min(k, q.p))
    w, parts = solve_on(magnitude)
    objective = q.objective(w)
    info: dict = {"method": method, "magnitude_objective": objective}
    iterations = 0
    if method == "iht":
        found = iht(q, k, **iht_options)
        w_iht, parts_iht = solve_on(found.mask)
        objective_iht = q.objective(w_iht)
        info.update(found.info, iht_objective=found.objective, improved=objective_iht < objective)
        iterations = found.iterations
        starts = [(magnitude, parts), (found.mask, parts_iht)]
        if objective_iht < objective:
            w, objective = w_iht, objective_iht
            starts.reverse()
        if swap_rounds and 0 < k < q.p:
            h_diag = _hessian_diagonal(q)
            if any(int(s.sum()) < k for s, _ in starts):                    # IHT kept fewer than k:
                gain = q.gradient(w_iht).square() / h_diag                 # fill up (never hurts)
                starts = [(top_k_mask(torch.where(s, math.inf, gain), k), None) for s, _ in starts]
            found = _swap_search(q, starts, rounds=swap_rounds, candidates=swap_candidates, max_swaps=None,
                                 kicks=3, tol=1e-10, h_diag=h_diag)
            info.update(found.info)
            w_swap = found.w if block_size is None else solve_on(found.mask)[0]
            objective_swap = q.objective(w_swap)
            info["swap_objective"] = objective_swap
            if objective_swap < objective:
                w, objective = w_swap, objective_swap
    return Solution(w=w, objective=objective, support_size=int((w != 0).sum()), iterations=iterations,
                    seconds=time.perf_counter() - start, info=info)


# --- small helpers -------------------------------------------------------------------------------

def _evaluate(q: QuadraticModel, w: torch.Tensor) -> _Iterate:
    r = q.residual(w)
    return _Iterate(w, r, q.objective(w, r))


def _hard_threshold(v: torch.Tensor, k: int) -> torch.Tensor:
    """H_k(v): v with all but its k largest-magnitude entries set to 0."""
    return torch.where(top_k_mask(v.abs(), k), v, 0)


def _check_start(w0: torch.Tensor, q: QuadraticModel) -> torch.Tensor:
    if not isinstance(w0, torch.Tensor) or w0.shape != (q.p,):
        raise PrunekitError(f"w0 must be a tensor of shape ({q.p},), like w_bar")
    return w0.to(q.dtype)
