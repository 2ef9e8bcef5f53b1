"""WoodFisher: Optimal Brain Surgeon with a block-diagonal inverse empirical Fisher.

Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural Network
Compression", NeurIPS 2020 — the optimisation-based baseline CHITA compares against.

Per block b of ``block_size`` consecutive weights the Hessian is the damped empirical Fisher

    F_b = damp·I + X_bᵀX_b/n,

and the loss change is modelled as ½(w − w̄)ᵀF(w − w̄). Removing a set Q of weights of a block
from its current w (the others free to move) at least cost is the OBS step

    δw = −F⁻¹[:, Q] (F⁻¹[Q, Q])⁻¹ w_Q,     for one weight i:  δw = −(w_i / [F⁻¹]_ii) F⁻¹e_i,

which raises the model by the saliency ρ_i = w_i² / (2[F⁻¹]_ii). Afterwards the inverse Hessian
of the weights still free is the Schur complement

    F⁻¹ ← F⁻¹ − F⁻¹[:, Q] (F⁻¹[Q, Q])⁻¹ F⁻¹[Q, :],

whose rows and columns on Q are zero, so later steps never move a pruned weight. The p − k
removals are spread over ``steps`` rounds (WoodFisher's multiple-removal heuristic): each
round prunes the globally least salient weights and the saliencies are recomputed.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import PrunekitError
from .quadratic import QuadraticModel, check_k, compute_dtype, spd_cholesky
from .result import Solution


def woodfisher(grads: torch.Tensor, w_bar: torch.Tensor, k: int, *, block_size: int = 128,
               damp: float = 1e-5, steps: int = 10) -> Solution:
    """Prune w̄ to k nonzeros by OBS with the block-diagonal empirical Fisher.

    grads:      X, (n, p) per-sample gradients at w̄.
    w_bar:      w̄, (p,) the trained weights.
    k:          weights to keep; exactly p − k are set to zero (none if k ≥ p).
    block_size: B, weights per diagonal block (consecutive); the last block may be shorter.
                Memory is p·B numbers for the inverses.
    damp:       the damping added to each block's Fisher (also its ridge).
    steps:      pruning rounds, each removing an equal share of the p − k weights.

    The returned objective is Q(w) of QuadraticModel(grads, w_bar, ridge=damp) — the full, not
    the block-diagonal, model — so that it is comparable with CHITA's.
    """
    start = time.perf_counter()
    q = QuadraticModel(grads, w_bar, damp)
    k = min(check_k(k), q.p)
    if block_size < 1 or steps < 1:
        raise PrunekitError(f"block_size and steps must be positive (got {block_size}, {steps})")

    w = q.w_bar.clone()
    inverses = _block_inverses(q.X, block_size, damp)
    # One thread for the rounds: tens of thousands of OBS updates of B x B inverses, too small to
    # split; threads that wait for each other on a busy machine made them several times slower
    # (ResNet-20-B's solver, n = 8: 2.5 s on one thread, 11.7 s on two beside one other job).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = _prune_in_rounds(w, inverses, q.p, k, block_size, steps)
    finally:
        torch.set_num_threads(threads)
    return Solution(w=w, objective=q.objective(w), support_size=int((w != 0).sum()),
                    iterations=steps, seconds=time.perf_counter() - start,
                    info={"block_size": block_size, "damp": damp, "steps": steps})


def _prune_in_rounds(w: torch.Tensor, inverses: list[torch.Tensor], p: int, k: int, block_size: int,
                     steps: int) -> torch.Tensor:
    """The p - k removals in ``steps`` rounds, each of the least salient weights (w and the
    inverses updated in place); returns w."""
    pruned = torch.zeros(p, dtype=torch.bool, device=w.device)
    for step in range(1, steps + 1):
        count = (p - k) * step // steps - int(pruned.sum())        # removals in this round
        if count == 0:
            continue
        diag = torch.cat([inv.diagonal() for inv in inverses])      # [F⁻¹]_ii of each block
        saliency = torch.where(pruned, math.inf, w * w / (2 * diag))
        remove = torch.topk(saliency, count, largest=False).indices.sort().values
        blocks, counts = torch.unique_consecutive(remove // block_size, return_counts=True)
        for b, local in zip(blocks.tolist(), torch.split(remove % block_size, counts.tolist())):
            span = slice(b * block_size, (b + 1) * block_size)
            _remove(w[span], inverses[b], local)
        pruned[remove] = True
    return w


def _block_inverses(X: torch.Tensor, block_size: int, damp: float) -> list[torch.Tensor]:
    """Every block's damp·F_b⁻¹ (B, B), as views of one (p // B, B, B) tensor (and the short last
    block's own), filled block by block. Scaled by damp because OBS's choices (saliency ratios)
    and updates (F⁻¹[:, Q] (F⁻¹[Q, Q])⁻¹) do not change with a common scale of F⁻¹, while F⁻¹
    itself, about 1/damp, overflowed float32 when the relative ridge was denormal (gradients of a
    network with random weights: NaN reached pruned weights). One allocation of p·B numbers:
    kept one by one, the blocks interleaved with each block's float64 temporaries on the heap,
    and the process held 1.2-2.6x their bytes above X, vectors included (measured, n = 8-64,
    p = 65k-262k)."""
    n, p = X.shape
    full = p // block_size
    stacked = torch.empty(full, block_size, block_size, dtype=compute_dtype(X.dtype), device=X.device)
    for b in range(full):
        stacked[b] = _inverse_fisher(X[:, b * block_size:(b + 1) * block_size], damp, scaled=True)
    inverses = list(stacked.unbind(0))
    if full * block_size < p:
        inverses.append(_inverse_fisher(X[:, full * block_size:], damp, scaled=True))
    return inverses


def _inverse_fisher(X_b: torch.Tensor, damp: float, scaled: bool = False) -> torch.Tensor:
    """F_b⁻¹ = (damp·I + X_bᵀX_b/n)⁻¹, (B, B), for X_b (n, B); in X_b's dtype. ``scaled``: damp·F_b⁻¹
    instead, = (I + X_bᵀX_b/(n·damp))⁻¹, whose entries lie in [-1, 1] whatever damp is.

    B ≤ n: invert the B×B matrix. B > n: Woodbury, factoring only n×n:
        (damp·I + X_bᵀX_b/n)⁻¹ = (1/damp)[I − X_bᵀ (n·damp·I + X_bX_bᵀ)⁻¹ X_b].
    Factorisations in float64.
    """
    n, B = X_b.shape
    X = X_b.double()
    if B <= n:
        F = X.t() @ X / n
        F.diagonal().add_(damp)
        inverse = torch.cholesky_inverse(spd_cholesky(F))
        if scaled:
            inverse *= damp
    else:
        M = X @ X.t()
        M.diagonal().add_(n * damp)
        inverse = -X.t() @ torch.cholesky_solve(X, spd_cholesky(M))
        inverse.diagonal().add_(1.0)
        if not scaled:
            inverse /= damp
    return inverse.to(compute_dtype(X_b.dtype))


def _remove(w: torch.Tensor, inverse: torch.Tensor, local: torch.Tensor) -> None:
    """Prune weights ``local`` of one block in place: the joint OBS step on w (B,), then the
    Schur complement on ``inverse`` (B, B)."""
    cols = inverse[:, local]                                        # F⁻¹[:, Q]
    rhs = torch.cat([w[local].unsqueeze(1), inverse[local]], dim=1)  # [w_Q | F⁻¹[Q, :]]
    solved = torch.linalg.solve(cols[local], rhs)                   # (F⁻¹[Q, Q])⁻¹ [...]
    w -= cols @ solved[:, 0]
    inverse -= cols @ solved[:, 1:]
    w[local] = 0                                                    # exactly, not ≈ 0
    inverse[local] = 0
    inverse[:, local] = 0
