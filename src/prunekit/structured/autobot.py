"""AutoBot (Castells & Yeom, arXiv 2111.09635): trainable bottlenecks on a frozen network.

Gates ``g = sigmoid(theta)`` start at 0.9 on every channel of every group. Only ``theta`` is
trained (Adam), the weights are frozen and the model stays in eval mode, on

    loss = cross_entropy + beta * L_flops + gamma * L_bool
    L_flops = (F - T) / (F_max - T)  if F > T  else  1 - F / T
    L_bool  = mean |g - round(g)|

with ``F`` the MACs of the gated model (``GatedMacs``, groups and depthwise convs counted as
``CostModel`` counts them), ``T`` the target and ``F_max`` the dense MACs. ``gate_bn`` says what
BatchNorm does meanwhile: "frozen" (default: the running statistics, the paper's frozen network)
or "batch" (each batch's own statistics, running ones neither read nor updated, so the
cross-entropy is the one the pruned model has once its statistics are re-estimated). On ResNet-56
over three seeds "batch" scored 1.7 points more after the fine-tune at 30% of the MACs and 0.7
less at 50% (docs/benchmarks.md, session 13). The gates are then
cut by one global threshold found by bisection, the kept MACs the most it reaches at or below the
target, then every closed channel that still fits added (``threshold``): at or below the target,
short of it by what whole channels leave (the gate-loss estimate alone can miss it by a wide margin).

With a params budget too (``ChannelContext.max_params``, counted per channel by ``GatedParams``
as the MACs are by ``GatedMacs``), ``L_flops`` becomes the loss of whichever budget binds
(``budget_loss``) and the cut keeps the largest model meeting both: it lands on the binding one,
short of it by what whole channels leave; the record says which bound (``bound``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..fisher import BN_MODES, batchnorm_on_batch_statistics
from ..losses import LossFn, mean_loss
from ..errors import warn as warn_ours, worded_warning
from ..options import ADAM_LR, Integer, OneOf, OptionError, Real
from .gates import GatedMacs, GatedParams, GateHooks
from .group_types import GroupSet
from .family import ChannelContext, ChannelOptions, Cut
from .rounding import cut_to_budget
from .shrink import shrink


@dataclass
class AutoBotOptions(ChannelOptions):
    gate_batches: int = 200  # gate-training steps (batches of the train loader, 64 images by default)
    beta: float = 6.0        # weight of L_flops
    gamma: float = 0.4       # weight of L_bool
    gate_lr: float = 0.6     # Adam learning rate on theta
    init: float = 0.9        # initial gate value
    gate_bn: str = "frozen"  # BatchNorm while the gates train: "frozen" or "batch" (module docstring)
    takes_params = True      # a params budget as well as flops (module docstring); not an option
    constraints = {**ChannelOptions.constraints, "gate_batches": Integer(1), "beta": Real(0), "gamma": Real(0),
                   "gate_lr": Real(0, open_low=True, use=ADAM_LR), "init": Real(0, 1, open_low=True), "gate_bn": OneOf(BN_MODES)}


def flops_loss(macs: torch.Tensor, target: float, dense: float) -> torch.Tensor:
    """AutoBot's L_flops: (F-T)/(F_max-T) above the target, 1 - F/T at or below it."""
    if macs > target:
        return (macs - target) / max(dense - target, 1.0)
    return 1.0 - macs / target


def bool_loss(gates: list[torch.Tensor]) -> torch.Tensor:
    """Mean distance of the gates to {0, 1}."""
    flat = torch.cat(gates)
    return (flat - flat.round()).abs().mean()


def budget_loss(macs: torch.Tensor, target: float, dense: float, params: torch.Tensor | None = None,
                params_target: float | None = None, params_dense: float | None = None) -> torch.Tensor:
    """``flops_loss``, or with a params budget too the loss of the one that binds: the larger
    over-budget loss while either is over its target, else ``1 - max(F/T, P/T_p)`` (the smaller
    under-budget loss), which pulls the binding resource, not the other, up to its target."""
    lf = flops_loss(macs, target, dense)
    if params is None:
        return lf
    lp = flops_loss(params, params_target, params_dense)
    over_f, over_p = bool(macs > target), bool(params > params_target)
    if over_f or over_p:
        return torch.maximum(lf if over_f else torch.zeros_like(lf), lp if over_p else torch.zeros_like(lp))
    return torch.minimum(lf, lp)


