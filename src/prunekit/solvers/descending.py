"""Exact descending orders of a score vector: the ``keep`` largest, largest first, ties by
position; cold (one sort of 64-bit keys) or warm (from an earlier order of nearby scores)."""

from __future__ import annotations

import numpy as np
import torch


def top_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """(q,) bool: the ``keep`` (< q) largest of ``values``, ties at the k-th value by position."""
    kth = torch.kthvalue(values, values.numel() - keep + 1).values      # the keep-th largest
    chosen = values > kth
    tied = torch.nonzero(values == kth).flatten()
    chosen[tied[: keep - int(chosen.sum())]] = True
    return chosen


def descending(scores: np.ndarray, keep: int, values_out: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``keep`` largest of ``scores`` (q,) float64 (>= 0), largest first, ties by
    position. ``values_out``: (keep,) float64 to receive those scores in that order.

    One sort of 64-bit keys, each a score's leading bits (inverted: largest first) above its
    position (:func:`_key_order`), with NumPy's vectorised sort: 2-3x faster than torch's
    stable sort of the float64 scores (and its selection when ``keep`` < q) on 2 cores; scores
    that share their leading bits but differ further down are then put in order by a stable sort
    of the laid-out scores (nearly sorted: near-linear). Same result as :func:`descending_torch`."""
    keep = min(keep, scores.size)
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    if scores.size >= KEY_SORT_MAX:
        return descending_torch(scores, keep, values_out)
    return _key_order(scores, keep, values_out)


KEY_SORT_MAX = 1 << 31                 # positions in 31 bits: 33 leading bits of each score in the key


def _key_order(scores: np.ndarray, keep: int, values_out: np.ndarray | None) -> np.ndarray:
    """:func:`descending` by one sort of keys (0 < ``keep``, ``scores.size`` < 2^31)."""
    n = scores.size
    shift = np.uint64(max(1, (n - 1).bit_length()))            # the position's bits
    low = np.uint64((1 << int(shift)) - 1)
    key = np.left_shift(scores.view(np.uint64), np.uint64(1))   # the 63 value bits at the top (-0.0 as +0.0:
                                                                # scores >= 0 order as their bits)
    np.invert(key, out=key)                                     # ascending key = descending score
    np.bitwise_and(key, ~low, out=key)                          # the leading 64 - shift of them ...
    np.bitwise_or(key, np.arange(n, dtype=np.uint64), out=key)  # ... above the position
    key.sort()
    # The first ``keep`` keys are the ``keep`` largest scores unless a run of equal leading bits
    # (scores that may differ below them) crosses the cut: take that run whole, sort, then cut.
    end = keep if keep == n else int(np.searchsorted(key, key[keep - 1] | low, side="right"))
    order = np.bitwise_and(key[:end], low, out=key[:end]).view(np.int64)
    values = values_out if values_out is not None and end == keep else np.empty(end)
    np.take(scores, order, out=values)
    del key
    if end > 1 and (values[1:] > values[:-1]).any():            # equal leading bits, out of order below
        np.negative(values, out=values)
        by_value = np.argsort(values, kind="stable")            # equal scores stay in position order
        order = order[by_value]
        values[...] = values[by_value]
        np.negative(values, out=values)
        del by_value
    if end > keep:
        order = order[:keep].copy()
        if values_out is not None:
            values_out[...] = values[:keep]
    return order


def descending_torch(scores: np.ndarray, keep: int, values_out: np.ndarray | None = None) -> np.ndarray:
    """:func:`descending` by torch's selection and stable sort (the reference; used when the
    positions need more than 31 bits)."""
    values = torch.from_numpy(scores)
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates = None                   # every score (a whole group): sorted in place of a copy
    if keep < values.numel():
        candidates = torch.nonzero(top_mask(values, keep)).flatten()
        values = values[candidates]
    out = None if values_out is None else (torch.from_numpy(values_out), torch.empty(keep, dtype=torch.int64))
    order = torch.sort(values, descending=True, stable=True, out=out).indices
    return (order if candidates is None else candidates[order]).numpy()


WARM_MAX_DISORDER = 0.15
DISORDER_SAMPLE = 1 << 16


def descending_from(scores: np.ndarray, keep: int, previous: np.ndarray,
                     values_out: np.ndarray | None = None) -> np.ndarray | None:
    """:func:`descending` (the same positions in the same order) started from ``previous``:
    distinct positions that an earlier sort of nearby scores put in descending order (FALCON's
    successive projections). The kept positions are laid out in that order, those it lacks
    appended, and sorted by NumPy's stable sort, a timsort that takes nearly linear time on
    nearly sorted input; equal scores are then put back in position order. None (sort cold)
    when, on a sample, more than ``WARM_MAX_DISORDER`` of neighbours in ``previous`` are out of
    order for the new scores: the runs are then too short for the warm start to pay."""
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    if previous.size < 2:
        return None
    pairs = np.linspace(0, previous.size - 2, min(previous.size - 1, DISORDER_SAMPLE)).astype(np.int64)
    if np.count_nonzero(scores[previous[pairs + 1]] > scores[previous[pairs]]) > WARM_MAX_DISORDER * pairs.size:
        return None
    laid_out = previous
    if keep < scores.size or previous.size < scores.size:   # lay out the kept positions only, all of them
        chosen = np.ones(scores.size, dtype=bool) if keep >= scores.size else top_mask(torch.from_numpy(scores), keep).numpy()
        laid_out = previous[chosen[previous]]
        chosen[previous] = False
        if chosen.any():
            laid_out = np.concatenate([laid_out, np.flatnonzero(chosen).astype(laid_out.dtype, copy=False)])
        del chosen
    values = np.empty(keep) if values_out is None else values_out   # the scores laid out, then sorted
    np.take(scores, laid_out, out=values)
    np.negative(values, out=values)                         # ascending: largest score first
    by_value = np.argsort(values, kind="stable")
    order = laid_out[by_value]
    del laid_out
    values[...] = values[by_value]
    del by_value
    np.negative(values, out=values)
    _ties_by_position(order, values)
    return order


def _ties_by_position(order: np.ndarray, values: np.ndarray) -> None:
    """Sort ``order`` ascending (in place) within each run of equal ``values`` (sorted); only the
    runs found out of order are touched."""
    new_run = np.empty(values.size, dtype=bool)
    new_run[0] = True
    np.not_equal(values[1:], values[:-1], out=new_run[1:])
    wrong = ~new_run[1:] & (order[1:] < order[:-1])
    if not wrong.any():
        return
    small = order.size < 2**31
    run = torch.cumsum(torch.from_numpy(new_run), 0, dtype=torch.int32 if small else torch.int64).numpy()
    in_wrong_run = np.zeros(int(run[-1]) + 1, dtype=bool)
    in_wrong_run[run[1:][wrong]] = True
    at = np.flatnonzero(in_wrong_run[run])
    if small:                           # (run, position) in one int64 key: a plain sort
        key = (run[at].astype(np.int64) << 32) | order[at]
        key.sort()
        order[at] = key & 0xFFFFFFFF
    else:
        order[at] = order[at][np.lexsort((order[at], run[at]))]
