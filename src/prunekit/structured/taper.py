"""Tapering Lagrangian (arXiv 1812.07060 style): gates and weights trained together while a
MAC budget tapers from the dense count down, enforced as an equality constraint.

* Gates ``g = sigmoid(theta)`` per channel of every group, with their own Adam optimizer; the
  weights are fine-tuned at the same time by SGD (model in train mode). The two optimizers
  never share parameters.
* Constraint ``c(g, t) = (MACs(g) - B(t)) / F_dense = 0``; the gate loss is
  ``task + lam * c + rho/2 * c^2 + gamma * L_bool`` (an augmented Lagrangian: the quadratic term
  makes the gates track the moving budget) and the multiplier moves by dual ascent,
  ``lam <- lam + dual_lr * c`` after every step (it may go negative: an equality constraint).
* The task loss is cross-entropy or, with ``taper_distill`` d > 0, ``train.distillation_loss``
  at weight d with the dense model as the teacher: the weights then also learn its outputs while
  their channels are taken away. Its temperature ``taper_temperature`` defaults to 1, not the
  fine-tune's 4: the soft term is scaled by T², while lam, rho and the rate control are set for
  cross-entropy's scale (at T = 4 the task loss was ten times cross-entropy's on ResNet-56 and
  the gates lagged the budget until the last cut was forced).
* ``B(t)`` starts at ``F_dense`` and falls by ``rate * F_dense`` per step. Every ``check_every``
  steps the rate adapts to the task loss (an exponential average): it is multiplied by
  ``slow_down`` when the loss rose by more than ``rise_tol`` (relative), by ``speed_up`` when it
  moved by less than ``flat_tol``; it never exceeds the user's bound ``max_rate`` (share of the
  dense MACs per epoch) and never falls below a quarter of its starting value (so a run ends).
* Temperature: ``g = sigmoid(theta / T)``. ``T`` falls from 1 to ``final_temperature`` as the
  gated MACs come down (geometrically in the share of MACs removed so far, counted from the
  larger of the budget and the gated model's MACs: cooling never runs ahead of the gates; the
  lowest such share so far, so gates that overshoot the budget do not re-warm it at once, which
  made warm and cold states alternate) and,
  while a budget is held, by a further ``hold_cooling`` per step at or under the budget
  (``c <= settle_tol``) and warmer again by two such steps per step above it (frozen gates above
  the budget could not come down); after a snapshot it returns to the taper's value. A cooling
  sigmoid drives the gates to 0 or 1 (``final_temperature = 1``: no annealing, no cooling while
  held either). After every step ``|theta / T|`` is clipped to ``logit_bound``:
  a gate pushed far past 0 or 1 (float32 sigmoid rounds to exactly 1 beyond about 17) would
  have no gradient left, and Adam, scaled by the large gradients of the first steps, would
  barely move one with a merely tiny gradient; either way the constraint could no longer close
  it (ResNet-56: the gated MACs stuck at 96% of dense while the budget fell to 30%).
* The budget is never forced down: ``B`` falls at least at the floor rate, so it reaches every
  budget. When ``B`` reaches a requested budget it is held there until the constraint is met
  (gated MACs within ``settle_tol`` of it, or, with channels too coarse for that, the settled
  gates differ from the cut at the budget by at most one channel) *and* the gates have settled (a share
  ``settled_share`` of them within ``settle_margin`` of 0 or 1), at least ``settle_steps``
  steps and at most ``max_hold_steps``; then a snapshot is taken: the gates are folded into
  their consumer weights, cut to 0/1 by a global threshold at or below the budget (bisection,
  then every closed channel that still fits; ``threshold``), and the closed channels are removed.
  Whether it settled, and how far the gates were from 0/1, is recorded (``snapshot_cuts``). One
  run thus yields a shrunk model at each budget (e.g. 70%, 50%, 30% of MACs).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunekitError
from ..losses import LossFn, mean_loss
from ..options import FLOAT32_MAX, Integer, OptionError, Real, Shares, ADAM_LR, SQUARED
from ..train import distillation_loss
from .gates import GatedMacs, GateHooks, fold_gates
from .group_types import GroupSet
from .family import ChannelContext, ChannelOptions, Cut
from .autobot import bool_loss
from .shrink import shrink
from .channel_norms import channel_norms
from .rounding import cut_to_budget


@dataclass
class TaperOptions(ChannelOptions):
    taper_epochs: float = 4.0    # planned length in passes over the training batches
    lr: float = 0.01             # SGD learning rate of the weights
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gate_lr: float = 0.1         # Adam learning rate of the gate logits
    dual_lr: float = 0.2         # step of the multiplier per unit of relative MAC error
    penalty: float = 50.0        # rho of the augmented-Lagrangian term rho/2 * c^2 (tracks B(t) closely)
    gamma: float = 0.1           # weight of the polarization term L_bool
    init: float = 0.9            # initial gate value
    max_taper_rate: float | None = None  # bound on the taper rate, share of dense MACs per epoch
    snapshots: list[float] | None = None  # further budgets (shares of MACs) to save models at, same run
    settle_steps: int = 10       # steps held at each snapshot budget before cutting ...
    settle_tol: float = 0.01     # ... and until |MACs(g) - B| <= settle_tol * dense ...
    settled_share: float = 0.98  # ... and this share of the gates is within settle_margin of 0 or 1
    settle_margin: float = 0.05
    max_hold_steps: int = 200    # cut anyway after this many steps held (recorded as not settled)
    final_temperature: float = 0.05  # gate temperature at the last budget (1: no annealing)
    hold_cooling: float = 0.97   # extra factor on the temperature per step while a budget is held
    logit_bound: float = 6.0     # |logit / T| is kept below this: no gate saturates where its gradient vanishes
    check_every: int = 20
    slow_down: float = 0.7
    speed_up: float = 1.1
    taper_distill: float = 0.0   # weight of the dense model's softened outputs in the task loss (0: labels only)
    taper_temperature: float = 1.0  # their temperature (see above: 1 keeps the task loss on cross-entropy's scale)
    rise_tol: float = 0.25       # relative rise of the averaged task loss that slows the taper
    flat_tol: float = 0.02       # relative change below which the loss counts as flat
    loss_average: float = 0.95   # decay of the exponential average of the task loss
    constraints = {**ChannelOptions.constraints, "taper_epochs": Real(0, open_low=True), "lr": Real(0, open_low=True),
                   "momentum": Real(0, 1), "weight_decay": Real(0), "gate_lr": Real(0, open_low=True, use=ADAM_LR),
                   "dual_lr": Real(0), "penalty": Real(0), "gamma": Real(0), "init": Real(0, 1, open_low=True),
                   "max_taper_rate": Real(0, open_low=True), "snapshots": Shares(), "settle_steps": Integer(1),
                   "settle_tol": Real(0), "settled_share": Real(0, 1), "settle_margin": Real(0, 0.5),
                   "max_hold_steps": Integer(1), "final_temperature": Real(0, 1, open_low=True),
                   "hold_cooling": Real(0, 1, open_low=True), "logit_bound": Real(0, open_low=True),
                   "check_every": Integer(1), "slow_down": Real(0, 1, open_low=True),
                   "speed_up": Real(1), "taper_distill": Real(0, 1),
                   "taper_temperature": Real(0, open_low=True, use=SQUARED), "rise_tol": Real(0), "flat_tol": Real(0), "loss_average": Real(0, 1)}

    def check_given(self) -> None:
        super().check_given()
        if "taper_temperature" in self.given and not self.taper_distill:
            raise OptionError("taper_temperature softens the dense model's outputs for taper_distill, and "
                              "taper_distill is 0: give taper_distill (e.g. 0.5) or leave taper_temperature out",
                              ("taper_temperature", "taper_distill"))


@dataclass
class Snapshot:
    budget: float                # share of dense MACs asked for
    model: nn.Module             # shrunk copy
    masks: list[torch.Tensor]
    step: int
    reached_by_schedule: bool    # False if the taper ran past its planned steps to get here
    cut: dict                    # settled or not, temperature, how far the gates were from their 0/1 masks


def taper_snapshots(model: nn.Module, groups: GroupSet, counter: GatedMacs, budgets: list[float],
                    batches, example_input: torch.Tensor, options: TaperOptions, progress=None,
                    teacher: nn.Module | None = None, loss_fn: LossFn | None = None) -> tuple[list[Snapshot], dict]:
    """Run the tapering Lagrangian on ``model`` (modified in place: its weights are trained).

    ``budgets``: shares of dense MACs kept, each in (0, 1); snapshots come out largest first.
    ``batches()``: a fresh iterable of (x, y) per epoch. ``teacher``: the dense model, used (in
    eval mode, no gradients) when ``options.taper_distill`` > 0. ``loss_fn``: the task loss
    (``prunekit.losses``; None: cross-entropy).
    """
    if options.taper_distill and teacher is None:
        raise PrunekitError("taper_distill needs the dense model as the teacher: pass teacher=")
    budgets = sorted(set(float(b) for b in budgets), reverse=True)
    if not budgets or any(not 0 < b < 1 for b in budgets):
        raise PrunekitError(f"taper budgets must be shares of MACs in (0, 1), got {budgets}")
    dense = counter.dense
    first = batches()
    steps_per_epoch = len(first) if hasattr(first, "__len__") else sum(1 for _ in first)
    planned = max(1, int(options.taper_epochs * steps_per_epoch))
    # Start fast enough to reach the last budget after half of the planned steps: the rate
    # slows while the loss rises, and the rest is settling.
    rate = (1.0 - budgets[-1]) / (planned / 2)
    max_rate = options.max_taper_rate / steps_per_epoch if options.max_taper_rate is not None else 2 * rate
    rate = min_rate = min(rate, max_rate)
    min_rate /= 4                # the rate never falls below a quarter of its start: it always ends

    device = next(model.parameters()).device
    theta = [torch.full((g.size,), math.log(options.init / (1 - options.init)), device=device,
                        requires_grad=True) for g in groups]
    gate_opt = torch.optim.Adam(theta, lr=options.gate_lr)
    weight_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=options.lr,
                                 momentum=options.momentum, weight_decay=options.weight_decay, nesterov=True)
    if teacher is not None:
        teacher.eval()
    lam, budget, step = 0.0, float(dense), 0
    gated = float(dense)         # MACs of the gated model at the last step
    reached = 1.0                # lowest share of dense MACs both budget and gates have come down to
    pending = list(budgets)
    held = cooled = 0
    loss_avg, loss_ref = None, None
    snapshots: list[Snapshot] = []
    history = []
    hooks = GateHooks(model, groups)
    model.train()
    try:
        while pending:
            for x, y in batches():
                if not pending:
                    break
                target = pending[0] * dense
                if budget > target:
                    budget = max(target, budget - rate * dense)
                reached = min(reached, max(budget, gated) / dense)
                temperature = _temperature(options, reached, budgets[-1], cooled)
                gates = [torch.sigmoid(t / temperature) for t in theta]
                hooks.values = gates
                macs = counter.macs([g.double() for g in gates])
                x, y = x.to(device), y.to(device)
                if options.taper_distill:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                    task = distillation_loss(model(x), teacher_logits, y, options.taper_distill,
                                             options.taper_temperature)
                else:
                    task = mean_loss(loss_fn, model(x), y)
                c = (macs - budget) / dense
                c32 = c.float()
                loss = task + lam * c32 + options.penalty / 2 * c32 ** 2 + options.gamma * bool_loss(gates)
                gate_opt.zero_grad(set_to_none=True)
                weight_opt.zero_grad(set_to_none=True)
                loss.backward()
                gate_opt.step()
                weight_opt.step()
                with torch.no_grad():
                    bound = options.logit_bound * temperature
                    for t in theta:
                        t.clamp_(-bound, bound)
                lam += options.dual_lr * c.item()
                gated = macs.item()
                step += 1
                _check_finite(loss, lam, theta, step, options)
                loss_avg = task.item() if loss_avg is None else \
                    options.loss_average * loss_avg + (1 - options.loss_average) * task.item()
                if step % options.check_every == 0:
                    if loss_ref is not None and budget > target:
                        change = (loss_avg - loss_ref) / max(loss_ref, 1e-8)
                        if change > options.rise_tol:
                            rate = max(rate * options.slow_down, min_rate)
                        elif abs(change) < options.flat_tol:
                            rate = min(rate * options.speed_up, max_rate)
                    loss_ref = loss_avg
                settled = settled_share(gates, options.settle_margin)
                record = {"step": step, "task_loss": task.item(), "budget": budget / dense,
                          "gated_flops_kept": macs.item() / dense, "lambda": lam,
                          "rate_per_epoch": rate * steps_per_epoch, "temperature": temperature,
                          "settled_share": settled}
                history.append(record)
                if progress is not None:
                    progress({**record, "planned_steps": planned})
                if budget <= target:
                    held += 1
                    cooled = cooled + 1 if c.item() <= options.settle_tol else max(0, cooled - 2)
                    met = held >= options.settle_steps and settled >= options.settled_share and (
                        abs(c.item()) <= options.settle_tol
                        or _cut_flips(theta, gates, counter, budget, options.channel_multiple) <= 1)
                    if met or held >= options.max_hold_steps:
                        hooks.remove()
                        snapshots.append(_snapshot(model, groups, counter, theta, temperature, pending[0], step,
                                                   example_input, step <= planned, options.channel_multiple,
                                                   {"settled": met, "held_steps": held,
                                                    "constraint_error": c.item()}))
                        hooks = GateHooks(model, groups)
                        model.train()
                        pending.pop(0)
                        held = cooled = 0
    finally:
        hooks.remove()
        model.eval()
    info = {"taper_steps": step, "planned_steps": planned, "steps_per_epoch": steps_per_epoch,
            "final_lambda": lam, "history": history[:: max(1, len(history) // 100)],
            "snapshot_steps": {f"{s.budget:g}": s.step for s in snapshots},
            "snapshot_cuts": {f"{s.budget:g}": s.cut for s in snapshots}}
    return snapshots, info


# the options that drive the gates and the multiplier: too large, they blow the gate training up
GATE_KNOBS = ("gate_lr", "dual_lr", "penalty", "gamma")


def _check_finite(loss: torch.Tensor, lam: float, theta: list[torch.Tensor], step: int, options: TaperOptions) -> None:
    """Refuse a taper whose gate training blew up (each option finite and within float32, but a
    huge dual_lr grows the multiplier past float32's range within a few steps, a huge penalty or
    gamma makes the loss or a logit inf or nan): the gates then all close and the cut keeps a few
    percent of the MACs for any budget, reported as a success. ``lam``: the multiplier (it scales
    the float32 loss, so past ``FLOAT32_MAX`` it is inf there)."""
    bad = [what for what, fine in (("multiplier", abs(lam) <= FLOAT32_MAX),
                                   ("gates", all(bool(torch.isfinite(t).all()) for t in theta)),
                                   ("loss", math.isfinite(loss.item()))) if not fine]
    if not bad:
        return
    knobs = ("lr", *GATE_KNOBS)     # the weights' rate too: weights that blow up make the loss inf
    values = ", ".join(f"{name} {getattr(options, name):g}" for name in knobs)
    raise OptionError(f"the taper's gate training diverged ({values}): its {' and '.join(bad)} "
                      f"{'is' if len(bad) == 1 else 'are'} not finite in float32 after {step} step(s), so no cut can "
                      f"be trusted; lower one of {', '.join(knobs)} (defaults: leave them out)", knobs, listed=knobs)


def _temperature(options: TaperOptions, reached_share: float, last_share: float, cooled: int) -> float:
    """Gate temperature: 1 at the dense MACs, ``final_temperature`` once ``reached_share`` (the share
    of dense MACs the taper has got down to) is the last budget's (geometric in the share of MACs
    removed), times ``hold_cooling ** cooled`` while a budget is held."""
    if options.final_temperature >= 1.0:
        return 1.0                                   # no annealing at all
    progress = min(1.0, max(0.0, (1.0 - reached_share) / (1.0 - last_share)))
    return max(options.final_temperature ** progress * options.hold_cooling ** cooled, 1e-3)


def _cut_flips(logits, gates, counter: GatedMacs, budget: float, multiple: int) -> int:
    """Channels whose 0/1 cut at ``budget`` MACs differs from their rounded gate (0 when the
    settled gates already meet the budget as a cut; with coarse channels the MAC error of
    settled gates can exceed ``settle_tol`` though the cut would change one channel at most)."""
    masks, _ = cut_to_budget([t.detach().cpu() for t in logits], counter, budget, multiple)
    return int(sum(int((m != (g.detach().cpu() > 0.5)).sum()) for m, g in zip(masks, gates)))


def settled_share(gates: list[torch.Tensor], margin: float) -> float:
    """Share of all gate values within ``margin`` of 0 or 1."""
    flat = torch.cat([g.detach().flatten() for g in gates])
    return float((torch.minimum(flat, 1 - flat) <= margin).float().mean())


def _snapshot(model, groups, counter, logits, temperature, budget, step, example_input, on_schedule, multiple,
              facts) -> Snapshot:
    """Fold the gates into the weights, cut by logit (sigmoid saturates to ties; logits clipped to
    their bound tie too: those are ordered by the size of their weights), shrink."""
    device = next(model.parameters()).device
    logits = [t.detach().cpu() for t in logits]
    gates = [torch.sigmoid(t / temperature) for t in logits]
    folded = copy.deepcopy(model).eval()
    fold_gates(folded, groups, [g.to(device) for g in gates])
    masks, _ = cut_to_budget(logits, counter, budget * counter.dense, multiple, tiebreak=channel_norms(model, groups))
    small = shrink(folded, groups, masks, example_input.to(device))
    flat_g, flat_m = torch.cat(gates), torch.cat(masks).float()
    cut = {**facts, "temperature": temperature,
           "mean_abs_gate_change": float((flat_g - flat_m).abs().mean()),
           "kept_gates_below_half": int(((flat_g < 0.5) & (flat_m > 0)).sum()),
           "closed_gates_above_tenth": int(((flat_g > 0.1) & (flat_m == 0)).sum())}
    return Snapshot(budget, small, masks, step, on_schedule, cut)


def run_taper(ctx: ChannelContext, opts: TaperOptions) -> Cut:
    """The tapering Lagrangian as a channel method: one run, a shrunk model at every share. It
    trains a copy of ``ctx.model``: the caller's model is left untouched, as AutoBot leaves it."""
    shots, info = taper_snapshots(copy.deepcopy(ctx.model), ctx.groups, ctx.counter, ctx.shares, ctx.batches, ctx.example_input,
                                  opts, ctx.progress, ctx.teacher, ctx.loss_fn)
    info["on_schedule"] = {f"{s.budget:g}": s.reached_by_schedule for s in shots}
    return Cut({s.budget: s.model for s in shots}, {s.budget: s.masks for s in shots}, info)
