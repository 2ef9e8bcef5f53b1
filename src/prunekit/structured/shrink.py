"""Remove closed channels physically.

``shrink`` copies the model and cuts the closed channels of every group out of each member
layer with torch-pruning's pruning functions (the surgery on weights, biases and BN
statistics), so the result is an ordinary ``nn.Module`` of the same classes with smaller
layers. ``zoo.layout`` records and rebuilds its per-layer channel counts for saving.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from ..errors import PrunekitError
from .groups import GroupSet, build_graph


def shrink(model: nn.Module, groups: GroupSet, masks: list[torch.Tensor], example_input: torch.Tensor
           ) -> nn.Module:
    """A copy of ``model`` without the channels whose mask is False (masks in group order)."""
    if len(masks) != len(groups):
        raise PrunekitError(f"got {len(masks)} masks for {len(groups)} channel groups")
    for group, mask in zip(groups, masks):
        if mask.numel() != group.size:
            raise PrunekitError(f"mask of {group} has {mask.numel()} entries")
        if not bool(mask.any()):
            raise PrunekitError(f"{group} would lose every channel; keep at least one")
    small = copy.deepcopy(model)
    small.eval()
    graph = build_graph(small, example_input)
    modules = dict(small.named_modules())
    for group, mask in zip(groups, masks):
        closed = torch.nonzero(~mask.bool()).flatten().tolist()
        if not closed:
            continue
        root = modules[group.root]
        fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
        graph.get_pruning_group(root, fn, idxs=closed).prune()
    return small
