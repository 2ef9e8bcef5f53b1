"""Backsolve: the exact minimiser of the quadratic model on a fixed support.

With Q the quadratic model of :class:`~prunekit.solvers.quadratic.QuadraticModel` and S a set of
weights allowed to be nonzero, :func:`backsolve` returns argmin Q(w) subject to w = 0 off S: one
s×s system (s = |S| ≤ n) or, by Woodbury, one n×n system (s > n). CHITA and FALCON call it on
every support they pick; :func:`backsolve_blockwise` cuts the Hessian to diagonal blocks for very
large p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PrunekitError
from .quadratic import QuadraticModel, select_columns, spd_cholesky


def backsolve(q: QuadraticModel, support: torch.Tensor) -> torch.Tensor:
    """argmin Q(w) over w with w = 0 outside ``support`` (p,) bool. Returns w (p,).

    With S the support, the weights outside it fixed at 0 leave the output z = X_{S^c} w̄_{S^c}
    unexplained; setting the gradient on S to zero, δ = w_S − w̄_S solves (see _support_step)

        (X_SᵀX_S/n + λI) δ = X_Sᵀz/n − g_S.
    """
    return backsolve_with_parts(q, support)[0]


def backsolve_with_parts(q: QuadraticModel, support: torch.Tensor,
                         gram: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple | None]:
    """:func:`backsolve`, and for |S| > n the parts (AAᵀ, z, A g_S) of its Woodbury form in
    float64 (else None), from which the swap search's dual support starts without a new Gram
    matrix.

    With A = X_S: for |S| ≤ n, A (n, |S| ≤ n) is formed; for |S| > n only AAᵀ (n, n) is, by
    column blocks of X (:meth:`QuadraticModel.gram`), or passed in as ``gram`` (float64, e.g.
    from :func:`updated_gram`), and the products Aᵀy, Ag go through X and Xᵀ: memory O(n² + p)
    beyond X, nothing of size n×|S|.
    """
    w = torch.zeros_like(q.w_bar)
    index = support.nonzero().squeeze(1)
    size = q.count(support)                                    # |S| over every slice
    if size == 0:
        return w, None
    z = q.matvec(torch.where(support, 0, q.w_bar))             # X_{S^c} w̄_{S^c}, (n,)
    g = None if q.linear is None else q.linear[index]
    if size <= q.n:
        A, mine = q.support_columns(index)                     # (n, |S|), all slices' columns
        g_all = None if g is None else q.to_global(g)
        w[index] = q.w_bar[index] + _support_step(A, z, g_all, q.ridge)[mine]
        return w, None
    gram = q.gram(support) if gram is None else gram           # AAᵀ, float64
    Ag = None if g is None else q.matvec(torch.where(support, q.linear, 0)).double()
    v = z.double() if g is None else z.double() + Ag / q.ridge
    y = _spd_solve(gram, q.n * q.ridge, v)                     # M⁻¹(z + Ag/λ), float64
    delta = q.rmatvec(y.to(q.dtype))[index]                    # Aᵀy
    w[index] = q.w_bar[index] + (delta if g is None else delta - g / q.ridge)
    return w, (gram, z.double(), Ag)


@dataclass
class GramCache:
    """The last support S a caller solved on one quadratic model and its X_S X_Sᵀ (n, n) float64,
    for callers that solve many nearby supports in a row (the layer search's trials): the next
    Gram matrix is then an update from the changed columns (:func:`updated_gram`, 2·n²·|changed|
    flops) instead of a new one (n²·|S|). ``chain`` counts the updates since the last Gram matrix
    computed afresh; after MAX_CHAIN the next is computed afresh, bounding the rounding a chain of
    updates accumulates (float64 sums of float32 columns: about 1e-16 of the Gram's scale each)."""

    support: torch.Tensor | None = None      # (p,) bool, this process's slice of the weights
    gram: torch.Tensor | None = None
    chain: int = 0

    MAX_CHAIN = 32

    def base(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(S, gram, chain) to update from for supports shaped like ``like`` (p,), or None."""
        if self.gram is None or self.support.shape != like.shape:
            return None
        return self.support, self.gram, self.chain


def updated_gram(q: QuadraticModel, gram: torch.Tensor, added: torch.Tensor, removed: torch.Tensor,
                 block: int = 4096) -> torch.Tensor:
    """X_S' X_S'ᵀ from X_S X_Sᵀ (n, n) float64 when S' = S + ``added`` − ``removed`` (index
    tensors): two rank-m corrections, from the changed columns only, ``block`` at a time."""
    if q.sliced_vectors:      # each rank its own changed columns, one all-reduce of n²
        change = torch.zeros_like(gram)
        for index, sign in ((added, 1.0), (removed, -1.0)):
            for part in index.split(block):
                columns = q.columns(part, torch.float64)
                change.addmm_(columns, columns.t(), alpha=sign)
        return gram + q.collective.all_reduce(change)
    gram = gram.clone()
    for index, sign in ((added, 1.0), (removed, -1.0)):
        for part in index.split(block):
            columns = q.columns(part, torch.float64)
            gram.addmm_(columns, columns.t(), alpha=sign)
    return gram


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
        X_B = q.X[:, block].to(q.dtype)
        z = X_B @ torch.where(keep, 0, q.w_bar[block])          # X_{B∖S} w̄_{B∖S}
        g = None if q.linear is None else q.linear[block][index]
        w[start + index] = q.w_bar[block][index] + _support_step(select_columns(X_B, index), z, g, q.ridge)
    return w


def _support_step(A: torch.Tensor, z: torch.Tensor, g: torch.Tensor | None, ridge: float) -> torch.Tensor:
    """δ (s,) solving (AᵀA/n + λI) δ = Aᵀz/n − g, for A (n, s), z (n,), g (s,) or None.

    s ≤ n: factor the s×s matrix. s > n: Woodbury in its push-through form,
        (AᵀA/n + λI)⁻¹ = (1/λ)[I − Aᵀ M⁻¹ A],   (AᵀA/n + λI)⁻¹ Aᵀ = n Aᵀ M⁻¹,   M = AAᵀ + nλI,
    gives δ = Aᵀ M⁻¹ (z + A g/λ) − g/λ: one n×n factorisation, and no 1/λ amplification of the
    data term (:func:`backsolve_with_parts` does this without forming A). The Gram matrix is
    formed in A's dtype, the small system is solved in float64.
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
    M = gram.to(torch.float64, copy=True)                      # gram itself stays as it was
    M.diagonal().add_(shift)
    return cholesky_solve_vector(spd_cholesky(M), rhs.double()).to(rhs.dtype)


def cholesky_solve_vector(L: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(LLᵀ)⁻¹v for one vector v. The right-hand side goes in as two columns (v and 0): some
    CPU BLAS builds take a slow path for a single one (0.3 s instead of 1 ms at n = 1000)."""
    return torch.cholesky_solve(torch.stack([v, torch.zeros_like(v)], 1), L)[:, 0]

