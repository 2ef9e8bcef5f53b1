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
from .quadratic import QuadraticModel, compute_dtype


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
        n_total = collective.all_reduce(torch.tensor([float(self.n)], dtype=torch.float64))
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
        X_A = self.X.index_select(1, index[mine] - self.local.start)
        return ShardedQuadraticModel(X_A, self.w_bar[index], self.ridge, linear, self.collective, offset), constant
