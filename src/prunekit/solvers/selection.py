"""Order statistics over a vector cut into contiguous slices, one per process, by exchanging
counts only (never the values): the top-k mask of IHT and FALCON when every process holds a slice
of the (p,) vectors (:class:`~prunekit.solvers.sharded_quadratic.SlicedQuadraticModel`).

A float's IEEE-754 bits, read as a signed integer and with the negative ones' magnitude bits
flipped, order the same way as the floats (:func:`order_keys`). The k-th largest value is then
the largest integer t with #{key ≥ t} ≥ k, found by bisection on t: each round is one all-reduce
of one count (64 rounds at most). Ties at the threshold go to the lower global index: to the
lower rank first (slices are contiguous, in rank order), then to the lower index within a slice,
which is what one process's stable sort gives.
"""

from __future__ import annotations

import torch

from .collective import Collective

_MAGNITUDE_BITS = 0x7FFFFFFFFFFFFFFF


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as ``values`` (any float dtype; -0.0 and 0.0 get the same key).
    NaN is not ordered: do not pass it."""
    v = values.to(torch.float64) + 0.0            # -0.0 + 0.0 = +0.0
    bits = v.view(torch.int64)
    return torch.where(bits < 0, bits ^ _MAGNITUDE_BITS, bits)


def exclusive_prefix(collective: Collective, counts: torch.Tensor) -> torch.Tensor:
    """Σ over the ranks before this one of ``counts`` (int64 tensor of any shape; R·size values
    are exchanged)."""
    every = collective.all_gather(counts.reshape(-1).to(torch.int64)).reshape(collective.size, -1)
    return every[:collective.rank].sum(0).reshape(counts.shape)


def sliced_top_k_mask(scores: torch.Tensor, k: int, collective: Collective) -> torch.Tensor:
    """True at this slice's entries among the k largest of all slices of ``scores`` (ties to the
    lower global index). Communication: about 64 all-reduces of one int64, one all-gather of R."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    device = scores.device
    keys = order_keys(scores)

    def total(x: int) -> int:
        return int(collective.all_reduce(torch.tensor([x], dtype=torch.int64, device=device)))

    size = total(keys.numel())
    if k <= 0:
        return keep
    if k >= size:
        return torch.ones_like(keep)
    # the extreme keys over all slices (a slice may be empty)
    big = torch.iinfo(torch.int64).max
    local = torch.tensor([int(keys.max()) if keys.numel() else -big, -int(keys.min()) if keys.numel() else -big],
                         dtype=torch.int64, device=device)
    high, neg_low = (int(x) for x in collective.all_reduce_max(local))
    lo, hi = -neg_low, high + 1          # #{key ≥ lo} = size ≥ k > 0 = #{key ≥ hi}
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if total(int((keys >= mid).sum())) >= k:
            lo = mid
        else:
            hi = mid
    above = keys > lo
    ties = keys == lo
    need = k - total(int(above.sum()))
    before = int(exclusive_prefix(collective, torch.tensor([int(ties.sum())], device=device)))
    take = min(max(need - before, 0), int(ties.sum()))
    keep |= above
    if take:
        keep[ties.nonzero().squeeze(1)[:take]] = True
    return keep
