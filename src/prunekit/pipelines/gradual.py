"""Gradual pruning: prune events on a schedule, fine-tuning with the mask held in between.

For events t = 1..T the count budget and the MAC budget each follow a keep schedule (poly by
default) from near dense down to the target at t = T. At each event any one-shot method of
``METHODS`` prunes the current weights to the event's budgets; then the weights are fine-tuned
for ``epochs_per_event`` epochs with a fresh SGD optimizer (its momentum reset: the old state
belongs to weights that may be gone) and a cosine learning-rate cycle that restarts at every
event, while ``MaskHold`` keeps the pruned weights at zero. A final fine-tune of
``final_epochs`` follows the last event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
from torch import nn

from ..budget import Budget, ResolvedBudget
from ..costs import Counts
from ..errors import PrunekitError
from ..masks import MaskHold, masks_from_weights
from ..train import evaluate, train_epochs
from .oneshot import METHODS, PruneContext, check_budget, check_request
from .schedule import keep_schedule
from .stages import StageCheckpointer, resume_stages, stage_completed


@dataclass
class GradualOptions:
    """events: prune events T; epochs_per_event: fine-tuning epochs after each event but the
    last; final_epochs: fine-tuning after the last event; lr: peak learning rate of each cosine
    cycle; schedule: poly | exp | linear | const (kept share per event); start_keep: share kept
    before the first event's schedule point (see ``keep_schedule``)."""

    events: int = 4
    epochs_per_event: int = 1
    final_epochs: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "poly"
    start_keep: float = 0.9

    def check(self) -> None:
        if self.events < 1:
            raise PrunekitError(f"events must be at least 1, got {self.events}")
        if self.epochs_per_event < 0 or self.final_epochs < 0:
            raise PrunekitError("epochs_per_event and final_epochs must be 0 or more")
        if not self.lr > 0:
            raise PrunekitError(f"the learning rate must be positive, got {self.lr}")


@dataclass
class GradualResult:
    """The pruned, fine-tuned model; ``events`` holds one record per prune event."""

    model: nn.Module
    method: str
    budget: ResolvedBudget
    counts: Counts
    nonzeros: int
    sparsity: float
    seconds: float
    events: list[dict] = field(default_factory=list)


def event_budgets(budget: ResolvedBudget, dense_macs: int, opts: GradualOptions) -> list[ResolvedBudget]:
    """The budget of each prune event: both the count and the MACs follow the schedule and end
    exactly at ``budget``. ``dense_macs``: MACs of the prunable weights when all are kept."""
    p = budget.total_prunable
    shares = keep_schedule(budget.max_nonzeros / p, opts.events, opts.schedule, opts.start_keep)
    mac_shares = (keep_schedule(budget.max_macs / dense_macs, opts.events, opts.schedule, opts.start_keep)
                  if budget.max_macs is not None else [None] * opts.events)
    budgets = []
    for share, mac_share in zip(shares[:-1], mac_shares[:-1]):
        k = max(budget.max_nonzeros, round(share * p))
        macs = None if mac_share is None else max(budget.max_macs, int(mac_share * dense_macs))
        budgets.append(ResolvedBudget(k, macs, p, budget.fixed_macs))
    return budgets + [budget]


def prune_gradual(model: nn.Module, method: str, budget: Budget, example_input: torch.Tensor,
                  train_loader: Callable[[], Iterable], opts: GradualOptions | None = None, *,
                  eval_loader: Iterable | None = None, include: list[str] | None = None,
                  exclude: list[str] | None = None, seed: int = 0, options: dict | None = None,
                  on_event: Callable[[dict], None] | None = None, progress: bool = True,
                  checkpointer: StageCheckpointer | None = None) -> GradualResult:
    """Prune ``model`` in place gradually to ``budget`` with the one-shot ``method`` at each event.

    train_loader: returns an iterable of (x, y) training batches (one epoch); used by the
        method (gradients) and for fine-tuning.
    eval_loader:  when given, accuracy (%) is measured after every event's fine-tune.
    options:      the method's options (e.g. fisher_samples), as for one-shot ``prune``.
    on_event:     called with each event's record once its fine-tune is done.
    checkpointer: saves the model, event records and RNG after every event (the protocol of
        ``pipelines.stages``); a run resumed with the same checkpointer skips completed events
        and ends with the same weights as one never interrupted.
    """
    opts = opts or GradualOptions()
    opts.check()
    options = {"progress": progress, **(options or {})}
    costs, space, resolved = check_request(model, method, budget, example_input, include, exclude, options)
    torch.manual_seed(seed)
    dense_macs = int(space.macs_per_weight(costs).sum())
    schedule = event_budgets(resolved, dense_macs, opts)
    progress_ctx = SimpleNamespace(model=model, options={}, checkpointer=checkpointer)
    records = progress_ctx.options.setdefault("report", {}).setdefault("stages", [])
    done = resume_stages(progress_ctx)
    start = time.perf_counter()
    for event, event_budget in enumerate(schedule, start=1):
        if event <= done:
            continue
        event_start = time.perf_counter()
        ctx = PruneContext(model, space, costs, event_budget, train_loader, seed, dict(options))
        space.assign(METHODS[method](ctx))
        counts, nonzeros = check_budget(space, costs, event_budget)
        epochs = opts.final_epochs if event == len(schedule) else opts.epochs_per_event
        losses: list[float] = []
        if epochs:
            optimizer = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                                        weight_decay=opts.weight_decay, nesterov=opts.momentum > 0)
            with MaskHold(space, masks_from_weights(space), optimizer):
                train_epochs(model, train_loader(), epochs, optimizer=optimizer,
                             on_epoch_end=lambda _, loss: losses.append(loss), progress=progress)
        record = {"event": event, "max_nonzeros": event_budget.max_nonzeros, "nonzeros": nonzeros,
                  "max_macs": None if event_budget.max_macs is None
                  else event_budget.max_macs + event_budget.fixed_macs,
                  "macs": counts.macs, "flops_kept": counts.flops_kept, "epochs": epochs,
                  "loss": losses[-1] if losses else None,
                  "accuracy": evaluate(model, eval_loader) if eval_loader is not None else None,
                  "seconds": time.perf_counter() - event_start}
        records.append(record)
        stage_completed(progress_ctx, event)
        if on_event is not None:
            on_event(record)
    counts, nonzeros = check_budget(space, costs, resolved)
    return GradualResult(model=model, method=method, budget=resolved, counts=counts, nonzeros=nonzeros,
                         sparsity=1 - nonzeros / space.numel, seconds=time.perf_counter() - start,
                         events=list(records))
