"""One entry point: prune a model to a MAC budget by removing channels, return the shrunk model.

``prune_structured(model, "autobot" | "taper", flops, example_input, train_batches, options)``
finds the channel groups, runs the method, removes the closed channels and (optionally)
recalibrates BatchNorm and fine-tunes. MACs and parameters are counted by ``CostModel.count``
on the shrunk model itself, and the budget is checked against that count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from ..costs import CostModel, Counts
from ..errors import PrunekitError
from ..train import recalibrate_batchnorm, train_epochs
from .autobot import AutoBotOptions, autobot_masks
from .gates import GatedMacs
from .groups import GroupSet, find_groups
from .rounding import minimum_rounded_macs
from .shrink import shrink
from .taper import TaperOptions, taper_snapshots

STRUCTURED_METHODS = ("autobot", "taper")


@dataclass
class StructuredResult:
    """``model``: the shrunk plain ``nn.Module``; ``counts``: CostModel counts of it against the
    dense model; ``snapshots``: budget -> StructuredResult for taper's other budgets."""

    model: nn.Module
    counts: Counts
    flops: float
    method: str
    seconds: float
    groups: int
    info: dict = field(default_factory=dict)
    snapshots: dict[float, "StructuredResult"] = field(default_factory=dict)


def _options(cls, options: dict | None):
    options = {k: v for k, v in (options or {}).items() if v is not None}
    known = {f.name for f in fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise PrunekitError(f"unknown option(s) {sorted(unknown)} for this method; known: {sorted(known)}")
    return cls(**options)


def check_flops(flops: float) -> float:
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops < 1:
        raise PrunekitError(f"structured pruning needs a share of MACs kept in (0, 1), got {flops!r}: "
                            "pass e.g. --flops 0.5")
    return float(flops)


def check_structured_request(model: nn.Module, method: str, flops: float, example_input: torch.Tensor,
                             snapshots: list[float] | None = None, channel_multiple: int = 1
                             ) -> tuple[CostModel, GroupSet, GatedMacs]:
    """Refuse a request that cannot be met before any work; returns the cost model, groups and counter."""
    if method not in STRUCTURED_METHODS:
        raise PrunekitError(f"unknown structured method {method!r}: pick one of {', '.join(STRUCTURED_METHODS)}")
    if snapshots and method != "taper":
        raise PrunekitError("snapshots at several budgets come from one taper run: use --method taper")
    costs = CostModel(model, example_input)
    groups = find_groups(model, example_input)
    counter = GatedMacs(model, groups, costs)
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise PrunekitError(f"--channel-multiple must be a whole number >= 1, got {channel_multiple!r}")
    floor = minimum_rounded_macs(counter, channel_multiple)
    per_group = "one channel" if channel_multiple == 1 else f"{channel_multiple} channels (or all, if fewer)"
    for share in [flops, *(snapshots or [])]:
        share = check_flops(share)
        if floor > share * costs.macs:
            raise PrunekitError(f"--flops {share:g} asks for {share * costs.macs:,.0f} MACs but {per_group} per "
                                f"group and the unprunable layers already cost {floor:,.0f} "
                                f"({floor / costs.macs:.1%}): ask for at least that share"
                                + ("" if channel_multiple == 1 else " or a smaller --channel-multiple"))
    return costs, groups, counter


def prune_structured(model: nn.Module, method: str, flops: float, example_input: torch.Tensor,
                     train_batches, options: dict | None = None, snapshots: list[float] | None = None,
                     recalibrate_bn: bool = True, finetune_epochs: int = 0, finetune_lr: float = 0.01,
                     progress=None) -> StructuredResult:
    """Prune ``model`` (left unchanged for autobot; its weights are trained by taper) to ``flops``.

    Args:
        flops: share of the dense model's MACs to keep, in (0, 1).
        example_input: (B, ...) tensor for tracing and counting.
        train_batches: function returning a fresh iterable of (x, y) batches (one epoch).
        options: fields of ``AutoBotOptions`` or ``TaperOptions`` (both take ``channel_multiple``:
            every group keeps a multiple of it, see ``rounding.py``).
        snapshots: taper only: further budgets (shares of MACs) to return models for.
    """
    start = time.perf_counter()
    multiple = (options or {}).get("channel_multiple")
    costs, groups, counter = check_structured_request(model, method, flops, example_input, snapshots,
                                                      1 if multiple is None else multiple)
    flops = float(flops)
    target = flops * costs.macs
    info: dict = {"skipped_groups": [f"{root}: {why}" for root, why in groups.skipped]}
    if method == "autobot":
        opts = _options(AutoBotOptions, options)
        masks, extra = autobot_masks(model, groups, counter, target, train_batches, opts, progress)
        small = shrink(model, groups, masks, example_input)
        made = {flops: (small, masks)}
        info.update(extra)
    else:
        opts = _options(TaperOptions, options)
        budgets = sorted(set([flops, *(snapshots or [])]), reverse=True)
        shots, extra = taper_snapshots(model, groups, counter, budgets, train_batches, example_input, opts,
                                       progress)
        made = {s.budget: (s.model, s.masks) for s in shots}
        info.update(extra)
        info["on_schedule"] = {f"{s.budget:g}": s.reached_by_schedule for s in shots}
    seconds = time.perf_counter() - start
    results = {}
    for budget, (small, masks) in made.items():
        if recalibrate_bn:
            recalibrate_batchnorm(small, train_batches())
        if finetune_epochs > 0:
            train_epochs(small, train_batches(), finetune_epochs, lr=finetune_lr, progress=progress is not None)
        small.eval()
        counts = costs.count(small)
        if counts.macs > budget * costs.macs:
            raise AssertionError(f"shrunk model has {counts.macs} MACs above the budget {budget * costs.macs}")
        kept = [int(m.sum()) for m in masks]
        results[budget] = StructuredResult(small, counts, budget, method, seconds, len(groups),
                                           {**info, "kept_channels": kept,
                                            "group_sizes": [g.size for g in groups]})
    main = results.pop(flops)
    main.snapshots = results
    return main

