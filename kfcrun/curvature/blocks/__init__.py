"""One Kronecker block class per layer type; :func:`make_block` picks it."""

from __future__ import annotations

from torch import nn

from ..vocabulary import DampingMode, OmegaModel
from .base import KroneckerBlock, UnsupportedLayerError, combined_grad, combined_matrix, split_update
from .conv import Conv2dBlock
from .linear import LinearBlock

__all__ = [
    "Conv2dBlock",
    "KroneckerBlock",
    "LinearBlock",
    "UnsupportedLayerError",
    "combined_grad",
    "combined_matrix",
    "make_block",
    "split_update",
]


def make_block(
    name: str,
    module: nn.Module,
    *,
    damping_mode: DampingMode | str = DampingMode.PI,
    omega_model: OmegaModel | str = OmegaModel.KFC,
) -> KroneckerBlock:
    """The block for ``module``; raises :class:`UnsupportedLayerError` for other layer types.

    ``omega_model`` (``"kfc"`` or ``"sua"``) selects the conv Omega model; Linear layers
    are standard K-FAC either way.
    """
    if isinstance(module, nn.Conv2d):
        return Conv2dBlock(name, module, damping_mode=damping_mode, omega_model=omega_model)
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module, damping_mode=damping_mode)
    raise UnsupportedLayerError(f"kfc: layer {name!r} of type {type(module).__name__} has no KFC block")
