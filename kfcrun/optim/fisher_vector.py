"""Exact Fisher bilinear forms ``v_i^T F v_j`` of a softmax classifier, by forward-mode AD.

For softmax cross-entropy the Fisher (= generalized Gauss-Newton) of the MEAN loss
over inputs ``x_1..x_n`` is ``F = (1/n) sum_m J_m^T H_m J_m`` with ``J_m`` the Jacobian
of the logits w.r.t. the parameters and ``H_m = diag(p_m) - p_m p_m^T`` the Fisher of
the categorical distribution in logit space (``p_m`` the predicted probabilities).
With ``u_im = J_m v_i`` (one JVP through the network per direction ``v_i``)::

    v_i^T F v_j = (1/n) sum_m u_im^T H_m u_jm
                = (1/n) sum_m [ sum_k p_mk u_imk u_jmk - (sum_k p_mk u_imk)(sum_k p_mk u_jmk) ]

(paper App. A.1 for ``nu``, App. A.2 for K-FAC's 2x2 model; Schraudolph 2002).

* :func:`fisher_gram` - the Gram matrix ``G_ij = v_i^T F v_j`` of several directions,
  one forward-mode pass per direction on the same inputs (batched over the directions
  with ``vmap``, which on the CPU is several times faster than a loop of JVPs);
* :func:`fisher_quadratic` - ``v^T F v``, its 1x1 case (KFC-pre's ``nu``);
* :func:`softmax_output_gram` - the only softmax-specific part: ``H_m`` applied to the
  JVPs in output space. Another likelihood (Gaussian, Bernoulli) replaces only this.

The forward passes run in the model's current mode (dropout masks and BatchNorm batch
statistics as in training). Every direction sees the SAME dropout masks (``vmap`` with
``randomness="same"``), so the ``J_m`` agree. BatchNorm running statistics are updated on
copies, so the model is unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

__all__ = ["fisher_gram", "fisher_quadratic", "softmax_output_gram"]


def softmax_output_gram(logits: Tensor, jvps: Sequence[Tensor]) -> Tensor:
    """``G_ij = (1/n) sum_m u_im^T (diag(p_m) - p_m p_m^T) u_jm`` for logits and JVPs ``u_i``, all ``(n, K)``.

    The output-space Fisher of the softmax (categorical) likelihood, applied to the
    directions' JVPs and averaged over the examples. Summed in at least float32.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # no half-precision sums
    probs = torch.softmax(logits.to(dtype), dim=1)
    us = [u.to(dtype) for u in jvps]
    means = [(probs * u).sum(1) for u in us]  # E_p[u] per example
    count = len(us)
    gram = torch.empty(count, count, dtype=dtype, device=logits.device)
    for i in range(count):
        for j in range(i, count):
            # i == j: p * u.square() and mean.square(), the same operations as v^T F v always used
            second = (probs * us[i].square()).sum(1) if i == j else (probs * (us[i] * us[j])).sum(1)
            product = means[i].square() if i == j else means[i] * means[j]
            gram[i, j] = gram[j, i] = (second - product).mean()
    return gram


def fisher_gram(model: nn.Module, inputs: Tensor, directions: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """``G_ij = v_i^T F v_j`` (``R x R`` tensor) of the exact Fisher on ``inputs``, one JVP per direction.

    Several directions share one batched pass (``vmap`` over the tangents, the same dropout
    masks for all); a single direction takes a plain JVP (KFC-pre's ``nu``, as it always was).

    Args:
        model: maps ``inputs`` to logits of shape ``(n, classes)``.
        inputs: the examples the Fisher is estimated on.
        directions: the ``v_i``, each by parameter name (as in ``model.named_parameters()``);
            parameters not listed get a zero tangent.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def logits_of(parameters: dict[str, Tensor]) -> Tensor:
        # Fresh copies made inside the transform: BatchNorm may update them in place.
        scratch = {name: b.detach().clone() for name, b in buffers.items()}
        return functional_call(model, (parameters, scratch), (inputs,))

    tangents = [
        {name: direction[name] if name in direction else torch.zeros_like(p) for name, p in params.items()}
        for direction in directions
    ]
    if not tangents:
        return torch.zeros(0, 0, dtype=torch.float32, device=inputs.device)
    with warnings.catch_warnings():
        # torch.func scripts a helper of its own on first use; the deprecation is torch's, not ours
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        if len(tangents) == 1:
            output = jvp(logits_of, (params,), (tangents[0],))
            logits, jvps = output[0], [output[1]]
        else:
            stacked = {name: torch.stack([t[name] for t in tangents]) for name in params}
            batched = vmap(lambda t: jvp(logits_of, (params,), (t,)), randomness="same")(stacked)
            logits, jvps = batched[0][0], list(batched[1].unbind(0))  # the logits are the same for all
    return softmax_output_gram(logits, jvps)


def fisher_quadratic(model: nn.Module, inputs: Tensor, tangents: Mapping[str, Tensor]) -> Tensor:
    """``v^T F v`` (0-d tensor) for the parameter-space direction ``tangents`` on ``inputs``.

    Args:
        model: maps ``inputs`` to logits of shape ``(n, classes)``.
        inputs: the examples the Fisher is estimated on.
        tangents: ``v`` by parameter name (as in ``model.named_parameters()``); parameters
            not listed get a zero tangent.
    """
    return fisher_gram(model, inputs, [tangents])[0, 0]
