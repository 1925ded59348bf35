"""Exact Fisher quadratic form ``v^T F v`` of a softmax classifier, by forward-mode AD.

For softmax cross-entropy the Fisher (= generalized Gauss-Newton) of the MEAN loss
over inputs ``x_1..x_n`` is ``F = (1/n) sum_m J_m^T (diag(p_m) - p_m p_m^T) J_m``,
with ``J_m`` the Jacobian of the logits w.r.t. the parameters and ``p_m`` the
predicted probabilities. With ``u_m = J_m v`` (one JVP through the network)::

    v^T F v = (1/n) sum_m [ sum_k p_mk u_mk^2 - (sum_k p_mk u_mk)^2 ]

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


def fisher_quadratic(model: nn.Module, inputs: Tensor, tangents: Mapping[str, Tensor]) -> Tensor:
    """``v^T F v`` (0-d tensor) for the parameter-space direction ``tangents`` on ``inputs``.

    Args:
        model: maps ``inputs`` to logits of shape ``(n, classes)``.
        inputs: the examples the Fisher is estimated on.
        tangents: ``v`` by parameter name (as in ``model.named_parameters()``); parameters
            not listed get a zero tangent.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    directions = {
        name: tangents[name] if name in tangents else torch.zeros_like(p) for name, p in params.items()
    }

    def logits_of(parameters: dict[str, Tensor]) -> Tensor:
        # Fresh copies made inside the transform: BatchNorm may update them in place.
        scratch = {name: b.detach().clone() for name, b in buffers.items()}
        return functional_call(model, (parameters, scratch), (inputs,))

    with warnings.catch_warnings():
        # torch.func scripts a helper of its own on first use; the deprecation is torch's, not ours
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        # Without has_aux, jvp returns the pair (output, Jacobian-vector product).
        logits, jv = cast("tuple[Tensor, Tensor]", jvp(logits_of, (params,), (directions,)))
    dtype = torch.promote_types(logits.dtype, torch.float32)  # no half-precision sums
    probs = torch.softmax(logits.to(dtype), dim=1)
    jv = jv.to(dtype)
    per_example = (probs * jv.square()).sum(1) - (probs * jv).sum(1).square()
    return per_example.mean()
