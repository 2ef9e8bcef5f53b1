"""The quadratic model with X sharded by columns over processes, behind QuadraticModel's interface.

Rank r holds X_r = X[:, start_r:stop_r] (all n rows of a contiguous share of the weights); the
(p,) vectors (w̄, iterates, gradients, supports) are replicated, so every solver runs unchanged
and makes the same decisions on every rank. Communication per product (``collective``):

    Xv          Σ_r X_r v_r                    all-reduce of an n-vector
    Xᵀr         [X_0ᵀr, X_1ᵀr, ...]            all-gather of the p/R-vectors (p values in all)
    X_S X_Sᵀ    Σ_r X_{r,S} X_{r,S}ᵀ           all-reduce of n×n
    X[:, I]     each column from its owner     all-reduce of n×|I| (|I| ≤ n or a few hundred)
    H_jj        local, then gathered once      all-gather of p values

Memory per rank: n·p/R for X plus the replicated vectors. With one process this class is never
used; :class:`~prunekit.solvers.quadratic.QuadraticModel` is.
"""

from __future__ import annotations

import torch

from ..errors import PrunekitError
from .collective import Collective
from .quadratic import BLOCK_BYTES, QuadraticModel, compute_dtype, dot64, select_columns
from .selection import exclusive_prefix, sliced_top_k_mask


