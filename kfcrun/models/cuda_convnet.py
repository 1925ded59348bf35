"""The cuda-convnet CIFAR-10 network used in the KFC paper (Sec. 5, "layers-18pct").

Source: Krizhevsky's cuda-convnet, ``example-layers/layers-18pct.cfg`` and
``layer-params-18pct.cfg`` ("18% error on CIFAR-10 in 20 minutes"), checked against
``layer.py`` and the CUDA kernels of the public mirror dnouri/cuda-convnet:

====  =========================================================================
conv1 5x5, 3->32, pad 2, no neuron;  pool1 max 3x3/2 with the ReLU *after* the pool;  rnorm1
conv2 5x5, 32->32, pad 2, ReLU;      pool2 avg 3x3/2;  rnorm2
conv3 5x5, 32->64, pad 2, ReLU;      pool3 avg 3x3/2
fc10  1024 -> 10, softmax (the loss applies it)
====  =========================================================================

Pools round up (32->16->8->4). ``rnorm`` is :class:`SpatialResponseNorm` (size 3,
scale 5e-5, power 0.75). Weights start N(0, initW^2) with initW 1e-4 for conv1 and
1e-2 for the rest; biases start at 0. The network expects mean-subtracted pixels on
the 0-255 scale (cuda-convnet's ``convdata.py``); those init scales assume it.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from kfcrun.models.layers import SpatialResponseNorm, pool_3x3_stride2, resolve_pooling
from kfcrun.schema import boolean, choice

#: Gaussian init std per layer, ``initW`` in layers-18pct.cfg.
CUDA_CONVNET_INIT_STD = {"conv1": 1e-4, "conv2": 1e-2, "conv3": 1e-2, "fc10": 1e-2}


class CudaConvnetCifar10(nn.Module):
    """cuda-convnet "layers-18pct" CIFAR-10 network, optionally with batch norm.

    Args:
        num_classes: outputs of the final layer (10 for CIFAR-10).
        in_channels: input channels (3).
        batch_norm: insert ``BatchNorm2d`` after every conv pre-activation (paper
            Sec. 5.2, Fig. 4). Those convs then have no bias (BN's shift replaces it);
            the output layer ``fc10`` keeps its bias and gets no BN, so the logits are
            not renormalized.
        pooling: ``"paper"`` (max, avg, avg), ``"max"`` or ``"avg"`` everywhere.
        image_size: input height/width; 32 gives the published 1024-input fc10.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: Annotated[bool, boolean()] = False,
        pooling: Annotated[str, choice("paper", "max", "avg")] = "paper",
        image_size: int = 32,
    ) -> None:
        super().__init__()
        kinds = resolve_pooling(pooling, ("max", "avg", "avg"))
        bias = not batch_norm
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2, bias=bias)
        self.bn1 = nn.BatchNorm2d(32) if batch_norm else nn.Identity()
        self.pool1 = pool_3x3_stride2(kinds[0])
        self.relu1 = nn.ReLU()
        self.rnorm1 = SpatialResponseNorm()
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2, bias=bias)
        self.bn2 = nn.BatchNorm2d(32) if batch_norm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.pool2 = pool_3x3_stride2(kinds[1])
        self.rnorm2 = SpatialResponseNorm()
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2, bias=bias)
        self.bn3 = nn.BatchNorm2d(64) if batch_norm else nn.Identity()
        self.relu3 = nn.ReLU()
        self.pool3 = pool_3x3_stride2(kinds[2])
        self.flatten = nn.Flatten()
        side = image_size
        for _ in range(3):
            side = -(-(side - 3) // 2) + 1  # ceil((side - 3) / 2) + 1
        self.fc10 = nn.Linear(64 * side * side, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """cuda-convnet init: weights ~ N(0, initW^2), biases 0 (``initB`` default)."""
        for name, std in CUDA_CONVNET_INIT_STD.items():
            layer = getattr(self, name)
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(M, num_classes)`` of a batch of images ``x``.

        ``x`` has shape ``(M, in_channels, image_size, image_size)`` (the constructor's arguments).
        """
        x = self.rnorm1(self.relu1(self.pool1(self.bn1(self.conv1(x)))))
        x = self.rnorm2(self.pool2(self.relu2(self.bn2(self.conv2(x)))))
        x = self.pool3(self.relu3(self.bn3(self.conv3(x))))
        return self.fc10(self.flatten(x))
