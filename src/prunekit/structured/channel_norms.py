"""The size of each channel's outgoing weights: a secondary order for channels whose gates tie."""

from __future__ import annotations

import torch
from torch import nn

from ..costs import is_conv1d_style
from .group_types import GroupSet
from .layer_kinds import is_linear


def channel_norms(model: nn.Module, groups: GroupSet) -> list[torch.Tensor]:
    """Per group, a (size,) float64 tensor: the L2 norm of each channel's weights in the group's
    producing layers (output rows of its Conv/Linear "out" members, all segments and repeats
    together); zeros for a group without such a layer (attention heads)."""
    modules = dict(model.named_modules())
    norms = []
    for group in groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for member in group.layers("out"):
            module = modules[member.module]
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not is_linear(module):
                continue
            weight = module.weight.detach().to("cpu", torch.float64)
            if is_conv1d_style(module):     # Conv1D-style: (in, out)
                weight = weight.t()
            squares = weight.reshape(weight.shape[0], -1).pow(2).sum(1)
            rows = group.channels(member, torch.arange(group.size))     # segments x size x repeat
            total += squares[rows].view(group.segments, group.size, member.repeat).sum((0, 2))
        norms.append(total.sqrt())
    return norms
