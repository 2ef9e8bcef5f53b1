"""Pruning whole channels: a channel method cuts the model to a MAC budget, then BatchNorm is
recalibrated and the shrunk model fine-tuned; every phase can be checkpointed.

Phases (stage numbers of the ``pipelines.stages`` protocol), each handed to the checkpointer
when done, so a run killed at any moment resumes from the last finished phase to the same
weights as one never interrupted:

    1             gates: the method trains its gates and cuts; the shrunk model(s) exist (with
                  ``reconstruct_batches``, their layers re-fit to the dense model's outputs by
                  least squares, ``reconstruct``)
    2             sparsify (only with ``sparsify``, the hybrid's): single weights of the shrunk
                  model pruned to the final budget; its zeros are then held through the fine-tune
    then, for each shrunk model (largest share first):
                  bn: BatchNorm recalibrated;  finetune: one phase per fine-tune epoch (on labels,
                  and with ``finetune_distill`` on the dense model's outputs as well)

A checkpoint holds every shrunk model's tensors and channel layout (the models are rebuilt
from the dense one with ``zoo.layout.apply_layout``), the fine-tune's optimizer and learning
rate schedule, the training loader's epoch and the RNG states. MACs and parameters are
counted by ``CostModel.count`` on each shrunk model, and the budget is checked against that.
"""

from __future__ import annotations

import copy
import itertools
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..costs import CostModel
from ..errors import worded
from ..masks import MaskHold, masks_from_weights
from ..options import OptionError
from ..params import ParamSpace
from ..pipelines.stages import (StageCheckpointer, StageState, capture_rng, load_optimizer, optimizer_tensors,
                               restore_rng)
from ..pipelines.weights import Outcome
from ..train import check_converging, cosine, recalibrate_batchnorm, sgd, train_epoch
from ..zoo.layout import apply_layout, channel_layout
from .depth import depth_cut
from .family import ChannelContext, ChannelOptions, Cut
from .gates import GatedMacs, GatedParams, ParamsNotCountable
from .group_types import GroupSet
from .groups import find_groups
from .left_dense import dense_groups_text
from .reconstruct import reconstruct
from .rounding import minimum_rounded_macs
from .shrink import _half_closed, checked_groups, shrink


def _rounded_up(share: float) -> str:
    """``share`` as a percent of three significant digits, rounded up (a figure to ask for)."""
    digits = max(0, 2 - math.floor(math.log10(100 * share)))
    return f"{math.ceil(100 * share * 10**digits) / 10**digits:.{digits}f}%"


def channel_context(model: nn.Module, costs: CostModel, example_input: torch.Tensor, shares: list[float],
                    channel_multiple: int, batches, progress=None,
                    residual_channels: str = "prune", targets: list[float] | None = None,
                    target_name: str = "flops", max_params: int | None = None) -> ChannelContext:
    """Find the channel groups (those whose removal computes what their gates compute: ``shrink.checked_groups``)
    and refuse channel-cut targets (default: ``shares``; the hybrid's:
    its structured_flops, named ``target_name`` in the message) that one channel (or
    ``channel_multiple``) per group and the unprunable layers already exceed, before any work;
    likewise ``max_params`` (a params budget: all the parameters the shrunk model may keep), counted
    per channel by ``GatedParams`` (checked once against a real shrink)."""
    groups = found_groups(model, example_input, residual_channels == "prune", costs)
    counter = GatedMacs(model, groups, costs)
    floor = minimum_rounded_macs(counter, channel_multiple)
    per_group = "one channel" if channel_multiple == 1 else f"{channel_multiple} channels (or all, if fewer)"
    heads = any(group.kind in ("heads", "qkv_heads") for group in groups)
    per_group += " per group" + ((" (whole heads in a group of attention heads)" if channel_multiple > 1 else
                                  " (one head per group of attention heads)") if heads else "")
    for share in shares if targets is None else targets:
        if floor > share * costs.macs:
            raise OptionError(f"{target_name} {share:g} asks for {share * costs.macs:,.0f} MACs but {per_group} "
                              f"and the unprunable layers already cost {floor:,.0f} "
                              f"({floor / costs.macs:.4%}){dense_groups_text(groups.skipped)}: ask for at least "
                              f"{_rounded_up(floor / costs.macs)}"
                              + ("" if channel_multiple == 1 else " or a smaller channel_multiple"),
                              (target_name, "channel_multiple"))
    ctx = ChannelContext(model, costs, groups, counter, list(shares), batches, example_input, progress)
    if max_params is not None:
        ctx.params_counter, ctx.max_params = _params_counter(model, groups, example_input), max_params
        least = ctx.params_counter.minimum
        if least > max_params:
            raise OptionError(f"the params budget of {max_params:,} parameters is below the {least:,} ({least / costs.params:.4%}) "
                              f"that one channel per group and the unprunable layers already keep"
                              f"{dense_groups_text(groups.skipped)}: ask for at least "
                              f"{_rounded_up(least / costs.params)} (or {least:,})", ("params",))
    return ctx


