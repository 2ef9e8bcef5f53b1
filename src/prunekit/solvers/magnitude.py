"""Magnitude pruning baselines on a flat weight vector.

Each function returns a keep mask (p,) bool; kept weights keep their values.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .ilp import Squares, solve_flops_ilp
from .search import largest_fitting_k


CHUNK = 2**18          # entries whose int64 keys top_k_mask makes at once (2 MB of keys)
_MAGNITUDE_BITS = 0x7FFFFFFFFFFFFFFF
_SIGN_BIT = -2**63
_DIGIT_BITS = 16       # bits of the key each round of the radix select counts (65,536 buckets)


def _keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys of ``values`` (one chunk) that order as ``torch.sort`` orders them: floats by
    their IEEE-754 bits in float64, -0.0 and 0.0 alike, every NaN above +inf (as the sort puts
    it); integers by value."""
    if values.is_floating_point():
        v = values.to(torch.float64) + 0.0            # -0.0 + 0.0 = +0.0
        v = torch.where(torch.isnan(v), math.nan, v)   # one NaN, the positive one: above +inf
        bits = v.view(torch.int64)
        bits = torch.where(bits < 0, bits ^ _MAGNITUDE_BITS, bits)
    else:
        bits = values.to(torch.int64)
    return bits


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k largest entries of ``scores`` (p,); ties go to the lower index, so the
    result is the same on every run and thread count, and grows with k (nested masks).

    The same mask as keeping the first k of a stable descending sort, without sorting: the k-th
    largest value is found by a radix select on order-preserving int64 keys (_keys), 16 bits a
    round over chunks of CHUNK entries, and its ties are taken in index order. Beside the (p,)
    bool mask it holds a few CHUNK-long temporaries and 65,536 counts (the sort it replaces held
    about 33 bytes per entry: its values, int64 indices and sort buffers).
    """
    flat = scores.reshape(-1)
    p = flat.numel()
    keep = torch.zeros(p, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep.reshape(scores.shape)
    if k >= p:
        return keep.fill_(True).reshape(scores.shape)
    chunks = [flat[start:start + CHUNK] for start in range(0, p, CHUNK)]
    need, prefix = k, 0       # need: how many of the entries matching prefix are among the k largest
    for shift in range(64 - _DIGIT_BITS, -1, -_DIGIT_BITS):
        counts = torch.zeros(2**_DIGIT_BITS, dtype=torch.int64, device=scores.device)
        high = shift + _DIGIT_BITS            # the bits fixed so far: those at and above ``high``
        for chunk in chunks:
            keys = _keys(chunk) ^ _SIGN_BIT       # ordered as unsigned integers: byte by byte
            if high < 64:
                keys = keys[((keys >> high) & ((1 << (64 - high)) - 1)) == (prefix >> high)]
            counts += torch.bincount((keys >> shift) & (2**_DIGIT_BITS - 1), minlength=2**_DIGIT_BITS)
        above = counts.flip(0).cumsum(0)      # above[j]: entries in the buckets 65535 - j and higher
        top = int(torch.searchsorted(above, torch.tensor([need], device=above.device)))   # first reaching need
        digit = 2**_DIGIT_BITS - 1 - top
        need -= int(above[top - 1]) if top else 0
        prefix |= digit << shift
    threshold = prefix - 2**63                # the k-th largest key (_keys's signed form)
    # keep those above the threshold and the first ``need`` of those equal to it, in index order
    start = 0
    for chunk in chunks:
        keys = _keys(chunk)
        piece = keep[start:start + chunk.numel()]
        torch.gt(keys, threshold, out=piece)
        if need:
            ties = (keys == threshold).nonzero().squeeze(1)[:need]
            piece[ties] = True
            need -= ties.numel()
        start += chunk.numel()
    return keep.reshape(scores.shape)


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
    if w.device.type == "cpu":          # the squares read from w where needed: no p-long float64 vector
        roots = w.detach().reshape(-1)
        roots = roots if roots.dtype in (torch.float32, torch.float64) else roots.to(torch.float32)
        squares = Squares(roots.contiguous().numpy())
    else:                               # on an accelerator the sort runs there, on the squares
        squares = w.to(torch.float64, copy=True).square_()
    result = solve_flops_ilp(squares, layer_slices=layer_slices,
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
