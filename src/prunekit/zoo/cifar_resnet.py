"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of BasicBlocks at 16/32/64 channels.

Two shortcut flavours, each matching the layout of a published checkpoint family:

* option A (akamaster's ``pytorch_resnet_cifar10``): a shape-changing shortcut subsamples by
  the stride and zero-pads the new channels (:class:`ZeroPadShortcut`, no parameters); the
  block's shortcut module is called ``shortcut``, the head ``linear``.
* option B (the CHITA / WoodFisher / M-FAC ResNet20): a 1x1 conv + BN projection called
  ``downsample`` (``downsample.0`` conv, ``downsample.1`` BN); the head is ``fc``.

Depth ``6n + 2``: n = 3, 5, 7, 9 gives ResNet20/32/44/56. Any input size works (32x32 CIFAR,
28x28 Fashion-MNIST ...): the head pools globally.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Shortcut = Literal["A", "B"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` zero-padded from C_in to C_out channels.

    The new channels are split evenly before and after the input's channels. No parameters and
    no multiply-accumulates (``zero_macs = True`` tells the cost model so); ``pads_channels``
    tells channel pruning that channels change count here (input and output channels belong to
    different groups).

    After structured pruning the map is general: ``source`` (C_out,) gives, per output channel,
    the input channel it copies, or -1 for a zero channel (``remove_inputs`` /
    ``remove_outputs`` keep it right as channels are cut; ``source_list`` / ``set_source`` save
    and restore it). ``source`` is a non-persistent buffer: state dicts stay those of the checkpoints.

    Shapes: (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).
    """

    zero_macs = True
    pads_channels = True   # tells structured pruning: channels change count here by zero-padding

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"cannot zero-pad {in_channels} channels down to {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.padded = True      # the dense layout: F.pad (no index map needed)
        before = (out_channels - in_channels) // 2
        source = torch.full((out_channels,), -1, dtype=torch.long)
        source[before:before + in_channels] = torch.arange(in_channels)
        self.register_buffer("source", source, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if self.padded:
            extra = self.out_channels - self.in_channels
            return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        # One zero channel appended at index C_in; -1 in ``source`` points at it.
        x = F.pad(x, (0, 0, 0, 0, 0, 1))
        index = torch.where(self.source < 0, torch.full_like(self.source, self.in_channels), self.source)
        return x.index_select(1, index)

    def remove_inputs(self, closed: list[int]) -> None:
        """Input channels ``closed`` are gone: outputs that copied them become zero channels."""
        keep = torch.ones(self.in_channels, dtype=torch.bool)
        keep[list(closed)] = False
        renumber = torch.full((self.in_channels,), -1, dtype=torch.long)
        renumber[keep] = torch.arange(int(keep.sum()))
        source = self.source.clone()
        copied = source >= 0
        source[copied] = renumber.to(source.device)[source[copied]]
        self.set_source(int(keep.sum()), source.tolist())

    def remove_outputs(self, closed: list[int]) -> None:
        """Output channels ``closed`` are gone."""
        keep = torch.ones(self.out_channels, dtype=torch.bool)
        keep[list(closed)] = False
        self.set_source(self.in_channels, self.source[keep.to(self.source.device)].tolist())

    def source_list(self) -> list[int]:
        return [int(v) for v in self.source.tolist()]

    def set_source(self, in_channels: int, source: list[int]) -> None:
        """Set the channel map: ``in_channels`` inputs; ``source[c]`` in [-1, in_channels)."""
        if any(not -1 <= int(v) < in_channels for v in source):
            raise ValueError(f"shortcut source map {source} does not fit {in_channels} input channels")
        self.in_channels, self.out_channels = int(in_channels), len(source)
        self.source = torch.tensor([int(v) for v in source], dtype=torch.long, device=self.source.device)
        self.padded = False

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}" + ("" if self.padded else ", mapped")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The first conv carries the stride. When the shape changes, the shortcut is a
    :class:`ZeroPadShortcut` named ``shortcut`` (option A) or a 1x1 conv + BN named
    ``downsample`` (option B); otherwise it is the identity (``shortcut`` is ``nn.Identity``
    for option A, ``downsample`` is absent for option B, as in the checkpoints).

    Shapes: (B, in_planes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, option: Shortcut) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        reshapes = stride != 1 or in_planes != planes
        self.shortcut: nn.Module | None = None
        self.downsample: nn.Module | None = None
        if option == "A":
            self.shortcut = ZeroPadShortcut(in_planes, planes, stride) if reshapes else nn.Identity()
        elif reshapes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            identity = self.shortcut(x)
        elif self.downsample is not None:
            identity = self.downsample(x)
        else:
            identity = x
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """conv3x3(16)-BN-ReLU, 3 stages of ``blocks_per_stage`` BasicBlocks, global pool, linear head.

    Shapes: (B, in_channels, H, W) -> (B, num_classes) logits.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        option: Shortcut = "A",
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1, option))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        head = nn.Linear(64, num_classes)
        # The checkpoints name the head differently: option A "linear", option B "fc".
        self.head_name = "linear" if option == "A" else "fc"
        self.add_module(self.head_name, head)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return getattr(self, self.head_name)(self.flatten(self.avgpool(x)))


def cifar_resnet(depth: int, option: Shortcut, num_classes: int, in_channels: int) -> CifarResNet:
    """ResNet-``depth`` for CIFAR; ``depth`` must be ``6n + 2`` (20, 32, 44, 56, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return CifarResNet((depth - 2) // 6, option, num_classes, in_channels)