class ShardedQuadraticModel(QuadraticModel):
    """Q(w) as :class:`QuadraticModel`, with this rank holding only its columns of X.

    local_grads: X_r, (n, p_r), this rank's columns [offset, offset + p_r) of X (any storage dtype).
    w_bar:       w̄, (p,) the trained weights, all of them (the same on every rank).
    ridge, linear: as QuadraticModel (linear (p,), replicated).
    collective:  the communicator; offset: where this rank's columns start.
    """

    def __init__(self, local_grads: torch.Tensor, w_bar: torch.Tensor, ridge: float,
                 linear: torch.Tensor | None, collective: Collective, offset: int):
        p_local = local_grads.shape[1]
        if not 0 <= offset <= w_bar.numel() - p_local:
            raise PrunekitError(f"columns [{offset}, {offset + p_local}) are not inside the {w_bar.numel()} weights")
        self.collective = collective
        self.local = slice(offset, offset + p_local)
        self.shard = QuadraticModel(local_grads, w_bar[self.local], ridge,
                                    None if linear is None else linear[self.local]) if p_local else None
        self.X = local_grads
        self.n = local_grads.shape[0]
        self.p = w_bar.numel()
        self._compute_dtype = compute_dtype(local_grads.dtype)
        self.w_bar = w_bar.to(self._compute_dtype)
        self.ridge = float(ridge)
        self.linear = None if linear is None else linear.to(self._compute_dtype)
        self._lipschitz = None
        n_total = collective.all_reduce(torch.tensor([float(self.n)], dtype=torch.float64, device=local_grads.device))
        if int(n_total) != self.n * collective.size:
            raise PrunekitError("every rank must hold the same n rows of the gradient matrix")

    def _zeros(self, *shape, dtype=None) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype or self._compute_dtype, device=self.X.device)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """X v: (p,) -> (n,), one all-reduce of n values."""
        part = self.shard.matvec(v[self.local]) if self.shard else self._zeros(self.n)
        return self.collective.all_reduce(part)

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """Xᵀ r: (n,) -> (p,), each rank its own columns, then one all-gather."""
        part = self.shard.rmatvec(r) if self.shard else self._zeros(0)
        return self.collective.all_gather(part)

    def columns(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """X[:, index], (n, m): each rank fills the columns it owns, one all-reduce of n·m values."""
        out = self._zeros(self.n, index.numel(), dtype=dtype)
        mine = (index >= self.local.start) & (index < self.local.stop)
        if self.shard and bool(mine.any()):
            out[:, mine] = self.shard.columns(index[mine] - self.local.start, out.dtype)
        return self.collective.all_reduce(out)

    def gram(self, support: torch.Tensor) -> torch.Tensor:
        """X_S X_Sᵀ, (n, n) float64: each rank its columns, one all-reduce of n² values."""
        part = self.shard.gram(support[self.local]) if self.shard else self._zeros(self.n, self.n, dtype=torch.float64)
        return self.collective.all_reduce(part)

    def hessian_diagonal(self) -> torch.Tensor:
        part = self.shard.hessian_diagonal() if self.shard else self._zeros(0)
        return self.collective.all_gather(part)

    def column_blocks(self):
        raise PrunekitError("a sharded gradient matrix has no local view of every column; "
                            "use matvec, rmatvec, columns or gram")

    def restrict(self, index: torch.Tensor) -> tuple[QuadraticModel, float]:
        """As :meth:`QuadraticModel.restrict`; each rank keeps its own columns of ``index``
        (sorted, as ``nonzero`` gives it), so the sub-model is sharded the same way."""
        from .quadratic import dot64
        held = torch.ones(self.p, dtype=torch.bool, device=self.X.device)
        held[index] = False
        w_held = torch.where(held, self.w_bar, 0)
        z = self.matvec(w_held)
        linear = -self.rmatvec(z)[index] / self.n
        constant = dot64(z, z) / (2 * self.n) + self.ridge / 2 * dot64(w_held, w_held)
        if self.linear is not None:
            linear += self.linear[index]
            constant -= dot64(self.linear, w_held)
        mine = (index >= self.local.start) & (index < self.local.stop)
        offset = int((index < self.local.start).sum())
        X_A = select_columns(self.X, index[mine] - self.local.start)
        return ShardedQuadraticModel(X_A, self.w_bar[index], self.ridge, linear, self.collective, offset), constant

    def sliced(self) -> SlicedQuadraticModel:
        """This model with its (p,) vectors cut to this rank's columns (made once, then kept)."""
        if getattr(self, "_sliced", None) is None:
            self._sliced = SlicedQuadraticModel(self.X, self.w_bar[self.local], self.ridge,
                                                None if self.linear is None else self.linear[self.local],
                                                self.collective, self.local.start, self.p)
        return self._sliced


class SlicedQuadraticModel(QuadraticModel):
    """Q(w) with X AND every (p,) vector cut by columns: this rank holds X_r (n, p_r), w̄_r,
    g_r, and solvers pass it, and get back, only their slice w_r (p_r,) of each vector.

    Nothing of size p crosses ranks in a product: Xv = Σ_r X_r v_r (all-reduce of n values),
    Xᵀr is local, X_S X_Sᵀ an all-reduce of n×n; objective values, dot products, counts and
    maxima are all-reduces of a scalar or two; the top-k mask goes by counts
    (:mod:`~prunekit.solvers.selection`); a support of s ≤ n weights is gathered as its n×s
    columns (O(n²)). :meth:`to_global` (an all-gather of p values) is for the end of a solve.

    local_grads: X_r (n, p_r), may have no columns; w_bar, linear: this rank's slices (p_r,);
    offset: where this rank's columns start among the p; p: the total number of weights.
    """

    sliced_vectors = True

    def __init__(self, local_grads: torch.Tensor, w_bar: torch.Tensor, ridge: float,
                 linear: torch.Tensor | None, collective: Collective, offset: int, p: int):
        self.X = local_grads
        self.n, self.width = local_grads.shape
        self.p = p
        self.offset = offset
        self.local = slice(offset, offset + self.width)
        self.collective = collective
        self._compute_dtype = compute_dtype(local_grads.dtype)
        self.w_bar = w_bar.to(self._compute_dtype)
        self.ridge = float(ridge)
        self.linear = None if linear is None else linear.to(self._compute_dtype)
        self._lipschitz = None
        self.block_columns = max(1, BLOCK_BYTES // (4 * self.n))

    def _total(self, values: list[float]) -> list[float]:
        """Element sums over the ranks of a few float64 scalars (one all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.X.device)
        return self.collective.all_reduce(t).tolist()

    # --- products: X_r and this rank's slices --------------------------------------------

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """X v: (p_r,) slice -> (n,), one all-reduce of n values."""
        return self.collective.all_reduce(super().matvec(v))

    def gram(self, support: torch.Tensor) -> torch.Tensor:
        """X_S X_Sᵀ (n, n) float64 from this rank's slice of the support, one all-reduce of n²."""
        return self.collective.all_reduce(super().gram(support))

    def objective(self, w: torch.Tensor, residual: torch.Tensor | None = None) -> float:
        r = self.residual(w) if residual is None else residual
        delta = w - self.w_bar
        parts = [dot64(delta, delta), 0.0 if self.linear is None else dot64(self.linear, delta)]
        squares, linear = self._total(parts)
        return dot64(r, r) / (2 * self.n) + self.ridge / 2 * squares + linear

    # --- reductions over the slices ---------------------------------------------------------

    def sliced(self) -> SlicedQuadraticModel:
        return self

    def local_part(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.local]

    def to_global(self, v: torch.Tensor) -> torch.Tensor:
        if v.dtype == torch.bool:
            return self.collective.all_gather(v.to(torch.uint8)).bool()
        return self.collective.all_gather(v)

    def count(self, mask: torch.Tensor) -> int:
        t = torch.tensor([int(torch.count_nonzero(mask))], dtype=torch.int64, device=self.X.device)
        return int(self.collective.all_reduce(t))

    def total(self, value: float) -> float:
        return self._total([value])[0]

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return self._total([dot64(a, b)])[0]

    def largest(self, v: torch.Tensor, empty: float = -float("inf")) -> float:
        local = float(v.max()) if v.numel() else -float("inf")
        t = torch.tensor([local], dtype=torch.float64, device=self.X.device)
        value = float(self.collective.all_reduce_max(t))
        return empty if value == -float("inf") else value

    def top_k_mask(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return sliced_top_k_mask(scores, k, self.collective)

    def support_columns(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, slice]:
        """Every rank's columns of its ``index`` (n, |S|), in global order, and where this rank's
        are: an all-gather of n·|S| ≤ n² values."""
        mine = self.columns(index, dtype)
        before = int(exclusive_prefix(self.collective, torch.tensor([index.numel()], device=self.X.device)))
        every = self.collective.all_gather(mine.t().contiguous().reshape(-1))
        return every.reshape(-1, self.n).t(), slice(before, before + index.numel())

    def top_k_positions(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return self.positions(self.top_k_mask(scores, k))

    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Every rank's True entries as global indices (sorted: ranks hold contiguous slices in
        order): an all-gather of their count."""
        return self.collective.all_gather(mask.nonzero().squeeze(1) + self.offset)

    def _owned(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(which of the global ``index`` this rank holds, their positions in its slice)."""
        inside = (index >= self.offset) & (index < self.offset + self.width)
        return inside, index[inside] - self.offset

    def values_at(self, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Each rank fills the entries it holds; one all-reduce of m values."""
        inside, local = self._owned(index)
        out = torch.zeros(index.numel(), dtype=v.dtype, device=v.device)
        out[inside] = v[local]
        return self.collective.all_reduce(out)

    def columns_at(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Each rank fills the columns it holds; one all-reduce of n·m values."""
        out = torch.zeros(self.n, index.numel(), dtype=dtype or self._compute_dtype, device=self.X.device)
        inside, local = self._owned(index)
        if bool(inside.any()):
            out[:, inside] = self.columns(local, out.dtype)
        return self.collective.all_reduce(out)

    def assign_at(self, mask: torch.Tensor, index: torch.Tensor, value: bool) -> None:
        mask[self._owned(index)[1]] = value

    def restrict(self, index: torch.Tensor) -> tuple[SlicedQuadraticModel, float]:
        """As :meth:`QuadraticModel.restrict` with ``index`` this rank's positions (sorted) in its
        slice; the sub-model is sliced the same way (each rank keeps its own)."""
        held = torch.ones(self.width, dtype=torch.bool, device=self.X.device)
        held[index] = False
        w_held = torch.where(held, self.w_bar, 0)
        z = self.matvec(w_held)
        linear = -self.rmatvec(z)[index] / self.n
        parts = [dot64(w_held, w_held), 0.0 if self.linear is None else dot64(self.linear, w_held)]
        squares, held_linear = self._total(parts)
        constant = dot64(z, z) / (2 * self.n) + self.ridge / 2 * squares - held_linear
        if self.linear is not None:
            linear += self.linear[index]
        counts = torch.tensor([index.numel()], device=self.X.device)
        offset = int(exclusive_prefix(self.collective, counts))
        p = int(self.collective.all_reduce(counts.clone()))
        X_A = select_columns(self.X, index)
        return SlicedQuadraticModel(X_A, self.w_bar[index], self.ridge, linear, self.collective, offset, p), constant
