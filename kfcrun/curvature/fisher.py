"""Which targets the pre-activation derivatives ``DS`` come from (Sec. 3.1, footnote 3).

The Fisher is the covariance of the log-likelihood gradient under the **model's**
predictive distribution. Three estimates are offered, selected by
:class:`~kfcrun.curvature.vocabulary.FisherType`:

``"sampled"`` (default)
    one target per example sampled from ``softmax(logits)``; ``DS`` is a one-sample
    Monte-Carlo estimate of the true Fisher (the paper's choice).
``"expected"``
    the exact expectation over targets (curvlinops' "type-2"): one backward pass per
    class ``c`` with cotangent ``B[:, c]``, the columns of
    ``B = diag(sqrt p) - p sqrt(p)^T``, so that ``B B^T = diag(p) - p p^T``. Costs ``C``
    backward passes; used by the tests and for small output spaces.
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
import torch.nn.functional as F
from torch import Tensor

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


def _class_last(logits: Tensor) -> Tensor:
    """Logits ``(M, C)`` or ``(M, C, *spatial)`` (PyTorch's cross-entropy layout) as rows of ``C``."""
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (M, C, ...), got {tuple(logits.shape)}")
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def sample_targets(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``y ~ Categorical(softmax(logits))`` per example (class dim 1), without gradient.

    Returns int64 class indices of shape ``(M, *spatial)`` on ``logits.device``. With
    the same seeded ``generator`` (which must live on ``logits.device``) the draw is
    reproducible; ``None`` uses the global generator.
    """
    rows = _class_last(logits.detach())
    probs = torch.softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
    draws = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return draws.reshape(logits.shape[:1] + logits.shape[2:])


def nll_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """``sum_m -log softmax(logits_m)[y_m]``: per-example losses summed, not averaged."""
    return F.cross_entropy(logits, targets, reduction="sum")


def expected_fisher_losses(logits: Tensor) -> list[Tensor]:
    """``C`` linear losses whose derivative covariances sum to ``E_y[g g^T] = diag(p) - p p^T``.

    Loss ``c`` is ``sum_m <logits_m, B_m[:, c]>`` with the detached square root
    ``B_m = diag(sqrt p_m) - p_m sqrt(p_m)^T``; its derivative w.r.t. ``logits_m`` is
    ``sqrt(p_mc) (e_c - p_m)``, i.e. ``sqrt(p_c)`` times minus the NLL gradient for target ``c``.
    """
    rows = _class_last(logits)
    probs = torch.softmax(rows.detach(), dim=-1)
    root = probs.sqrt()
    losses = []
    for c in range(rows.shape[1]):
        cot = -probs * root[:, c : c + 1]
        cot[:, c] += root[:, c]
        losses.append((rows * cot).sum())
    return losses


def make_loss_fn(
    fisher_type: FisherType | str,
    *,
    targets: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LossFn:
    """The loss function for ``fisher_type`` (see the module docstring)."""
    kind = FisherType.parse(fisher_type, "fisher_type")
    if kind is FisherType.SAMPLED:
        return lambda logits: nll_sum(logits, sample_targets(logits, generator))
    if kind is FisherType.EXPECTED:
        return expected_fisher_losses
    if targets is None:
        raise ValueError("fisher_type='empirical' needs the training labels as `targets`")
    labels = targets
    return lambda logits: nll_sum(logits, labels)
