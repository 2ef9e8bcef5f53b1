"""Least-squares reconstruction after a channel cut (after He et al. 2017 and ThiNet, made to see
BatchNorm re-estimation): ``prunekit.refit`` applied to the shrunk model.

Once channel groups lose channels, every later layer's inputs change. ``reconstruct`` re-fits each
Conv2d / Linear of the shrunk model, in forward order, so that on a few training batches its
outputs match the dense model's outputs of the same layer at the output channels it keeps, each
layer on inputs of the shrunk model that already holds the earlier re-fits (see ``prunekit.refit``:
ridge least squares per output channel from float64 moments; a layer that feeds a BatchNorm fit on
centred moments and, while the inputs are collected, the shrunk model's BatchNorms on batch
statistics, when its statistics will be re-estimated after; a fit that would raise a layer's
error is not kept).

Session 29's form re-fit only the layers that read cut channels, on running statistics, to the
raw dense outputs: on ResNet-56 (option A, AutoBot at 50% MACs, seed 0) 87.91% after BatchNorm
re-estimation against 87.51% uncorrected; this form 89.68% (docs/benchmarks.md, session 32).
"""

from __future__ import annotations

import torch
from torch import nn

from ..costs import is_conv1d_style
from ..refit import refit
from .group_types import GroupSet
from .layer_kinds import linear_in_out

RIDGE = 1e-3          # λ as a share of the mean diagonal of XᵀX


def closed_channels(groups: GroupSet, masks: list[torch.Tensor], name: str, role: str) -> set[int]:
    """The channels of layer ``name`` on axis ``role`` ("in" or "out") that ``masks`` (group order,
    (size,) bool each) remove."""
    closed: set[int] = set()
    for group, mask in zip(groups, masks):
        gone = torch.nonzero(~mask.bool().cpu()).flatten()
        if gone.numel() == 0 or group.kind not in ("channels", "qkv_heads"):
            continue
        for member in group.members:
            if member.module == name and member.role == role:
                closed.update(group.channels(member, gone).tolist())
    return closed


def kept_outputs(groups: GroupSet, masks: list[torch.Tensor], name: str, extent: int) -> torch.Tensor:
    """Indices (k,) of the dense layer ``name``'s ``extent`` output channels that survive the cut."""
    closed = closed_channels(groups, masks, name, "out")
    return torch.tensor([c for c in range(extent) if c not in closed], dtype=torch.long)


@torch.no_grad()
def reconstruct(small: nn.Module, dense: nn.Module, groups: GroupSet, masks: list[torch.Tensor],
                batches: list[torch.Tensor], ridge: float = RIDGE, recalibrated: bool = True) -> dict:
    """Re-fit, in forward order, every Conv2d / Linear of ``small`` (cut from ``dense`` by ``masks``
    over ``groups``) on the inputs ``batches`` (each (N, ...)); ``recalibrated``: ``small``'s
    BatchNorm statistics will be re-estimated after. Returns ``prunekit.refit``'s record (layers
    re-fit, skipped with why, mean relative output error before and after, images, seconds)."""
    # a Conv1D-style layer (GPT-2's, weight (in, out)) is named too: refit lists it as skipped, with why
    names = [n for n, m in small.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) or is_conv1d_style(m)]
    keep = {n: kept_outputs(groups, masks, n, linear_in_out(dense.get_submodule(n))[1]
                            if is_conv1d_style(dense.get_submodule(n)) else dense.get_submodule(n).weight.shape[0])
            for n in names}
    return refit(small, dense, names, batches, ridge=ridge, recalibrated=recalibrated, outputs=keep)
