"""ResNet-18 for 32x32 images (CIFAR), with batch normalization.

He et al. (2016) "Deep residual learning for image recognition", the ImageNet ResNet-18
(``[2, 2, 2, 2]`` basic blocks of widths 64, 128, 256, 512) adapted to 32x32 inputs the way
CIFAR training recipes do (e.g. kuangliu/pytorch-cifar): a 3x3 stride-1 stem without max
pooling, so the four stages run at 32, 16, 8 and 4 pixels, then global average pooling and
one Linear layer. Every conv is bias-free and followed by BatchNorm (its shift is the bias);
a stage's first block downsamples with stride 2 and a 1x1 conv + BN shortcut. 11.17 M
parameters for 10 classes. ``width`` scales every stage (64 is the standard network).

With KFC the largest factor is ``Omega`` of the 3x3 convs of the last stage:
``512 * 9 = 4608`` (no bias).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from kfcrun.schema import integer

__all__ = ["BasicBlock", "ResNet18Cifar"]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual block on ``x`` ``(M, C, H, W)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max pooling, BN everywhere (see the module docstring).

    Args:
        num_classes: outputs of the final Linear layer.
        in_channels: input channels.
        width: channels of the first stage (64 = the standard ResNet-18; stages double it).

    Initialisation is PyTorch's default for conv and Linear layers (Kaiming-uniform), BN
    scale 1 and shift 0, as in torchvision's ResNet.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: Annotated[int, integer(1, "64")] = 64
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        channels = width
        for i, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**i
            stages.append(nn.Sequential(BasicBlock(channels, out, stride), BasicBlock(out, out, 1)))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(M, num_classes)`` of images ``(M, in_channels, H, W)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.pool(out).flatten(1))
