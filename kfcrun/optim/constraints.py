"""Weight constraints applied after each optimizer step."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from kfcrun.optim.param_groups import weight_layers


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Max-norm constraint: rescale each unit's incoming weight vector to norm <= ``max_norm``.

    A unit is an output row of a Linear weight or an output filter of a Conv2d weight
    (biases are not constrained). Srivastava et al. (JMLR 2014, Appendix B.2) used
    ``c = 4`` for all weights of the SVHN network.
    """
    for module in weight_layers(model).values():
        rows = cast(Tensor, module.weight).flatten(1)
        norms = rows.norm(dim=1, keepdim=True)
        rows.mul_(torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0))
