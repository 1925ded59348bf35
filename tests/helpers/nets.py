"""Small float64 networks shared by the curvature tests."""

from __future__ import annotations

import torch
from torch import nn


def conv_net(conv: nn.Conv2d, *, in_hw: int = 7, classes: int = 4, seed: int = 0) -> nn.Sequential:
    """``conv -> tanh -> flatten -> Linear(classes)`` in float64, weights from ``seed``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        flat = conv(torch.zeros(1, conv.in_channels, in_hw, in_hw)).numel()
    net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, classes))
    torch.manual_seed(seed)
    for p in net.parameters():
        nn.init.normal_(p, std=0.5)
    return net.double()


def two_conv_net(seed: int = 0) -> nn.Sequential:
    """Two convs (stride 2, then even-kernel ``same``), ReLU, pooling, Linear; float64."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, padding="same", bias=False),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 4),
    )
    for p in net.parameters():
        nn.init.normal_(p, std=0.5)
    return net.double()
