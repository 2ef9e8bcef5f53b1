"""Gradual pruning: prune events on a schedule, fine-tuning with the mask held in between.

For events t = 1..T the count budget and the MAC budget each follow a keep schedule (poly by
default) from near dense down to the target at t = T. At each event any weights method
(``methods.METHODS``) prunes the current weights to the event's budgets; then the weights are fine-tuned
for ``epochs_per_event`` epochs with a fresh SGD optimizer (its momentum reset: the old state
belongs to weights that may be gone) and a cosine learning-rate cycle that restarts at every
event, while ``MaskHold`` keeps the pruned weights at zero. A final fine-tune of
``final_epochs`` follows the last event. The fine-tunes' epochs are numbered across the run
(event k's first follows the epochs of events 1..k-1), so each reads the loader's next shuffle,
as a plain training loop would; the method reads the same batches at every event. With
``finetune_distill`` every fine-tune also learns the dense model's outputs
(``train.distillation_loss``; the model as passed in is the teacher).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from ..budget import ResolvedBudget
from ..masks import MaskHold, masks_from_weights
from ..options import Integer, OneOf, OptionError, Options, Real, SQUARED
from ..train import TrainingDiverged, evaluate_loss_accuracy, sgd, train_epochs
from .schedule import KINDS, keep_schedule
from .stages import measure_seconds, resume_stages, stage_completed
from .weights import Outcome, PruneContext, check_budget

# every event runs the method once more and fine-tunes epochs_per_event epochs: more events than this run
# practically forever (the default is 4, the benchmarks use 3 and 4; docs/benchmarks.md)
MAX_EVENTS = 100


@dataclass
class GradualOptions(Options):
    """events: prune events T; epochs_per_event: fine-tuning epochs after each event but the
    last; final_epochs: fine-tuning after the last event; lr: peak learning rate of each cosine
    cycle; event_schedule: poly | exp | linear | const (kept share per event); start_keep: share
    kept before the first event's schedule point (see ``keep_schedule``); finetune_distill /
    finetune_temperature: weight and temperature of the dense model's outputs in every
    fine-tune's loss (0: labels only)."""

    events: int = 4
    epochs_per_event: int = 1
    final_epochs: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    event_schedule: str = "poly"
    start_keep: float = 0.9
    finetune_distill: float = 0.0
    finetune_temperature: float = 4.0
    constraints = {"finetune_distill": Real(0, 1), "finetune_temperature": Real(0, open_low=True, use=SQUARED),
                   "events": Integer(1, MAX_EVENTS), "epochs_per_event": Integer(0), "final_epochs": Integer(0),
                   "lr": Real(0, open_low=True), "momentum": Real(0, 1), "weight_decay": Real(0),
                   "event_schedule": OneOf(KINDS), "start_keep": Real(0, 1, open_low=True)}

    def check_given(self) -> None:
        super().check_given()
        idle = [name for name in ("start_keep", "event_schedule", "epochs_per_event") if name in self.given]
        if idle and self.events == 1:
            named = _listed(idle)
            raise OptionError(f"{named} shape{'s' if len(idle) == 1 else ''} the schedule from dense down to the budget, "
                              f"and events is 1 (a single step prunes straight to the budget): give events 2 or more, "
                              f"or leave {named} out",
                              (*idle, "events"))
        tuned = ("lr", "momentum", "weight_decay", "finetune_distill", "finetune_temperature")
        idle = [name for name in tuned if name in self.given]
        if idle and not self.final_epochs + (self.events - 1) * self.epochs_per_event:
            named = _listed(idle)
            between = " and epochs_per_event is 0" if self.events > 1 else ""
            raise OptionError(f"{named} shape{'s' if len(idle) == 1 else ''} the fine-tuning, and final_epochs is 0"
                              f"{between} (no fine-tuning at all): give final_epochs (e.g. 2) or leave {named} out",
                              (*idle, "final_epochs", "epochs_per_event"))
        if "finetune_temperature" in self.given and not self.finetune_distill:
            raise OptionError("finetune_temperature softens the dense model's outputs for finetune_distill, and "
                              "finetune_distill is 0: give finetune_distill (e.g. 0.9) or leave "
                              "finetune_temperature out", ("finetune_temperature", "finetune_distill"))


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_start_keep(budget: ResolvedBudget, dense_macs: int, opts: GradualOptions) -> None:
    """Refuse a ``start_keep`` the user gave at or below the share every budget keeps: each
    schedule would start at its target (``keep_schedule`` clips it) and every event prune
    straight to the budget."""
    if "start_keep" not in opts.given or opts.events == 1:
        return
    shares = [budget.max_nonzeros / budget.total_prunable] if budget.max_nonzeros < budget.total_prunable else []
    if budget.max_macs is not None and dense_macs:
        shares.append(budget.max_macs / dense_macs)
    if shares and opts.start_keep <= min(shares):
        kept = min(shares)
        raise OptionError(f"start_keep {opts.start_keep:g} is the share kept before the first event, and the budget "
                          f"keeps {kept:.4g}: every event would prune straight to the budget; give start_keep above "
                          f"{kept:.4g} (default 0.9), or leave it out", ("start_keep",))


