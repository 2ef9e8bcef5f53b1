"""Gradient matrices sharded by columns: each rank computes the rows of its share of the samples,
then the ranks swap blocks so that each holds all n rows of its share of the columns.

Rank r takes samples [r·m, (r+1)·m) of the stream (m = ⌈n/R⌉ rows; the last rank fewer), so
the rows, put back in rank order, are the rows one process would compute. Nothing of size n×p
is ever on one rank: the peak is its m×p rows, its n×p/R columns (received in place) and one
m×p/R block in flight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..fisher import collect_gradients
from ..params import ParamSpace
from ..solvers.collective import Collective, shard_bounds



def row_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """The rows [start, stop) each rank computes: ⌈n/size⌉ each, the last ones fewer (maybe none)."""
    per = -(-n // size)
    return [(min(n, r * per), min(n, (r + 1) * per)) for r in range(size)]


def _skip_samples(batches: Iterable, skip: int):
    """The stream of (x, y) batches without its first ``skip`` samples."""
    for x, y in batches:
        if skip >= x.shape[0]:
            skip -= x.shape[0]
            continue
        yield x[skip:], y[skip:]
        skip = 0


def collect_sharded_gradients(model, space: ParamSpace, batches: Iterable, n: int, collective: Collective,
                              columns: torch.Tensor | None = None, *, batch: int = 1, chunk: int = 64,
                              dtype: torch.dtype = torch.float32, progress: bool = False
                              ) -> tuple[torch.Tensor, int]:
    """(X_r, offset): this rank's columns of the (n, p') gradient matrix and where they start.

    columns: the indices (p',) of the weights kept in the matrix (default all p), sorted; rank r
             keeps the r-th contiguous share of them (:func:`shard_bounds`).
    Other arguments as :func:`prunekit.fisher.collect_gradients`; ``batch`` samples make a row.
    """
    rank, size = collective.rank, collective.size
    rows = row_ranges(n, size)
    start, stop = rows[rank]
    width = space.numel if columns is None else columns.numel()
    bounds = shard_bounds(width, size)
    device = space.weights()[0].device
    if stop > start:
        mine = collect_gradients(model, space, _skip_samples(batches, start * batch), stop - start, batch=batch,
                                 chunk=chunk, dtype=dtype, progress=progress and rank == 0)
        if columns is not None:
            mine = _keep_columns(mine, columns)
    else:
        mine = torch.empty(0, width, dtype=dtype, device=device)
    per = -(-n // size)
    lo, hi = bounds[rank]
    # rank s's rows land straight in rows [s·per, s·per + its count) of this rank's columns
    padded = torch.empty(per * size, hi - lo, dtype=dtype, device=device)
    carrier = torch.uint8        # blocks travel as bytes: exact for every dtype, and every backend gathers uint8
    for dest, (a, b) in enumerate(bounds):          # each column shard gathered to its owner
        block = torch.zeros(per, b - a, dtype=dtype, device=device)
        block[:mine.shape[0]] = mine[:, a:b]
        targets = [padded[s * per:(s + 1) * per].view(carrier) for s in range(size)] if dest == rank else None
        dist.gather(block.view(carrier), targets, dst=dest)
        collective.bytes_sent += block.numel() * block.element_size()
        collective.calls += 1
        del block
    del mine
    out = padded[:n]
    return out, lo


def _keep_columns(grads: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """grads[:, index] in place (each row compacted; a view of the first m columns)."""
    for row in grads:
        row[:index.numel()] = row[index]
    return grads[:, :index.numel()]
