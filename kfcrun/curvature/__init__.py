"""Kronecker-factored curvature for convolution (KFC, Grosse & Martens 2016).

Knows nothing about learning rates, momentum, the runner or the data. Conventions
(paper Sec. 2-3, App. A): homogeneous coordinate at index 0, columns after it in
``weight.flatten(1)`` order, ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` (summed over output
positions, divided by M), ``Gamma_hat = 1/(M|T|) DS^T DS``, Fisher block ``Omega ⊗ Gamma``
with column-stacking vec.

Symbols (the paper's): ``Omega``/``Psi`` and ``Gamma`` are the Kronecker factors (in code
``omega``, ``gamma``: always the factors); ``γ`` is the damping (in code ``damping``), ``λ``
the weight decay (``weight_decay``, per layer ``lams``), ``ξ`` the factors' running-average
decay (``stat_decay``; the optimizers' iterate average uses ``ξ_avg``, ``avg_decay``).

Layout: :mod:`.kron_math` (pure tensor math), :mod:`.coverage` (which layers,
:func:`kfc_layers`), :mod:`.capture` and :mod:`.derivatives` (one recorded pass and the
output derivatives ``DS``), :mod:`.likelihoods` (output distributions), :mod:`.fisher`
(which targets), :mod:`.factors` (Eqn 32 estimates), :mod:`.blocks` (one class per layer
type), :mod:`.inverses` (damping strategies), :mod:`.schedule` (``T_s``/``T_f``),
:mod:`.kfc_curvature` (the manager).

Public API:

* :func:`kfc_layers` - the modules KFC covers, by name (the one definition of coverage);
  :func:`uncovered_modules` - the trainable parameters left to the plain step.
* :func:`batch_factors` / :func:`batch_factors_for_loss` - single-mini-batch ``(Omega_hat, Gamma_hat)``
  (and a normalization layer's per-channel Fisher).
* :class:`Likelihood` (:class:`SoftmaxCrossEntropy`, :class:`Gaussian`, :class:`Bernoulli`) -
  the output distribution: sampled targets, per-example NLL, output-space Fisher.
* :func:`output_derivatives` / :func:`recorded_pass` - layer inputs and ``DS`` for a loss.
* :func:`sample_targets`, :func:`nll_sum`, :func:`expected_fisher_losses` - targets and losses.
* :class:`KFCCurvature` - running factors, damped inverses, ``precondition``;
  :class:`CurvatureSchedule` - Algorithm 1's ``T_s``/``T_f``.
* :class:`FisherType`, :class:`DampingMode`, :class:`OmegaModel` - the settings' vocabulary.
"""

from .blocks import (
    DEFAULT_MAX_FACTOR_DIM,
    Conv1dBlock,
    Conv2dBlock,
    ConvBlock,
    CurvatureBlock,
    EmbeddingBlock,
    Estimate,
    KroneckerBlock,
    LinearBlock,
    NormBlock,
    UnsupportedLayerError,
    combined_grad,
    combined_matrix,
    make_block,
    split_update,
)
from .coverage import canonical_name, eager_module, kfc_layers, layer_matches, uncovered_modules
from .derivatives import LayerPass, output_derivatives, recorded_pass
from .diagnostics import KFCCurvatureWarning
from .factors import EstimateAccumulator, batch_factors, batch_factors_for_loss
from .fisher import expected_fisher_losses, make_loss_fn, nll_sum, sample_targets
from .inverses import DampedInverse, EigenInverse, KroneckerInverse, PiCholeskyInverse, UnitwiseInverse
from .kfc_curvature import InverseUpdate, KFCCurvature, MicroBatches, StatisticsUpdate
from .likelihoods import LIKELIHOODS, Bernoulli, Gaussian, Likelihood, SoftmaxCrossEntropy, make_likelihood
from .omega_lagged import OMEGA_METHODS
from .parallel import CurvatureComm
from .schedule import CurvatureSchedule
from .sharding import BatchShard, ExampleDraws
from .vocabulary import DampingMode, FisherType, OmegaModel

__all__ = [
    "DEFAULT_MAX_FACTOR_DIM",
    "LIKELIHOODS",
    "OMEGA_METHODS",
    "BatchShard",
    "Bernoulli",
    "Conv1dBlock",
    "Conv2dBlock",
    "ConvBlock",
    "CurvatureBlock",
    "CurvatureComm",
    "CurvatureSchedule",
    "DampedInverse",
    "DampingMode",
    "EigenInverse",
    "EmbeddingBlock",
    "Estimate",
    "EstimateAccumulator",
    "ExampleDraws",
    "FisherType",
    "Gaussian",
    "InverseUpdate",
    "KFCCurvature",
    "KFCCurvatureWarning",
    "KroneckerBlock",
    "KroneckerInverse",
    "LayerPass",
    "Likelihood",
    "LinearBlock",
    "MicroBatches",
    "NormBlock",
    "OmegaModel",
    "PiCholeskyInverse",
    "SoftmaxCrossEntropy",
    "StatisticsUpdate",
    "UnitwiseInverse",
    "UnsupportedLayerError",
    "batch_factors",
    "batch_factors_for_loss",
    "canonical_name",
    "combined_grad",
    "combined_matrix",
    "eager_module",
    "expected_fisher_losses",
    "kfc_layers",
    "layer_matches",
    "make_block",
    "make_likelihood",
    "make_loss_fn",
    "nll_sum",
    "output_derivatives",
    "recorded_pass",
    "sample_targets",
    "split_update",
    "uncovered_modules",
]
