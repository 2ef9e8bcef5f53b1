"""MLPNet: the 784-40-20-10 MNIST multilayer perceptron of the WoodFisher / CHITA benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class MLPNet(nn.Module):
    """Flatten, then fc1-ReLU-fc2-ReLU-fc3, all ``nn.Linear`` without biases.

    Shapes: (B, in_channels, 28, 28) or (B, in_channels * 784) -> (B, num_classes) logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(in_channels * 28 * 28, 40, bias=False)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(40, 20, bias=False)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(20, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))
