"""Run a function in R processes joined by gloo on this machine (a free port, a time limit)."""

from __future__ import annotations

import os
import random
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999           # Linux's default


def free_port() -> int:
    """A port free now on 127.0.0.1, below the ephemeral range: a port the kernel hands out for
    ``bind(0)`` comes from the range it also takes the source ports of new connections from, so the
    many gloo connections of the other xdist worker's ranks could take it before a store binds it."""
    low, _ = _ephemeral_ports()
    first = 10000 if low > 12000 else 1024
    rng = random.Random()             # not the global generator: a test's seed neither picks nor moves it
    for _ in range(200):
        port = rng.randrange(first, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:        # no free port found below the range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every rank is done: leave without tearing gloo down, which can abort a rank whose peer (rank 0
    # hosts the store) has gone already ("terminate called without an active exception", -6).
    dist.barrier()
    os._exit(0)


def run_ranks(fn, world: int, out_dir, *args, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) in ``world`` processes; returns each rank's result (torch.save-able)."""
    port = free_port()
    context = mp.start_processes(_entry, args=(world, port, fn, args, str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"ranks did not finish within {timeout} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def run_ranks_once(name: str, fn, world: int, tmp_path_factory, *args, timeout: float = 120.0) -> list:
    """``run_ranks`` for a module fixture, run once per test session. Under pytest-xdist the tests
    of one module can go to both workers, and each would spawn the ranks again (the spawn of
    test_distributed_pipelines took 75-82 s on each worker): the first worker to get here runs them
    and the other waits for its files, in the session's shared temporary folder."""
    return run_ranks_in_folder_once(name, None, fn, world, tmp_path_factory, *args, timeout=timeout)[1]


def run_ranks_in_folder_once(name: str, prepare, fn, world: int, tmp_path_factory, *args,
                             timeout: float = 120.0) -> tuple:
    """``run_ranks_once`` whose ranks work in a folder of their own: ``prepare(folder)`` (unless None)
    fills it first, then ``fn(rank, world, str(folder), *args)`` runs in the ranks (``fn(rank, world,
    *args)`` when ``prepare`` is None), both once per test session. Returns (folder, each rank's
    result): the folder is the one every xdist worker's tests read. Where the first worker's ranks (or
    ``prepare``) fail, their error is kept in the folder ("failed") and raised again to every worker
    that comes after (it was hidden: the next worker made the folder anew and failed on that)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        shared = tmp_path_factory.mktemp(name)
        lock = None
    else:
        shared = tmp_path_factory.getbasetemp().parent / name
        lock = FileLock(f"{shared}.lock")
    if prepare is not None:
        args = (str(shared / "work"), *args)
    if lock is not None:
        lock.acquire()
    try:
        if (shared / "failed").exists():
            raise RuntimeError(f"{name}: the ranks failed on another xdist worker: "
                               f"{(shared / 'failed').read_text()}")
        if not (shared / "done").exists():
            shared.mkdir(exist_ok=True)
            try:
                if prepare is not None:
                    (shared / "work").mkdir()
                    prepare(shared / "work")
                run_ranks(fn, world, shared, *args, timeout=timeout)
            except Exception as err:
                if lock is not None:        # the next worker's tests fail with it too
                    (shared / "failed").write_text(f"{type(err).__name__}: {err}")
                raise
            (shared / "done").touch()
    finally:
        if lock is not None:
            lock.release()
    return shared / "work", [torch.load(shared / f"rank{r}.pt", weights_only=True) for r in range(world)]