def autobot_masks(model: nn.Module, groups: GroupSet, counter: GatedMacs, target_macs: float,
                  batches, options: AutoBotOptions, progress=None, loss_fn: LossFn | None = None,
                  params: tuple[GatedParams, int] | None = None) -> tuple[list[torch.Tensor], dict]:
    """Train the bottlenecks on ``batches`` (an iterable of (x, y), cycled) and cut to ``target_macs``;
    the task loss is ``loss_fn`` (``prunekit.losses``; None: cross-entropy). ``params``: (counter,
    most parameters): the gates learn toward whichever budget binds (``budget_loss``) and the cut
    meets both.

    Returns (keep-masks in group order, info with the loss history and the final gate values).
    """
    device = next(model.parameters()).device
    theta = [torch.full((g.size,), math.log(options.init / (1 - options.init)), device=device,
                        requires_grad=True) for g in groups]
    optimizer = torch.optim.Adam(theta, lr=options.gate_lr)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    history = []
    norms = batchnorm_on_batch_statistics(model) if options.gate_bn == "batch" else contextlib.nullcontext()
    try:
        with GateHooks(model, groups) as hooks, norms:
            step = 0
            while step < options.gate_batches:
                seen = False
                for x, y in batches():
                    seen = True
                    gates = [torch.sigmoid(t) for t in theta]
                    hooks.values = gates
                    macs = counter.macs([g.double() for g in gates])
                    ce = mean_loss(loss_fn, model(x.to(device)), y.to(device))
                    kept = None if params is None else params[0].params([g.double() for g in gates])
                    lf = budget_loss(macs, target_macs, counter.dense, kept,
                                     *(() if params is None else (params[1], params[0].dense)))
                    lb = bool_loss(gates)
                    loss = ce + options.beta * lf.float() + options.gamma * lb
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    history.append({"step": step, "ce": ce.item(), "l_flops": lf.item(), "l_bool": lb.item(),
                                    "gated_flops_kept": macs.item() / counter.dense,
                                    **({} if kept is None else {"gated_params_kept": kept.item() / params[0].dense})})
                    if progress is not None:
                        progress(history[-1])
                    step += 1
                    if step >= options.gate_batches:
                        break
                if not seen:
                    break
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    check_gates_finite(theta, history, options)
    # Cut on the logits: same order as the gates, without sigmoid's saturation into ties.
    scores = [t.detach().cpu() for t in theta]
    masks, threshold = cut_to_budget(scores, counter, target_macs, options.channel_multiple, params=params)
    bound, alone = {}, masks
    if params is not None:          # which budget bound: did the params budget change the MAC-only cut?
        alone, _ = cut_to_budget(scores, counter, target_macs, options.channel_multiple)
        alone_params = params[0].params_of_masks(alone)
        bound = {"budget_max_params": params[1], "flops_alone_params": alone_params,
                 "params_alone_flops": None, "bound": "params" if alone_params > params[1] else "flops"}
        if bound["bound"] == "flops":   # the params budget alone: how many MACs it would have allowed
            by_params, _ = cut_to_budget(scores, counter, counter.dense, options.channel_multiple, params=params)
            bound["params_alone_flops"] = counter.macs_of_masks(by_params) / counter.dense
    # the MAC budget's own cut: a params budget that binds keeps fewer MACs by design, not by saturated gates
    warn_if_far_below(counter.macs_of_masks(alone) / counter.dense, target_macs / counter.dense, options)
    info = {**bound, "threshold_gate": float(torch.sigmoid(torch.tensor(threshold))), "gate_steps": len(history),
            "gate_estimate_flops_kept": history[-1]["gated_flops_kept"] if history else None,
            "history": history[:: max(1, len(history) // 50)]}
    return masks, info


GATE_KNOBS = ("gate_lr", "beta", "gamma")


def _knobs(options: AutoBotOptions) -> str:
    return ", ".join(f"{name} {getattr(options, name):g}" for name in GATE_KNOBS)


def check_gates_finite(theta: list[torch.Tensor], history: list[dict], options: AutoBotOptions) -> None:
    """Refuse gates whose training blew up (a logit or the last step's loss not finite: a huge
    gate_lr, beta or gamma): their cut would be arbitrary (2% of the MACs kept for a budget of
    50%, accuracy at chance), reported as a success."""
    last = history[-1] if history else {}
    broken = not all(bool(torch.isfinite(t).all()) for t in theta) or not all(
        math.isfinite(last.get(k, 0.0)) for k in ("ce", "l_flops", "l_bool"))
    if broken:
        raise OptionError(f"AutoBot's gate training diverged ({_knobs(options)}): its gates or loss are not finite "
                          f"after {len(history)} step(s), so no cut can be trusted; lower gate_lr, beta or gamma "
                          "(defaults: leave them out)", GATE_KNOBS)


def warn_if_far_below(kept: float, share: float, options: AutoBotOptions) -> None:
    """Warn where the cut keeps far fewer MACs (``kept``, a share of the dense model's) than the
    budget's ``share``: under half of it. The cut meets the budget from below; far below, the
    gates saturated (gate_lr, beta or gamma too large) and ties were cut together."""
    if kept < 0.5 * share:
        said = (f"AutoBot's cut keeps {kept:.2%} of the MACs for a budget of {share:.2%} ({_knobs(options)}): "
                "its gates saturated, so whole ties were cut together")
        warn_ours(worded_warning(f"{said}; lower gate_lr, beta or gamma", f"{said}; lower --gate-lr, --beta or --gamma"))


def run_autobot(ctx: ChannelContext, opts: AutoBotOptions) -> Cut:
    """AutoBot as a channel method: train the bottlenecks, cut to ``ctx.shares[0]``, shrink."""
    share = ctx.shares[0]
    masks, info = autobot_masks(ctx.model, ctx.groups, ctx.counter, share * ctx.costs.macs, ctx.batches, opts,
                                ctx.progress, ctx.loss_fn, ctx.params_budget())
    return Cut({share: shrink(ctx.model, ctx.groups, masks, ctx.example_input)}, {share: masks}, info)
