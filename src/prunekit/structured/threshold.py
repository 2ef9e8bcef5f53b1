"""Turn per-channel scores into keep-masks whose MACs are at or below a budget, short of it by
what whole channels leave.

One global threshold over all groups' scores, found by bisection over the sorted scores, so
that the kept MACs (counted by ``GatedMacs``, which equals ``CostModel.count`` of the shrunk
model) are the largest not above the budget. Every group keeps at least its best channel.
Channels tied at the threshold (gates clipped to one logit bound: a whole block of them) are
then added one at a time, by a secondary score, while they fit: otherwise a tie could leave the
cut far under the budget (a taper snapshot at 15% of the MACs for a 50% budget). Last, any closed
channel that still fits is added, best score first: the threshold stops at the first channel that
does not fit, and a cheaper one below it may (AutoBot on a DenseNet block: 43% of the MACs for 50%).
"""

from __future__ import annotations

import torch

from ..errors import PrunekitError
from .gates import GatedMacs, GatedParams


def masks_at(scores: list[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """Keep channels scoring strictly above ``threshold``; each group keeps its best channel."""
    masks = []
    for s in scores:
        m = s > threshold
        m[int(torch.argmax(s))] = True
        masks.append(m)
    return masks


def threshold_to_budget(scores: list[torch.Tensor], counter: GatedMacs, max_macs: float,
                        tiebreak: list[torch.Tensor] | None = None,
                        params: tuple[GatedParams, int] | None = None) -> tuple[list[torch.Tensor], float]:
    """Keep-masks whose MACs are the largest ``<= max_macs`` reachable by one global threshold,
    then the longest run that fits of the channels tied at it, highest ``tiebreak`` first (per
    group, like ``scores``; None: the lower index first), then every other closed channel that
    still fits, best score first (``_fill_gaps``). ``params``: (counter, most parameters) to meet
    as well: "fits" is then both (each only grows as channels open, so every step stays exact).

    Returns (masks, threshold). Raises ``PrunekitError`` if even one channel per group costs more.
    """
    if counter.minimum > max_macs:
        raise PrunekitError(f"the budget of {max_macs:,.0f} MACs is below the {counter.minimum:,.0f} MACs "
                            "left with one channel per group and the unprunable layers: ask for a larger --flops")
    if params is not None and params[0].minimum > params[1]:
        raise PrunekitError(f"the budget of {params[1]:,.0f} parameters is below the {params[0].minimum:,.0f} left "
                            "with one channel per group and the unprunable layers: ask for a larger --params")
    fits = _fits(counter, max_macs, params)
    values = torch.unique(torch.cat([s.detach().double().flatten() for s in scores]))  # sorted ascending
    # Candidate thresholds: below every score (keep all), then each score value.
    candidates = torch.cat([values[:1] - 1.0, values])
    lo, hi = 0, len(candidates) - 1          # macs(candidates[i]) decreases with i
    detached = [s.detach().double() for s in scores]
    if fits(masks_at(detached, float(candidates[0]))):
        return masks_at(detached, float(candidates[0])), float(candidates[0])
    while hi - lo > 1:                       # invariant: lo does not fit, hi fits
        mid = (lo + hi) // 2
        if fits(masks_at(detached, float(candidates[mid]))):
            hi = mid
        else:
            lo = mid
    threshold = float(candidates[hi])
    masks = _fill_ties(masks_at(detached, threshold), detached, threshold, fits, tiebreak)
    return _fill_gaps(masks, detached, fits, tiebreak), threshold


def _fits(counter: GatedMacs, max_macs: float, params: tuple[GatedParams, int] | None):
    """masks -> whether their MACs (and, with ``params``, their parameters) are within budget."""
    if params is None:
        return lambda masks: counter.macs_of_masks(masks) <= max_macs
    return lambda masks: counter.macs_of_masks(masks) <= max_macs and params[0].params_of_masks(masks) <= params[1]


def _fill_ties(masks: list[torch.Tensor], scores: list[torch.Tensor], threshold: float, fits,
               tiebreak: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Add the longest run, in tiebreak order, of the closed channels scoring exactly ``threshold``
    that keeps the MACs within the budget (by bisection: the MACs grow along the run)."""
    tied = [(g, int(j)) for g, s in enumerate(scores) for j in torch.nonzero(s == threshold).flatten()
            if not masks[g][j]]
    if len(tied) < 2:
        return masks                        # one tied channel is an ordinary threshold step: it does not fit
    if tiebreak is not None:
        tied.sort(key=lambda gj: -float(tiebreak[gj[0]][gj[1]]))   # stable: equal keys keep index order

    def with_first(count: int) -> list[torch.Tensor]:
        opened = [m.clone() for m in masks]
        for g, j in tied[:count]:
            opened[g][j] = True
        return opened

    good, over = 0, len(tied)              # with_first(len(tied)) is the next threshold down: over budget
    while over - good > 1:
        mid = (good + over) // 2
        if fits(with_first(mid)):
            good = mid
        else:
            over = mid
    return with_first(good)


def _fill_gaps(masks: list[torch.Tensor], scores: list[torch.Tensor], fits,
               tiebreak: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Add, best score (then tiebreak) first, every closed channel that still fits the budget.

    The threshold stops at the first channel that does not fit; a cheaper, lower-scored channel
    of another group may (DenseBlockCNN: AutoBot at 43% of the MACs for a 50% budget, with a 7%
    channel fitting). A group whose channel did not fit is passed over from then on: the channels
    of a group cost the same, and MACs only grow as channels open, so none of it fits later;
    this keeps the count evaluations to the channels added plus one per group.
    """
    masks = [m.clone() for m in masks]
    order = sorted(((-float(s[j]), -float(tiebreak[g][j]) if tiebreak is not None else 0.0, g, int(j))
                    for g, (s, m) in enumerate(zip(scores, masks)) for j in torch.nonzero(~m).flatten()))
    blocked: set[int] = set()
    for _, _, g, j in order:
        if g in blocked:
            continue
        masks[g][j] = True
        if not fits(masks):
            masks[g][j] = False
            blocked.add(g)
    return masks
