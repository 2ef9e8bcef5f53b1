"""VGG16 with batch norm for CIFAR: 13 conv3x3-BN-ReLU layers, 5 max-pools, one linear head.

The convs have no bias (the BN right after each makes one redundant).

The head is a single ``Linear(512, num_classes)`` (the usual CIFAR variant: after five 2x2
pools a 32x32 input is 1x1x512, and the ImageNet 4096-4096 classifier would dominate the
parameter count without helping accuracy).
"""

from __future__ import annotations

import torch
from torch import nn

# Output channels of the conv3x3 layers of each stage; every stage ends with a 2x2 max-pool.
_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512),
)  # fmt: skip


class VGG16BN(nn.Module):
    """``features`` (conv/BN/ReLU/pool Sequential), global average pool, ``classifier`` Linear.

    The global pool makes inputs other than 32x32 work; at 32x32 it pools a 1x1 map.
    Shapes: (B, in_channels, H, W) with H, W >= 32 -> (B, num_classes) logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in _STAGES:
            for width in stage:
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))
