"""R simulated ranks as threads of one process, joined by a Collective over shared memory: the
sliced solvers' reductions checked fast, without process start-up (the gloo tests check the real
communicator)."""

from __future__ import annotations

import threading

import torch

from prunekit.solvers.collective import Collective


class _Hub:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list = [None] * size


class ThreadCollective(Collective):
    """Rank ``rank`` of ``hub.size`` threads; counts bytes as TorchCollective does."""

    def __init__(self, hub: _Hub, rank: int):
        super().__init__()
        self.hub, self.rank, self.size = hub, rank, hub.size

    def _exchange(self, tensor: torch.Tensor) -> list:
        self.hub.slots[self.rank] = tensor.clone()
        self.hub.barrier.wait()
        parts = list(self.hub.slots)
        self.hub.barrier.wait()
        return parts

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.calls += 1
        parts = self._exchange(tensor)
        tensor.copy_(sum(parts[1:], parts[0]))
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.calls += 1
        tensor.copy_(torch.stack(self._exchange(tensor)).amax(0))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.calls += 1
        return torch.cat(self._exchange(tensor))

    def barrier(self) -> None:
        self.hub.barrier.wait()


def run_threads(fn, size: int) -> list:
    """fn(collective) on ``size`` threaded ranks; returns each rank's result (re-raises errors)."""
    hub = _Hub(size)
    results: list = [None] * size
    errors: list = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadCollective(hub, rank))
        except BaseException as err:          # noqa: BLE001 - re-raised below
            errors.append(err)
            hub.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