def event_budgets(budget: ResolvedBudget, dense_macs: int, opts: GradualOptions) -> list[ResolvedBudget]:
    """The budget of each prune event: both the count and the MACs follow the schedule and end
    exactly at ``budget``. ``dense_macs``: MACs of the prunable weights when all are kept."""
    p = budget.total_prunable
    shares = keep_schedule(budget.max_nonzeros / p, opts.events, opts.event_schedule, opts.start_keep)
    mac_shares = (keep_schedule(budget.max_macs / dense_macs, opts.events, opts.event_schedule, opts.start_keep)
                  if budget.max_macs is not None else [None] * opts.events)
    budgets = []
    for share, mac_share in zip(shares[:-1], mac_shares[:-1]):
        k = max(budget.max_nonzeros, round(share * p))
        macs = None if mac_share is None else max(budget.max_macs, int(mac_share * dense_macs))
        budgets.append(ResolvedBudget(k, macs, p, budget.fixed_macs))
    return budgets + [budget]


def finetune_batches(train_batches: Callable[[], Iterable], first_epoch: int) -> Iterable:
    """The training batches of a fine-tune whose first epoch is epoch ``first_epoch`` of the whole
    run (counted from 0 across events: event k's fine-tune starts after the
    ``(k - 1) * epochs_per_event`` epochs of the events before it), so that every epoch of the run
    reads the loader's next shuffle (and random augmentation) as a plain training loop would,
    where ``train_batches()`` alone would start every event's fine-tune at the same one.

    The number comes from the event and the schedule only (no state kept), so a resumed run reads
    what an uninterrupted one reads. ``train_batches()`` (the same each call, as the method needs
    it) gives a prunekit ``BatchLoader`` or a ``ReplayedLoader`` (``api._batches``, the CLI's
    ``training_batches``), each numbering its passes by ``epoch``: it is moved on by
    ``first_epoch``. Batches without an ``epoch`` (a function's own list, passed to ``execute``)
    are read as they come."""
    batches = train_batches()
    if first_epoch and isinstance(getattr(batches, "epoch", None), int):
        batches.epoch += first_epoch
    return batches


