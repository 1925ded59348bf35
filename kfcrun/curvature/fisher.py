"""Which targets the pre-activation derivatives ``DS`` come from (Sec. 3.1, footnote 3).

The Fisher is the covariance of the log-likelihood gradient under the **model's**
predictive distribution. Three estimates are offered, selected by
:class:`~kfcrun.curvature.vocabulary.FisherType`, for any
:class:`~kfcrun.curvature.likelihoods.Likelihood` (softmax cross-entropy by default):

``"sampled"`` (default)
    one target per example (and output position) sampled from the model's predictive
    distribution; ``DS`` is a one-sample Monte-Carlo estimate of the true Fisher (the
    paper's choice).
``"expected"``
    the exact expectation over targets (curvlinops' "type-2"): one backward pass per
    column of a square root of the output Fisher and output position
    (:meth:`~kfcrun.curvature.likelihoods.Likelihood.expected_losses`). Used by the
    tests and for small output spaces.
``"empirical"``
    the training labels instead of samples: the empirical Fisher, a different
    (worse) object, only ever used when asked for by this name.

The loss whose derivatives are taken is the **per-example** negative log-likelihood
``-log p(y|x)`` summed over the batch, so ``DS`` rows are per-example derivatives
(not divided by the batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .likelihoods import Likelihood, SoftmaxCrossEntropy, make_likelihood
from .sharding import ExampleDraws
from .vocabulary import FisherType

__all__ = [
    "LossFn",
    "expected_fisher_losses",
    "make_loss_fn",
    "nll_sum",
    "sample_targets",
]

#: A map from the model output (logits) to one scalar loss, or to several whose
#: per-pass ``DS^T DS`` are summed (see :func:`kron_math.gamma_from_derivatives`).
LossFn = Callable[[Tensor], Tensor | Sequence[Tensor]]

_SOFTMAX = SoftmaxCrossEntropy()


def sample_targets(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``y ~ Categorical(softmax(logits))`` per example (class dim 1), without gradient.

    Returns int64 class indices of shape ``(M, *spatial)`` on ``logits.device``. With
    the same seeded ``generator`` (which must live on ``logits.device``) the draw is
    reproducible; ``None`` uses the global generator.
    """
    return _SOFTMAX.sample(logits, generator)


def nll_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """``sum_m -log softmax(logits_m)[y_m]``: per-example losses summed, not averaged."""
    return _SOFTMAX.nll_sum(logits, targets)


def expected_fisher_losses(logits: Tensor) -> list[Tensor]:
    """Losses whose derivative covariances sum to ``E_y[g g^T] = diag(p) - p p^T`` (softmax, class dim 1).

    See :meth:`SoftmaxCrossEntropy.expected_losses`: for ``(M, C)`` logits, loss ``c`` is
    ``sum_m <logits_m, B_m[:, c]>`` with the detached square root
    ``B_m = diag(sqrt p_m) - p_m sqrt(p_m)^T``.
    """
    return _SOFTMAX.expected_losses(logits)


def make_loss_fn(
    fisher_type: FisherType | str,
    *,
    targets: Tensor | None = None,
    generator: torch.Generator | ExampleDraws | None = None,
    likelihood: Likelihood | str = _SOFTMAX,
) -> LossFn:
    """The loss function for ``fisher_type`` and ``likelihood`` (see the module docstring).

    ``targets`` are the training labels: required for ``"empirical"``, and for a
    likelihood that masks positions (``ignore_index``) whatever the Fisher type.
    """
    kind = FisherType.parse(fisher_type, "fisher_type")
    lik = make_likelihood(likelihood)
    if lik.needs_labels and targets is None:
        raise ValueError(f"{lik!r} masks positions by the training labels: pass them as `targets`")
    if kind is FisherType.SAMPLED:
        return lambda out: lik.nll_sum(out, lik.sample(out, generator, labels=targets))
    if kind is FisherType.EXPECTED:
        return lambda out: lik.expected_losses(out, labels=targets)
    if targets is None:
        raise ValueError("fisher_type='empirical' needs the training labels as `targets`")
    labels = targets
    return lambda out: lik.nll_sum(out, labels)