def found_groups(model: nn.Module, example_input, pads_residual: bool, costs: CostModel | None = None) -> GroupSet:
    """``model``'s channel groups that pass the numeric check (``checked_groups(find_groups(...))``),
    searched once per ``costs``: where ``costs`` (the trace of ``model``, or of a model equal to it, a
    sweep's ``PruneRequest.costs``) holds a search on an input equal to ``example_input`` in this residual
    mode, a copy of that one (the search is deterministic: the same groups and reasons; about 1 s on
    ResNet-56 per run and check), else a new search, kept there (a copy: a run may not change another's)."""
    cache = getattr(costs, "channel_groups", None)
    found = cache.get(pads_residual) if isinstance(cache, dict) else None
    if found is not None and _same_input(found[0], example_input):
        return copy.deepcopy(found[1])
    groups = checked_groups(model, find_groups(model, example_input, pads_residual=pads_residual), example_input)
    if isinstance(cache, dict):
        cache[pads_residual] = (_kept_input(example_input), copy.deepcopy(groups))
    return groups


def _kept_input(x):
    """A copy of an example input (a tensor, or a tuple / list of them) to compare later ones with."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_kept_input(v) for v in x)
    return x


def _same_input(a, b) -> bool:
    """Whether example inputs ``a`` and ``b`` are equal: the same types, shapes, dtypes, devices and values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b.detach()))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_input(u, v) for u, v in zip(a, b))
    return type(a) is type(b) and a == b


def _params_counter(model: nn.Module, groups: GroupSet, example_input: torch.Tensor) -> GatedParams:
    """``GatedParams`` of ``model``, checked against the parameters of a real shrink (about half of
    every group's channels closed, a fixed seed); refuses a params budget it cannot count."""
    fix = ("the channel methods cannot count its parameters per channel: leave params out, or give it to a weights "
           "method (e.g. method falcon with flops and params: zeros, no speedup)")
    try:
        counter = GatedParams(model, groups)
    except ParamsNotCountable as why:
        raise OptionError(f"params: {why}; {fix}", ("params", "flops")) from None
    gen = torch.Generator().manual_seed(0)
    masks = [_half_closed(group.size, gen) for group in groups]
    small = shrink(model, groups, masks, example_input)
    counted = sum(p.numel() for p in small.parameters())
    if counted != counter.params_of_masks(masks):
        raise OptionError(f"params: the shrunk model keeps {counted:,} parameters where their count per channel "
                          f"says {counter.params_of_masks(masks):,}; {fix}", ("params", "flops"))
    return counter


