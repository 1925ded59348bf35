"""One block class per layer type; :func:`make_block` picks it.

==================================  ====================  ==========================================
module                              block                 structure
==================================  ====================  ==========================================
``nn.Conv2d``, ``nn.Conv1d``        :class:`ConvBlock`    ``Omega ⊗ Gamma`` (KFC), one per group
``nn.Linear``                       :class:`LinearBlock`  ``Psi ⊗ Gamma`` (K-FAC)
``nn.Embedding``                    :class:`EmbeddingBlock`  ``diag(counts) ⊗ Gamma``
BatchNorm, GroupNorm, LayerNorm,    :class:`NormBlock`    per-channel ``2 x 2`` Fisher of scale/shift
RMSNorm (affine part)
==================================  ====================  ==========================================
"""

from __future__ import annotations

from torch import nn

from ..vocabulary import DampingMode, OmegaModel
from .base import (
    DEFAULT_MAX_FACTOR_DIM,
    CurvatureBlock,
    Estimate,
    KroneckerBlock,
    UnsupportedLayerError,
    combined_grad,
    combined_matrix,
    split_update,
)
from .conv import Conv1dBlock, Conv2dBlock, ConvBlock
from .embedding import EmbeddingBlock
from .linear import LinearBlock
from .norm import NORM_LAYER_TYPES, NormBlock

__all__ = [
    "DEFAULT_MAX_FACTOR_DIM",
    "NORM_LAYER_TYPES",
    "Conv1dBlock",
    "Conv2dBlock",
    "ConvBlock",
    "CurvatureBlock",
    "EmbeddingBlock",
    "Estimate",
    "KroneckerBlock",
    "LinearBlock",
    "NormBlock",
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
    max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
    omega_method: str = "auto",
) -> CurvatureBlock:
    """The block for ``module``; raises :class:`UnsupportedLayerError` for other layer types.

    ``omega_model`` (``"kfc"`` or ``"sua"``) selects the conv Omega model; Linear layers
    are standard K-FAC either way. ``max_factor_dim`` caps a Kronecker factor's size (see
    :class:`KroneckerBlock`); normalization blocks have no large factor. ``omega_method``
    (``"auto"``, ``"patch"``, ``"lagged"``) picks how a conv computes its Omega (see
    :class:`ConvBlock`); other blocks ignore it.
    """
    if isinstance(module, nn.Conv2d):
        return Conv2dBlock(
            name, module, damping_mode, omega_model, max_factor_dim=max_factor_dim, omega_method=omega_method
        )
    if isinstance(module, nn.Conv1d):
        return Conv1dBlock(
            name, module, damping_mode, omega_model, max_factor_dim=max_factor_dim, omega_method=omega_method
        )
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module, damping_mode, max_factor_dim=max_factor_dim)
    if isinstance(module, nn.Embedding):
        return EmbeddingBlock(name, module, damping_mode, max_factor_dim=max_factor_dim)
    if isinstance(module, NORM_LAYER_TYPES):
        return NormBlock(name, module)
    raise UnsupportedLayerError(f"kfc: layer {name!r} of type {type(module).__name__} has no KFC block")
