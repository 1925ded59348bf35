"""Exact Fisher quadratic form ``v^T F v`` of a network's likelihood, by forward-mode AD.

The Fisher (= generalized Gauss-Newton for these exponential families) of the
per-example negative log-likelihood averaged over inputs ``x_1..x_n`` is
``F = (1/n) sum_m J_m^T H_m J_m``, with ``J_m`` the Jacobian of example ``m``'s whole
output w.r.t. the parameters and ``H_m`` the output-space Fisher of its likelihood
(:mod:`kfcrun.curvature.likelihoods`), summed over the example's output positions - the
same object the KFC blocks approximate. With ``u_m = J_m v`` (one JVP through the network)::

    v^T F v = (1/n) sum_m u_m^T H_m u_m

e.g. for softmax cross-entropy ``u^T H u = sum_t [ sum_k p_tk u_tk^2 - (sum_k p_tk u_tk)^2 ]``
(paper App. A.1; Schraudolph 2002). The forward pass runs in the model's current
mode (dropout masks and BatchNorm batch statistics as in training); BatchNorm
running statistics are updated on copies, so the model is unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from kfcrun.curvature import Likelihood, SoftmaxCrossEntropy, make_likelihood

__all__ = ["fisher_quadratic"]

_SOFTMAX = SoftmaxCrossEntropy()


def fisher_quadratic(
    model: nn.Module,
    inputs: Tensor,
    tangents: Mapping[str, Tensor],
    *,
    likelihood: Likelihood | str = _SOFTMAX,
    targets: Tensor | None = None,
) -> Tensor:
    """``v^T F v`` (0-d tensor) for the parameter-space direction ``tangents`` on ``inputs``.

    Args:
        model: maps ``inputs`` to the output ``likelihood`` is about (default: logits
            ``(n, classes, ...)`` of a softmax cross-entropy).
        inputs: the examples the Fisher is estimated on.
        tangents: ``v`` by parameter name (as in ``model.named_parameters()``); parameters
            not listed get a zero tangent.
        likelihood: the output distribution (name or object).
        targets: training labels, only for a likelihood that masks positions.
    """
    lik = make_likelihood(likelihood)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    directions = {
        name: tangents[name] if name in tangents else torch.zeros_like(p) for name, p in params.items()
    }

    def output_of(parameters: dict[str, Tensor]) -> Tensor:
        # Fresh copies made inside the transform: BatchNorm may update them in place.
        scratch = {name: b.detach().clone() for name, b in buffers.items()}
        return functional_call(model, (parameters, scratch), (inputs,))

    with warnings.catch_warnings():
        # torch.func scripts a helper of its own on first use; the deprecation is torch's, not ours
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        # Without has_aux, jvp returns the pair (output, Jacobian-vector product).
        output, jv = cast("tuple[Tensor, Tensor]", jvp(output_of, (params,), (directions,)))
    return lik.fisher_quadratic(output, jv, targets).mean()
