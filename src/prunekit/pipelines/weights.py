"""Pruning single weights: one method run (one shot, or the method's own stages), BN, count.

A weights method (a row of ``methods.METHODS`` with family ``"weights"``) is a function
``run(ctx: PruneContext, options) -> Pruned``: it reads the model through ``ctx.space``, and
returns the new flat weight vector (p,) (zeros where pruned) meeting ``ctx.budget``, and what it
wants recorded. ``prune_weights`` writes the weights back, recalibrates BatchNorm and checks
the budget with the CostModel, independently of the method. Multi-stage methods append one
record per stage to ``ctx.history`` and hand each finished stage to ``ctx.checkpointer``
(see ``pipelines.stages``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..budget import ResolvedBudget
from ..costs import CostModel, Counts
from ..losses import LossFn
from ..params import ParamSpace
from ..train import recalibrate_batchnorm
from .stages import StageCheckpointer, measure_seconds


@dataclass
class PruneContext:
    """Everything a weights method may use.

    train_batches(): an iterable of (x, y) training batches, the same ones at every call (None
        when no training data was given). history: the per-stage records of a multi-stage
        method (restored on resume). checkpointer: saves and restores completed stages.
        loss_fn: the loss gradients and judges use (``prunekit.losses``; None: cross-entropy).
    """

    model: nn.Module
    space: ParamSpace
    costs: CostModel
    budget: ResolvedBudget
    train_batches: Callable[[], Iterable] | None
    seed: int = 0
    recalibrate_bn: bool = True
    progress: bool = False
    checkpointer: StageCheckpointer | None = None
    history: list[dict] = field(default_factory=list)
    loss_fn: LossFn | None = None

    def layer_macs(self) -> list[int]:
        """MACs per weight of each slice of ``space.cost_slices`` (one per layer, or finer)."""
        return self.space.cost_slices(self.costs)[1]


@dataclass
class Pruned:
    """What a weights method returns: the new weights (p,) and facts to record (JSON-able).

    bn_recalibrated: the method left the model holding these weights with BatchNorm re-estimated
    as ``prune_weights`` would (a multi-stage method does it before its last stage's record, so
    that record measures the final model); ``prune_weights`` then does not do it again.
    """

    weights: torch.Tensor
    info: dict = field(default_factory=dict)
    bn_recalibrated: bool = False


@dataclass
class Outcome:
    """A pruned model and how it got there (any mode); ``counts`` come from the CostModel over
    the model's actual weights, not from the method. ``history``: per stage, event or phase."""

    model: nn.Module
    counts: Counts
    nonzeros: int | None
    sparsity: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    snapshots: dict = field(default_factory=dict)     # taper: share -> Outcome of the other budgets


def check_budget(space: ParamSpace, costs: CostModel, budget: ResolvedBudget) -> tuple[Counts, int]:
    """Count the model as it is and fail loudly if it breaks the budget."""
    counts = costs.count(space.model)
    nonzeros = int(torch.count_nonzero(space.vector()))
    prunable_macs = counts.macs - budget.fixed_macs
    if nonzeros > budget.max_nonzeros or (budget.max_macs is not None and prunable_macs > budget.max_macs):
        raise RuntimeError(f"internal error: the pruned model breaks its budget ({nonzeros} nonzeros "
                           f"for {budget.max_nonzeros} allowed, {prunable_macs} MACs for "
                           f"{budget.max_macs} allowed); please report this")
    return counts, nonzeros


def prune_weights(ctx: PruneContext, run, options) -> Outcome:
    """Prune ``ctx.model`` in place with weights method ``run`` and its ``options``; recalibrate
    BatchNorm (``ctx.recalibrate_bn``) and check the budget."""
    torch.manual_seed(ctx.seed)
    start, measured = time.perf_counter(), measure_seconds(ctx.checkpointer)
    pruned = run(ctx, options)
    ctx.space.assign(pruned.weights)
    recalibrated = pruned.bn_recalibrated or bool(ctx.recalibrate_bn and ctx.train_batches is not None
                                                  and recalibrate_batchnorm(ctx.model, ctx.train_batches()))
    # per-stage evaluations are the record's, not pruning
    seconds = time.perf_counter() - start - (measure_seconds(ctx.checkpointer) - measured)
    counts, nonzeros = check_budget(ctx.space, ctx.costs, ctx.budget)
    return Outcome(ctx.model, counts, nonzeros, 1 - nonzeros / ctx.space.numel, seconds, list(ctx.history),
                   {"bn_recalibrated": recalibrated, **pruned.info})
