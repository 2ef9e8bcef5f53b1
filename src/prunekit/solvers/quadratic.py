"""The local quadratic model of the loss that CHITA and WoodFisher prune against.

Let X (n, p) hold one per-sample gradient of the loss at the trained weights w̄ per row. The
empirical Fisher XᵀX/n stands in for the Hessian, and the loss change of moving to w is modelled as

    Q(w) = (1/2n)‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + gᵀ(w − w̄)

with a ridge λ > 0 (it keeps w near w̄ in the p − n directions the gradients say nothing about)
and an optional first-order term g (e.g. the mean gradient, when w̄ is not a stationary point).
For g = 0 CHITA writes the same function as the least-squares problem
½‖y − Xw‖² + (nλ/2)‖w − w̄‖² with y = Xw̄, which is n·Q(w); we keep the (w − w̄) form.

Only X is stored: every product goes through X or Xᵀ, never a p×p matrix. X may be stored
compactly (bfloat16 or float16: half the memory); vectors then live in float32 and every product
with X (Xv, Xᵀr, Gram matrices of a support) converts X one block of columns at a time and
accumulates in float32 or better, so no full float32 copy of X is ever made. Vectors of a float32
or float64 X live in its dtype. Scalar reductions (objective values) are accumulated in float64.
"""

from __future__ import annotations

import operator

import torch

from ..errors import PrunekitError
from .collective import Collective


