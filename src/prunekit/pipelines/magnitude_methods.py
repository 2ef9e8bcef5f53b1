"""Magnitude methods: keep the weights of largest score, |w| unless the user gives ``importance``.

``importance(name, weight) -> scores`` (scores shaped like ``weight``, >= 0, higher = keep) is
called once per prunable layer (``name``: the module's name, ``weight``: its weight tensor);
magnitude ranks the scores globally, magnitude-uniform within each layer, magnitude-flops
maximises their sum under both budgets (the ILP). It is how a user plugs in their own
importance score without writing a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PrunekitError
from ..options import Callable_, Options
from ..solvers.magnitude import fit_k_to_macs, magnitude_flops, magnitude_global, magnitude_uniform
from .weights import PruneContext, Pruned


@dataclass
class MagnitudeOptions(Options):
    """importance: a function (module name, weight) -> scores of the same shape (None: |w|)."""

    importance: Callable | None = None
    constraints = {"importance": Callable_()}


def scores(ctx: PruneContext, opts: MagnitudeOptions) -> torch.Tensor:
    """(p,) non-negative scores in ParamSpace order: |w|, or the user's importance."""
    w = ctx.space.vector()
    if opts.importance is None:
        return w.abs()
    parts = []
    for entry, weight in zip(ctx.space.entries, ctx.space.weights()):
        with torch.no_grad():
            s = opts.importance(entry.module_name, weight.detach())
        if not isinstance(s, torch.Tensor) or s.shape != weight.shape:
            raise PrunekitError(f"importance({entry.module_name!r}, weight) must return a tensor of shape "
                                f"{tuple(weight.shape)}, got {getattr(s, 'shape', type(s).__name__)}")
        parts.append(s.detach().reshape(-1).to(w.dtype))
    out = torch.cat(parts)
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()):
        raise PrunekitError("importance scores must be finite and >= 0 (higher = keep)")
    return out


def run_magnitude(ctx: PruneContext, opts: MagnitudeOptions) -> Pruned:
    s = scores(ctx, opts)
    macs = ctx.space.macs_per_weight(ctx.costs)
    keep = fit_k_to_macs(lambda k: magnitude_global(s, k), macs, ctx.budget.max_nonzeros, ctx.budget.max_macs)
    return Pruned(ctx.space.vector() * keep)


def run_magnitude_uniform(ctx: PruneContext, opts: MagnitudeOptions) -> Pruned:
    s = scores(ctx, opts)
    macs = ctx.space.macs_per_weight(ctx.costs)
    slices = ctx.space.layer_slices()
    keep = fit_k_to_macs(lambda k: magnitude_uniform(s, slices, k), macs,
                         ctx.budget.max_nonzeros, ctx.budget.max_macs)
    return Pruned(ctx.space.vector() * keep)


def run_magnitude_flops(ctx: PruneContext, opts: MagnitudeOptions) -> Pruned:
    """Most total score (squared magnitude by default) under the count and the MAC budget."""
    s = scores(ctx, opts)
    # magnitude_flops maximises the sum of squares of what it is given: give it sqrt(score).
    values = ctx.space.vector() if opts.importance is None else s.sqrt()
    slices, slice_macs = ctx.space.cost_slices(ctx.costs)
    keep, ilp = magnitude_flops(values, slices, slice_macs, ctx.budget.max_nonzeros, ctx.budget.max_macs)
    return Pruned(ctx.space.vector() * keep, {} if ilp is None else {"ilp_gap": ilp.gap})