def prune_gradual(ctx: PruneContext, run, options, opts: GradualOptions, *, eval_loader: Iterable | None = None,
                  on_event: Callable[[dict], None] | None = None) -> Outcome:
    """Prune ``ctx.model`` in place gradually to ``ctx.budget`` with weights method ``run`` at each event.

    ctx.train_batches(): one epoch of (x, y) training batches, the same each call: for the method
        as they come, for the fine-tunes moved on to the run's epoch (``finetune_batches``).
    options:      the method's options (as for one-shot pruning).
    eval_loader:  when given, loss and accuracy (%) are measured after every event's fine-tune.
    on_event:     called with each event's record once its fine-tune is done; ``finetune_loss``
        is the mean training loss of the fine-tune's last epoch (with ``finetune_distill``, the
        mix it trained on), ``loss`` / ``accuracy`` the evaluation's (None without one).
    ctx.checkpointer: saves the model, event records and RNG after every event (the protocol of
        ``pipelines.stages``); a run resumed with the same checkpointer skips completed events
        and ends with the same weights as one never interrupted.
    """
    if ctx.train_batches is None:
        raise OptionError("gradual pruning fine-tunes between events: pass data", ("data",))
    model, space, costs = ctx.model, ctx.space, ctx.costs
    torch.manual_seed(ctx.seed)
    dense_macs = space.macs_summary(costs)[0]
    schedule = event_budgets(ctx.budget, dense_macs, opts)
    # the teacher is the model as passed in (dense; a resumed run is handed the dense model again)
    teacher = copy.deepcopy(model).eval() if opts.finetune_distill else None
    done = resume_stages(ctx)
    # a run folder of a version whose every fine-tune started at the loader's first epoch (its event
    # records have no first_epoch): its later fine-tunes start there too. That keeps each fine-tune's
    # first epoch, not the bits: such versions also read the loader twice per training epoch, so the
    # run ends as neither version's uninterrupted run would (the checkpointer says so on resume)
    restarting = done > 0 and "first_epoch" not in ctx.history[0]
    start, measured = time.perf_counter(), measure_seconds(ctx.checkpointer)
    for event, event_budget in enumerate(schedule, start=1):
        if event <= done:
            continue
        event_start = time.perf_counter()
        event_ctx = replace(ctx, budget=event_budget, checkpointer=None, history=[])
        pruned = run(event_ctx, options)
        space.assign(pruned.weights)
        counts, nonzeros = check_budget(space, costs, event_budget)
        epochs = opts.final_epochs if event == len(schedule) else opts.epochs_per_event
        first_epoch = 0 if restarting else (event - 1) * opts.epochs_per_event     # the events before: theirs
        losses: list[float] = []
        if epochs:
            optimizer = sgd(model, opts.lr, opts.momentum, opts.weight_decay)
            try:
                with MaskHold(space, masks_from_weights(space), optimizer):
                    train_epochs(model, finetune_batches(ctx.train_batches, first_epoch),
                                 epochs, optimizer=optimizer,
                                 on_epoch_end=lambda _, loss: losses.append(loss), progress=ctx.progress,
                                 teacher=teacher, distill=opts.finetune_distill,
                                 temperature=opts.finetune_temperature, loss_fn=ctx.loss_fn)
            except TrainingDiverged as err:     # before this event's checkpoint: nothing diverged is saved
                raise TrainingDiverged(f"{err.where} of the fine-tune after prune event {event}/{len(schedule)}",
                                       err.cause, opts.lr, "lr") from None
        evaluated = evaluate_loss_accuracy(model, eval_loader, loss_fn=ctx.loss_fn) if eval_loader is not None else {}
        record = {"event": event, "max_nonzeros": event_budget.max_nonzeros, "nonzeros": nonzeros,
                  "max_macs": None if event_budget.max_macs is None
                  else event_budget.max_macs + event_budget.fixed_macs,
                  "macs": counts.macs, "flops_kept": counts.flops_kept, "epochs": epochs,
                  "first_epoch": first_epoch,     # of the run's training epochs (from 0): the fine-tune's first
                  # the training loss (mean of the fine-tune's last epoch); loss and accuracy are the
                  # evaluation's, None without one (a run folder's checkpointer measures them)
                  "finetune_loss": losses[-1] if losses else None,
                  **{key: evaluated.get(key) for key in ("loss", "accuracy")},
                  "seconds": time.perf_counter() - event_start,
                  **{key: pruned.info[key] for key in ("stages_auto", "layer_search_auto", "fresh_stages")
                     if key in pruned.info}}
        ctx.history.append(record)
        stage_completed(ctx, event)
        if on_event is not None:
            on_event(record)
    counts, nonzeros = check_budget(space, costs, ctx.budget)
    seconds = time.perf_counter() - start - (measure_seconds(ctx.checkpointer) - measured)
    return Outcome(model, counts, nonzeros, 1 - nonzeros / space.numel, seconds, list(ctx.history),
                   {"gradual_options": opts.to_dict()})