def prune_channels(ctx: ChannelContext, run, opts: ChannelOptions, *, recalibrate_bn: bool = True,
                   checkpointer: StageCheckpointer | None = None, progress: bool = False,
                   on_phase=None, sparsify=None) -> Outcome:
    """Run channel method ``run`` in ``ctx`` and finish its shrunk models (BN, fine-tune).

    Returns the Outcome of ``ctx.shares[0]`` (its ``snapshots``: the others, taper's); its seconds
    are every phase this process ran (``info["gate_seconds"]``: the gates' phase, a reconstruction apart).
    ``on_phase(record)`` is told after each phase is saved. ``sparsify(ctx, model, share, opts,
    recalibrate_bn) -> dict`` (a method row's second phase, the hybrid's FALCON): prunes single
    weights of each shrunk model in place; the fine-tune then holds its zeros.
    """
    loader = ctx.batches()          # one loader: every pass is a new epoch (new order, new crops)
    ctx.batches = lambda: loader
    # a copy of the dense model only where something reads it (a whole model's worth of memory
    # through every phase, 0.44 GB for BERT-base); otherwise the resume path's rebuild copies ctx.model
    dense = copy.deepcopy(ctx.model) if _reads_dense(run, opts, sparsify) else ctx.model
    ctx.teacher = dense if dense is not ctx.model else None
    history: list[dict] = []
    state = checkpointer.last() if checkpointer is not None else None
    optimizer = schedule = optimizer_state = None
    if state is None:
        start = time.perf_counter()
        bar, told = None, ctx.progress
        if progress and told is None:       # the CLI's progress: one step per gate batch (or depth round)
            total = getattr(opts, "gate_batches", None) if opts.depth_flops is None else None   # AutoBot's is known
            bar = tqdm(desc="gate training", total=total, unit="step", leave=False, dynamic_ncols=True)
            ctx.progress = lambda record: _advance(bar, record)
        try:
            cut, groups = _depth_then(ctx, run, opts)
        finally:
            if bar is not None:
                bar.close()
                ctx.progress = told
        seconds = gate_seconds = time.perf_counter() - start      # the gates (and a depth cut before them)
        if opts.reconstruct_batches:         # part of the cut's phase: a killed run redoes both
            cut.info["reconstruct"] = _reconstruct(cut, groups, dense, ctx.batches, opts.reconstruct_batches,
                                                   opts.reconstruct_ridge, recalibrate_bn)
            seconds = time.perf_counter() - start
        models, info = cut.models, {**cut.info, "gate_seconds": gate_seconds,
                                    "kept_channels": {f"{s:g}": [int(m.sum()) for m in cut.masks[s]] for s in cut.models}}
        history.append({"phase": "gates", "seconds": seconds})
        done = 1
        _save(checkpointer, done, models, models[ctx.shares[0]], history, info, loader, None, on_phase)
    else:
        models, info, optimizer_state = _restore(state, dense, loader)
        history, done = list(state.history), state.stage
        if "seconds" in info:               # a folder written before gate_seconds had its name
            info["gate_seconds"] = info.pop("seconds")
    ran_from = 0 if state is None else len(history)     # phases run by this process (the rest: restored)
    phases = _phases(models, opts, sparsify is not None)
    for number, (phase, share, epoch) in enumerate(phases, start=2):
        if number <= done:
            continue
        start = time.perf_counter()
        small = models[share]
        record = {"phase": phase, "flops": share}
        if phase == "sparsify":
            record.update(sparsify(ctx, small, share, opts, recalibrate_bn))
            info.setdefault("sparsify", {})[f"{share:g}"] = {k: v for k, v in record.items() if k != "falcon"}
            if share == ctx.shares[0]:      # the run's record says which budget bound, as autobot's does
                info.update({k: record[k] for k in ("bound", "budget_max_params") if k in record})
        elif phase == "bn":
            record["bn_recalibrated"] = bool(recalibrate_bn and recalibrate_batchnorm(small, ctx.batches()))
            optimizer = schedule = None
        else:
            if optimizer is None or epoch == 1:
                optimizer = sgd(small, opts.finetune_lr)
                schedule = cosine(optimizer, opts.finetune_epochs * len(loader))
                if epoch > 1:
                    _load_optimizer(optimizer, schedule, optimizer_state, getattr(checkpointer, "redo", None))
            record["epoch"] = epoch
            hold = _hold_zeros(small, ctx.costs, optimizer) if sparsify is not None else None
            try:
                # the epoch's mean training loss; "loss" is the evaluation's (the checkpointer's measure)
                record["finetune_loss"] = train_epoch(small, ctx.batches(), optimizer, schedule,
                                             f"fine-tune {epoch}/{opts.finetune_epochs}", progress,
                                             teacher=dense if opts.finetune_distill else None,
                                             distill=opts.finetune_distill, temperature=opts.finetune_temperature,
                                             loss_fn=ctx.loss_fn)
                check_converging(record["finetune_loss"], small, opts.finetune_lr,    # before its checkpoint
                                 f"fine-tune epoch {epoch}/{opts.finetune_epochs} of the {share:g} FLOPs model",
                                 "finetune_lr")
            finally:
                if hold is not None:
                    hold.remove()
            small.eval()
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        _save(checkpointer, number, models, small, history, info, loader,
              (optimizer, schedule) if phase == "finetune" else None, on_phase)
    # every phase's time (gates, BatchNorm, sparsify, fine-tune) in this process, not the checkpoints'
    # measurements and saving; the executor adds the restored phases' own
    seconds_here = sum(h["seconds"] for h in history[ran_from:])
    outcomes = {}
    for share, small in models.items():
        small.eval()
        counts = ctx.costs.count(small)
        if counts.macs > share * ctx.costs.macs:
            raise AssertionError(f"shrunk model has {counts.macs} MACs above the budget {share * ctx.costs.macs}")
        kept = counts.params if sparsify is not None else sum(p.numel() for p in small.parameters())
        if ctx.max_params is not None and kept > ctx.max_params:      # the hybrid's zeros count as removed
            raise AssertionError(f"shrunk model has {kept} parameters above the budget {ctx.max_params}")
        nonzeros = sparsity = None
        if sparsify is not None:          # weights zeroed too: count them against the dense model's prunable weights
            prunable = dict(include=ctx.include, exclude=ctx.exclude, costs=ctx.costs)
            nonzeros = int(sum(int((w != 0).sum()) for w in ParamSpace(small, **prunable).weights()))
            sparsity = 1 - nonzeros / ParamSpace(dense, **prunable).numel
        outcomes[share] = Outcome(small, counts, nonzeros, sparsity, seconds_here, history,
                                  {**{k: v for k, v in info.items() if k != "kept_channels"},
                                   "groups": len(ctx.groups), "kept_channels": info["kept_channels"][f"{share:g}"],
                                   "group_sizes": [g.size for g in ctx.groups],
                                   "group_kinds": [g.kind for g in ctx.groups],     # channels, heads, qkv_heads
                                   # a grouped conv's G blocks keep the same positions: counts above are per block
                                   "group_segments": [g.segments for g in ctx.groups],
                                   "group_roots": [g.root for g in ctx.groups],      # the layer each group is named by
                                   "skipped_groups": [f"{root}: {why}" for root, why in ctx.groups.skipped]})
    main = outcomes.pop(ctx.shares[0])
    main.snapshots = outcomes
    return main


