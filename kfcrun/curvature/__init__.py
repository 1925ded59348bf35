"""Kronecker-factored curvature for convolution (KFC, Grosse & Martens 2016).

Knows nothing about learning rates or momentum. Conventions (paper Sec. 2-3, App. A):
homogeneous coordinate at index 0, columns after it in ``weight.flatten(1)`` order,
``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` (summed over output positions, divided by M),
``Gamma_hat = 1/(M|T|) DS^T DS``, Fisher block ``Omega ⊗ Gamma`` with column-stacking vec.

Public API:

* :func:`batch_factors` - single-mini-batch ``(Omega_hat, Gamma_hat)`` of every Conv2d/Linear.
* :func:`batch_factors_for_loss` - the same for any loss / list of losses.
* :func:`sample_targets` - ``y ~ softmax(logits)`` with a ``torch.Generator``.
* :class:`KFCCurvature` - running factors, damped inverses, ``precondition``.
* :func:`combined_grad` / :func:`split_update` - ``[grad_b | grad_W.flatten(1)]`` and back.
"""

from .blocks import (
    Conv2dBlock,
    KroneckerBlock,
    LinearBlock,
    UnsupportedLayerError,
    combined_grad,
    combined_matrix,
    split_update,
    tracked_modules,
)
from .factors import batch_factors, batch_factors_for_loss
from .fisher import FISHER_TYPES, expected_fisher_losses, nll_sum, sample_targets
from .preconditioner import DAMPING_MODES, KFCCurvature, KFCCurvatureWarning

__all__ = [
    "DAMPING_MODES",
    "FISHER_TYPES",
    "Conv2dBlock",
    "KFCCurvature",
    "KFCCurvatureWarning",
    "KroneckerBlock",
    "LinearBlock",
    "UnsupportedLayerError",
    "batch_factors",
    "batch_factors_for_loss",
    "combined_grad",
    "combined_matrix",
    "expected_fisher_losses",
    "nll_sum",
    "sample_targets",
    "split_update",
    "tracked_modules",
]
