"""Round each group's kept channel count to a multiple of ``m`` while still meeting the MAC budget.

Why: oneDNN runs convolutions with odd channel counts much slower than with multiples of 8
(ResNet-56 at batch 64: a 64->19 conv 1.49 ms, 64->16 0.62 ms), so a shrunk model with
"exact" counts saves fewer milliseconds than MACs.

Allowed counts of a group of ``n`` channels: the multiples of ``m`` in ``[m, n]``, plus ``n``
itself (a group whose size is not a multiple keeps its full size as one more choice). A group
smaller than ``m`` therefore has a single choice, its full size: it is never pruned. A group of
attention heads (kind "heads" or "qkv_heads") counts heads of ``d`` channels each: its multiple
is the fewest heads whose channels are a multiple of ``m``, ``m / gcd(m, d)`` (any head count
when ``d`` is a multiple of ``m``).

Within a group the highest-scored channels are kept. Starting from the threshold cut
(``threshold_to_budget``), every group moves to its nearest allowed count (ties go down);
then, while over the budget, the group whose next step down loses the least importance per MAC
saved drops to that count; finally, while some group's next step up fits the budget, the one
gaining the most importance per MAC added grows. Importance is the score made non-negative
(callers pass gate values, ``sigmoid(logit)``), summed over the channels that move. MACs are
counted by ``GatedMacs``, which equals ``CostModel.count`` of the shrunk model.
"""

from __future__ import annotations

import math

import torch

from ..options import OptionError
from .gates import GatedMacs, GatedParams
from .left_dense import dense_groups_text
from .threshold import threshold_to_budget


def allowed_counts(size: int, multiple: int) -> list[int]:
    """Kept-channel counts a group of ``size`` may have, ascending (never 0)."""
    counts = list(range(multiple, size + 1, multiple))
    if not counts or counts[-1] != size:
        counts.append(size)
    return counts


def group_multiple(group, multiple: int) -> int:
    """The multiple ``multiple`` (of channels) as a multiple of ``group``'s units: heads of ``d``
    channels for a head group (``m / gcd(m, d)`` heads), channels otherwise."""
    if group.kind in ("heads", "qkv_heads"):
        return multiple // math.gcd(multiple, group.members[0].repeat)
    return multiple


def _masks(orders: list[torch.Tensor], kept: list[int]) -> list[torch.Tensor]:
    masks = []
    for order, k in zip(orders, kept):
        m = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
        m[order[:k]] = True
        masks.append(m)
    return masks


def minimum_rounded_macs(counter: GatedMacs, multiple: int) -> int:
    """MACs with every group at its smallest allowed count (and the unprunable layers)."""
    sizes = [g.size for g in counter.groups]
    kept = [allowed_counts(n, group_multiple(g, multiple))[0] for n, g in zip(sizes, counter.groups)]
    return counter.macs_of_masks(_masks([torch.arange(n) for n in sizes], kept))


def round_to_budget(scores: list[torch.Tensor], masks: list[torch.Tensor], counter: GatedMacs,
                    max_macs: float, multiple: int) -> list[torch.Tensor]:
    """Keep-masks with every group's count in ``allowed_counts`` and MACs ``<= max_macs``.

    ``scores``: per group, a (size,) tensor of non-negative importances (higher = keep first);
    ``masks``: the starting cut (its counts are rounded). Raises ``PrunekitError`` when even the
    smallest allowed counts cost more than ``max_macs``.
    """
    if multiple < 1:
        raise OptionError(f"channel_multiple must be 1 or more, got {multiple}", ("channel_multiple",))
    if multiple == 1:
        return masks
    if any(bool((s < 0).any()) for s in scores):
        raise ValueError("round_to_budget needs non-negative importances (e.g. gate values)")
    floor = minimum_rounded_macs(counter, multiple)
    if floor > max_macs:
        raise OptionError(f"the budget of {max_macs:,.0f} MACs is below the {floor:,.0f} MACs "
                          f"({floor / counter.dense:.4%}) left with {multiple} channels (or all, if fewer) per group "
                          f"(channel_multiple {multiple}) and the unprunable layers"
                          f"{dense_groups_text(counter.groups.skipped)}: ask for a larger flops or a smaller "
                          "channel_multiple", ("flops", "channel_multiple"))
    orders = [torch.argsort(s.detach().double(), descending=True, stable=True) for s in scores]
    # cumulative importance of the top-k channels: prefix[i][k]
    prefix = [torch.cat([torch.zeros(1, dtype=torch.float64), s.detach().double()[o].cumsum(0)])
              for s, o in zip(scores, orders)]
    choices = [allowed_counts(s.numel(), group_multiple(g, multiple)) for s, g in zip(scores, counter.groups)]
    kept = []
    for m, c in zip(masks, choices):
        k = int(m.sum())
        kept.append(min(c, key=lambda a: (abs(a - k), a)))
    macs = lambda ks: counter.macs_of_masks(_masks(orders, ks))  # noqa: E731

    def step(i: int, up: bool) -> int | None:
        at = choices[i].index(kept[i])
        j = at + (1 if up else -1)
        return choices[i][j] if 0 <= j < len(choices[i]) else None

    current = macs(kept)
    while current > max_macs:            # drop the cheapest step (least importance per MAC saved)
        best = None
        for i in range(len(kept)):
            k = step(i, up=False)
            if k is None:
                continue
            trial = kept[:i] + [k] + kept[i + 1:]
            cost = macs(trial)
            saved = current - cost
            if saved <= 0:
                continue
            ratio = float(prefix[i][kept[i]] - prefix[i][k]) / saved
            if best is None or ratio < best[0]:
                best = (ratio, i, k, cost)
        if best is None:                 # cannot happen above the floor; guard against a silent loop
            raise AssertionError("rounding could not reach the budget above its floor")
        _, i, kept[i], current = best
    while True:                          # add back the best-paying step that still fits
        best = None
        for i in range(len(kept)):
            k = step(i, up=True)
            if k is None:
                continue
            trial = kept[:i] + [k] + kept[i + 1:]
            cost = macs(trial)
            if cost > max_macs:
                continue
            added = max(cost - current, 1)
            ratio = float(prefix[i][k] - prefix[i][kept[i]]) / added
            if best is None or ratio > best[0]:
                best = (ratio, i, k, cost)
        if best is None:
            break
        _, i, kept[i], current = best
    return _masks(orders, kept)


def cut_to_budget(logits: list[torch.Tensor], counter: GatedMacs, max_macs: float, multiple: int = 1,
                  tiebreak: list[torch.Tensor] | None = None,
                  params: tuple[GatedParams, int] | None = None) -> tuple[list[torch.Tensor], float]:
    """Gate logits -> keep-masks meeting ``max_macs``: the global threshold cut, then (``multiple`` > 1)
    rounded per group to multiples of ``multiple`` by gate value ``sigmoid(logit)``.

    Returns (masks, threshold of the unrounded cut). With ``multiple == 1`` this is exactly
    ``threshold_to_budget`` (``tiebreak`` orders the channels tied at the threshold; ``params``:
    (counter, most parameters) met as well, with ``multiple`` 1 only: ``request`` refuses the two together).
    """
    if params is not None and multiple != 1:
        raise OptionError("params with channel_multiple above 1 is not supported: leave channel_multiple at 1 "
                          "or leave params out", ("params", "channel_multiple"))
    masks, threshold = threshold_to_budget(logits, counter, max_macs, tiebreak, params)
    if multiple != 1:
        masks = round_to_budget([torch.sigmoid(t.detach().double()) for t in logits], masks, counter,
                                max_macs, multiple)
    return masks, threshold
