"""Structured + unstructured pruning under one MAC budget (method ``hybrid``).

Phase 1 (a channel cut): AutoBot removes whole channels down to ``structured_flops`` of the
dense MACs; the model is shrunk (a smaller, faster network). Phase 2 (``sparsify_shrunk``):
FALCON prunes single weights of the shrunk model until the whole model keeps at most
``flops`` of the *dense* model's MACs. Both phases count with the same ``CostModel`` rules
(the dense model's cost model re-traces the shrunk, masked model; phase 2's own cost model
of the shrunk model must agree with it, and is checked to). ``structure.pipeline`` then
recalibrates BatchNorm and fine-tunes with the zeros held, each phase checkpointed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

from torch import nn

from ..budget import Amount, Budget
from ..costs import CostModel
from ..data.loaders import BatchLoader
from ..data.replay import ReplayedLoader
from ..options import OptionError, Real
from ..params import ParamSpace
from ..pipelines.fisher_methods import run_falcon
from ..pipelines.fisher_options import FalconOptions
from ..pipelines.weights import PruneContext, prune_weights
from .autobot import AutoBotOptions, autobot_masks
from .family import ChannelContext, Cut
from .shrink import shrink


@dataclass
class HybridOptions(AutoBotOptions, FalconOptions):
    """AutoBot's options for the channel phase, FALCON's for the weights phase, and
    structured_flops: the share of the dense MACs the channel phase keeps (above ``flops``)."""

    structured_flops: float = 0.5
    takes_params = True                 # met by its weights phase (``sparsify_shrunk``), zeros counting
    refit_batches: int | str = 0        # the fine-tune follows; its measured rows ran without the re-fit
    constraints = {**AutoBotOptions.constraints, **FalconOptions.constraints,
                   "structured_flops": Real(0, 1, open_low=True)}

    @classmethod
    def names(cls) -> list[str]:
        """Not the depth cut's options: the hybrid's two phases already share the budget."""
        return [name for name in super().names() if not name.startswith("depth_")]

    def channel_targets(self, shares: list[float]) -> list[float]:
        return [self.structured_flops]

    def falcon_options(self) -> FalconOptions:
        names = {f.name for f in fields(FalconOptions)}
        return FalconOptions(**{k: v for k, v in self.to_dict().items() if k in names})


def run_hybrid(ctx: ChannelContext, opts: HybridOptions) -> Cut:
    """Phase 1: AutoBot to ``structured_flops``, shrunk; keyed by the final share ``ctx.shares[0]``."""
    final = ctx.shares[0]
    if not opts.structured_flops > final:
        raise OptionError(f"structured_flops {opts.structured_flops:g} must be above flops {final:g}: the channel "
                          "phase keeps more MACs than the final budget, FALCON removes the rest",
                          ("structured_flops", "flops"))
    masks, info = autobot_masks(ctx.model, ctx.groups, ctx.counter, opts.structured_flops * ctx.costs.macs,
                                ctx.batches, opts, ctx.progress, ctx.loss_fn)
    small = shrink(ctx.model, ctx.groups, masks, ctx.example_input)
    info["structured_macs"] = ctx.costs.count(small).macs
    return Cut({final: small}, {final: masks}, info)


def sparsify_shrunk(ctx: ChannelContext, small: nn.Module, share: float, opts: HybridOptions,
                    recalibrate_bn: bool = True) -> dict:
    """Phase 2: FALCON on ``small`` (in place) so that it keeps at most ``share`` of the dense
    MACs. Returns facts to record (nonzeros, MACs, FALCON's stage records). A channel cut that
    already fits (it keeps the largest cut <= structured_flops, which may lie a channel's worth
    under ``share``) is kept as it is: FALCON would be asked for more MACs than the model has.
    With a params budget (``ctx.max_params``: all parameters, zeros not counted) FALCON meets it as
    well; a cut already under it is not asked for it (nor for MACs, where it is under those); the
    facts then say which budget bound (``_bound``)."""
    costs = CostModel(small, ctx.example_input)
    own, by_dense = costs.count(small).macs, ctx.costs.count(small).macs     # both nonzero-aware: a zero the
    if own != by_dense:                                   # cut kept (a tied table's padding row) costs no MAC in either
        raise AssertionError(f"the shrunk model costs {own} MACs by its own trace and "
                             f"{by_dense} by the dense model's: one counting rule broken")
    space = ParamSpace(small, include=ctx.include, exclude=ctx.exclude, costs=costs)
    max_macs = int(share * ctx.costs.macs)
    params_fit = ctx.max_params is None or costs.count(small).params <= ctx.max_params
    if costs.macs <= max_macs and params_fit:   # the channel cut (the largest <= structured_flops)
        nonzeros = space.count_nonzero()      # already fits: nothing for FALCON
        return {"nonzeros": nonzeros, "prunable_weights": space.numel, "sparsity_of_shrunk": 1 - nonzeros / space.numel,
                "macs": costs.macs, "falcon": [], "skipped": "the channel cut already meets the budget",
                **_bound(ctx, "channels")}
    budget = Budget(flops=Amount(float(min(max_macs, costs.macs)), absolute=True),
                    params=None if params_fit else Amount(float(ctx.max_params), absolute=True)).resolve(costs, space)
    batches, moved_on = _one_epoch(ctx.batches)
    pctx = PruneContext(small, space, costs, budget, batches, recalibrate_bn=recalibrate_bn, loss_fn=ctx.loss_fn)
    outcome = prune_weights(pctx, run_falcon, opts.falcon_options())
    moved_on()
    kept = outcome.counts.params            # all parameters, zeros not counted
    binding = ("flops" if params_fit else "params" if costs.macs <= max_macs
               else "params" if kept / ctx.max_params >= outcome.counts.macs / max_macs else "flops")
    return {"nonzeros": outcome.nonzeros, "prunable_weights": space.numel, "sparsity_of_shrunk": outcome.sparsity,
            "macs": outcome.counts.macs, "falcon": outcome.history, **{k: v for k, v in outcome.info.items()
                                                                         if isinstance(v, (int, float, str, bool))},
            **_bound(ctx, binding)}


def _bound(ctx: ChannelContext, binding: str) -> dict:
    """With a params budget (``ctx.max_params``), which budget bound the result, as autobot's record
    says it (``bound``, ``budget_max_params``; ``pipeline`` lifts them into the run's record):
    "params" where FALCON was asked for the params budget and the result is at least as near it
    as to the MAC budget (kept / most, each), or was asked for parameters alone (the channel cut
    already under the MACs); "flops" where the MACs are the nearer, or the channel cut already
    met the params budget (FALCON asked for MACs only); "channels" where the channel cut met both
    (FALCON not run). {} without a params budget."""
    return {} if ctx.max_params is None else {"bound": binding, "budget_max_params": ctx.max_params}


def _one_epoch(batches):
    """(a function giving the same stream at every call, what to call when FALCON is done).

    FALCON takes ``batches()`` to be the same stream at every call (on several ranks each reads
    its rows piece by piece, one call each, and every rank must read one process's rows); the
    channel pipeline's loader starts a new epoch, a new order, at every pass. Hold it at its
    epoch for the phase, then move it on by one epoch, as one pass would have."""
    loader = batches()
    if not isinstance(loader, (BatchLoader, ReplayedLoader)):
        return batches, lambda: None
    epoch = loader.epoch

    def at_epoch() -> BatchLoader:
        held = copy.copy(loader)
        held.epoch = epoch
        return held

    def moved_on() -> None:
        loader.epoch = epoch + 1
    return at_epoch, moved_on
