"""Latency of a pruned model against its dense original, measured so that the ratio can be trusted.

On a machine whose load changes (other processes, frequency scaling), timing all dense runs and
then all pruned runs puts the two under different conditions, and the ratio moves from run to
run by as much as the pruning gains. ``paired_latency`` instead alternates single calls in one
process (dense, pruned, dense, pruned, ...) after a warm-up of both, so each pruned run has a
dense run next to it under the same load; the ratio is the median of the per-pair ratios, with
its quartiles as the spread. Times are wall-clock milliseconds per call (per batch).

Alternation evens out a load that drifts, not one that switches: on a busy machine a model's calls
can take 2 ms or 6 ms by turns, and the ratio then depends on which calls landed in which phase
(the same weights timed against themselves have read 0.33x, quartiles tight). ``PairedLatency.noise``
says when the figures show it: each model's call times spread widely, or the per-pair ratios do,
or the ratio of the two models' fastest calls (the nearest to an unloaded machine) disagrees with
the median ratio.
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

# A row is noisy past a quarter: a spread (interquartile range over the median) of a model's call
# times or of the per-pair ratios above 0.25, or a fastest-call ratio 25% away from the median
# ratio. Steady timings of one input spread by a few percent (under 10% for the tiny MLPNet as for
# ResNet-20 on this project's shared 2-core machine when its load held still), while a machine that
# switches between slow and fast phases spreads them by 50% to 200%; and a ratio that may be a
# quarter off is no measure of a pruning that gains 20-50%.
NOISE_LIMIT = 0.25


@dataclass
class PairedLatency:
    """dense_ms / pruned_ms: medians of the timed calls (ms per call); ratio: median of the
    per-pair ratios pruned/dense; ratio_q1 / ratio_q3: their quartiles; repeats: pairs timed;
    dense_q1_ms ... pruned_min_ms: quartiles and fastest of each model's calls (for ``noise``)."""

    dense_ms: float
    pruned_ms: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    repeats: int
    warmup: int
    dense_q1_ms: float
    dense_q3_ms: float
    dense_min_ms: float
    pruned_q1_ms: float
    pruned_q3_ms: float
    pruned_min_ms: float

    def noise(self) -> dict:
        """The figures the timing's noise is judged on, each against ``NOISE_LIMIT`` ("noisy": any past
        it): ``dense_spread`` / ``pruned_spread``, the interquartile range of a model's call times over
        their median; ``ratio_spread``, that of the per-pair ratios over the ratio; ``fastest_ratio``,
        the ratio of the two models' fastest calls, and ``fastest_gap``, how far it is from the median
        ratio (0.25: 25% either way)."""
        fastest = self.pruned_min_ms / self.dense_min_ms if self.dense_min_ms > 0 else None
        figures = {"dense_spread": _spread(self.dense_q1_ms, self.dense_q3_ms, self.dense_ms),
                   "pruned_spread": _spread(self.pruned_q1_ms, self.pruned_q3_ms, self.pruned_ms),
                   "ratio_spread": _spread(self.ratio_q1, self.ratio_q3, self.ratio),
                   "fastest_ratio": fastest,
                   "fastest_gap": (max(fastest / self.ratio, self.ratio / fastest) - 1
                                   if fastest and self.ratio > 0 else None)}
        judged = [figures[k] for k in ("dense_spread", "pruned_spread", "ratio_spread", "fastest_gap")]
        noisy = any(f is None or f > NOISE_LIMIT for f in judged)      # None: a call the clock did not see take time
        return {"noisy": noisy, "noise": {**figures, "limit": NOISE_LIMIT}}

    def as_dict(self) -> dict:
        return {**asdict(self), **self.noise()}


def _spread(q1: float, q3: float, median: float) -> float | None:
    return (q3 - q1) / median if median > 0 else None


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
    (d1, _, d3), (p1, _, p3) = (statistics.quantiles(t, n=4, method="inclusive") for t in (dense_s, pruned_s))
    return PairedLatency(1000 * statistics.median(dense_s), 1000 * statistics.median(pruned_s),
                         statistics.median(ratios), q1, q3, repeats, warmup,
                         1000 * d1, 1000 * d3, 1000 * min(dense_s), 1000 * p1, 1000 * p3, 1000 * min(pruned_s))


def latency_table(dense: torch.nn.Module, pruned: torch.nn.Module, input_shape, batch_sizes=(1, 64),
                  threads=(1, 2), warmup: int = 5, repeats: int = 30, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per (threads, batch): ``{"threads", "batch", **PairedLatency, "noisy", "noise"}``
    (``PairedLatency.noise``); restores torch's
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
