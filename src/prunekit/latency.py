"""Latency of a pruned model against its dense original, measured so that the ratio can be trusted.

On a machine whose load changes (other processes, frequency scaling), timing all dense runs and
then all pruned runs puts the two under different conditions, and the ratio moves from run to
run by as much as the pruning gains. ``paired_latency`` instead alternates single calls in one
process (dense, pruned, dense, pruned, ...) after a warm-up of both, so each pruned run has a
dense run next to it under the same load; the ratio is the median of the per-pair ratios, with
its quartiles as the spread. Times are wall-clock milliseconds per call (per batch).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import memory_plan, memory_probe, process_memory
from .errors import PrunekitError

MIN_REPEATS = 5


@dataclass
class PairedLatency:
    """dense_ms / pruned_ms: medians of the timed calls (ms per call); ratio: median of the
    per-pair ratios pruned/dense; ratio_q1 / ratio_q3: their quartiles; repeats: pairs timed."""

    dense_ms: float
    pruned_ms: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    repeats: int
    warmup: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_latency(dense: Callable, pruned: Callable, example, *, warmup: int = 5, repeats: int = 30,
                   clock: Callable[[], float] = time.perf_counter) -> PairedLatency:
    """Time ``dense(example)`` and ``pruned(example)`` alternately, ``repeats`` pairs after
    ``warmup`` untimed calls of each (interleaved too). ``clock``: seconds (injectable for tests).

    Models are put in eval mode and run under ``torch.inference_mode``; plain callables run as given.
    """
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be at least {MIN_REPEATS} for a median, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    for model in (dense, pruned):
        if isinstance(model, torch.nn.Module):
            model.eval()
    dense_s, pruned_s = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            dense(example)
            pruned(example)
        for _ in range(repeats):
            for fn, times in ((dense, dense_s), (pruned, pruned_s)):
                start = clock()
                fn(example)
                times.append(clock() - start)
    ratios = [p / d for p, d in zip(pruned_s, dense_s)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return PairedLatency(1000 * statistics.median(dense_s), 1000 * statistics.median(pruned_s),
                         statistics.median(ratios), q1, q3, repeats, warmup)


def latency_table(dense: torch.nn.Module, pruned: torch.nn.Module, input_shape, batch_sizes=(1, 64),
                  threads=(1, 2), warmup: int = 5, repeats: int = 30, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per (threads, batch): ``{"threads", "batch", **PairedLatency}``; restores torch's
    thread count afterwards. ``input_shape``: one example's shape, e.g. (3, 32, 32); inputs are
    random normal, or zeros for an integer ``dtype`` (token ids)."""
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            for batch in batch_sizes:
                x = (torch.randn(batch, *input_shape, generator=gen, dtype=dtype) if dtype.is_floating_point
                     else torch.zeros(batch, *input_shape, dtype=dtype))
                row = paired_latency(dense, pruned, x, warmup=warmup, repeats=repeats)
                rows.append({"threads": n, "batch": batch, **row.as_dict()})
    finally:
        torch.set_num_threads(before)
    return rows


def check_batch_sizes(model: torch.nn.Module, input_shape, batch_sizes, available: int | None = None,
                      dtype: torch.dtype = torch.float32) -> None:
    """Refuse (``PrunekitError``, one line) a batch size whose timing would not fit in memory,
    naming the largest that would.

    The estimate, in bytes, is ``memory_plan``'s for a forward pass without autograd: per sample,
    the input (``input_shape``, one example's shape, of ``dtype``) plus ``INFERENCE_FACTOR`` times the
    largest module output of ``model`` (measured on one sample), times the batch size. Give the
    larger of the two models. ``available``: bytes the timing may take (default: the memory
    available to this process, less ``memory_plan``'s margin of 5 % and at least 512 MB).
    """
    example = torch.zeros(1, *input_shape, dtype=dtype)
    input_bytes, largest_output = memory_probe.inference_bytes(model, example)
    per_sample = input_bytes + memory_plan.INFERENCE_FACTOR * largest_output
    if available is None:
        free = process_memory.available_memory(torch.device("cpu"))
        available = free - max(512 * process_memory.MiB, free // 20)
    fits = max(0, available) // per_sample
    for batch in batch_sizes:
        if batch > fits:
            need = memory_plan._human(batch * per_sample)
            raise PrunekitError(f"--batch-sizes {batch} needs about {need} for one forward pass (its inputs "
                                f"{memory_plan._human(batch * input_bytes)} and activations) but about "
                                f"{memory_plan._human(max(0, available))} is available: "
                                + (f"the largest batch size that fits is {fits}; lower --batch-sizes" if fits else
                                   "not even batch size 1 fits; free some memory first"))