class QuadraticModel:
    """Q(w) = (1/2n)‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + gᵀ(w − w̄).

    grads:  X, (n, p) per-sample gradients at w̄: float32, float64, or bfloat16/float16 (compact
            storage; products then accumulate in float32, see the module docstring). May be a
            column slice of a wider matrix (row stride ≥ p).
    w_bar:  w̄, (p,) the trained weights.
    ridge:  λ > 0.
    linear: g, (p,) or None (no first-order term).
    """

    collective = Collective()      # one process: every reduction over slices is the identity
    sliced_vectors = False         # (p,) vectors are whole here (see SlicedQuadraticModel)

    def __init__(self, grads: torch.Tensor, w_bar: torch.Tensor, ridge: float,
                 linear: torch.Tensor | None = None):
        _check_inputs(grads, w_bar, ridge, linear)
        self.X = grads
        self.n, self.p = grads.shape
        self._compute_dtype = compute_dtype(grads.dtype)
        self.w_bar = w_bar.to(self._compute_dtype)
        self.ridge = float(ridge)
        self.linear = None if linear is None else linear.to(self._compute_dtype)
        self._lipschitz: float | None = None
        # columns converted per block: a float32 block of at most BLOCK_BYTES
        self.block_columns = max(1, BLOCK_BYTES // (4 * self.n))
        self.width = self.p          # columns held here (all of them; a slice in SlicedQuadraticModel)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of vectors and products (float32 for a compact X, else X's dtype)."""
        return self._compute_dtype

    @property
    def compact(self) -> bool:
        return self.X.dtype != self._compute_dtype

    def column_blocks(self):
        """(slice, X[:, slice] in the compute dtype) over consecutive blocks of columns."""
        for start in range(0, self.width, self.block_columns):
            block = slice(start, min(start + self.block_columns, self.width))
            yield block, self.X[:, block].to(self._compute_dtype)

    # --- products with X ------------------------------------------------------------------

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """X v: (p,) -> (n,)."""
        v = v.to(self._compute_dtype)
        if not self.compact:
            return self.X @ v
        out = torch.zeros(self.n, dtype=self._compute_dtype, device=self.X.device)
        for block, X_b in self.column_blocks():
            out += X_b @ v[block]
        return out

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """Xᵀ r: (n,) -> (p,)."""
        r = r.to(self._compute_dtype)
        if not self.compact:
            return self.X.t() @ r
        out = torch.empty(self.width, dtype=self._compute_dtype, device=self.X.device)
        for block, X_b in self.column_blocks():
            out[block] = X_b.t() @ r
        return out

    def columns(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """X[:, index], (n, m), in ``dtype`` (default: the compute dtype). For a few columns."""
        return select_columns(self.X, index).to(dtype or self._compute_dtype)

    def gram(self, support: torch.Tensor) -> torch.Tensor:
        """X_S X_Sᵀ, (n, n) float64, for the weights ``support`` (p,) bool, by column blocks
        (each block's product in the compute dtype, summed in float64): no n×|S| copy."""
        total = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.X.device)
        for start in range(0, self.width, self.block_columns):
            block = slice(start, min(start + self.block_columns, self.width))
            index = support[block].nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            A_b = self.X[:, block].index_select(1, index).to(self._compute_dtype)
            total += (A_b @ A_b.t()).double()
        return total

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        """r = X(w − w̄), (n,): the first-order change of each sample's loss."""
        return self.matvec(w - self.w_bar)

    # --- value and gradient ---------------------------------------------------------------

    def objective(self, w: torch.Tensor, residual: torch.Tensor | None = None) -> float:
        """Q(w). w: (p,); pass ``residual`` = X(w − w̄) (n,) if already known."""
        r = self.residual(w) if residual is None else residual
        delta = w - self.w_bar
        value = dot64(r, r) / (2 * self.n) + self.ridge / 2 * dot64(delta, delta)
        if self.linear is not None:
            value += dot64(self.linear, delta)
        return value

    def gradient(self, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """∇Q(w) = Xᵀ X(w − w̄)/n + λ(w − w̄) + g, (p,)."""
        r = self.residual(w) if residual is None else residual
        grad = self.rmatvec(r) / self.n + self.ridge * (w - self.w_bar)
        if self.linear is not None:
            grad += self.linear
        return grad

    def hessian_diagonal(self) -> torch.Tensor:
        """H_jj = ‖x_j‖²/n + λ, (p,). Row by row: one pass over X, no temporary of X's size."""
        total = torch.zeros_like(self.w_bar)
        for row in self.X:
            row = row.to(self._compute_dtype)
            total.addcmul_(row, row)
        return total / self.n + self.ridge

    def lipschitz(self) -> float:
        """L = λ_max(XᵀX/n) + λ, the Lipschitz constant of ∇Q, to about 1e-4 relative (from
        below). Computed once with X products only (see _largest_eigenvalue), then cached."""
        if self._lipschitz is None:
            self._lipschitz = _largest_eigenvalue(self) + self.ridge
        return self._lipschitz

    # --- this process's slice of the weights ------------------------------------------------
    # Solvers that run on a slice of every (p,) vector (SlicedQuadraticModel: each process its
    # contiguous columns) reduce across slices only through these. Here the slice is all of the
    # weights and each is exactly the plain one-process expression.

    def sliced(self) -> QuadraticModel:
        """This model with its (p,) vectors cut to the slice held here: itself (one process)."""
        return self

    def local_part(self, v: torch.Tensor) -> torch.Tensor:
        """This slice of a full (p,) vector."""
        return v

    def to_global(self, v: torch.Tensor) -> torch.Tensor:
        """The full (p,) vector from every slice of ``v`` (once per solve, not per iteration)."""
        return v

    def count(self, mask: torch.Tensor) -> int:
        """Σ mask (bool) over all slices (``count_nonzero``: ~10x faster than ``sum`` on a bool tensor)."""
        return int(torch.count_nonzero(mask))

    def total(self, value: float) -> float:
        """Σ over all slices of a number each slice computed from its own entries."""
        return value

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """aᵀb over all slices, accumulated in float64."""
        return dot64(a, b)

    def largest(self, v: torch.Tensor, empty: float = -float("inf")) -> float:
        """max v over all slices (``empty`` when there are no entries)."""
        return float(v.max()) if v.numel() else empty

    def top_k_mask(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """True at the k largest ``scores`` over all slices, ties to the lower index."""
        from .magnitude import top_k_mask
        return top_k_mask(scores, k)

    def top_k_positions(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """The global indices (sorted) of the k largest ``scores`` over all slices (k small)."""
        return torch.topk(scores, k).indices.sort().values

    def support_columns(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, slice]:
        """(X[:, S] (n, |S|) for the support S of every slice, the positions of this slice's
        ``index`` among them). For supports of at most n weights."""
        return self.columns(index, dtype), slice(0, index.numel())

    # Positions among all p weights ("global" indices, sorted) name a few weights, the same on
    # every slice: the swap search's candidates. Reads at them are the same on every process.

    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        """The global indices (sorted) where ``mask`` is True over every slice. For a few weights."""
        return mask.nonzero().squeeze(1)

    def values_at(self, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """v at the global indices ``index`` (m,), from whichever slice holds each."""
        return v[index]

    def columns_at(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """X[:, index] (n, m) for global indices ``index``."""
        return self.columns(index, dtype)

    def assign_at(self, mask: torch.Tensor, index: torch.Tensor, value: bool) -> None:
        """mask[index] = value for global indices ``index``, in place, in this slice."""
        mask[index] = value

    # --- sub-problems ---------------------------------------------------------------------

    def restrict(self, index: torch.Tensor) -> tuple[QuadraticModel, float]:
        """Q over the weights ``index`` (m,) with every other weight held at zero.

        Returns (sub, constant) with Q(w) = sub.objective(w[index]) + constant for every w that is
        zero outside ``index``. With A = index, R the rest and z = X_R w̄_R (the output of the
        weights held at zero), X(w − w̄) = X_A(w_A − w̄_A) − z, so expanding the square

            (1/2n)‖X_A(w_A − w̄_A) − z‖² = (1/2n)‖X_A(w_A − w̄_A)‖² − (X_Aᵀz/n)ᵀ(w_A − w̄_A) + ‖z‖²/2n

        gives a model of the same form on A with first-order term g_A − X_Aᵀz/n, plus the constant
        ‖z‖²/2n + (λ/2)‖w̄_R‖² − g_Rᵀw̄_R.
        """
        X_A = select_columns(self.X, index)                     # in X's storage dtype
        held = torch.ones(self.width, dtype=torch.bool, device=self.X.device)
        held[index] = False
        w_held = torch.where(held, self.w_bar, 0)               # (w̄_R, 0)
        z = self.matvec(w_held)                                 # X_R w̄_R
        linear = -self.rmatvec(z)[index] / self.n
        constant = dot64(z, z) / (2 * self.n) + self.ridge / 2 * dot64(w_held, w_held)
        if self.linear is not None:
            linear += self.linear[index]
            constant -= dot64(self.linear, w_held)
        return QuadraticModel(X_A, self.w_bar[index], self.ridge, linear), constant


def _largest_eigenvalue(q: QuadraticModel, max_steps: int = 64, rtol: float = 1e-4) -> float:
    """λ_max(XᵀX/n) by Lanczos on the smaller of XXᵀ/n (n×n) and XᵀX/n (p×p), using only X.

    Lanczos is power iteration that keeps every iterate: its Ritz value, the top eigenvalue of
    M restricted to span{u, Mu, ..., Mʲu}, is never below the power-iteration estimate after j
    steps, and unlike it converges fast even when the top eigenvalues are clustered (as for
    random X). The basis is re-orthogonalised in full (it has at most min(n, p, max_steps)
    vectors). Stops when the Ritz value moves less than ``rtol``, relative.
    """
    n, p = q.n, q.p
    if n <= p:
        dim, apply = n, lambda u: q.matvec(q.rmatvec(u)) / n     # XXᵀ/n, same nonzero spectrum
    else:
        # p < n: the p-vectors are shorter than the n-vectors, so a sliced model may gather them
        dim, apply = p, lambda v: q.to_global(q.rmatvec(q.matvec(q.local_part(v)))) / n
    start = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis = [start / start.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    ritz = 0.0
    for _ in range(min(max_steps, dim)):
        z = apply(basis[-1].to(device=q.X.device, dtype=q.dtype)).double().cpu()
        alphas.append(float(basis[-1] @ z))                      # α_j = q_jᵀ M q_j
        Q = torch.stack(basis)
        for _ in range(2):                                       # z ⟂ all q's ("twice is enough")
            z -= Q.t() @ (Q @ z)
        beta = float(z.norm())                                   # β_j = ‖M q_j − Σ ...‖
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        new_ritz = float(torch.linalg.eigvalsh(T)[-1])
        converged = abs(new_ritz - ritz) <= rtol * new_ritz or beta <= 1e-12 * new_ritz
        ritz = new_ritz
        if converged:
            break
        betas.append(beta)
        basis.append(z / beta)
    return max(ritz, 0.0)


BLOCK_BYTES = 8 * 2**20        # a compact X is converted to float32 this many bytes at a time
COMPACT_DTYPES = (torch.bfloat16, torch.float16)


def select_columns(X: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """X[:, index], (n, m) contiguous, for X (n, p) of any strides and index (m,) int64.

    ``X.index_select(1, index)`` first copies a non-contiguous X whole (a column slice of a wider
    matrix, as the stages' X is): 0.13 s to take 3 columns of a (500, 116133) slice. Taking the rows
    of Xᵀ reads only the columns asked for. A large selection (CHITA's active set: 1.5k columns)
    is gathered row by row into its (n, m) result instead: through Xᵀ it was made twice, (m, n)
    then its contiguous transpose, both alive at once (the memory plan counts one copy)."""
    n, m = X.shape[0], index.numel()
    if n * m * X.element_size() <= BLOCK_BYTES or X.stride(1) != 1:
        return X.t().index_select(0, index).t().contiguous()
    out = torch.empty(n, m, dtype=X.dtype, device=X.device)
    for row, target in zip(X, out):
        torch.index_select(row, 0, index, out=target)
    return out


def compute_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype products with an X stored in ``storage`` are accumulated in."""
    return torch.float32 if storage in COMPACT_DTYPES else storage


def spd_cholesky(M: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite M.

    Gram matrices built in float32 can lose definiteness to rounding when the gradients are
    large (late pruning stages); then a jitter growing from 1e-10·mean(diag M) is added.
    """
    L, info = torch.linalg.cholesky_ex(M)
    scale = float(M.diagonal().abs().mean()) or 1.0
    jitter = 1e-10 * scale
    while int(info) != 0:
        if jitter > 1e-2 * scale:
            raise PrunekitError("the quadratic model is numerically singular: raise the ridge (ridge or relative_ridge)")
        L, info = torch.linalg.cholesky_ex(M + jitter * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
        jitter *= 100
    return L


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """aᵀb accumulated in float64 (one float64 copy when ``a`` is ``b``: ‖a‖²)."""
    a64 = a.double()
    return float(torch.dot(a64, a64 if b is a else b.double()))


def _check_inputs(grads: torch.Tensor, w_bar: torch.Tensor, ridge: float,
                  linear: torch.Tensor | None) -> None:
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or not grads.is_floating_point():
        raise PrunekitError("grads must be a floating-point tensor of shape (n, p): one gradient per row")
    n, p = grads.shape
    if n == 0 or p == 0:
        raise PrunekitError(f"grads has shape {tuple(grads.shape)}; collect at least one gradient of at least one weight")
    if not isinstance(w_bar, torch.Tensor) or w_bar.shape != (p,):
        raise PrunekitError(f"w_bar must have shape ({p},) to match grads (n, p) = {tuple(grads.shape)}")
    if linear is not None and (not isinstance(linear, torch.Tensor) or linear.shape != (p,)):
        raise PrunekitError(f"linear must be None or have shape ({p},) to match grads")
    if not ridge > 0 or ridge == float("inf"):
        raise PrunekitError(f"ridge must be a positive finite number (got {ridge}); try 1e-4")


def check_k(k: int) -> int:
    """The number of weights to keep as an int, or PrunekitError."""
    try:
        count = operator.index(k)
    except TypeError:
        count = -1
    if count < 0:
        raise PrunekitError(f"k must be a non-negative integer number of weights to keep (got {k!r})")
    return count
