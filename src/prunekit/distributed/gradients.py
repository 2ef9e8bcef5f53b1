"""Gradient matrices sharded by columns: each rank computes the rows of its share of the samples,
then the ranks swap blocks so that each holds all n rows of its share of the columns.

Rank r takes samples [r·m, (r+1)·m) of the stream (m = ⌈n/R⌉ rows; the last rank fewer), so
the rows, put back in rank order, are the rows one process would compute. Nothing of size n×p
is ever on one rank: its rows are computed and sent in 4R pieces, so the peak is its n×p/R
columns plus one piece of m/4R rows × p.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from ..fisher import collect_gradients, keep_columns, passes, skip_samples
from ..fisher_batches import gradient_bar
from ..options import OptionError
from ..params import ParamSpace
from ..solvers.collective import Collective, shard_bounds



PIECES_PER_RANK = 4      # pieces of its rows a rank computes and sends, per rank (memory: 1/(4R²) of X)


def row_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """The rows [start, stop) each rank computes: ⌈n/size⌉ each, the last ones fewer (maybe none)."""
    per = -(-n // size)
    return [(min(n, r * per), min(n, (r + 1) * per)) for r in range(size)]


def collect_sharded_gradients(model, space: ParamSpace, batches: Callable[[], Iterable], n: int,
                              collective: Collective, columns: torch.Tensor | None = None, *, batch: int = 1,
                              chunk: int = 64, dtype: torch.dtype = torch.float32, progress: bool = False,
                              bn: str = "frozen", skip: int = 0, repeat: bool = False,
                              loss_fn=None, kind: str = "empirical", seed: int = 0,
                              loss_scale: float = 1.0) -> tuple[torch.Tensor, int]:
    """(X_r, offset): this rank's columns of the (n, p') gradient matrix and where they start.

    batches: a function returning the stream of (x, y) training batches, the same at every call.
    columns: the indices (p',) of the weights kept in the matrix (default all p), sorted; rank r
             keeps the r-th contiguous share of them (:func:`shard_bounds`).
    skip:    samples of the stream before the first row's (``fresh_samples``: earlier stages' rows).
    repeat:  the stream is ``batches()`` pass after pass (:func:`prunekit.fisher.passes`), as one
             process reads it for mini-batch rows or fresh samples.
    Other arguments as :func:`prunekit.fisher.collect_gradients` (``loss_scale``: the power of two
    every rank scales the loss by, the same on all of them); ``batch`` samples make a row,
    each on its own statistics with ``bn="batch"``, so the rows are one process's rows.

    Each rank computes its rows in 4R pieces and hands each piece's column blocks to their owners
    before computing the next, so the peak is n·p'/R (its columns) + n·p'/(4R²) (a piece) + a
    block of it, not 2·n·p'/R.
    """
    rank, size = collective.rank, collective.size
    start, stop = row_ranges(n, size)[rank]
    width = space.numel if columns is None else columns.numel()
    bounds = shard_bounds(width, size)
    lo, hi = bounds[rank]
    device = space.weights()[0].device
    per = -(-n // size)                       # rows per rank (the last ranks may have fewer)
    pieces = PIECES_PER_RANK * size
    piece = -(-per // pieces)                 # rows per piece
    slot = piece * pieces                     # rows reserved per source rank (≥ per)
    received = torch.empty(slot * size, hi - lo, dtype=dtype, device=device)
    with gradient_bar(stop - start, progress and rank == 0) as bar:     # one bar over this rank's pieces
        for j in range(pieces):
            first, last = min(stop, start + j * piece), min(stop, start + (j + 1) * piece)
            rows = torch.empty(0, width, dtype=dtype, device=device)
            short = None
            if last > first:
                stream = passes(batches()) if repeat else batches()
                try:
                    rows = collect_gradients(model, space, skip_samples(stream, skip + first * batch), last - first,
                                             batch=batch, chunk=chunk, dtype=dtype, progress=bar,
                                             bn=bn, loss_fn=loss_fn, kind=kind, seed=seed, loss_scale=loss_scale)
                except OptionError as error:      # this rank's rows ran past the end of the data
                    short = error
                if columns is not None and short is None:
                    rows = keep_columns(rows, columns)
            _raise_together(short, collective, device, n, batch)
            _send_piece(rows, piece, bounds, received, [s * slot + j * piece for s in range(size)], collective)
            del rows
    return _close_gaps(received, n, per, slot, size), lo


def _raise_together(short: OptionError | None, collective: Collective, device, n: int, batch: int) -> None:
    """Every rank learns whether any rank's rows ran past the data, so that all of them stop with
    one message instead of one raising while the others wait in the next gather."""
    anyone = int(collective.all_reduce_max(torch.tensor([int(short is not None)], device=device)))
    if short is not None:
        raise short
    if anyone:
        raise OptionError(f"the training data ran out before the {n} gradient rows of {batch} sample(s) on another "
                          "rank: lower fisher_samples or fisher_batch, or give more training samples",
                          ("fisher_samples", "fisher_batch"))


def _send_piece(rows, piece, bounds, received, at, collective) -> None:
    """Gather each column block of ``rows`` (≤ piece, p') to its owner, which receives rank s's
    block into ``received[at[s]:at[s] + piece]``. Blocks travel as bytes (exact for every dtype,
    and every backend gathers uint8)."""
    rank = collective.rank
    for dest, (a, b) in enumerate(bounds):
        block = torch.zeros(piece, b - a, dtype=received.dtype, device=received.device)
        block[:rows.shape[0]] = rows[:, a:b]
        targets = [received[i:i + piece].view(torch.uint8) for i in at] if dest == rank else None
        dist.gather(block.view(torch.uint8), targets, dst=dest)
        collective.bytes_sent += block.numel() * block.element_size()
        collective.calls += 1


def _close_gaps(received: torch.Tensor, n: int, per: int, slot: int, size: int) -> torch.Tensor:
    """Rank s's rows sit at [s·slot, s·slot + its count); move them to [s·per, ...) in place (a
    move to lower rows, one row at a time) and return the first n rows (a view)."""
    if slot != per:
        for s, (r0, r1) in enumerate(row_ranges(n, size)):
            for i in range(r1 - r0):
                received[r0 + i] = received[s * slot + i]
    return received[:n]
