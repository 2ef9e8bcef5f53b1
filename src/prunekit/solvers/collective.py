"""The one thing solvers know about other processes: a communicator with a sum (and max) all-reduce
and an all-gather. :class:`Collective` is the one-process one (every call returns its input), so the
one-process path runs exactly the code it always ran; :class:`prunekit.distributed.TorchCollective`
is the same interface over ``torch.distributed``. Solvers never import a process group.
"""

from __future__ import annotations

import torch


class Collective:
    """One process: rank 0 of 1. Subclasses talk to the others.

    ``bytes_sent`` counts the payload bytes this process handed to collectives (0 here), so a
    benchmark can report communication per solver iteration.
    """

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over all processes (every process gets the same
        values). May work in place; returns the result."""
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of ``tensor`` over all processes. May work in place."""
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The 1-D ``tensor`` of every process concatenated in rank order (lengths may differ)."""
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        return obj

    def barrier(self) -> None:
        """Wait until every process gets here."""


def shard_bounds(p: int, size: int) -> list[tuple[int, int]]:
    """The contiguous column range [start, stop) of each of ``size`` ranks over p columns: equal
    shares, the first p mod size ranks one column more."""
    base, extra = divmod(p, size)
    bounds, start = [], 0
    for rank in range(size):
        stop = start + base + (rank < extra)
        bounds.append((start, stop))
        start = stop
    return bounds
