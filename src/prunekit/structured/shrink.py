"""Remove closed channels physically.

``shrink`` copies the model and cuts the closed channels of every group out of each member
layer: Conv (plain, depthwise, grouped: each block keeps the same positions) and Linear weights
and biases, BatchNorm parameters and statistics, the channel map of a zero-pad shortcut
(its copies follow the kept input channels, closed ones and pads are zero); a head group replaces its
``nn.MultiheadAttention`` by a ``SlimAttention`` holding the kept heads. The result is an
ordinary ``nn.Module`` with smaller layers, computing what the gated model with 0/1 gates
computes. ``zoo.layout`` records and rebuilds its per-layer channel counts for saving.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import PrunekitError
from .attention import slim_copy
from .groups import GroupSet

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm


def shrink(model: nn.Module, groups: GroupSet, masks: list[torch.Tensor], example_input: torch.Tensor
           ) -> nn.Module:
    """A copy of ``model`` without the channels whose mask is False (masks in group order).

    ``example_input`` is kept for the callers' convenience (the surgery needs no trace).
    """
    if len(masks) != len(groups):
        raise PrunekitError(f"got {len(masks)} masks for {len(groups)} channel groups")
    for group, mask in zip(groups, masks):
        if mask.numel() != group.size:
            raise PrunekitError(f"mask of {group} has {mask.numel()} entries")
        if not bool(mask.any()):
            raise PrunekitError(f"{group} would lose every channel; keep at least one")
    small = copy.deepcopy(model)
    modules = dict(small.named_modules())
    removed: dict[tuple[str, str], set[int]] = {}
    heads: dict[str, torch.Tensor] = {}
    for group, mask in zip(groups, masks):
        closed = torch.nonzero(~mask.bool().cpu()).flatten()
        if closed.numel() == 0:
            continue
        if group.kind == "heads":
            heads[group.members[0].module] = mask.bool().cpu()
            continue
        for member in group.members:
            axis = "in" if member.role == "in" and not _is_depthwise(modules[member.module]) else "out"
            removed.setdefault((member.module, axis), set()).update(group.channels(member, closed).tolist())
    with torch.no_grad():
        for (name, axis), channels in removed.items():
            module = modules[name]
            if getattr(module, "pads_channels", False):     # a zero-pad shortcut: rewrite its channel map
                (module.remove_inputs if axis == "in" else module.remove_outputs)(sorted(channels))
                continue
            _cut(module, axis, sorted(channels), name)
        for name, keep in heads.items():
            _replace(small, name, slim_copy(modules[name], keep))
    return small


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, _CONV) and module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _keep(extent: int, closed: list[int]) -> torch.Tensor:
    keep = torch.ones(extent, dtype=torch.bool)
    keep[closed] = False
    return torch.nonzero(keep).flatten()


def _cut(module: nn.Module, axis: str, closed: list[int], name: str) -> None:
    """Remove channels ``closed`` from ``module``'s ``axis`` ("out": outputs/features, "in": inputs)."""
    if isinstance(module, _BN):
        keep = _keep(module.num_features, closed)
        for attr in ("weight", "bias"):
            if getattr(module, attr) is not None:
                setattr(module, attr, nn.Parameter(getattr(module, attr)[keep].clone()))
        for attr in ("running_mean", "running_var"):
            if getattr(module, attr) is not None:
                setattr(module, attr, getattr(module, attr)[keep].clone())
        module.num_features = keep.numel()
        return
    if isinstance(module, nn.Linear):
        if axis == "out":
            keep = _keep(module.out_features, closed)
            module.weight = nn.Parameter(module.weight[keep].clone())
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias[keep].clone())
            module.out_features = keep.numel()
        else:
            keep = _keep(module.in_features, closed)
            module.weight = nn.Parameter(module.weight[:, keep].clone())
            module.in_features = keep.numel()
        return
    if not isinstance(module, _CONV):
        raise PrunekitError(f"cannot remove channels of {name} ({type(module).__name__})")
    depthwise = _is_depthwise(module)
    if axis == "out" or depthwise:
        keep = _keep(module.out_channels, closed)
        module.weight = nn.Parameter(module.weight[keep].clone())
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias[keep].clone())
        module.out_channels = keep.numel()
        if depthwise:
            module.in_channels = module.groups = keep.numel()
        return
    keep = _keep(module.in_channels, closed)
    per = module.in_channels // module.groups
    local = keep[keep < per]                   # every block keeps the same positions
    if local.numel() * module.groups != keep.numel() or not all(
            torch.equal(keep[(keep >= s * per) & (keep < (s + 1) * per)] - s * per, local)
            for s in range(module.groups)):
        raise AssertionError(f"{name}: the kept input channels differ between its {module.groups} groups")
    module.weight = nn.Parameter(module.weight[:, local].clone())
    module.in_channels = keep.numel()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