def _reads_dense(run, opts: ChannelOptions, sparsify) -> bool:
    """Whether a phase reads the untouched dense copy of ``prune_channels``: the re-fit
    (``reconstruct_batches``), a distilled fine-tune, the taper's distillation (``ctx.teacher``),
    the hybrid's sparsify (its sparsity is counted against the dense prunable weights), or a
    method not prunekit's own (its ``ctx.teacher`` is documented as such a copy). The built-in
    methods leave ``ctx.model`` as it was (they cut copies of it), so a resumed run rebuilds its
    shrunk models from ``ctx.model`` itself."""
    if not getattr(run, "__module__", "").startswith("prunekit."):
        return True
    return bool(opts.reconstruct_batches or sparsify is not None or getattr(opts, "taper_distill", 0)
                or (opts.finetune_epochs and opts.finetune_distill))


def _advance(bar: tqdm, record: dict) -> None:
    """One gate step on ``bar``. The taper knows its planned steps only once it has seen the
    loader (``record["planned_steps"]``): the bar takes them as its total then, after any depth
    rounds already shown; a taper that runs past its plan to meet a budget lifts the total."""
    planned = record.get("planned_steps")
    if planned is not None:
        total = bar.n - record["step"] + 1 + planned     # depth rounds before the taper, then its plan
        if bar.total is None or bar.total < max(total, bar.n + 1):
            bar.total = max(total, bar.n + 1)
    bar.update(1)


def _reconstruct(cut: Cut, groups, dense: nn.Module, batches, count: int, ridge: float,
                 recalibrated: bool) -> dict:
    """Re-fit the layers of every shrunk model of ``cut`` (in place) to ``dense``'s layer outputs
    on the inputs of the next ``count`` training batches (``reconstruct``, relative ridge ``ridge``;
    ``recalibrated``: BatchNorm will be re-estimated after);
    the record per share, keyed like kept_channels. A prunekit loader's epoch is set back after:
    the batches are read again by the next phase, whose data order is the one it has without
    reconstruction (so the two runs differ in the re-fit weights alone)."""
    device = next(dense.parameters()).device
    loader = batches()
    epoch = getattr(loader, "epoch", None)
    inputs = [x.to(device) for x, _ in itertools.islice(loader, count)]
    if epoch is not None:
        loader.epoch = epoch
    return {f"{share:g}": reconstruct(small, dense, groups, cut.masks[share], inputs, ridge, recalibrated)
            for share, small in cut.models.items()}


