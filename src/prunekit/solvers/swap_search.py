"""Swap search: local search over supports of a fixed size, scored by the exact backsolve.

Part of CHITA (:mod:`prunekit.solvers.chita`): from the magnitude and IHT supports, swap weights
of the support for weights outside while the backsolve objective drops. Each swap's change of
objective is computed exactly from a few columns of X against one n×n (or s×s) factor.

The search runs on ``q.sliced()``: with several processes each holds its slice of every (p,)
vector, candidates are named by global index (``top_k_positions``) and their values and columns
are read with ``values_at`` / ``columns_at``, so a round exchanges O(n·candidates) values, never p.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import PrunekitError
from .backsolve import backsolve, backsolve_with_parts, cholesky_solve_vector
from .iht import small_decrease
from .quadratic import QuadraticModel, spd_cholesky
from .result import Solution


@dataclass
class _SupportPoint:
    """The backsolve on a support S: w, Q(w), and ∇Q(w) set to 0 on S (where it vanishes)."""
    support: torch.Tensor        # (p,) bool (this process's slice of it)
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
        index = q.positions(self.point.support)                      # global, s ≤ n of them
        A = q.columns_at(index, torch.float64)                       # (n, s)
        H = A.t() @ A / q.n
        H.diagonal().add_(q.ridge)
        H_inv = torch.cholesky_inverse(spd_cholesky(H))
        X_J = q.columns_at(outside, torch.float64)                   # (n, m)
        H_SJ = A.t() @ X_J / q.n
        V = H_inv @ H_SJ                                              # H_SS⁻¹H_SJ, (s, m)
        rows = torch.searchsorted(index, inside)                      # where ``inside`` sits in S
        c = (X_J * X_J).sum(0) / q.n + q.ridge - (H_SJ * V).sum(0)
        return H_inv.diagonal()[rows], V[rows], c

    def swapped(self, remove: torch.Tensor, add: torch.Tensor) -> _PrimalSupport:
        """The backsolve on S − ``remove`` + ``add`` (global indices)."""
        support = self.point.support.clone()
        self.q.assign_at(support, remove, False)
        self.q.assign_at(support, add, True)
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
        self.gram, self.z, self.b = backsolve_with_parts(q, support)[1] if parts is None else parts
        M = self.gram.clone()
        M.diagonal().add_(q.n * q.ridge)
        self.L = spd_cholesky(M)
        y = cholesky_solve_vector(self.L, self.z if self.b is None else self.z + self.b / q.ridge)
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
        columns = q.columns_at(torch.cat([inside, outside]), torch.float64)
        Y = torch.linalg.solve_triangular(self.L, columns, upper=False)   # L⁻¹[X_I X_J]
        Y_I, Y_J = Y[:, :inside.numel()], Y[:, inside.numel():]
        d = (1 - (Y_I * Y_I).sum(0)) / self.q.ridge
        c = self.q.ridge * (1 + (Y_J * Y_J).sum(0))
        return d, Y_I.t() @ Y_J, c

    def swapped(self, remove: torch.Tensor, add: torch.Tensor) -> _DualSupport:
        q = self.q
        support = self.point.support.clone()
        q.assign_at(support, remove, False)
        q.assign_at(support, add, True)
        leaving = q.columns_at(remove, torch.float64)
        joining = q.columns_at(add, torch.float64)
        gram = self.gram + joining @ joining.t() - leaving @ leaving.t()
        z = (self.z + leaving @ q.values_at(q.w_bar, remove).double()
             - joining @ q.values_at(q.w_bar, add).double())
        b = None
        if self.b is not None:
            b = (self.b + joining @ q.values_at(q.linear, add).double()
                 - leaving @ q.values_at(q.linear, remove).double())
        return _DualSupport(q, support, (gram, z, b))


def _support_state(q: QuadraticModel, support: torch.Tensor, parts: tuple | None = None):
    if q.count(support) <= q.n:
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
    s = q.sliced()
    starts = [(s.local_part(start.to(device=q.w_bar.device, dtype=torch.bool)), None) for start in starts]
    found = swap_search_from(s, starts, rounds=rounds, candidates=candidates, max_swaps=max_swaps,
                             kicks=kicks, tol=tol, h_diag=None if h_diag is None else s.local_part(h_diag))
    found.w = s.to_global(found.w)
    return found


def swap_search_from(q: QuadraticModel, starts: list[tuple[torch.Tensor, tuple | None]], *, rounds: int,
                 candidates: int, max_swaps: int | None, kicks: int, tol: float,
                 h_diag: torch.Tensor | None) -> Solution:
    """:func:`swap_search` from (support, parts of its backsolve from :func:`backsolve_with_parts`)
    pairs, on a model whose vectors are this process's slices (``q.sliced()``): the supports,
    ``h_diag`` and the returned w are slices too."""
    begin = time.perf_counter()
    if rounds < 0 or candidates < 1 or kicks < 0 or not starts:
        raise PrunekitError(f"swap search needs a start, rounds >= 0, candidates >= 1 and kicks >= 0 "
                            f"(got {len(starts)} starts, {rounds}, {candidates}, {kicks})")
    info = {"swap_rounds": 0, "swaps": 0, "swap_trials": 0, "swap_starts": 0, "swap_kicks": 0}
    best = _support_state(q, *starts[0])
    info["swap_start_objective"] = best.point.f
    size = q.count(starts[0][0])
    if 0 < size < q.p and rounds > 0:
        h_diag = q.hessian_diagonal() if h_diag is None else h_diag
        search = _Descent(q, h_diag, candidates, max_swaps, tol, rounds, info)
        best_scores = None
        for number, (start, parts) in enumerate(starts):
            if search.budget == 0:
                break
            if any(q.count(start ^ other) == 0 for other, _ in starts[:number]):
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
    return Solution(w=point.w, objective=point.f, support_size=q.count(point.w != 0),
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
            if small_decrease(point.f, state.point.f, self.tol):
                break
        return state, None



def _score_swaps(q: QuadraticModel, state, h_diag: torch.Tensor, candidates: int):
    """(I, J, Δ): the candidate weights to remove (in S) and to add (outside), and the exact
    change Δ (|I|, |J|) of the backsolve objective for each swap (see :func:`swap_search`)."""
    point = state.point
    size = q.count(point.support)
    removal = torch.where(point.support, point.w.square() * h_diag, math.inf)
    I = q.top_k_positions(-removal, min(candidates, size))           # global indices
    gain = torch.where(point.support, -1.0, point.grad.square() / h_diag)
    J = q.top_k_positions(gain, min(candidates, q.p - size))
    d, U, c = state.swap_statistics(I, J)
    d = torch.maximum(d, 1 / q.values_at(h_diag, I).double())        # [H_SS⁻¹]_ii ≥ 1/H_ii
    c = torch.clamp(c, min=q.ridge)                                  # the Schur complement is ≥ λ
    g = q.values_at(point.grad, J).double()
    moved = q.values_at(point.w, I).double().unsqueeze(1) + U * (g / c)
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

