"""Magnitude pruning baselines on a flat weight vector.

Each function returns a keep mask (p,) bool; kept weights keep their values.
"""

from __future__ import annotations

from typing import Callable

import torch

from .ilp import solve_flops_ilp
from .search import largest_fitting_k


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k largest entries of ``scores`` (p,); ties go to the lower index, so the
    result is the same on every run and thread count, and grows with k (nested masks)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        keep[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return keep


def magnitude_global(w: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest |w| over all layers. w: (p,)."""
    return top_k_mask(w.abs(), k)


def magnitude_uniform(w: torch.Tensor, layer_slices: list[slice], k: int) -> torch.Tensor:
    """Keep the same share of every layer (the largest |w| in each), k in total at most.

    Layer j keeps floor(k * n_j / p) weights; the few left over by the rounding go to the
    layers with the largest remainders, so exactly k are kept.
    """
    p = w.numel()
    sizes = torch.tensor([s.stop - s.start for s in layer_slices], dtype=torch.float64)
    exact = sizes * (k / p)
    quota = exact.floor().long()
    leftover = k - int(quota.sum())
    if leftover:
        quota[torch.topk(exact - quota, leftover).indices] += 1
    keep = torch.zeros(p, dtype=torch.bool, device=w.device)
    for sl, q in zip(layer_slices, quota.tolist()):
        keep[sl] = top_k_mask(w[sl].abs(), q)
    return keep


def magnitude_flops(w: torch.Tensor, layer_slices: list[slice], layer_macs: list[int],
                    k: int, max_macs: int | None):
    """Keep the most squared magnitude subject to both budgets: at most k nonzeros and
    Σ macs_i over kept weights at most ``max_macs`` (an ILP, solved with a certified gap).

    Returns (keep (p,) bool, ILPResult).
    """
    if max_macs is None:
        return magnitude_global(w, k), None
    result = solve_flops_ilp(w.double() ** 2, layer_slices=layer_slices,
                             layer_costs=[float(c) for c in layer_macs],
                             max_count=k, max_cost=float(max_macs))
    return result.keep, result


def fit_k_to_macs(mask_for_k: Callable[[int], torch.Tensor], macs_per_weight: torch.Tensor,
                  k: int, max_macs: int | None) -> torch.Tensor:
    """The mask of the largest k' <= k whose MACs fit ``max_macs``.

    For methods that only know a count budget: with a FLOP budget they prune further, to
    the sparsity that lands within the MACs (the masks must grow with k for this to be exact).
    """
    if max_macs is None:
        return mask_for_k(k)
    return largest_fitting_k(mask_for_k, lambda mask: int(macs_per_weight[mask].sum()), k, max_macs)[1]