def _depth_then(ctx: ChannelContext, run, opts: ChannelOptions) -> tuple[Cut, GroupSet]:
    """``run(ctx, opts)``, after a depth cut to ``opts.depth_flops`` when that is set (above every
    share: ``request.plan`` checked it): the method then works on the cut model, its shares
    rescaled to that model's MACs (and keyed back). Also returns the groups the cut's masks index."""
    if opts.depth_flops is None:
        return run(ctx, opts), ctx.groups
    batches = list(itertools.islice(ctx.batches(), opts.depth_batches))
    model, info = depth_cut(ctx.model, ctx.costs, opts.depth_flops * ctx.costs.macs, batches, opts.depth_per,
                            ctx.progress, ctx.loss_fn)
    costs = CostModel(model, ctx.example_input)
    # shares of the cut model's MACs; a hair lower so that rounding never lifts a budget past the dense one's
    scale = ctx.costs.macs / costs.macs * (1 - 1e-12)
    shares = {share * scale: share for share in ctx.shares}
    inner = channel_context(model, costs, ctx.example_input, list(shares), opts.channel_multiple, ctx.batches,
                            ctx.progress, opts.residual_channels,
                            targets=[t * scale for t in opts.channel_targets(ctx.shares)], max_params=ctx.max_params)
    inner.teacher, inner.loss_fn = ctx.teacher, ctx.loss_fn
    cut = run(inner, opts)
    return Cut({shares[s]: m for s, m in cut.models.items()}, {shares[s]: m for s, m in cut.masks.items()},
               {**cut.info, "depth": info}), inner.groups


def _hold_zeros(model: nn.Module, costs: CostModel, optimizer) -> MaskHold:
    """Hold the zero weights of ``model``'s prunable layers at zero through ``optimizer``'s steps.

    The prunable weights are those ``costs`` (the dense model's trace; a shrunk model keeps its
    parameter names) saw multiplied, as in the sparsify phase: by module type alone a
    ``SlimAttention``'s ``in_proj_weight`` or a functional weight would be left free to regrow.
    """
    space = ParamSpace(model, costs=costs)
    return MaskHold(space, masks_from_weights(space), optimizer)


def _phases(models: dict, opts: ChannelOptions, sparsify: bool = False) -> list[tuple[str, float, int]]:
    phases = [("sparsify", share, 0) for share in sorted(models, reverse=True)] if sparsify else []
    for share in sorted(models, reverse=True):
        phases.append(("bn", share, 0))
        phases += [("finetune", share, e) for e in range(1, opts.finetune_epochs + 1)]
    return phases


def _save(checkpointer, number, models, current, history, info, loader, training, on_phase) -> None:
    if checkpointer is None:
        if on_phase is not None:
            on_phase(history[-1])
        return
    rng = capture_rng()
    tensors = {f"{share!r}/{k}": v.detach().cpu().clone() for share, m in models.items()
               for k, v in m.state_dict().items()}
    extra = {"layouts": {repr(s): channel_layout(m) for s, m in models.items()}, "info": info,
             "loader_epoch": getattr(loader, "epoch", None)}
    if training is not None:
        optimizer_state, extra["optimizer"] = optimizer_tensors(*training)
        tensors.update(optimizer_state)
    checkpointer.save(StageState(number, tensors, history, rng, extra), current)
    restore_rng(rng)
    if on_phase is not None:
        on_phase(history[-1])


def _restore(state: StageState, dense: nn.Module, loader):
    """The shrunk models, cut info and optimizer state of a phase checkpoint; RNG and loader restored."""
    extra = state.extra
    models = {}
    for key, layout in extra["layouts"].items():
        share = float(key)
        small = apply_layout(copy.deepcopy(dense), layout)
        prefix = f"{key}/"
        small.load_state_dict({k[len(prefix):]: v for k, v in state.model_state.items() if k.startswith(prefix)})
        models[share] = small.eval()
    restore_rng(state.rng)
    if extra.get("loader_epoch") is not None:
        loader.epoch = extra["loader_epoch"]
    optimizer_state = (state.model_state, extra["optimizer"]) if "optimizer" in extra else None
    return models, extra["info"], optimizer_state


def _load_optimizer(optimizer, schedule, saved: tuple[dict, dict] | None, redo: str | None = None) -> None:
    """``redo``: how the refusal of a checkpoint without the optimizer state says to run it anew on
    the command line (the run checkpointer's ``redo``: --force, or a sweep's or --resume's words)."""
    if saved is None:
        head = "the run folder's checkpoint lacks the fine-tune's optimizer state: "
        raise worded(head + "run it anew with force=True", head + (redo or "run it anew with --force"))
    load_optimizer(optimizer, schedule, *saved)
