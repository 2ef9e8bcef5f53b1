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
from ..options import Callable_, Integer, OptionError
from ..solvers.magnitude import fit_k_to_macs, magnitude_flops, magnitude_global, magnitude_uniform
from .allocation import search_allocation
from .weights import PruneContext, Pruned, RefitOptions


@dataclass
class MagnitudeOptions(RefitOptions):
    """importance: a function (module name, weight) -> scores of the same shape (None: |w|);
    and ``RefitOptions``'s."""

    importance: Callable | None = None
    constraints = {**RefitOptions.constraints, "importance": Callable_()}


@dataclass
class MagnitudeFlopsOptions(MagnitudeOptions):
    """layer_search: trials of the per-layer allocation search (0 = off): each trial is the ILP
    with per-layer score multipliers, judged by the loss after BatchNorm recalibration on held
    training batches (see ``pipelines.allocation``)."""

    layer_search: int = 0
    constraints = {**MagnitudeOptions.constraints, "layer_search": Integer(0)}


def scores(ctx: PruneContext, opts: MagnitudeOptions) -> torch.Tensor:
    """(p,) non-negative scores in ParamSpace order: |w|, or the user's importance."""
    w = ctx.space.vector()
    if opts.importance is None:
        return w.abs()
    parts = []
    for entry, weight in zip(ctx.space.entries, ctx.space.weights()):
        try:
            with torch.no_grad():
                s = opts.importance(entry.module_name, weight.detach())
        except Exception as err:  # noqa: BLE001 - any failure of the user's function
            raise PrunekitError(f"importance({entry.module_name!r}, weight) failed: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}; importance takes (module_name, "
                                "weight) and returns scores of the weight's shape") from None
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


def run_magnitude_flops(ctx: PruneContext, opts: MagnitudeFlopsOptions) -> Pruned:
    """Most total score (squared magnitude by default) under the count and the MAC budget."""
    s = scores(ctx, opts)
    w = ctx.space.vector()
    # magnitude_flops maximises the sum of squares of what it is given: give it sqrt(score).
    values = w if opts.importance is None else s.sqrt()
    slices, slice_macs = ctx.space.cost_slices(ctx.costs)

    def keep_for(score_weights: torch.Tensor | None):
        scaled = values if score_weights is None else values * score_weights.sqrt().to(values)
        return magnitude_flops(scaled, slices, slice_macs, ctx.budget.max_nonzeros, ctx.budget.max_macs)

    info = {}
    score_weights = None
    if opts.layer_search:
        if ctx.train_batches is None:
            raise OptionError("layer_search judges by the loss on training data: pass data", ("layer_search",))
        score_weights, _, found = search_allocation(ctx.model, ctx.space, ctx.train_batches(), opts.layer_search,
                                                 lambda sw: w * keep_for(sw)[0], seed=ctx.seed,
                                                 progress=ctx.progress, loss_fn=ctx.loss_fn)
        info.update(layer_search_start_loss=found.start_loss, layer_search_loss=found.loss,
                    layer_search_accepted=found.accepted, layer_search_seconds=found.seconds)
    keep, ilp = keep_for(score_weights)
    return Pruned(w * keep, {**info, **({} if ilp is None else {"ilp_gap": ilp.gap})})
