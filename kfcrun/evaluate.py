"""Evaluation of a classifier on a tensor dataset: mean NLL (nats) and error rate."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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
