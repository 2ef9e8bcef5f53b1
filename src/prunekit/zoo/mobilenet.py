"""MobileNetV1 (Howard et al. 2017), width 1.0: a conv stem and 13 depthwise-separable blocks.

ImageNet layout (224x224): stem stride 2, five stride-2 blocks, 7x7 final map, ~569M MACs and
~4.2M parameters. CIFAR layout (32x32): the stem has stride 1 and the blocks keep the ImageNet
strides (2 at the first 128-, 256-, 512- and 1024-channel blocks), so the final map is 2x2.
"""

from __future__ import annotations

import torch
from torch import nn

# (output channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class ConvBNReLU(nn.Sequential):
    """Conv (no bias, "same" padding) - BN - ReLU, as ``0``/``1``/``2`` of a Sequential.

    Shapes: (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride,
                padding=kernel_size // 2, groups=groups, bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )  # fmt: skip


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise ConvBNReLU (carries the stride), then 1x1 pointwise ConvBNReLU.

    Shapes: (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = ConvBNReLU(in_channels, in_channels, 3, stride, groups=in_channels)
        self.pointwise = ConvBNReLU(in_channels, out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """``features`` (stem + 13 blocks), global average pool, ``fc`` head.

    Shapes: (B, in_channels, H, W) -> (B, num_classes) logits.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, stem_stride: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(in_channels, 32, 3, stem_stride)]
        channels = 32
        for out_channels, stride in _BLOCKS:
            layers.append(DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))
