"""The SVHN network of Srivastava (2013) used in the KFC paper (Sec. 5).

Source: N. Srivastava, "Improving neural networks with dropout", MSc thesis 2013, as
summarized in Srivastava et al., "Dropout", JMLR 2014, Appendix B.2:

* three conv layers of 96, 128 and 256 filters, 5x5, stride 1, each followed by
  max-pooling over 3x3 regions with stride 2;
* two fully connected hidden layers of 2048 units, then 10 outputs; ReLU everywhere;
* dropout with retention probabilities (0.9, 0.75, 0.75, 0.5, 0.5, 0.5), going from
  the input through the conv layers to the fully connected layers;
* a max-norm constraint c = 4 on all weights (applied by the trainer, see
  :func:`kfcrun.optim.constraints.apply_max_norm`).

Not confirmed by the sources (our choices, documented):

* padding 2 ("same") for the 5x5 convs and pools that round up as in cuda-convnet
  (32->16->8->4), giving 256*4*4 = 4096 inputs to fc1;
* no response normalization;
* He (Kaiming) normal init for weights and zero biases, because the original init
  scale is not stated.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from kfcrun.models.layers import pool_3x3_stride2, resolve_pooling
from kfcrun.schema import boolean, choice

#: Probability of KEEPING a unit, input first (dropout JMLR 2014, Appendix B.2).
SVHN_RETENTION = (0.9, 0.75, 0.75, 0.5, 0.5, 0.5)


class SrivastavaSVHNNet(nn.Module):
    """Srivastava (2013) SVHN conv net: conv96-conv128-conv256-fc2048-fc2048-fc10.

    Args:
        num_classes: outputs (10 digits).
        in_channels: input channels (3).
        batch_norm: ``BatchNorm`` after every conv and hidden-FC pre-activation (those
            layers then have no bias); the output layer keeps its bias and has no BN.
        pooling: ``"paper"``/``"max"`` (max everywhere) or ``"avg"``.
        dropout: apply the published dropout; ``False`` removes every dropout layer.
        image_size: input height/width.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: Annotated[bool, boolean()] = False,
        pooling: Annotated[str, choice("paper", "max", "avg")] = "paper",
        dropout: Annotated[bool, boolean()] = True,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        kinds = resolve_pooling(pooling, ("max", "max", "max"))
        keep = SVHN_RETENTION if dropout else (1.0,) * 6
        bias = not batch_norm
        widths = (in_channels, 96, 128, 256)

        self.drop0 = _dropout(keep[0])
        for i in range(3):
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], 5, padding=2, bias=bias))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(widths[i + 1]) if batch_norm else nn.Identity())
            setattr(self, f"relu{i + 1}", nn.ReLU())
            setattr(self, f"pool{i + 1}", pool_3x3_stride2(kinds[i]))
            setattr(self, f"drop{i + 1}", _dropout(keep[i + 1]))
        side = image_size
        for _ in range(3):
            side = -(-(side - 3) // 2) + 1
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(256 * side * side, 2048, bias=bias)
        self.bn_fc1 = nn.BatchNorm1d(2048) if batch_norm else nn.Identity()
        self.relu_fc1 = nn.ReLU()
        self.drop_fc1 = _dropout(keep[4])
        self.fc2 = nn.Linear(2048, 2048, bias=bias)
        self.bn_fc2 = nn.BatchNorm1d(2048) if batch_norm else nn.Identity()
        self.relu_fc2 = nn.ReLU()
        self.drop_fc2 = _dropout(keep[5])
        self.fc3 = nn.Linear(2048, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal weights (fan-in, ReLU gain), zero biases; see the module docstring."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(M, num_classes)`` of a batch of images ``x``.

        ``x`` has shape ``(M, in_channels, image_size, image_size)`` (the constructor's arguments).
        """
        x = self.drop0(x)
        for i in range(1, 4):
            conv, bn, relu = getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), getattr(self, f"relu{i}")
            pool, drop = getattr(self, f"pool{i}"), getattr(self, f"drop{i}")
            x = drop(pool(relu(bn(conv(x)))))
        x = self.flatten(x)
        x = self.drop_fc1(self.relu_fc1(self.bn_fc1(self.fc1(x))))
        x = self.drop_fc2(self.relu_fc2(self.bn_fc2(self.fc2(x))))
        return self.fc3(x)


def _dropout(keep: float) -> nn.Module:
    return nn.Dropout(p=1.0 - keep) if keep < 1.0 else nn.Identity()
