"""Layers of the 2013-era networks that PyTorch does not ship in the same form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialResponseNorm(nn.Module):
    """cuda-convnet's ``rnorm`` layer: response normalization *within* each feature map.

    For every map and position, with ``u`` the input::

        out = u / (1 + (scale / size**2) * sum_{size x size window} u**2) ** power

    The window is ``size x size``, centred on the position, and clipped at the image
    border (out-of-image terms count as zero while the divisor stays ``size**2``).

    Source: cuda-convnet ``layer.py`` (``NormLayerParser``: ``scale /= size**2`` for
    ``type=rnorm``) and ``conv_util.cu`` (``kCNorm*``: ``x * (1 + addScale*sum x^2)^-pow``).
    This is NOT ``torch.nn.LocalResponseNorm``, which normalizes across maps.
    Defaults are those of ``layer-params-18pct.cfg``: size 3, scale 5e-5, power 0.75.
    """

    def __init__(self, size: int = 3, scale: float = 5e-5, power: float = 0.75) -> None:
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"SpatialResponseNorm size must be a positive odd integer, got {size}")
        self.size, self.scale, self.power = size, scale, power

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u / (1 + (scale / size**2) * window sum of u**2) ** power`` for ``u`` of shape ``(M, C, H, W)``.

        The output has the shape of ``u``.
        """
        # avg_pool with zero padding and count_include_pad divides by size**2 everywhere,
        # which is exactly cuda-convnet's constant divisor with clipped border sums.
        mean_sq = F.avg_pool2d(u * u, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return u * (1.0 + self.scale * mean_sq).pow(-self.power)

    def extra_repr(self) -> str:
        """``size``, ``scale`` and ``power``, shown in the module's ``repr``."""
        return f"size={self.size}, scale={self.scale}, power={self.power}"


def pool_3x3_stride2(kind: str) -> nn.Module:
    """3x3 pooling with stride 2 that rounds the output size UP (32 -> 16 -> 8 -> 4).

    cuda-convnet (``layer.py``, ``PoolLayerParser``) sets
    ``outputsX = ceil((imgSize - start - sizeX) / stride) + 1``; the last window hangs
    over the border and is clipped. Average pooling divides by the number of in-image
    pixels (final cuda-convnet release, ``AvgPooler`` with ``regionSize``), which is what
    ``ceil_mode=True`` without padding does in PyTorch.
    """
    if kind == "max":
        return nn.MaxPool2d(3, stride=2, ceil_mode=True)
    if kind == "avg":
        return nn.AvgPool2d(3, stride=2, ceil_mode=True)
    raise ValueError(f"pooling kind must be 'max' or 'avg', got {kind!r}")


def resolve_pooling(pooling: str, paper_choice: tuple[str, ...]) -> tuple[str, ...]:
    """Pooling kind per pooling layer: the published choice, or one kind everywhere.

    ``pooling="paper"`` keeps each network's published layers; ``"max"`` or ``"avg"``
    uses that kind everywhere (the assumption study, paper Sec. 5.1, Fig. 1(c, d)).
    """
    if pooling == "paper":
        return paper_choice
    if pooling in ("max", "avg"):
        return tuple(pooling for _ in paper_choice)
    raise ValueError(f"pooling must be 'paper', 'max' or 'avg', got {pooling!r}")
