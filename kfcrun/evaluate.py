"""Evaluation of a classifier on a tensor dataset: mean NLL (nats) and error rate.

:func:`batchnorm_statistics_for_current_parameters` recomputes BatchNorm's running
statistics for the parameters the model holds (the averaged iterates), as evaluating an
average of the weights needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kfcrun.curvature.derivatives import preserved_buffers


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean negative log-likelihood (nats per example) and classification error in [0, 1].

    The model runs in eval mode (dropout off, BatchNorm on running statistics) and is
    returned to its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=images.device)
    wrong = torch.zeros((), dtype=torch.int64, device=images.device)
    try:
        for start in range(0, len(images), batch_size):
            x = preprocess(images[start : start + batch_size])
            y = labels[start : start + batch_size]
            logits = model(x)
            total_nll += F.cross_entropy(logits.double(), y, reduction="sum")
            wrong += (logits.argmax(dim=1) != y).sum()
    finally:
        model.train(was_training)
    n = len(images)
    return {"nll": total_nll.item() / n, "error": wrong.item() / n}


@contextmanager
def batchnorm_statistics_for_current_parameters(
    model: nn.Module,
    images: torch.Tensor,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1000,
) -> Iterator[None]:
    """Inside: every BatchNorm's running statistics recomputed for the parameters the model holds now.

    The running mean and variance a BN network is evaluated with were gathered along the
    training iterates; with other parameters swapped in (the averaged iterates) they no
    longer match the activations, and the network can fall to chance. So, as for SWA
    (``torch.optim.swa_utils.update_bn``): reset the statistics and run the model over
    ``images`` in batches of ``batch_size`` with only the BatchNorm layers in training mode
    and ``momentum=None``, which makes each running mean the plain average over the batches
    of the batch means, and each running variance the average of the unbiased batch
    variances. Unlike ``update_bn`` every other layer stays in eval mode (dropout off,
    no random numbers drawn), and on exit the statistics, momenta and modes are restored,
    so training continues exactly as without the evaluation. A model without tracked
    BatchNorm is left alone.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    with preserved_buffers(model):
        try:
            model.eval()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    model(preprocess(images[start : start + batch_size]))
            _restore_modes(modes)
            yield
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            _restore_modes(modes)


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training
