"""Order statistics over a vector cut into contiguous slices, one per process, by exchanging
counts only (never the values): the top-k mask of IHT and FALCON when every process holds a slice
of the (p,) vectors (:class:`~prunekit.solvers.sharded_quadratic.SlicedQuadraticModel`).

A float's IEEE-754 bits, read as a signed integer and with the negative ones' magnitude bits
flipped, order the same way as the floats (:func:`order_keys`). The k-th largest value is then
the largest integer t with #{key ≥ t} ≥ k, found a byte at a time (8 rounds, each one all-reduce
of 256 counts). Ties at the threshold go to the lower global index: to the
lower rank first (slices are contiguous, in rank order), then to the lower index within a slice,
which is what one process's stable sort gives.
"""

from __future__ import annotations

import torch

from .collective import Collective

_MAGNITUDE_BITS = 0x7FFFFFFFFFFFFFFF
_SIGN_BIT = -2**63


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
    lower global index). Communication: 8 all-reduces of 256 counts, one all-gather of R.

    The k-th largest key is found a byte at a time, most significant first (radix select): each
    round counts the candidates' next byte into 256 buckets, sums the counts over the slices and
    keeps only the bucket that holds the k-th largest, so later rounds touch few entries.
    """
    keep = torch.zeros_like(scores, dtype=torch.bool)
    device = scores.device
    keys = order_keys(scores)

    def total(counts: torch.Tensor) -> torch.Tensor:
        return collective.all_reduce(counts.to(torch.int64))

    size = int(total(torch.tensor([keys.numel()], device=device)))
    if k <= 0:
        return keep
    if k >= size:
        return torch.ones_like(keep)
    # with the sign bit flipped the keys' bit patterns order as unsigned integers, byte by byte
    candidates = keys ^ _SIGN_BIT
    need, threshold = k, 0               # need: how many of the candidates are among the k largest
    for shift in range(56, -1, -8):
        digits = (candidates >> shift) & 0xFF
        counts = total(torch.bincount(digits, minlength=256)).tolist()
        above = 0
        for digit in range(255, -1, -1):              # the bucket where the k-th largest falls
            if above + counts[digit] >= need:
                break
            above += counts[digit]
        need -= above
        threshold |= digit << shift
        candidates = candidates[digits == digit]
    t = threshold - 2**63                             # back to a signed key
    above = keys > t
    ties = keys == t
    before = int(exclusive_prefix(collective, torch.tensor([int(ties.sum())], device=device)))
    take = min(max(need - before, 0), int(ties.sum()))
    keep |= above
    if take:
        keep[ties.nonzero().squeeze(1)[:take]] = True
    return keep
