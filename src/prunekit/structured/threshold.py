"""Turn per-channel scores into keep-masks that meet a MAC budget exactly.

One global threshold over all groups' scores, found by bisection over the sorted scores, so
that the kept MACs (counted by ``GatedMacs``, which equals ``CostModel.count`` of the shrunk
model) are the largest not above the budget. Every group keeps at least its best channel.
"""

from __future__ import annotations

import torch

from ..errors import PrunekitError
from .gates import GatedMacs


def masks_at(scores: list[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """Keep channels scoring strictly above ``threshold``; each group keeps its best channel."""
    masks = []
    for s in scores:
        m = s > threshold
        m[int(torch.argmax(s))] = True
        masks.append(m)
    return masks


def threshold_to_budget(scores: list[torch.Tensor], counter: GatedMacs, max_macs: float
                        ) -> tuple[list[torch.Tensor], float]:
    """Keep-masks whose MACs are the largest ``<= max_macs`` reachable by one global threshold.

    Returns (masks, threshold). Raises ``PrunekitError`` if even one channel per group costs more.
    """
    if counter.minimum > max_macs:
        raise PrunekitError(f"the budget of {max_macs:,.0f} MACs is below the {counter.minimum:,.0f} MACs "
                            "left with one channel per group and the unprunable layers: ask for a larger --flops")
    values = torch.unique(torch.cat([s.detach().double().flatten() for s in scores]))  # sorted ascending
    # Candidate thresholds: below every score (keep all), then each score value.
    candidates = torch.cat([values[:1] - 1.0, values])
    lo, hi = 0, len(candidates) - 1          # macs(candidates[i]) decreases with i
    detached = [s.detach().double() for s in scores]
    if counter.macs_of_masks(masks_at(detached, float(candidates[0]))) <= max_macs:
        return masks_at(detached, float(candidates[0])), float(candidates[0])
    while hi - lo > 1:                       # invariant: macs(lo) > max, macs(hi) <= max
        mid = (lo + hi) // 2
        if counter.macs_of_masks(masks_at(detached, float(candidates[mid]))) <= max_macs:
            hi = mid
        else:
            lo = mid
    return masks_at(detached, float(candidates[hi])), float(candidates[hi])
