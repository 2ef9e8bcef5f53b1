"""The layer kinds channel groups are made of: convolutions, BatchNorm, Linear layers of either
weight layout (``nn.Linear`` (out, in) or a Conv1D-style layer (in, out)), and their widths."""

from __future__ import annotations

from torch import nn

from ..costs import is_conv1d_style


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm


def is_linear(module) -> bool:
    """Whether ``module`` is a Linear layer of either weight layout: ``nn.Linear`` (out, in) or a
    Conv1D-style layer (in, out)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and is_conv1d_style(module))


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a Linear of either layout (see ``is_linear``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def _size_of(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, _CONV) else linear_in_out(module)[1]
